"""The Prefect flow against a real temporary Prefect server (``prefect_test_harness``), with the heavy stage
functions replaced by light fakes that write their outputs and record order, threads and overlap.

Checks: stage order, shard || fit and text || image really overlapping as separate task runs, the flow-run and
task-run states as the server records them, MLflow parent-run nesting, the sweep feeding its best params to the
joint stage, the joint stage on Kubernetes (through a kubeconfig pointing at the fake API server), failure
propagation, and the scheduled deployment. The real pipeline end to end is the integrator's test."""
from __future__ import annotations

import asyncio
import importlib
import json
import sys
import threading
import time
import types
from pathlib import Path

import mlflow
import pytest
import yaml

from flava.tracking.lineage import PARENT_RUN_ENV

pytestmark = pytest.mark.slow

prefect = pytest.importorskip("prefect")
from prefect.client.orchestration import get_client  # noqa: E402
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId  # noqa: E402
from prefect.client.schemas.sorting import TaskRunSort  # noqa: E402
from prefect.testing.utilities import prefect_test_harness  # noqa: E402

from flows import pipeline as pipe  # noqa: E402


@pytest.fixture(scope="module")
def prefect_server():
    with prefect_test_harness(server_startup_timeout=180):
        yield


class Recorder:
    """Fake stages: each records (name, start, end, thread, parent run id) and writes a small output."""

    def __init__(self, fail: str | None = None):
        self.calls: list[dict] = []
        self.fail = fail
        self.lock = threading.Lock()
        self.barriers = {"shard": threading.Barrier(2, timeout=20), "fit": None,
                         "text": threading.Barrier(2, timeout=20), "image": None}
        self.barriers["fit"] = self.barriers["shard"]
        self.barriers["image"] = self.barriers["text"]

    def stage(self, name, out_of):
        def run(cfg, modality=None):
            label = modality or name
            record = {"name": label, "start": time.monotonic(), "thread": threading.get_ident(),
                      "parent": __import__("os").environ.get(PARENT_RUN_ENV)}
            if label in self.barriers:
                self.barriers[label].wait()  # both halves of a parallel pair must be running at once
            if label == self.fail:
                raise RuntimeError(f"{label} exploded")
            out = Path(out_of(cfg, label))
            out.parent.mkdir(parents=True, exist_ok=True)
            result = {"stage": label, "ok": True}
            if label == "joint":
                ratios = cfg.data.mixing.ratios
                result["best_zeroshot_top1"] = ratios["pair"] / sum(ratios.values())
                result["ratios"] = dict(ratios)
            out.write_text(json.dumps(result))
            record["end"] = time.monotonic()
            with self.lock:
                self.calls.append(record)
            return result

        return run

    def order(self):
        return [c["name"] for c in sorted(self.calls, key=lambda c: c["start"])]

    def get(self, name):
        return next(c for c in self.calls if c["name"] == name)


def install_fakes(monkeypatch, recorder: Recorder) -> None:
    outputs = {
        "prepare": lambda cfg, _: f"{cfg.paths.prepared}/metrics.json",
        "validate": lambda cfg, _: f"{cfg.paths.validated}/metrics.json",
        "shard": lambda cfg, _: f"{cfg.paths.shards}/metrics.json",
        "fit": lambda cfg, _: f"{cfg.paths.artifacts}/fit.json",
        "pretrain": lambda cfg, m: f"{cfg.paths.reports}/{'joint' if m == 'joint' else 'pretrain_' + m}.json",
        "evaluate": lambda cfg, _: f"{cfg.paths.reports}/eval/metrics.json",
        "promote": lambda cfg, _: f"{cfg.paths.reports}/promotion.json",
    }
    for name, out_of in outputs.items():
        module_name, function = pipe.STAGES[name]
        try:
            module = importlib.import_module(module_name)
        except ImportError:  # a stage module still being written by its owner
            module = types.ModuleType(module_name)
            monkeypatch.setitem(sys.modules, module_name, module)
        monkeypatch.setattr(module, function, recorder.stage(name, out_of), raising=False)

    def generate(cfg):
        raw = Path(cfg.paths.raw)
        (raw / "pairs").mkdir(parents=True, exist_ok=True)
        (raw / "pairs" / "captions.jsonl").write_text("{}\n")
        return {"generated": 1}

    monkeypatch.setattr(importlib.import_module("flava.data.synthetic"), "run_generate", generate)


@pytest.fixture
def workspace(tmp_path, monkeypatch, prefect_server):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.delenv(PARENT_RUN_ENV, raising=False)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"seed": 0}))
    return tmp_path


async def _server_view(flow_run_id):
    async with get_client() as client:
        run = await client.read_flow_run(flow_run_id)
        tasks = await client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])),
            sort=TaskRunSort.EXPECTED_START_TIME_ASC, limit=200)
    return run, tasks


