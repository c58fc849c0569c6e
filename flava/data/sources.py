"""Readers of raw corpora, one per source kind, each yielding accepted rows or rejects with a reason.

- image-text tables (CSV / TSV / JSONL, streamed row by row; Parquet files or parts, row group by row group; HF
  ``save_to_disk`` Arrow), images as paths relative to the manifest, ``s3://`` URIs, or embedded bytes
  (img2dataset ``jpg``, HF ``{bytes, path}``);
- COCO captions and Karpathy split JSON: one row per image holding all its captions (``captions`` when
  several, ``text`` when one: ``flava.data.captions``);
- webdataset tar shards (img2dataset/LAION/PMD style ``jpg`` + ``txt`` [+ ``json``]), local or ``s3://``, streamed;
- class folders (ImageNet layout), labels optionally named by a synset -> class-name map;
- text files (``.txt`` paragraphs streamed and merged to a minimum length, ``.jsonl`` documents).

Image members of uncompressed webdataset tars are referenced in place (``<tar>#<offset>+<size>``,
``flava.data.packs``); embedded bytes (parquet/arrow cells, members of compressed tars) are written into one pack
per source, once per distinct content (``ImageStore``).

Text is decoded as UTF-8 with ``surrogateescape``: undecodable bytes survive as lone surrogates (JSON escapes
them), so validation can quarantine the row as "not valid UTF-8" instead of ingestion crashing on it.
"""
from __future__ import annotations

import csv
import fnmatch
import hashlib
import json
import math
import re
import tarfile
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, BinaryIO, Iterable, Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from flava.data.captions import pair_row
from flava.data.packs import PackWriter, make_ref
from flava.data.prep_config import (
    CaptionFilterConfig,
    ClassFolderImages,
    CocoPairs,
    KarpathyPairs,
    ManifestPairs,
    PairSource,
    TextFiles,
    WebdatasetPairs,
)
from flava.data.storage import is_s3, s3_client, split_s3
from flava.data.stream_config import S3Config

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


@dataclass(frozen=True)
class SourceUnit:
    """One piece of a source that one ``flava data prepare`` partition reads on its own (``source_units``)."""

    path: str  # a manifest file, parquet part, Arrow file, webdataset shard (path or s3:// URI), text file, or the
    # source's own path when it is read whole (a class-folder tree, a captions JSON)
    first_row: int = 0  # rows of the source before this unit: keys are numbered by row when there is no key column
    # A row range of a CSV/TSV/JSONL manifest (``manifest_ranges``): ``rows`` records starting at byte ``offset``,
    # on line ``first_line`` (rejects carry line numbers). None: the whole file (a unit that is not a range).
    rows: int | None = None
    offset: int = 0
    first_line: int = 1


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


# ------------------------------------------------------------------------------------ image bytes
_MAGIC = ((b"\xff\xd8\xff", "jpg"), (b"\x89PNG\r\n\x1a\n", "png"), (b"GIF8", "gif"), (b"BM", "bmp"),
          (b"II*\x00", "tif"), (b"MM\x00*", "tif"))


def image_suffix(data: bytes) -> str:
    """File suffix from the bytes' signature (``img`` when unknown: validation decodes whatever it is)."""
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    return next((ext for magic, ext in _MAGIC if data.startswith(magic)), "img")


class ImageStore:
    """Writes embedded image bytes into one pack (``flava.data.packs``) at ``pack``, a path the caller names (one
    store per source file; two processes writing different packs do not meet). Members are named
    ``<sha256>.<suffix>`` and stored once per distinct content: one photo under several captions is one member.
    The pack is created at the first ``put`` (a source without embedded bytes leaves nothing), and renamed into
    place by ``close`` -- or dropped when the ``with`` block it is used in fails."""

    def __init__(self, pack: Path):
        self.pack = pack
        self._writer: PackWriter | None = None

    @property
    def written(self) -> int:
        """Distinct images stored so far."""
        return 0 if self._writer is None else self._writer.members

    def put(self, data: bytes, suffix: str | None = None) -> tuple[str, str]:
        """(reference into the pack, sha256) of the stored copy."""
        digest = hashlib.sha256(data).hexdigest()
        if self._writer is None:
            self._writer = PackWriter(self.pack)
        return self._writer.add(f"{digest}.{suffix or image_suffix(data)}", data), digest

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()

    def __enter__(self) -> ImageStore:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if self._writer is None:
            return
        if exc_type is None:
            self._writer.close()
        else:
            self._writer.abort()


