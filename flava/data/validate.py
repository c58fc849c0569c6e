"""`flava data validate`: Great Expectations suites per corpus; bad rows quarantined with their reason.

For each corpus manifest in ``paths.prepared`` every row gets one column per check (keys, caption/text
encoding and bounds, image decodability, mode and size, computed by decoding each image safely, local file or
``s3://`` object alike). The corpus's GE suite (``flava.data.expectations``) runs over those columns; a row that
fails an expectation is rejected with the first failing expectation's reason. Accepted images are normalised
(EXIF rotation, 8-bit RGB). An image already fit for the shards (an RGB JPEG or PNG with no EXIF turn, under
``passthrough``) is not copied: its accepted row's ``image`` stays the reference prepare wrote (a local path, an
``s3://`` URI or a ``<tar>#<offset>+<size>`` range), and the shard stage reads it from there. Only converted
images (a mode change, an EXIF rotation, a re-encode with ``passthrough`` off) are written, into one *pack* per
partition, ``paths.validated/images/<corpus>/<n>.tar`` (``flava.data.packs``: an uncompressed tar; a partition
with no converted image writes none), never one file per image: once per image reference and once per distinct
content (rows sharing an image share the member, named after the first row that decodes it); images of rejected
rows never land in it. A converted row's ``image`` is a reference into its partition's pack
(``<pack>#<offset>+<size>``). Every accepted row with an image keeps ``source_image`` (the reference prepare
wrote), ``image_sha256`` and ``image_bytes`` (of the bytes ``image`` names, as validated: the shard stage refuses
other bytes under that reference). The packs, and so the converted rows' ``image`` references, depend on the
partitioning; the bytes they name do not.

The manifest is validated in partitions of ``data.engine.partition_rows`` rows, on the engine of
``data.engine`` (``flava.data.engine``): memory is bounded by the partition (one streaming pass before them
finds the keys and images that recur across partitions, so duplicates and shared images come out as in one
pass; a converted image shared by rows of several partitions is in each of their packs). Each partition writes
its pack (if any), ``partitions/<corpus>/<n>.jsonl``, ``<n>.rejects.jsonl`` and, last, ``<n>.json`` (counts,
reasons, per-expectation results, its GE result, the fingerprint of manifest + params + range);
``partitions/<corpus>/index.json`` lists them. A killed run resumes at the partitions without a matching
``<n>.json``; new manifest bytes or params start the corpus afresh.

A pair with several captions (``captions``, ``flava.data.captions``) has each caption checked on its own (GE suite
``pairs_captions``): a failing caption is dropped from the row and written to the rejects file as
``{key, caption_index, caption, reason, failed_expectations}``; a row left with no caption is rejected ("no valid
caption"). Then ``metrics["pairs"]["captions"]`` counts captions too (``in == accepted + rejected``).

Outputs in ``paths.validated``: ``{corpus}.jsonl``, ``{corpus}.rejects.jsonl`` (row + ``reason`` +
``failed_expectations``; the partitions' files concatenated in order, so they do not depend on the partitioning
or the engine), ``report.md``, ``metrics.json``, ``ge/{corpus}.json`` (the GE validation result; aggregated over
the partitions when there are several), ``partitions/``. Per corpus and per partition ``in == accepted +
rejected``. The stage fails with a ``ValueError`` (after writing its outputs) when a corpus's accepted fraction
is below ``data.validation.min_accept_fraction``.
"""
from __future__ import annotations

import copy
import functools
import hashlib
import io
import json
import logging
import shutil
import stat
import time
from array import array
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Iterator

import numpy as np
import pandas as pd

from flava.data import images as imaging
from flava.data.captions import CAPTIONS_FIELD, TEXT_FIELD, row_captions
from flava.data.engine import Engine, EngineConfig, open_engine
from flava.data.expectations import (
    SuiteRunner,
    accepted_checks,
    caption_checks,
    corpus_checks,
)
from flava.data.ingest import CORPORA, dump_row
from flava.data.packs import (
    IMAGE_BYTES_FIELD,
    IMAGE_SHA256_FIELD,
    SOURCE_IMAGE_FIELD,
    PackWriter,
    parse_ref,
    read_ref,
)
from flava.data.partitions import (
    PARTITIONS_DIR,
    ManifestPlan,
    RowRange,
    concatenate_atomic,
    finished,
    iter_rows,
    part_fingerprint,
    part_name,
    partition_paths,
    plan_partitions,
    read_range,
    temporary,
    write_json_atomic,
    write_lines_atomic,
)
from flava.data.prep_config import ValidateConfig
from flava.data.sources import safe_key
from flava.data.storage import is_s3, split_s3
from flava.data.stream_config import S3Config
from flava.tracking.runs import StageLog, stage_run

log = logging.getLogger(__name__)

IMAGE_CORPORA = ("pairs", "images")
# formats kept byte for byte under data.validation.passthrough (PIL's format name -> file suffix)
PASSTHROUGH_FORMATS = {"JPEG": "jpg", "PNG": "png"}


