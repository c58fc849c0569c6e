"""Shard loader vs a naive per-file loader: samples/s per CPU worker, side by side in one run.

Both loaders do the same per-sample work with the same code (decode, transform, BEiT block mask, tokenise,
BERT mask, collate into a ``pair`` batch, via ``flava.data.collate.Collator``); they differ only in how the bytes
arrive:
- shards: ``flava.data.loader.build_stream`` reading webdataset tars (one read per shard) written by
  ``flava.data.shards.run_shard``;
- naive: open every image file listed in the manifest, one read per sample.

Scenarios (each a fresh corpus in a temporary directory, one worker = this process with one torch thread):
- ``local``: the synthetic world's size (PNG at the model's resolution) on local disk;
- ``local-photos``: photo-sized JPEG sources (``--photo-size``), shards store them at the training resolution
  (``data.shards.max_image_side``), the naive loader decodes the originals;
- ``s3``: the ``local`` corpus behind an S3 endpoint (a moto server in a child process on loopback): one GET per
  shard vs one GET per image.

Rounds alternate which loader goes first; the table shows median samples/s and the shards/naive ratio.
Usage: ``python benchmarks/loader.py [--samples 512] [--batch-size 32] [--rounds 5] [--scenarios local,s3]``.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from flava.config import PipelineConfig  # noqa: E402
from flava.data import storage  # noqa: E402
from flava.data.loader import build_stream  # noqa: E402
from flava.data.shards import Sample, run_shard  # noqa: E402
from flava.data.stream_config import S3Config  # noqa: E402
from flava.data.tokenizer import fit_wordpiece  # noqa: E402

COLOURS = ["red", "green", "blue", "yellow", "purple", "orange"]
SHAPES = ["circle", "square"]


def draw_image(rng: random.Random, size: int) -> tuple[Image.Image, str]:
    """A few coloured shapes on a noisy background (noise keeps the compressed size realistic)."""
    arr = np.random.default_rng(rng.randrange(2**32)).integers(96, 160, (size, size, 3), dtype=np.uint8)
    img = Image.fromarray(arr)
    draw = ImageDraw.Draw(img)
    words = []
    for _ in range(2):
        colour, shape = rng.choice(COLOURS), rng.choice(SHAPES)
        x0, y0 = rng.randrange(size // 2), rng.randrange(size // 2)
        box = (x0, y0, x0 + size // 3, y0 + size // 3)
        fill = tuple(int(c) for c in np.random.default_rng(COLOURS.index(colour)).integers(0, 256, 3))
        (draw.ellipse if shape == "circle" else draw.rectangle)(box, fill=fill)
        words.append(f"a {colour} {shape}")
    return img, " and ".join(words) + " on a grey background"


def make_corpus(root: Path, n: int, size: int, fmt: str, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    (root / "images").mkdir(parents=True)
    rows = []
    for i in range(n):
        img, caption = draw_image(rng, size)
        path = root / "images" / f"{i:06d}.{fmt}"
        img.save(path, quality=90) if fmt == "jpg" else img.save(path)
        rows.append({"key": f"pair-{i:06d}", "image": str(path), "text": caption})
    return rows


def write_manifest(root: Path, rows: list[dict]) -> None:
    (root / "validated").mkdir(parents=True, exist_ok=True)
    (root / "validated" / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


class NaiveLoader:
    """Opens each manifest image file (local path or s3:// URI) per sample; same collation as the shards."""

    def __init__(self, rows: list[dict], collator, batch_size: int, s3):
        self.rows, self.collator, self.batch_size, self.s3 = rows, collator, batch_size, s3
        self.order: list[int] = []
        self.epoch = 0
        self.batch = 0

    def __next__(self) -> dict:
        samples = []
        while len(samples) < self.batch_size:
            if not self.order:
                self.order = list(range(len(self.rows)))
                random.Random(self.epoch).shuffle(self.order)
                self.epoch += 1
            row = self.rows[self.order.pop()]
            ext = Path(row["image"]).suffix.lstrip(".")
            files = {ext: storage.read_bytes(row["image"], s3=self.s3), "txt": row["text"].encode()}
            samples.append(Sample(row["key"], files))
        self.batch += 1
        return self.collator(samples, torch.Generator().manual_seed(self.batch))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_moto() -> tuple[subprocess.Popen, str]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    for _ in range(100):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.1).close()
            return proc, endpoint
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError("moto server did not start")


