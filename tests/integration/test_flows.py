"""The Prefect flow against a real temporary Prefect server (``prefect_test_harness``), driving the real ``dvc repro``
in a git + DVC workspace whose dvc.yaml has the project's stages, edges and metrics files but light commands
(``tests/integration/flow_workspace.py``). The real stages under the flow are ``test_flows_real_stages.py``.

Checks: the task graph has exactly the pipeline's edges; text || image really overlap; the stage's own log lines
and the promotion decision are in the run logs, the decision in the promote task's state message and the summary
artifact (a table with MLflow links); DVC decides what is up to date; overrides fail early or land in params.yaml
as DVC writes them; a failing stage fails the run, is not retried when its command says bad input, and the
failure hook notifies through a real webhook block; two triggers on one workspace never run at once; serve and
deploy coexist and serve refuses to replace a worker deployment; the run form has descriptions and a preset choice.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import types
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import mlflow
import pytest
import yaml
from prefect.blocks.notifications import CustomWebhookNotificationBlock
from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import WorkPoolCreate
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
from prefect.client.schemas.sorting import TaskRunSort
from prefect.settings import PREFECT_API_URL
from prefect.testing.utilities import prefect_test_harness

from flava import pipeline as pl
from flava.tracking.lineage import PARENT_RUN_ENV
from flows import pipeline as pipe
from flows import serve
from tests.integration.flow_workspace import ROOT, calls, make_workspace

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

PIPELINE_EDGES = {
    ("raw_data", "prepare"), ("params", "prepare"), ("prepare", "validate"), ("validate", "shard"), ("validate", "fit"),
    ("shard", "pretrain_text"), ("fit", "pretrain_text"), ("shard", "pretrain_image"), ("fit", "pretrain_image"),
    ("pretrain_text", "joint"), ("pretrain_image", "joint"), ("joint", "evaluate"), ("evaluate", "promote"),
}
PIPELINE_STAGES = {name for edge in PIPELINE_EDGES for name in edge}


@pytest.fixture(scope="module")
def prefect_server():
    with prefect_test_harness(server_startup_timeout=180):
        yield


def _use(ws: Path, mp: pytest.MonkeyPatch) -> None:
    mp.chdir(ws)
    mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{ws / 'mlflow.db'}")
    mp.delenv(PARENT_RUN_ENV, raising=False)
    for knob in ("FAKE_FAIL", "FAKE_FAIL_CODE", "FAKE_FAIL_ONCE", "FAKE_SLEEP"):
        mp.delenv(knob, raising=False)


def server_view(flow_run_id, expect=(), timeout_s=30.0):
    """The flow run and its task runs as the server records them; task-run states arrive as events, processed
    asynchronously: poll until every name in ``expect`` is there in a final state."""
    deadline = time.monotonic() + timeout_s
    with get_client(sync_client=True) as client:
        while True:
            run = client.read_flow_run(flow_run_id)
            tasks = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])),
                                          sort=TaskRunSort.EXPECTED_START_TIME_ASC, limit=200)
            final = {t.name for t in tasks if t.state is not None and t.state.is_final()}
            if set(expect) <= final or time.monotonic() > deadline:
                return run, tasks
            time.sleep(0.5)


def _rest(path: str, body: dict) -> list[dict]:
    """POST to the server's REST API (this client/server pair sends unset filters as null in some bodies)."""
    response = httpx.post(f"{PREFECT_API_URL.value()}/{path}", json=body, timeout=30)
    response.raise_for_status()
    return response.json()


def run_logs(flow_run_id, until: str, timeout_s: float = 30.0) -> list[dict]:
    """The run's logs from the server; they are shipped in batches, so poll until ``until`` appears."""
    deadline = time.monotonic() + timeout_s
    while True:
        logs = _rest("logs/filter", {"logs": {"flow_run_id": {"any_": [str(flow_run_id)]}}, "limit": 200,
                                     "offset": 0, "sort": "TIMESTAMP_ASC"})
        more = _rest("logs/filter", {"logs": {"flow_run_id": {"any_": [str(flow_run_id)]}}, "limit": 200,
                                     "offset": 200, "sort": "TIMESTAMP_ASC"})
        logs += more
        if any(until in entry["message"] for entry in logs) or time.monotonic() > deadline:
            return logs
        time.sleep(0.5)