# ---------------------------------------------------------------------------------------------- fetching
class Fetcher:
    """Bytes of an image reference (``flava.data.packs``: a local path, an ``s3://`` URI, or a range of a local or
    S3 tar), or ``(None, reason)``. A bucket whose endpoint cannot be reached is remembered, so a dead endpoint
    costs one timeout, not one per row."""

    def __init__(self, s3: S3Config, max_bytes: int):
        self.s3, self.max_bytes = s3, max_bytes
        self._dead_buckets: dict[str, str] = {}

    def __call__(self, ref: str) -> tuple[bytes | None, str | None]:
        ranged = parse_ref(ref)
        uri = ranged.uri if ranged else ref
        if ranged is not None and ranged.size > self.max_bytes:  # the size is in the reference: do not read it
            return None, f"file too large: {ranged.size} bytes > {self.max_bytes}"
        if not is_s3(uri):
            # one stat per reference: here for a whole file (its size decides whether it is read), in read_ref
            # for a range (whose size is in the reference)
            try:
                if ranged is None:
                    info = Path(uri).stat()
                    if not stat.S_ISREG(info.st_mode):
                        return None, f"missing file: {uri[:200]}"
                    if info.st_size > self.max_bytes:  # do not read it into memory
                        return None, f"file too large: {info.st_size} bytes > {self.max_bytes}"
                    return Path(uri).read_bytes(), None
                return read_ref(ref), None
            except (FileNotFoundError, NotADirectoryError):
                return None, f"missing file: {uri[:200]}"
            except OSError as err:  # e.g. a name too long: not a path at all
                return None, f"missing file: not a usable path ({err.strerror}): {uri[:200]!r}"
            except ValueError as err:  # a range past the end of its tar
                return None, f"missing file: {err}"
        bucket, _ = split_s3(uri)
        if bucket in self._dead_buckets:
            return None, self._dead_buckets[bucket]
        try:
            return read_ref(ref, self.s3), None
        except FileNotFoundError as err:
            return None, f"s3 object not found: {err}"
        except ValueError as err:  # a range past the end of its object
            return None, f"s3 object not found: {err}"
        except Exception as err:  # noqa: BLE001 - botocore: credentials, endpoint, access denied, throttling...
            from botocore.exceptions import (
                ClientError,  # botocore is optional (S3 only); only S3 refs get here
            )

            reason = f"s3 object unreachable: {ref}: {type(err).__name__}: {err}"
            if not isinstance(err, ClientError):  # connection-level failure: the whole bucket is unreachable
                self._dead_buckets[bucket] = reason
            return None, reason


# ---------------------------------------------------------------------------------------------- per-row checks
def _valid_utf8(text: str) -> bool:
    try:
        text.encode("utf-8")  # lone surrogates (undecodable input bytes kept by ingestion) fail here
        return True
    except UnicodeEncodeError:
        return False


def _printable(text: str) -> str:
    """The check frame is Arrow-backed and cannot hold lone surrogates: show them as escapes there."""
    return text if _valid_utf8(text) else text.encode("utf-8", "backslashreplace").decode("utf-8")


def _truncate(text: str, max_words: int, max_chars: int) -> str:
    words = text.split()
    if len(words) > max_words:
        text = " ".join(words[:max_words])
    return text[:max_chars].rstrip() if len(text) > max_chars else text


def row_key(row: dict[str, Any]) -> str | None:
    """The row's key as the checks see it (None when absent or empty)."""
    key = row.get("key")
    return None if key is None or str(key) == "" else str(key)


def image_name(key: str, suffix: str) -> str:
    """File name of a normalised image: readable part of the key + a hash, so distinct keys never collide."""
    return f"{safe_key(key)[:80]}-{hashlib.sha1(key.encode('utf-8', 'surrogateescape')).hexdigest()[:10]}.{suffix}"


