"""torchrun with 2 gloo ranks vs 1 process with the same global batch: the loss trajectory matches."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TRAIN = {"joint": {"steps": 30, "batch_size": 16}, "optimizer": {"lr": 1e-2}, "schedule": {"warmup_steps": 3},
         "log_every": 1, "checkpoint_every": 10}

pytestmark = pytest.mark.slow


def _run(tmp_path: Path, ranks: int, name: str) -> dict:
    out = tmp_path / f"{name}.safetensors"
    args = ["-m", "tests.integration.test_train_toy", "--ckpt", str(tmp_path / f"ckpt-{name}"), "--out", str(out),
            "--train", json.dumps(TRAIN)]
    if ranks > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(ranks), *args]
    else:
        cmd = [sys.executable, *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run(cmd, cwd=ROOT, env=env, check=True, timeout=300)
    return json.loads(out.with_suffix(".json").read_text())


def test_two_ranks_match_one_process(tmp_path):
    one = _run(tmp_path, 1, "one")
    two = _run(tmp_path, 2, "two")
    loss1 = [h["loss"] for h in one["history"]]
    loss2 = [h["loss"] for h in two["history"]]
    assert len(loss1) == len(loss2) == 30
    assert loss1[-1] < 0.7 * loss1[0]
    for a, b in zip(loss1, loss2):
        assert abs(a - b) <= 1e-4 * max(1.0, abs(a)), (a, b)
    gn1 = [h["grad_norm"] for h in one["history"]]
    gn2 = [h["grad_norm"] for h in two["history"]]
    for a, b in zip(gn1, gn2):
        assert abs(a - b) <= 1e-4 * max(1.0, abs(a))
