"""The training loop: micro-steps with accumulation, mixed precision, clipping, divergence handling, periodic
logging, evaluation and checkpoints, and exact resume.

The loop owns none of the model, data, logging or evaluation: it is handed a built (and parallelised) model, an
optimizer and scheduler, an endless batch stream, and plain callables for metrics (``sink``), evaluation, the
best-model export and the batch check (``check_batch``, run on the host before a batch is copied to the device).
Everything a resumed run needs to end exactly as an uninterrupted one goes into its checkpoints:
the counters and best-model selection (``LoopState``), the logged rows and evaluations (``history``, ``evals``: what
reports and training curves are written from), the partial logging window and the state of the generators it is
handed (e.g. the model's ITM-negative generator).

SIGTERM or SIGINT while ``fit`` runs (a Kubernetes preemption, Ctrl-C) ends the run at the next step boundary: every
rank finishes the step it is in, the checkpoint of that step is saved, and ``flava.exitcodes.Preempted`` is raised
(the CLI exits 143). Whether to stop rides on the all-reduce each step already does for the non-finite check, so
the ranks agree on the step at no extra cost, whichever of them got the signal.

Anything the model returns that has ``.loss`` (scalar) and ``.losses`` (dict of scalars, and optionally
``.metrics``) can be trained, which is how the tests drive it with a tiny module.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterator, Mapping

import torch
import torch.distributed as dist
from torch import nn

from flava.distributed import ProcessInfo, broadcast_object
from flava.exitcodes import Preempted
from flava.train.checkpoint import Checkpointer, capture_rng, restore_rng
from flava.train.config import TrainConfig
from flava.train.parallel import as_output, autocast, move_batch, no_sync
from flava.train.progress import Progress
from flava.train.stop import EarlyStop, StopSignals
from flava.train.unused import UnusedParameters

log = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
    """The loss (or the gradient norm) became NaN/inf and the run was stopped after saving its last good state."""


@dataclass(frozen=True)
class LoopSettings:
    """The loop's view of ``TrainConfig`` for one stage."""

    stage: str
    steps: int
    global_batch: int
    accumulation: int = 1
    grad_clip: float | None = 1.0
    precision: str = "fp32"
    on_nonfinite: str = "stop"
    max_consecutive_skips: int = 10
    log_every: int = 10
    eval_every: int = 50
    checkpoint_every: int = 50
    select_metric: str | None = None  # key of the evaluation dict that picks the best checkpoint (higher = better)

    @classmethod
    def from_config(cls, cfg: TrainConfig, stage: str, select_metric: str | None = None) -> "LoopSettings":
        st = cfg.stage(stage)
        # Only a stage that selects a best model evaluates: the others do not read (depend on) eval_every.
        evaluation = {"eval_every": cfg.eval_every} if select_metric is not None else {}
        return cls(
            stage=stage, steps=st.steps, global_batch=st.batch_size, accumulation=cfg.accumulation,
            grad_clip=cfg.grad_clip, precision=cfg.precision, on_nonfinite=cfg.on_nonfinite,
            max_consecutive_skips=cfg.max_consecutive_skips, log_every=cfg.log_every,
            checkpoint_every=cfg.checkpoint_every, select_metric=select_metric, **evaluation,
        )

    def micro_batch(self, world_size: int) -> int:
        """Samples per rank per micro-step; the global batch must split evenly."""
        parts = world_size * self.accumulation
        if self.global_batch % parts:
            raise ValueError(
                f"train.{self.stage}.batch_size={self.global_batch} must be divisible by world size ({world_size}) x "
                f"train.accumulation ({self.accumulation})"
            )
        return self.global_batch // parts


@dataclass
class LoopState:
    step: int = 0  # optimizer steps taken (skipped non-finite steps included)
    samples: int = 0  # global samples consumed
    skipped: int = 0
    consecutive_skips: int = 0
    best_metric: float | None = None
    best_step: int | None = None
    best_eval: dict[str, float] = field(default_factory=dict)  # the whole evaluation at best_step
    last_eval: dict[str, float] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


