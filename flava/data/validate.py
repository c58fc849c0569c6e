"""`flava data validate`: Great Expectations suites per corpus; bad rows quarantined with their reason.

For each corpus manifest in ``paths.prepared`` every row gets one column per check (keys, caption/text
encoding and bounds, image decodability, mode and size, computed by decoding each image safely, local file or
``s3://`` object alike). The corpus's GE suite (``flava.data.expectations``) runs over those columns; a row that
fails an expectation is rejected with the first failing expectation's reason. Accepted images are normalised
(EXIF rotation, 8-bit RGB) and written to ``paths.validated/images/<corpus>/``, once per image reference (rows
sharing an image share the file); accepted rows point there.

A pair with several captions (``captions``, ``flava.data.captions``) has each caption checked on its own (GE suite
``pairs_captions``): a failing caption is dropped from the row and written to the rejects file as
``{key, caption_index, caption, reason, failed_expectations}``; a row left with no caption is rejected ("no valid
caption"). Then ``metrics["pairs"]["captions"]`` counts captions too (``in == accepted + rejected``).

Outputs in ``paths.validated``: ``{corpus}.jsonl``, ``{corpus}.rejects.jsonl`` (row + ``reason`` +
``failed_expectations``), ``report.md``, ``metrics.json``, ``ge/{corpus}.json`` (the GE validation result).
Per corpus ``in == accepted + rejected``. The stage fails with a ``ValueError`` (after writing its outputs)
when a corpus's accepted fraction is below ``data.validation.min_accept_fraction``.
"""
from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from flava.data import images as imaging
from flava.data.captions import CAPTIONS_FIELD, TEXT_FIELD, row_captions
from flava.data.expectations import SuiteRunner, accepted_checks, caption_checks, corpus_checks
from flava.data.ingest import CORPORA, dump_row
from flava.data.jsonl import read_jsonl
from flava.data.prep_config import ValidateConfig
from flava.data.sources import safe_key
from flava.data.storage import is_s3, read_bytes, split_s3
from flava.data.stream_config import S3Config
from flava.tracking.runs import StageLog, stage_run

log = logging.getLogger(__name__)

IMAGE_CORPORA = ("pairs", "images")


# ---------------------------------------------------------------------------------------------- fetching
class Fetcher:
    """Bytes of a local path or an ``s3://`` URI, or ``(None, reason)``. A bucket whose endpoint cannot be
    reached is remembered, so a dead endpoint costs one timeout, not one per row."""

    def __init__(self, s3: S3Config, max_bytes: int):
        self.s3, self.max_bytes = s3, max_bytes
        self._dead_buckets: dict[str, str] = {}

    def __call__(self, ref: str) -> tuple[bytes | None, str | None]:
        if not is_s3(ref):
            path = Path(ref)
            try:
                if not path.is_file():
                    return None, f"missing file: {ref[:200]}"
            except OSError as err:  # e.g. a name too long: not a path at all
                return None, f"missing file: not a usable path ({err.strerror}): {ref[:200]!r}"
            size = path.stat().st_size
            if size > self.max_bytes:  # do not read it into memory
                return None, f"file too large: {size} bytes > {self.max_bytes}"
            return path.read_bytes(), None
        bucket, _ = split_s3(ref)
        if bucket in self._dead_buckets:
            return None, self._dead_buckets[bucket]
        try:
            return read_bytes(ref, s3=self.s3), None
        except FileNotFoundError as err:
            return None, f"s3 object not found: {err}"
        except Exception as err:  # noqa: BLE001 - botocore: credentials, endpoint, access denied, throttling...
            from botocore.exceptions import ClientError  # botocore is optional (S3 only); only S3 refs get here

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


def image_name(key: str, suffix: str) -> str:
    """File name of a normalised image: readable part of the key + a hash, so distinct keys never collide."""
    return f"{safe_key(key)[:80]}-{hashlib.sha1(key.encode('utf-8', 'surrogateescape')).hexdigest()[:10]}.{suffix}"


