"""The pretraining stages: ``run_pretrain(cfg, "text" | "image" | "joint") -> dict``.

- ``text``: MLM on the text corpus; writes ``paths.models/text`` and ``paths.reports/pretrain_text.json``.
- ``image``: MIM on the image corpus (codebook targets); writes ``paths.models/image`` and
  ``paths.reports/pretrain_image.json``. The two unimodal stages are independent (they can run in parallel).
- ``joint``: the whole model, its text and image towers (and their MLM/MIM heads) initialised from the two
  unimodal directories (multimodal encoder random; ``train.joint.init_from_unimodal=false`` starts from scratch),
  batches drawn from the three corpora by ``data.mixing.ratios``, zero-shot accuracy on the validation split every
  ``train.eval_every`` steps; writes ``paths.models/joint/{last,best}`` (best by zero-shot top-1, tokenizer copied
  beside each) and ``paths.reports/joint.json``.

Every stage resumes from its latest complete checkpoint under ``paths.checkpoints/{stage}``, logs one MLflow run,
and works the same in one process or under ``torchrun`` (DDP, or FSDP with ``train.strategy=fsdp``).
"""
from __future__ import annotations

import hashlib
import json
import logging
import random
import shutil
import traceback
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from flava.config import PipelineConfig
from flava.distributed import ProcessInfo, barrier, init_process, shutdown
from flava.train.checkpoint import Checkpointer, model_state
from flava.train.config import STAGES
from flava.train.flops import peak_flops, step_flops
from flava.train.loop import LoopSettings, Trainer
from flava.train.optim import build_optimizer, build_scheduler
from flava.train.parallel import (
    UnusedGrads,
    freeze_never_used,
    grad_scaler,
    parallelize,
    probe_unused,
    resolve_device,
    set_determinism,
)
from flava.train.progress import Progress

log = logging.getLogger(__name__)

CORPUS_OF_KIND = {"text": "text", "image": "images", "pair": "pairs"}
# What each unimodal stage trains and hands to the joint stage: its tower and the head of its objective.
UNIMODAL_PARTS = {"text": ("text_encoder", "mlm_head"), "image": ("image_encoder", "mim_head")}
SELECT_METRIC = "top1"  # the paper selects checkpoints by zero-shot accuracy


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def fingerprint(cfg: PipelineConfig, stage: str) -> str:
    """What a stage's trajectory depends on: seed, data/model/train sections and the data version. Checkpoints of
    another fingerprint are not resumed (a changed lr must not continue the old run)."""
    from flava.tracking.lineage import data_version

    tree = cfg.model_dump(mode="json")
    payload = {"stage": stage, "data_version": data_version(), **{k: tree[k] for k in ("seed", "data", "model", "train")}}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def stage_kinds(cfg: PipelineConfig, stage: str) -> list[str]:
    if stage == "text":
        return ["text"]
    if stage == "image":
        return ["image"]
    return sorted(k for k, r in cfg.data.mixing.ratios.items() if r > 0)


def _peek(stream) -> dict[str, Any]:
    """One batch from ``stream`` without moving it: the position is restored from its state dict."""
    state = stream.state_dict()
    batch = next(stream)
    stream.load_state_dict(state)
    return batch


def init_from_unimodal(model, models_root: Path) -> dict[str, int]:
    """Copy the text tower + MLM head and the image tower + MIM head from the unimodal stage directories."""
    from flava.model.io import load_model

    copied = {}
    for stage, parts in UNIMODAL_PARTS.items():
        directory = models_root / stage
        if not (directory / "model.safetensors").exists():
            raise FileNotFoundError(
                f"{directory} holds no model: run `flava pretrain {stage}` first, or set "
                "train.joint.init_from_unimodal=false to train the joint model from scratch"
            )
        source = load_model(directory, with_codebook=False)
        for part in parts:
            src, dst = getattr(source, part), getattr(model, part)
            try:
                dst.load_state_dict(src.state_dict())
            except RuntimeError as err:
                raise ValueError(
                    f"{directory}: {part} does not fit the joint model's config (same model preset, tokenizer and "
                    f"codebook needed): {err}"
                ) from None
            copied[part] = sum(p.numel() for p in src.parameters())
    return copied


