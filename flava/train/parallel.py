"""Device choice, mixed precision, and parallelism applied to a built model, in one documented order.

``parallelize`` applies (1) activation checkpointing, (2) ``torch.compile`` and (3) DDP or FSDP, as torchtitan
does: checkpointing wraps the blocks that compile then traces, and the data-parallel wrapper sees the final graph.

Per-kind heads under DDP: a text batch leaves the image tower and the MIM head without a gradient. Instead of
``find_unused_parameters=True`` (a graph traversal on every step), ``probe_unused`` finds, once before training,
which trainable parameters each batch kind leaves unused. Parameters no kind of the stage uses are frozen (the text
stage never trains the image tower, and neither the optimizer nor DDP holds them). For the others the model adds
an exact-zero term over its parameters (``touch_unused_parameters``) so DDP's reducer sees a fixed set, and the
trainer drops those zero gradients (``grad = None``) before the optimizer step, so AdamW skips them exactly as in a
single process.
"""
from __future__ import annotations

import contextlib
import logging
from types import SimpleNamespace
from typing import Any, Iterable, Mapping

import torch
from torch import nn

from flava.distributed import ProcessInfo
from flava.train.checkpoint import capture_rng, restore_rng
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
    import os

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


# --------------------------------------------------------------------------------------------- unused params
def _move(batch: Mapping[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def probe_unused(
    model: nn.Module, batches: Mapping[str, Mapping[str, Any]], device: torch.device
) -> dict[str, set[str]]:
    """For each batch kind, the names of trainable parameters that receive no gradient from one forward/backward.

    Runs on the unwrapped model before training; RNG states and gradients are left as they were found, so the
    probe does not change the training trajectory."""
    rng = capture_rng()
    touch = getattr(model, "touch_unused_parameters", None)
    if touch is not None:
        model.touch_unused_parameters = False
    unused: dict[str, set[str]] = {}
    try:
        for kind, batch in batches.items():
            model.zero_grad(set_to_none=True)
            out = model(_move(batch, device))
            out.loss.backward()
            unused[kind] = {n for n, p in model.named_parameters() if p.requires_grad and p.grad is None}
    finally:
        model.zero_grad(set_to_none=True)
        if touch is not None:
            model.touch_unused_parameters = touch
        restore_rng(rng)
    return unused


def freeze_never_used(model: nn.Module, unused: Mapping[str, set[str]]) -> list[str]:
    """Freeze the parameters that no batch kind of the stage uses; returns their names."""
    never = set.intersection(*map(set, unused.values())) if unused else set()
    for name, param in model.named_parameters():
        if name in never:
            param.requires_grad_(False)
    return sorted(never)


class UnusedGrads:
    """Drops the (zero) gradients DDP all-reduced for parameters the step's batch kinds did not use."""

    def __init__(self, model: nn.Module, unused: Mapping[str, set[str]]):
        params = dict(model.named_parameters())
        self.by_kind = {
            kind: [params[n] for n in sorted(names) if n in params and params[n].requires_grad]
            for kind, names in unused.items()
        }

    @property
    def any(self) -> bool:
        return any(self.by_kind.values())

    def clear(self, kinds: Iterable[str]) -> None:
        kinds = list(kinds)
        if not kinds or not all(k in self.by_kind for k in kinds):
            return
        shared = set(map(id, self.by_kind[kinds[0]]))
        for kind in kinds[1:]:
            shared &= set(map(id, self.by_kind[kind]))
        for param in self.by_kind[kinds[0]]:
            if id(param) in shared:
                param.grad = None


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
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import apply_activation_checkpointing as apply

    blocks = set(map(id, _repeated_blocks(model)))
    apply(model, check_fn=lambda m: id(m) in blocks)


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
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        mp = MixedPrecisionPolicy(param_dtype=DTYPES[cfg.precision], reduce_dtype=torch.float32)
        for block in _repeated_blocks(model):
            fully_shard(block, mp_policy=mp)
        _pytree_outputs(model)
        fully_shard(model, mp_policy=mp)
        return model
    if info.distributed:
        from torch.nn.parallel import DistributedDataParallel as DDP

        ids = [device.index] if device.type == "cuda" else None
        return DDP(model, device_ids=ids, find_unused_parameters=False)
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
    return _move(batch, device)