def artifacts(key: str) -> list[dict]:
    return _rest("artifacts/filter", {"artifacts": {"key": {"any_": [key]}}, "offset": 0, "limit": 50,
                                      "sort": "CREATED_DESC"})


def edges(tasks) -> set[tuple[str, str]]:
    """(upstream, downstream) task-run names from what the server recorded as each task run's inputs."""
    name = {t.id: t.name for t in tasks}
    return {(name[i.id], t.name) for t in tasks for inputs in t.task_inputs.values() for i in inputs
            if getattr(i, "id", None) in name}


@pytest.fixture(scope="module")
def first_run(prefect_server, tmp_path_factory):
    """One flow run on a fresh workspace, with an override; text and image must meet at a barrier."""
    ws = make_workspace(tmp_path_factory.mktemp("flow") / "ws")
    with pytest.MonkeyPatch.context() as mp:
        _use(ws, mp)
        mp.setenv("FAKE_BARRIER", str(ws.parent / "barrier"))
        params_before = yaml.safe_load((ws / "params.yaml").read_text())
        state = pipe.flava_pipeline(overrides=["train.joint.steps=7"], return_state=True)
        run_id = state.state_details.flow_run_id
        run, tasks = server_view(run_id, PIPELINE_STAGES)
        yield types.SimpleNamespace(ws=ws, state=state, run=run, tasks=tasks, params_before=params_before,
                                    calls=calls(ws))


def test_task_graph_has_exactly_the_pipeline_edges(first_run):
    assert first_run.state.is_completed(), first_run.state
    assert first_run.run.state.type.value == "COMPLETED"
    names = [t.name for t in first_run.tasks]
    assert len(names) == len(set(names)) and PIPELINE_STAGES <= set(names), names
    recorded = edges(first_run.tasks)
    assert {e for e in recorded if set(e) <= PIPELINE_STAGES} == PIPELINE_EDGES
    # ... and nothing but dvc.yaml's edges elsewhere (a stage outside the chain has its own, or none).
    graph = pl.stage_graph(pl.dvc_stages(first_run.ws), "data/raw")
    assert recorded == {(p, n) for n, preds in graph.items() for p in preds}
    # The tasks take plain values (quoted), no other task's result: the only inputs are wait_for edges.
    assert all(not inputs for t in first_run.tasks for key, inputs in t.task_inputs.items() if key != "wait_for")


def test_text_and_image_stages_run_side_by_side(first_run):
    by_stage = {c["stage"]: c for c in first_run.calls}
    text, image = by_stage["pretrain_text"], by_stage["pretrain_image"]
    assert text["pid"] != image["pid"]
    assert text["start"] < image["end"] and image["start"] < text["end"]  # the barrier made them meet
    tasks = {t.name: t for t in first_run.tasks}
    assert tasks["pretrain_text"].start_time < tasks["pretrain_image"].end_time
    assert tasks["pretrain_image"].start_time < tasks["pretrain_text"].end_time
    order = [c["stage"] for c in sorted(first_run.calls, key=lambda c: c["start"])]
    for up, down in PIPELINE_EDGES - {("raw_data", "prepare")}:
        assert by_stage[up]["end"] <= by_stage[down]["start"], (up, down, order)


def test_run_logs_hold_the_stage_lines_and_the_decision(first_run):
    logs = run_logs(first_run.run.id, "promotion: flava v1 is @champion")
    task_name = {str(t.id): t.name for t in first_run.tasks}
    lines = [(task_name.get(str(e["task_run_id"])), e["level"], e["message"]) for e in logs]
    assert ("pretrain_text", 20, "2026-12-03 09:00:00,000 INFO flava.fake: pretrain_text: step 4 loss 1.25") in lines
    assert ("joint", 30, "2026-12-03 09:00:00,000 WARNING flava.fake: joint: a warning the stage logged") in lines
    assert any(t == "promote" and "promotion: flava v1 is @champion" in m for t, _, m in lines)
    assert any(t == "shard" and m == "Running stage 'shard':" for t, _, m in lines)  # DVC's own lines too
    promote = next(t for t in first_run.tasks if t.name == "promote")
    assert promote.state.message == "promote: ran; flava v1 is @champion; overall 0.52, no earlier champion"


