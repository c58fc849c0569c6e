"""``python -m flava.launch.gang``, the Job's container entry point, run for real: torchrun (2 local worker processes,
c10d rendezvous on loopback) whose exit code is the failed worker's, so the Job's podFailurePolicy can act on it:
a config error in one rank exits NON_RETRYABLE (torchrun alone exits 1), a SIGTERMed pod exits PREEMPTED."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from flava.exitcodes import NON_RETRYABLE, PREEMPTED
from flava.launch.gang import exit_code

pytestmark = pytest.mark.timeout(300)

WORKER = """
import os, signal, sys, time
rank = int(os.environ["RANK"])
mode = sys.argv[1]
if mode == "ok":
    sys.exit(0)
if mode == "config-error" and rank == 1:
    print("flava: error: data.mixing.ratios must sum to 1", file=sys.stderr)
    sys.exit(2)
if mode == "sigterm":
    def stop(signum, frame):
        print(f"rank {rank}: checkpoint saved", flush=True)
        sys.exit(143)
    signal.signal(signal.SIGTERM, stop)
    open(os.path.join(sys.argv[2], f"ready-{rank}"), "w").close()
time.sleep(120)
"""


def gang(tmp_path, mode: str, **popen) -> subprocess.Popen:
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(sys.path))
    cmd = [sys.executable, "-m", "flava.launch.gang", "--standalone", "--nnodes=1", "--nproc-per-node=2",
           "--max-restarts=0", str(script), mode, str(tmp_path)]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen)


def test_exit_code_mapping():
    assert exit_code(2) == 2 and exit_code(-9) == 137 and exit_code(-15) == 143 and exit_code(0) == 1


def test_success_exits_zero(tmp_path):
    proc = gang(tmp_path, "ok")
    out, err = proc.communicate(timeout=240)
    assert proc.returncode == 0, err[-3000:]


def test_a_config_error_in_one_rank_exits_non_retryable(tmp_path):
    proc = gang(tmp_path, "config-error")
    out, err = proc.communicate(timeout=240)
    assert proc.returncode == NON_RETRYABLE, err[-3000:]
    assert "rank 1 (local rank 1) failed first with exit code 2" in err


def test_sigterm_to_the_pod_exits_preempted(tmp_path):
    proc = gang(tmp_path, "sigterm")
    deadline = time.monotonic() + 200
    while not all((tmp_path / f"ready-{r}").exists() for r in (0, 1)):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1][-3000:]
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)  # what the kubelet sends the container's process on preemption
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == PREEMPTED, err[-3000:]
    assert "checkpoint saved" in out
