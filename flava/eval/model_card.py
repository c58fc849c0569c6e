"""A Markdown model card for an exported model: what it is, the data and params it came from, its metrics.

Built from files the pipeline already wrote (no MLflow needed): the model's ``config.json``, the evaluation
``metrics.json`` and ``run.json`` (when the model was evaluated), ``promotion.json`` (when it was promoted), and
lineage from the working tree (git commit, ``data.dvc`` version).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from flava.config import PipelineConfig
from flava.eval.aggregate import DOMAINS, TASK_DOMAINS
from flava.tracking import lineage


def _read(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text()) if path.exists() else None


def build_model_card(cfg: PipelineConfig, model_dir: str | Path, root: str | Path = ".") -> str:
    root, model_dir = Path(root), Path(model_dir)
    config = _read(model_dir / "config.json") or {}
    model_cfg = config.get("config", config)
    reports = root / cfg.paths.reports
    lines = [
        "---",
        "library_name: transformers",
        "tags: [flava, vision-language, contrastive, multimodal]",
        "---",
        "",
        "# FLAVA model",
        "",
        "A FLAVA vision-and-language model (Singh et al., CVPR 2022) pretrained by this project's pipeline "
        "(MLM, MIM, MMM, ITM and contrastive objectives) and exported in the Hugging Face `transformers` "
        "FLAVA format (`FlavaForPreTraining` / `FlavaModel`).",
        "",
        *_architecture(cfg, model_cfg),
        "",
        *_lineage(cfg, root, reports),
        "",
        *_evaluation(_read(reports / "eval" / "metrics.json")),
        "",
        "## Intended use and limitations",
        "",
        "Research on vision-and-language pretraining. A model trained on the embedded synthetic world only knows "
        "coloured shapes; its numbers say nothing about natural images or text.",
        "",
    ]
    return "\n".join(lines)


def _architecture(cfg: PipelineConfig, model_cfg: dict[str, Any]) -> list[str]:
    """The towers' sizes, read from the model's ``config.json`` (``?`` where it lacks one)."""
    lines = ["## Architecture", "", "| tower | layers | hidden | heads |", "|---|---|---|---|"]
    for name in ("image", "text", "multimodal"):
        tower = model_cfg.get(name, {})
        lines.append(f"| {name} | {tower.get('num_layers', '?')} | {tower.get('hidden_size', '?')} | "
                     f"{tower.get('num_heads', '?')} |")
    image, text = model_cfg.get("image", {}), model_cfg.get("text", {})
    return lines + [
        "",
        f"- image size {image.get('image_size', '?')}, patch {image.get('patch_size', '?')}; "
        f"text vocabulary {text.get('vocab_size', '?')}, max length {text.get('max_position_embeddings', '?')}; "
        f"projection dim {model_cfg.get('projection_dim', '?')}",
        f"- preset `{cfg.model.preset}`, overrides `{json.dumps(cfg.model.overrides, sort_keys=True)}`",
    ]


def _lineage(cfg: PipelineConfig, root: Path, reports: Path) -> list[str]:
    """Data version, code, params, and the evaluation run and registry version when there are some."""
    run = _read(reports / "eval" / "run.json") or {}
    promotion = _read(reports / "promotion.json")
    lines = [
        "## Training data and lineage",
        "",
        f"- data version (`data.dvc` md5): `{lineage.data_version(root)}`",
        f"- raw data: `{cfg.paths.raw}`; synthetic generator settings under `data.generate` in params.yaml",
        f"- code: git commit `{lineage.git_commit(root)}`",
        f"- params hash (`PipelineConfig.digest()`): `{cfg.digest()}`, seed {cfg.seed}",
    ]
    if run.get("run_id"):
        lines.append(f"- MLflow evaluation run: `{run['run_id']}`")
    if promotion:
        lines.append(f"- registry: `{promotion.get('model_name')}` version {promotion.get('version')}, "
                     f"decision `{promotion.get('decision')}`")
    return lines


def _evaluation(metrics: dict[str, Any] | None) -> list[str]:
    """Per-task scores against chance and the macro averages (``metrics.json`` of ``flava evaluate``)."""
    lines = ["## Evaluation", ""]
    if not metrics:
        return lines + ["Not evaluated yet (run `flava evaluate`)."]
    lines += ["| task | domain | score | chance |", "|---|---|---|---|"]
    for task, score in metrics.get("tasks", {}).items():
        chance = metrics.get("chance", {}).get(task)
        chance_text = f"{chance:.4f}" if isinstance(chance, (int, float)) else "-"
        lines.append(f"| {task} | {TASK_DOMAINS.get(task, '?')} | {score:.4f} | {chance_text} |")
    macro = metrics.get("macro", {})
    averages = ", ".join(f"{d} {macro[d]:.4f}" for d in (*DOMAINS, "overall") if d in macro)
    return lines + ["", "Macro averages: " + averages]