def _printable_raw(row: dict[str, Any]) -> dict[str, Any]:
    """A row as a reject keeps it: embedded bytes are replaced by their size (never dumped as text)."""
    def show(value: Any) -> Any:
        if isinstance(value, (bytes, bytearray, memoryview)):
            return f"<{len(value)} bytes>"
        if isinstance(value, dict):
            return {k: show(v) for k, v in value.items()}
        return value

    return {k: show(v) for k, v in row.items()}


# ------------------------------------------------------------------------------------ manifests
def _detect_format(path: Path) -> str:
    if path.is_dir():
        if (path / "state.json").is_file() or (path / "dataset_dict.json").is_file():
            return "arrow"
        return "parquet"
    suffix = path.suffix.lower().lstrip(".")
    fmt = {"csv": "csv", "tsv": "tsv", "jsonl": "jsonl", "json": "jsonl", "parquet": "parquet", "pq": "parquet",
           "arrow": "arrow"}.get(suffix, "")
    if not fmt:
        raise ValueError(f"cannot tell the format of manifest {path} from its extension; set format "
                         "(csv, tsv, jsonl, parquet, arrow)")
    return fmt


def _arrow_files(path: Path, split: str | None) -> list[Path]:
    """The ``.arrow`` files of a ``datasets`` ``save_to_disk`` directory (a Dataset or a DatasetDict)."""
    if path.is_file():
        return [path]
    if (path / "dataset_dict.json").is_file():
        splits = json.loads((path / "dataset_dict.json").read_text(encoding="utf-8")).get("splits", [])
        if split is not None and split not in splits:
            raise ValueError(f"split {split!r} is not in the saved DatasetDict {path} (splits: {splits})")
        return [f for s in ([split] if split else splits) for f in _arrow_files(path / s, None)]
    state = path / "state.json"
    if not state.is_file():
        raise ValueError(f"{path} is not a `datasets` save_to_disk directory (no state.json or dataset_dict.json)")
    files = [path / f["filename"] for f in json.loads(state.read_text(encoding="utf-8")).get("_data_files", [])]
    missing = [str(f) for f in files if not f.is_file()]
    if missing or not files:
        raise ValueError(f"{state} lists data files that do not exist: {missing or 'none listed'}")
    return files


def _arrow_batches(file: Path) -> Iterator[pa.RecordBatch]:
    # datasets writes the Arrow IPC *stream* format; a plain .arrow file may be the IPC *file* format
    with pa.memory_map(str(file), "r") as source:
        try:
            reader = pa.ipc.open_stream(source)
        except pa.ArrowInvalid:
            source.seek(0)
            reader = pa.ipc.open_file(source)
            for i in range(reader.num_record_batches):
                yield reader.get_batch(i)
            return
        yield from reader


def _table_rows(batches: Iterable[pa.RecordBatch]) -> Iterator[tuple[dict[str, Any] | None, str | None]]:
    for batch in batches:
        for row in batch.to_pylist():
            yield row, None


def _manifest_format(path: Path, src: ManifestPairs) -> str:
    return _detect_format(path) if src.format == "auto" else src.format


def _parquet_parts(path: Path, src: ManifestPairs) -> list[Path]:
    parts = [path] if path.is_file() else sorted(path.glob(src.pattern))
    if not parts:
        raise ValueError(f"no parquet parts matching {src.pattern!r} in {path}")
    return parts


def _manifest_rows(path: Path, src: ManifestPairs,
                   unit: SourceUnit | None = None) -> Iterator[tuple[dict[str, Any] | None, str | None]]:
    """The rows of the manifest at ``path``; of one parquet part, Arrow file or row range only when ``unit`` is one."""
    fmt = _manifest_format(path, src)
    if fmt == "jsonl":
        with path.open("rb") as f:
            lines = enumerate(f, 1)
            if unit is not None and unit.rows is not None:
                f.seek(unit.offset)
                lines = _first_rows(enumerate(f, unit.first_line), unit.rows, path, unit)
            for lineno, line in lines:
                if not line.strip():
                    continue
                try:
                    row = json.loads(decode_text(line))
                except json.JSONDecodeError as err:
                    if lineno == 1 and path.suffix.lower() == ".json":
                        raise ValueError(f"{path} is one JSON document, not JSON Lines: for COCO captions use "
                                         "kind: coco, for Karpathy splits kind: karpathy") from err
                    yield ({"line": lineno, "content": decode_text(line)[:200]},
                           f"invalid JSON on line {lineno}: {err.msg}")
                    continue
                if not isinstance(row, dict):
                    yield {"line": lineno}, f"line {lineno} is not a JSON object"
                    continue
                if lineno == 1 and isinstance(row.get("images"), list):
                    kind = "coco" if "annotations" in row else "karpathy"
                    raise ValueError(f"{path} is a captions JSON ('images' + "
                                     f"{'annotations' if kind == 'coco' else 'sentences'}), not a JSON Lines "
                                     f"manifest: use kind: {kind} with images_dir")
                yield row, None
        return
    if fmt in ("csv", "tsv"):
        yield from _csv_rows(path, src, _csv_separator(path, fmt), unit)
        return
    if fmt == "arrow":
        for file in [Path(unit.path)] if unit else _arrow_files(path, src.split):
            yield from _table_rows(_arrow_batches(file))
        return
    # row group by row group: embedded image bytes never all in memory
    for part in [Path(unit.path)] if unit else _parquet_parts(path, src):
        yield from _table_rows(pq.ParquetFile(part).iter_batches(batch_size=256))


