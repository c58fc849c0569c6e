"""Exact resume: a run killed with SIGKILL mid-way and restarted ends bitwise equal to an uninterrupted run."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

from flava.train.checkpoint import Checkpointer, load_weights

ROOT = Path(__file__).resolve().parents[2]
TRAIN = {"joint": {"steps": 60, "batch_size": 16}, "optimizer": {"lr": 1e-2}, "schedule": {"warmup_steps": 5},
         "checkpoint_every": 7, "keep_last": 2, "log_every": 5}


def _cmd(ckpt: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "tests.toy", "--ckpt", str(ckpt), "--out", str(out),
            "--train", json.dumps(TRAIN), "--dropout", "0.2", *extra]


def _env():
    return {**os.environ, "OMP_NUM_THREADS": "1"}


def test_sigkill_mid_run_then_resume_is_bitwise_equal(tmp_path):
    ref_out = tmp_path / "ref.safetensors"
    subprocess.run(_cmd(tmp_path / "ref_ckpt", ref_out), cwd=ROOT, env=_env(), check=True, timeout=300)

    ckpt, out = tmp_path / "ckpt", tmp_path / "resumed.safetensors"
    proc = subprocess.Popen(_cmd(ckpt, out, "--step-sleep", "0.05"), cwd=ROOT, env=_env())
    deadline = time.time() + 240
    while time.time() < deadline and not any(s >= 14 for s in Checkpointer(ckpt).steps()):
        assert proc.poll() is None, "the run ended before it could be killed"
        time.sleep(0.02)
    time.sleep(0.13)  # somewhere between checkpoints
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    killed_at = Checkpointer(ckpt).latest()
    assert killed_at is not None and 14 <= killed_at < 60
    assert not out.exists()

    subprocess.run(_cmd(ckpt, out), cwd=ROOT, env=_env(), check=True, timeout=300)
    summary = json.loads(out.with_suffix(".json").read_text())["summary"]
    assert summary["resumed_from"] == killed_at and summary["steps"] == 60
    ref, got = load_weights(ref_out), load_weights(out)
    assert ref.keys() == got.keys()
    for name in ref:
        assert torch.equal(ref[name], got[name]), name
    assert Checkpointer(ckpt).steps() == Checkpointer(tmp_path / "ref_ckpt").steps()
