"""The data stages' Dask cluster: ``flava dask up|down`` against the fake API server on loopback through the official
client (objects, names, replicas, commands, mounts; kept when unchanged, refused when changed; transient errors
retried), and a real cluster: ``dask scheduler`` and two ``dask worker`` processes started with the commands the
manifests run, on which validate and shard (``data.engine.kind=address``) write the serial run's bytes."""
from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from kubernetes import client

from flava.config import PipelineConfig
from flava.data import validate as validation
from flava.data.engine import EngineConfig
from flava.data.shards import run_shard
from flava.launch import dask_cluster
from flava.launch.config import DaskClusterConfig
from tests.unit.shard_fixtures import config as shard_config
from tests.unit.shard_fixtures import make_validated
from tests.unit.test_validate_partitions import SMALL_PARTITIONS, _prepare, _run, _snapshot

from .fake_k8s import FakeCluster, FakeServer, use_kubeconfig

ROOT = Path(__file__).resolve().parents[2]
WORKERS = 2
START_TIMEOUT_S = 120  # the workers import distributed, then the project when their first task arrives


@pytest.fixture
def fake_k8s():
    cluster = FakeCluster()
    with FakeServer(cluster) as server:
        yield cluster, client.ApiClient(client.Configuration(host=server.host))


def cfg_with(**dask) -> PipelineConfig:
    return PipelineConfig().model_copy(update={"launch": PipelineConfig().launch.model_copy(
        update={"dask": DaskClusterConfig(**dask)})})


def test_up_creates_the_cluster_and_down_deletes_it(fake_k8s):
    cluster, api = fake_k8s
    cfg = cfg_with(name="dc", workers=3)
    ns = cfg.launch.k8s.namespace
    result = dask_cluster.up(cfg, api=api, sleep=lambda s: None)
    assert result["address"] == f"tcp://dc-scheduler.{ns}.svc:8786"
    assert result["objects"] == {"Deployment/dc-scheduler": "created", "Service/dc-scheduler": "created",
                                 "Deployment/dc-worker": "created"}
    stored = {(kind, name): obj for (kind, _, name), obj in cluster.objects.items()}
    assert set(stored) == {("Deployment", "dc-scheduler"), ("Service", "dc-scheduler"), ("Deployment", "dc-worker")}
    workers = stored[("Deployment", "dc-worker")]
    assert workers["spec"]["replicas"] == 3
    (container,) = workers["spec"]["template"]["spec"]["containers"]
    assert container["command"] == dask_cluster.worker_command(result["address"])
    assert container["volumeMounts"] == [{"name": "workspace", "mountPath": cfg.launch.k8s.workdir}]
    assert workers["spec"]["template"]["spec"]["volumes"][0]["persistentVolumeClaim"]["claimName"] == \
        cfg.launch.k8s.workspace_pvc
    (sched,) = stored[("Deployment", "dc-scheduler")]["spec"]["template"]["spec"]["containers"]
    assert sched["command"] == dask_cluster.scheduler_command(cfg.launch.dask)

    # up again with the same config keeps what is there (a retried task, a second person)
    again = dask_cluster.up(cfg, api=api, sleep=lambda s: None)
    assert set(again["objects"].values()) == {"unchanged"}
    # another spec is refused, naming what to do; nothing is changed
    with pytest.raises(ValueError, match="flava dask down"):
        dask_cluster.up(cfg_with(name="dc", workers=5), api=api, sleep=lambda s: None)
    assert cluster.objects[("Deployment", ns, "dc-worker")]["spec"]["replicas"] == 3

    gone = dask_cluster.down(cfg, api=api, sleep=lambda s: None)
    assert gone["deleted"] == {"Deployment/dc-worker": True, "Service/dc-scheduler": True,
                               "Deployment/dc-scheduler": True}
    assert not cluster.objects
    assert {(kind, policy[0]) for kind, _, _, policy in cluster.deletions} == {("Deployment", "Foreground"),
                                                                                ("Service", "Foreground")}
    assert set(dask_cluster.down(cfg, api=api, sleep=lambda s: None)["deleted"].values()) == {False}


def test_up_retries_transient_api_errors(fake_k8s):
    cluster, api = fake_k8s
    cluster.faults = [503, 429, "reset"]
    sleeps: list[float] = []
    result = dask_cluster.up(cfg_with(), api=api, sleep=sleeps.append)
    assert set(result["objects"].values()) == {"created"}
    assert sleeps == [1.0, 2.0, 4.0]
    assert [f for f, _, _ in cluster.served_faults] == [503, 429, "reset"]


