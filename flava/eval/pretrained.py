"""``flava evaluate --model DIR``: a pretrained transformers FLAVA checkpoint (``save_pretrained`` layout with its
tokenizer and image processor, e.g. a downloaded ``facebook/flava-full``) evaluated as a baseline with exactly the
evaluation of our joint model (:func:`flava.eval.run.evaluate_model`), then registered as a candidate in the MLflow
registry through the same gate as our models (:func:`flava.tracking.registry.promote`).

What is the checkpoint's and what is ours:

- weights and architecture: the checkpoint's (``flava.model.hf``), converted to our model once and written to
  ``paths.models/baselines/<name>/`` (a ``flava.model.io`` directory with ``tokenizer/``), which is what MLflow
  logs and serves;
- tokenizer: the checkpoint's own (its vocabulary is what its embeddings were trained on), never ours;
- image preprocessing: the checkpoint's image processor settings (``preprocessor_config.json``, or the
  ``image_processor`` entry of ``processor_config.json``) give the normalisation (``image_mean``, ``image_std``)
  and the resampling filter; its output size must equal the model's image size. The geometry is our eval
  transform's (shorter side resized, centre crop), the same as transformers' on square images. Without processor
  settings the pipeline's ``data.loader`` normalisation is used, with a warning;
- text length: ``data.tokenizer.max_length``, as for our model (the same eval inputs for every candidate).

Outputs: ``paths.reports/baselines/<name>/`` (``metrics.json``, ``run.json``, plots, report) -- never the DVC
``evaluate`` stage's ``reports/eval``. The MLflow run (stage ``evaluate``) and the registered version carry where
the model came from: ``pretrained.source_dir`` and ``pretrained.sha256`` (content hash of its safetensors). Nothing
is ever downloaded.
"""
from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

import mlflow
from mlflow import MlflowClient

from flava.config import PipelineConfig
from flava.data.tokenizer import load_tokenizer
from flava.data.transforms import ImageTransform, image_transform
from flava.eval.features import pick_device
from flava.eval.report import write_reports
from flava.eval.run import evaluate_model, log_results, write_plots
from flava.model.hf import is_transformers_checkpoint, load_transformers_checkpoint
from flava.model.io import WEIGHTS, save_model
from flava.model.pretrained import checkpoint_sha256
from flava.tracking.registry import promote, promotion_lock, sha256_file
from flava.tracking.runs import StageRun, tracking_uri

log = logging.getLogger(__name__)

BASELINES = "baselines"  # under paths.models and paths.reports: one directory per evaluated checkpoint
# Where save_pretrained puts the image processor's settings: its own file (an image processor saved alone, and the
# hub's facebook/flava-full), or the "image_processor" entry of a whole processor's file (transformers >= 5).
PROCESSOR_CONFIGS = (("preprocessor_config.json", None), ("processor_config.json", "image_processor"))
SOURCE_DIR_TAG = "pretrained.source_dir"
SOURCE_SHA_TAG = "pretrained.sha256"
# PIL's resampling filter numbers, as transformers' image processors save them -> our transform's names.
_PIL_RESAMPLE = {0: "nearest", 2: "bilinear", 3: "bicubic"}


def _processor_size(raw: dict[str, Any]) -> int | None:
    """The side of the processor's output image (its crop when it crops, else its resize), if it is square."""
    size = raw.get("crop_size") if raw.get("do_center_crop", True) and raw.get("crop_size") else raw.get("size")
    if isinstance(size, int):
        return size
    if isinstance(size, dict):
        sides = {size.get("height"), size.get("width"), size.get("shortest_edge")} - {None}
        return sides.pop() if len(sides) == 1 else None
    return None


def _processor_settings(directory: Path) -> tuple[Path, dict[str, Any]] | None:
    for name, key in PROCESSOR_CONFIGS:
        path = directory / name
        if path.exists():
            raw = json.loads(path.read_text())
            raw = raw.get(key) if key else raw
            if isinstance(raw, dict):
                return path, raw
    return None


def checkpoint_transform(directory: Path, image_size: int, cfg: PipelineConfig) -> ImageTransform:
    """The eval transform of a checkpoint: its processor's normalisation and filter at the model's image size."""
    found = _processor_settings(directory)
    loader = cfg.data.loader
    if found is None:
        log.warning("%s has no image processor settings (%s): using data.loader's normalisation", directory,
                    ", ".join(name for name, _ in PROCESSOR_CONFIGS))
        return image_transform(image_size, train=False, mean=loader.mean, std=loader.std, resample=loader.resample)
    path, raw = found
    size = _processor_size(raw)
    if size != image_size:
        raise ValueError(f"{path}: the processor makes {size}-pixel images, the model takes {image_size} "
                         "(vision_config.image_size); they must agree")
    resample = raw.get("resample", 3)
    if resample not in _PIL_RESAMPLE:
        raise ValueError(f"{path}: resample {resample} has no counterpart here (one of {sorted(_PIL_RESAMPLE)})")
    mean = raw.get("image_mean", loader.mean) if raw.get("do_normalize", True) else (0.0, 0.0, 0.0)
    std = raw.get("image_std", loader.std) if raw.get("do_normalize", True) else (1.0, 1.0, 1.0)
    return image_transform(image_size, train=False, mean=mean, std=std, resample=_PIL_RESAMPLE[resample])