def _csv_separator(path: Path, fmt: str) -> str:
    return "\t" if fmt == "tsv" or path.suffix.lower() == ".tsv" else ","


def _first_rows(lines: Iterator[tuple[int, bytes]], rows: int, path: Path,
                unit: SourceUnit) -> Iterator[tuple[int, bytes]]:
    """(line number, line) of a JSONL range: lines until ``rows`` non-blank ones have been read."""
    left = rows
    for lineno, line in lines:
        if left == 0:
            return
        left -= bool(line.strip())
        yield lineno, line
    if left:
        raise ValueError(_range_cut_short(path, unit))


def _range_cut_short(path: Path, unit: SourceUnit) -> str:
    return (f"{path} ended inside the row range of rows {unit.first_row}..{unit.first_row + (unit.rows or 0) - 1} "
            f"(from line {unit.first_line}); was it changed after prepare planned its partitions?")


_LINE_END = re.compile(rb"[^\r\n]*(?:\r\n|\r|\n)|[^\r\n]+")
_BOM = b"\xef\xbb\xbf"


class _TextLines:
    """The lines of a binary file from its position on, decoded as UTF-8 (``surrogateescape``) and split where text
    mode with ``newline=""`` splits them (``\\n``, ``\\r\\n``, ``\\r``; what ``csv`` needs), counting what it hands out:
    ``csv.reader`` pulls no line ahead of the record it returns, so after each record ``offset`` (bytes) and
    ``lines`` are where the next record starts -- a record boundary even inside quoted newlines. A byte-order mark
    at the start of the file is dropped (as ``utf-8-sig`` does: it is no header)."""

    def __init__(self, f: BinaryIO, offset: int, lines: int = 0):
        self._f, self.offset, self.lines = f, offset, lines
        # one generator, whichever reader iterates: a line split at a bare \r may be half handed out
        self._lines = self._read()

    def __iter__(self) -> Iterator[str]:
        return self._lines

    def _read(self) -> Iterator[str]:
        # a generator, not __next__: the planning pass runs it once per line (a generator resumes faster)
        for chunk in self._f:
            if self.offset == 0 and chunk.startswith(_BOM):
                self.offset, chunk = len(_BOM), chunk[len(_BOM):]
            # a bare \r ends a line in text mode too (a binary file's lines end at \n only)
            for line in (chunk,) if b"\r" not in chunk else _LINE_END.findall(chunk):
                self.offset += len(line)
                self.lines += 1
                yield line.decode("utf-8", "surrogateescape")


def _csv_reader(lines: _TextLines, sep: str) -> Any:
    # quoting off for TSV: CC3M/CC12M captions hold bare quotes
    return csv.reader(lines, delimiter=sep, quoting=csv.QUOTE_NONE if sep == "\t" else csv.QUOTE_MINIMAL)


def _csv_header(f: BinaryIO, sep: str) -> tuple[list[str] | None, _TextLines]:
    """The first non-blank record of a CSV file open at its start (None when it has none), and the lines after it."""
    lines = _TextLines(f, 0)
    return next((fields for fields in _csv_reader(lines, sep) if fields), None), lines


