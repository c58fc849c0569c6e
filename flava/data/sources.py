"""Readers of raw corpora, one per source kind, each yielding accepted rows or rejects with a reason.

- image-text manifests (CSV / JSONL / Parquet), images as paths relative to the manifest or ``s3://`` URIs;
- webdataset tar shards (LAION/PMD style ``jpg`` + ``txt`` [+ ``json``]), images extracted to a directory;
- class folders (ImageNet layout);
- text files (``.txt`` paragraphs, ``.jsonl`` documents) split into passages.

Text is decoded as UTF-8 with ``surrogateescape``: undecodable bytes survive as lone surrogates (JSON escapes
them), so validation can quarantine the row as "not valid UTF-8" instead of ingestion crashing on it.
"""
from __future__ import annotations

import json
import math
import re
import tarfile
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Iterator

import pandas as pd

from flava.data.prep_config import (
    CaptionFilterConfig,
    ClassFolderImages,
    ManifestPairs,
    TextFiles,
    WebdatasetPairs,
)
from flava.data.storage import is_s3

_KEY_UNSAFE = re.compile(r"[^A-Za-z0-9_-]+")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")
_PARAGRAPH_BREAK = re.compile(r"\n\s*\n")
_WORD = re.compile(r"[A-Za-z]+")
_URI_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]+)://")
# Common English function words for the PMD/YFCC "is it English" heuristic.
ENGLISH_STOPWORDS = frozenset(
    "a an the and or but of in on at to for with from by is are was were be been this that these those it its "
    "his her their my our your there here as into over under near some two three one".split()
)


@dataclass
class Item:
    """One unit read from a source: ``row`` when accepted, else ``reason`` (``raw`` keeps what was read)."""

    row: dict[str, Any] | None
    raw: dict[str, Any] = field(default_factory=dict)
    reason: str | None = None


def safe_key(text: str) -> str:
    """Keys hold only ``[A-Za-z0-9_-]`` (webdataset splits a member name at its first dot)."""
    return _KEY_UNSAFE.sub("_", str(text)).strip("_") or "_"


def decode_text(data: bytes) -> str:
    return data.decode("utf-8", errors="surrogateescape")


def source_name(path: str, name: str | None) -> str:
    return name or safe_key(PurePosixPath(path).stem or PurePosixPath(path).name)


def resolve(path: str, base: Path) -> str:
    """An image reference as openable from the working directory: ``s3://`` and absolute paths as they are,
    relative paths joined to ``base`` (the manifest's directory)."""
    if is_s3(path) or Path(path).is_absolute():
        return path
    return str(base / path)


# ------------------------------------------------------------------------------------ caption filter
def passes_caption_filter(text: str | None, flt: CaptionFilterConfig) -> bool:
    """PMD/YFCC: English (mostly a-z letters and some English function words) and more than two words."""
    if not isinstance(text, str):
        return False
    words = text.split()
    if len(words) < flt.min_words:
        return False
    letters = [c for c in text if c.isalpha()]
    if not letters:
        return False
    ascii_letters = sum(1 for c in letters if c.isascii())
    if ascii_letters / len(letters) < flt.min_ascii_letter_fraction:
        return False
    stopwords = sum(1 for w in _WORD.findall(text.lower()) if w in ENGLISH_STOPWORDS)
    return stopwords >= flt.min_stopwords


def filtered_caption(description: Any, title: Any, flt: CaptionFilterConfig) -> str | None:
    """Description if it passes the filter, else the title if it does, else None."""
    for candidate in (description, title):
        if isinstance(candidate, str) and passes_caption_filter(candidate.strip(), flt):
            return " ".join(candidate.split())
    return None


def _is_missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