def _checked_tokenizer(directory: Path, vocab_size: int, max_length: int, positions: int):
    tokenizer = load_tokenizer(directory)  # the checkpoint's own; fails readably when it carries none
    if len(tokenizer) > vocab_size:
        raise ValueError(f"the tokenizer in {directory} has {len(tokenizer)} tokens, the model's text embeddings "
                         f"only {vocab_size} rows")
    if max_length > positions:
        raise ValueError(f"data.tokenizer.max_length ({max_length}) exceeds the text positions of the checkpoint "
                         f"in {directory} ({positions})")
    return tokenizer


def run_evaluate_pretrained(cfg: PipelineConfig, checkpoint: str | Path, root: str | Path = ".") -> dict[str, Any]:
    """Evaluate the transformers FLAVA checkpoint in ``checkpoint`` and register it (see the module docstring)."""
    root, source = Path(root), Path(checkpoint).resolve()
    if not is_transformers_checkpoint(source):
        raise ValueError(f"{source} is not a transformers FLAVA checkpoint directory (config.json with model_type "
                         "'flava'); `flava evaluate` without --model evaluates our own joint model")
    eval_root = root / cfg.paths.prepared / "eval"
    if not eval_root.exists():
        raise FileNotFoundError(f"evaluation sets {eval_root} not found: run `flava data prepare` first")
    name = source.name
    model_dir = root / cfg.paths.models / BASELINES / name
    out_dir = root / cfg.paths.reports / BASELINES / name
    device = pick_device(cfg.eval.device)
    model = load_transformers_checkpoint(source, attention=cfg.model.resolved.attention)
    mcfg = model.config
    max_length = cfg.data.tokenizer.max_length
    tokenizer = _checked_tokenizer(source, mcfg.text.vocab_size, max_length, mcfg.text.max_position_embeddings)
    transform = checkpoint_transform(source, mcfg.image.image_size, cfg)
    source_sha = checkpoint_sha256(source)

    # Our format of the same weights, with the checkpoint's tokenizer beside it: what MLflow logs and serves.
    shutil.rmtree(model_dir, ignore_errors=True)
    save_model(model, model_dir)
    tokenizer.save_pretrained(str(model_dir / "tokenizer"))
    model = model.to(device)
    out_dir.mkdir(parents=True, exist_ok=True)
    provenance = {SOURCE_DIR_TAG: str(source), SOURCE_SHA_TAG: source_sha}
    with StageRun(cfg, "evaluate", root=root) as run:
        mlflow.set_tags({"mlflow.runName": f"evaluate-{name}", "model_dir": str(model_dir), **provenance})
        mlflow.log_params({"eval_device": str(device)})
        metrics, extras = evaluate_model(model, tokenizer, eval_root, cfg.eval, transform=transform, device=device,
                                         max_length=max_length, seed=cfg.seed)
        (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True) + "\n")
        made = write_plots(out_dir, metrics, extras, cfg.eval.plot_dpi)
        info = {"model": f"{source} (pretrained, sha256 {source_sha[:12]})", "eval sets": str(eval_root),
                "mlflow run": run.run_id, "params hash": cfg.digest(), "device": str(device)}
        write_reports(out_dir, metrics, info, made)
        log_results(metrics, extras, out_dir)
        model_uri = None
        if cfg.eval.log_model:
            model_uri = run.log_model(
                model_dir, tokenizer_dir=model_dir / "tokenizer", embedding_dim=mcfg.projection_dim,
                preprocess={"image_size": mcfg.image.image_size, "mean": list(transform.mean),
                            "std": list(transform.std), "resample": transform.resample, "max_length": max_length},
            )
        run_info = {"run_id": run.run_id, "model_dir": str(model_dir), "model_uri": model_uri,
                    "params_hash": cfg.digest(), "source_dir": str(source), "source_sha256": source_sha}
        run.log_dict(run_info, "report/run.json")
    registration = None
    if model_uri is not None:
        registration = _register(cfg, run_info, metrics, model_dir)
    run_info["registration"] = registration
    (out_dir / "run.json").write_text(json.dumps(run_info, indent=2, sort_keys=True) + "\n")
    log.info("pretrained %s: macro %s, registry %s", source, metrics["macro"], registration)
    return {"macro": metrics["macro"], "tasks": metrics["tasks"], "run_id": run_info["run_id"],
            "registration": registration}


def _register(cfg: PipelineConfig, run_info: dict[str, Any], metrics: dict[str, Any], model_dir: Path) -> dict:
    """The version of the baseline through the promotion gate, tagged with where it came from."""
    uri = tracking_uri(cfg)
    mlflow.set_tracking_uri(uri)  # model sources such as models:/m-... resolve through the fluent store
    rcfg = cfg.eval.registry
    provenance = {SOURCE_DIR_TAG: run_info["source_dir"], SOURCE_SHA_TAG: run_info["source_sha256"]}
    return promote(
        MlflowClient(uri), metrics=metrics, eval_run_id=run_info["run_id"], model_source=run_info["model_uri"],
        rcfg=rcfg, lock=promotion_lock(uri, rcfg), tags={**provenance, "model_dir": str(model_dir)},
        weights_sha256=sha256_file(model_dir / WEIGHTS), version_tags=provenance,
    )
