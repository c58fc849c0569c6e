"""One image, several captions (COCO's five, Flickr30k's five): how such a sample is written at every stage.

A sample is stored once with all its captions, never once per caption (which copies the image each time):

- manifests (prepared and validated): a row with one caption keeps it in ``text`` (the form of every
  single-caption source, unchanged); a row with several holds them in ``captions`` (a list of str) instead;
- shards: the sample's captions are one member, ``{key}.captions.json`` (a JSON list), beside its image;
- training: the loader gives each visit of the sample one caption (``flava.data.loader.caption_index``).
"""
from __future__ import annotations

from typing import Any

CAPTIONS_FIELD = "captions"
TEXT_FIELD = "text"
CAPTIONS_MEMBER = "captions.json"  # the shard member's extension: ``{key}.captions.json``


def pair_row(key: str, image: str, captions: list[str], source: str) -> dict[str, Any]:
    """The manifest row of an image with ``captions`` (at least one): ``text`` when one, ``captions`` when more."""
    if not captions:
        raise ValueError(f"pair {key!r} has no caption")
    text = {TEXT_FIELD: captions[0]} if len(captions) == 1 else {CAPTIONS_FIELD: list(captions)}
    return {"key": key, "image": image, **text, "source": source}


def row_captions(row: dict[str, Any]) -> list[Any] | None:
    """The caption list of a multi-caption row, None for a single-caption row (``text``)."""
    captions = row.get(CAPTIONS_FIELD)
    return captions if isinstance(captions, list) else None
