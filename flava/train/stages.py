"""The pretraining stages: ``run_pretrain(cfg, "text" | "image" | "joint") -> dict``.

- ``text``: MLM on the text corpus; writes ``paths.models/text``.
- ``image``: MIM on the image corpus (codebook targets); writes ``paths.models/image``. The two unimodal stages are
  independent (they can run in parallel).
- ``joint``: the whole model, its text and image towers (and their MLM/MIM heads) initialised from the two
  unimodal directories (multimodal encoder random; ``train.joint.init_from_unimodal=false`` starts from scratch),
  or, when ``train.joint.init_from`` names a pretrained checkpoint (transformers FLAVA or ours), entirely from it,
  batches drawn from the three corpora by ``data.mixing.ratios``, zero-shot accuracy on the validation split every
  ``train.eval_every`` steps; writes ``paths.models/joint/{last,best}`` (best by zero-shot top-1, tokenizer copied
  beside each, ``best/selection.json``).

Each stage, named as in ``flava.stages`` (``pretrain_text``, ``pretrain_image``, ``joint``), also writes under
``paths.reports``: ``<name>.json`` (metrics only: deterministic numbers, for ``dvc metrics``), ``<name>.run.json``
(what this run was: MLflow run and model URI, directories, resume point, throughput) and the training curves
``curves/<name>.csv`` (one row per logged step; the joint stage adds ``curves/joint_zeroshot.csv``, one row per
evaluation) for ``dvc plots``.

Checkpoints (``paths.checkpoints/<stage>``) carry the stage's identity (``flava.stages.stage_identity``: its code,
data deps and params). A run resumes only the checkpoints of an interrupted run of the same identity; those of
another identity, and those of a run that finished, are discarded, so a re-run after any change, or a forced one,
trains for real. SIGTERM/SIGINT during training saves a checkpoint at the step boundary and raises
``flava.exitcodes.Preempted`` (the MLflow run ends KILLED, tagged ``flava.preempted``; the CLI exits 143). The best
model is taken at the end from its checkpoint (kept while the run goes on), so an interrupted and resumed run writes
the same files as an uninterrupted one. Every stage logs one MLflow run (a
resumed stage continues the interrupted attempt's run) and works the same in one process or under ``torchrun``
(DDP, or FSDP with ``train.strategy=fsdp``).
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import random
import shutil
import traceback
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import numpy as np
import torch

from flava.config import PipelineConfig
from flava.data.collate import CORPUS_OF_KIND
from flava.data.loader import build_stream
from flava.data.mixing import CorpusMixer
from flava.data.storage import join, s3_client
from flava.data.tokenizer import load_tokenizer
from flava.data.transforms import transform_from_config
from flava.distributed import ProcessInfo, barrier, init_process, shutdown
from flava.eval.zeroshot import evaluate_zeroshot
from flava.exitcodes import Preempted
from flava.model import FlavaForPretraining
from flava.model.batch import validate_batch
from flava.model.codebook import load_codebook
from flava.model.io import load_model, save_model
from flava.model.pretrained import checkpoint_sha256, load_pretrained_weights
from flava.stages import PRETRAIN_STAGE, stage_identity
from flava.tracking.runs import StageRun
from flava.train.checkpoint import Checkpointer, model_state
from flava.train.config import STAGES
from flava.train.flops import peak_flops, step_flops
from flava.train.loop import LoopSettings, Trainer
from flava.train.optim import build_optimizer, build_scheduler
from flava.train.parallel import (
    grad_scaler,
    parallelize,
    resolve_device,
    set_determinism,
)
from flava.train.progress import Progress
from flava.train.stop import EarlyStop
from flava.train.unused import UnusedParameters, peek

log = logging.getLogger(__name__)

# What each unimodal stage trains and hands to the joint stage: its tower and the head of its objective.
UNIMODAL_PARTS = {"text": ("text_encoder", "mlm_head"), "image": ("image_encoder", "mim_head")}
SELECT_METRIC = "top1"  # the paper selects checkpoints by zero-shot accuracy
CURVE_COLUMNS = ("loss", "lr")  # besides "step" and every "loss_*": the curves hold no timing


def stream_seed(seed: int, rank: int, purpose: str) -> int:
    """A seed of its own for each (run seed, rank, purpose): independent streams, none of them global."""
    return int.from_bytes(hashlib.sha256(f"{seed}/{rank}/{purpose}".encode()).digest()[:8], "little") >> 1


def seed_dropout(seed: int) -> None:
    """Dropout (off in every preset) has no generator argument in torch, so it is the one user of the global RNGs:
    seeded per rank, and saved with each checkpoint."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def stage_kinds(cfg: PipelineConfig, stage: str) -> list[str]:
    if stage == "text":
        return ["text"]
    if stage == "image":
        return ["image"]
    return sorted(k for k, r in cfg.data.mixing.ratios.items() if r > 0)