Sink = Callable[[int, Mapping[str, float]], None]


class Trainer:
    def __init__(
        self,
        *,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LRScheduler,
        stream: Iterator[Mapping[str, Any]],
        settings: LoopSettings,
        device: torch.device,
        info: ProcessInfo = ProcessInfo(),
        scaler: torch.amp.GradScaler | None = None,
        checkpointer: Checkpointer | None = None,
        unused: UnusedParameters | None = None,
        check_batch: Callable[[Mapping[str, Any]], None] | None = None,
        evaluate: Callable[[], Mapping[str, float]] | None = None,
        evaluate_on_all_ranks: bool = False,
        on_best: Callable[[int, Mapping[str, float]], None] | None = None,
        on_eval: Callable[[int, Mapping[str, float]], None] | None = None,
        sink: Sink | None = None,
        flops_per_batch: Callable[[Mapping[str, Any]], float] | None = None,
        peak_flops: float | None = None,
        progress: Progress | None = None,
        generators: Mapping[str, torch.Generator] | None = None,
    ):
        self.model, self.optimizer, self.scheduler, self.stream = model, optimizer, scheduler, stream
        self.settings, self.device, self.info, self.scaler = settings, device, info, scaler
        self.checkpointer, self.unused, self.check_batch = checkpointer, unused, check_batch
        self.evaluate, self.evaluate_on_all_ranks, self.on_best = evaluate, evaluate_on_all_ranks, on_best
        # (step, this evaluation's results) after each evaluation; may raise EarlyStop (a sweep's pruner)
        self.on_eval = on_eval
        self.sink, self.flops_per_batch, self.peak_flops = sink, flops_per_batch, peak_flops
        self.progress = progress or Progress(settings.stage, settings.steps, enabled=False)
        self.generators = dict(generators or {})  # per-rank random streams the model draws from, checkpointed
        self.state = LoopState()
        self.history: list[dict[str, float]] = []  # one row per logged step
        self.evals: list[dict[str, float]] = []  # one row per evaluation: {"step": ..., **results}
        self.resumed_from: int | None = None
        self.signals = StopSignals()  # installed while fit() runs
        self._stop_requested = False  # some rank got a stop signal: agreed on by all ranks at the last step
        self._params = [p for p in model.parameters() if p.requires_grad]
        # Parameter constraints the model keeps itself (FLAVA's logit-scale clamp), re-applied after each update
        # because under FSDP the in-forward clamp only touches the unsharded copy.
        self._after_update = getattr(getattr(model, "module", model), "clamp_logit_scale_", None)
        settings.micro_batch(info.world_size)  # validate the split early
        self._reset_window()

    # ------------------------------------------------------------------------------------------------ resume
    def resume(self) -> int | None:
        """Load the latest complete checkpoint, if any (model, optimizer, scheduler, scaler, RNG, data position)."""
        if self.checkpointer is None:
            return None
        step = self.checkpointer.latest()
        if step is None:
            return None
        restored = self.checkpointer.load(
            step, model=self.model, optimizer=self.optimizer, scheduler=self.scheduler, scaler=self.scaler
        )
        if restored.data_state is not None and hasattr(self.stream, "load_state_dict"):
            self.stream.load_state_dict(restored.data_state)
        self.state = LoopState(**restored.extra) if restored.extra else LoopState(step=restored.step)
        self.history = [dict(row) for row in restored.records.get("history", [])]
        self.evals = [dict(row) for row in restored.records.get("evals", [])]
        for name, state in restored.rank_state.get("generators", {}).items():
            if name not in self.generators:
                raise ValueError(f"checkpoint {self.checkpointer.uri(step)} holds generator {name!r}, which this "
                                 f"trainer was not given (it has {sorted(self.generators)})")
            self.generators[name].set_state(state)
        if "window" in restored.rank_state:
            self._load_window(restored.rank_state["window"])
        self.resumed_from = step
        log.info("resumed %s from %s", self.settings.stage, self.checkpointer.uri(step))
        return step

    def save(self) -> str | None:
        if self.checkpointer is None:
            return None
        keep = {self.state.best_step} if self.state.best_step is not None else set()
        return self.checkpointer.save(
            self.state.step, model=self.model, optimizer=self.optimizer, scheduler=self.scheduler,
            scaler=self.scaler, data_state=self.stream.state_dict() if hasattr(self.stream, "state_dict") else None,
            extra=self.state.as_dict(), keep=keep, records={"history": self.history, "evals": self.evals},
            rank_state={"generators": {k: g.get_state() for k, g in self.generators.items()},
                        "window": self._window_state()},
        )

    # -------------------------------------------------------------------------------------------------- fit
    def fit(self) -> dict[str, Any]:
        s = self.settings
        self.progress.total = s.steps
        self._stop_requested = False
        try:
            with self.signals:
                while self.state.step < s.steps:
                    self._train_step()
                    step = self.state.step
                    metrics = self._log() if step % s.log_every == 0 or step == s.steps else None
                    self.progress.update(step, metrics)
                    if self.evaluate is not None and (step % s.eval_every == 0 or step == s.steps):
                        self._evaluate()
                    if step % s.checkpoint_every == 0 or step == s.steps:
                        self.save()
                    if self._stop_requested and step < s.steps:  # at the last step the run is complete anyway
                        self._preempt()
        finally:
            self.progress.close()
        return self.summary()

    def _preempt(self) -> None:
        """Save the checkpoint of this step boundary (every rank takes part) and raise ``Preempted``."""
        step = self.state.step
        got = self.signals.received
        why = got.name if got is not None else "a stop signal on another rank"
        log.warning("%s: %s: saving a checkpoint at step %d and stopping", self.settings.stage, why, step)
        uri = self.save()
        raise Preempted(f"{self.settings.stage}: {why} at step {step}/{self.settings.steps}; checkpoint: {uri}",
                        step=step, checkpoint=uri)

    def summary(self) -> dict[str, Any]:
        last = self.history[-1] if self.history else {}
        return {
            "steps": self.state.step,
            "samples": self.state.samples,
            "skipped_steps": self.state.skipped,
            "resumed_from": self.resumed_from,
            "best_metric": self.state.best_metric,
            "best_step": self.state.best_step,
            "final": {k: v for k, v in last.items()},
            "last_eval": dict(self.state.last_eval),
        }

    # ------------------------------------------------------------------------------------------------ steps
    def _train_step(self) -> None:
        s = self.settings
        started = time.perf_counter()
        self.model.train()
        bad = torch.zeros((), device=self.device)
        kinds: list[str] = []
        flops = 0.0
        for micro in range(s.accumulation):
            batch = next(self.stream)
            kind = batch.get("kind", "default")
            kinds.append(kind)
            if self.flops_per_batch is not None:
                flops += self.flops_per_batch(batch)
            if self.check_batch is not None:  # on the host, before the copy: no device sync
                self.check_batch(batch)
            batch = move_batch(batch, self.device)
            with no_sync(self.model, micro < s.accumulation - 1):
                with autocast(self.device, s.precision):
                    out = as_output(self.model(batch))
                loss = out.loss.float()
                bad += (~torch.isfinite(loss)).float()
                scaled = loss / s.accumulation
                (self.scaler.scale(scaled) if self.scaler is not None else scaled).backward()
            self._accumulate(out)
        if self.unused is not None:
            self.unused.clear(kinds)
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        grad_norm = self._clip()
        if self.scaler is None:  # fp16 overflow in the gradients is the scaler's business, not divergence
            bad += (~torch.isfinite(grad_norm)).float()
        if self._step_flags(bad):
            self._nonfinite(kinds)
        else:
            lr = self.optimizer.param_groups[0]["lr"]
            if self.scaler is not None:
                self.scaler.step(self.optimizer)
                self.scaler.update()
            else:
                self.optimizer.step()
            if self._after_update is not None:
                with torch.no_grad():
                    self._after_update()
            self.state.consecutive_skips = 0
            self._window["grad_norm"] += float(grad_norm)
            self._window["lr"] = lr
            self._window["updates"] += 1
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        self.state.step += 1
        self.state.samples += s.global_batch
        self._window["samples"] += s.global_batch
        self._window["flops"] += flops
        self._window["time"] += time.perf_counter() - started

    def _clip(self) -> torch.Tensor:
        clip = self.settings.grad_clip
        if clip is not None:
            norm = torch.nn.utils.clip_grad_norm_(self._params, clip, foreach=True)
        else:
            norm = torch.nn.utils.get_total_norm([p.grad for p in self._params if p.grad is not None], foreach=True)
        if hasattr(norm, "full_tensor"):  # DTensor under FSDP
            norm = norm.full_tensor()
        return norm.detach()

    def _step_flags(self, bad: torch.Tensor) -> bool:
        """One all-reduce per step answers both questions: was any rank's loss or gradient non-finite (returned),
        and did any rank get a stop signal (``_stop_requested``, acted on at the end of this step)."""
        flags = torch.stack([bad, bad.new_full((), float(self.signals.received is not None))])
        if self.info.distributed and dist.is_initialized():
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        nonfinite, stop = (value > 0 for value in flags.tolist())
        self._stop_requested = self._stop_requested or stop
        return nonfinite

    def _any_rank(self, flag: torch.Tensor) -> bool:
        if self.info.distributed and dist.is_initialized():
            flag = flag.clone()
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item() > 0)

    def _nonfinite(self, kinds: list[str]) -> None:
        step = self.state.step
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler is not None:
            self.scaler.update()  # unscale_ ran: close the iteration (the scale drops, as after an overflow)
        if self.settings.on_nonfinite == "skip":
            self.state.skipped += 1
            self.state.consecutive_skips += 1
            self.progress.message(f"{self.settings.stage}: non-finite loss at step {step} ({kinds}), step skipped")
            if self.state.consecutive_skips >= self.settings.max_consecutive_skips:
                uri = self._save_last_good()
                raise NonFiniteLossError(
                    f"{self.settings.stage}: {self.state.consecutive_skips} consecutive non-finite steps up to step "
                    f"{step} (train.max_consecutive_skips); last good checkpoint: {uri}"
                )
            return
        uri = self._save_last_good()
        raise NonFiniteLossError(
            f"{self.settings.stage}: non-finite loss or gradient norm at step {step} (batch kinds {kinds}); the "
            f"weights were not updated and the last good state is saved at {uri}. Lower the learning rate, "
            "check the data, or set train.on_nonfinite=skip to skip such steps."
        )

    def _save_last_good(self) -> str | None:
        """Save the current (not yet updated) weights, unless they are themselves non-finite; never replaces an
        existing checkpoint (the checkpointer refuses to re-save a step)."""
        finite = torch.ones((), device=self.device)
        for p in self.model.parameters():
            local = p.to_local() if hasattr(p, "to_local") else p
            if not torch.isfinite(local).all():
                finite.zero_()
                break
        if not self._any_rank(1.0 - finite):
            return self.save()
        log.error("the weights themselves are non-finite: keeping the previous checkpoint")
        latest = self.checkpointer.latest() if self.checkpointer is not None else None
        return self.checkpointer.uri(latest) if latest is not None else None

    # ------------------------------------------------------------------------------------------ metrics, eval
    def _reset_window(self) -> None:
        self._window: dict[str, float] = {"grad_norm": 0.0, "lr": 0.0, "updates": 0, "samples": 0, "flops": 0.0,
                                          "time": 0.0}
        self._sums: dict[str, torch.Tensor] = {}
        self._counts: dict[str, int] = {}

    def _window_state(self) -> dict[str, Any]:
        """The partial logging window (a checkpoint may fall between two logged steps)."""
        return {"values": dict(self._window), "counts": dict(self._counts),
                "sums": {k: v.detach().cpu() for k, v in self._sums.items()}}

    def _load_window(self, state: Mapping[str, Any]) -> None:
        self._window = dict(state["values"])
        self._counts = dict(state["counts"])
        self._sums = {k: v.to(self.device) for k, v in state["sums"].items()}

    def _accumulate(self, out: Any) -> None:
        values = {"loss": out.loss}
        values.update({f"loss_{k}": v for k, v in out.losses.items()})
        values.update(getattr(out, "metrics", {}) or {})
        for name, value in values.items():
            value = value.detach().float()
            self._sums[name] = self._sums.get(name, torch.zeros((), device=self.device)) + value
            self._counts[name] = self._counts.get(name, 0) + 1

    def _log(self) -> dict[str, float]:
        """Window means over ranks (every rank calls this; the batch kinds, hence the keys, agree across ranks)."""
        names = sorted(self._sums)
        if names:
            sums = torch.stack([self._sums[n] for n in names])
            if self.info.distributed and dist.is_initialized():
                dist.all_reduce(sums)
                sums /= self.info.world_size
            means = {n: float(v) / self._counts[n] for n, v in zip(names, sums.tolist())}
        else:
            means = {}
        w = self._window
        metrics = dict(means)
        if w["updates"]:
            metrics["grad_norm"] = w["grad_norm"] / w["updates"]
            metrics["lr"] = w["lr"]
        if w["time"] > 0:
            metrics["samples_per_s"] = w["samples"] / w["time"]
            if self.peak_flops and w["flops"]:
                metrics["mfu"] = w["flops"] / w["time"] / self.peak_flops
        metrics["skipped_steps"] = float(self.state.skipped)
        if self.scaler is not None:
            metrics["loss_scale"] = float(self.scaler.get_scale())
        metrics = {k: v for k, v in metrics.items() if math.isfinite(v) or k.startswith("loss")}
        self.history.append({"step": float(self.state.step), **metrics})
        if self.sink is not None and self.info.is_main:
            self.sink(self.state.step, metrics)
        self._reset_window()
        return metrics

    def _evaluate(self) -> None:
        """Run the evaluation (main rank, or every rank under FSDP), share the result, track the best."""
        results: Mapping[str, float] | None = None
        if self.info.is_main or self.evaluate_on_all_ranks:
            rng = capture_rng()  # evaluation must not shift the training RNG streams
            try:
                results = dict(self.evaluate())
            finally:
                restore_rng(rng)
        results = broadcast_object(results)
        step = self.state.step
        self.state.last_eval = {k: float(v) for k, v in results.items()}
        self.evals.append({"step": float(step), **self.state.last_eval})
        if self.sink is not None and self.info.is_main:
            self.sink(step, {f"eval_{k}": float(v) for k, v in results.items()})
        key = self.settings.select_metric
        if key is None:
            return
        if key not in results:
            raise ValueError(f"evaluation returned {sorted(results)}, no {key!r} to select the best checkpoint by")
        value = float(results[key])
        self.progress.message(f"{self.settings.stage} step {step}: eval {key}={value:.4f}")
        if self.state.best_metric is None or value > self.state.best_metric:
            self.state.best_metric, self.state.best_step = value, step
            self.state.best_eval = dict(self.state.last_eval)
            if self.on_best is not None:
                self.on_best(step, results)
            if step % self.settings.checkpoint_every and step != self.settings.steps:
                self.save()  # the best is kept as a trainer checkpoint too
        if self.on_eval is not None:
            self._ask_to_continue(step)

    def _ask_to_continue(self, step: int) -> None:
        """``on_eval`` decides on the main rank; every rank stops together when it raises ``EarlyStop``."""
        reason = None
        if self.info.is_main:
            try:
                self.on_eval(step, self.state.last_eval)
            except EarlyStop as stop:
                reason = str(stop)
        reason = broadcast_object(reason)
        if reason is not None:
            raise EarlyStop(reason)
