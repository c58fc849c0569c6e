"""``flava data shard``: validated manifests -> webdataset tar shards + an index, on local disk or S3.

Layout (``paths.shards`` may be ``s3://bucket/prefix``)::

    {root}/{corpus}/shard-000000.tar ...   samples: {key}.png|jpg (image), {key}.txt (text), {key}.json (metadata:
                                           the row but its text and validation's read fields; ``image`` is the
                                           source's reference, e.g. the raw file or webdataset member, not
                                           validation's pack)
                                           (a pair with several captions: {key}.captions.json, a JSON list,
                                           instead of {key}.txt; its image is stored once)
    {root}/{corpus}/index.json             num_samples, num_shards, per shard: name, samples, bytes, sha256
    {root}/metrics.json                    per corpus counts and bytes

A row's image is read where the validated manifest says it is: the source image itself (a path, an ``s3://``
object read with ``data.ingest.s3`` as validation read it, or a range of a tar) when validation kept it as it is,
or validation's pack member when it converted it. Its bytes must have the SHA-256 and size validation recorded
(``flava.data.packs.read_verified``): a source changed since validation stops the stage naming the row, the
reference and both hashes, never shards other bytes.

DVC tracks ``paths.shard_index``, a local directory. By default it is ``paths.shards`` itself (tars, index and
metrics, as above). When the shards are written elsewhere (``s3://``), it holds a copy of each corpus' index with
one more key, ``location`` (the URI of ``{root}/{corpus}``), and of ``metrics.json``: the stages downstream depend
on that index, which changes exactly when the shards' bytes do, and the loader reads the shards from ``location``
and checks each against its sha256.

The validated manifest is sharded in partitions of ``data.engine.partition_rows`` consecutive rows, on the engine
of ``data.engine`` (``flava.data.engine``: this process, a local Dask cluster or an existing scheduler); memory is
bounded by the partition (one streaming pass before them checks that no two keys become the same shard key).
Partition ``p`` writes its own shards, numbered on from the shards of the partitions before it (the count of each
is known from its rows: ``ceil(rows / samples_per_shard)``), so the names depend on the partitioning, never on the
engine; ``index.json`` lists the partitions' shards in partition order. Each partition's last shard may be short
(choose ``partition_rows`` a multiple of ``samples_per_shard`` to keep every shard but the corpus' last full).
Bookkeeping goes to ``{paths.shard_index}/partitions/{corpus}/`` (always local): ``index.json`` (the corpus'
fingerprint: validated manifest bytes, validate's own fingerprint when it left one, seed, shard params, root,
partition size) and per partition ``<n>.json``, written after its shards (their names, sizes and sha256, and the
partition's fingerprint). A killed run resumes at the partitions without a matching summary (or whose shards are
gone); new input or params start the corpus afresh.

Rows are shuffled with a generator seeded by ``(cfg.seed, corpus)`` before sharding (manifests are often ordered
by class or source; the loader only shuffles shard order and within a shard). A global shuffle needs the whole
corpus in memory, so with several partitions each partition is shuffled on its own, seeded by ``(cfg.seed,
corpus, partition)``: samples do not cross partitions, which the loader's shard permutation per epoch mixes. With
one partition (the default ``partition_rows`` is above the synthetic corpora) the order, and so every byte, is that
of a shuffle of the whole corpus. Tar headers are fixed (mtime 0, uid/gid 0, no user names, mode 0644), so the
same input, seed and partitioning give byte-identical shards and checksums. Every tar is built in a local
temporary file and then moved into place atomically (local root: temporary name + rename) or uploaded with boto3
(multipart above the threshold, retries on transient errors; see ``flava.data.storage``).
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import random
import re
import shutil
import tarfile
import tempfile
import time
from array import array
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

import numpy as np
from PIL import Image

from flava.data import storage
from flava.data.captions import CAPTIONS_FIELD, CAPTIONS_MEMBER, row_captions
from flava.data.engine import Engine, EngineConfig, open_engine
from flava.data.jsonl import read_jsonl
from flava.data.packs import (
    IMAGE_BYTES_FIELD,
    IMAGE_SHA256_FIELD,
    SOURCE_IMAGE_FIELD,
    fixed_member,
    make_ref,
    parse_ref,
    read_verified,
)
from flava.data.partitions import (
    PARTITIONS_DIR,
    ManifestPlan,
    RowRange,
    finished,
    iter_rows,
    part_fingerprint,
    part_name,
    plan_partitions,
    read_range,
    write_json_atomic,
)
from flava.data.stream_config import S3Config, ShardConfig
from flava.data.transforms import to_rgb
from flava.tracking.runs import stage_run

if TYPE_CHECKING:
    from flava.config import PipelineConfig

log = logging.getLogger(__name__)

CORPUS_KIND = {"pairs": "pair", "images": "image", "text": "text"}
SHARD_PATTERN = "shard-{:06d}.tar"
INDEX_NAME = "index.json"
SHARD_FIELDS = ("name", "samples", "bytes", "sha256")  # of a shard's entry in the index, in this order
_KEY_UNSAFE = re.compile(r"[^A-Za-z0-9_\-]")  # webdataset splits the extension at the first dot


@dataclass(frozen=True)
class Sample:
    """One sample as stored in a shard: ``files`` maps extension -> bytes."""

    key: str
    files: dict[str, bytes]


def shard_key(key: str) -> str:
    """A tar-safe sample key: no dots or slashes (webdataset groups files by the name before the first dot)."""
    safe = _KEY_UNSAFE.sub("_", str(key))
    if not safe:
        raise ValueError(f"empty sample key {key!r}")
    return safe


def _tar_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    tar.addfile(fixed_member(name, len(data)), io.BytesIO(data))  # fixed headers: byte-identical shards


def write_tar(samples: list[Sample], path: Path) -> None:
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for sample in samples:
            for ext in sorted(sample.files):
                _tar_member(tar, f"{sample.key}.{ext}", sample.files[ext])


_BLOCK = 512


def _tar_number(field: bytes) -> int:
    if field[:1] and field[0] & 0x80:  # GNU base-256 for large values
        return int.from_bytes(bytes([field[0] & 0x7F]) + field[1:], "big")
    digits = field.split(b"\0", 1)[0].strip()
    return int(digits, 8) if digits else 0


def _tar_entries(data: bytes) -> Iterator[tuple[str, bytes]]:
    """(name, payload) of the regular files of an in-memory tar, in order.

    A direct parser of the 512-byte ustar headers (with GNU long names and pax ``path``/``size`` records): the
    standard ``tarfile`` module spends more time parsing headers than decoding a small image does.
    """
    view = memoryview(data)
    pos, long_name, pax = 0, None, {}
    while pos + _BLOCK <= len(data):
        header = data[pos:pos + _BLOCK]
        if header.count(0) == _BLOCK:  # end-of-archive marker
            return
        expected = _tar_number(header[148:156])
        actual = sum(header) - sum(header[148:156]) + 8 * 32
        if expected != actual:
            raise ValueError(f"tar header checksum mismatch at byte {pos}: corrupt shard")
        size = int(pax.get("size", _tar_number(header[124:136])))
        kind = header[156:157]
        start = pos + _BLOCK
        payload = view[start:start + size]
        if len(payload) != size:
            raise ValueError(f"tar member at byte {pos} is truncated ({len(payload)} of {size} bytes)")
        pos = start + (size + _BLOCK - 1) // _BLOCK * _BLOCK
        if kind == b"L":  # GNU long name for the next member
            long_name = bytes(payload).rstrip(b"\0").decode("utf-8")
            continue
        if kind == b"x":  # pax extended header for the next member
            pax = {}
            text = bytes(payload).decode("utf-8")
            while text:
                length, _, rest = text.partition(" ")
                record = text[len(length) + 1:int(length) - 1]
                key, _, value = record.partition("=")
                pax[key] = value
                text = text[int(length):]
            continue
        if kind == b"g":
            continue
        name = long_name or pax.get("path")
        if name is None:
            name = header[0:100].split(b"\0", 1)[0].decode("utf-8")
            prefix = header[345:500].split(b"\0", 1)[0] if header[257:262] == b"ustar" else b""
            if prefix:
                name = prefix.decode("utf-8") + "/" + name
        long_name, pax = None, {}
        if kind in (b"0", b"\0", b"7"):
            yield name, bytes(payload)
    raise ValueError("tar archive ends without its end-of-archive marker: truncated shard")


def read_tar(data: bytes) -> list[Sample]:
    """Samples of a webdataset tar, in file order (consecutive files with the same key form one sample)."""
    samples: list[Sample] = []
    for name, payload in _tar_entries(data):
        base = name.rsplit("/", 1)[-1]
        key, dot, ext = base.partition(".")
        if not dot:
            raise ValueError(f"tar member {name!r} has no extension")
        if samples and samples[-1].key == key:
            samples[-1].files[ext] = payload
        else:
            samples.append(Sample(key, {ext: payload}))
    return samples


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def read_manifest(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        raise FileNotFoundError(f"validated manifest {path} not found (run `flava data validate` first)")
    rows = read_jsonl(path)
    for lineno, row in enumerate(rows, 1):
        if "key" not in row:
            raise ValueError(f"{path}: row {lineno} has no 'key'")
    return rows


def resolve_image(image: str, manifest_dir: Path) -> str:
    """Image reference -> readable reference (``flava.data.packs``): s3:// and absolute paths as they are;
    relative ones from the working directory, else from the manifest's directory. A range of a tar
    (``<tar>#<offset>+<size>``) resolves its tar the same way."""
    ranged = parse_ref(image)
    uri = ranged.uri if ranged else image
    if not (storage.is_s3(uri) or Path(uri).is_absolute() or Path(uri).exists()):
        uri = str(manifest_dir / uri)
    return make_ref(uri, ranged.offset, ranged.size) if ranged else uri


def read_row_image(row: dict[str, Any], manifest_dir: Path, s3: S3Config | None) -> tuple[str, bytes]:
    """(resolved reference, bytes) of a validated row's ``image``: read where it is (a source image validation
    kept as it is, or a member of validation's pack) with ``s3`` -- validation's S3 settings, ``data.ingest.s3``
    -- and checked against the SHA-256 and size validation recorded (``ChangedImageError`` when they differ)."""
    uri = resolve_image(str(row["image"]), manifest_dir)
    size = row.get(IMAGE_BYTES_FIELD)
    return uri, read_verified(uri, s3, sha256=row.get(IMAGE_SHA256_FIELD), size=None if size is None else int(size),
                              key=str(row["key"]))


def encode_image(data: bytes, cfg: ShardConfig, where: str) -> tuple[str, bytes]:
    """Image file bytes -> (extension, bytes to store), per ``image_format`` and ``max_image_side``."""
    try:
        img = Image.open(io.BytesIO(data))
        fmt = img.format
        img.load()
    except Exception as err:  # PIL raises several unrelated types for bad files
        raise ValueError(f"cannot decode image {where}: {err}") from err
    too_big = cfg.max_image_side is not None and max(img.size) > cfg.max_image_side
    target = cfg.image_format
    if target == "source":
        if fmt in ("PNG", "JPEG") and not too_big:
            return ("png" if fmt == "PNG" else "jpg"), data
        target = "jpg" if fmt == "JPEG" else "png"
    rgb = to_rgb(img)
    if too_big:
        scale = cfg.max_image_side / max(rgb.size)
        rgb = rgb.resize((max(1, round(rgb.width * scale)), max(1, round(rgb.height * scale))), Image.BICUBIC)
    out = io.BytesIO()
    if target == "png":
        rgb.save(out, format="PNG")
    else:
        rgb.save(out, format="JPEG", quality=cfg.jpeg_quality)
    return target, out.getvalue()


# Fields of a validated row that say where its image is and how validation saw it, not what the sample is: a
# sample's json names the source reference as its ``image`` and leaves these out.
_READ_FIELDS = ("text", "caption", CAPTIONS_FIELD, SOURCE_IMAGE_FIELD, IMAGE_SHA256_FIELD, IMAGE_BYTES_FIELD)


def build_samples(
    rows: list[dict[str, Any]], corpus: str, manifest_dir: Path, cfg: ShardConfig, images_s3: S3Config | None = None
) -> Iterator[Sample]:
    """The samples of validated ``rows``; images read with ``images_s3`` (see ``read_row_image``)."""
    seen: dict[str, str] = {}
    for row in rows:
        key = shard_key(row["key"])
        if key in seen:
            raise ValueError(f"{corpus}: keys {seen[key]!r} and {row['key']!r} collide as shard key {key!r}")
        seen[key] = row["key"]
        files: dict[str, bytes] = {}
        meta = {k: v for k, v in row.items() if k not in _READ_FIELDS}
        if SOURCE_IMAGE_FIELD in row:  # where the image came from; the validation pack's offset means nothing here
            meta["image"] = row[SOURCE_IMAGE_FIELD]
        if corpus in ("pairs", "images"):
            if not row.get("image"):
                raise ValueError(f"{corpus}: row {row['key']!r} has no 'image'")
            uri, data = read_row_image(row, manifest_dir, images_s3)
            ext, data = encode_image(data, cfg, f"{uri} (row {row['key']!r})")
            files[ext] = data
        captions = row_captions(row) if corpus == "pairs" else None
        if captions is not None:
            if not captions or any(not isinstance(c, str) or not c.strip() for c in captions):
                raise ValueError(f"{corpus}: row {row['key']!r} needs a non-empty list of non-empty captions")
            files[CAPTIONS_MEMBER] = json.dumps(captions, ensure_ascii=False).encode("utf-8")
        elif corpus in ("pairs", "text"):
            text = row.get("text", row.get("caption"))
            if not isinstance(text, str) or not text.strip():
                raise ValueError(f"{corpus}: row {row['key']!r} has no text")
            files["txt"] = text.encode("utf-8")
        files["json"] = json.dumps(meta, sort_keys=True, ensure_ascii=False).encode("utf-8")
        yield Sample(key, files)


# Bump when the partition summaries or the shards change meaning, so a resumed run never reuses another format's.
PARTITION_FORMAT = 2  # 2: a sample's json names the image's source reference, not validation's copy


@dataclass(frozen=True)
class ShardTask:
    """One partition's work: everything ``shard_partition`` needs, picklable for a Dask worker."""

    corpus: str
    manifest: str  # the validated manifest
    root: str  # paths.shards (local or s3://)
    part: RowRange
    first_shard: int  # number of its first shard: the partitions before it wrote the shards below
    shuffle_seed: str
    fingerprint: str  # of the corpus' input, params and partitioning, and this range
    summary: str  # written last: the partition is done when it exists with ``fingerprint``
    cfg: ShardConfig
    images_s3: S3Config | None = None  # how the rows' images are read: validation's S3 settings (data.ingest.s3)


def shard_partition(task: ShardTask) -> dict[str, Any]:
    """Shard one row range: shuffle it, write its shards (each atomically), then its summary."""
    rows = read_range(task.manifest, task.part)
    random.Random(task.shuffle_seed).shuffle(rows)
    out = storage.join(task.root, task.corpus)
    shards = []
    samples = build_samples(rows, task.corpus, Path(task.manifest).parent, task.cfg, task.images_s3)
    with tempfile.TemporaryDirectory(prefix="flava-shard-") as tmp:
        batch: list[Sample] = []
        for sample in samples:
            batch.append(sample)
            if len(batch) == task.cfg.samples_per_shard:
                shards.append(_flush(batch, task.first_shard + len(shards), Path(tmp), out, task.cfg))
                batch = []
        if batch:
            shards.append(_flush(batch, task.first_shard + len(shards), Path(tmp), out, task.cfg))
    doc = {"fingerprint": task.fingerprint, "start": task.part.start, "rows": task.part.rows, "shards": shards}
    write_json_atomic(Path(task.summary), doc)
    return doc


def shuffle_seed(seed: int, corpus: str, partition: int, partitions: int) -> str:
    """Seed of a partition's shuffle: that of the whole corpus when it is the only one."""
    return f"{seed}:{corpus}" if partitions == 1 else f"{seed}:{corpus}:{partition}"


def check_keys(manifest: Path, corpus: str) -> None:
    """Every row has a key and no two keys become the same shard key, over the whole manifest in one streaming pass
    (8 bytes per row, the shard keys' hashes; a second pass compares the exact keys of the hashes that recur)."""
    hashes = array("q")
    for n, row in enumerate(iter_rows(manifest), 1):
        if "key" not in row:
            raise ValueError(f"{manifest}: row {n} has no 'key'")
        hashes.append(hash(shard_key(row["key"])))
    uniq, counts = np.unique(np.frombuffer(hashes, dtype=np.int64), return_counts=True)
    recurring = set(uniq[counts > 1].tolist())
    if not recurring:
        return
    seen: dict[str, str] = {}
    for row in iter_rows(manifest):
        key = shard_key(row["key"])
        if hash(key) in recurring:
            if key in seen:
                raise ValueError(f"{corpus}: keys {seen[key]!r} and {row['key']!r} collide as shard key {key!r}")
            seen[key] = row["key"]


def _upstream(manifest: Path, corpus: str) -> str | None:
    """Validate's fingerprint of the corpus (its manifest and params), when it left one: validated images rewritten
    under the same names (e.g. another JPEG quality) leave the validated manifest's bytes as they were."""
    index = manifest.parent / PARTITIONS_DIR / corpus / "index.json"
    return json.loads(index.read_text(encoding="utf-8")).get("fingerprint") if index.is_file() else None


def _corpus_fingerprint(plan: ManifestPlan, manifest: Path, corpus: str, cfg: ShardConfig, seed: int, root: str,
                        partition_rows: int) -> str:
    doc = {"format": PARTITION_FORMAT, "corpus": corpus, "manifest": plan.sha256,
           "validated": _upstream(manifest, corpus), "seed": seed, "root": root, "partition_rows": partition_rows,
           "shards": cfg.model_dump(mode="json", exclude={"corpora", "s3"})}
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode("utf-8")).hexdigest()