def _csv_rows(path: Path, src: ManifestPairs, sep: str,
              unit: SourceUnit | None = None) -> Iterator[tuple[dict[str, Any] | None, str | None]]:
    """Rows of a CSV/TSV file streamed one at a time (the ``csv`` module over the file's lines: memory is one row,
    not the file); of the row range ``unit`` when it is one (its header read first, from the file's start). Cells
    are strings; a row with fewer fields than columns has the missing cells as None (no value); one with more is a
    reject, yielded in file order; blank lines are skipped."""
    ranged = unit is not None and unit.rows is not None
    with path.open("rb") as f:
        columns = src.column_names
        lines = _TextLines(f, 0)
        if src.header:  # the first line names the columns, unless column_names renames them
            header, lines = _csv_header(f, sep)
            if header is None:
                return
            columns = columns or header
        if ranged:
            f.seek(unit.offset)
            lines = _TextLines(f, unit.offset, unit.first_line - 1)
        left = unit.rows if ranged else -1
        reader = _csv_reader(lines, sep)
        while left:
            fields = next(reader, None)
            if fields is None:
                if ranged:
                    raise ValueError(_range_cut_short(path, unit))
                return
            if not fields:
                continue
            left -= 1
            if len(fields) > len(columns):  # a reject, not a crash
                yield ({"line": lines.lines, "fields": fields},
                       f"malformed CSV row: {len(fields)} fields, expected {len(columns)}")
                continue
            yield dict(zip(columns, fields + [None] * (len(columns) - len(fields)))), None


def manifest_ranges(path: Path, src: ManifestPairs, fmt: str, rows_per_partition: int) -> list[SourceUnit]:
    """A CSV/TSV/JSONL manifest cut into row ranges of ``rows_per_partition`` rows, in one streaming pass that
    parses its records (a quoted CSV field may hold newlines: only the parser knows where a record ends) and keeps
    only where each range starts. One range or none: the whole file as one unit."""
    starts: list[tuple[int, int, int]] = []  # (first row, byte offset, first line) of each range
    rows = 0
    with path.open("rb") as f:
        if fmt == "jsonl":
            offset = 0
            for lineno, line in enumerate(f, 1):
                if line.strip():
                    if rows % rows_per_partition == 0:
                        starts.append((rows, offset, lineno))
                    rows += 1
                offset += len(line)
        else:
            sep = _csv_separator(path, fmt)
            lines = _TextLines(f, 0)
            if src.header:
                header, lines = _csv_header(f, sep)
                if header is None:
                    return [SourceUnit(str(path))]
            boundary = (lines.offset, lines.lines + 1)
            for fields in _csv_reader(lines, sep):
                if fields:
                    if rows % rows_per_partition == 0:
                        starts.append((rows, *boundary))
                    rows += 1
                boundary = (lines.offset, lines.lines + 1)
    if len(starts) <= 1:
        return [SourceUnit(str(path))]
    ends = [first for first, _, _ in starts[1:]] + [rows]
    return [SourceUnit(str(path), first, end - first, offset, line)
            for (first, offset, line), end in zip(starts, ends)]


def _image_ref(value: Any, base: Path, store: ImageStore) -> tuple[str | None, str | None]:
    """(image reference, reject reason) of an image cell: a path or URI, bytes, or an HF ``{bytes, path}``."""
    if isinstance(value, dict):  # Hugging Face Image feature: embedded bytes win, else the path
        data, path = value.get("bytes"), value.get("path")
        if data:
            return store.put(bytes(data))[0], None
        value = path
    if isinstance(value, (bytes, bytearray, memoryview)):
        return (store.put(bytes(value))[0], None) if len(value) else (None, "empty image bytes")
    if _is_missing(value) or not str(value).strip():
        return None, "no image reference"
    ref = str(value).strip()
    scheme = _URI_SCHEME.match(ref)
    if scheme and scheme.group(1).lower() != "s3":
        return None, (f"unsupported image URI scheme: {scheme.group(1)}:// (download the images first, e.g. with "
                      "img2dataset, or use local paths or s3:// URIs)")
    return resolve(ref, base), None


def _source_path(path: str, root: Path) -> Path:
    return Path(path) if Path(path).is_absolute() else root / path


def _manifest_path(src: ManifestPairs, root: Path) -> Path:
    path = _source_path(src.path, root)
    if not path.exists():
        raise ValueError(f"pair manifest {path} (data.ingest.pairs path {src.path!r}) does not exist")
    return path


def _manifest_units(src: ManifestPairs, root: Path, rows_per_partition: int) -> list[SourceUnit]:
    """A CSV/TSV/JSONL file is cut into row ranges of ``rows_per_partition`` rows (``manifest_ranges``); Parquet
    parts and Arrow files are one unit each. Without a key column keys number the rows, so each part carries the
    row count of the parts before it (Parquet: from its footer; Arrow: from its record batches' headers,
    memory-mapped)."""
    path = _manifest_path(src, root)
    fmt = _manifest_format(path, src)
    if fmt not in ("parquet", "arrow"):
        return manifest_ranges(path, src, fmt, rows_per_partition)
    files = _parquet_parts(path, src) if fmt == "parquet" else _arrow_files(path, src.split)
    units, first = [], 0
    for file in files:
        units.append(SourceUnit(str(file), first if src.key_column is None else 0))
        if src.key_column is None:
            first += (pq.ParquetFile(file).metadata.num_rows if fmt == "parquet"
                      else sum(batch.num_rows for batch in _arrow_batches(file)))
    return units