def artifacts(key):
    """Artifacts with ``key`` over the server's REST API (this client/server pair rejects the client's
    ``read_artifacts`` bodies, whose unset filters go out as null)."""
    import httpx
    from prefect.settings import PREFECT_API_URL

    body = {"artifacts": {"key": {"any_": [key]}}, "offset": 0, "limit": 50, "sort": "CREATED_DESC"}
    response = httpx.post(f"{PREFECT_API_URL.value()}/artifacts/filter", json=body, timeout=30)
    response.raise_for_status()
    return response.json()


def server_view(state, expect=(), timeout_s=30.0):
    """The flow run and its task runs as the server records them. Task-run states reach the server as events,
    processed asynchronously: poll until every name in ``expect`` is there in a final state."""
    deadline = time.monotonic() + timeout_s
    while True:
        run, tasks = asyncio.run(_server_view(state.state_details.flow_run_id))
        final = {t.name for t in tasks if t.state is not None and t.state.is_final()}
        if set(expect) <= final or time.monotonic() > deadline:
            return run, tasks
        time.sleep(0.5)


def test_flow_runs_stages_in_order_with_parallel_encoders(workspace, monkeypatch):
    rec = Recorder()
    install_fakes(monkeypatch, rec)
    state = pipe.flava_pipeline(params_path="params.yaml", overrides=["train.joint.steps=7"], return_state=True)
    assert state.is_completed(), state
    results = state.result()

    order = rec.order()
    assert order[:2] == ["prepare", "validate"]
    assert set(order[2:4]) == {"shard", "fit"} and set(order[4:6]) == {"text", "image"}
    assert order[6:] == ["joint", "evaluate", "promote"]
    # Parallel pairs ran in different threads and overlapped in time (the barriers would have timed out else).
    for a, b in (("shard", "fit"), ("text", "image")):
        ca, cb = rec.get(a), rec.get(b)
        assert ca["thread"] != cb["thread"]
        assert ca["start"] < cb["end"] and cb["start"] < ca["end"]
    # Every stage ran after its inputs were written.
    assert rec.get("validate")["start"] >= rec.get("prepare")["end"]
    assert rec.get("joint")["start"] >= max(rec.get("text")["end"], rec.get("image")["end"])
    assert (workspace / "reports" / "promotion.json").exists()
    assert results["data"]["raw_data"] == "generated"

    expected = ("data-version", "prepare", "validate", "shard", "fit", "pretrain-text", "pretrain-image",
                "pretrain-joint", "evaluate", "promote")
    run, tasks = server_view(state, expected)
    assert run.state.type.value == "COMPLETED" and run.name
    assert run.parameters["overrides"] == ["train.joint.steps=7"]
    names = [t.name for t in tasks]
    for name in expected:
        assert names.count(name) == 1, (name, names)
    assert all(t.state.type.value == "COMPLETED" for t in tasks)
    by_name = {t.name: t for t in tasks}
    assert by_name["pretrain-text"].id != by_name["pretrain-image"].id
    assert by_name["validate"].start_time <= by_name["shard"].start_time

    (summary,) = [a for a in artifacts("flava-pipeline-summary") if a["flow_run_id"] == str(run.id)]
    assert "| promote |" in summary["data"] and "| pretrain_text |" in summary["data"]

    # One MLflow parent run; every stage saw its id.
    parent = results["mlflow_parent_run_id"]
    assert {c["parent"] for c in rec.calls} == {parent}
    run_info = mlflow.tracking.MlflowClient().get_run(parent)
    assert run_info.info.status == "FINISHED"
    assert run_info.data.tags["prefect.flow_run_id"] == str(run.id)
    assert run_info.data.tags["raw_data"] == "generated"


def test_failed_stage_fails_the_flow_run_and_the_parent_run(workspace, monkeypatch):
    rec = Recorder(fail="evaluate")
    install_fakes(monkeypatch, rec)
    state = pipe.flava_pipeline(params_path="params.yaml", return_state=True)
    assert state.is_failed()
    assert "promote" not in rec.order()
    run, tasks = server_view(state, ("evaluate", "pretrain-joint"))
    assert run.state.type.value == "FAILED"
    states = {t.name: t.state.type.value for t in tasks}
    assert states["evaluate"] == "FAILED" and states["pretrain-joint"] == "COMPLETED"
    parent = rec.get("prepare")["parent"]
    assert mlflow.tracking.MlflowClient().get_run(parent).info.status == "FAILED"


