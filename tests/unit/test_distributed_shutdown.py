"""shutdown() destroys the group only after DDP wrappers are gone, and says so when one is still referenced.

A DDP wrapper that outlives the gloo group frees it later from the Reducer binding with the GIL held, which can
deadlock against gloo's worker threads (the 2-rank benchmark hung that way after its last step).
"""
from __future__ import annotations

import logging

import pytest
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from flava.distributed import live_ddp_wrappers, shutdown


@pytest.fixture
def group(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'init'}", rank=0, world_size=1)
    yield
    if dist.is_initialized():
        dist.destroy_process_group()


def _trained_wrapper() -> DistributedDataParallel:
    wrapped = DistributedDataParallel(torch.nn.Linear(4, 2))
    wrapped(torch.randn(3, 4)).sum().backward()  # one bucket all-reduce through the group
    return wrapped


def test_shutdown_warns_when_a_wrapper_outlives_the_group(group, caplog):
    wrapped = _trained_wrapper()
    with caplog.at_level(logging.WARNING, logger="flava.distributed"):
        shutdown()
    assert not dist.is_initialized()
    assert "1 DistributedDataParallel wrapper(s) still referenced (Linear)" in caplog.text
    del wrapped


def test_shutdown_is_silent_once_wrappers_are_dropped(group, caplog):
    wrapped = _trained_wrapper()
    cycle = {"wrapper": wrapped}
    cycle["self"] = cycle  # held only by a reference cycle: shutdown's collection frees it
    assert len(live_ddp_wrappers()) == 1
    del wrapped, cycle
    with caplog.at_level(logging.WARNING, logger="flava.distributed"):
        shutdown()
    assert not dist.is_initialized()
    assert caplog.text == ""
    assert live_ddp_wrappers() == []