def read_manifest(src: ManifestPairs, root: Path, flt: CaptionFilterConfig, pack: Path,
                  unit: SourceUnit | None = None) -> Iterator[Item]:
    """The pairs of a table source; of one of its ``_manifest_units`` when ``unit`` is given. Embedded image bytes
    go into the pack ``pack`` (``ImageStore``)."""
    path = _manifest_path(src, root)
    with ImageStore(pack) as store:
        yield from _manifest_items(src, path, flt, store, unit)


def _manifest_items(src: ManifestPairs, path: Path, flt: CaptionFilterConfig, store: ImageStore,
                    unit: SourceUnit | None) -> Iterator[Item]:
    name = source_name(src.path, src.name)
    base = path if path.is_dir() else path.parent
    for index, (row, error) in enumerate(_manifest_rows(path, src, unit), unit.first_row if unit else 0):
        if error:
            yield Item(None, row or {}, error)
            continue
        missing = [c for c in (src.image_column, src.key_column, src.caption_column) if c and c not in row]
        if src.caption_filter:
            missing = [c for c in missing if c != src.caption_column]
        if missing:
            yield Item(None, _printable_raw(row), f"missing column(s) {missing} (columns: {sorted(row)})")
            continue
        image, reason = _image_ref(row[src.image_column], base, store)
        if reason:
            if "status" in row and row.get("error_message"):  # img2dataset: why the download failed
                reason += f" (img2dataset status {row['status']}: {row['error_message']})"
            yield Item(None, _printable_raw(row), reason)
            continue
        if src.caption_filter:
            description = row.get(src.description_column) if src.description_column else None
            title_column = src.title_column or src.caption_column  # no title column: the caption is the title
            caption = filtered_caption(description, row.get(title_column) if title_column else None, flt)
            if caption is None:
                yield Item(None, _printable_raw(row), "caption filter: neither description nor title is English "
                                                      f"with more than {flt.min_words - 1} words")
                continue
        else:
            value = row[src.caption_column]
            caption = "" if _is_missing(value) else str(value)
        key = f"{name}-{safe_key(row[src.key_column])}" if src.key_column else f"{name}-{index:08d}"
        yield Item({"key": key, "image": image, "text": caption, "source": name}, _printable_raw(row))


# ------------------------------------------------------------------------------------ captions JSON
def _load_json(path: Path, what: str, needs: tuple[str, ...]) -> dict[str, Any]:
    if not path.is_file():
        raise ValueError(f"{what} {path} does not exist")
    with path.open("rb") as f:
        try:
            doc = json.load(f)
        except json.JSONDecodeError as err:
            raise ValueError(f"{what} {path} is not valid JSON: {err}") from err
    if not isinstance(doc, dict) or any(not isinstance(doc.get(k), list) for k in needs):
        raise ValueError(f"{what} {path} needs the lists {list(needs)} at the top level")
    return doc


def read_coco(src: CocoPairs, root: Path) -> Iterator[Item]:
    """One row per image with all its captions (``flava.data.captions.pair_row``), in the order of ``images``;
    an unusable annotation (no string caption, or an ``image_id`` without a file) is a reject of its own.

    Memory: a captions file is one JSON document and the standard library has no streaming parser, so the whole
    document is loaded: the peak is the document as Python objects, about 5x the file's size (measured on a
    12.6 MB file of 100k annotations: 68 MB; COCO 2017 train's 92 MB file would peak near 0.5 GB). The annotations
    are then grouped by image holding references to their caption strings (no per-caption copies or rows), and
    the document is released before the first row is yielded: from then on memory is the captions' text plus one
    file name per image (18 MB, 1.4x the file, in the same measurement).
    """
    path = _source_path(src.path, root)
    doc = _load_json(path, "COCO captions file", ("images", "annotations"))
    images_dir = _source_path(src.images_dir, root)
    name = source_name(src.path, src.name)
    files = {img.get("id"): img.get("file_name") for img in doc["images"] if isinstance(img, dict)}
    captions: dict[Any, list[str]] = {}
    rejects: list[Item] = []
    for n, ann in enumerate(doc["annotations"]):
        raw = ann if isinstance(ann, dict) else {"annotation": n}
        image_id = raw.get("image_id")
        if not files.get(image_id):
            rejects.append(Item(None, raw, f"annotation {raw.get('id', n)}: image_id {image_id!r} has no file_name "
                                           "in 'images'"))
        elif not isinstance(raw.get("caption"), str):
            rejects.append(Item(None, raw, f"annotation {raw.get('id', n)}: no string 'caption'"))
        else:
            captions.setdefault(image_id, []).append(raw["caption"])
    order = [img.get("id") for img in doc["images"] if isinstance(img, dict) and img.get("id") in captions]
    del doc  # only the grouped captions and the file names stay
    yield from rejects
    for image_id in dict.fromkeys(order):  # an id listed twice in 'images' is one sample
        yield Item(pair_row(safe_key(f"{name}-{image_id}"), str(images_dir / files[image_id]),
                            captions.pop(image_id), name), {"image_id": image_id})


