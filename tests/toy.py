"""A tiny model and batch stream that drive the generic trainer in tests (and in subprocesses via ``main``).

``ToyStream`` draws each *global* batch from a generator seeded by (seed, batch index) and hands rank ``r`` its
slice, so 1 process with global batch B and 2 ranks with B/2 each see exactly the same samples. ``ToyModel`` has a
shared trunk and one head per batch kind, like FLAVA's per-kind heads.

Run as ``python -m tests.toy --ckpt DIR --out FILE [...]`` (also under torchrun). Its own tests:
``tests/unit/test_toy.py``.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch
from torch import nn

from flava.distributed import ProcessInfo


class ToyStream:
    def __init__(self, *, batch_size: int, seed: int = 0, rank: int = 0, world_size: int = 1,
                 kinds: tuple[str, ...] = ("a", "b"), dim: int = 8, nan_at: int | None = None,
                 nan_until: int | None = None):
        self.batch_size, self.seed, self.rank, self.world_size = batch_size, seed, rank, world_size
        self.kinds, self.dim, self.nan_at, self.nan_until = kinds, dim, nan_at, nan_until
        self.index = 0

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + self.index)
        total = self.batch_size * self.world_size
        x = torch.randn(total, self.dim, generator=gen)
        w = torch.linspace(-1, 1, self.dim)
        y = x @ w + 0.1 * torch.randn(total, generator=gen)
        kind = self.kinds[int(torch.randint(len(self.kinds), (1,), generator=gen))]
        lo = self.rank * self.batch_size
        batch = {"kind": kind, "x": x[lo:lo + self.batch_size], "y": y[lo:lo + self.batch_size]}
        until = self.nan_until if self.nan_until is not None else (self.nan_at + 1 if self.nan_at is not None else 0)
        if self.nan_at is not None and self.nan_at <= self.index < until:
            batch["x"] = torch.full_like(batch["x"], float("nan"))
        self.index += 1
        return batch

    def state_dict(self) -> dict:
        return {"index": self.index}

    def load_state_dict(self, state: dict) -> None:
        self.index = int(state["index"])


class ToyModel(nn.Module):
    def __init__(self, dim: int = 8, kinds: tuple[str, ...] = ("a", "b"), dropout: float = 0.1):
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(dim, 16), nn.GELU(), nn.LayerNorm(16), nn.Dropout(dropout))
        self.heads = nn.ModuleDict({k: nn.Linear(16, 1) for k in kinds})
        self.touch_unused_parameters = False

    def forward(self, batch):
        pred = self.heads[batch["kind"]](self.trunk(batch["x"])).squeeze(-1)
        mse = nn.functional.mse_loss(pred, batch["y"])
        loss = mse
        if self.touch_unused_parameters:
            loss = loss + sum(p.sum() * 0.0 for p in self.parameters() if p.requires_grad)
        return SimpleNamespace(loss=loss, losses={f"mse_{batch['kind']}": mse}, metrics={})


def toy_args(**kw) -> argparse.Namespace:
    """The arguments of ``main`` as a namespace, for building a toy run in-process."""
    base = dict(ckpt="", train="{}", seed=0, dropout=0.0, nan_at=None, nan_until=None, step_sleep=0.0, out="",
                select_metric=None)
    base.update(kw)
    if isinstance(base["train"], dict):
        base["train"] = json.dumps(base["train"])
    return argparse.Namespace(**{k: str(v) if k == "ckpt" else v for k, v in base.items()})


def build(args, info: ProcessInfo = ProcessInfo()):
    """Model, optimizer, scheduler, stream and trainer for a toy run (the stage code does the same for FLAVA)."""
    from flava.train.checkpoint import Checkpointer
    from flava.train.config import TrainConfig
    from flava.train.loop import LoopSettings, Trainer
    from flava.train.optim import build_optimizer, build_scheduler
    from flava.train.parallel import grad_scaler, parallelize
    from flava.train.unused import UnusedParameters

    cfg = TrainConfig.model_validate(json.loads(args.train or "{}"))
    device = torch.device("cpu")
    torch.manual_seed(args.seed)  # identical init on every rank
    model = ToyModel(dropout=args.dropout)
    stream = ToyStream(batch_size=cfg.joint.batch_size // info.world_size // cfg.accumulation, seed=args.seed,
                       rank=info.rank, world_size=info.world_size, nan_at=args.nan_at, nan_until=args.nan_until)
    probes = {k: {"kind": k, "x": torch.randn(2, 8), "y": torch.randn(2)} for k in ("a", "b")}
    unused = UnusedParameters.setup(model, probes, device, distributed=info.distributed)
    torch.manual_seed(args.seed + 1000 * info.rank)  # per-rank streams (dropout) from here on
    wrapped = parallelize(model, cfg, info, device)
    opt = build_optimizer(model, cfg.optimizer, cfg.stage_lr("joint"), device)
    sched = build_scheduler(opt, cfg.schedule, total_steps=cfg.joint.steps, warmup_steps=cfg.stage_warmup("joint"))
    settings = LoopSettings.from_config(cfg, "joint", select_metric=getattr(args, "select_metric", None))
    ckpt = Checkpointer(args.ckpt, info=info, keep_last=cfg.keep_last) if args.ckpt else None
    trainer = Trainer(model=wrapped, optimizer=opt, scheduler=sched, stream=stream, settings=settings, device=device,
                      info=info, scaler=grad_scaler(device, cfg.precision), checkpointer=ckpt,
                      unused=unused)
    return model, trainer


def main(argv=None) -> int:
    from flava.distributed import init_process, shutdown
    from flava.train.checkpoint import model_state, save_weights

    parser = argparse.ArgumentParser()
    parser.add_argument("--ckpt", default="")
    parser.add_argument("--out", required=True)
    parser.add_argument("--train", default="{}", help="TrainConfig as JSON")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dropout", type=float, default=0.0)
    parser.add_argument("--step-sleep", type=float, default=0.0)
    parser.add_argument("--nan-at", type=int, default=None)
    parser.add_argument("--nan-until", type=int, default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    info = init_process("gloo")
    model, trainer = build(args, info)
    trainer.resume()
    if args.step_sleep:  # slow the run down so a test can kill it in the middle
        inner = trainer._train_step

        def slow_step():
            inner()
            time.sleep(args.step_sleep)

        trainer._train_step = slow_step
    summary = trainer.fit()
    state = model_state(model)  # full weights (a collective under FSDP)
    if info.is_main:
        out = Path(args.out)
        save_weights(state, out)
        out.with_suffix(".json").write_text(json.dumps({"summary": summary, "history": trainer.history}))
    del model, trainer  # the DDP wrapper must die before the process group (see flava.distributed.shutdown)
    shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
