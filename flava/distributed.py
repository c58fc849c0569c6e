"""Process setup and cross-rank helpers, in one place.

Rank and world size come from the torchrun environment. A single process (world size 1) never touches
``torch.distributed``; the model files never import it.
"""
from __future__ import annotations

import gc
import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ProcessInfo:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def process_info() -> ProcessInfo:
    """Rank/world size of this process, from the initialised group or else the torchrun environment."""
    if dist.is_available() and dist.is_initialized():
        return ProcessInfo(dist.get_rank(), int(os.environ.get("LOCAL_RANK", 0)), dist.get_world_size())
    return ProcessInfo(
        int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    )


def init_process(backend: str | None = None) -> ProcessInfo:
    """Join the process group when launched by torchrun with more than one rank; otherwise do nothing."""
    info = process_info()
    if info.world_size > 1 and not dist.is_initialized():
        backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
        if backend == "nccl":
            torch.cuda.set_device(info.local_rank)
        dist.init_process_group(backend=backend)
    return process_info()


def shutdown() -> None:
    """Leave the process group. Drop every DDP wrapper (and whatever holds one, e.g. a Trainer) first.

    Destroying a gloo group joins its worker threads, and a worker may need the GIL to free the tensors of the
    collective it just finished (our contrastive all-gather's backward, DDP's bucket all-reduce). The
    ``ProcessGroup`` binding releases the GIL while it is destroyed; DDP's ``Reducer`` binding does not. So if a
    DDP wrapper outlives ``destroy_process_group``, its Reducer later drops the last reference to the group with
    the GIL held and both threads wait for each other forever (pytorch/pytorch#56297). We saw exactly that in
    about half of the 2-rank benchmark runs, after the last step. Collecting garbage first frees wrappers that
    only reference cycles keep alive, so the group dies here, in the binding that releases the GIL.
    """
    if dist.is_available() and dist.is_initialized():
        gc.collect()
        alive = live_ddp_wrappers()
        if alive:
            log.warning("shutdown: %d DistributedDataParallel wrapper(s) still referenced (%s); destroying the "
                        "process group now may deadlock when they are freed -- drop them before shutdown()",
                        len(alive), ", ".join(type(m.module).__name__ for m in alive))
        dist.destroy_process_group()


def live_ddp_wrappers() -> list[torch.nn.Module]:
    """DDP wrappers still alive in this process (after a garbage collection by the caller)."""
    return [obj for obj in gc.get_objects() if issubclass(type(obj), DistributedDataParallel)]


def is_main_process() -> bool:
    return process_info().is_main


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def broadcast_object(obj, src: int = 0):
    """Broadcast a picklable object from ``src`` (identity at world size 1)."""
    if not (dist.is_available() and dist.is_initialized()):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


class _GatherWithGrad(torch.autograd.Function):
    """All-gather whose backward sums every rank's gradient of the gathered tensor and keeps this rank's slice.

    Only all_gather and all_reduce are used (the collectives DDP itself relies on, on every backend); the
    backward's all_reduce is issued from the autograd engine like DDP's bucket reductions.
    """

    @staticmethod
    def forward(ctx, features: torch.Tensor, rank: int, world_size: int) -> torch.Tensor:
        ctx.rank, ctx.batch = rank, features.shape[0]
        gathered = [torch.empty_like(features) for _ in range(world_size)]
        dist.all_gather(gathered, features.contiguous())
        return torch.cat(gathered, dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        start = ctx.rank * ctx.batch
        return grad[start:start + ctx.batch], None, None


def per_rank_share(count: torch.Tensor, world_size: int) -> torch.Tensor:
    """The denominator that turns this rank's loss sum into its share of the global mean: the item count summed
    over every rank, divided by the world size (at least 1 item in all).

    DDP and FSDP average the ranks' gradients, so with per-rank means a rank with few masked positions weighs its
    positions more than one with many; dividing each rank's sum by this share makes the averaged gradient the
    single-process gradient of the mean over the global batch. One all-reduce of a scalar, not differentiated:
    every rank of the group must call it for the same objectives in the same order. At world size 1 it returns
    ``count`` (clamped to 1) and does not touch ``torch.distributed``."""
    total = count.detach().to(torch.float32)
    if world_size > 1:
        total = total.clone()
        dist.all_reduce(total)
        return total.clamp(min=1) / world_size
    return total.clamp(min=1)


def gather_features(features: torch.Tensor, rank: int, world_size: int) -> torch.Tensor:
    """Concatenate ``features`` (B, D) from every rank into (world_size * B, D) in rank order, differentiably.

    The global contrastive loss scores this rank's rows against every rank's columns, so this rank's embeddings
    are negatives in the other ranks' losses too. The backward sums those gradient terms across ranks and hands
    each rank its slice, so after DDP averages the per-rank gradients they equal the single-process gradient on
    the global batch. (Detaching the other ranks' slices, as some implementations do, loses those terms: the tiny
    preset's grad norm at init came out 110 on 2 ranks vs 66 on one process.) Every rank must pass the same
    batch size. At world size 1 this is the identity and ``torch.distributed`` is not touched.
    """
    if world_size == 1:
        return features
    return _GatherWithGrad.apply(features, rank, world_size)