def read_karpathy(src: KarpathyPairs, root: Path) -> Iterator[Item]:
    """One row per image of ``splits`` with all its sentences (``flava.data.captions.pair_row``), referencing the
    image's one file. Images of other splits, without a ``filename`` or without any sentence ``raw`` are rejects,
    one per image. The file is one JSON document, loaded whole (see ``read_coco``)."""
    path = _source_path(src.path, root)
    doc = _load_json(path, "Karpathy split file", ("images",))
    images_dir = _source_path(src.images_dir, root)
    name = source_name(src.path, src.name)
    for n, img in enumerate(doc["images"]):
        img = img if isinstance(img, dict) else {}
        image_id = img.get("imgid", img.get("cocoid", n))
        sentences = img.get("sentences") or []
        raw = {"filename": img.get("filename"), "filepath": img.get("filepath"), "split": img.get("split"),
               "imgid": image_id, "sentences": len(sentences)}
        if img.get("split") not in src.splits:
            yield Item(None, raw, f"split {img.get('split')!r} not in splits {src.splits}")
            continue
        texts = [s["raw"] for s in sentences if isinstance(s, dict) and isinstance(s.get("raw"), str)]
        if not isinstance(img.get("filename"), str) or not texts:
            yield Item(None, raw, "image without 'filename' or without any sentence with a 'raw' text")
            continue
        image = images_dir / (img.get("filepath") or "") / img["filename"]
        yield Item(pair_row(safe_key(f"{name}-{image_id}"), str(image), texts, name), raw)


# ------------------------------------------------------------------------------------ webdataset shards
def _split_member(name: str) -> tuple[str, str]:
    """webdataset convention: ``dir/key.ext.more`` -> ("dir/key", "ext.more")."""
    directory, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    return (f"{directory}/{stem}" if directory else stem), ext.lower() if dot else ""


def _shard_uris(src: WebdatasetPairs, root: Path, s3: S3Config) -> list[str]:
    if is_s3(src.path):
        bucket, prefix = split_s3(src.path)
        if prefix.endswith(".tar"):
            return [src.path]
        prefix = prefix.rstrip("/") + "/" if prefix else ""
        found = []
        for page in s3_client(s3).get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            found += [o["Key"] for o in page.get("Contents", []) if "/" not in o["Key"][len(prefix):]
                      and fnmatch.fnmatch(o["Key"][len(prefix):], src.pattern)]
        return [f"s3://{bucket}/{k}" for k in sorted(found)]
    path = _source_path(src.path, root)
    return [str(path)] if path.is_file() else [str(p) for p in sorted(path.glob(src.pattern))] if path.is_dir() else []


def _open_shard(uri: str, s3: S3Config) -> BinaryIO:
    if is_s3(uri):
        bucket, key = split_s3(uri)
        return s3_client(s3).get_object(Bucket=bucket, Key=key)["Body"]  # streamed, never whole in memory
    return open(uri, "rb")


def _samples(tar: tarfile.TarFile) -> Iterator[tuple[str, dict[str, bytes], dict[str, tuple[int, int]]]]:
    """Samples of a tar read as a stream: consecutive members sharing a key (the webdataset convention), with
    each member's (data offset, size) in the tar."""
    key, members, where = None, {}, {}
    for member in tar:
        if not member.isfile():
            continue
        k, ext = _split_member(member.name)
        if k != key and members:
            yield key, members, where
            members, where = {}, {}
        key = k
        members[ext] = tar.extractfile(member).read()
        where[ext] = (member.offset_data, member.size)
    if members:
        yield key, members, where