class _CorpusChecker:
    """Check columns of one partition's rows. Rows are numbered corpus-wide (``start`` is the partition's first
    row); ``prior_keys`` and ``prior_images`` carry what earlier partitions saw: the first row of each key that
    recurs here, and the key naming each shared image that an earlier row decoded first. An image kept as it is
    (``passthrough``) is not copied: only its reference, SHA-256 and size are kept. Converted images are appended
    to a scratch file beside ``pack`` as they decode (memory holds one image at a time); ``settle_images`` copies
    those an accepted row points to into the pack ``pack`` and drops the scratch file."""

    def __init__(self, corpus: str, v: ValidateConfig, fetch: Fetcher, pack: Path, *, start: int = 0,
                 prior_keys: dict[str, int] | None = None, prior_images: dict[str, str] | None = None):
        self.corpus, self.v, self.fetch, self.pack = corpus, v, fetch, pack
        self.start = start
        self.prior_keys = prior_keys or {}
        self.prior_images = prior_images or {}
        self.conversions: Counter[str] = Counter()
        self.exif_rotated = 0
        self.truncated = 0
        # image reference -> its check columns and normalised file: an image shared by several rows (COCO's five
        # captions per image) is fetched, decoded and written once per partition
        self._seen_images: dict[str, tuple[dict[str, Any], str | None]] = {}
        self._scratch_path = temporary(pack.with_suffix(".scratch"))
        self._scratch: BinaryIO | None = None  # opened at the first decoded image
        self._pending: dict[str, tuple[int, int, str]] = {}  # member name -> (offset, size, sha256) in the scratch
        self._kept: dict[str, tuple[str, int, str]] = {}  # name of an image kept as it is -> (its ref, size, sha256)
        # row index -> caption check columns of a multi-caption row (set by check_captions)
        self.caption_columns: dict[int, dict[str, Any]] = {}

    def text_columns(self, row: dict[str, Any]) -> dict[str, Any]:
        text = row.get(TEXT_FIELD)
        cols, cut = self._text(text)
        if cut != ("" if text is None else str(text)):  # truncated
            row[TEXT_FIELD] = cut
        return cols

    def _text(self, text: Any) -> tuple[dict[str, Any], str]:
        """Check columns of one text, and the text as kept (captions over the bounds truncated when configured)."""
        text = "" if text is None else str(text)
        if self.corpus == "pairs" and self.v.truncate_captions and _valid_utf8(text):
            cut = _truncate(text, self.v.max_caption_words, self.v.max_caption_chars)
            if cut != text:
                self.truncated += 1
                text = cut
        return {"text_valid_utf8": _valid_utf8(text), "text_stripped": _printable(text.strip()),
                "text_chars": len(text), "text_words": len(text.split())}, text

    def check_captions(self, rows: list[dict[str, Any]], runner: SuiteRunner) -> tuple[dict[int, list[dict]], Any]:
        """Every caption of the multi-caption rows (``captions``) through the caption checks, as one GE suite
        (``{corpus}_captions``, one row per caption). A failing caption is dropped from its row; returned, per row
        index, as ``{key, caption_index, caption, reason, failed_expectations}``, with the GE result (None when
        no row has several captions). The row's own caption columns become those of its first kept caption, or,
        when none is kept, of its first caption, so the row fails the suite with that caption's reason."""
        records, where = [], []
        for i, row in enumerate(rows):
            for j, caption in enumerate(row_captions(row) or []):
                cols, text = self._text(caption)
                records.append(cols)
                where.append((i, j, text))
        if not records:
            return {}, None
        checks = caption_checks(self.v)
        frame = pd.DataFrame.from_records(records)
        result = runner.run(f"{self.corpus}_captions", checks, frame)
        reasons, failed, _ = _row_reasons(result, checks, frame)
        dropped: dict[int, list[dict]] = {}
        kept: dict[int, list[str]] = {}
        for n, (i, j, text) in enumerate(where):
            if n in reasons:
                dropped.setdefault(i, []).append({"key": rows[i].get("key"), "caption_index": j, "caption": text,
                                                  "reason": reasons[n], "failed_expectations": failed[n]})
            else:
                if i not in kept:
                    self.caption_columns[i] = records[n]
                kept.setdefault(i, []).append(text)
            self.caption_columns.setdefault(i, records[n])  # no caption kept: the first one's columns
        for i, row in enumerate(rows):
            if row_captions(row) is not None:
                row[CAPTIONS_FIELD] = kept.get(i, [])
        return dropped, result

    def image_columns(self, row: dict[str, Any], decode: bool) -> tuple[dict[str, Any], str | None]:
        """Check columns of the row's image; when it decodes, its name (``settle_images`` gives the row's image
        fields from it) is returned too."""
        empty = {"image_error": None, "image_mode": None, "image_width": np.nan, "image_height": np.nan,
                 "image_min_side": np.nan, "image_max_side": np.nan, "image_aspect": np.nan}
        ref = row.get("image")
        if not decode:  # a duplicate or key-less row: rejected for that; its image is not fetched
            return empty, None
        if not isinstance(ref, str) or not ref:
            return {**empty, "image_error": "missing file: row has no image reference"}, None
        if ref not in self._seen_images:
            owner = self.prior_images.get(ref)  # decoded first (and counted) by an earlier partition
            self._seen_images[ref] = self._check_image(ref, owner or str(row["key"]), empty, count=owner is None)
        return self._seen_images[ref]

    def _check_image(self, ref: str, key: str, empty: dict[str, Any], *,
                     count: bool) -> tuple[dict[str, Any], str | None]:
        data, error = self.fetch(ref)
        if error:
            return {**empty, "image_error": error}, None
        v = self.v
        info = imaging.inspect_image(data, max_bytes=v.max_image_bytes, max_pixels=v.max_image_pixels,
                                     min_side=v.min_image_side, max_side=v.max_image_side)
        cols = {**empty, "image_error": info.error, "image_mode": info.mode}
        if info.width is not None:
            w, h = info.width, info.height
            cols.update(image_width=float(w), image_height=float(h), image_min_side=float(min(w, h)),
                        image_max_side=float(max(w, h)), image_aspect=max(w, h) / max(1, min(w, h)))
        if info.image is None or info.error or info.mode not in v.allowed_modes:
            return cols, None
        rgb, turned = imaging.to_rgb(info.image, tuple(v.alpha_background))
        if count:
            if info.mode != "RGB":
                self.conversions[f"{info.mode}->RGB"] += 1
            self.exif_rotated += int(turned)
        keep = v.passthrough and info.format in PASSTHROUGH_FORMATS and info.mode == "RGB" and not turned
        name = image_name(key, PASSTHROUGH_FORMATS[info.format] if keep else v.image_format)
        if keep:  # already what the shards need: the source bytes, read from the source, never copied
            self._kept[name] = (ref, len(data), hashlib.sha256(data).hexdigest())
            return cols, name
        buffer = io.BytesIO()
        if v.image_format == "png":
            rgb.save(buffer, format="PNG")
        else:
            rgb.save(buffer, format="JPEG", quality=v.jpeg_quality)
        out = buffer.getvalue()
        if self._scratch is None:
            self._scratch = self._scratch_path.open("w+b")
        self._pending[name] = (self._scratch.tell(), len(out), hashlib.sha256(out).hexdigest())
        self._scratch.write(out)
        return cols, name

    def settle_images(self, accepted: set[str]) -> dict[str, dict[str, Any]]:
        """The image fields of the accepted rows, by image name: ``image`` (the source reference of an image kept
        as it is; for a converted one, its member of the pack), ``image_sha256`` and ``image_bytes``. Writes the
        pack: the converted images accepted rows point to, in the order they decoded, each once; the others
        (decoded, but every row using them was rejected for another reason, e.g. its caption) never land in it. A
        partition with no accepted converted image writes no pack. The scratch file is removed."""
        fields = {name: {"image": ref, IMAGE_SHA256_FIELD: digest, IMAGE_BYTES_FIELD: size}
                  for name, (ref, size, digest) in self._kept.items() if name in accepted}
        converted = [name for name in self._pending if name in accepted]
        try:
            if converted:
                with PackWriter(self.pack) as pack:
                    for name in converted:
                        offset, size, digest = self._pending[name]
                        self._scratch.seek(offset)
                        fields[name] = {"image": pack.add(name, self._scratch.read(size)),
                                        IMAGE_SHA256_FIELD: digest, IMAGE_BYTES_FIELD: size}
        finally:
            if self._scratch is not None:
                self._scratch.close()
                self._scratch = None
            self._scratch_path.unlink(missing_ok=True)
            self._pending.clear()
            self._kept.clear()
        return fields

    def frame(self, rows: list[dict[str, Any]]) -> tuple[pd.DataFrame, list[str | None]]:
        seen: dict[str, int] = {}
        records, written = [], []
        for i, row in enumerate(rows):
            key = row_key(row)
            duplicate_of = None if key is None else self.prior_keys.get(key, seen.get(key))
            if key is not None and duplicate_of is None:
                seen[key] = self.start + i
            record: dict[str, Any] = {
                "key": None if key is None else _printable(key),
                "duplicate_of": np.nan if duplicate_of is None else float(duplicate_of),
            }
            if self.corpus in ("pairs", "text"):
                record.update(self.caption_columns.get(i) or self.text_columns(row))
            path = None
            if self.corpus in IMAGE_CORPORA:
                cols, path = self.image_columns(row, decode=key is not None and duplicate_of is None)
                record.update(cols)
            if self.corpus == "images":
                label = row.get("label")
                record["label"] = "" if label is None else str(label)
            records.append(record)
            written.append(path)
        columns = [c.column for c in corpus_checks(self.corpus, self.v)] + ["text_chars", "image_width", "image_height"]
        frame = pd.DataFrame.from_records(records)
        for column in columns:  # an empty corpus still needs the columns the suite names
            if column not in frame:
                frame[column] = pd.Series(dtype=object)
        return frame, written


