"""The container command the Kubernetes Job runs, run for real on this machine: the rendered ``torchrun ... -m
flava pretrain joint --params <mounted ConfigMap>`` with two CPU ranks (gloo) and the c10d rendezvous on loopback,
reading the params file exactly as the ConfigMap holds it. Run again, it resumes from the checkpoint, which is
what a replacement pod does after a preemption. Slow: the earlier stages run first (tiny preset)."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from flava.config import load_config
from flava.launch import k8s as k8slib
from flava.launch.config import K8sConfig
from flava.tracking.lineage import PARENT_RUN_ENV

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1200)]

TINY = ["model.preset=tiny", "train.text.steps=8", "train.image.steps=8", "train.joint.steps=8",
        "train.eval_every=4", "train.checkpoint_every=4", "train.log_every=2", "tracking.log_system_metrics=false"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_rendered_torchrun_command_trains_two_ranks_and_resumes(tmp_path, monkeypatch, project_root):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.delenv(PARENT_RUN_ENV, raising=False)
    (tmp_path / "params.yaml").write_text((project_root / "params.yaml").read_text())
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

    port = free_port()
    spec = K8sConfig(gpus_per_node=0, nproc_per_node=2, config_mount=str(tmp_path / "etc"), rdzv_port=port,
                     env={"OMP_NUM_THREADS": "1"})
    config_map, _, job = k8slib.build_manifests(cfg, run_id="local", k8s=spec, parent_run_id=None)
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc" / "params.yaml").write_text(config_map["data"]["params.yaml"])  # the mounted ConfigMap
    container = job["spec"]["template"]["spec"]["containers"][0]
    # What the kubelet does: expand $(JOB_COMPLETION_INDEX); the Service DNS name becomes loopback here.
    command = [arg.replace("$(JOB_COMPLETION_INDEX)", "0") for arg in container["command"]]
    command = [f"--rdzv-endpoint=127.0.0.1:{port}" if a.startswith("--rdzv-endpoint=") else a for a in command]
    command[0] = str(Path(sys.executable).parent / "torchrun")
    env = dict(os.environ, **{e["name"]: e["value"] for e in container["env"] if "value" in e})
    env["MLFLOW_TRACKING_URI"] = os.environ["MLFLOW_TRACKING_URI"]  # the pod's would be the cluster's server
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"

    def run() -> dict:
        proc = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-4000:]
        reports = tmp_path / "reports"  # the metrics, and what the run was (resume point)
        return {**json.loads((reports / "joint.json").read_text()),
                **json.loads((reports / "joint.run.json").read_text())}

    first = run()
    assert first["world_size"] == 2 and first["steps"] == 8 and first["resumed_from"] is None
    assert (tmp_path / "models" / "joint" / "best").is_dir()
    # A replacement pod of a finished job: same command, same workspace. The finished run's checkpoints are not
    # resumed (only an interrupted run's are): it trains again, to the same result.
    second = run()
    assert second["resumed_from"] is None and second["world_size"] == 2
    assert second["final_loss"] == first["final_loss"]