class _CorpusChecker:
    def __init__(self, corpus: str, v: ValidateConfig, fetch: Fetcher, image_dir: Path):
        self.corpus, self.v, self.fetch, self.image_dir = corpus, v, fetch, image_dir
        self.conversions: Counter[str] = Counter()
        self.exif_rotated = 0
        self.truncated = 0
        # image reference -> its check columns and normalised file: an image shared by several rows (COCO's five
        # captions per image) is fetched, decoded and written once
        self._seen_images: dict[str, tuple[dict[str, Any], Path | None]] = {}
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

    def image_columns(self, row: dict[str, Any], decode: bool) -> tuple[dict[str, Any], Path | None]:
        """Check columns of the row's image; when it decodes, the normalised image is written (path returned)."""
        empty = {"image_error": None, "image_mode": None, "image_width": np.nan, "image_height": np.nan,
                 "image_min_side": np.nan, "image_max_side": np.nan, "image_aspect": np.nan}
        ref = row.get("image")
        if not decode:  # a duplicate or key-less row: rejected for that; its image is not fetched
            return empty, None
        if not isinstance(ref, str) or not ref:
            return {**empty, "image_error": "missing file: row has no image reference"}, None
        if ref not in self._seen_images:
            self._seen_images[ref] = self._check_image(ref, str(row["key"]), empty)
        return self._seen_images[ref]

    def _check_image(self, ref: str, key: str, empty: dict[str, Any]) -> tuple[dict[str, Any], Path | None]:
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
        if info.mode != "RGB":
            self.conversions[f"{info.mode}->RGB"] += 1
        self.exif_rotated += int(turned)
        path = self.image_dir / image_name(key, v.image_format)
        if v.image_format == "png":
            rgb.save(path, format="PNG")
        else:
            rgb.save(path, format="JPEG", quality=v.jpeg_quality)
        return cols, path

    def frame(self, rows: list[dict[str, Any]]) -> tuple[pd.DataFrame, list[Path | None]]:
        seen: dict[str, int] = {}
        records, written = [], []
        for i, row in enumerate(rows):
            key = row.get("key")
            key = None if key is None or str(key) == "" else str(key)
            duplicate_of = seen.get(key) if key is not None else None
            if key is not None and duplicate_of is None:
                seen[key] = i
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
def _read_manifest(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        raise ValueError(f"manifest {path} not found: run `flava data prepare` first")
    return read_jsonl(path)


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


def validate_corpus(corpus: str, v: ValidateConfig, prepared: Path, out: Path, fetch: Fetcher,
                    runner: SuiteRunner) -> tuple[dict[str, Any], dict[str, Any]]:
    rows = _read_manifest(prepared / f"{corpus}.jsonl")
    image_dir = out / "images" / corpus
    if image_dir.exists():
        shutil.rmtree(image_dir)
    if corpus in IMAGE_CORPORA:
        image_dir.mkdir(parents=True)
    checker = _CorpusChecker(corpus, v, fetch, image_dir)
    dropped, caption_result = checker.check_captions(rows, runner) if corpus == "pairs" else ({}, None)
    frame, written = checker.frame(rows)
    checks = corpus_checks(corpus, v)
    result = runner.run(corpus, checks, frame)
    reasons, failed, summary = _row_reasons(result, checks, frame)
    _name_captionless(rows, reasons, failed, dropped, v)

    histogram: Counter[str] = Counter()
    accepted_idx = []
    kept = {written[i] for i in range(len(rows)) if i not in reasons and written[i] is not None}
    with (out / f"{corpus}.jsonl").open("w", encoding="utf-8", newline="\n") as acc, \
            (out / f"{corpus}.rejects.jsonl").open("w", encoding="utf-8", newline="\n") as rej:
        for i, row in enumerate(rows):
            if i in reasons:
                histogram[reasons[i].split(":")[0]] += 1
                rej.write(dump_row({**row, "reason": reasons[i], "failed_expectations": failed[i]}) + "\n")
                if written[i] is not None and written[i] not in kept:  # decoded, rejected for another reason
                    written[i].unlink(missing_ok=True)  # (e.g. caption) and not shared with an accepted row
            else:
                accepted_idx.append(i)
                if written[i] is not None:
                    row = {**row, "image": str(written[i])}
                acc.write(dump_row(row) + "\n")
            for drop in dropped.get(i, []):  # the captions dropped from a multi-caption row
                rej.write(dump_row(drop) + "\n")

    # Post-condition: the accepted set passes every expectation, keys unique (guards the reason mapping above).
    accepted_frame = frame.iloc[accepted_idx].reset_index(drop=True)
    final = runner.run(f"{corpus}_accepted", accepted_checks(corpus, v), accepted_frame)
    if len(accepted_frame) and not final.success:
        failing = [r.expectation_config.type for r in final.results if not r.success]
        raise RuntimeError(f"{corpus}: accepted rows fail {failing}; the reject mapping is broken")
    (out / "ge").mkdir(exist_ok=True)
    for name, res in ((corpus, result), (f"{corpus}_captions", caption_result)):
        if res is not None:
            (out / "ge" / f"{name}.json").write_text(
                json.dumps(_stable_result(res), sort_keys=True, indent=1, default=str) + "\n", encoding="utf-8")

    total = len(rows)
    metrics = {  # metrics (numbers, for `dvc metrics`), details (for the report)
        "in": total, "accepted": len(accepted_idx), "rejected": len(reasons),
        "reject_rate": len(reasons) / total if total else 0.0,
        "accept_fraction": len(accepted_idx) / total if total else 1.0,
        "reasons": dict(sorted(histogram.items())),
        "converted": dict(sorted(checker.conversions.items())),
        "exif_rotated": checker.exif_rotated,
        "truncated": checker.truncated,
    }
    if any(row_captions(row) is not None for row in rows):  # single-caption corpora: metrics as they were
        metrics["captions"] = _caption_counts(rows, reasons, dropped)
    return metrics, {"expectations": summary, "examples": _examples(rows, reasons, v.report_examples)}


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


def validate(v: ValidateConfig, s3: S3Config, prepared: str | Path, validated: str | Path) -> dict[str, Any]:
    prepared, out = Path(prepared), Path(validated)
    out.mkdir(parents=True, exist_ok=True)
    fetch = Fetcher(s3, v.max_image_bytes)
    runner = SuiteRunner()
    metrics, details = {}, {}
    for corpus in CORPORA:
        metrics[corpus], details[corpus] = validate_corpus(corpus, v, prepared, out, fetch, runner)
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
            return validate(cfg.data.validation, cfg.data.ingest.s3, cfg.paths.prepared, cfg.paths.validated)
        finally:
            _log_results(run, Path(cfg.paths.validated), started)


def _log_results(run: StageLog, out: Path, started: float) -> None:
    metrics = out / "metrics.json"
    if not metrics.is_file() or metrics.stat().st_mtime < started:  # failed before writing: nothing of this run
        return
    run.log_metrics(json.loads(metrics.read_text(encoding="utf-8")))
    run.log_artifact(out / "report.md")
    run.log_artifact(out / "ge", "ge")
