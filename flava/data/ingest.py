"""`flava data prepare`: raw corpora -> per-corpus manifests ``paths.prepared/{pairs,images,text}.jsonl``.

Sources come from ``data.ingest`` (default: the layout ``flava data generate`` writes). Rows dropped here go to
``{corpus}.rejects.jsonl`` with a reason; per corpus ``in == accepted + rejected`` (for text, counted in
documents; the manifest holds their passages; for a captions JSON, in images plus the annotations that name
no usable image or caption). A source whose rows are all rejected fails the stage
(``ValueError`` naming it and its first reasons) once the outputs are written. Keys start with the source name,
so several corpora with the same native keys (img2dataset's ``000000000``) never collide. Images referenced by
path or ``s3://`` are not read here: validation decodes them and quarantines what it cannot read. Nor are
they ever one file per image: an image member of an uncompressed webdataset tar (local or ``s3://``) is referenced
in place, ``<tar>#<offset>+<size>`` (``flava.data.packs``), and image bytes embedded in a source (parquet/arrow
cells, members of compressed tars) go into one pack per source, ``paths.prepared/extracted/<source>.tar``, once
per distinct content. Evaluation sets are copied to ``paths.prepared/eval/`` with image paths
resolved so that they open from the working directory.

Manifest rows: pairs ``{key, image, text, source}`` (+ webdataset provenance such as ``url``, ``sha256``), or
``{key, image, captions, source}`` for an image with several captions (COCO, Karpathy: ``flava.data.captions``),
images ``{key, image, label, source}`` (+ ``synset`` with a class-name map), text ``{key, text, source}``.
"""
from __future__ import annotations

import json
import logging
import shutil
from collections import Counter
from pathlib import Path
from typing import Any, Iterable

from flava.data import sources
from flava.data.jsonl import read_jsonl, write_jsonl
from flava.data.prep_config import CocoPairs, IngestConfig, KarpathyPairs, ManifestPairs, PairSource
from flava.data.storage import is_s3
from flava.tracking.runs import stage_run

log = logging.getLogger(__name__)

CORPORA = ("pairs", "images", "text")
EXTRACTED = "extracted"  # embedded image bytes land in packs paths.prepared/extracted/<source>.tar
FIRST_REASONS = 3  # reject reasons quoted per source when all its rows are rejected


def dump_row(row: dict[str, Any]) -> str:
    # ensure_ascii: undecodable bytes kept as lone surrogates are written as \udcXX escapes (valid JSON)
    return json.dumps(row, sort_keys=True, ensure_ascii=True, default=str)


class _Sink:
    """Writes accepted rows and rejects of one corpus and counts them."""

    def __init__(self, out: Path, corpus: str):
        self.accepted_f = (out / f"{corpus}.jsonl").open("w", encoding="utf-8", newline="\n")
        self.rejects_f = (out / f"{corpus}.rejects.jsonl").open("w", encoding="utf-8", newline="\n")
        self.accepted = self.rejected = 0
        self.reasons: Counter[str] = Counter()
        self.per_source: dict[str, Counter[str]] = {}
        self.first_reasons: dict[str, list[str]] = {}  # per source, the first few, for the all-rejected error

    def add(self, item: sources.Item, source: str) -> None:
        counts = self.per_source.setdefault(source, Counter())
        counts["in"] += 1
        if item.reason is not None and len(self.first_reasons.setdefault(source, [])) < FIRST_REASONS:
            self.first_reasons[source].append(item.reason[:300])
        if item.reason is None:
            self.accepted_f.write(dump_row(item.row) + "\n")
            self.accepted += 1
            counts["accepted"] += 1
        else:
            self.rejects_f.write(dump_row({"row": item.raw, "reason": item.reason, "source": source}) + "\n")
            self.rejected += 1
            self.reasons[item.reason.split(":")[0]] += 1
            counts["rejected"] += 1

    def close(self) -> dict[str, Any]:
        self.accepted_f.close()
        self.rejects_f.close()
        total = self.accepted + self.rejected
        return {"in": total, "accepted": self.accepted, "rejected": self.rejected,
                "reject_rate": self.rejected / total if total else 0.0, "reasons": dict(sorted(self.reasons.items())),
                "sources": {k: dict(sorted(v.items())) for k, v in self.per_source.items()},
                "first_reasons": {k: v for k, v in self.first_reasons.items() if v}}


def _names(corpus: str, srcs: list) -> list[str]:
    """Source names (they prefix the keys); two sources of one corpus with one name would collide."""
    names = [sources.source_name(src.path.rstrip("/"), src.name) for src in srcs]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ValueError(f"data.ingest.{corpus}: several sources are named {dupes} (from their paths); keys carry "
                         "the source name, so give each a distinct 'name'")
    return names