# ---------------------------------------------------------------------------------------------- the stage
# Bump when the partition outputs change meaning, so a resumed run never reuses partitions of another format.
# 2: accepted images in one pack per partition, not one file per image; 3: images kept as they are not copied
# (``image`` is the source reference, with its SHA-256 and size)
PARTITION_FORMAT = 3
# PARTITIONS_DIR, under paths.validated: <corpus>/<partition>.{jsonl,rejects.jsonl,json}, index.json


def _row_reasons(result, checks, frame: pd.DataFrame) -> tuple[dict[int, str], dict[int, list[str]], list[dict]]:
    """Map GE's unexpected indices back to rows: first failing check (priority order) gives the reason."""
    by_id = {(r.expectation_config.type, r.expectation_config.kwargs.get("column")): r for r in result.results}
    reasons: dict[int, str] = {}
    failed: dict[int, list[str]] = {}
    summary = []
    for check in checks:
        res = by_id[(check.name, check.column)]
        if res.exception_info and res.exception_info.get("raised_exception"):
            raise RuntimeError(f"expectation {check.name} on {check.column} raised: "
                               f"{res.exception_info.get('exception_message')}")
        indices = [int(i) for i in res.result.get("unexpected_index_list") or []]
        summary.append({"expectation": check.name, "column": check.column, "success": bool(res.success),
                        "unexpected": len(indices)})
        for i in indices:
            failed.setdefault(i, []).append(f"{check.name}({check.column})")
            if i not in reasons:
                reasons[i] = check.reason(frame.iloc[i].to_dict())
    return reasons, failed, summary


@dataclass(frozen=True)
class PartitionTask:
    """One partition's work: everything ``validate_partition`` needs, picklable for a Dask worker."""

    corpus: str
    manifest: str
    out: str  # paths.validated
    part: RowRange
    fingerprint: str  # of the manifest, the params and this range: the partition is done when its summary has it
    v: ValidateConfig
    s3: S3Config
    prior_keys: dict[str, int]  # key -> its first row, for keys recurring here whose first row is earlier
    prior_images: dict[str, str]  # image ref -> key of the earlier row that decoded it first


def _pack_path(out: Path, corpus: str, index: int) -> Path:
    """The pack of partition ``index``'s accepted converted images (``flava.data.packs``)."""
    return out / "images" / corpus / f"{part_name(index)}.tar"


@functools.cache
def _suite_runner() -> SuiteRunner:
    """One GE context per process (a Dask worker validates many partitions; a context takes seconds to set up)."""
    return SuiteRunner()


