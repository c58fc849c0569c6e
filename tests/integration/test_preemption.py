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


def _reference(world, tmp_path, ranks: int) -> Path:  # noqa: F811
    """The weights of an uninterrupted run."""
    ref = _cfg(world, tmp_path / "ref", *SETS)
    subprocess.run(_cmd(dump_config(ref, tmp_path / "ref.yaml"), ranks), cwd=ROOT, env=_env(), check=True,
                   timeout=600, capture_output=True)
    return Path(ref.paths.models) / "text" / "model.safetensors"


def _preempted(world, out: Path, ranks: int, target=None):  # noqa: F811
    """A run stopped by SIGTERM after step EVERY + 1: checks what it left and returns (cfg, params, exit code,
    stderr, the step it stopped at)."""
    cfg = _cfg(world, out, *SETS)
    params = dump_config(cfg, out.with_suffix(".yaml"))
    code, err = _preempt(params, ranks, after=EVERY + 1, target=target)
    stops = {int(s) for s in re.findall(rf"flava: preempted: text: .+? at step (\d+)/{STEPS}", err)}
    assert len(stops) == 1 and err.count("flava: preempted:") == ranks, err[-3000:]  # every rank, one step
    (stopped,) = stops
    assert EVERY < stopped < STEPS  # the step it reached, past the last periodic checkpoint
    ckpt = Checkpointer(Path(cfg.paths.checkpoints) / "text")
    assert ckpt.latest() == stopped and EVERY in ckpt.steps()
    assert sorted(p.name for p in Path(ckpt.uri(stopped)).glob("rank-*.pt")) == [
        f"rank-{r:05d}.pt" for r in range(ranks)]
    assert not (Path(cfg.paths.models) / "text").exists()
    run = _run_record(cfg)
    assert run.info.status == "KILLED" and f"at step {stopped}/" in run.data.tags["flava.preempted"]
    assert run.data.tags["checkpoint.latest"] == ckpt.uri(stopped)
    return cfg, params, code, err, stopped


def _resume_and_compare(cfg, params: Path, ranks: int, stopped: int, reference: Path) -> None:
    done = subprocess.run(_cmd(params, ranks), cwd=ROOT, env=_env(), timeout=600, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout[done.stdout.index("{"):])
    assert result["resumed_from"] == stopped and result["steps"] == STEPS
    run = _run_record(cfg)  # the preempted attempt's run, reopened and finished
    assert result["mlflow_run_id"] == run.info.run_id and run.info.status == "FINISHED"
    assert (Path(cfg.paths.models) / "text" / "model.safetensors").read_bytes() == reference.read_bytes()


def test_sigterm_saves_the_step_reached_exits_143_and_resumes_to_the_same_bytes(world, tmp_path):  # noqa: F811
    reference = _reference(world, tmp_path, ranks=1)
    cfg, params, code, _, stopped = _preempted(world, tmp_path / "cut", ranks=1)
    assert code == PREEMPTED
    _resume_and_compare(cfg, params, 1, stopped, reference)


def _worker(proc, rank: int) -> int:
    """The pid of torchrun's worker of ``rank``."""
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == proc.pid:
                if f"RANK={rank}".encode() in (entry / "environ").read_bytes().split(b"\0"):
                    return int(entry.name)
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
    raise AssertionError(f"no worker of rank {rank} under torchrun {proc.pid}")


def test_sigterm_under_torchrun_stops_both_ranks_at_one_step_with_one_checkpoint(world, tmp_path):  # noqa: F811
    reference = _reference(world, tmp_path, ranks=2)
    # The kubelet signals the container's main process, torchrun: it sends SIGTERM on to its workers.
    cfg, params, code, err, stopped = _preempted(world, tmp_path / "pod", ranks=2)
    assert "Sending process" in err and "closing signal SIGTERM" in err
    # torchrun itself re-raises its SignalException and exits 1, not 143 (torch 2.13): a pod running torchrun as
    # its command does not report 143 even though every worker saved and exited 143.
    assert code == 1 and "SignalException" in err
    _resume_and_compare(cfg, params, 2, stopped, reference)

    # Only rank 1 gets the signal: rank 0 learns it from the per-step all-reduce and stops at the same step. Both
    # exit 143, which torchrun reports per rank.
    _, _, code, err, _ = _preempted(world, tmp_path / "one", ranks=2, target=lambda proc: [_worker(proc, 1)])
    assert "text: SIGTERM at step" in err and "text: a stop signal on another rank at step" in err
    assert code == 1 and len(re.findall(r"exitcode\s*:\s*143", err)) == 2, err[-3000:]