def test_summary_artifact_is_a_table_with_links(first_run):
    (summary,) = [a for a in artifacts("flava-pipeline-summary") if a["flow_run_id"] == str(first_run.run.id)]
    text = summary["data"]
    assert text.startswith("# FLAVA pipeline: flava v1 is @champion")
    assert "| stage | DVC | steps | final loss | best zero-shot top-1 | macro overall | decision | MLflow |" in text
    assert "| joint | ran | 4 | 2.5 | 0.4 |  |  |" in text
    assert "| evaluate | ran |  |  |  | 0.52 |  | [run](http://127.0.0.1:5000/#/experiments/" in text
    assert "| promote | ran |" in text and "@champion v1" in text
    assert "[flava v1](http://127.0.0.1:5000/#/models/flava/versions/1)" in text
    parent = first_run.state.result()["mlflow_parent_run_id"]
    assert f"/runs/{parent})" in text
    # The MLflow parent run links back to the flow run.
    run = mlflow.tracking.MlflowClient(f"sqlite:///{first_run.ws / 'mlflow.db'}").get_run(parent)
    assert run.data.tags["trigger"] == "prefect" and run.info.status == "FINISHED"


def test_overrides_land_in_params_yaml_as_dvc_writes_them(first_run):
    after = yaml.safe_load((first_run.ws / "params.yaml").read_text())
    expected = json.loads(json.dumps(first_run.params_before))
    expected["train"].setdefault("joint", {})["steps"] = 7
    assert after == expected


def test_dvc_decides_what_is_up_to_date(first_run, monkeypatch):
    _use(first_run.ws, monkeypatch)
    before = len(calls(first_run.ws))
    state = pipe.flava_pipeline(return_state=True)
    assert state.is_completed(), state
    result = state.result()
    assert {result[name]["status"] for name in PIPELINE_STAGES - {"raw_data"}} == {"up to date"}
    assert len(calls(first_run.ws)) == before  # no stage command ran
    status = subprocess.run([pl.dvc_executable(), "status", "--json"], cwd=first_run.ws, capture_output=True,
                            text=True, check=True)
    assert json.loads(status.stdout) == {}


def test_a_dask_address_sets_the_data_engine_and_re_runs_nothing(first_run, monkeypatch):
    """The flow maps no partitions itself: the data stages do, on the engine params.yaml names."""
    _use(first_run.ws, monkeypatch)
    params = first_run.ws / "params.yaml"
    before, text = len(calls(first_run.ws)), params.read_text()
    try:
        state = pipe.flava_pipeline(dask_address="tcp://flava-dask-scheduler.flava.svc:8786", return_state=True)
        assert state.is_completed(), state
        engine = yaml.safe_load(params.read_text())["data"]["engine"]
        assert (engine["kind"], engine["address"]) == ("address", "tcp://flava-dask-scheduler.flava.svc:8786")
        assert len(calls(first_run.ws)) == before  # where partitions run is no DVC param: every stage up to date
    finally:
        params.write_text(text)


def test_a_bad_override_fails_before_anything_runs(first_run, monkeypatch):
    _use(first_run.ws, monkeypatch)
    before, params = len(calls(first_run.ws)), (first_run.ws / "params.yaml").read_text()
    state = pipe.flava_pipeline(overrides=["train.joint.stepz=3"], return_state=True)
    assert state.is_failed()
    assert "stepz" in str(state.message) or "stepz" in repr(state.result(raise_on_failure=False))
    assert len(calls(first_run.ws)) == before and (first_run.ws / "params.yaml").read_text() == params


class _Hook(BaseHTTPRequestHandler):
    received: list[dict] = []

    def do_POST(self):  # noqa: N802 - http.server's name
        _Hook.received.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args):
        pass


def test_failed_stage_fails_the_run_and_notifies_through_a_webhook_block(prefect_server, tmp_path, monkeypatch):
    ws = make_workspace(tmp_path / "ws")
    _use(ws, monkeypatch)
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Hook)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/hook"
    CustomWebhookNotificationBlock(name="flava", url=url, json_data={"text": "{{subject}} | {{body}}"}).save(
        "flava-alerts", overwrite=True)
    monkeypatch.setenv("FAKE_FAIL", "shard")
    monkeypatch.setenv("FAKE_FAIL_CODE", "2")  # what `flava` exits with on bad input: not worth a retry
    try:
        state = pipe.flava_pipeline(overrides=["launch.schedule.notify_block=custom-webhook/flava-alerts"],
                                    return_state=True)
        deadline = time.monotonic() + 20
        while not _Hook.received and time.monotonic() < deadline:
            time.sleep(0.2)
    finally:
        server.shutdown()
        server.server_close()
    assert state.is_failed()
    run, tasks = server_view(state.state_details.flow_run_id, ("shard",))
    by_name = {t.name: t for t in tasks}
    assert by_name["shard"].state.type.value == "FAILED" and by_name["shard"].run_count == 1
    assert "pretrain_text" not in by_name or by_name["pretrain_text"].state.type.value != "COMPLETED"
    assert "pretrain_text" not in {c["stage"] for c in calls(ws)}
    (message,) = _Hook.received
    assert message["text"].startswith(f"flava-pipeline run {run.name} failed | ")
    assert "stage shard failed" in message["text"]


