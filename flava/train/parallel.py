"""Device choice, mixed precision, and parallelism applied to a built model, in one documented order.

``parallelize`` applies (1) activation checkpointing, (2) ``torch.compile`` and (3) DDP or FSDP, as torchtitan
does: checkpointing wraps the blocks that compile then traces, and the data-parallel wrapper sees the final graph.

Batch kinds that leave parameters unused under DDP: ``flava.train.unused``.
"""
from __future__ import annotations

import contextlib
import logging
import os
from types import SimpleNamespace
from typing import Any, Mapping

import torch
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import apply_activation_checkpointing as wrap_blocks
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.nn.parallel import DistributedDataParallel

from flava.distributed import ProcessInfo
from flava.train.config import TrainConfig

log = logging.getLogger(__name__)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(choice: str, info: ProcessInfo) -> torch.device:
    if choice == "cuda" or (choice == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ValueError("train.device=cuda but no CUDA device is available")
        return torch.device("cuda", info.local_rank)
    return torch.device("cpu")


def set_determinism(enabled: bool) -> None:
    """Deterministic kernels (CUDA needs ``CUBLAS_WORKSPACE_CONFIG``; set it before the first cuBLAS call)."""
    if not enabled:
        return
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.benchmark = False


def autocast(device: torch.device, precision: str):
    """bf16/fp16 autocast for the forward pass; a no-op context in fp32."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=DTYPES[precision])


def grad_scaler(device: torch.device, precision: str) -> torch.amp.GradScaler | None:
    """fp16 needs loss scaling (its range underflows small gradients); bf16 and fp32 do not."""
    return torch.amp.GradScaler(device.type) if precision == "fp16" else None


# ------------------------------------------------------------------------------------------------ parallelize
def _repeated_blocks(model: nn.Module) -> list[nn.Module]:
    """The transformer blocks: the children of every ``nn.ModuleList``."""
    return [child for module in model.modules() if isinstance(module, nn.ModuleList) for child in module]


def compile_regions(model: nn.Module) -> None:
    """``torch.compile`` each repeated block in place (the whole model if it has none); see ``parallelize``."""
    for region in _repeated_blocks(model) or [model]:
        region.compile()


def apply_activation_checkpointing(model: nn.Module) -> None:
    if hasattr(model, "set_activation_checkpointing"):
        model.set_activation_checkpointing(True)  # the model recomputes its own blocks
        return
    blocks = set(map(id, _repeated_blocks(model)))
    wrap_blocks(model, check_fn=lambda m: id(m) in blocks)


def parallelize(model: nn.Module, cfg: TrainConfig, info: ProcessInfo, device: torch.device) -> nn.Module:
    """AC -> compile -> DDP/FSDP on an already built model (on ``device``). Returns the module to train with.

    ``torch.compile`` is regional: each transformer block is compiled in place (``Module.compile``; parameter
    names and state dicts are unchanged) and the code around the blocks -- input checks, the padding packing with
    its data-dependent shapes, heads and losses -- stays eager. The blocks are where the time is, and blocks of the
    same shape reuse one compilation, so this compiles much faster than the whole model, which breaks into many
    graphs at the packing's host syncs (figures: benchmarks/README.md, "Figures cited by the code"). A model without
    repeated blocks is compiled whole. Under FSDP each block is also its own shard unit (as torchtitan does)."""
    if cfg.activation_checkpointing:
        apply_activation_checkpointing(model)
    if cfg.compile:
        compile_regions(model)
    if cfg.strategy == "fsdp" and info.distributed:
        mp = MixedPrecisionPolicy(param_dtype=DTYPES[cfg.precision], reduce_dtype=torch.float32)
        for block in _repeated_blocks(model):
            fully_shard(block, mp_policy=mp)
        _pytree_outputs(model)
        fully_shard(model, mp_policy=mp)
        return model
    if info.distributed:
        ids = [device.index] if device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids, find_unused_parameters=False)
    return model


def _pytree_outputs(module: nn.Module) -> None:
    """FSDP2 finds the forward output's tensors with pytree to hook its reduce-scatter into backward; an output
    object pytree does not know (a dataclass, a namespace) would leave the gradients unreduced. The instance's
    forward is made to return a plain dict; ``as_output`` turns it back into attribute access."""
    inner = module.forward

    def forward(*args, **kwargs):
        out = inner(*args, **kwargs)
        if isinstance(out, (dict, tuple, list, torch.Tensor)):
            return out
        return {"loss": out.loss, "losses": dict(out.losses), "metrics": dict(getattr(out, "metrics", None) or {})}

    module.forward = forward


def as_output(out: Any) -> Any:
    """The model's output with ``.loss``/``.losses``/``.metrics`` (undoes ``_pytree_outputs``)."""
    if isinstance(out, dict) and "loss" in out:
        return SimpleNamespace(loss=out["loss"], losses=out.get("losses", {}), metrics=out.get("metrics", {}))
    return out


def no_sync(model: nn.Module, active: bool) -> contextlib.AbstractContextManager:
    """Skip DDP's gradient all-reduce on accumulation micro-steps (FSDP2: defer the reduce-scatter)."""
    if not active:
        return contextlib.nullcontext()
    if hasattr(model, "no_sync"):
        return model.no_sync()
    if hasattr(model, "set_requires_gradient_sync"):
        return _fsdp_no_sync(model)
    return contextlib.nullcontext()


@contextlib.contextmanager
def _fsdp_no_sync(model: nn.Module):
    model.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


def move_batch(batch: Mapping[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}