def _webdataset_units(src: WebdatasetPairs, root: Path, s3: S3Config) -> list[SourceUnit]:
    shards = _shard_uris(src, root, s3)
    if not shards:
        raise ValueError(f"no webdataset shards at {src.path} (pattern {src.pattern!r})")
    return [SourceUnit(shard) for shard in shards]


def read_webdataset(src: WebdatasetPairs, root: Path, flt: CaptionFilterConfig, pack: Path,
                    s3: S3Config | None = None, unit: SourceUnit | None = None) -> Iterator[Item]:
    """The pairs of a source's shards; of the one shard ``unit`` when given. An image member of an uncompressed
    shard (local or ``s3://``) is referenced in place, ``<shard>#<offset>+<size>`` (``flava.data.packs``): nothing
    is copied. A compressed shard's offsets are those of the decompressed stream, which no ranged read reaches: its
    images go into the pack ``pack``."""
    s3 = s3 or S3Config()
    shards = [unit.path] if unit else [u.path for u in _webdataset_units(src, root, s3)]
    name = source_name(src.path.rstrip("/"), src.name)
    with ImageStore(pack) as store:
        for shard in shards:
            shard_name = PurePosixPath(shard).name
            try:
                with _open_shard(shard, s3) as stream, tarfile.open(fileobj=stream, mode="r|*") as tar:
                    in_place = getattr(tar.fileobj, "comptype", None) == "tar"  # r|* detected no compression
                    for wds_key, members, where in _samples(tar):
                        yield _webdataset_item(src, flt, store, name, shard_name, wds_key, members,
                                               (shard, where) if in_place else None)
            except (tarfile.TarError, OSError) as err:
                yield Item(None, {"shard": shard}, f"unreadable tar shard: {err}")


def _webdataset_item(src: WebdatasetPairs, flt: CaptionFilterConfig, store: ImageStore, name: str, shard: str,
                     wds_key: str, members: dict[str, bytes],
                     in_place: tuple[str, dict[str, tuple[int, int]]] | None) -> Item:
    """One sample as a row; ``in_place``: (shard URI, member -> (data offset, size)) when the shard is read by
    ranges, else the image is stored in ``store``."""
    raw = {"shard": shard, "__key__": wds_key, "members": sorted(members)}
    image_ext = next((e for e in src.image_extensions if e in members), None)
    if image_ext is None:
        return Item(None, raw, f"no image member (one of {src.image_extensions})")
    meta: dict[str, Any] = {}
    if "json" in members:
        try:
            meta = json.loads(decode_text(members["json"]))
        except json.JSONDecodeError as err:
            return Item(None, raw, f"invalid json member: {err.msg}")
        meta = meta if isinstance(meta, dict) else {}
    if src.caption_filter:
        title = meta.get(src.title_field)
        if title is None and src.text_extension in members:
            title = decode_text(members[src.text_extension])
        caption = filtered_caption(meta.get(src.description_field), title, flt)
        if caption is None:
            return Item(None, raw, "caption filter: neither description nor title is English with more than "
                                   f"{flt.min_words - 1} words")
    elif src.text_extension in members:
        caption = decode_text(members[src.text_extension])
    else:
        return Item(None, raw, f"no {src.text_extension} member")
    if in_place is not None:
        uri, where = in_place
        image = make_ref(uri, *where[image_ext])
    else:
        image, _ = store.put(members[image_ext], image_ext)
    provenance = {f: meta[f] for f in src.provenance_fields if f in meta}
    return Item({"key": f"{name}-{safe_key(wds_key)}", "image": image, "text": caption, "source": name,
                 **provenance}, raw)


# ------------------------------------------------------------------------------------ class folders
def load_class_names(path: Path) -> dict[str, str]:
    """synset -> class name from ``LOC_synset_mapping.txt`` (``<synset> <name>`` lines), a JSON object
    ``{synset: name}`` or ``imagenet_class_index.json`` (``{index: [synset, name]}``)."""
    if not path.is_file():
        raise ValueError(f"class-name map {path} (data.ingest.images class_names) does not exist")
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() == ".json":
        doc = json.loads(text)
        if isinstance(doc, dict) and all(isinstance(v, list) and len(v) == 2 for v in doc.values()):
            return {str(v[0]): str(v[1]) for v in doc.values()}
        if isinstance(doc, dict) and all(isinstance(v, str) for v in doc.values()):
            return dict(doc)
        raise ValueError(f"class-name map {path}: expected {{synset: name}} or {{index: [synset, name]}}")
    names = {}
    for lineno, line in enumerate(text.splitlines(), 1):
        if line.strip():
            synset, _, label = line.strip().partition(" ")
            if not label.strip():
                raise ValueError(f"class-name map {path}:{lineno}: expected '<synset> <class name>'")
            names[synset] = label.strip()
    return names