def validate_partition(task: PartitionTask) -> dict[str, Any]:
    """Validate one row range: write its accepted rows, its rejects and its images, then its summary (counts,
    reasons, per-expectation results, examples, the GE result) last -- the summary marks the partition done."""
    corpus, v, out, part = task.corpus, task.v, Path(task.out), task.part
    rows = read_range(task.manifest, part)
    checker = _CorpusChecker(corpus, v, Fetcher(task.s3, v.max_image_bytes), _pack_path(out, corpus, part.index),
                             start=part.start, prior_keys=task.prior_keys, prior_images=task.prior_images)
    runner = _suite_runner()
    dropped, caption_result = checker.check_captions(rows, runner) if corpus == "pairs" else ({}, None)
    frame, written = checker.frame(rows)
    checks = corpus_checks(corpus, v)
    result = runner.run(corpus, checks, frame)
    reasons, failed, summary = _row_reasons(result, checks, frame)
    _name_captionless(rows, reasons, failed, dropped, v)
    accepted_idx = [i for i in range(len(rows)) if i not in reasons]

    # Post-condition: the accepted set passes every expectation, keys unique (guards the reason mapping above).
    accepted_frame = frame.iloc[accepted_idx].reset_index(drop=True)
    final = runner.run(f"{corpus}_accepted", accepted_checks(corpus, v), accepted_frame)
    if len(accepted_frame) and not final.success:
        failing = [r.expectation_config.type for r in final.results if not r.success]
        raise RuntimeError(f"{corpus} rows {part.start}..: accepted rows fail {failing}; the reject mapping is broken")

    images = {}
    if corpus in IMAGE_CORPORA:  # the pack first: the accepted rows of converted images point into it
        images = checker.settle_images({written[i] for i in accepted_idx if written[i] is not None})
    paths = partition_paths(out, corpus, part.index)
    write_lines_atomic(paths["accepted"], (
        dump_row(rows[i] if written[i] is None else
                 {**rows[i], **images[written[i]], SOURCE_IMAGE_FIELD: rows[i]["image"]})
        for i in accepted_idx))
    write_lines_atomic(paths["rejects"], _reject_lines(rows, reasons, failed, dropped))
    histogram = Counter(reason.split(":")[0] for reason in reasons.values())
    metrics = {"in": len(rows), "accepted": len(accepted_idx), "rejected": len(reasons),
               "reasons": dict(sorted(histogram.items())), "converted": dict(sorted(checker.conversions.items())),
               "exif_rotated": checker.exif_rotated, "truncated": checker.truncated}
    doc = {
        "fingerprint": task.fingerprint, "start": part.start, "rows": part.rows,
        "metrics": metrics,
        "expectations": summary,
        # [reason, examples] pairs: a list keeps the order of first appearance through the sorted-key JSON
        "examples": [[reason, texts] for reason, texts in _examples(rows, reasons, v.report_examples).items()],
        "ge": _stable_result(result),
    }
    if corpus == "pairs":  # caption-level counts; reported when some partition has multi-caption rows
        doc["captions"] = _caption_counts(rows, reasons, dropped)
    if caption_result is not None:
        doc["ge_captions"] = _stable_result(caption_result)
    write_json_atomic(paths["summary"], doc)
    return doc


def _reject_lines(rows: list[dict[str, Any]], reasons: dict[int, str], failed: dict[int, list[str]],
                  dropped: dict[int, list[dict]]) -> Iterator[str]:
    """The rejected rows and the captions dropped from multi-caption rows, in row order."""
    for i, row in enumerate(rows):
        if i in reasons:
            yield dump_row({**row, "reason": reasons[i], "failed_expectations": failed[i]})
        for drop in dropped.get(i, []):
            yield dump_row(drop)


def _name_captionless(rows: list[dict[str, Any]], reasons: dict[int, str], failed: dict[int, list[str]],
                      dropped: dict[int, list[dict]], v: ValidateConfig) -> None:
    """A multi-caption row left with no caption fails a caption check (its first caption's); say so."""
    caption_labels = {f"{c.name}({c.column})" for c in caption_checks(v)}
    for i, row in enumerate(rows):
        if row_captions(row) == [] and i in reasons and failed[i][0] in caption_labels:
            n = len(dropped.get(i, []))
            reasons[i] = f"no valid caption: all {n} captions dropped (first: {reasons[i]})"


def _caption_counts(rows: list[dict[str, Any]], reasons: dict[int, str],
                    dropped: dict[int, list[dict]]) -> dict[str, Any]:
    """Caption-level counts (a ``text`` row counts one caption): ``in == accepted + rejected``, where a caption is
    rejected when dropped (its reason) or when its sample is (``sample rejected``)."""
    total = accepted = 0
    histogram: Counter[str] = Counter()
    for i, row in enumerate(rows):
        captions = row_captions(row)
        kept = len(captions) if captions is not None else 1
        drops = dropped.get(i, [])
        total += kept + len(drops)
        histogram.update(d["reason"].split(":")[0] for d in drops)
        if i in reasons:
            histogram["sample rejected"] += kept
        else:
            accepted += kept
    return {"in": total, "accepted": accepted, "rejected": total - accepted,
            "reasons": {k: n for k, n in sorted(histogram.items()) if n}}