def write_corpus(manifest: Path, corpus: str, root: str, cfg: ShardConfig, seed: int, *, engine: Engine | None = None,
                 partition_rows: int | None = None, state: Path | None = None,
                 images_s3: S3Config | None = None) -> dict[str, Any]:
    """Shard the validated manifest of one corpus under ``{root}/{corpus}/``, partition by partition on ``engine``
    (default: this process; ``partition_rows`` default: ``data.engine``'s), and write its index. Partitions already
    done with the same input and params are kept (a killed run resumes). ``state``: the partitions' bookkeeping
    (default ``{root}/partitions/{corpus}``; required when ``root`` is on S3). ``images_s3``: how the rows' images
    are read (validation's ``data.ingest.s3``). Returns the index."""
    manifest = Path(manifest)
    if not manifest.is_file():
        raise FileNotFoundError(f"validated manifest {manifest} not found (run `flava data validate` first)")
    engine = engine or Engine()
    partition_rows = partition_rows or EngineConfig().partition_rows
    if state is None:
        if storage.is_s3(root):
            raise ValueError(f"shards on S3 ({root}) need a local directory for their partitions' bookkeeping")
        state = Path(root) / PARTITIONS_DIR / corpus
    plan = plan_partitions(manifest, partition_rows)
    if plan.rows == 0:
        raise ValueError(f"{corpus}: the validated manifest has no rows to shard")
    check_keys(manifest, corpus)
    fingerprint = _corpus_fingerprint(plan, manifest, corpus, cfg, seed, root, partition_rows)
    out = storage.join(root, corpus)
    local = None if storage.is_s3(out) else Path(out)
    if finished(state / INDEX_NAME, fingerprint) is None:  # new input or params: start afresh
        shutil.rmtree(state, ignore_errors=True)
        if local is not None and local.is_dir():
            for stale in local.glob("shard-*.tar"):  # a previous run may have written more shards
                stale.unlink()
        state.mkdir(parents=True)
        write_json_atomic(state / INDEX_NAME, {"fingerprint": fingerprint, "rows": plan.rows,
                                               "partition_rows": partition_rows,
                                               "partitions": [part_name(p.index) for p in plan.partitions]})
    else:  # resuming: drop what the partitions that were cut short half-wrote
        for tmp in [*state.glob(".*.tmp"), *(local.glob(".shard-*") if local is not None else [])]:
            tmp.unlink()
    if local is not None:
        local.mkdir(parents=True, exist_ok=True)

    tasks, first = [], 0
    for p in plan.partitions:
        tasks.append(ShardTask(corpus, str(manifest), root, p, first,
                               shuffle_seed(seed, corpus, p.index, len(plan.partitions)),
                               part_fingerprint(fingerprint, p.index), str(state / f"{part_name(p.index)}.json"), cfg,
                               images_s3))
        first += -(-p.rows // cfg.samples_per_shard)
    todo = [t for t in tasks if not _partition_done(t, out)]
    if todo:
        log.info("shard %s: %d of %d partitions to do on %s", corpus, len(todo), len(tasks), engine.name)
        engine.map(shard_partition, todo)
    # the summaries' JSON has sorted keys: each entry back in the index's order of fields
    shards = [{field: entry[field] for field in SHARD_FIELDS}
              for t in tasks for entry in json.loads(Path(t.summary).read_text(encoding="utf-8"))["shards"]]
    index = {
        "corpus": corpus,
        "kind": CORPUS_KIND[corpus],
        "num_samples": sum(s["samples"] for s in shards),
        "num_shards": len(shards),
        "bytes": sum(s["bytes"] for s in shards),
        "shards": shards,
    }
    storage.write_bytes(storage.join(out, INDEX_NAME), json.dumps(index, indent=2).encode(), s3=cfg.s3)
    return index


def _partition_done(task: ShardTask, out: str) -> bool:
    """Its summary carries its fingerprint and the shards it lists are there."""
    doc = finished(Path(task.summary), task.fingerprint)
    return doc is not None and all(storage.exists(storage.join(out, s["name"]), s3=task.cfg.s3) for s in doc["shards"])


def _flush(batch: list[Sample], number: int, tmp: Path, out: str, cfg: ShardConfig) -> dict[str, Any]:
    name = SHARD_PATTERN.format(number)
    local = tmp / name
    write_tar(batch, local)
    entry = dict(zip(SHARD_FIELDS, (name, len(batch), local.stat().st_size, _sha256(local))))
    storage.upload_file(local, storage.join(out, name), s3=cfg.s3)
    local.unlink()
    return entry


def shard_location(index_dir: str, corpus: str, index: dict[str, Any]) -> str:
    """Where the shards of an index live: its ``location``, else next to the index."""
    return index.get("location") or storage.join(index_dir, corpus)


def load_index(root: str, corpus: str, *, s3=None) -> dict[str, Any]:
    """The index of ``{root}/{corpus}``; a readable error when the corpus was never sharded."""
    uri = storage.join(root, corpus, INDEX_NAME)
    try:
        index = json.loads(storage.read_bytes(uri, s3=s3))
    except FileNotFoundError as err:
        raise FileNotFoundError(f"no shard index at {uri} (run `flava data shard` first)") from err
    if index.get("num_samples", 0) <= 0 or not index.get("shards"):
        raise ValueError(f"shard index {uri} lists no samples")
    return index


def verify_shard(data: bytes, entry: dict[str, Any], where: str) -> None:
    """Check bytes and sha256 of a downloaded shard against its index entry."""
    if len(data) != entry["bytes"] or hashlib.sha256(data).hexdigest() != entry["sha256"]:
        raise ValueError(f"shard {where} does not match its index (size or sha256): corrupt or stale")


def run_shard(cfg: "PipelineConfig") -> dict[str, Any]:
    """Stage function: shard every configured corpus; returns (and writes) the metrics, which its MLflow run logs
    with each corpus' shard index."""
    sc = cfg.data.shards
    with stage_run(cfg, "shard") as run:
        metrics, seconds = _shard(cfg)
        run.log_metrics({**metrics, "seconds": seconds})
        for corpus in sc.corpora:
            run.log_dict(load_index(cfg.paths.shard_index, corpus), f"index/{corpus}.json")
    return metrics


def _shard(cfg: "PipelineConfig") -> tuple[dict[str, Any], dict[str, float]]:
    """-> (counts and bytes per corpus, written to ``metrics.json``; seconds per corpus, for MLflow only: a
    metrics file holds deterministic numbers)."""
    sc = cfg.data.shards
    validated = Path(cfg.paths.validated)
    root, index_dir = cfg.paths.shards, cfg.paths.shard_index
    elsewhere = storage.is_s3(root) or Path(root).resolve() != Path(index_dir).resolve()
    metrics: dict[str, Any] = {"root": root, "samples_per_shard": sc.samples_per_shard, "corpora": {}}
    seconds: dict[str, float] = {}
    with open_engine(cfg.data.engine) as engine:
        for corpus in sc.corpora:
            start = time.perf_counter()
            index = write_corpus(validated / f"{corpus}.jsonl", corpus, root, sc, cfg.seed, engine=engine,
                                 partition_rows=cfg.data.engine.partition_rows,
                                 state=Path(index_dir) / PARTITIONS_DIR / corpus, images_s3=cfg.data.ingest.s3)
            if elsewhere:
                _write_local_index(index, storage.join(root, corpus), Path(index_dir) / corpus)
            metrics["corpora"][corpus] = {
                "num_samples": index["num_samples"], "num_shards": index["num_shards"], "bytes": index["bytes"],
            }
            seconds[corpus] = round(time.perf_counter() - start, 3)
            log.info("sharded %s: %d samples in %d shards", corpus, index["num_samples"], index["num_shards"])
    blob = json.dumps(metrics, indent=2).encode()
    storage.write_bytes(storage.join(root, "metrics.json"), blob, s3=sc.s3)
    if elsewhere:
        storage.write_bytes(str(Path(index_dir) / "metrics.json"), blob)
    return metrics, seconds


def _write_local_index(index: dict[str, Any], location: str, out: Path) -> None:
    """The index DVC tracks when the shards live elsewhere: the index plus their location. Shards an earlier run
    wrote here (``paths.shards`` was this directory then) go: the directory holds what its index lists."""
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob("shard-*.tar"):
        stale.unlink()
    storage.write_bytes(str(out / INDEX_NAME), json.dumps({**index, "location": location}, indent=2).encode())
