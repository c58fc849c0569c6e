"""The Optuna sweep of the joint stage: 2 local workers vs 1, and pruning on vs off, side by side in one run.

Each trial is the real joint stage (``flava.train.stages.run_pretrain``) of the ``tiny`` model preset on a
small generated world (made here, with its unimodal encoders), so what is measured is the sweep machinery around
real, short trials: worker processes sharing one SQLite study, heartbeats, the budget, the pruner.

1. Workers: the same seeded ``--trials``-trial study (pruning off) with 1 worker and with 2 worker processes, one
   intra-op thread per worker. Reports wall time, the ratio, the set of completed trial numbers and whether any
   params were drawn twice.
2. Pruning: the same seeded study with 1 worker, median pruner vs none, the pruner told each evaluation's
   zero-shot top-1 or its mean reciprocal rank (``launch.sweep.prune_metric``). Reports the trial-steps spent (sum
   of each trial's last evaluated step) and the best value found.

    python benchmarks/sweep.py                 # 6 trials of 1200 joint steps, evaluations every 200 steps (~6 min)
    python benchmarks/sweep.py --trials 8 --steps 480 --eval-every 80
    python benchmarks/sweep.py --only pruning      # the pruning arms alone (they measure steps, not time)

Trials must be long next to a worker process's start (importing torch and MLflow: several seconds), or the
2-worker ratio measures process start-up rather than the sweep.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # one bar per model load buries the table

import optuna
import torch

from benchmarks.common import table
from flava.config import PipelineConfig
from flava.data.fit import run_fit
from flava.data.ingest import run_prepare
from flava.data.shards import run_shard
from flava.data.synthetic import run_generate
from flava.data.validate import run_validate
from flava.launch import sweep as sweeplib
from flava.launch.config import SweepConfig
from flava.train.stages import run_pretrain

DIRS = ("raw", "prepared", "validated", "shards", "artifacts", "models", "checkpoints", "reports")


def world(root: Path, val_per_class: int) -> PipelineConfig:
    """A tiny world with its fitted tokenizer/codebook and the text and image encoders the trials start from."""
    tree = {
        "paths": {name: str(root / name) for name in DIRS},
        "model": {"preset": "tiny"},
        "data": {
            "generate": {"pairs": 192, "images_per_class": 3, "text_passages": 96,
                         "zeroshot_per_class": {"train": 1, "val": val_per_class, "test": 1}, "retrieval_images": 6,
                         "text_cls": {"train": 6, "val": 6, "test": 6}, "vqa": {"train": 6, "val": 6, "test": 6}},
            "codebook": {"num_codes": 16, "iters": 3, "sample_images": 32},
            "tokenizer": {"vocab_size": 200, "max_length": 16},
        },
        "train": {"text": {"steps": 20, "batch_size": 8}, "image": {"steps": 20, "batch_size": 8},
                  "joint": {"steps": 24, "batch_size": 8}, "log_every": 6, "checkpoint_every": 1000,
                  "eval_batch_size": 32},
        # artifacts under root too, not ./mlruns in the caller's directory
        "tracking": {"tracking_uri": f"sqlite:///{root}/mlflow.db", "artifact_location": str(root / "mlruns"),
                     "log_system_metrics": False},
    }
    cfg = PipelineConfig.model_validate(tree)
    for stage in (run_generate, run_prepare, run_validate, run_shard, run_fit):
        stage(cfg)
    for stage in ("text", "image"):
        run_pretrain(cfg, stage)
    return cfg


def sweep_once(cfg: PipelineConfig, root: Path, name: str, args, *, workers: int, pruner: str,
               prune_metric: str = "mrr") -> dict[str, Any]:
    sweep = SweepConfig(
        study_name=name, storage=str(root / "studies" / f"{name}.db"), workdir=str(root / "studies"),
        n_trials=args.trials, seed=args.seed, n_startup_trials=3, pruner=pruner, prune_after_steps=args.eval_every,
        prune_startup_trials=2, prune_metric=prune_metric, heartbeat_s=5, report=f"{name}.json",
        trial_overrides=[f"train.joint.steps={args.steps}", f"train.eval_every={args.eval_every}"],
    )
    start = time.perf_counter()
    out = sweeplib.run_sweep(cfg, sweep=sweep, workers=workers)
    wall = time.perf_counter() - start
    trials = sweeplib.open_study(sweep).get_trials(deepcopy=False)
    complete = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    draws = [json.dumps(t.params, sort_keys=True) for t in trials if t.state.is_finished() and t.params
             and t.user_attrs.get("failure") != sweeplib.SURPLUS]
    return {"wall_s": wall, "complete": sorted(t.number for t in complete), "duplicates": len(draws) - len(set(draws)),
            "pruned": out["n_pruned"], "trial_steps": out["trial_steps"], "best": out["best_value"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=6)
    parser.add_argument("--steps", type=int, default=1200)
    parser.add_argument("--eval-every", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--val-per-class", type=int, default=6,
                        help="zero-shot val rows per class (24 classes; params.yaml generates 5)")
    parser.add_argument("--only", choices=("workers", "pruning"), default=None, help="run one comparison only")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    torch.set_num_threads(1)  # the 1-worker run gets the same one thread per worker as each of the 2 workers
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        cfg = world(root, args.val_per_class)
        runs = {"1 worker": sweep_once(cfg, root, "one-worker", args, workers=1, pruner="none")}
        if args.only != "pruning":
            runs["2 workers"] = sweep_once(cfg, root, "two-workers", args, workers=2, pruner="none")
        if args.only != "workers":
            for metric in ("top1", "mrr"):
                runs[f"1 worker, median pruner on {metric}"] = sweep_once(
                    cfg, root, f"pruned-{metric}", args, workers=1, pruner="median", prune_metric=metric)
    rows = [[name, f"{r['wall_s']:.1f}", str(r["complete"]), str(r["duplicates"]), str(r["pruned"]),
             str(r["trial_steps"]), f"{r['best']:.4f}"] for name, r in runs.items()]
    print(table(["run", "wall s", "completed trials", "dup. params", "pruned", "trial-steps", "best"], rows))
    one = runs["1 worker"]
    if "2 workers" in runs:
        two = runs["2 workers"]
        print(f"2 workers vs 1: {one['wall_s'] / two['wall_s']:.2f}x faster; same completed trial numbers: "
              f"{one['complete'] == two['complete']}")
    for name, r in runs.items():
        if "pruner" in name:
            print(f"{name}: {1 - r['trial_steps'] / one['trial_steps']:.0%} fewer trial-steps, best "
                  f"{r['best']:.4f} vs {one['best']:.4f} without")


if __name__ == "__main__":
    main()