def _recurring(manifest: Path, corpus: str) -> tuple[set[int], set[int]]:
    """Hashes of the keys, and of the image refs, that occur on more than one row (a superset of the recurring
    values: hashes may collide; exact values are compared in ``_carry_over``). 16 bytes per row."""
    keys, refs = array("q"), array("q")
    for row in iter_rows(manifest):
        key = row_key(row)
        if key is not None:
            keys.append(hash(key))
        ref = row.get("image")
        if corpus in IMAGE_CORPORA and isinstance(ref, str) and ref:
            refs.append(hash(ref))

    def repeated(values: array) -> set[int]:
        uniq, counts = np.unique(np.frombuffer(values, dtype=np.int64), return_counts=True)
        return set(uniq[counts > 1].tolist())

    return repeated(keys), repeated(refs)


def _carry_over(manifest: Path, corpus: str, plan: ManifestPlan) -> tuple[list[dict[str, int]], list[dict[str, str]]]:
    """Per partition, what earlier partitions decided: the first row of each recurring key (so a later row is a
    duplicate exactly as in one pass over the corpus) and the key that names each shared image (its first
    decoding row's). Memory: the recurring keys and shared images only."""
    key_hashes, ref_hashes = _recurring(manifest, corpus)
    first_row: dict[str, int] = {}
    owner: dict[str, tuple[str, int]] = {}
    prior_keys: list[dict[str, int]] = [{} for _ in plan.partitions]
    prior_images: list[dict[str, str]] = [{} for _ in plan.partitions]
    starts = [p.start for p in plan.partitions]
    part = 0
    for i, row in enumerate(iter_rows(manifest)):
        while part + 1 < len(starts) and i >= starts[part + 1]:
            part += 1
        key = row_key(row)
        decodes = key is not None  # as in _CorpusChecker.frame: duplicates and key-less rows are not decoded
        if key is not None and hash(key) in key_hashes:
            if key in first_row:
                decodes = False
                if first_row[key] < starts[part]:
                    prior_keys[part][key] = first_row[key]
            else:
                first_row[key] = i
        ref = row.get("image")
        if decodes and corpus in IMAGE_CORPORA and isinstance(ref, str) and ref and hash(ref) in ref_hashes:
            if ref in owner:
                if owner[ref][1] < starts[part]:
                    prior_images[part][ref] = owner[ref][0]
            else:
                owner[ref] = (key, i)
    return prior_keys, prior_images


def _corpus_fingerprint(plan: ManifestPlan, corpus: str, v: ValidateConfig, s3: S3Config,
                        partition_rows: int) -> str:
    doc = {"format": PARTITION_FORMAT, "corpus": corpus, "manifest": plan.sha256, "partition_rows": partition_rows,
           "validation": v.model_dump(mode="json"), "s3": s3.model_dump(mode="json")}
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode("utf-8")).hexdigest()


