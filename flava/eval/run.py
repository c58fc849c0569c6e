"""The ``flava evaluate`` stage: every evaluation task on the joint model, one metrics JSON, plots and a report.

:func:`evaluate_model` runs the enabled tasks on a model already in memory and returns the metrics (plus what the
plots need); :func:`run_evaluate` loads ``paths.models/joint/best`` (tokenizer beside it), evaluates on
``paths.prepared/eval``, writes ``paths.reports/eval/`` and logs it all to an MLflow run (stage ``evaluate``).

``metrics.json`` layout (nested dicts of numbers, so ``dvc metrics diff`` compares it):
``{zeroshot: {top1, top5, attributes?}, retrieval: {i2t_r1, ..., mean_recall}, linear_probe: {accuracy, ...},
text_cls: {accuracy | pearson, ...}, vqa: {accuracy, ...}, tasks: {task: score}, chance: {task: baseline},
macro: {vision, language, multimodal, overall}}``, plus ``benchmarks: {name: {...} | {skipped: reason}}`` when
``eval.benchmarks`` configures any of the paper's benchmarks (:mod:`flava.eval.benchmarks`; not in the macros;
``dvc metrics show`` lists the skip notes as text).
"""
from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import mlflow
import torch
from PIL import Image

from flava.config import PipelineConfig, flatten
from flava.data.tokenizer import load_tokenizer
from flava.data.transforms import image_transform
from flava.eval import plots
from flava.eval.aggregate import macro_averages, majority_rate
from flava.eval.attributes import attribute_accuracy
from flava.eval.benchmarks import check_benchmark_paths, run_benchmarks
from flava.eval.config import EvalConfig
from flava.eval.context import EvalContext
from flava.eval.datasets import (
    load_closed_set,
    load_retrieval,
    load_text_cls,
    load_vqa,
    load_zeroshot,
)
from flava.eval.features import pick_device
from flava.eval.finetune import finetune_multimodal, finetune_text
from flava.eval.probe import evaluate_linear_probe
from flava.eval.report import write_reports
from flava.eval.retrieval import chance_recall, evaluate_retrieval
from flava.eval.zeroshot import confusion_matrix, topk_accuracy, zeroshot_logits
from flava.model.io import load_model
from flava.tracking.runs import StageRun

log = logging.getLogger(__name__)
SPLITS = ("train", "val", "test")


@dataclass
class _Outcome:
    """One task's results: its metrics block, its scores and chance levels (by task name) and plot extras."""

    metrics: dict[str, Any]
    scores: dict[str, float]
    chance: dict[str, float]
    extras: dict[str, Any] = field(default_factory=dict)


def _zeroshot(ctx: EvalContext) -> _Outcome:
    logits, labels, classnames = zeroshot_logits(
        ctx.model, ctx.tokenizer, ctx.eval_root, ctx.ecfg.zeroshot.split, transform=ctx.transform,
        max_length=ctx.max_length, **ctx.common,
    )
    metrics = topk_accuracy(logits, labels, ctx.ecfg.zeroshot.top_k)
    extras = {"confusion": confusion_matrix(logits, labels, len(classnames)).tolist(), "classnames": classnames}
    attributes = load_zeroshot(ctx.eval_root, ctx.ecfg.zeroshot.split).attributes
    if attributes is not None:  # the synthetic world's rows carry their scene; real datasets skip this
        metrics["attributes"] = attribute_accuracy(logits.argmax(dim=1).tolist(), labels.tolist(), classnames,
                                                   attributes)
    return _Outcome(metrics, {"zeroshot": metrics["top1"]}, {"zeroshot": majority_rate(labels.tolist())}, extras)


def _retrieval(ctx: EvalContext) -> _Outcome:
    recall, curves, base = evaluate_retrieval(
        ctx.model, ctx.tokenizer, ctx.eval_root, ctx.ecfg.retrieval, transform=ctx.transform,
        max_length=ctx.max_length, **ctx.common,
    )
    ks = ctx.ecfg.retrieval.ks
    scores = {f"retrieval_{d}": sum(recall[f"{d}_r{k}"] for k in ks) / len(ks) for d in ("i2t", "t2i")}
    chance = {f"retrieval_{d}": sum(base[f"{d}_r{k}"] for k in ks) / len(ks) for d in ("i2t", "t2i")}
    data = load_retrieval(ctx.eval_root)
    depth = {d: list(range(1, len(curves[d]) + 1)) for d in ("i2t", "t2i")}
    full = chance_recall(len(data.images), [len(c) for c in data.captions], depth["i2t"])
    extras = {"recall_curves": curves,
              "chance_curves": {d: [full[f"{d}_r{k}"] for k in depth[d]] for d in ("i2t", "t2i")}}
    return _Outcome(recall, scores, chance, extras)


