"""Data stages at photo size: images per CPU-second of prepare / validate / shard, the 1 -> 2 worker speed-up of
validate on a local Dask cluster, validate's peak RSS at two manifest sizes, and disk bytes per input byte.

Not a test. It generates its own corpus of real-size JPEGs (photo-like: smooth colour gradients, blobs and
sensor-like noise, so they compress like photos, not like flat test images) in a raw layout the default
``data.ingest`` reads (``pairs/captions.jsonl``), then runs the stage functions the CLI runs, each timed in this
process. CPU seconds are this process's plus its finished children's (the Dask workers of a local cluster count
once the cluster has shut down), so images per CPU-second compare across engines.

Peak RSS: validate runs in a fresh child process per manifest size, on manifests whose rows (distinct keys and
captions) reuse a few image files, so the row count, not the image decoding, is what grows.

    python benchmarks/data_stages.py                      # the measurement (see benchmarks/README.md)
    python benchmarks/data_stages.py --images 16 --rss-rows 200 2000 --min-side 256 --max-side 400   # smoke
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
from PIL import Image

from flava.config import PipelineConfig
from flava.data.engine import EngineConfig
from flava.data.ingest import dump_row, prepare
from flava.data.shards import _shard
from flava.data.validate import PARTITIONS_DIR, validate

CAPTION_WORDS = ("a", "photo", "of", "the", "red", "green", "blue", "house", "tree", "street", "cat", "sky", "at",
                 "night", "morning", "with", "two", "people", "near", "river")


def photo(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    """Photo-like pixels: a colour gradient, a few soft blobs and per-pixel noise (JPEG sizes like a photo's)."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    img = np.zeros((height, width, 3), np.float32)
    for c in range(3):
        slope_x, slope_y = rng.uniform(-0.15, 0.15, 2)
        img[..., c] = rng.uniform(40, 200) + slope_x * x + slope_y * y
    for _ in range(6):
        cx, cy, r = rng.uniform(0, width), rng.uniform(0, height), rng.uniform(0.05, 0.3) * min(width, height)
        blob = np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / (2 * r * r))
        img += blob[..., None] * rng.uniform(-80, 80, 3)
    img += rng.normal(0, 12, img.shape)
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8), "RGB")


def caption(rng: np.random.Generator) -> str:
    return " ".join(rng.choice(CAPTION_WORDS, size=int(rng.integers(5, 15))))


def make_corpus(raw: Path, n: int, min_side: int, max_side: int, seed: int) -> int:
    """``n`` JPEGs + ``pairs/captions.jsonl`` under ``raw``; returns the images' total bytes."""
    rng = np.random.default_rng(seed)
    images = raw / "pairs" / "images"
    images.mkdir(parents=True)
    total = 0
    with (raw / "pairs" / "captions.jsonl").open("w") as f:
        for i in range(n):
            w, h = (int(s) for s in rng.integers(min_side, max_side + 1, 2))
            path = images / f"photo-{i:06d}.jpg"
            photo(rng, w, h).save(path, format="JPEG", quality=90)
            total += path.stat().st_size
            f.write(dump_row({"key": f"photo-{i:06d}", "image": f"images/{path.name}", "caption": caption(rng)}) + "\n")
    return total


def config(root: Path, *, passthrough: bool = True, engine: dict[str, Any] | None = None) -> PipelineConfig:
    return PipelineConfig.model_validate({
        "paths": {k: str(root / k) for k in ("raw", "prepared", "validated", "shards")}
        | {"shard_index": str(root / "shards")},
        "data": {"ingest": {"images": [], "text": [], "eval_dir": None},
                 "validation": {"passthrough": passthrough}, "shards": {"corpora": ["pairs"]},
                 "engine": engine or {}},
    })