def validate_corpus(corpus: str, v: ValidateConfig, s3: S3Config, prepared: Path, out: Path, engine: Engine,
                    partition_rows: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """Validate one corpus partition by partition on ``engine``; partitions already done with the same manifest
    and params are kept (a killed run resumes). Then the partitions are concatenated in order into the outputs
    the shard stage reads, and their results aggregated."""
    manifest = prepared / f"{corpus}.jsonl"
    if not manifest.is_file():
        raise ValueError(f"manifest {manifest} not found: run `flava data prepare` first")
    plan = plan_partitions(manifest, partition_rows)
    fingerprint = _corpus_fingerprint(plan, corpus, v, s3, partition_rows)
    parts_dir, image_dir = out / PARTITIONS_DIR / corpus, out / "images" / corpus
    index = parts_dir / "index.json"
    if finished(index, fingerprint) is None:  # a new manifest or new params: start afresh
        for stale in (parts_dir, image_dir):
            if stale.exists():
                shutil.rmtree(stale)
        parts_dir.mkdir(parents=True)
        write_json_atomic(index, {"fingerprint": fingerprint, "rows": plan.rows, "partition_rows": partition_rows,
                                  "partitions": [part_name(p.index) for p in plan.partitions]})
    else:  # resuming: drop what the partitions that were cut short half-wrote (see partitions.temporary)
        for tmp in [*parts_dir.glob(".*.tmp"), *(image_dir.glob(".*.tmp") if image_dir.exists() else [])]:
            tmp.unlink()
    if corpus in IMAGE_CORPORA:
        image_dir.mkdir(parents=True, exist_ok=True)

    part_fingerprints = [part_fingerprint(fingerprint, p.index) for p in plan.partitions]
    todo = [p for p, fp in zip(plan.partitions, part_fingerprints)
            if finished(partition_paths(out, corpus, p.index)["summary"], fp) is None]
    if todo:
        prior_keys, prior_images = _carry_over(manifest, corpus, plan)
        log.info("validate %s: %d of %d partitions to do on %s", corpus, len(todo), len(plan.partitions), engine.name)
        engine.map(validate_partition, [
            PartitionTask(corpus, str(manifest), str(out), p, part_fingerprints[p.index], v, s3,
                          prior_keys[p.index], prior_images[p.index]) for p in todo])

    paths = [partition_paths(out, corpus, p.index) for p in plan.partitions]
    concatenate_atomic([p["accepted"] for p in paths], out / f"{corpus}.jsonl")
    concatenate_atomic([p["rejects"] for p in paths], out / f"{corpus}.rejects.jsonl")
    summaries = [json.loads(p["summary"].read_text(encoding="utf-8")) for p in paths]
    (out / "ge").mkdir(exist_ok=True)
    for name, field in ((corpus, "ge"), (f"{corpus}_captions", "ge_captions")):
        docs = [s for s in summaries if field in s]
        if docs:  # the captions' suite only where some partition had multi-caption rows
            (out / "ge" / f"{name}.json").write_text(
                json.dumps(aggregate_ge([s[field] for s in docs], [s["start"] for s in docs]),
                           sort_keys=True, indent=1, default=str) + "\n", encoding="utf-8")
    return _aggregate(summaries, v.report_examples)


def _aggregate(summaries: list[dict[str, Any]], per_reason: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """The corpus's metrics (numbers, for `dvc metrics`) and details (for the report) from its partitions'."""
    totals = {k: sum(s["metrics"][k] for s in summaries) for k in ("in", "accepted", "rejected")}
    reasons: Counter[str] = Counter()
    converted: Counter[str] = Counter()
    for s in summaries:
        reasons.update(s["metrics"]["reasons"])
        converted.update(s["metrics"]["converted"])
    examples: dict[str, list[str]] = {}
    for s in summaries:
        for reason, texts in s["examples"]:
            bucket = examples.setdefault(reason, [])
            bucket += texts[:max(0, per_reason - len(bucket))]
    expectations = [{**first, "success": all(s["expectations"][j]["success"] for s in summaries),
                     "unexpected": sum(s["expectations"][j]["unexpected"] for s in summaries)}
                    for j, first in enumerate(summaries[0]["expectations"])]
    total = totals["in"]
    captions = [s["captions"] for s in summaries if "captions" in s]
    caption_totals = {}
    if any("ge_captions" in s for s in summaries):  # single-caption corpora: metrics as they were
        caption_reasons: Counter[str] = Counter()
        for c in captions:
            caption_reasons.update(c["reasons"])
        caption_totals = {"captions": {**{k: sum(c[k] for c in captions) for k in ("in", "accepted", "rejected")},
                                       "reasons": dict(sorted(caption_reasons.items()))}}
    return {
        **totals,
        **caption_totals,
        "reject_rate": totals["rejected"] / total if total else 0.0,
        "accept_fraction": totals["accepted"] / total if total else 1.0,
        "reasons": dict(sorted(reasons.items())),
        "converted": dict(sorted(converted.items())),
        "exif_rotated": sum(s["metrics"]["exif_rotated"] for s in summaries),
        "truncated": sum(s["metrics"]["truncated"] for s in summaries),
    }, {"expectations": expectations, "examples": examples}


_PARTIAL_LIMIT = 20  # GE's length of the partial_unexpected_* lists


def aggregate_ge(docs: list[dict[str, Any]], starts: list[int]) -> dict[str, Any]:
    """One GE validation result from the partitions' (one partition: its result as is). Counts add up,
    percentages are recomputed, the partial lists are the first partitions' (row indices corpus-wide), and the
    batch fingerprint becomes the list of the partitions' fingerprints."""
    if len(docs) == 1:
        return docs[0]
    out = copy.deepcopy(docs[0])
    out["meta"].setdefault("batch_markers", {})["pandas_data_fingerprint"] = [
        d["meta"].get("batch_markers", {}).get("pandas_data_fingerprint") for d in docs]
    for j, res in enumerate(out["results"]):
        parts = [d["results"][j]["result"] for d in docs]
        res["success"] = all(d["results"][j]["success"] for d in docs)
        result = res["result"]
        for key in ("element_count", "missing_count", "unexpected_count"):
            if key in result:
                result[key] = sum(p.get(key, 0) for p in parts)
        n, missing, bad = result.get("element_count", 0), result.get("missing_count", 0), result.get(
            "unexpected_count", 0)
        if "missing_percent" in result:
            result["missing_percent"] = missing / n * 100 if n else None
        if "unexpected_percent" in result:
            result["unexpected_percent"] = bad / (n - missing) * 100 if n - missing else None
            result["unexpected_percent_nonmissing"] = result["unexpected_percent"]
            result["unexpected_percent_total"] = bad / n * 100 if n else None
        if "partial_unexpected_list" in result:
            result["partial_unexpected_list"] = [
                value for p in parts for value in p.get("partial_unexpected_list", [])][:_PARTIAL_LIMIT]
        if "partial_unexpected_index_list" in result:
            result["partial_unexpected_index_list"] = [
                start + i for p, start in zip(parts, starts)
                for i in p.get("partial_unexpected_index_list", [])][:_PARTIAL_LIMIT]
        if "partial_unexpected_counts" in result:
            counts: Counter[str] = Counter()
            values: dict[str, Any] = {}
            for p in parts:
                for c in p.get("partial_unexpected_counts", []):
                    token = json.dumps(c["value"], sort_keys=True, default=str)
                    counts[token] += c["count"]
                    values[token] = c["value"]
            result["partial_unexpected_counts"] = [
                {"count": n_, "value": values[t]}
                for t, n_ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))][:_PARTIAL_LIMIT]
    evaluated = len(out["results"])
    good = sum(1 for r in out["results"] if r["success"])
    out["success"] = good == evaluated
    out["statistics"] = {"evaluated_expectations": evaluated, "successful_expectations": good,
                         "unsuccessful_expectations": evaluated - good,
                         "success_percent": good / evaluated * 100 if evaluated else None}
    return out


_VOLATILE_RESULT_KEYS = ("unexpected_list", "unexpected_index_list", "unexpected_index_query")


