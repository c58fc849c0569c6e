"""Manifests in row-range partitions: plan them in one streaming pass, read one range, write outputs atomically.

A partition is ``rows`` consecutive manifest rows (blank lines are not rows, as in ``flava.data.jsonl``); its
byte offset and first line number are recorded when planning, so a worker reads its range without reading the
rows before it. Partition outputs are written to a temporary name and renamed, so a killed stage leaves either
a whole file or none.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

_READ_CHUNK = 1 << 20  # bytes per read when hashing and copying files
# A stage's per-partition bookkeeping lives in ``<its output directory>/partitions/<corpus>/``: ``index.json``
# (the corpus' fingerprint and its partitions) and, per partition, ``<n>.json`` written last (its summary).
PARTITIONS_DIR = "partitions"


@dataclass(frozen=True)
class RowRange:
    index: int  # partition number, 0-based
    start: int  # first row (0-based, counting rows, not lines)
    rows: int
    offset: int  # byte offset of the first row's line
    first_line: int  # its line number (1-based), for error messages


@dataclass(frozen=True)
class ManifestPlan:
    sha256: str  # of the manifest's bytes
    rows: int
    partitions: list[RowRange]


def _parse(path: Path, lineno: int, line: bytes) -> dict[str, Any]:
    try:
        row = json.loads(line.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}:{lineno}: invalid JSON ({err})") from err
    if not isinstance(row, dict):
        raise ValueError(f"{path}:{lineno}: each line must be a JSON object")
    return row


def plan_partitions(path: str | Path, rows_per_partition: int) -> ManifestPlan:
    """Hash the manifest and cut it into ranges of ``rows_per_partition`` rows (one empty range when it has no
    rows, so an empty corpus still gets its outputs)."""
    path = Path(path)
    digest = hashlib.sha256()
    ranges: list[RowRange] = []
    rows, offset, start_offset, start_line = 0, 0, 0, 1
    with path.open("rb") as f:
        for lineno, line in enumerate(f, 1):
            digest.update(line)
            if line.strip():
                if rows % rows_per_partition == 0:
                    start_offset, start_line = offset, lineno
                    ranges.append(RowRange(len(ranges), rows, 0, start_offset, start_line))
                rows += 1
                last = ranges[-1]
                ranges[-1] = RowRange(last.index, last.start, last.rows + 1, last.offset, last.first_line)
            offset += len(line)
    return ManifestPlan(digest.hexdigest(), rows, ranges or [RowRange(0, 0, 0, 0, 1)])


def part_name(index: int) -> str:
    """File stem of partition ``index``'s outputs."""
    return f"{index:05d}"


def partition_paths(out: Path, corpus: str, index: int) -> dict[str, Path]:
    """A partition's outputs under ``out``: its accepted rows, its rejects and its summary (written last)."""
    base = out / PARTITIONS_DIR / corpus
    name = part_name(index)
    return {"accepted": base / f"{name}.jsonl", "rejects": base / f"{name}.rejects.jsonl",
            "summary": base / f"{name}.json"}


def part_fingerprint(fingerprint: str, index: int) -> str:
    """A partition's fingerprint: its corpus' (input bytes, params, partitioning) and its number."""
    return hashlib.sha256(f"{fingerprint}:{index}".encode()).hexdigest()


def finished(summary: Path, fingerprint: str) -> dict[str, Any] | None:
    """The summary at ``summary`` when it exists and carries ``fingerprint`` (the partition is done), else None."""
    if not summary.is_file():
        return None
    doc = json.loads(summary.read_text(encoding="utf-8"))
    return doc if doc.get("fingerprint") == fingerprint else None


def iter_rows(path: str | Path) -> Iterator[dict[str, Any]]:
    """Every row of the manifest, one at a time."""
    path = Path(path)
    with path.open("rb") as f:
        for lineno, line in enumerate(f, 1):
            if line.strip():
                yield _parse(path, lineno, line)


def read_range(path: str | Path, part: RowRange) -> list[dict[str, Any]]:
    """The rows of one partition."""
    path = Path(path)
    rows: list[dict[str, Any]] = []
    with path.open("rb") as f:
        f.seek(part.offset)
        lineno = part.first_line
        while len(rows) < part.rows:
            line = f.readline()
            if not line:
                raise ValueError(f"{path}: ended at line {lineno} inside partition {part.index} "
                                 f"(rows {part.start}..{part.start + part.rows - 1}); was it changed meanwhile?")
            if line.strip():
                rows.append(_parse(path, lineno, line))
            lineno += 1
    return rows


def temporary(path: Path) -> Path:
    """Where ``path`` is written before it is renamed into place (same directory: the rename is atomic)."""
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def write_lines_atomic(path: Path, lines: Iterable[str]) -> None:
    tmp = temporary(path)
    with tmp.open("w", encoding="utf-8", newline="\n") as f:
        for line in lines:
            f.write(line + "\n")
    os.replace(tmp, path)


def write_json_atomic(path: Path, doc: Any) -> None:
    write_lines_atomic(path, [json.dumps(doc, sort_keys=True, indent=1, default=str)])


def concatenate_atomic(parts: Iterable[Path], path: Path) -> None:
    """``path`` = the files ``parts`` one after another, streamed."""
    tmp = temporary(path)
    with tmp.open("wb") as out:
        for part in parts:
            with part.open("rb") as f:
                shutil.copyfileobj(f, out, _READ_CHUNK)
    os.replace(tmp, path)