def test_cli_up_prints_the_address_and_down_deletes(fake_k8s, tmp_path, monkeypatch, capsys, project_root):
    from flava.cli import main

    cluster, api = fake_k8s
    use_kubeconfig(api, tmp_path, monkeypatch)
    params = ["--params", str(project_root / "params.yaml"), "--set", "launch.dask.workers=4"]
    assert main(["dask", "up", *params]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["address"] == "tcp://flava-dask-scheduler.flava.svc:8786"
    assert result["data_stage_args"] == f"--set data.engine.kind=address --set data.engine.address={result['address']}"
    assert cluster.objects[("Deployment", "flava", "flava-dask-worker")]["spec"]["replicas"] == 4
    # a changed spec is a config error: exit 2 with the remedy on stderr, nothing changed
    assert main(["dask", "up", "--params", str(project_root / "params.yaml")]) == 2
    assert "flava dask down" in capsys.readouterr().err
    assert main(["dask", "down", *params]) == 0
    assert set(json.loads(capsys.readouterr().out)["deleted"].values()) == {True}
    assert not cluster.objects


# ------------------------------------------------------------------------------------------------ a real cluster
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _local(command: list[str]) -> list[str]:
    """The pods' command with ``dask`` resolved to this interpreter's environment (the image has it on PATH)."""
    return [str(Path(sys.executable).parent / command[0]), *command[1:]]


@pytest.fixture
def dask_scheduler(tmp_path):
    """A scheduler and two workers as separate processes, started with the manifests' commands; -> its address."""
    distributed = pytest.importorskip("dask.distributed")
    dask = DaskClusterConfig(port=_free_port())
    address = f"tcp://127.0.0.1:{dask.port}"
    # the workers import the project as the image does; their working directory is the workspace
    env = {"PATH": str(Path(sys.executable).parent), "PYTHONPATH": str(ROOT), "HOME": str(tmp_path)}
    logs = tmp_path / "dask-logs"
    logs.mkdir()
    procs = []
    try:
        for name, command in [("scheduler", dask_cluster.scheduler_command(dask)),
                              *[(f"worker-{i}", dask_cluster.worker_command(address)) for i in range(WORKERS)]]:
            procs.append(subprocess.Popen(_local(command), cwd=tmp_path, env=env,
                                          stdout=(logs / f"{name}.log").open("wb"), stderr=subprocess.STDOUT))
        with distributed.Client(address, timeout=START_TIMEOUT_S) as client_:
            client_.wait_for_workers(WORKERS, timeout=START_TIMEOUT_S)
            yield address, client_
    finally:
        for proc in reversed(procs):
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _executed(client_) -> dict[str, int]:
    return client_.run(lambda dask_worker: dask_worker.state.executed_count)


@pytest.mark.slow
def test_validate_and_shard_on_a_real_scheduler_give_the_serial_bytes(tmp_path, dask_scheduler):
    address, client_ = dask_scheduler
    assert set(_executed(client_).values()) == {0}

    (tmp_path / "validate").mkdir()
    cfg, prepared = _prepare(tmp_path / "validate")
    out = Path(cfg.paths.validated)
    _run(cfg, prepared, EngineConfig(partition_rows=SMALL_PARTITIONS))
    serial = _snapshot(out)
    shutil.rmtree(out)
    _run(cfg, prepared, EngineConfig(kind="address", address=address, partition_rows=SMALL_PARTITIONS))
    assert _snapshot(out) == serial
    after_validate = _executed(client_)
    assert len(after_validate) == WORKERS and all(after_validate.values()), after_validate  # both did partitions
    # one task per partition (7 of pairs, 1 of images, 2 of text), each leaving its summary
    assert sum(after_validate.values()) == len(list((out / validation.PARTITIONS_DIR).glob("*/[0-9]*.json"))) == 10

    root = tmp_path / "shard"
    make_validated(root, n_pairs=23, n_images=11, n_text=17)
    shards = root / "shards"
    run_shard(shard_config(root, engine={"partition_rows": 7}))
    serial = _snapshot(shards)
    shutil.rmtree(shards)
    run_shard(shard_config(root, engine={"partition_rows": 7, "kind": "address", "address": address}))
    assert _snapshot(shards) == serial
    # 4 + 2 + 3 partitions of 7 rows
    assert sum(_executed(client_).values()) - sum(after_validate.values()) == 9
