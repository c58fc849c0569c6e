"""AdamW with decay/no-decay parameter groups and the warm-up + decay learning-rate schedule.

No weight decay on biases, norm scales, CLS/position/mask tokens and the contrastive logit scale: decaying them
pulls embeddings and temperatures towards zero for no regularisation benefit (BERT, CLIP and FLAVA all exempt them).
"""
from __future__ import annotations

import math
from functools import partial

import torch
from torch import nn

from flava.train.config import OptimizerConfig, ScheduleConfig


def is_no_decay(name: str, param: torch.Tensor, patterns: list[str]) -> bool:
    """True for 1-D (or scalar) parameters and for names containing one of ``patterns`` (case-insensitive)."""
    lowered = name.lower()
    return param.ndim < 2 or any(pattern.lower() in lowered for pattern in patterns)


def param_groups(model: nn.Module, cfg: OptimizerConfig) -> list[dict]:
    """Two AdamW groups over the trainable parameters: ``decay`` and ``no_decay`` (each named, for logging)."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (no_decay if is_no_decay(name, param, cfg.no_decay) else decay).append(param)
    if not decay and not no_decay:
        raise ValueError("the model has no trainable parameters")
    groups = [
        {"name": "decay", "params": decay, "weight_decay": cfg.weight_decay},
        {"name": "no_decay", "params": no_decay, "weight_decay": 0.0},
    ]
    return [g for g in groups if g["params"]]


# Devices with torch's fused (single-kernel) AdamW: CUDA since torch 2.0, CPU since 2.4 (below pyproject's floor), and
# the other accelerators torch lists. It is the default there because one kernel over all parameters steps much
# faster than the foreach implementation or the per-tensor loop (figures: benchmarks/README.md, "Figures cited by
# the code").
FUSED_ADAMW_DEVICES = ("cuda", "cpu", "xpu", "mps", "hpu")


def fused_supported(device: torch.device) -> bool:
    return device.type in FUSED_ADAMW_DEVICES


def build_optimizer(model: nn.Module, cfg: OptimizerConfig, lr: float, device: torch.device) -> torch.optim.AdamW:
    """AdamW at peak ``lr``; fused kernels when asked for, or by default where the device has them."""
    fused = fused_supported(device) if cfg.fused is None else cfg.fused
    if fused and not fused_supported(device):
        raise ValueError(f"train.optimizer.fused=true needs one of the devices {FUSED_ADAMW_DEVICES}, training "
                         f"runs on {device.type}")
    return torch.optim.AdamW(
        param_groups(model, cfg), lr=lr, betas=tuple(cfg.betas), eps=cfg.eps, fused=fused or None,
        foreach=None if fused else True,
    )


def lr_factor(step: int, *, warmup: int, total: int, decay: str, min_ratio: float) -> float:
    """Multiplier of the peak lr for optimizer step ``step`` (0-based).

    Warm-up rises linearly to 1 over ``warmup`` steps (the first step already gets ``1/warmup``, never 0); then
    the factor decays from 1 to ``min_ratio`` by the last step ``total - 1`` (cosine or linear), or stays at 1.
    """
    if step < warmup:
        return (step + 1) / warmup
    if decay == "constant":
        return 1.0
    span = max(1, total - 1 - warmup)
    progress = min(1.0, (step - warmup) / span)
    if decay == "cosine":
        shape = 0.5 * (1.0 + math.cos(math.pi * progress))
    elif decay == "linear":
        shape = 1.0 - progress
    else:
        raise ValueError(f"train.schedule.decay must be cosine, linear or constant, got {decay!r}")
    return min_ratio + (1.0 - min_ratio) * shape


def build_scheduler(
    optimizer: torch.optim.Optimizer, cfg: ScheduleConfig, *, total_steps: int, warmup_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """A ``LambdaLR`` stepped once per optimizer step; its state dict holds only numbers (weights_only-safe)."""
    fn = partial(lr_factor, warmup=warmup_steps, total=total_steps, decay=cfg.decay, min_ratio=cfg.min_lr_ratio)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, fn)
