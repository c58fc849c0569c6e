"""Does the recipe learn its world? Learning curves of the ``small`` preset and the paper's ablations, on CPU.

The synthetic world of ``params.yaml`` (generated, prepared, validated, sharded and fitted once, in a work
directory) trains the ``small`` model preset with the ``small`` train recipe, through the real stage functions
(``flava.train.stages.run_pretrain``: unimodal text and image stages, then the joint stage). The joint stage
checkpoints every ``--eval-every`` steps; each checkpoint is then evaluated with ``flava.eval.run.evaluate_model``
on the eval sets (zero-shot classification on ``eval.zeroshot.split``, linear probe, retrieval; the fine-tuning
tasks are off), so the curves come from the same code as ``flava evaluate``:

- zero-shot top-1, linear-probe accuracy, retrieval R@1 (mean of image->text and text->image);
- zero-shot accuracy per attribute (``flava.eval.attributes``): colour and shape (does the predicted class have
  the right one), top-1 by object count and by size.

Arms (``--arms``, each a set of config overrides on top of ``params.yaml``), after the FLAVA paper's ablations:

- ``full``: all objectives, unimodal corpora mixed in (``data.mixing.ratios``), joint from the unimodal encoders;
- ``scratch``: the same, joint from scratch (``train.joint.init_from_unimodal: false``);
- ``contrastive``: contrastive loss only (the CLIP-style ablation), pairs only (unimodal batches would carry no
  loss), joint from the unimodal encoders;
- ``no_mmm_itm``: without the multimodal objectives (MMM image/text, ITM weights 0);
- ``pairs_only``: all objectives on image-text pairs only (no unimodal corpora mixed in).

Each arm runs for every seed (``--seeds`` from ``--first-seed``: model init and data order; the world is the same), and
the closing table gives each arm's last evaluation as mean +- sample standard deviation over the seeds. Curves
are written as ``curves.png`` and everything as ``results.json`` in ``--out``.

    python benchmarks/learning.py                                  # every arm, 2 seeds, 1200 joint steps
    python benchmarks/learning.py --steps 20 --seeds 1 --arms full --unimodal-steps 10 --eval-every 10  # smoke
    python benchmarks/learning.py --arms full --set model.overrides.image.patch_size=4  # any params override
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from benchmarks.common import table  # noqa: E402
from flava.config import PipelineConfig, load_config, parse_override  # noqa: E402
from flava.data.fit import run_fit  # noqa: E402
from flava.data.ingest import run_prepare  # noqa: E402
from flava.data.shards import run_shard  # noqa: E402
from flava.data.synthetic import run_generate  # noqa: E402
from flava.data.tokenizer import load_tokenizer  # noqa: E402
from flava.data.transforms import transform_from_config  # noqa: E402
from flava.data.validate import run_validate  # noqa: E402
from flava.eval.run import evaluate_model  # noqa: E402
from flava.model.io import load_model  # noqa: E402
from flava.train.checkpoint import Checkpointer  # noqa: E402
from flava.train.stages import run_pretrain  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DATA_DIRS = ("raw", "prepared", "validated", "shards", "artifacts")
RUN_DIRS = ("models", "checkpoints", "reports")
NO_MULTIMODAL = {"mmm_image": 0.0, "mmm_text": 0.0, "itm": 0.0}
ARMS: dict[str, dict[str, Any]] = {
    "full": {},
    "scratch": {"train.joint.init_from_unimodal": False},
    "contrastive": {"model.overrides.loss": {"mim": 0.0, "mlm": 0.0, **NO_MULTIMODAL},
                    "data.mixing.ratios": {"pair": 1.0}},
    "no_mmm_itm": {"model.overrides.loss": NO_MULTIMODAL},
    "pairs_only": {"data.mixing.ratios": {"pair": 1.0}},
}
# The curves' columns: (name, title) in plot order.
CURVES = (("zeroshot_top1", "zero-shot top-1"), ("linear_probe", "linear probe"), ("retrieval_r1", "retrieval R@1"),
          ("colour", "colour (zero-shot)"), ("shape", "shape (zero-shot)"))


def config(root: Path, args: argparse.Namespace, run_dir: Path, seed: int | None,
           arm: dict[str, Any]) -> PipelineConfig:
    """params.yaml with the small preset, this benchmark's budget, and the data and run directories under root;
    ``seed`` None keeps params.yaml's (the world's)."""
    overrides: dict[str, Any] = {
        **{f"paths.{name}": str(root / "data" / name) for name in DATA_DIRS},
        "paths.shard_index": str(root / "data" / "shards"),  # the index beside the shards, not in the repo
        **{f"paths.{name}": str(run_dir / name) for name in RUN_DIRS},
        **({} if seed is None else {"seed": seed}),
        "model.preset": "small",
        "train.preset": "small",
        "train.device": "cpu",
        "train.joint.steps": args.steps,
        "train.eval_every": args.eval_every,
        "train.checkpoint_every": args.eval_every,
        "train.keep_last": args.steps // args.eval_every + 1,  # every evaluated checkpoint stays for the curves
        "eval.device": "cpu",
        "eval.text_finetune.enabled": False,
        "eval.multimodal_finetune.enabled": False,
        "tracking.tracking_uri": f"sqlite:///{root}/mlflow.db",
        "tracking.artifact_location": str(root / "mlruns"),  # not ./mlruns in the caller's directory
        "tracking.log_system_metrics": False,
        **args.set,  # under the arm's overrides: an arm's ablation keys win
        **arm,
    }
    if args.unimodal_steps is not None:
        overrides.update({"train.text.steps": args.unimodal_steps, "train.image.steps": args.unimodal_steps})
    return load_config(REPO / "params.yaml", overrides)


def make_world(cfg: PipelineConfig) -> float:
    """The data stages, once: the same world for every arm and seed. Returns the seconds taken."""
    start = time.perf_counter()
    for stage in (run_generate, run_prepare, run_validate, run_shard, run_fit):
        stage(cfg)
    return time.perf_counter() - start


def evaluate_checkpoints(cfg: PipelineConfig, joint: dict[str, Any]) -> list[dict[str, Any]]:
    """One row of curve values per kept joint checkpoint, in step order."""
    model = load_model(joint["model_dir"])
    tokenizer = load_tokenizer(Path(cfg.paths.artifacts) / "tokenizer")
    transform = transform_from_config(cfg, train=False)
    checkpoints = Checkpointer(Path(cfg.paths.checkpoints) / "joint", keep_last=cfg.train.keep_last)
    rows = []
    for step in checkpoints.steps():
        model.load_state_dict(checkpoints.weights(step))
        metrics, _ = evaluate_model(model, tokenizer, Path(cfg.paths.prepared) / "eval", cfg.eval,
                                    transform=transform, device="cpu", max_length=cfg.data.tokenizer.max_length,
                                    seed=cfg.seed)
        row = {"step": step, "zeroshot_top1": metrics["zeroshot"]["top1"],
               "linear_probe": metrics["linear_probe"]["accuracy"],
               "retrieval_r1": (metrics["retrieval"]["i2t_r1"] + metrics["retrieval"]["t2i_r1"]) / 2}
        attributes = metrics["zeroshot"].get("attributes", {})
        for name in ("colour", "shape"):
            if name in attributes:
                row[name] = attributes[name]["accuracy"]
        for name in ("count", "size"):
            for value, accuracy in attributes.get(name, {}).get("top1_by_value", {}).items():
                row[f"top1 {name}={value}"] = accuracy
        rows.append(row)
    return rows


def run_arm(root: Path, args: argparse.Namespace, name: str, seed: int) -> dict[str, Any]:
    run_dir = root / f"seed{seed}" / name
    cfg = config(root, args, run_dir, seed, ARMS[name])
    unimodal_s = 0.0  # the unimodal stages' seconds, when this run trained them (the first arm of a seed)
    if cfg.train.joint.init_from_unimodal:  # the unimodal encoders of this seed, trained once, copied in
        unimodal = root / f"seed{seed}" / "unimodal"
        if not (unimodal / "models").exists():
            ucfg = config(root, args, unimodal, seed, {})
            start = time.perf_counter()
            for stage in ("text", "image"):
                run_pretrain(ucfg, stage)
            unimodal_s = time.perf_counter() - start
        for stage in ("text", "image"):
            shutil.copytree(unimodal / "models" / stage, run_dir / "models" / stage, dirs_exist_ok=True)
    start = time.perf_counter()
    joint = run_pretrain(cfg, "joint")
    train_s = time.perf_counter() - start
    start = time.perf_counter()
    curve = evaluate_checkpoints(cfg, joint)
    return {"arm": name, "seed": seed, "unimodal_s": unimodal_s, "train_s": train_s,
            "eval_s": time.perf_counter() - start, "curve": curve}


def _spread(values: list[float]) -> str:
    if len(values) < 2:
        return f"{values[0]:.3f}" if values else "n/a"
    return f"{statistics.mean(values):.3f} +- {statistics.stdev(values):.3f}"


def summary_table(results: list[dict[str, Any]], arms: list[str]) -> str:
    """Each arm's last evaluation, mean +- sample std over seeds."""
    columns = [key for key, _ in CURVES]
    extra = sorted({k for r in results for k in r["curve"][-1] if k.startswith("top1 ")})
    rows = []
    for arm in arms:
        runs = [r for r in results if r["arm"] == arm]
        last = [r["curve"][-1] for r in runs]
        rows.append([arm, str(len(runs))] + [_spread([row[c] for row in last if c in row]) for c in columns + extra])
    return table(["arm", "seeds"] + columns + extra, rows)