def _pair_items(src: PairSource, ing: IngestConfig, raw: Path, pack: Path) -> Iterable[sources.Item]:
    if isinstance(src, ManifestPairs):
        return sources.read_manifest(src, raw, ing.caption_filter, pack)
    if isinstance(src, CocoPairs):
        return sources.read_coco(src, raw)
    if isinstance(src, KarpathyPairs):
        return sources.read_karpathy(src, raw)
    return sources.read_webdataset(src, raw, ing.caption_filter, pack, ing.s3)


def _prepare_pairs(ing: IngestConfig, raw: Path, out: Path) -> dict[str, Any]:
    sink = _Sink(out, "pairs")
    for src, name in zip(ing.pairs, _names("pairs", ing.pairs)):
        for item in _pair_items(src, ing, raw, out / EXTRACTED / f"{name}.tar"):
            sink.add(item, name)
    return sink.close()


def _prepare_images(ing: IngestConfig, raw: Path, out: Path) -> dict[str, Any]:
    sink = _Sink(out, "images")
    for src, name in zip(ing.images, _names("images", ing.images)):
        for item in sources.read_class_folders(src, raw):
            sink.add(item, name)
    result = sink.close()
    result["num_labels"] = len({json.loads(line)["label"] for line in (out / "images.jsonl").open()})
    return result


def _prepare_text(ing: IngestConfig, raw: Path, out: Path) -> dict[str, Any]:
    sink = _Sink(out, "text")
    passages = 0
    for src, name in zip(ing.text, _names("text", ing.text)):
        for doc_id, item in sources.read_text_documents(src, raw):
            if item.reason is not None:
                sink.add(item, name)
                continue
            chunks = sources.split_passages(item.row["text"], ing.max_passage_words)
            if not chunks:
                sink.add(sources.Item(None, item.raw, "empty document"), name)
                continue
            sink.accepted += 1  # counted in documents; the manifest holds their passages
            sink.per_source.setdefault(name, Counter()).update({"in": 1, "accepted": 1})
            for n, text in enumerate(chunks):
                sink.accepted_f.write(dump_row({"key": sources.safe_key(f"{name}-{doc_id}-{n}"), "text": text,
                                                "source": name}) + "\n")
            passages += len(chunks)
    result = sink.close()
    result["unit"] = "documents"
    result["passages"] = passages
    return result


# ---------------------------------------------------------------------------------------------- eval sets
def _resolve_images(rows: list[dict[str, Any]], base: Path, path: Path) -> list[dict[str, Any]]:
    out = []
    for lineno, row in enumerate(rows, 1):
        if "image" not in row:
            raise ValueError(f"{path}:{lineno}: row has no 'image'")
        image = sources.resolve(str(row["image"]), base)
        if not is_s3(image) and not Path(image).is_file():
            raise ValueError(f"{path}:{lineno}: image {image} does not exist")
        out.append({**row, "image": image})
    return out