def _linear_probe(ctx: EvalContext) -> _Outcome:
    metrics = evaluate_linear_probe(
        ctx.model, ctx.eval_root, ctx.ecfg.probe, transform=ctx.transform, seed=ctx.seed, **ctx.common
    )
    chance = majority_rate(load_zeroshot(ctx.eval_root, "test").labels)
    return _Outcome(metrics, {"linear_probe": metrics["accuracy"]}, {"linear_probe": chance})


def _text_cls(ctx: EvalContext) -> _Outcome:
    data = {split: load_text_cls(ctx.eval_root, split) for split in SPLITS}
    out = finetune_text(
        ctx.model, ctx.tokenizer, data, ctx.ecfg.text_finetune, device=ctx.device, max_length=ctx.max_length,
        classes=load_closed_set(ctx.eval_root, "text_cls"), seed=ctx.seed,
    )
    if "pearson" in out:  # a regression task: correlation, whose chance level is 0
        return _Outcome(out, {"text_cls": out["pearson"]}, {"text_cls": 0.0})
    return _Outcome(out, {"text_cls": out["accuracy"]}, {"text_cls": majority_rate(data["test"].labels)})


def _vqa(ctx: EvalContext) -> _Outcome:
    data = {split: load_vqa(ctx.eval_root, split) for split in SPLITS}
    metrics = finetune_multimodal(
        ctx.model, ctx.tokenizer, data, ctx.ecfg.multimodal_finetune, transform=ctx.transform, device=ctx.device,
        max_length=ctx.max_length, answers=load_closed_set(ctx.eval_root, "vqa"), seed=ctx.seed,
    )
    return _Outcome(metrics, {"vqa": metrics["accuracy"]}, {"vqa": majority_rate(data["test"].answers)})


# The tasks in the order they run: (metrics and timing key, the EvalConfig section that enables it, the task).
TASKS: tuple[tuple[str, str, Callable[[EvalContext], _Outcome]], ...] = (
    ("zeroshot", "zeroshot", _zeroshot),
    ("retrieval", "retrieval", _retrieval),
    ("linear_probe", "probe", _linear_probe),
    ("text_cls", "text_finetune", _text_cls),
    ("vqa", "multimodal_finetune", _vqa),
)