def run_scenario(name: str, args, tmp: Path) -> dict:
    base = tmp / name
    image_size = PipelineConfig.model_validate({"model": {"preset": args.preset}}).model.resolved.image.image_size
    photo = name == "local-photos"
    rows = make_corpus(base, args.samples, args.photo_size if photo else image_size, "jpg" if photo else "png")
    shards_root = str(base / "shards")
    s3 = {}
    proc = None
    if name == "s3":
        proc, endpoint = start_moto()
        for k, v in [("AWS_ACCESS_KEY_ID", "bench"), ("AWS_SECRET_ACCESS_KEY", "bench"),
                     ("AWS_DEFAULT_REGION", "us-east-1")]:
            os.environ.setdefault(k, v)
        s3 = {"endpoint_url": endpoint}
        s3_cfg = S3Config(**s3)
        storage.s3_client(s3_cfg).create_bucket(Bucket="bench")
        for row in rows:  # the naive loader then reads every image from the bucket
            uri = f"s3://bench/images/{Path(row['image']).name}"
            storage.upload_file(row["image"], uri, s3=s3_cfg)
            row["image"] = uri
        shards_root = "s3://bench/shards"
    try:
        write_manifest(base, rows)
        cfg = PipelineConfig.model_validate({
            "paths": {"validated": str(base / "validated"), "shards": shards_root},
            "model": {"preset": args.preset},
            "data": {"shards": {"corpora": ["pairs"], "samples_per_shard": args.samples_per_shard,
                                "max_image_side": image_size if photo else None, "s3": s3},
                     "tokenizer": {"max_length": args.max_length}},
        })
        run_shard(cfg)
        tok = fit_wordpiece([r["text"] for r in rows], 200, base / "tok")
        shards = build_stream(cfg, "pairs", batch_size=args.batch_size, rank=0, world_size=1, seed=0, tokenizer=tok)
        naive = NaiveLoader(rows, shards.dataset.collator, args.batch_size, cfg.data.shards.s3)
        loaders = {"shards": shards, "naive": naive}
        for loader in loaders.values():
            next(loader)  # warm-up: first shard read, tokenizer caches
        rates: dict[str, list[float]] = {k: [] for k in loaders}
        for r in range(args.rounds):
            names = list(loaders) if r % 2 == 0 else list(loaders)[::-1]
            for key in names:
                start = time.perf_counter()
                for _ in range(args.batches):
                    next(loaders[key])
                rates[key].append(args.batches * args.batch_size / (time.perf_counter() - start))
        med = {k: statistics.median(v) for k, v in rates.items()}
        return {"scenario": name, "shards": med["shards"], "naive": med["naive"],
                "ratio": med["shards"] / med["naive"], "rounds": rates}
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(timeout=10)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--samples", type=int, default=512)
    parser.add_argument("--samples-per-shard", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--batches", type=int, default=8, help="batches per loader per round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--preset", default="small")
    parser.add_argument("--max-length", type=int, default=32)
    parser.add_argument("--photo-size", type=int, default=384)
    parser.add_argument("--scenarios", default="local,local-photos,s3")
    parser.add_argument("--gpu-samples-per-s", type=float, default=None,
                        help="training throughput of one GPU (from benchmarks/train_step.py) to size workers")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # one CPU worker

    results = []
    with tempfile.TemporaryDirectory(prefix="flava-loader-bench-") as tmp:
        for name in args.scenarios.split(","):
            results.append(run_scenario(name.strip(), args, Path(tmp)))
    print(f"loader benchmark: {args.samples} pair samples, batch {args.batch_size}, preset {args.preset}, "
          f"1 worker (1 torch thread), median of {args.rounds} interleaved rounds")
    print(f"{'scenario':<14} {'shards samples/s':>17} {'naive samples/s':>16} {'ratio':>7}")
    for r in results:
        print(f"{r['scenario']:<14} {r['shards']:>17.1f} {r['naive']:>16.1f} {r['ratio']:>6.2f}x")
        if args.gpu_samples_per_s:
            print(f"{'':<14} workers per GPU at {args.gpu_samples_per_s:.0f} samples/s: "
                  f"{int(np.ceil(args.gpu_samples_per_s / r['shards']))}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