def _stable_result(result) -> dict[str, Any]:
    """GE's validation result without run-specific ids and timestamps (byte-identical across re-runs) and without
    the full per-row lists (rows and reasons are in the rejects file; the partial lists stay)."""
    doc = result.to_json_dict()
    doc.pop("id", None)
    doc.get("meta", {}).get("batch_markers", {}).pop("ge_load_time", None)
    for res in doc.get("results", []):
        res.get("expectation_config", {}).pop("id", None)
        for key in _VOLATILE_RESULT_KEYS:
            res.get("result", {}).pop(key, None)
    return doc


def _examples(rows: list[dict[str, Any]], reasons: dict[int, str], per_reason: int) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for i in sorted(reasons):
        bucket = out.setdefault(reasons[i].split(":")[0], [])
        if len(bucket) < per_reason:
            bucket.append(f"{rows[i].get('key')!r}: {reasons[i]}"[:300])
    return out


def render_report(metrics: dict[str, Any], details: dict[str, Any], v: ValidateConfig) -> str:
    lines = ["# Data validation report", "",
             f"Great Expectations suites per corpus; threshold: accepted fraction >= {v.min_accept_fraction}.", "",
             "| corpus | in | accepted | rejected | reject rate | status |", "|---|---:|---:|---:|---:|---|"]
    for corpus, m in metrics.items():
        status = "ok" if m["accept_fraction"] >= v.min_accept_fraction or m["in"] == 0 else "BELOW THRESHOLD"
        lines.append(f"| {corpus} | {m['in']} | {m['accepted']} | {m['rejected']} | {m['reject_rate']:.2%} | {status} |")
    for corpus, m in metrics.items():
        lines += ["", f"## {corpus}", "", "| expectation | column | unexpected | result |", "|---|---|---:|---|"]
        lines += [f"| {e['expectation']} | {e['column']} | {e['unexpected']} | {'pass' if e['success'] else 'FAIL'} |"
                  for e in details[corpus]["expectations"]]
        if m["reasons"]:
            lines += ["", "Reject reasons:", ""] + [f"- {r}: {n}" for r, n in m["reasons"].items()]
            lines += ["", "Examples:", ""] + [f"- {e}" for ex in details[corpus]["examples"].values() for e in ex]
        if "captions" in m:
            c = m["captions"]
            lines += ["", f"Captions: in {c['in']}, accepted {c['accepted']}, rejected {c['rejected']} {c['reasons']}."]
        if m["converted"] or m["exif_rotated"] or m["truncated"]:
            lines += ["", f"Normalised: conversions {m['converted'] or '{}'}, EXIF-rotated {m['exif_rotated']}, "
                          f"captions truncated {m['truncated']}."]
    return "\n".join(lines) + "\n"


def validate(v: ValidateConfig, s3: S3Config, prepared: str | Path, validated: str | Path,
             engine: EngineConfig | None = None) -> dict[str, Any]:
    prepared, out = Path(prepared), Path(validated)
    out.mkdir(parents=True, exist_ok=True)
    engine = engine or EngineConfig()
    metrics, details = {}, {}
    with open_engine(engine) as runner:
        for corpus in CORPORA:
            metrics[corpus], details[corpus] = validate_corpus(corpus, v, s3, prepared, out, runner,
                                                               engine.partition_rows)
    (out / "metrics.json").write_text(json.dumps(metrics, sort_keys=True, indent=2) + "\n", encoding="utf-8")
    (out / "report.md").write_text(render_report(metrics, details, v), encoding="utf-8")
    for corpus, m in metrics.items():
        log.info("validate %s: in=%d accepted=%d rejected=%d %s", corpus, m["in"], m["accepted"], m["rejected"],
                 m["reasons"])
    low = {c: m for c, m in metrics.items() if m["in"] and m["accept_fraction"] < v.min_accept_fraction}
    if low:
        detail = "; ".join(f"{c}: {m['accepted']}/{m['in']} accepted ({m['accept_fraction']:.1%}), top reasons "
                           f"{dict(Counter(m['reasons']).most_common(3))}" for c, m in low.items())
        raise ValueError(f"validation failed: accepted fraction below data.validation.min_accept_fraction="
                         f"{v.min_accept_fraction} for {detail}. See {out / 'report.md'}")
    return {c: {k: m[k] for k in ("in", "accepted", "rejected", "reject_rate")} for c, m in metrics.items()}


def run_validate(cfg) -> dict[str, Any]:
    """Stage function of ``flava data validate`` (``cfg``: a ``PipelineConfig``): an MLflow run with the counts
    and reject reasons per corpus, the report and the Great Expectations results -- also when too few rows pass,
    which is when they are read."""
    started = time.time()
    with stage_run(cfg, "validate") as run:
        try:
            return validate(cfg.data.validation, cfg.data.ingest.s3, cfg.paths.prepared, cfg.paths.validated,
                            cfg.data.engine)
        finally:
            _log_results(run, Path(cfg.paths.validated), started)


def _log_results(run: StageLog, out: Path, started: float) -> None:
    metrics = out / "metrics.json"
    if not metrics.is_file() or metrics.stat().st_mtime < started:  # failed before writing: nothing of this run
        return
    run.log_metrics(json.loads(metrics.read_text(encoding="utf-8")))
    run.log_artifact(out / "report.md")
    run.log_artifact(out / "ge", "ge")
