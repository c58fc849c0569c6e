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
cells, members of compressed tars) go into one pack per unit of the source,
``paths.prepared/extracted/<source>/<unit number>.tar``, once per distinct content. Evaluation sets are copied to
``paths.prepared/eval/`` with image paths resolved so that they open from the working directory.

Partitions: each unit of each source (``sources.source_units``: a webdataset shard, a parquet part, an Arrow
file, a text file, a row range of ``data.engine.partition_rows`` rows of a CSV/TSV/JSONL manifest -- its start
found by one streaming pass that parses the records, so quoted newlines are no boundary; a captions JSON or a
class-folder tree is one unit however large) is one partition, run on the engine of ``data.engine``
(``flava.data.engine``). A partition writes
``partitions/<corpus>/<n>.jsonl``, ``<n>.rejects.jsonl`` and, last, ``<n>.json`` (counts, reasons, per-source
counts, first reasons, the fingerprint of the corpus's inputs and params and of ``n``); ``index.json`` lists them.
The corpus's manifest and rejects are the partitions' files concatenated in order and its metrics their sums, so
they are the bytes of one pass over the sources on any engine and any partitioning. A killed run resumes at the
partitions without a matching ``<n>.json``; changed inputs (a unit file's name, size and SHA-256, hashed on the
engine's workers; a class-folder tree's file names and sizes), params or row ranges start the corpus afresh.

Manifest rows: pairs ``{key, image, text, source}`` (+ webdataset provenance such as ``url``, ``sha256``), or
``{key, image, captions, source}`` for an image with several captions (COCO, Karpathy: ``flava.data.captions``),
images ``{key, image, label, source}`` (+ ``synset`` with a class-name map), text ``{key, text, source}``.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from flava.data import sources
from flava.data.engine import Engine, EngineConfig, open_engine
from flava.data.jsonl import read_jsonl, write_jsonl
from flava.data.partitions import (
    PARTITIONS_DIR,
    concatenate_atomic,
    finished,
    part_fingerprint,
    part_name,
    partition_paths,
    temporary,
    write_json_atomic,
)
from flava.data.prep_config import ClassFolderImages, CocoPairs, IngestConfig, KarpathyPairs, ManifestPairs, PairSource
from flava.data.storage import is_s3
from flava.tracking.runs import stage_run

log = logging.getLogger(__name__)

CORPORA = ("pairs", "images", "text")
EXTRACTED = "extracted"  # embedded image bytes land in packs paths.prepared/extracted/<source>/<unit>.tar
FIRST_REASONS = 3  # reject reasons quoted per source when all its rows are rejected


def dump_row(row: dict[str, Any]) -> str:
    # ensure_ascii: undecodable bytes kept as lone surrogates are written as \udcXX escapes (valid JSON)
    return json.dumps(row, sort_keys=True, ensure_ascii=True, default=str)


class _Sink:
    """Writes the accepted rows and rejects of one partition and counts them; the files get their names on
    ``close`` (a killed partition leaves only temporary files, removed when the stage resumes)."""

    def __init__(self, accepted: Path, rejects: Path):
        self._names = {temporary(accepted): accepted, temporary(rejects): rejects}
        self.accepted_f = temporary(accepted).open("w", encoding="utf-8", newline="\n")
        self.rejects_f = temporary(rejects).open("w", encoding="utf-8", newline="\n")
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
        """The partition's counts, once its files are in place."""
        self.accepted_f.close()
        self.rejects_f.close()
        for tmp, path in self._names.items():
            os.replace(tmp, path)
        return {"in": self.accepted + self.rejected, "accepted": self.accepted, "rejected": self.rejected,
                "reasons": dict(sorted(self.reasons.items())),
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


# ---------------------------------------------------------------------------------------------- partitions
PARTITION_FORMAT = 1  # in the fingerprint: bump it when a partition's outputs change for the same inputs


@dataclass(frozen=True)
class PrepareTask:
    """One partition: one unit of one source (``sources.source_units``), everything ``prepare_partition`` needs,
    picklable for a Dask worker."""

    corpus: str
    index: int  # partition number within the corpus
    source: int  # the source's position in data.ingest.<corpus>
    name: str  # the source's name (the keys' prefix)
    unit: sources.SourceUnit
    unit_index: int  # the unit's number within its source
    ing: IngestConfig
    raw: str  # paths.raw
    out: str  # paths.prepared
    fingerprint: str  # of the corpus's inputs and params and of this partition: done when its summary has it


def extraction_pack(out: Path, name: str, unit_index: int) -> Path:
    """The pack of the image bytes embedded in one unit of source ``name``: a pack per unit, so partitions running
    at once never write the same file (an image repeated in two units is stored twice)."""
    return out / EXTRACTED / name / f"{part_name(unit_index)}.tar"


def _pair_items(src: PairSource, task: PrepareTask, pack: Path) -> Iterable[sources.Item]:
    ing, raw = task.ing, Path(task.raw)
    if isinstance(src, ManifestPairs):
        return sources.read_manifest(src, raw, ing.caption_filter, pack, task.unit)
    if isinstance(src, CocoPairs):
        return sources.read_coco(src, raw)
    if isinstance(src, KarpathyPairs):
        return sources.read_karpathy(src, raw)
    return sources.read_webdataset(src, raw, ing.caption_filter, pack, ing.s3, task.unit)


def _prepare_pairs(task: PrepareTask, sink: _Sink) -> dict[str, Any]:
    pack = extraction_pack(Path(task.out), task.name, task.unit_index)
    pack.unlink(missing_ok=True)  # written by a run of this partition that was cut short (no summary)
    for item in _pair_items(task.ing.pairs[task.source], task, pack):
        sink.add(item, task.name)
    return sink.close()


def _prepare_images(task: PrepareTask, sink: _Sink) -> dict[str, Any]:
    for item in sources.read_class_folders(task.ing.images[task.source], Path(task.raw)):
        sink.add(item, task.name)
    return sink.close()


def _prepare_text(task: PrepareTask, sink: _Sink) -> dict[str, Any]:
    name, passages = task.name, 0
    for doc_id, item in sources.read_text_documents(task.ing.text[task.source], Path(task.raw), task.unit):
        if item.reason is not None:
            sink.add(item, name)
            continue
        chunks = sources.split_passages(item.row["text"], task.ing.max_passage_words)
        if not chunks:
            sink.add(sources.Item(None, item.raw, "empty document"), name)
            continue
        sink.accepted += 1  # counted in documents; the manifest holds their passages
        sink.per_source.setdefault(name, Counter()).update({"in": 1, "accepted": 1})
        for n, text in enumerate(chunks):
            sink.accepted_f.write(dump_row({"key": sources.safe_key(f"{name}-{doc_id}-{n}"), "text": text,
                                            "source": name}) + "\n")
        passages += len(chunks)
    return {**sink.close(), "passages": passages}


_PREPARE_UNIT = {"pairs": _prepare_pairs, "images": _prepare_images, "text": _prepare_text}


def prepare_partition(task: PrepareTask) -> dict[str, Any]:
    """Read one unit: write its accepted rows and its rejects, then its summary (counts, reasons, per-source
    counts, first reasons, the fingerprint) last -- the summary marks the partition done."""
    paths = partition_paths(Path(task.out), task.corpus, task.index)
    doc = {**_PREPARE_UNIT[task.corpus](task, _Sink(paths["accepted"], paths["rejects"])),
           "fingerprint": task.fingerprint, "source": task.name, "unit": task.unit.path}
    write_json_atomic(paths["summary"], doc)
    return doc


def input_identity(path: str) -> str:
    """The identity of what ``path`` names, one line, the same on every clone and copy of the data (never a
    modification time: the partitions' summaries are stage outputs, byte-identical for the same data):

    - a file (a tar shard, parquet part, Arrow file, manifest, text file, class-name map): its name, size and
      SHA-256, since the rows prepare writes depend on its bytes. This reads each input once more per run, on the
      engine's workers (``_input_identities``; the digest streams, ~1 GB/s per core here; DVC hashes the same raw
      files for the stage's dependency);
    - a directory (a class-folder tree): the relative names and sizes of its files -- prepare's rows from it
      depend on the names only; validation reads the images;
    - an ``s3://`` URI: itself (an object replaced under the same key is not noticed: delete the partitions)."""
    if is_s3(path):
        return f"{path}\n"
    root = Path(path)
    if root.is_dir():
        return "".join(f"{file.relative_to(root)}\t{file.stat().st_size}\n"
                       for file in sorted(f for f in root.rglob("*") if f.is_file()))
    if not root.is_file():
        return f"{path}\tmissing\n"
    content = hashlib.sha256()
    with root.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            content.update(block)
    return f"{path}\t{root.stat().st_size}\t{content.hexdigest()}\n"


def _input_identities(paths: list[str], engine: Engine) -> dict[str, str]:
    """``input_identity`` of each distinct path, computed on ``engine`` (a corpus of many shards is not read byte
    by byte on the planning process's one core; the row ranges of one manifest share its file's)."""
    distinct = list(dict.fromkeys(paths))
    return dict(zip(distinct, engine.map(input_identity, distinct)))


def _unit_params(name: str, unit: sources.SourceUnit) -> list[Any]:
    """A unit as the fingerprint knows it; a row range also by where it starts and how many rows it holds (a whole
    file stays [name, path, first row], as before ranges existed)."""
    whole = [name, unit.path, unit.first_row]
    return whole if unit.rows is None else [*whole, unit.rows, unit.offset, unit.first_line]


def _corpus_fingerprint(corpus: str, ing: IngestConfig, units: list[tuple[str, sources.SourceUnit]], raw: Path,
                        out: Path, engine: Engine) -> str:
    """The inputs (each unit's files, a class-name map) and the params that shape the corpus's rows; ``units``:
    (source name, unit) in partition order."""
    srcs = getattr(ing, corpus)
    params = {"format": PARTITION_FORMAT, "corpus": corpus, "raw": str(raw), "out": str(out),
              "sources": [src.model_dump(mode="json") for src in srcs],
              "units": [_unit_params(name, unit) for name, unit in units]}
    if corpus == "pairs":
        params.update(caption_filter=ing.caption_filter.model_dump(mode="json"), s3=ing.s3.model_dump(mode="json"))
    if corpus == "text":
        params["max_passage_words"] = ing.max_passage_words
    maps = [str(raw / src.class_names) for src in srcs if isinstance(src, ClassFolderImages) and src.class_names]
    inputs = [unit.path for _, unit in units] + maps
    identities = _input_identities(inputs, engine)
    digest = hashlib.sha256(json.dumps(params, sort_keys=True).encode("utf-8"))
    for path in inputs:
        digest.update(identities[path].encode("utf-8", "surrogateescape"))
    return digest.hexdigest()


def _plan(corpus: str, ing: IngestConfig, raw: Path, out: Path, engine: Engine,
          rows_per_partition: int) -> tuple[list[PrepareTask], str]:
    """The corpus's partitions, one per unit of each source in order (a CSV/TSV/JSONL manifest's units are row
    ranges of ``rows_per_partition`` rows), and the corpus's fingerprint (its inputs hashed on ``engine``)."""
    srcs = getattr(ing, corpus)
    # (source position, source name, unit number within the source, unit)
    units = [(pos, name, n, unit) for pos, (src, name) in enumerate(zip(srcs, _names(corpus, srcs)))
             for n, unit in enumerate(sources.source_units(src, raw, ing.s3, rows_per_partition))]
    fingerprint = _corpus_fingerprint(corpus, ing, [(name, unit) for _, name, _, unit in units], raw, out, engine)
    return [PrepareTask(corpus, i, pos, name, unit, n, ing, str(raw), str(out), part_fingerprint(fingerprint, i))
            for i, (pos, name, n, unit) in enumerate(units)], fingerprint


def _prepare_corpus(corpus: str, ing: IngestConfig, raw: Path, out: Path, engine: Engine,
                    rows_per_partition: int) -> dict[str, Any]:
    """Prepare one corpus partition by partition on ``engine``; partitions already done with the same inputs and
    params are kept (a killed run resumes). Then the partitions' files are concatenated in order into the
    corpus's manifest and rejects, and their counts added up."""
    tasks, fingerprint = _plan(corpus, ing, raw, out, engine, rows_per_partition)
    parts_dir = out / PARTITIONS_DIR / corpus
    index = parts_dir / "index.json"
    if finished(index, fingerprint) is None:  # new inputs or params: start afresh
        stale = [parts_dir] + ([out / EXTRACTED / name for name in {t.name for t in tasks}] if corpus == "pairs"
                               else [])
        for path in stale:
            if path.exists():
                shutil.rmtree(path)
        parts_dir.mkdir(parents=True)
        write_json_atomic(index, {"fingerprint": fingerprint, "partitions": [
            {"name": part_name(t.index), "source": t.name, "unit": t.unit.path} for t in tasks]})
    else:  # resuming: drop what partitions cut short half-wrote (see partitions.temporary), packs included
        extracted = [out / EXTRACTED / name for name in {t.name for t in tasks}] if corpus == "pairs" else []
        for tmp in [p for d in [parts_dir, *extracted] for p in d.glob(".*.tmp")]:
            tmp.unlink()
    todo = [t for t in tasks if finished(partition_paths(out, corpus, t.index)["summary"], t.fingerprint) is None]
    if todo:
        log.info("prepare %s: %d of %d partitions to do on %s", corpus, len(todo), len(tasks), engine.name)
        engine.map(prepare_partition, todo)
    paths = [partition_paths(out, corpus, t.index) for t in tasks]
    concatenate_atomic([p["accepted"] for p in paths], out / f"{corpus}.jsonl")
    concatenate_atomic([p["rejects"] for p in paths], out / f"{corpus}.rejects.jsonl")
    summaries = [json.loads(p["summary"].read_text(encoding="utf-8")) for p in paths]
    metrics = _aggregate(summaries)
    if corpus == "images":
        metrics["num_labels"] = len({json.loads(line)["label"] for line in (out / "images.jsonl").open()})
    if corpus == "text":
        metrics.update(unit="documents", passages=sum(s["passages"] for s in summaries))
    return metrics


def _aggregate(summaries: list[dict[str, Any]]) -> dict[str, Any]:
    """A corpus's metrics from its partitions' counts, as one pass over all its sources would count them."""
    reasons: Counter[str] = Counter()
    per_source: dict[str, Counter[str]] = {}
    first_reasons: dict[str, list[str]] = {}
    for s in summaries:
        reasons.update(s["reasons"])
        for name, counts in s["sources"].items():
            per_source.setdefault(name, Counter()).update(counts)
        for name, texts in s["first_reasons"].items():
            kept = first_reasons.setdefault(name, [])
            kept.extend(texts[:FIRST_REASONS - len(kept)])
    accepted, rejected = sum(s["accepted"] for s in summaries), sum(s["rejected"] for s in summaries)
    total = accepted + rejected
    return {"in": total, "accepted": accepted, "rejected": rejected,
            "reject_rate": rejected / total if total else 0.0, "reasons": dict(sorted(reasons.items())),
            "sources": {k: dict(sorted(v.items())) for k, v in per_source.items()},
            "first_reasons": first_reasons}


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
def prepare(ing: IngestConfig, raw: str | Path, prepared: str | Path,
            engine: EngineConfig | None = None) -> dict[str, Any]:
    raw, out = Path(raw), Path(prepared)
    if not raw.is_dir():
        raise ValueError(f"raw data directory {raw} (paths.raw) does not exist: run `flava data generate` for the "
                         "synthetic world, or put real data there and point data.ingest at it")
    (out / EXTRACTED).mkdir(parents=True, exist_ok=True)  # a stage output (DVC), also when no source embeds bytes
    pair_names = set(_names("pairs", ing.pairs))
    for stale in (out / EXTRACTED).iterdir():  # extractions of sources no longer configured
        if stale.name in pair_names:
            continue
        if stale.is_dir():
            shutil.rmtree(stale)
        else:
            stale.unlink()
    engine = engine or EngineConfig()
    with open_engine(engine) as runner:
        metrics: dict[str, Any] = {corpus: _prepare_corpus(corpus, ing, raw, out, runner, engine.partition_rows)
                                   for corpus in CORPORA}
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
        result = prepare(cfg.data.ingest, cfg.paths.raw, cfg.paths.prepared, cfg.data.engine)
        run.log_metrics(json.loads((Path(cfg.paths.prepared) / "metrics.json").read_text(encoding="utf-8")))
    return result
