"""Parameters a batch kind leaves without a gradient: found, frozen or guarded in one place.

Each batch kind trains part of the model: a text batch leaves FLAVA's image tower and MIM head without a gradient,
an image batch the text tower, a pair batch the MIM and MLM heads. DDP requires every parameter to receive a
gradient on every step unless it is wrapped with ``find_unused_parameters=True``, which traverses the autograd
graph on every step. Instead, ``UnusedParameters.setup`` runs once before training (on the unwrapped model, before
the optimizer is built):

1. ``probe_unused``: one forward/backward per batch kind finds the trainable parameters that kind leaves unused
   (on real batches: ``peek`` takes each stream's first batch and rewinds the stream);
2. ``freeze_never_used``: parameters no kind of the stage uses are frozen, in one process too, so neither the
   optimizer nor DDP holds them (the text stage never trains the image tower);
3. under DDP the model adds an exact-zero term over its parameters to the loss (``touch_unused_parameters``), so
   DDP's reducer sees a fixed set; after backward the trainer calls ``clear`` with the step's batch kinds, which
   drops the (zero) gradients of the parameters none of them used, so AdamW skips them exactly as in one process.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

import torch
from torch import nn

from flava.train.checkpoint import capture_rng, restore_rng
from flava.train.parallel import move_batch


def peek(stream: Any) -> dict[str, Any]:
    """One batch from ``stream`` without moving it: the position is restored from its state dict."""
    state = stream.state_dict()
    batch = next(stream)
    stream.load_state_dict(state)
    return batch


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
            out = model(move_batch(batch, device))
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


@dataclass
class UnusedParameters:
    """The names of the trainable parameters each batch kind leaves unused, and of those frozen (module docstring).
    ``clear`` looks the parameters up by name when it runs: FSDP replaces a module's parameters with sharded ones
    when it wraps the model, after ``setup``."""

    model: nn.Module = field(repr=False)
    by_kind: dict[str, list[str]]
    frozen: list[str]

    @classmethod
    def setup(
        cls,
        model: nn.Module,
        probes: Mapping[str, Mapping[str, Any]],
        device: torch.device,
        *,
        distributed: bool,
    ) -> UnusedParameters:
        """Probe ``model`` with one batch per kind (``probes``), freeze what no kind uses, and under DDP
        (``distributed``) turn on the model's exact-zero touch when some kind leaves parameters unused."""
        unused = probe_unused(model, probes, device)
        frozen = freeze_never_used(model, unused)
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        by_kind = {kind: sorted(names & trainable) for kind, names in unused.items()}
        if distributed and any(by_kind.values()):
            model.touch_unused_parameters = True
        return cls(model=model, by_kind=by_kind, frozen=frozen)

    def clear(self, kinds: Iterable[str]) -> None:
        """Drop the gradients of the parameters that none of ``kinds`` (the step's batch kinds) used."""
        kinds = list(kinds)
        if not kinds or not all(k in self.by_kind for k in kinds):
            return
        shared = set.intersection(*(set(self.by_kind[k]) for k in kinds))
        if not shared:
            return
        for name, param in self.model.named_parameters():
            if name in shared:
                param.grad = None