def plot_curves(results: list[dict[str, Any]], arms: list[str], path: Path) -> Path:
    """One panel per curve, one line per arm (mean over seeds) with the seeds' range shaded."""
    fig, axes = plt.subplots(1, len(CURVES), figsize=(3.4 * len(CURVES), 3.2), sharey=True)
    for ax, (key, title) in zip(axes, CURVES):
        for arm in arms:
            curves = [r["curve"] for r in results if r["arm"] == arm]
            steps = [row["step"] for row in curves[0]]
            values = [[c[i].get(key, float("nan")) for c in curves] for i in range(len(steps))]
            (line,) = ax.plot(steps, [statistics.mean(v) for v in values], marker="o", markersize=3, label=arm)
            ax.fill_between(steps, [min(v) for v in values], [max(v) for v in values], color=line.get_color(),
                            alpha=0.15)
        ax.set_title(title, fontsize="medium")
        ax.set_xlabel("joint step")
        ax.set_ylim(0, 1)
    axes[0].set_ylabel("accuracy")
    axes[-1].legend(fontsize="small")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write_results(out: Path, settings: dict[str, Any], results: list[dict[str, Any]]) -> Path:
    """``results.json`` in ``out``: the settings and every finished run's curve."""
    path = out / "results.json"
    path.write_text(json.dumps({"settings": settings, "runs": results}, indent=2) + "\n")
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=1200, help="joint steps per run (the fixed budget)")
    parser.add_argument("--eval-every", type=int, default=200, help="joint steps between evaluated checkpoints")
    parser.add_argument("--unimodal-steps", type=int, default=None,
                        help="text and image stage steps (default: the small train preset's)")
    parser.add_argument("--seeds", type=int, default=2, help="seeds per arm: first-seed .. first-seed + n - 1")
    parser.add_argument("--first-seed", type=int, default=0,
                        help="the first seed (e.g. 1 to add a seed to an earlier run of seed 0)")
    parser.add_argument("--arms", default=",".join(ARMS), help=f"comma-separated, from {', '.join(ARMS)}")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch intra-op threads")
    parser.add_argument("--out", type=Path, default=None, help="results.json and curves.png (default: a temp dir)")
    parser.add_argument("--workdir", type=Path, default=None, help="world, models, checkpoints (default: temp)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a params.yaml override for the world and every arm (repeatable; the value is YAML), "
                             "e.g. --set model.overrides.image.patch_size=4")
    args = parser.parse_args()
    try:
        args.set = {".".join(path): value for path, value in map(parse_override, args.set)}
    except ValueError as err:
        parser.error(f"--set: {err}")
    arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    unknown = sorted(set(arms) - set(ARMS))
    if unknown or not arms:
        parser.error(f"--arms: unknown {unknown}; choose from {', '.join(ARMS)}")
    if args.steps % args.eval_every:
        parser.error(f"--steps {args.steps} must be a multiple of --eval-every {args.eval_every}")
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    out = args.out or Path(tempfile.mkdtemp(prefix="flava-learning-"))
    with tempfile.TemporaryDirectory(prefix="flava-learning-work-") as tmp:
        root = args.workdir or Path(tmp)
        world_s = make_world(config(root, args, root / "world", None, {}))
        meta = {"steps": args.steps, "eval_every": args.eval_every, "unimodal_steps": args.unimodal_steps,
                "seeds": args.seeds, "first_seed": args.first_seed, "threads": args.threads, "set": args.set,
                "world_s": world_s}
        out.mkdir(parents=True, exist_ok=True)
        results = []
        for seed in range(args.first_seed, args.first_seed + args.seeds):
            for arm in arms:
                results.append(run_arm(root, args, arm, seed))
                # after every run, so a benchmark stopped for time keeps the runs it finished
                write_results(out, {**meta, "finished_runs": len(results)}, results)
    for r in results:
        print(f"\n{r['arm']}, seed {r['seed']}: joint {args.steps} steps in {r['train_s']:.0f} s (unimodal stages "
              f"{r['unimodal_s']:.0f} s, evaluations {r['eval_s']:.0f} s)")
        keys = list(r["curve"][0])
        print(table(keys, [[f"{row[k]:.3f}" if isinstance(row[k], float) else str(row[k]) for k in keys]
                           for row in r["curve"]]))
    print(f"\nlast evaluation per arm ({args.steps} joint steps, {args.seeds} seed(s); mean +- std over seeds):")
    print(summary_table(results, arms))
    plot = plot_curves(results, arms, out / "curves.png")
    print(f"\nworld made in {world_s:.0f} s; curves: {plot}; results: {out / 'results.json'}")


if __name__ == "__main__":
    main()
