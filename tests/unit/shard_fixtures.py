"""Tiny validated corpora written in a tmp dir (a few PNGs made with PIL), shared by the shard/loader tests."""
from __future__ import annotations

import json
from pathlib import Path

from PIL import Image

from flava.config import PipelineConfig
from tests.helpers import tracking_in

COLOURS = ["red", "green", "blue", "yellow", "purple", "orange", "white", "black"]
SHAPES = ["circle", "square", "triangle", "star"]


def make_validated(root: Path, n_pairs: int = 24, n_images: int = 20, n_text: int = 30, size: int = 40) -> Path:
    """Write ``root/validated/{pairs,images,text}.jsonl`` with images under ``root/images``; return validated/."""
    validated, images = root / "validated", root / "images"
    validated.mkdir(parents=True, exist_ok=True)
    images.mkdir(parents=True, exist_ok=True)

    def image(i: int) -> str:
        path = images / f"img-{i:04d}.png"
        if not path.exists():
            # A unique colour per image, so tests can tell samples apart from pixels too.
            Image.new("RGB", (size, size), (i % 256, (7 * i) % 256, (13 * i) % 256)).save(path)
        return str(path)

    def caption(i: int) -> str:
        return f"a {COLOURS[i % 8]} {SHAPES[i % 4]} left of a {COLOURS[(i + 3) % 8]} {SHAPES[(i + 1) % 4]} number {i}"

    rows = {
        "pairs": [{"key": f"pair-{i:05d}", "image": image(i), "text": caption(i)} for i in range(n_pairs)],
        "images": [{"key": f"img-{i:05d}", "image": image(1000 + i), "label": i % 3} for i in range(n_images)],
        "text": [{"key": f"txt-{i:05d}", "text": caption(i) + " and more words"} for i in range(n_text)],
    }
    for corpus, items in rows.items():
        (validated / f"{corpus}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in items))
    return validated


def config(root: Path, out: str | None = None, **data) -> PipelineConfig:
    tree = {
        "seed": 0,
        "paths": {"validated": str(root / "validated"), "shards": out or str(root / "shards"),
                  "artifacts": str(root / "artifacts")}
        # shards elsewhere (s3://): the local index DVC would track goes under the test's directory
        | ({"shard_index": str(root / "shard-index")} if out and "://" in out else {}),
        "model": {"preset": "tiny"},
        "data": {"shards": {"samples_per_shard": 5}} | data,
        "tracking": tracking_in(root),
    }
    return PipelineConfig.model_validate(tree)
