"""How long the trainer's checkpoint save takes per model preset (what a SIGTERM must leave time for).

A preempted run finishes its step, then saves (``flava.train.checkpoint.Checkpointer.save``: full weights to
safetensors, AdamW state and scheduler to ``trainer.pt``, the rank file, ``meta.json``, atomic rename). This times
that save, for a model after one optimizer step (so AdamW's two moment buffers exist), into a local directory, and
prints seconds and bytes per preset. Size ``terminationGracePeriodSeconds`` (and torchrun's ``--shutdown-timeout``)
from: one step + this save + the process exit, with margin for the storage the pods really write to.

    .venv/bin/python benchmarks/checkpoint_save.py --presets tiny small base --rounds 3
"""
from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch

from flava.model import FlavaForPretraining
from flava.model.config import preset
from flava.train.checkpoint import Checkpointer
from flava.train.config import TrainConfig
from flava.train.optim import build_optimizer, build_scheduler


def measure(name: str, rounds: int, root: Path) -> dict[str, float]:
    model = FlavaForPretraining(preset(name))
    cfg = TrainConfig()
    optimizer = build_optimizer(model, cfg.optimizer, 1e-4, torch.device("cpu"))
    scheduler = build_scheduler(optimizer, cfg.schedule, total_steps=100, warmup_steps=10)
    for p in model.parameters():  # one update: the optimizer state a real checkpoint carries
        p.grad = torch.zeros_like(p)
    optimizer.step()
    scheduler.step()
    ckpt = Checkpointer(root / name, keep_last=1)
    times = []
    for step in range(1, rounds + 1):
        started = time.perf_counter()
        ckpt.save(step, model=model, optimizer=optimizer, scheduler=scheduler, data_state={"index": step},
                  extra={"step": step})
        times.append(time.perf_counter() - started)
    size = sum(f.stat().st_size for f in Path(ckpt.uri(rounds)).iterdir())
    params = sum(p.numel() for p in model.parameters())
    return {"params": params, "bytes": size, "median_s": statistics.median(times), "max_s": max(times)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", nargs="+", default=["tiny", "small", "base"])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--dir", default=None, help="where to write (default: a temporary directory)")
    args = parser.parse_args()
    root = Path(args.dir or tempfile.mkdtemp(prefix="flava-ckpt-bench-"))
    try:
        print("| preset | parameters | checkpoint size | median save s | max save s |")
        print("|---|---|---|---|---|")
        for name in args.presets:
            r = measure(name, args.rounds, root)
            print(f"| {name} | {r['params'] / 1e6:.1f} M | {r['bytes'] / 2**20:.0f} MiB | {r['median_s']:.2f} | "
                  f"{r['max_s']:.2f} |", flush=True)
    finally:
        if args.dir is None:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