def _export(model_factory: Callable[[], torch.nn.Module], base, wrapped, fsdp: bool, info: ProcessInfo,
            directory: Path, tokenizer_dir: Path | None) -> None:
    """Write a ``flava.model.io`` directory atomically (main rank; a collective gather first under FSDP)."""
    from flava.model.io import save_model

    state = model_state(wrapped) if fsdp else None
    if info.is_main:
        model = base
        if fsdp:
            model = model_factory()
            model.load_state_dict(state)
        tmp = directory.with_name(f".{directory.name}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        save_model(model, tmp)
        if tokenizer_dir is not None:
            shutil.copytree(tokenizer_dir, tmp / "tokenizer")
        old = directory.with_name(f".{directory.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        if directory.exists():
            directory.rename(old)
        tmp.rename(directory)
        shutil.rmtree(old, ignore_errors=True)
    barrier()


def run_pretrain(cfg: PipelineConfig, stage: str) -> dict[str, Any]:
    """One pretraining stage (see the module docstring). Returns the small metrics dict written to the report."""
    if stage not in STAGES:
        raise ValueError(f"stage must be one of {STAGES}, got {stage!r}")
    started_group = not torch.distributed.is_initialized()
    info = init_process()
    try:
        return _run(cfg, stage, info)
    except BaseException as err:
        # The traceback's frames hold _run's locals (the DDP wrapper among them): free them before shutdown().
        traceback.clear_frames(err.__traceback__)
        raise
    finally:
        if started_group:
            shutdown()


def _run(cfg: PipelineConfig, stage: str, info: ProcessInfo) -> dict[str, Any]:
    from flava.data.loader import build_stream
    from flava.data.mixing import CorpusMixer
    from flava.data.storage import join
    from flava.data.tokenizer import load_tokenizer
    from flava.data.transforms import transform_from_config
    from flava.model import FlavaForPretraining
    from flava.model.codebook import load_codebook
    from flava.tracking.runs import StageRun

    tc = cfg.train
    paths = cfg.paths
    settings = LoopSettings.from_config(tc, stage, select_metric=SELECT_METRIC if stage == "joint" else None)
    micro = settings.micro_batch(info.world_size)
    device = resolve_device(tc.device, info)
    set_determinism(tc.deterministic)
    fsdp = tc.strategy == "fsdp" and info.distributed

    tokenizer_dir = Path(paths.artifacts) / "tokenizer"
    codebook_dir = Path(paths.artifacts) / "codebook"
    tokenizer = load_tokenizer(tokenizer_dir)
    codebook = None
    if stage != "text" or codebook_dir.exists():  # the text stage reads it only for a consistent codebook size
        codebook = load_codebook(codebook_dir)
    model_cfg = cfg.model.build(vocab_size=len(tokenizer), codebook_size=codebook.num_codes if codebook else None)

    seed_everything(cfg.seed)  # identical initial weights on every rank
    model = FlavaForPretraining(model_cfg, codebook=codebook)
    copied: dict[str, int] = {}
    if stage == "joint" and tc.joint.init_from_unimodal:
        copied = init_from_unimodal(model, Path(paths.models))
    model.to(device)

    kinds = stage_kinds(cfg, stage)
    streams = {
        kind: build_stream(cfg, CORPUS_OF_KIND[kind], batch_size=micro, rank=info.rank,
                           world_size=info.world_size, seed=cfg.seed, tokenizer=tokenizer, codebook=codebook)
        for kind in kinds
    }
    stream = CorpusMixer(streams, cfg.data.mixing.ratios, seed=cfg.seed) if stage == "joint" else streams[kinds[0]]

    # Which parameters each batch kind leaves without a gradient (see flava.train.parallel).
    unused = probe_unused(model, {kind: _peek(s) for kind, s in streams.items()}, device)
    frozen = freeze_never_used(model, unused)
    guard = UnusedGrads(model, unused)
    if info.distributed and guard.any:
        model.touch_unused_parameters = True
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)

    seed_everything(cfg.seed + 1000 * info.rank)  # per-rank streams for dropout and in-batch ITM negatives
    wrapped = parallelize(model, tc, info, device)
    optimizer = build_optimizer(model, tc.optimizer, tc.stage_lr(stage), device)
    scheduler = build_scheduler(optimizer, tc.schedule, total_steps=settings.steps,
                                warmup_steps=tc.stage_warmup(stage))
    client = None
    if paths.checkpoints.startswith("s3://"):
        from flava.data.storage import s3_client

        client = s3_client(cfg.data.shards.s3)  # the same endpoint/region/retries as the shards
    checkpointer = Checkpointer(join(paths.checkpoints, stage), info=info, keep_last=tc.keep_last, s3_client=client,
                                fingerprint=fingerprint(cfg, stage))
    checkpointer.discard_mismatched()
    peak = peak_flops(device, tc.peak_tflops)

    models_root = Path(paths.models)
    out_dir = models_root / ("joint/last" if stage == "joint" else stage)
    best_dir = models_root / "joint" / "best"
    for directory in (out_dir.parent, Path(paths.reports)):
        directory.mkdir(parents=True, exist_ok=True)
    factory = lambda: FlavaForPretraining(model_cfg, codebook=codebook)  # noqa: E731 - FSDP export target
    copy_tokenizer = tokenizer_dir if stage == "joint" else None

    evaluate = on_best = None
    if stage == "joint":
        from flava.eval.zeroshot import evaluate_zeroshot

        eval_root = Path(paths.prepared) / "eval"
        transform = transform_from_config(cfg, train=False)

        def evaluate() -> dict[str, float]:
            target = model
            if fsdp:  # FSDP shards are gathered into a full copy on the main rank
                state = model_state(wrapped)
                if not info.is_main:
                    return {}
                target = factory().to(device)
                target.load_state_dict(state)
            return evaluate_zeroshot(target, tokenizer, eval_root, split="val", batch_size=tc.eval_batch_size,
                                     device=device, transform=transform, max_length=cfg.data.tokenizer.max_length)

        def on_best(step: int, metrics: dict[str, float]) -> None:
            _export(factory, model, wrapped, fsdp, info, best_dir, copy_tokenizer)
            if info.is_main:
                (best_dir / "selection.json").write_text(json.dumps({"step": step, **metrics}, indent=2))

    with StageRun(cfg, stage, info) as run:
        run.set_tags({"frozen_parameters": len(frozen), "trainable_parameters": trainable})
        trainer = Trainer(
            model=wrapped, optimizer=optimizer, scheduler=scheduler, stream=stream, settings=settings,
            device=device, info=info, scaler=grad_scaler(device, tc.precision), checkpointer=checkpointer,
            unused=guard, evaluate=evaluate, evaluate_on_all_ranks=fsdp, on_best=on_best, sink=run.log_metrics,
            flops_per_batch=(lambda batch: step_flops(model_cfg, batch)) if peak else None, peak_flops=peak,
            progress=Progress(stage, settings.steps, enabled=info.is_main),
        )
        trainer.resume()
        summary = trainer.fit()
        for step in checkpointer.steps():
            run.log_checkpoint(step, checkpointer.uri(step))
        _export(factory, model, wrapped, fsdp, info, out_dir, copy_tokenizer)
        if stage == "joint" and not best_dir.exists():  # no evaluation ran (e.g. resumed at the end)
            _export(factory, model, wrapped, fsdp, info, best_dir, copy_tokenizer)
        result = _report(cfg, stage, info, trainer, summary, out_dir, checkpointer, copied, frozen, trainable)
        if info.is_main:
            preprocess = {"image_size": model_cfg.image.image_size, "mean": list(cfg.data.loader.mean),
                          "std": list(cfg.data.loader.std), "resample": cfg.data.loader.resample,
                          "max_length": cfg.data.tokenizer.max_length}
            result["model_uri"] = run.log_model(
                best_dir if stage == "joint" else out_dir, tokenizer_dir=tokenizer_dir, preprocess=preprocess,
                embedding_dim=model_cfg.projection_dim,
            )
            result["mlflow_run_id"] = run.run_id
            run.log_metrics(summary["steps"], {k: v for k, v in result.items()
                                               if isinstance(v, float) and k.startswith(("best_", "zeroshot_"))})
            report = Path(paths.reports) / ("joint.json" if stage == "joint" else f"pretrain_{stage}.json")
            report.write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
            run.log_dict(result, f"reports/{report.name}")
    return result


def _report(cfg, stage, info, trainer: Trainer, summary, out_dir, checkpointer, copied, frozen, trainable):
    history = trainer.history
    first, last = (history[0] if history else {}), (history[-1] if history else {})
    result: dict[str, Any] = {
        "stage": stage,
        "steps": summary["steps"],
        "samples": summary["samples"],
        "world_size": info.world_size,
        "resumed_from": summary["resumed_from"],
        "skipped_steps": summary["skipped_steps"],
        "first_loss": first.get("loss"),
        "final_loss": last.get("loss"),
        "final_losses": {k: v for k, v in last.items() if k.startswith("loss_")},
        "samples_per_s": last.get("samples_per_s"),
        "trainable_parameters": trainable,
        "frozen_parameters": len(frozen),
        "model_dir": str(out_dir),
        "checkpoint": checkpointer.uri(checkpointer.latest()) if checkpointer.latest() is not None else None,
    }
    if stage == "joint":
        result["init_from_unimodal"] = {k: int(v) for k, v in copied.items()}
        result["best_step"] = summary["best_step"]
        result["best_zeroshot_top1"] = summary["best_metric"]
        for key, value in summary["last_eval"].items():
            result[f"zeroshot_{key}"] = value
        result["best_dir"] = str(Path(cfg.paths.models) / "joint" / "best")
        result["mixing_counts"] = dict(getattr(trainer.stream, "counts", {}))
    return result