def test_a_stage_failing_for_a_passing_reason_is_retried(prefect_server, tmp_path, monkeypatch):
    ws = make_workspace(tmp_path / "ws")
    _use(ws, monkeypatch)
    monkeypatch.setattr(pipe, "dvc_stage", pipe.dvc_stage.with_options(retry_delay_seconds=0))
    monkeypatch.setenv("FAKE_FAIL", "shard")  # exits 1: not a bad-input exit, and shard may retry (S3)
    monkeypatch.setenv("FAKE_FAIL_ONCE", "1")
    state = pipe.flava_pipeline(return_state=True)
    assert state.is_completed(), state
    run, tasks = server_view(state.state_details.flow_run_id, ("shard", "promote"))
    shard = next(t for t in tasks if t.name == "shard")
    assert shard.state.type.value == "COMPLETED" and shard.run_count == 2


def test_two_triggers_on_one_workspace_never_run_at_once(prefect_server, tmp_path, monkeypatch):
    ws = make_workspace(tmp_path / "ws")
    _use(ws, monkeypatch)
    monkeypatch.setenv("FAKE_SLEEP", "0.3")
    # As a served/deployed run: both hold the global concurrency limit, created on first use, so the second
    # waits for the first instead of failing on the workspace lock (lock_timeout_s is 0).
    monkeypatch.setattr(pipe, "deployment", types.SimpleNamespace(id="a-deployment"))
    states = []

    def trigger():
        states.append(pipe.flava_pipeline(force=True, return_state=True))

    threads = [threading.Thread(target=trigger) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert len(states) == 2 and all(s.is_completed() for s in states), states
    order = [c["stage"] for c in sorted(calls(ws), key=lambda c: c["start"])]
    half = len(order) // 2
    assert sorted(order[:half]) == sorted(order[half:]) and len(set(order[:half])) == half, order
    with get_client(sync_client=True) as client:
        assert client.read_global_concurrency_limit_by_name("flava-workspace").limit == 1

    # Started in-process (no deployment) while the workspace is busy: fails at once, naming the holder.
    monkeypatch.setattr(pipe, "deployment", types.SimpleNamespace(id=None))
    with pl.workspace_lock(ws, "flava pipeline run (test)"):
        state = pipe.flava_pipeline(return_state=True)
    assert state.is_failed()
    with pytest.raises(pl.WorkspaceBusy, match=r"is busy: flava pipeline run \(test\) \(pid"):
        state.result()


def test_sweep_then_joint_on_kubernetes_are_recorded_by_dvc(prefect_server, tmp_path, monkeypatch):
    ws = make_workspace(tmp_path / "ws")
    _use(ws, monkeypatch)
    swept, jobs = [], []

    def fake_sweep(cfg):
        swept.append(cfg.data.mixing.ratios)
        return {"best_value": 0.5, "best_overrides": ["data.mixing.ratios.pair=0.75"],
                "best_values": {"data.mixing.ratios.pair": 0.75}, "n_complete": 4, "n_pruned": 2, "n_failed": 0,
                "n_lost": 0, "trial_steps": 320, "mlflow_run_id": "sweeprun", "best_mlflow_run_id": "bestrun",
                "plots": ["reports/plots/optimization_history.png"]}

    def fake_joint(cfg):  # the Job writes the joint stage's outputs on the shared workspace
        jobs.append(cfg.data.mixing.ratios["pair"])
        subprocess.run([sys.executable, "fake_stage.py", "joint"], cwd=ws, check=True, capture_output=True)
        return {"job": "flava-joint-x", "state": "Succeeded"}

    monkeypatch.setattr(pipe, "run_sweep", fake_sweep)
    monkeypatch.setattr(pipe, "run_joint", fake_joint)
    state = pipe.flava_pipeline(sweep=True, joint_on_k8s=True, return_state=True)
    assert state.is_completed(), state
    assert len(swept) == 1 and jobs == [0.75]  # the Job trained with the sweep's best ratio
    assert yaml.safe_load((ws / "params.yaml").read_text())["data"]["mixing"]["ratios"]["pair"] == 0.75
    run, tasks = server_view(state.state_details.flow_run_id, ("sweep", "joint-k8s", "promote"))
    (summary,) = [a for a in artifacts("flava-sweep") if a["flow_run_id"] == str(state.state_details.flow_run_id)]
    assert "4 complete, 2 pruned" in summary["data"] and "runs/bestrun" in summary["data"]
    assert "| `data.mixing.ratios.pair` | 0.75 |" in summary["data"] and "optimization history" in summary["data"]
    recorded = edges(tasks)
    assert {("pretrain_text", "sweep"), ("pretrain_image", "sweep"), ("sweep", "joint-k8s"),
            ("joint-k8s", "evaluate")} <= recorded
    assert [c["stage"] for c in calls(ws)].count("joint") == 1  # the Job's run only; DVC did not train again
    status = subprocess.run([pl.dvc_executable(), "status", "--json"], cwd=ws, capture_output=True, text=True,
                            check=True)
    assert json.loads(status.stdout) == {}  # dvc.lock records the Job's joint outputs: nothing to re-run


def test_serve_and_deploy_coexist_and_serve_refuses_a_worker_deployment(prefect_server, tmp_path, monkeypatch):
    with get_client(sync_client=True) as client:
        client.create_work_pool(WorkPoolCreate(name="flava-process", type="process"), overwrite=True)
        template = json.loads((ROOT / "infra/prefect/k8s-base-job-template.json").read_text())
        client.create_work_pool(WorkPoolCreate(name="flava-k8s", type="kubernetes", base_job_template=template),
                                overwrite=True)
    env = dict(os.environ, PREFECT_API_URL=PREFECT_API_URL.value(), FLAVA_HOME=str(ROOT), FLAVA_IMAGE="flava:test")
    deployed = subprocess.run([str(Path(sys.executable).parent / "prefect"), "--no-prompt", "deploy", "--all",
                               "--prefect-file", "infra/prefect.yaml"], cwd=ROOT, env=env, capture_output=True,
                              text=True, timeout=300)
    assert deployed.returncode == 0, deployed.stdout[-3000:] + deployed.stderr[-3000:]

    ws = make_workspace(tmp_path / "ws")
    _use(ws, monkeypatch)
    serve.check_not_a_worker_deployment("flava-weekly-serve")  # nothing of that name yet
    served_id = serve.build_deployment().apply()
    with get_client(sync_client=True) as client:
        worker = client.read_deployment_by_name("flava-pipeline/flava-weekly")
        served = client.read_deployment(served_id)
    assert served.name == "flava-weekly-serve" and served.work_pool_name is None and not served.pull_steps
    assert worker.work_pool_name == "flava-process" and worker.pull_steps  # untouched by the served one
    assert served.schedules[0].schedule.cron == "0 3 * * 1"
    assert served.parameters == {"sweep": False, "joint_on_k8s": False}

    # The run form: every parameter described, the overrides' format shown, the preset a choice.
    schema = served.parameter_openapi_schema["properties"]
    assert set(schema) == {"overrides", "preset", "force", "sweep", "joint_on_k8s", "dask_address"}
    assert all(prop.get("description") for prop in schema.values()), schema
    assert "`key.path=value`" in schema["overrides"]["description"]
    assert "train.joint.steps=200" in schema["overrides"]["description"]
    (choice,) = [option for option in schema["preset"]["anyOf"] if "enum" in option]
    assert choice["enum"] == ["tiny", "small", "base"]
    assert worker.parameter_openapi_schema["properties"]["preset"] == schema["preset"]

    # Serving under the worker deployment's name is refused, before anything is served.
    pl.set_params(ws, ["launch.schedule.deployment=flava-weekly"])
    with pytest.raises(SystemExit, match="already exists as a worker deployment .*flava-process"):
        serve.main([])
    with get_client(sync_client=True) as client:
        assert client.read_deployment_by_name("flava-pipeline/flava-weekly").pull_steps