def evaluate_model(
    model: torch.nn.Module,
    tokenizer,
    eval_root: str | Path,
    ecfg: EvalConfig,
    *,
    transform: Callable[[Image.Image], torch.Tensor],
    device: torch.device | str,
    max_length: int,
    seed: int = 0,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Run the enabled tasks -> (metrics, extras for plots: confusion matrix, classnames, recall curves)."""
    ctx = EvalContext(model, tokenizer, eval_root, ecfg, transform, torch.device(device), max_length, seed)
    check_benchmark_paths(ecfg.benchmarks)  # a mistyped benchmark path fails before the tasks run
    metrics: dict[str, Any] = {}
    tasks: dict[str, float] = {}
    chance: dict[str, float] = {}
    extras: dict[str, Any] = {}
    timings: dict[str, float] = {}
    for key, section, task in TASKS:
        if not getattr(ecfg, section).enabled:
            continue
        start = time.perf_counter()
        outcome = task(ctx)
        metrics[key] = outcome.metrics
        tasks.update(outcome.scores)
        chance.update(outcome.chance)
        extras.update(outcome.extras)
        timings[key] = time.perf_counter() - start
    if not tasks:
        raise ValueError("every evaluation task is disabled (eval.*.enabled); nothing to evaluate")
    metrics["tasks"] = tasks
    metrics["chance"] = chance
    metrics["macro"] = macro_averages(tasks)
    start = time.perf_counter()
    benchmarks = run_benchmarks(ctx)
    if benchmarks is not None:
        metrics["benchmarks"] = benchmarks
        timings["benchmarks"] = time.perf_counter() - start
    extras["timings_s"] = timings
    return metrics, extras


def _transform_for(model: torch.nn.Module, cfg: PipelineConfig):
    """Eval transform at the loaded model's image size with the pipeline's normalisation (``data.loader``)."""
    loader = cfg.data.loader
    return image_transform(
        model.config.image.image_size, train=False, mean=loader.mean, std=loader.std, resample=loader.resample
    )


def write_plots(out_dir: Path, metrics: dict[str, Any], extras: dict[str, Any], dpi: int) -> dict[str, str]:
    """PNG figures under ``out_dir/plots``; returns {title: path relative to out_dir}."""
    plot_dir = out_dir / "plots"
    shutil.rmtree(plot_dir, ignore_errors=True)  # no stale figure of a task that is now disabled
    made = {"Tasks vs chance": plots.task_bars(metrics["tasks"], metrics["chance"], plot_dir / "tasks.png", dpi)}
    if "recall_curves" in extras:
        made["Retrieval recall curves"] = plots.recall_curves(
            extras["recall_curves"], extras.get("chance_curves"), plot_dir / "retrieval_recall.png", dpi
        )
    if "attributes" in metrics.get("zeroshot", {}):
        made["Zero-shot accuracy per attribute"] = plots.attribute_bars(
            metrics["zeroshot"]["attributes"], plot_dir / "zeroshot_attributes.png", dpi
        )
    if "confusion" in extras:
        made["Zero-shot confusion matrix"] = plots.confusion(
            extras["confusion"], extras["classnames"], plot_dir / "zeroshot_confusion.png", dpi
        )
    return {title: str(path.relative_to(out_dir)) for title, path in made.items()}


def run_evaluate(cfg: PipelineConfig, root: str | Path = ".") -> dict[str, Any]:
    """``flava evaluate``: writes ``paths.reports/eval/{metrics.json, run.json, plots/, report.md, report.html}``."""
    root = Path(root)
    model_dir = root / cfg.paths.models / "joint" / "best"
    eval_root = root / cfg.paths.prepared / "eval"
    out_dir = root / cfg.paths.reports / "eval"
    if not model_dir.exists():
        raise FileNotFoundError(f"model directory {model_dir} not found: run `flava pretrain joint` first")
    if not eval_root.exists():
        raise FileNotFoundError(f"evaluation sets {eval_root} not found: run `flava data prepare` first")
    device = pick_device(cfg.eval.device)
    model = load_model(model_dir).to(device)
    tokenizer = load_tokenizer(model_dir / "tokenizer")
    out_dir.mkdir(parents=True, exist_ok=True)

    with StageRun(cfg, "evaluate", root=root) as run:
        mlflow.set_tags({"mlflow.runName": "evaluate", "model_dir": str(model_dir)})
        mlflow.log_params({"eval_device": str(device)})
        metrics, extras = evaluate_model(
            model, tokenizer, eval_root, cfg.eval, transform=_transform_for(model, cfg), device=device,
            max_length=cfg.data.tokenizer.max_length, seed=cfg.seed,
        )
        (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True) + "\n")
        made = write_plots(out_dir, metrics, extras, cfg.eval.plot_dpi)
        info = {"model": str(model_dir), "eval sets": str(eval_root), "mlflow run": run.run_id,
                "params hash": cfg.digest(), "device": str(device)}
        write_reports(out_dir, metrics, info, made)
        log_results(metrics, extras, out_dir)
        model_uri = _log_model(run, cfg, model, model_dir) if cfg.eval.log_model else None
        run_info = {
            "run_id": run.run_id,
            "model_dir": str(model_dir),
            "model_uri": model_uri,
            "params_hash": cfg.digest(),
        }
        (out_dir / "run.json").write_text(json.dumps(run_info, indent=2, sort_keys=True) + "\n")
        run.log_dict(run_info, "report/run.json")
    log.info("evaluation: macro %s", metrics["macro"])
    return {"macro": metrics["macro"], "tasks": metrics["tasks"], "run_id": run_info["run_id"]}


def log_results(metrics: dict[str, Any], extras: dict[str, Any], out_dir: Path) -> None:
    """Every numeric metric, the task timings, the confusion matrix and the report directory, to the active run."""
    numeric = {
        k: float(v) for k, v in flatten(metrics).items()
        if isinstance(v, (int, float)) and not isinstance(v, bool)
    }
    mlflow.log_metrics(numeric)
    mlflow.log_metrics({f"time_s.{k}": v for k, v in extras["timings_s"].items()})
    mlflow.log_dict({"classnames": extras.get("classnames", []), "matrix": extras.get("confusion", [])},
                    "confusion.json")
    mlflow.log_artifacts(str(out_dir), "report")


def _log_model(run: StageRun, cfg: PipelineConfig, model: torch.nn.Module, model_dir: Path) -> str:
    """Log the evaluated model as a servable MLflow model with its preprocessing; returns its URI."""
    loader = cfg.data.loader
    return run.log_model(
        model_dir, tokenizer_dir=model_dir / "tokenizer", embedding_dim=model.config.projection_dim,
        preprocess={"image_size": model.config.image.image_size, "mean": list(loader.mean),
                    "std": list(loader.std), "resample": loader.resample,
                    "max_length": cfg.data.tokenizer.max_length},
    )
