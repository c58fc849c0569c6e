"""torchrun with 2 gloo ranks (DDP or FSDP) vs 1 process with the same global batch: the loss trajectory matches;
an FSDP run resumed from a checkpoint ends with the same weights."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from flava.train.checkpoint import Checkpointer, load_weights, step_name

ROOT = Path(__file__).resolve().parents[2]
TRAIN = {"joint": {"steps": 30, "batch_size": 16}, "optimizer": {"lr": 1e-2}, "schedule": {"warmup_steps": 3},
         "log_every": 1, "checkpoint_every": 10}

pytestmark = pytest.mark.slow


def _run(tmp_path: Path, ranks: int, name: str, **train) -> dict:
    out = tmp_path / f"{name}.safetensors"
    args = ["-m", "tests.toy", "--ckpt", str(tmp_path / f"ckpt-{name}"), "--out", str(out),
            "--train", json.dumps({**TRAIN, **train})]
    if ranks > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(ranks), *args]
    else:
        cmd = [sys.executable, *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, check=True, timeout=300, capture_output=True, text=True)
    assert "still referenced" not in proc.stderr  # DDP freed before the group (flava.distributed.shutdown)
    return json.loads(out.with_suffix(".json").read_text())


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_ranks_match_one_process(tmp_path, strategy):
    one = _run(tmp_path, 1, "one")
    two = _run(tmp_path, 2, "two", strategy=strategy)
    for key in ("loss", "grad_norm"):
        a = [h[key] for h in one["history"]]
        b = [h[key] for h in two["history"]]
        assert len(a) == len(b) == 30
        for x, y in zip(a, b):
            assert abs(x - y) <= 1e-4 * max(1.0, abs(x)), (key, x, y)
    losses = [h["loss"] for h in one["history"]]
    assert losses[-1] < 0.7 * losses[0]


def test_fsdp_resume_ends_with_the_same_weights(tmp_path):
    _run(tmp_path, 2, "full", strategy="fsdp")
    ckpt = tmp_path / "ckpt-full"
    assert Checkpointer(ckpt).steps() == [20, 30]
    shutil.copytree(ckpt, tmp_path / "ckpt-resumed")
    shutil.rmtree(tmp_path / "ckpt-resumed" / step_name(30))
    resumed = _run(tmp_path, 2, "resumed", strategy="fsdp")
    assert resumed["summary"]["resumed_from"] == 20
    a, b = load_weights(tmp_path / "full.safetensors"), load_weights(tmp_path / "resumed.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