def read_class_folders(src: ClassFolderImages, root: Path) -> Iterator[Item]:
    path = _source_path(src.path, root)
    if not path.is_dir():
        raise ValueError(f"image class folders {path} (data.ingest.images path {src.path!r}) do not exist")
    names = load_class_names(_source_path(src.class_names, root)) if src.class_names else None
    name = source_name(src.path, src.name)
    extensions = {e.lower().lstrip(".") for e in src.extensions}
    for class_dir in sorted(p for p in path.iterdir() if p.is_dir()):
        for file in sorted(p for p in class_dir.rglob("*") if p.is_file()):
            raw = {"path": str(file), "label": class_dir.name}
            if file.suffix.lower().lstrip(".") not in extensions:
                yield Item(None, raw, f"unsupported file extension {file.suffix!r}")
                continue
            if names is not None and class_dir.name not in names:
                yield Item(None, raw, f"class folder {class_dir.name!r} is not in the class-name map {src.class_names}")
                continue
            stem = file.relative_to(class_dir).with_suffix("").as_posix()
            row = {"key": safe_key(f"{name}-{class_dir.name}-{stem}"), "image": str(file),
                   "label": names[class_dir.name] if names is not None else class_dir.name, "source": name}
            if names is not None:
                row["synset"] = class_dir.name
            yield Item(row, raw)


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


_MAX_DOCUMENT_CHARS = 1_000_000  # a .txt without blank lines is cut into documents of about this size


def _txt_documents(file: Path, min_words: int) -> Iterator[tuple[str, int, int]]:
    """(text, first line, last line) of the documents of a ``.txt`` file, read line by line: paragraphs (blank-line
    separated) are merged until a document has ``min_words`` words, so headings and one-line paragraphs join
    their neighbours instead of becoming passages too short to keep."""
    lines: list[str] = []
    words = chars = start = end = 0
    with file.open("rb") as f:
        for lineno, raw_line in enumerate(f, 1):
            line = decode_text(raw_line).strip()
            if line:
                if not lines:
                    start = lineno
                lines.append(line)
                end = lineno
                words += len(line.split())
                chars += len(line) + 1
                if chars < _MAX_DOCUMENT_CHARS:
                    continue
            elif not lines or words < min_words:  # paragraph end: keep merging while the document is short
                continue
            yield " ".join(lines), start, end
            lines, words, chars = [], 0, 0
    if lines:
        yield " ".join(lines), start, end


def _text_units(src: TextFiles, root: Path) -> list[SourceUnit]:
    path = _source_path(src.path, root)
    files = ([path] if path.is_file() else sorted({f for p in src.patterns for f in path.glob(p)}) if path.is_dir()
             else [])
    if not files:
        raise ValueError(f"no text files at {path} (data.ingest.text path {src.path!r}, patterns {src.patterns})")
    return [SourceUnit(str(file)) for file in files]


def read_text_documents(src: TextFiles, root: Path, unit: SourceUnit | None = None) -> Iterator[tuple[str, Item]]:
    """Yields (document id, Item) where an accepted Item's row holds the document text; of the one file ``unit``
    when given."""
    for file in [Path(u.path) for u in ([unit] if unit else _text_units(src, root))]:
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
            for n, (text, first, last) in enumerate(_txt_documents(file, src.min_document_words)):
                yield f"{stem}-{n}", Item({"text": text}, {"file": file.name, "lines": [first, last]})


# ------------------------------------------------------------------------------------ units
def source_units(src: PairSource | ClassFolderImages | TextFiles, root: Path, s3: S3Config,
                 rows_per_partition: int) -> list[SourceUnit]:
    """The pieces of a source that ``flava data prepare`` reads as separate partitions, in reading order: a
    CSV/TSV/JSONL manifest's row ranges of ``rows_per_partition`` rows, a table's Parquet parts or Arrow files, a
    webdataset source's shards, a text source's files; a captions JSON and a class-folder tree are one unit each,
    however large (a captions JSON is one document)."""
    if isinstance(src, ManifestPairs):
        return _manifest_units(src, root, rows_per_partition)
    if isinstance(src, WebdatasetPairs):
        return _webdataset_units(src, root, s3)
    if isinstance(src, TextFiles):
        return _text_units(src, root)
    return [SourceUnit(str(_source_path(src.path, root)))]
