"""Preemption as Kubernetes does it: SIGTERM to a running `flava pretrain` stage (one process, and 2 gloo ranks under
torchrun) saves a checkpoint at the step it reached, exits 143, and the next run of the same stage resumes it and
ends with the same model bytes as an uninterrupted run."""
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from flava.config import dump_config
from flava.exitcodes import PREEMPTED
from flava.train.checkpoint import Checkpointer
from tests.integration.test_train_stages import _cfg, world  # noqa: F401 - the module-scoped data fixture

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow
STEPS, EVERY = 24, 5
SETS = [f"train.text.steps={STEPS}", f"train.checkpoint_every={EVERY}", "train.log_every=1"]
PROGRESS = re.compile(r"text step (\d+)/")


def _env():
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "FLAVA_PARENT_RUN_ID")}
    env["OMP_NUM_THREADS"] = "1"
    return env


def _cmd(params: Path, ranks: int) -> list[str]:
    launcher = [] if ranks == 1 else ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(ranks)]
    return [sys.executable, *launcher, "-m", "flava", "pretrain", "text", "--params", str(params)]


def _preempt(params: Path, ranks: int, after: int, target=None) -> tuple[int, str]:
    """Start the stage, send SIGTERM once its progress log says step ``after`` is done (to ``target(proc)``'s pids,
    default the process itself), and return its exit code and stderr."""
    proc = subprocess.Popen(_cmd(params, ranks), cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    lines = []
    try:
        deadline = time.time() + 300
        for line in proc.stderr:
            lines.append(line)
            match = PROGRESS.search(line)
            if match and int(match.group(1)) >= after:
                for pid in (target(proc) if target else [proc.pid]):
                    os.kill(pid, signal.SIGTERM)
                break
            assert time.time() < deadline, "no progress within 5 minutes"
        lines += proc.stderr.read()
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    return proc.returncode, "".join(lines)


def _run_record(cfg):
    from mlflow import MlflowClient

    client = MlflowClient(cfg.tracking.tracking_uri)
    [run] = client.search_runs([client.get_experiment_by_name(cfg.tracking.experiment).experiment_id])
    return run


def _check_resumes_to_reference(world, tmp_path, ranks: int, target=None):  # noqa: F811
    ref = _cfg(world, tmp_path / "ref", *SETS)
    subprocess.run(_cmd(dump_config(ref, tmp_path / "ref.yaml"), ranks), cwd=ROOT, env=_env(), check=True,
                   timeout=600, capture_output=True)

    cfg = _cfg(world, tmp_path / "cut", *SETS)
    params = dump_config(cfg, tmp_path / "cut.yaml")
    code, err = _preempt(params, ranks, after=EVERY + 1, target=target)
    stops = {int(s) for s in re.findall(rf"flava: preempted: text: \S+ at step (\d+)/{STEPS}", err)}
    assert len(stops) == 1, err[-3000:]  # every rank stopped at the same step
    (stopped,) = stops
    assert err.count("flava: preempted:") == ranks
    # the step it reached, past the last periodic checkpoint (at EVERY)
    assert EVERY < stopped < STEPS
    ckpt = Checkpointer(Path(cfg.paths.checkpoints) / "text")
    assert ckpt.latest() == stopped and EVERY in ckpt.steps()
    assert sorted(p.name for p in Path(ckpt.uri(stopped)).glob("rank-*.pt")) == [
        f"rank-{r:05d}.pt" for r in range(ranks)]
    assert not (Path(cfg.paths.models) / "text").exists()
    run = _run_record(cfg)
    assert run.info.status == "KILLED" and f"at step {stopped}/" in run.data.tags["flava.preempted"]
    assert run.data.tags["checkpoint.latest"] == ckpt.uri(stopped)

    done = subprocess.run(_cmd(params, ranks), cwd=ROOT, env=_env(), timeout=600, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout[done.stdout.index("{"):])
    assert result["resumed_from"] == stopped and result["steps"] == STEPS
    assert result["mlflow_run_id"] == run.info.run_id and _run_record(cfg).info.status == "FINISHED"
    weights = "models/text/model.safetensors"
    assert (tmp_path / "cut" / weights).read_bytes() == (tmp_path / "ref" / weights).read_bytes()
    return code


def test_sigterm_saves_the_step_reached_exits_143_and_resumes_to_the_same_bytes(world, tmp_path):  # noqa: F811
    assert _check_resumes_to_reference(world, tmp_path, ranks=1) == PREEMPTED