def prepare_eval(src: Path, dst: Path) -> dict[str, Any]:
    """Copy the evaluation sets that exist under ``src`` to ``dst``, checking them and resolving image paths.
    Eval sets are curated: a malformed one is an error (``ValueError`` naming file and line), not a reject."""
    if not src.is_dir():
        raise ValueError(f"evaluation sets directory {src} does not exist (set data.ingest.eval_dir: null "
                         "if there are none)")
    if dst.exists():
        shutil.rmtree(dst)
    counts: dict[str, Any] = {}
    zs = src / "zeroshot"
    if (zs / "classes.json").is_file():
        classes = json.loads((zs / "classes.json").read_text(encoding="utf-8"))
        names, templates = classes.get("classnames"), classes.get("templates")
        if not names or not templates or any("{}" not in t for t in templates):
            raise ValueError(f"{zs / 'classes.json'}: needs non-empty 'classnames' and 'templates' with '{{}}'")
        (dst / "zeroshot").mkdir(parents=True)
        shutil.copyfile(zs / "classes.json", dst / "zeroshot" / "classes.json")
        counts["zeroshot"] = {}
        for split in ("train", "val", "test"):
            if not (zs / f"{split}.jsonl").is_file():
                continue
            rows = _resolve_images(read_jsonl(zs / f"{split}.jsonl"), zs, zs / f"{split}.jsonl")
            bad = [r["label"] for r in rows if not isinstance(r.get("label"), int) or not 0 <= r["label"] < len(names)]
            if bad:
                raise ValueError(f"{zs / f'{split}.jsonl'}: labels must be class indices < {len(names)}, got {bad[:5]}")
            counts["zeroshot"][split] = write_jsonl(dst / "zeroshot" / f"{split}.jsonl", rows)
    ret = src / "retrieval" / "test.jsonl"
    if ret.is_file():
        rows = _resolve_images(read_jsonl(ret), ret.parent, ret)
        if any(not isinstance(r.get("captions"), list) or not r["captions"] for r in rows):
            raise ValueError(f"{ret}: every row needs a non-empty 'captions' list")
        counts["retrieval"] = {"test": write_jsonl(dst / "retrieval" / "test.jsonl", rows)}
    tc = src / "text_cls"
    if tc.is_dir():
        counts["text_cls"] = {}
        for tsv in sorted(tc.glob("*.tsv")):
            lines = tsv.read_text(encoding="utf-8").splitlines()
            if not lines or lines[0].split("\t") != ["sentence", "label"]:
                raise ValueError(f"{tsv}: header must be 'sentence<TAB>label'")
            (dst / "text_cls").mkdir(parents=True, exist_ok=True)
            shutil.copyfile(tsv, dst / "text_cls" / tsv.name)
            counts["text_cls"][tsv.stem] = len(lines) - 1
    vqa = src / "vqa"
    if vqa.is_dir():
        counts["vqa"] = {}
        for split in ("train", "val", "test"):
            path = vqa / f"{split}.jsonl"
            if path.is_file():
                rows = _resolve_images(read_jsonl(path), vqa, path)
                if any("question" not in r or "answer" not in r for r in rows):
                    raise ValueError(f"{path}: every row needs 'question' and 'answer'")
                counts["vqa"][split] = write_jsonl(dst / "vqa" / f"{split}.jsonl", rows)
    for extra in ("text_cls/labels.json", "vqa/answers.json"):  # label/answer vocabularies, when present
        if (src / extra).is_file():
            (dst / extra).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src / extra, dst / extra)
    return counts


# ---------------------------------------------------------------------------------------------- stage
def prepare(ing: IngestConfig, raw: str | Path, prepared: str | Path) -> dict[str, Any]:
    raw, out = Path(raw), Path(prepared)
    if not raw.is_dir():
        raise ValueError(f"raw data directory {raw} (paths.raw) does not exist: run `flava data generate` for the "
                         "synthetic world, or put real data there and point data.ingest at it")
    out.mkdir(parents=True, exist_ok=True)
    if (out / EXTRACTED).exists():  # stale extractions from an earlier run
        shutil.rmtree(out / EXTRACTED)
    (out / EXTRACTED).mkdir()  # a stage output (DVC), also when no source embeds image bytes
    metrics: dict[str, Any] = {
        "pairs": _prepare_pairs(ing, raw, out),
        "images": _prepare_images(ing, raw, out),
        "text": _prepare_text(ing, raw, out),
    }
    metrics["eval"] = prepare_eval(raw / ing.eval_dir, out / "eval") if ing.eval_dir else None
    (out / "metrics.json").write_text(json.dumps(metrics, sort_keys=True, indent=2) + "\n", encoding="utf-8")
    for corpus in CORPORA:
        m = metrics[corpus]
        log.info("prepare %s: in=%d accepted=%d rejected=%d %s", corpus, m["in"], m["accepted"], m["rejected"],
                 m["reasons"])
    _fail_on_dead_sources(metrics, out)
    return {corpus: {k: metrics[corpus][k] for k in ("in", "accepted", "rejected")} for corpus in CORPORA}


def _fail_on_dead_sources(metrics: dict[str, Any], out: Path) -> None:
    """A source that yields rows but none accepted is a misconfiguration (wrong columns, header, format or image
    folder), not data to quarantine quietly: fail here, naming it and its first reasons, after the outputs and
    rejects files are written for inspection."""
    dead = [f"{corpus} source {name!r}: all {counts['in']} rows rejected, first reasons: "
            f"{metrics[corpus]['first_reasons'].get(name, [])}"
            for corpus in CORPORA for name, counts in metrics[corpus]["sources"].items()
            if counts.get("in") and not counts.get("accepted")]
    if dead:
        raise ValueError("prepare: " + "; ".join(dead) + f". See {out}/<corpus>.rejects.jsonl")


def run_prepare(cfg) -> dict[str, Any]:
    """Stage function of ``flava data prepare`` (``cfg``: a ``PipelineConfig``); an MLflow run with the counts."""
    with stage_run(cfg, "prepare") as run:
        result = prepare(cfg.data.ingest, cfg.paths.raw, cfg.paths.prepared)
        run.log_metrics(json.loads((Path(cfg.paths.prepared) / "metrics.json").read_text(encoding="utf-8")))
    return result