def test_sweep_feeds_best_params_to_joint_on_kubernetes(workspace, monkeypatch):
    from tests.integration.test_k8s_api import FakeCluster, make_handler
    from http.server import ThreadingHTTPServer

    rec = Recorder()
    install_fakes(monkeypatch, rec)
    cluster = FakeCluster(outcome="Complete", polls=0)
    server = ThreadingHTTPServer(("127.0.0.1", 0), make_handler(cluster))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    kubeconfig = workspace / "kubeconfig"
    kubeconfig.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "fake",
        "clusters": [{"name": "fake", "cluster": {"server": f"http://127.0.0.1:{server.server_address[1]}"}}],
        "users": [{"name": "u", "user": {"token": "t"}}],
        "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "u"}}],
    }))
    monkeypatch.setenv("KUBECONFIG", str(kubeconfig))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    try:
        state = pipe.flava_pipeline(params_path="params.yaml", sweep=True, joint_on_k8s=True, return_state=True)
    finally:
        server.shutdown()
        server.server_close()
    assert state.is_completed(), state
    results = state.result()

    sweep = json.loads((workspace / "reports" / "sweep.json").read_text())
    best = sweep["best"]["params"]
    # Sweep trials ran the (fake) joint stage locally; the final joint ran as a Kubernetes Job only.
    assert rec.order().count("joint") == sweep["n_complete"]
    ((kind, ns, job_name),) = [k for k in cluster.objects if k[0] == "Job"]
    rendered = yaml.safe_load(cluster.objects[("ConfigMap", ns, job_name)]["data"]["params.yaml"])
    assert rendered["data"]["mixing"]["ratios"]["pair"] == pytest.approx(best["data.mixing.ratios.pair"])
    assert rendered["train"]["joint"]["warmup_steps"] == best["train.joint.warmup_steps"]
    job_env = {e["name"]: e.get("value") for e in
               cluster.objects[("Job", ns, job_name)]["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert job_env[PARENT_RUN_ENV] == results["mlflow_parent_run_id"]
    assert results["joint"]["state"] == "Succeeded" and results["joint"]["job"] == job_name
    assert rec.order()[-2:] == ["evaluate", "promote"]

    run, tasks = server_view(state, ("sweep", "joint-k8s", "promote"))
    names = [t.name for t in tasks]
    assert "sweep" in names and "joint-k8s" in names and "pretrain-joint" not in names


def test_scheduled_deployment_registers_on_the_server(workspace, project_root):
    from flows.serve import build_deployment

    deployment_id = build_deployment("params.yaml").apply()

    async def read():
        async with get_client() as client:
            return await client.read_deployment(deployment_id)

    dep = asyncio.run(read())
    assert dep.name == "flava-weekly"
    assert dep.schedules[0].schedule.cron == "0 3 * * 1"
    assert dep.parameters == {"params_path": "params.yaml", "sweep": False, "joint_on_k8s": False}
    assert dep.entrypoint.endswith("pipeline.py:flava_pipeline")

    # infra/prefect.yaml: every deployment points at the flow and carries a valid cron.
    from prefect.client.schemas.schedules import CronSchedule
    from prefect.flows import load_flow_from_entrypoint

    spec = yaml.safe_load((project_root / "infra" / "prefect.yaml").read_text())
    assert spec["deployments"]
    for item in spec["deployments"]:
        flow_obj = load_flow_from_entrypoint(str(project_root / item["entrypoint"]))
        assert flow_obj.name == "flava-pipeline"
        for schedule in item["schedules"]:
            CronSchedule(cron=schedule["cron"], timezone=schedule.get("timezone"))  # raises if invalid
        assert set(item.get("parameters", {})) <= {"params_path", "overrides", "sweep", "joint_on_k8s"}


def test_transient_errors_retry_and_config_errors_do_not(workspace, monkeypatch):
    rec = Recorder()
    install_fakes(monkeypatch, rec)
    shard_module = importlib.import_module(pipe.STAGES["shard"][0])
    real_shard, attempts = getattr(shard_module, "run_shard"), []

    def flaky_shard(cfg):
        attempts.append(1)
        if len(attempts) == 1:
            raise ConnectionError("S3 connection reset")
        return real_shard(cfg)

    monkeypatch.setattr(shard_module, "run_shard", flaky_shard)
    monkeypatch.setattr(pipe, "shard", pipe.shard.with_options(retry_delay_seconds=0))
    rec.barriers["shard"] = rec.barriers["fit"] = threading.Barrier(1)  # shard and fit no longer meet
    # No Kubernetes configuration: a ValueError, which must not be retried (its retry delay is 60 s).
    monkeypatch.setenv("KUBECONFIG", str(workspace / "missing-kubeconfig"))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    state = pipe.flava_pipeline(params_path="params.yaml", joint_on_k8s=True, return_state=True)
    assert state.is_failed()
    assert len(attempts) == 2
    runs = {t.name: t for t in server_view(state, ("shard", "joint-k8s"))[1]}
    assert runs["shard"].state.type.value == "COMPLETED" and runs["shard"].run_count == 2
    assert runs["joint-k8s"].state.type.value == "FAILED" and runs["joint-k8s"].run_count == 1
    assert "no usable Kubernetes configuration" in runs["joint-k8s"].state.message
