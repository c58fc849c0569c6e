"""``flava data shard``: validated manifests -> webdataset tar shards + an index, on local disk or S3.

Layout (``paths.shards`` may be ``s3://bucket/prefix``)::

    {root}/{corpus}/shard-000000.tar ...   samples: {key}.png|jpg (image), {key}.txt (text), {key}.json (metadata)
                                           (a pair with several captions: {key}.captions.json, a JSON list,
                                           instead of {key}.txt; its image is stored once)
    {root}/{corpus}/index.json             num_samples, num_shards, per shard: name, samples, bytes, sha256
    {root}/metrics.json                    per corpus counts and bytes

DVC tracks ``paths.shard_index``, a local directory. By default it is ``paths.shards`` itself (tars, index and
metrics, as above). When the shards are written elsewhere (``s3://``), it holds a copy of each corpus' index with
one more key, ``location`` (the URI of ``{root}/{corpus}``), and of ``metrics.json``: the stages downstream depend
on that index, which changes exactly when the shards' bytes do, and the loader reads the shards from ``location``
and checks each against its sha256.

Rows are shuffled once with ``cfg.seed`` before sharding (manifests are often ordered by class or source; the
loader only shuffles shard order and within a shard). Tar headers are fixed (mtime 0, uid/gid 0, no user names,
mode 0644), so the same input and seed give byte-identical shards and checksums. Every tar is built in a local
temporary file and then moved into place (local root) or uploaded with boto3 (multipart above the threshold,
retries on transient errors; see ``flava.data.storage``).
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import random
import re
import tarfile
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

from PIL import Image

from flava.data import storage
from flava.data.captions import CAPTIONS_FIELD, CAPTIONS_MEMBER, row_captions
from flava.data.jsonl import read_jsonl
from flava.data.stream_config import ShardConfig
from flava.data.transforms import to_rgb
from flava.tracking.runs import stage_run

if TYPE_CHECKING:
    from flava.config import PipelineConfig

log = logging.getLogger(__name__)

CORPUS_KIND = {"pairs": "pair", "images": "image", "text": "text"}
SHARD_PATTERN = "shard-{:06d}.tar"
INDEX_NAME = "index.json"
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
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0  # fixed headers: byte-identical shards for the same input
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    tar.addfile(info, io.BytesIO(data))


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
    """Image reference -> readable URI: s3:// and absolute paths as they are; relative ones from the working
    directory, else from the manifest's directory."""
    if storage.is_s3(image) or Path(image).is_absolute() or Path(image).exists():
        return image
    return str(manifest_dir / image)


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


def build_samples(
    rows: list[dict[str, Any]], corpus: str, manifest_dir: Path, cfg: ShardConfig
) -> Iterator[Sample]:
    seen: dict[str, str] = {}
    for row in rows:
        key = shard_key(row["key"])
        if key in seen:
            raise ValueError(f"{corpus}: keys {seen[key]!r} and {row['key']!r} collide as shard key {key!r}")
        seen[key] = row["key"]
        files: dict[str, bytes] = {}
        meta = {k: v for k, v in row.items() if k not in ("text", "caption", CAPTIONS_FIELD)}
        if corpus in ("pairs", "images"):
            if not row.get("image"):
                raise ValueError(f"{corpus}: row {row['key']!r} has no 'image'")
            uri = resolve_image(str(row["image"]), manifest_dir)
            ext, data = encode_image(storage.read_bytes(uri, s3=cfg.s3), cfg, f"{uri} (row {row['key']!r})")
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


def write_corpus(rows: list[dict[str, Any]], corpus: str, manifest_dir: Path, root: str, cfg: ShardConfig,
                 seed: int) -> dict[str, Any]:
    """Shard one corpus under ``{root}/{corpus}/`` and write its index. Returns the index."""
    if not rows:
        raise ValueError(f"{corpus}: the validated manifest has no rows to shard")
    rows = list(rows)
    random.Random(f"{seed}:{corpus}").shuffle(rows)
    out = storage.join(root, corpus)
    if not storage.is_s3(out):
        Path(out).mkdir(parents=True, exist_ok=True)
        for stale in Path(out).glob("shard-*.tar"):  # a previous run may have written more shards
            stale.unlink()
    shards = []
    samples = build_samples(rows, corpus, manifest_dir, cfg)
    with tempfile.TemporaryDirectory(prefix="flava-shard-") as tmp:
        batch: list[Sample] = []
        for sample in samples:
            batch.append(sample)
            if len(batch) == cfg.samples_per_shard:
                shards.append(_flush(batch, len(shards), Path(tmp), out, cfg))
                batch = []
        if batch:
            shards.append(_flush(batch, len(shards), Path(tmp), out, cfg))
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


def _flush(batch: list[Sample], number: int, tmp: Path, out: str, cfg: ShardConfig) -> dict[str, Any]:
    name = SHARD_PATTERN.format(number)
    local = tmp / name
    write_tar(batch, local)
    entry = {"name": name, "samples": len(batch), "bytes": local.stat().st_size, "sha256": _sha256(local)}
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
    for corpus in sc.corpora:
        start = time.perf_counter()
        manifest = validated / f"{corpus}.jsonl"
        index = write_corpus(read_manifest(manifest), corpus, manifest.parent, root, sc, cfg.seed)
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