# ------------------------------------------------------------------------------------ manifests
def _manifest_rows(path: Path, fmt: str) -> Iterator[tuple[dict[str, Any] | None, str | None]]:
    if fmt == "auto":
        suffix = path.suffix.lower().lstrip(".")
        fmt = {"csv": "csv", "tsv": "csv", "jsonl": "jsonl", "json": "jsonl", "parquet": "parquet",
               "pq": "parquet"}.get(suffix, "")
        if not fmt:
            raise ValueError(f"cannot tell the format of manifest {path} from its extension; set format")
    if fmt == "jsonl":
        with path.open("rb") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(decode_text(line))
                except json.JSONDecodeError as err:
                    yield {"line": lineno, "content": decode_text(line)[:200]}, f"invalid JSON on line {lineno}: {err.msg}"
                    continue
                if not isinstance(row, dict):
                    yield {"line": lineno}, f"line {lineno} is not a JSON object"
                    continue
                yield row, None
        return
    if fmt == "csv":
        sep = "\t" if path.suffix.lower() == ".tsv" else ","
        bad: list[list[str]] = []

        def on_bad_line(fields: list[str]) -> None:  # a row with too many fields: a reject, not a crash
            bad.append(fields)
            return None

        frame = pd.read_csv(path, sep=sep, dtype=str, keep_default_na=False, encoding="utf-8",
                            encoding_errors="surrogateescape", engine="python", on_bad_lines=on_bad_line)
        for fields in bad:
            yield {"fields": fields}, f"malformed CSV row: {len(fields)} fields, expected {len(frame.columns)}"
    else:
        frame = pd.read_parquet(path)
    for row in frame.to_dict(orient="records"):
        yield row, None


def read_manifest(src: ManifestPairs, root: Path, flt: CaptionFilterConfig) -> Iterator[Item]:
    path = root / src.path if not Path(src.path).is_absolute() else Path(src.path)
    if not path.is_file():
        raise ValueError(f"pair manifest {path} (data.ingest.pairs path {src.path!r}) does not exist")
    name = source_name(src.path, src.name)
    for index, (row, error) in enumerate(_manifest_rows(path, src.format)):
        if error:
            yield Item(None, row or {}, error)
            continue
        missing = [c for c in (src.image_column, src.key_column, src.caption_column) if c and c not in row]
        if src.caption_filter:
            missing = [c for c in missing if c != src.caption_column]
        if missing:
            yield Item(None, row, f"missing column(s) {missing}")
            continue
        image = row[src.image_column]
        if _is_missing(image) or not str(image).strip():
            yield Item(None, row, "no image reference")
            continue
        scheme = _URI_SCHEME.match(str(image).strip())
        if scheme and scheme.group(1).lower() != "s3":
            yield Item(None, row, f"unsupported image URI scheme: {scheme.group(1)}:// (download the images first, "
                                  "e.g. with img2dataset, or use local paths or s3:// URIs)")
            continue
        if src.caption_filter:
            description = row.get(src.description_column) if src.description_column else None
            title_column = src.title_column or src.caption_column  # no title column: the caption is the title
            caption = filtered_caption(description, row.get(title_column) if title_column else None, flt)
            if caption is None:
                yield Item(None, row, "caption filter: neither description nor title is English with more than "
                                      f"{flt.min_words - 1} words")
                continue
        else:
            value = row[src.caption_column]
            caption = "" if _is_missing(value) else str(value)
        key = safe_key(row[src.key_column]) if src.key_column else f"{name}-{index:08d}"
        yield Item({"key": key, "image": resolve(str(image).strip(), path.parent), "text": caption,
                    "source": name}, row)


# ------------------------------------------------------------------------------------ webdataset shards
def _split_member(name: str) -> tuple[str, str]:
    """webdataset convention: ``dir/key.ext.more`` -> ("dir/key", "ext.more")."""
    directory, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    return (f"{directory}/{stem}" if directory else stem), ext.lower() if dot else ""


def read_webdataset(src: WebdatasetPairs, root: Path, flt: CaptionFilterConfig, extract_to: Path) -> Iterator[Item]:
    path = root / src.path if not Path(src.path).is_absolute() else Path(src.path)
    shards = [path] if path.is_file() else sorted(path.glob(src.pattern)) if path.is_dir() else []
    if not shards:
        raise ValueError(f"no webdataset shards at {path} (pattern {src.pattern!r})")
    name = source_name(src.path, src.name)
    extract_to.mkdir(parents=True, exist_ok=True)
    for shard in shards:
        try:
            tar = tarfile.open(shard, "r:*")
        except (tarfile.TarError, OSError) as err:
            yield Item(None, {"shard": str(shard)}, f"unreadable tar shard: {err}")
            continue
        with tar:
            groups: dict[str, dict[str, tarfile.TarInfo]] = {}
            for member in tar.getmembers():
                if member.isfile():
                    key, ext = _split_member(member.name)
                    groups.setdefault(key, {})[ext] = member
            for wds_key, members in groups.items():
                raw = {"shard": shard.name, "__key__": wds_key, "members": sorted(members)}
                image_ext = next((e for e in src.image_extensions if e in members), None)
                if image_ext is None:
                    yield Item(None, raw, f"no image member (one of {src.image_extensions})")
                    continue
                if src.caption_filter:
                    meta: dict[str, Any] = {}
                    if "json" in members:
                        try:
                            meta = json.loads(decode_text(tar.extractfile(members["json"]).read()))
                        except json.JSONDecodeError as err:
                            yield Item(None, raw, f"invalid json member: {err.msg}")
                            continue
                    title = meta.get(src.title_field)
                    if title is None and src.text_extension in members:
                        title = decode_text(tar.extractfile(members[src.text_extension]).read())
                    caption = filtered_caption(meta.get(src.description_field), title, flt)
                    if caption is None:
                        yield Item(None, raw, "caption filter: neither description nor title is English with more "
                                              f"than {flt.min_words - 1} words")
                        continue
                elif src.text_extension in members:
                    caption = decode_text(tar.extractfile(members[src.text_extension]).read())
                else:
                    yield Item(None, raw, f"no {src.text_extension} member")
                    continue
                key = safe_key(wds_key)
                target = extract_to / f"{key}.{image_ext}"
                target.write_bytes(tar.extractfile(members[image_ext]).read())
                yield Item({"key": key, "image": str(target), "text": caption, "source": name}, raw)


