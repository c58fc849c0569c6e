"""The container commands the Kubernetes Jobs run, run for real on this machine, as the kubelet would start them
(``$(JOB_COMPLETION_INDEX)`` expanded, the params file exactly as the ConfigMap holds it, the pod's env):

- the joint Job: ``python -m flava.launch.gang ... -m flava pretrain joint`` with two CPU ranks (gloo) and the
  c10d rendezvous on loopback (the Service DNS names become 127.0.0.1 here); run again, as a replacement pod of
  a finished job would, it trains again to the same result;
- a sweep worker Job's pod: ``flava sweep --workers 1 --worker-index <index>`` on a SQLite study with a budget
  of one short trial, drawn with its trial number's seed (the index only names the worker in logs).

Slow: the earlier stages run first (tiny preset), once for both."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import optuna
import pytest

from flava.config import load_config
from flava.launch import k8s as k8slib
from flava.launch import sweep as sweeplib
from flava.launch.config import K8sConfig
from flava.launch.space import suggest
from flava.tracking.lineage import PARENT_RUN_ENV

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1200)]
PROJECT_ROOT = Path(__file__).resolve().parents[2]

TINY = ["model.preset=tiny", "train.text.steps=8", "train.image.steps=8", "train.joint.steps=8",
        "train.eval_every=4", "train.checkpoint_every=4", "train.log_every=2", "tracking.log_system_metrics=false"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A workspace with the unimodal encoders trained (what the joint stage and the sweep's trials start from),
    and the launching process's MLflow store."""
    root = tmp_path_factory.mktemp("k8s-workspace")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")
        mp.delenv(PARENT_RUN_ENV, raising=False)
        (root / "params.yaml").write_text((PROJECT_ROOT / "params.yaml").read_text())
        cfg = load_config("params.yaml", TINY)

        from flava.data.fit import run_fit
        from flava.data.ingest import run_prepare
        from flava.data.shards import run_shard
        from flava.data.synthetic import run_generate
        from flava.data.validate import run_validate
        from flava.train.stages import run_pretrain

        for stage in (run_generate, run_prepare, run_validate, run_shard, run_fit):
            stage(cfg)
        run_pretrain(cfg, "text")
        run_pretrain(cfg, "image")
        yield root, cfg, mp


def pod_process(root: Path, config_map: dict, job: dict, index: int, mount: Path, port: int | None = None):
    """The kubelet's part: mount the ConfigMap, expand the index, give the container its env; DNS -> loopback."""
    mount.mkdir(exist_ok=True)
    (mount / "params.yaml").write_text(config_map["data"]["params.yaml"])
    container = job["spec"]["template"]["spec"]["containers"][0]
    command = [arg.replace("$(JOB_COMPLETION_INDEX)", str(index)) for arg in container["command"]]
    command = [f"--rdzv-endpoint=127.0.0.1:{port}" if a.startswith("--rdzv-endpoint=") else
               "--local-addr=127.0.0.1" if a.startswith("--local-addr=") else a for a in command]
    assert command[0] == "python"
    command[0] = sys.executable  # the image's python
    env = dict(os.environ, **{e["name"]: e["value"] for e in container["env"] if "value" in e})
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return command, env


def test_rendered_gang_command_trains_two_ranks_and_runs_again(workspace):
    root, cfg, _ = workspace
    port = free_port()
    spec = K8sConfig(gpus_per_node=0, nproc_per_node=2, config_mount=str(root / "etc"), rdzv_port=port,
                     env={"OMP_NUM_THREADS": "1"})
    config_map, _, job = k8slib.build_manifests(cfg, run_id="local", k8s=spec, parent_run_id=None)
    command, env = pod_process(root, config_map, job, 0, root / "etc", port)
    assert command[1:3] == ["-m", "flava.launch.gang"]
    # One tracking URI: the pod gets the launching process's.
    assert env["MLFLOW_TRACKING_URI"] == os.environ["MLFLOW_TRACKING_URI"]

    def run() -> dict:
        proc = subprocess.run(command, cwd=root, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-4000:]
        reports = root / "reports"  # the metrics, and what the run was (resume point)
        return {**json.loads((reports / "joint.json").read_text()),
                **json.loads((reports / "joint.run.json").read_text())}

    first = run()
    assert first["world_size"] == 2 and first["steps"] == 8 and first["resumed_from"] is None
    assert (root / "models" / "joint" / "best").is_dir()
    # A replacement pod of a finished job: same command, same workspace. The finished run's checkpoints are not
    # resumed (only an interrupted run's are): it trains again, to the same result.
    second = run()
    assert second["resumed_from"] is None and second["world_size"] == 2
    assert second["final_loss"] == first["final_loss"]


def test_rendered_sweep_worker_runs_its_trial_with_the_trials_seed(workspace):
    root, cfg, mp = workspace
    sweep_overrides = ["launch.sweep.n_trials=1", "launch.sweep.workers=1", "launch.sweep.pruner=none",
                       "launch.sweep.study_name=k8s-worker",
                       "launch.sweep.trial_overrides=[train.joint.steps=4,train.eval_every=2]"]
    scfg = load_config("params.yaml", [*TINY, *sweep_overrides])
    spec = K8sConfig(gpus_per_node=0, config_mount=str(root / "etc-sweep"), env={"OMP_NUM_THREADS": "1"})
    config_map, job = k8slib.build_sweep_manifests(scfg, run_id="local", k8s=spec)
    assert job["spec"]["completions"] == 1
    index = 1  # as the second pod of a two-worker Job would run it
    command, env = pod_process(root, config_map, job, index, root / "etc-sweep")
    assert command[1:4] == ["-m", "flava", "sweep"] and command[command.index("--worker-index") + 1] == "1"
    proc = subprocess.run(command, cwd=root, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads((root / "reports" / "sweep.json").read_text())
    assert report["study"] == "k8s-worker" and report["n_complete"] == 1
    sweep = scfg.launch.sweep
    study = optuna.load_study(study_name=sweep.study_name, storage=f"sqlite:///{root / sweep.storage}")
    (trial,) = study.trials
    assert trial.state == optuna.trial.TrialState.COMPLETE

    # Drawn with the seed of its trial number, whichever worker (pod index) ran it: the first draw of a fresh study
    # under the same sampler.
    fresh = optuna.create_study(sampler=sweeplib.trial_seeded_sampler(scfg, sweep))
    first = fresh.ask()
    suggest(first, sweep.space)
    assert trial.params == pytest.approx(first.params)