def cpu_seconds() -> float:
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def measure(fn: Callable[[], Any]) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process and its finished children) of ``fn()``."""
    wall, cpu = time.perf_counter(), cpu_seconds()
    fn()
    return time.perf_counter() - wall, cpu_seconds() - cpu


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.exists() else 0


def run_validate(cfg: PipelineConfig) -> None:
    validate(cfg.data.validation, cfg.data.ingest.s3, cfg.paths.prepared, cfg.paths.validated, cfg.data.engine)


def stages(root: Path, args) -> dict[str, Any]:
    """Prepare, validate (re-encoding, then passthrough), shard; then validate on 1 and 2 local Dask workers."""
    input_bytes = make_corpus(root / "raw", args.images, args.min_side, args.max_side, args.seed)
    n = args.images
    partition_rows = max(1, n // (4 * 2))  # several partitions per worker, so both workers stay busy
    out: dict[str, Any] = {"images": n, "input_bytes": input_bytes, "stages": {}}
    cfg = config(root)

    def record(name: str, wall: float, cpu: float) -> None:
        out["stages"][name] = {"wall_s": round(wall, 2), "cpu_s": round(cpu, 2),
                               "images_per_cpu_s": round(n / cpu, 2) if cpu else None}
        print(f"{name:32s} wall {wall:8.2f} s  cpu {cpu:8.2f} s  {n / cpu if cpu else 0:8.2f} images/CPU-s",
              flush=True)

    record("prepare", *measure(lambda: prepare(cfg.data.ingest, cfg.paths.raw, cfg.paths.prepared)))
    reencode = config(root, passthrough=False, engine={"partition_rows": partition_rows})
    record("validate (re-encode, serial)", *measure(lambda: run_validate(reencode)))
    passthrough = config(root, engine={"partition_rows": partition_rows})
    record("validate (passthrough, serial)", *measure(lambda: run_validate(passthrough)))
    record("shard", *measure(lambda: _shard(passthrough)))
    out["disk_bytes_per_input_byte"] = {
        name: round(dir_bytes(root / name) / input_bytes, 3) for name in ("raw", "prepared", "validated", "shards")}
    out["disk_bytes_per_input_byte"]["total"] = round(sum(out["disk_bytes_per_input_byte"].values()), 3)

    walls = {}
    for workers in (1, 2):
        cfg_w = config(root, passthrough=not args.reencode_speedup,
                       engine={"kind": "local", "workers": workers, "partition_rows": partition_rows})
        shutil.rmtree(Path(cfg_w.paths.validated, PARTITIONS_DIR), ignore_errors=True)  # no resume: redo them all
        walls[workers], cpu = measure(lambda: run_validate(cfg_w))
        record(f"validate (local dask, {workers} worker{'s' * (workers > 1)})", walls[workers], cpu)
    out["speedup_1_to_2_workers"] = round(walls[1] / walls[2], 3)
    print(f"validate speed-up 1 -> 2 workers: {out['speedup_1_to_2_workers']}x (wall)", flush=True)
    return out


def rss_child(prepared: str, validated: str, partition_rows: int) -> None:
    """Child process: validate ``prepared`` serially and print the peak RSS (the only output on stdout)."""
    cfg = config(Path(prepared).parent, engine={"partition_rows": partition_rows})
    validate(cfg.data.validation, cfg.data.ingest.s3, prepared, validated, cfg.data.engine)
    print(json.dumps({"max_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))


def peak_rss(root: Path, rows: int, args) -> int:
    """Peak RSS of validating a ``rows``-row manifest whose rows share ``args.rss_images`` image files."""
    base = root / f"rss-{rows}"
    prepared = base / "prepared"
    prepared.mkdir(parents=True)
    images = base / "images"
    images.mkdir()
    rng = np.random.default_rng(args.seed)
    paths = []
    for i in range(args.rss_images):
        paths.append(images / f"{i}.jpg")
        photo(rng, args.min_side, args.min_side).save(paths[-1], format="JPEG", quality=90)
    with (prepared / "pairs.jsonl").open("w") as f:
        for i in range(rows):
            f.write(dump_row({"key": f"row-{i:08d}", "image": str(paths[i % len(paths)]), "text": caption(rng)}) + "\n")
    for corpus in ("images", "text"):
        (prepared / f"{corpus}.jsonl").write_text("")
    done = subprocess.run([sys.executable, __file__, "--rss-child", str(prepared), str(base / "validated"),
                           str(args.partition_rows)], check=True, capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])["max_rss_bytes"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=1000, help="JPEGs in the generated corpus")
    parser.add_argument("--min-side", type=int, default=1024)
    parser.add_argument("--max-side", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rss-rows", type=int, nargs=2, default=[10_000, 100_000], metavar=("SMALL", "LARGE"))
    parser.add_argument("--rss-images", type=int, default=8, help="image files the RSS manifests' rows share")
    parser.add_argument("--partition-rows", type=int, default=EngineConfig().partition_rows,
                        help="data.engine.partition_rows of the RSS runs")
    parser.add_argument("--reencode-speedup", action="store_true",
                        help="measure the 1 -> 2 worker speed-up with re-encoding (passthrough off)")
    parser.add_argument("--workdir", help="keep the corpus and outputs here (default: a temporary directory)")
    parser.add_argument("--rss-child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rss_child:
        prepared, validated, partition_rows = args.rss_child
        rss_child(prepared, validated, int(partition_rows))
        return
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.workdir or tmp)
        root.mkdir(parents=True, exist_ok=True)
        print(f"machine: {os.cpu_count()} cores; corpus: {args.images} JPEGs of {args.min_side}-{args.max_side} px",
              flush=True)
        result = stages(root / "corpus", args)
        small, large = args.rss_rows
        rss = {rows: peak_rss(root, rows, args) for rows in (small, large)}
        result["peak_rss_mib"] = {str(rows): round(b / 2**20, 1) for rows, b in rss.items()}
        result["peak_rss_ratio"] = round(rss[large] / rss[small], 3)
        print(f"validate peak RSS: {small} rows {rss[small] / 2**20:.0f} MiB, {large} rows "
              f"{rss[large] / 2**20:.0f} MiB ({result['peak_rss_ratio']}x)", flush=True)
        print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