# ------------------------------------------------------------------------------------ class folders
def read_class_folders(src: ClassFolderImages, root: Path) -> Iterator[Item]:
    path = root / src.path if not Path(src.path).is_absolute() else Path(src.path)
    if not path.is_dir():
        raise ValueError(f"image class folders {path} (data.ingest.images path {src.path!r}) do not exist")
    name = source_name(src.path, src.name)
    extensions = {e.lower().lstrip(".") for e in src.extensions}
    for class_dir in sorted(p for p in path.iterdir() if p.is_dir()):
        for file in sorted(p for p in class_dir.rglob("*") if p.is_file()):
            raw = {"path": str(file), "label": class_dir.name}
            if file.suffix.lower().lstrip(".") not in extensions:
                yield Item(None, raw, f"unsupported file extension {file.suffix!r}")
                continue
            stem = file.relative_to(class_dir).with_suffix("").as_posix()
            yield Item({"key": safe_key(f"{class_dir.name}-{stem}"), "image": str(file), "label": class_dir.name,
                        "source": name}, raw)


# ------------------------------------------------------------------------------------ text
def split_passages(text: str, max_words: int) -> list[str]:
    """Greedy sentence packing into passages of at most ``max_words`` words; longer sentences are cut."""
    passages, current = [], []
    for sentence in _SENTENCE_END.split(" ".join(text.split())):
        words = sentence.split()
        while len(words) > max_words:  # a sentence longer than a passage
            if current:
                passages.append(" ".join(current))
                current = []
            passages.append(" ".join(words[:max_words]))
            words = words[max_words:]
        if current and len(current) + len(words) > max_words:
            passages.append(" ".join(current))
            current = []
        current.extend(words)
    if current:
        passages.append(" ".join(current))
    return passages


def read_text_documents(src: TextFiles, root: Path) -> Iterator[tuple[str, Item]]:
    """Yields (document id, Item) where an accepted Item's row holds the document text."""
    path = root / src.path if not Path(src.path).is_absolute() else Path(src.path)
    files = [path] if path.is_file() else sorted({f for p in src.patterns for f in path.glob(p)}) if path.is_dir() else []
    if not files:
        raise ValueError(f"no text files at {path} (data.ingest.text path {src.path!r}, patterns {src.patterns})")
    for file in files:
        stem = safe_key(file.stem)
        if file.suffix.lower() == ".jsonl":
            with file.open("rb") as f:
                for lineno, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    raw = {"file": file.name, "line": lineno}
                    try:
                        doc = json.loads(decode_text(line))
                    except json.JSONDecodeError as err:
                        yield f"{stem}-{lineno}", Item(None, raw, f"invalid JSON on line {lineno}: {err.msg}")
                        continue
                    text = doc.get(src.jsonl_field) if isinstance(doc, dict) else None
                    if not isinstance(text, str):
                        yield f"{stem}-{lineno}", Item(None, raw, f"no string field {src.jsonl_field!r}")
                        continue
                    yield f"{stem}-{lineno}", Item({"text": text}, raw)
        else:
            for n, paragraph in enumerate(p for p in _PARAGRAPH_BREAK.split(decode_text(file.read_bytes()))
                                          if p.strip()):
                yield f"{stem}-{n}", Item({"text": paragraph}, {"file": file.name, "paragraph": n})
