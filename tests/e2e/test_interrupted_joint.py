"""Ctrl-C (SIGINT to the process group) or SIGKILL during the joint stage of `dvc repro`, then `dvc repro` again:
the resumed run ends with the same bytes as an uninterrupted one -- models/joint/{best,last}, reports/joint.json,
the training curves -- and continues the interrupted attempt's MLflow run.

DVC deletes models/joint before it re-runs the stage, so the best model and its selection must come back from the
checkpoints. The upstream stages run once for the module (`dvc repro joint`, which is also the uninterrupted
reference); each case works on a copy. The project's own code runs (PYTHONPATH), with byte-code writing on.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.e2e.conftest import BIN, E2E_PARAMS, make_project, run, set_params, user_env

# Checkpoints every 4 steps and evaluations every 8: a run stopped after step 8 holds a best model and has 16 steps
# to go, so the signal lands mid-training.
PARAMS = {**E2E_PARAMS, ("train", "joint", "steps"): 24, ("train", "checkpoint_every"): 4,
          ("train", "eval_every"): 8, ("train", "log_every"): 2}
COMPARED = ("models/joint/best/model.safetensors", "models/joint/best/selection.json",
            "models/joint/last/model.safetensors", "reports/joint.json", "reports/curves/joint.csv",
            "reports/curves/joint_zeroshot.csv")
INTERRUPT_AFTER = Path("checkpoints/joint/step-0000008/meta.json")  # published last: the checkpoint is complete


def _env(repo: Path) -> dict[str, str]:
    # The copy's own code, as in a clone installed with `pip install -e .` (the code DVC hashes is the code run).
    return {**user_env(repo), "PYTHONPATH": str(repo), "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> tuple[Path, dict[str, bytes]]:
    """A project with every stage up to joint run once, uninterrupted, and the bytes of the joint outputs."""
    base = tmp_path_factory.mktemp("interrupt")
    repo = make_project(base, base / "remote")
    set_params(repo, PARAMS)
    run(repo, "flava", "data", "generate", env=_env(repo))
    run(repo, "dvc", "repro", "joint", env=_env(repo))
    return repo, {name: (repo / name).read_bytes() for name in COMPARED}


def _interrupted_repro(repo: Path, sig: signal.Signals) -> None:
    """`dvc repro --force` of the joint stage, stopped with ``sig`` to its whole process group mid-training."""
    proc = subprocess.Popen([str(BIN / "dvc"), "repro", "--force", "--single-item", "joint"], cwd=repo,
                            env=_env(repo), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.time() + 600
    while not (repo / INTERRUPT_AFTER).exists():
        assert proc.poll() is None, f"dvc repro ended ({proc.returncode}) before it could be interrupted"
        assert time.time() < deadline, "no checkpoint of step 8 within 10 minutes"
        time.sleep(0.02)
    os.killpg(proc.pid, sig)
    proc.wait(timeout=300)
    assert proc.returncode != 0, "the interrupted repro reported success"
    # Nothing of the group may outlive it (a stray trainer would keep writing); killed children are reaped by init.
    deadline = time.time() + 60
    while _group_alive(proc.pid):
        assert time.time() < deadline, "processes of the interrupted dvc group are still alive after a minute"
        time.sleep(0.1)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL], ids=["sigint", "sigkill"])
def test_interrupted_joint_resumes_to_the_same_bytes(reference, tmp_path, sig):
    source, expected = reference
    repo = tmp_path / "project"
    shutil.copytree(source, repo, symlinks=True)

    _interrupted_repro(repo, sig)
    checkpoints = sorted((repo / "checkpoints/joint").glob("step-*/meta.json"))
    stopped_at = json.loads(checkpoints[-1].read_text())
    assert 8 <= stopped_at["step"] < 24, "interrupted after its last step: nothing left to resume"
    if sig == signal.SIGINT:  # the trainer saved the step it had reached, past the periodic checkpoint of step 8
        assert stopped_at["step"] > 8
    assert not (repo / "checkpoints/joint/complete.json").exists()

    run(repo, "dvc", "repro", "joint", env=_env(repo))
    record = json.loads((repo / "reports/joint.run.json").read_text())
    assert record["resumed_from"] == stopped_at["step"]  # resumed, not trained again from step 0
    assert record["mlflow_run_id"] == stopped_at["mlflow_run_id"]  # one MLflow run across the two attempts
    different = [name for name in COMPARED if (repo / name).read_bytes() != expected[name]]
    assert not different, f"differ from the uninterrupted run: {different}"
    assert json.loads(run(repo, "dvc", "status", "--json", "joint", env=_env(repo)).stdout) == {}