def init_from_unimodal(model, models_root: Path) -> dict[str, int]:
    """Copy the text tower + MLM head and the image tower + MIM head from the unimodal stage directories."""
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


def write_model_dir(model: torch.nn.Module, directory: Path, tokenizer_dir: Path | None,
                    extra_files: dict[str, str] | None = None) -> None:
    """Write a ``flava.model.io`` directory (plus the tokenizer and ``extra_files``) atomically: built beside it,
    then swapped in."""
    tmp = directory.with_name(f".{directory.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    save_model(model, tmp)
    if tokenizer_dir is not None:
        shutil.copytree(tokenizer_dir, tmp / "tokenizer")
    for name, text in (extra_files or {}).items():
        (tmp / name).write_text(text)
    old = directory.with_name(f".{directory.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if directory.exists():
        directory.rename(old)
    tmp.rename(directory)
    shutil.rmtree(old, ignore_errors=True)


def curves_csv(rows: list[dict[str, float]], columns: list[str]) -> str:
    """CSV text of ``rows`` (a missing value is an empty cell); steps as integers, values as Python's shortest
    round-trip repr, so the same numbers always give the same bytes."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["step", *columns])
    for row in rows:
        writer.writerow([int(row["step"]), *(repr(float(row[c])) if c in row else "" for c in columns)])
    return out.getvalue()


def training_curve(history: list[dict[str, float]]) -> str:
    losses = sorted({k for row in history for k in row if k.startswith("loss_")})
    return curves_csv(history, ["loss", *losses, "lr"])


def zeroshot_curve(evals: list[dict[str, float]]) -> str:
    return curves_csv(evals, sorted({k for row in evals for k in row if k != "step"}))


@dataclass
class Outputs:
    """Where one stage writes (``name``: the stage's name in ``flava.stages``)."""

    name: str
    model_dir: Path  # models/<stage>, or models/joint/last
    best_dir: Path | None  # models/joint/best (joint only)
    reports: Path
    tokenizer_dir: Path | None  # copied beside the joint models

    @classmethod
    def of(cls, cfg: PipelineConfig, stage: str) -> Outputs:
        models = Path(cfg.paths.models)
        joint = stage == "joint"
        tokenizer = Path(cfg.paths.artifacts) / "tokenizer"
        return cls(name=PRETRAIN_STAGE[stage], model_dir=models / ("joint/last" if joint else stage),
                   best_dir=models / "joint" / "best" if joint else None, reports=Path(cfg.paths.reports),
                   tokenizer_dir=tokenizer if joint else None)

    @property
    def metrics_file(self) -> Path:
        return self.reports / f"{self.name}.json"

    @property
    def run_file(self) -> Path:
        return self.reports / f"{self.name}.run.json"

    def curve(self, name: str) -> Path:
        return self.reports / "curves" / f"{name}.csv"


@dataclass
class Built:
    """A stage's model, data and optimisation, ready for a ``Trainer``."""

    model: FlavaForPretraining  # the unwrapped model
    wrapped: torch.nn.Module  # what trains (DDP/FSDP/compiled)
    factory: Callable[[], FlavaForPretraining]  # a fresh model of the same config (exports)
    stream: Iterator[dict[str, Any]]
    optimizer: torch.optim.Optimizer
    scheduler: Any
    unused: UnusedParameters
    check_batch: Callable[[dict[str, Any]], None] | None  # the trainer's host-side batch check
    copied: dict[str, int]  # parameters copied per part from the unimodal models or train.joint.init_from (joint)
    init_from: dict[str, str]  # train.joint.init_from's {"source": dir, "sha256": weights hash}; {} when unset
    trainable: int
    tokenizer: Any
    device: torch.device
    settings: LoopSettings
    fsdp: bool


def run_pretrain(cfg: PipelineConfig, stage: str,
                 on_eval: Callable[[int, Mapping[str, float]], None] | None = None) -> dict[str, Any]:
    """One pretraining stage (see the module docstring). Returns the report's metrics together with the run's
    record (the contents of ``<name>.json`` and ``<name>.run.json``).

    ``on_eval(step, results)`` is called after each zero-shot evaluation of the joint stage (``results``: that
    evaluation's ``{"top1", "top5", "mrr"}``); raising ``flava.train.stop.EarlyStop`` there ends the stage
    early: its curves so far are written, its MLflow run ends KILLED with the reason, no model is exported, and
    the EarlyStop reaches the caller."""
    if stage not in STAGES:
        raise ValueError(f"stage must be one of {STAGES}, got {stage!r}")
    started_group = not torch.distributed.is_initialized()
    info = init_process()
    try:
        return _run(cfg, stage, info, on_eval)
    except BaseException as err:
        # The traceback's frames hold _run's locals (the DDP wrapper among them): free them before shutdown().
        traceback.clear_frames(err.__traceback__)
        raise
    finally:
        if started_group:
            shutdown()


def _run(cfg: PipelineConfig, stage: str, info: ProcessInfo,
         on_eval: Callable[[int, Mapping[str, float]], None] | None) -> dict[str, Any]:
    out = Outputs.of(cfg, stage)
    built = _build(cfg, stage, info)
    client = s3_client(cfg.data.shards.s3) if cfg.paths.checkpoints.startswith("s3://") else None
    checkpointer = Checkpointer(join(cfg.paths.checkpoints, stage), info=info, keep_last=cfg.train.keep_last,
                                s3_client=client, fingerprint=stage_identity(cfg, out.name))
    checkpointer.discard_unresumable()
    resume_run = checkpointer.resumable_run_id() if info.is_main else None
    with StageRun(cfg, stage, info, resume_run_id=resume_run) as run:
        checkpointer.run_id = run.run_id
        trainer = _trainer(cfg, stage, info, built, checkpointer, run, on_eval)
        if trainer.resume() is not None:
            run.set_tags({"resumed_from_step": trainer.resumed_from})
        run.set_tags({"frozen_parameters": len(built.unused.frozen), "trainable_parameters": built.trainable,
                      "identity": checkpointer.fingerprint,
                      **{f"init_from.{k}": v for k, v in built.init_from.items()}})
        try:
            summary = trainer.fit()
        except EarlyStop as stop:
            _write_curves(out, stage, info, trainer)
            run.stopped(str(stop))
            raise
        except Preempted as stop:  # the next run of this identity resumes the checkpoint (and this MLflow run)
            if stop.checkpoint is not None:
                run.log_checkpoint(stop.step, stop.checkpoint)
            run.preempted(str(stop))
            raise
        for step in checkpointer.steps():
            run.log_checkpoint(step, checkpointer.uri(step))
        result = _finish(cfg, stage, info, out, built, trainer, summary, checkpointer, run)
        checkpointer.mark_complete(summary["steps"])  # last: a run killed before this resumes and finishes again
    return result


def _build(cfg: PipelineConfig, stage: str, info: ProcessInfo) -> Built:
    tc = cfg.train
    settings = LoopSettings.from_config(tc, stage, select_metric=SELECT_METRIC if stage == "joint" else None)
    micro = settings.micro_batch(info.world_size)
    device = resolve_device(tc.device, info)
    set_determinism(tc.deterministic)
    artifacts = Path(cfg.paths.artifacts)
    tokenizer = load_tokenizer(artifacts / "tokenizer")
    codebook = None
    if stage != "text" or (artifacts / "codebook").exists():  # the text stage reads it only for its size
        codebook = load_codebook(artifacts / "codebook")
    model_cfg = cfg.model.build(vocab_size=len(tokenizer), codebook_size=codebook.num_codes if codebook else None)

    def factory() -> FlavaForPretraining:
        return FlavaForPretraining(model_cfg, codebook=codebook, seed=cfg.seed)  # the same weights on every rank

    model = factory()
    copied: dict[str, int] = {}
    init_from: dict[str, str] = {}
    if stage == "joint" and tc.joint.init_from:  # takes precedence over init_from_unimodal (train/config.py)
        copied = load_pretrained_weights(model, tc.joint.init_from)
        init_from = {"source": str(tc.joint.init_from), "sha256": checkpoint_sha256(tc.joint.init_from)}
    elif stage == "joint" and tc.joint.init_from_unimodal:
        copied = init_from_unimodal(model, Path(cfg.paths.models))
    model.to(device)
    streams = {
        kind: build_stream(cfg, CORPUS_OF_KIND[kind], batch_size=micro, rank=info.rank,
                           world_size=info.world_size, seed=cfg.seed, tokenizer=tokenizer, codebook=codebook)
        for kind in stage_kinds(cfg, stage)
    }
    stream = CorpusMixer(streams, cfg.data.mixing.ratios, seed=cfg.seed) if stage == "joint" else streams[stage]
    unused = UnusedParameters.setup(model, {kind: peek(s) for kind, s in streams.items()}, device,
                                    distributed=info.distributed)
    check_batch = None
    if model_cfg.validate_inputs and device.type != "cpu":  # the model's forward checks a batch on the CPU itself
        check_batch = partial(validate_batch, model_cfg, has_codebook=codebook is not None)
    # Per-rank random streams from here on (the probe's forward passes drew from them too).
    model.itm_generator.manual_seed(stream_seed(cfg.seed, info.rank, "itm"))
    seed_dropout(cfg.seed + 1000 * info.rank)
    wrapped = parallelize(model, tc, info, device)
    optimizer = build_optimizer(model, tc.optimizer, tc.stage_lr(stage), device)
    scheduler = build_scheduler(optimizer, tc.schedule, total_steps=settings.steps,
                                warmup_steps=tc.stage_warmup(stage))
    return Built(model=model, wrapped=wrapped, factory=factory, stream=stream, optimizer=optimizer,
                 scheduler=scheduler, unused=unused, check_batch=check_batch, copied=copied,
                 init_from=init_from,
                 trainable=sum(p.numel() for p in model.parameters() if p.requires_grad), tokenizer=tokenizer,
                 device=device, settings=settings, fsdp=tc.strategy == "fsdp" and info.distributed)


def require_zeroshot_eval(eval_root: Path) -> None:
    """The joint stage selects its checkpoint by zero-shot accuracy on the val split: say how to make that set
    before training starts, not at the first evaluation."""
    zs = eval_root / "zeroshot"
    missing = [p.name for p in (zs / "classes.json", zs / "val.jsonl") if not p.is_file()]
    if missing:
        raise ValueError(
            f"the joint stage selects its model by zero-shot accuracy on {zs}/val.jsonl, but {missing} do not exist. "
            "Make a zero-shot eval set and run `flava data prepare` again: under paths.raw/<data.ingest.eval_dir>/"
            'zeroshot/ write classes.json ({"classnames": [...], "templates": ["a photo of a {}."]}) and '
            'val.jsonl (rows {"image": <path>, "label": <class index>}), e.g. from held-out ImageNet-style class '
            "folders whose synsets a class-name map (data.ingest.images[].class_names) names")


def _zeroshot(cfg: PipelineConfig, info: ProcessInfo, built: Built) -> Callable[[], dict[str, float]]:
    """The joint stage's model-selection evaluation: zero-shot classification on the validation split."""
    eval_root = Path(cfg.paths.prepared) / "eval"
    require_zeroshot_eval(eval_root)
    transform = transform_from_config(cfg, train=False)

    def evaluate() -> dict[str, float]:
        target = built.model
        if built.fsdp:  # FSDP shards are gathered into a full copy on the main rank
            state = model_state(built.wrapped)
            if not info.is_main:
                return {}
            target = built.factory().to(built.device)
            target.load_state_dict(state)
        return evaluate_zeroshot(target, built.tokenizer, eval_root, split="val",
                                 batch_size=cfg.train.eval_batch_size, device=built.device, transform=transform,
                                 max_length=cfg.data.tokenizer.max_length)

    return evaluate


def _trainer(cfg: PipelineConfig, stage: str, info: ProcessInfo, built: Built, checkpointer: Checkpointer,
             run: StageRun, on_eval: Callable[[int, Mapping[str, float]], None] | None = None) -> Trainer:
    model_cfg = built.model.config
    peak = peak_flops(built.device, cfg.train.peak_tflops)
    return Trainer(
        model=built.wrapped, optimizer=built.optimizer, scheduler=built.scheduler, stream=built.stream,
        settings=built.settings, device=built.device, info=info,
        scaler=grad_scaler(built.device, cfg.train.precision), checkpointer=checkpointer, unused=built.unused,
        check_batch=built.check_batch,
        evaluate=_zeroshot(cfg, info, built) if stage == "joint" else None, evaluate_on_all_ranks=built.fsdp,
        on_eval=on_eval,
        sink=run.log_metrics, flops_per_batch=(lambda batch: step_flops(model_cfg, batch)) if peak else None,
        peak_flops=peak, progress=Progress(stage, built.settings.steps, enabled=info.is_main),
        generators={"itm": built.model.itm_generator},
    )


def _write_curves(out: Outputs, stage: str, info: ProcessInfo, trainer: Trainer) -> None:
    if not info.is_main:
        return
    (out.reports / "curves").mkdir(parents=True, exist_ok=True)
    out.curve(out.name).write_text(training_curve(trainer.history))
    if stage == "joint":
        out.curve("joint_zeroshot").write_text(zeroshot_curve(trainer.evals))


def _finish(cfg: PipelineConfig, stage: str, info: ProcessInfo, out: Outputs, built: Built, trainer: Trainer,
            summary: dict[str, Any], checkpointer: Checkpointer, run: StageRun) -> dict[str, Any]:
    """Export the models, write the reports and curves, log the model: the same files whether or not the run was
    interrupted (the best weights come from their checkpoint, the rows from the trainer's checkpointed records)."""
    state = model_state(built.wrapped) if built.fsdp else None  # a collective: every rank takes part
    if info.is_main:
        out.model_dir.parent.mkdir(parents=True, exist_ok=True)
        last = built.model
        if built.fsdp:
            last = built.factory()
            last.load_state_dict(state)
        write_model_dir(last, out.model_dir, out.tokenizer_dir)
        if out.best_dir is not None:
            _export_best(out, built, trainer, checkpointer)
    barrier()
    metrics = _metrics(stage, info, built, trainer, summary)
    record = {"stage": stage, "identity": checkpointer.fingerprint, "resumed_from": summary["resumed_from"],
              "samples_per_s": (trainer.history[-1] if trainer.history else {}).get("samples_per_s"),
              "model_dir": str(out.model_dir), "best_dir": str(out.best_dir) if out.best_dir else None,
              "checkpoint": checkpointer.uri(checkpointer.latest()) if checkpointer.latest() is not None else None}
    if built.init_from:
        record["init_from_checkpoint"] = built.init_from
    if not info.is_main:
        return {**metrics, **record}
    _write_curves(out, stage, info, trainer)
    out.metrics_file.write_text(json.dumps(metrics, indent=2, sort_keys=True) + "\n")
    model_cfg = built.model.config
    preprocess = {"image_size": model_cfg.image.image_size, "mean": list(cfg.data.loader.mean),
                  "std": list(cfg.data.loader.std), "resample": cfg.data.loader.resample,
                  "max_length": cfg.data.tokenizer.max_length}
    record["model_uri"] = run.log_model(out.best_dir or out.model_dir, tokenizer_dir=Path(cfg.paths.artifacts)
                                        / "tokenizer", preprocess=preprocess,
                                        embedding_dim=model_cfg.projection_dim)
    record["mlflow_run_id"] = run.run_id
    out.run_file.write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    run.log_metrics(summary["steps"], {k: v for k, v in metrics.items()
                                       if isinstance(v, float) and k.startswith(("best_", "zeroshot_"))})
    run.log_dict(metrics, f"reports/{out.metrics_file.name}")
    run.log_dict(record, f"reports/{out.run_file.name}")
    return {**metrics, **record}


def _export_best(out: Outputs, built: Built, trainer: Trainer, checkpointer: Checkpointer) -> None:
    """(main rank) ``models/joint/best`` from the checkpoint of the best step, kept through pruning while the run
    went on, with its ``selection.json``."""
    best = trainer.state.best_step
    if best is None:
        raise RuntimeError(f"{out.name}: no evaluation selected a best model (train.eval_every runs at the last "
                           "step too, so a finished run always has one)")
    if best not in checkpointer.steps():
        raise RuntimeError(f"{out.name}: the checkpoint of the best step {best} is missing under "
                           f"{checkpointer.root_uri()}; it is kept until the run finishes")
    model = built.factory()
    model.load_state_dict(checkpointer.weights(best))
    selection = json.dumps({"step": best, **trainer.state.best_eval}, indent=2)
    write_model_dir(model, out.best_dir, out.tokenizer_dir, {"selection.json": selection})


def _metrics(stage: str, info: ProcessInfo, built: Built, trainer: Trainer, summary: dict[str, Any]) -> dict:
    """The stage's metrics: deterministic numbers only (same params and data, same values, resumed or not)."""
    history = trainer.history
    first, last = (history[0] if history else {}), (history[-1] if history else {})
    metrics: dict[str, Any] = {
        "steps": summary["steps"],
        "samples": summary["samples"],
        "world_size": info.world_size,
        "skipped_steps": summary["skipped_steps"],
        "first_loss": first.get("loss"),
        "final_loss": last.get("loss"),
        "final_losses": {k: v for k, v in last.items() if k.startswith("loss_")},
        "trainable_parameters": built.trainable,
        "frozen_parameters": len(built.unused.frozen),
    }
    if stage == "joint":
        metrics["init_from" if built.init_from else "init_from_unimodal"] = {k: int(v) for k, v in built.copied.items()}
        metrics["best_step"] = summary["best_step"]
        metrics["best_zeroshot_top1"] = summary["best_metric"]
        for key, value in summary["last_eval"].items():
            metrics[f"zeroshot_{key}"] = value
        metrics["mixing_counts"] = dict(getattr(trainer.stream, "counts", {}))
    return metrics
