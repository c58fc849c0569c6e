"""The launcher's life on the API server: submit / wait / logs / run_joint / delete and ``flava k8s ...`` against
the fake API server on loopback (``fake_k8s.py``: the Job controller's rules played from the rendered Job's own
podFailurePolicy, successPolicy and backoffLimit), through the official ``kubernetes`` client.

Simulated: a preempted leader, a preempted worker, a config error (FailJob exit code) in one rank, repeated crashes
past backoffLimit, pods Pending forever (unschedulable with an unbound PVC; image pull back-off), 5xx/429 and
connection resets during the wait, a launcher interrupted (cancelled flow) or timed out, and a retried launch
re-attaching to its Job. The last test runs this file again under the kubernetes client release pyproject
declares as the floor."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import kubernetes
import pytest
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from flava.config import PipelineConfig
from flava.launch import k8s as k8slib
from flava.launch.config import K8sConfig
from flava.tracking.lineage import PARENT_RUN_ENV

from .fake_k8s import FakeCluster, FakeServer, use_kubeconfig

SERVER = "http://mlflow.example:5000"
FLOOR = "29.0.0"  # pyproject: kubernetes>=29


@pytest.fixture(autouse=True)
def _tracking_env(monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", SERVER)  # pods may nest under a parent run on a server
    monkeypatch.delenv(PARENT_RUN_ENV, raising=False)


@pytest.fixture
def fake_k8s():
    cluster = FakeCluster()
    with FakeServer(cluster) as server:
        yield cluster, client.ApiClient(client.Configuration(host=server.host))


def render(nodes=2, run_id="r1", **fields):
    return k8slib.build_manifests(PipelineConfig(), run_id=run_id,
                                  k8s=K8sConfig(namespace="ml", nodes=nodes, **fields))


class Clock:
    """A fake clock advanced by the launcher's sleeps (poll intervals and retry backoffs)."""

    def __init__(self):
        self.now, self.sleeps = 0.0, []

    def sleep(self, seconds):
        self.sleeps.append(seconds)
        self.now += seconds

    def __call__(self):
        return self.now


def fast(**fields) -> K8sConfig:
    return K8sConfig(**{"poll_interval_s": 5.0, "pending_timeout_s": 60.0, **fields})


def run(cfg, api, clock, **kwargs):
    return k8slib.run_joint(cfg, api=api, sleep=clock.sleep, clock=clock, **kwargs)


@pytest.fixture
def cfg(tmp_path):
    return PipelineConfig.model_validate({"paths": {"reports": str(tmp_path / "reports")}})


# ------------------------------------------------------------------------------------------------ submit
def test_submit_sends_plain_json_bodies_job_first_then_owned_configmap_and_service(fake_k8s):
    cluster, api = fake_k8s
    job = k8slib.submit(render(), api=api)
    assert (job.name, job.namespace, job.completions, job.reattached) == ("flava-joint-r1", "ml", 2, False)
    posts = [path for method, path in cluster.requests if method == "POST"]
    assert posts == ["/apis/batch/v1/namespaces/ml/jobs", "/api/v1/namespaces/ml/configmaps",
                     "/api/v1/namespaces/ml/services"]
    stored_job = cluster.objects[("Job", "ml", "flava-joint-r1")]
    assert stored_job["metadata"]["uid"] == job.uid
    # What was rendered is what the server got: nothing dropped or renamed by client models.
    rendered_job = next(m for m in render() if m["kind"] == "Job")
    assert stored_job["spec"]["podFailurePolicy"] == rendered_job["spec"]["podFailurePolicy"]
    assert stored_job["spec"]["successPolicy"] == {"rules": [{"succeededIndexes": "0"}]}
    assert stored_job["spec"]["template"] == rendered_job["spec"]["template"]
    for kind in ("ConfigMap", "Service"):
        (owner,) = cluster.objects[(kind, "ml", "flava-joint-r1")]["metadata"]["ownerReferences"]
        assert (owner["kind"], owner["name"], owner["uid"]) == ("Job", "flava-joint-r1", job.uid)


def test_submit_creates_the_workspace_pvc_when_missing_and_keeps_an_existing_one(fake_k8s):
    cluster, api = fake_k8s
    k8slib.submit(render(create_workspace_pvc=True, workspace_storage_class="nfs-rwx"), api=api)
    pvc = cluster.objects[("PersistentVolumeClaim", "ml", "flava-workspace")]
    assert pvc["spec"]["storageClassName"] == "nfs-rwx" and "ownerReferences" not in pvc["metadata"]
    job = k8slib.submit(render(run_id="r2", create_workspace_pvc=True), api=api)  # 409 on the PVC: kept
    assert job.name == "flava-joint-r2"
    assert cluster.objects[("PersistentVolumeClaim", "ml", "flava-workspace")]["metadata"]["uid"] == \
        pvc["metadata"]["uid"]


def test_submit_again_reattaches_and_other_params_are_refused(fake_k8s):
    cluster, api = fake_k8s
    first = k8slib.submit(render(), api=api)
    again = k8slib.submit(render(), api=api)
    assert again.reattached and again.uid == first.uid
    assert [p for m, p in cluster.requests if m == "POST"].count("/apis/batch/v1/namespaces/ml/jobs") == 2
    assert sum(1 for key in cluster.objects if key[0] == "Job") == 1
    other = PipelineConfig.model_validate({"seed": 7})
    with pytest.raises(ValueError, match="already exists with other params"):
        k8slib.submit(k8slib.build_manifests(other, run_id="r1", k8s=K8sConfig(namespace="ml", nodes=2)), api=api)


def test_failed_dependent_object_deletes_the_job(fake_k8s):
    cluster, api = fake_k8s
    cluster.objects[("ConfigMap", "ml", "flava-joint-r1")] = {"metadata": {"name": "flava-joint-r1"}}
    with pytest.raises(RuntimeError, match="ConfigMap.*job was deleted"):
        k8slib.submit(render(), api=api)
    assert ("Job", "ml", "flava-joint-r1") not in cluster.objects


# ------------------------------------------------------------------------------------------------ wait
def test_wait_polls_until_complete_and_logs_come_back_per_index(fake_k8s):
    cluster, api = fake_k8s
    cluster.polls = 3
    job = k8slib.submit(render(nodes=3, leader_success_policy=False), api=api)
    clock = Clock()
    status = k8slib.wait(job, api=api, timeout_s=600, poll_s=0.5, sleep=clock.sleep, clock=clock)
    assert status.state == "Succeeded" and status.succeeded == 3
    assert clock.sleeps == [0.5] * 5  # three idle polls, then one index finishing per poll until all three did
    out = k8slib.logs(job, api=api)
    assert len(out) == 3
    for index, text in enumerate(out.values()):
        assert f"--node-rank={index} " in text and f"node {index}: training done" in text


def test_preempted_leader_is_not_counted_and_the_leader_decides(fake_k8s, cfg):
    """Pod 0 preempted: ignored by the failure policy and replaced under index 0; the peer's torchrun gives up
    once (counted, within the per-node budget); the replacement leader finishes and successPolicy completes
    the Job while index 1's replacement still runs."""
    cluster, api = fake_k8s
    cluster.script["flava-joint-lead"] = ["tick", ("disrupt", 0), ("exit", 1, 1, "RendezvousConnectionError\n"),
                                          "tick", ("exit", 0, 0, "node 0: training done (resumed)\n")]
    summary = run(cfg, api, Clock(), run_id="lead", k8s=fast(nodes=2))
    assert summary["state"] == "Succeeded" and summary["reason"] == "SuccessPolicy"
    assert summary["failed"] == 1  # the peer's exit; the preemption is not counted
    job = cluster.objects[("Job", "flava", "flava-joint-lead")]
    assert job["spec"]["backoffLimit"] == 4
    index0 = [p for p in cluster.pods("flava", "flava-joint-lead")
              if p["metadata"]["annotations"][k8slib.INDEX_ANNOTATION] == "0"]
    assert len(index0) == 2  # the preempted pod and its replacement, same index
    assert len(summary["pods"]) == 4


def test_preempted_worker_is_replaced_and_the_job_continues(fake_k8s, cfg):
    cluster, api = fake_k8s
    cluster.script["flava-joint-worker"] = ["tick", ("disrupt", 2), ("disrupt", 2), "tick",
                                            ("exit", 0, 0, "node 0: training done\n")]
    summary = run(cfg, api, Clock(), run_id="worker", k8s=fast(nodes=3, backoff_limit_per_node=0))
    # backoffLimit 0: any counted failure would have failed the Job; two preemptions did not.
    assert summary["state"] == "Succeeded" and summary["failed"] == 0


def test_config_error_in_one_rank_fails_the_job_at_once_reporting_that_pod(fake_k8s, cfg):
    cluster, api = fake_k8s
    cluster.script["flava-joint-bad"] = [
        "tick", ("exit", 1, 2, "flava: error: data.mixing.ratios must sum to 1\nrank 1 exit 2\n")]
    with pytest.raises(k8slib.NonRetryableJobFailure) as caught:
        run(cfg, api, Clock(), run_id="bad", k8s=fast(nodes=3))
    err = caught.value
    assert isinstance(err, ValueError)  # the pipeline's "do not retry"
    text = str(err)
    assert "PodFailurePolicy" in text and "(index 1, exit code 2)" in text
    assert "data.mixing.ratios must sum to 1" in text
    assert "--node-rank=2" not in text  # not the last index's log
    status = json.loads((Path(cfg.paths.reports) / "k8s" / "flava-joint-bad" / "status.json").read_text())
    assert status["failed_pod"]["index"] == 1 and status["failed_pod"]["exit_code"] == 2


def test_crashes_past_the_backoff_limit_report_the_first_failed_pod(fake_k8s, cfg):
    cluster, api = fake_k8s
    cluster.script["flava-joint-oom"] = ["tick", ("exit", 1, 137, "CUDA out of memory (first)\n"),
                                         ("exit", 0, 1, "peer lost\n"), ("exit", 1, 137, "CUDA out of memory\n")]
    with pytest.raises(k8slib.JobFailed) as caught:
        run(cfg, api, Clock(), run_id="oom", k8s=fast(nodes=2, backoff_limit_per_node=1))
    assert not isinstance(caught.value, ValueError)  # a retry may get further
    text = str(caught.value)
    assert "BackoffLimitExceeded" in text and "(index 1, exit code 137)" in text and "(first)" in text


@pytest.mark.parametrize("reason,expected", [
    ("Unschedulable", r"(?s)Pending for 60s.*Unschedulable.*unbound immediate PersistentVolumeClaims.*"
                      r"PVC flava-workspace is Pending \(storageClassName the default"),
    ("ImagePullBackOff", r'(?s)Pending for 60s.*ImagePullBackOff: Back-off pulling image'),
])
def test_pods_pending_forever_fail_fast_with_the_reason_and_the_job_is_deleted(fake_k8s, cfg, reason, expected):
    cluster, api = fake_k8s
    cluster.pvc_phase = "Pending" if reason == "Unschedulable" else "Bound"
    cluster.script["flava-joint-stuck"] = [("pending", 1, reason)] + ["tick"] * 1000
    clock = Clock()
    with pytest.raises(k8slib.PodsPending, match=expected):
        run(cfg, api, clock, run_id="stuck", k8s=fast(nodes=2))
    assert clock.now == 60.0  # pending_timeout_s, not the week-long wait timeout
    assert ("Job", "flava", "flava-joint-stuck") not in cluster.objects
    assert not cluster.pods("flava", "flava-joint-stuck")


def test_transient_api_errors_during_wait_are_retried_with_backoff(fake_k8s, cfg):
    cluster, api = fake_k8s
    cluster.polls = 2
    job = k8slib.submit(render(run_id="flaky"), api=api)
    cluster.faults = [503, 500, 429, 502]
    clock = Clock()
    status = k8slib.wait(job, api=api, timeout_s=600, poll_s=5, sleep=clock.sleep, clock=clock)
    assert status.state == "Succeeded"
    assert [f for f, _, _ in cluster.served_faults] == [503, 500, 429, 502]
    assert clock.sleeps[:4] == [1.0, 2.0, 4.0, 8.0]


def test_connection_resets_during_wait_are_retried(fake_k8s):
    cluster, api = fake_k8s
    job = k8slib.submit(render(run_id="reset"), api=api)
    cluster.faults = ["reset"] * 6  # more than urllib3's own retries of an idempotent GET
    clock = Clock()
    status = k8slib.wait(job, api=api, timeout_s=600, poll_s=5, sleep=clock.sleep, clock=clock)
    assert status.state == "Succeeded" and len(cluster.served_faults) == 6
    assert 1.0 in clock.sleeps  # at least one reset reached the launcher's own retry


def test_api_errors_past_the_retries_fail_and_the_job_is_deleted(fake_k8s, cfg):
    cluster, api = fake_k8s
    cluster.script["flava-joint-down"] = ["tick"] * 100
    clock = Clock()
    original = clock.sleep

    def sleep(seconds):  # the API server goes down after the first poll
        if not cluster.faults and seconds == 5.0:
            cluster.faults = [503] * 4
        original(seconds)

    clock.sleep = sleep
    with pytest.raises(ApiException) as caught:
        run(cfg, api, clock, run_id="down", k8s=fast(api_retries=2))
    assert caught.value.status == 503
    assert ("Job", "flava", "flava-joint-down") not in cluster.objects  # deleted by the 4th request, once up


def test_interrupted_launcher_deletes_its_job(fake_k8s, cfg):
    cluster, api = fake_k8s
    cluster.script["flava-joint-cancel"] = ["tick"] * 100
    clock = Clock()

    def interrupt(seconds):
        raise KeyboardInterrupt  # a cancelled flow run

    clock.sleep = interrupt
    with pytest.raises(KeyboardInterrupt):
        run(cfg, api, clock, run_id="cancel", k8s=fast())
    assert ("Job", "flava", "flava-joint-cancel") not in cluster.objects
    assert ("DELETE", "/apis/batch/v1/namespaces/flava/jobs/flava-joint-cancel") in [
        (m, p.split("?")[0]) for m, p in cluster.requests]


def test_timeout_deletes_the_job(fake_k8s, cfg):
    cluster, api = fake_k8s
    cluster.script["flava-joint-slow"] = ["tick"] * 100
    clock = Clock()
    with pytest.raises(TimeoutError, match="flava-joint-slow not finished after 30s"):
        run(cfg, api, clock, run_id="slow", k8s=fast(wait_timeout_s=30))
    assert clock.now == 30
    assert ("Job", "flava", "flava-joint-slow") not in cluster.objects


def test_a_retried_launch_reattaches_to_its_job(fake_k8s, cfg):
    """The first launcher died mid-wait (its Job left running); the retry, under the same parent run, derives
    the same Job name and follows that Job instead of creating a second one on the same checkpoints."""
    cluster, api = fake_k8s
    k8s = fast(nodes=2)
    name = k8slib.job_name(k8s, k8slib.deterministic_run_id(cfg, "parent-7"))
    cluster.script[name] = ["tick", "tick", ("exit", 0, 0, "node 0: training done\n")]
    first = k8slib.submit(k8slib.build_manifests(cfg, run_id=k8slib.deterministic_run_id(cfg, "parent-7"),
                                                 k8s=k8s, parent_run_id="parent-7"), api=api)
    summary = run(cfg, api, Clock(), parent_run_id="parent-7", k8s=k8s)
    assert summary["job"] == first.name == name and summary["reattached"] is True
    assert summary["state"] == "Succeeded"
    assert [p for m, p in cluster.requests if m == "POST"].count("/apis/batch/v1/namespaces/flava/jobs") == 2
    assert sum(1 for key in cluster.objects if key[0] == "Job") == 1
    env = {e["name"]: e.get("value") for e in
           cluster.objects[("Job", "flava", name)]["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["FLAVA_PARENT_RUN_ID"] == "parent-7" and env["MLFLOW_TRACKING_URI"] == SERVER
    # Another flow run (another parent run): another Job.
    assert k8slib.deterministic_run_id(cfg, "parent-8") != k8slib.deterministic_run_id(cfg, "parent-7")


def test_a_retry_after_a_failed_job_replaces_it(fake_k8s, cfg):
    cluster, api = fake_k8s
    cluster.script["flava-joint-again"] = [("exit", 0, 137, "OOM\n"), ("exit", 0, 137, "OOM\n")]
    with pytest.raises(k8slib.JobFailed):
        run(cfg, api, Clock(), run_id="again", k8s=fast(nodes=1, backoff_limit_per_node=1))
    failed_uid = cluster.objects[("Job", "flava", "flava-joint-again")]["metadata"]["uid"]
    cluster.script["flava-joint-again"] = ["tick", ("exit", 0, 0, "resumed, done\n")]
    summary = run(cfg, api, Clock(), run_id="again", k8s=fast(nodes=1, backoff_limit_per_node=1))
    assert summary["state"] == "Succeeded" and summary["reattached"] is False
    assert cluster.objects[("Job", "flava", "flava-joint-again")]["metadata"]["uid"] != failed_uid


def test_a_parent_run_in_a_local_store_fails_before_any_request(fake_k8s, cfg, monkeypatch):
    cluster, api = fake_k8s
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///mlflow.db")
    with pytest.raises(ValueError, match="launch.k8s.mlflow_tracking_uri"):
        run(cfg, api, Clock(), parent_run_id="p1", k8s=fast())
    assert cluster.requests == []


def test_kueue_suspended_job_waits_without_pods_then_runs(fake_k8s, cfg):
    cluster, api = fake_k8s
    cluster.script["flava-joint-queued"] = ["tick"] * 30 + [("admit",), "tick", ("exit", 0, 0, "done\n")]
    clock = Clock()
    summary = run(cfg, api, clock, run_id="queued", k8s=fast(nodes=2, kueue_queue="team"))
    assert summary["state"] == "Succeeded"
    assert clock.now > 60  # longer than pending_timeout_s: queued is not stuck
    job = cluster.objects[("Job", "flava", "flava-joint-queued")]
    assert job["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "team"


def test_sweep_workers_job_runs_to_completion(fake_k8s, cfg):
    cluster, api = fake_k8s
    sweep_cfg = PipelineConfig.model_validate({"paths": {"reports": cfg.paths.reports}, "launch": {"sweep": {
        "workers": 2, "storage": "postgresql://optuna@db/optuna"}}})
    cluster.script["flava-sweep-s1"] = ["tick", ("disrupt", 1), ("exit", 0, 0, "worker 0 done\n"),
                                        ("exit", 1, 0, "worker 1 done\n")]
    summary = k8slib.run_sweep_job(sweep_cfg, api=api, run_id="s1", k8s=fast(), sleep=Clock().sleep)
    assert summary["state"] == "Succeeded" and summary["succeeded"] == 2 and summary["failed"] == 0
    assert ("Service", "flava", "flava-sweep-s1") not in cluster.objects


# ------------------------------------------------------------------------------------------------ CLI
def test_cli_status_logs_delete(fake_k8s, tmp_path, monkeypatch, capsys, project_root):
    from flava.cli import main

    cluster, api = fake_k8s
    use_kubeconfig(api, tmp_path, monkeypatch)
    params = ["--params", str(project_root / "params.yaml"), "--set", "launch.k8s.nodes=2"]
    assert main(["k8s", "submit", *params, "--run-id", "cli"]) == 0
    submitted = json.loads(capsys.readouterr().out)
    assert submitted["job"] == "flava-joint-cli" and submitted["pods"] == 2
    cluster.script["flava-joint-cli"] = [("exit", 1, 2, "flava: error: bad ratios\n")]
    assert main(["k8s", "status", *params, "flava-joint-cli"]) == 0
    status = json.loads(capsys.readouterr().out)
    assert status["state"] == "Failed" and status["conditions"][0]["reason"] == "PodFailurePolicy"
    assert [(p["index"], p["exit_code"]) for p in status["pods"] if p["exit_code"] is not None] == [(1, 2)]
    assert main(["k8s", "logs", *params, "flava-joint-cli", "--index", "1"]) == 0
    out = capsys.readouterr().out
    assert "flava: error: bad ratios" in out and "--node-rank=0 " not in out
    assert main(["k8s", "delete", *params, "flava-joint-cli", "--wait"]) == 0
    assert json.loads(capsys.readouterr().out)["deleted"] is True
    assert ("Job", "flava", "flava-joint-cli") not in cluster.objects
    assert main(["k8s", "status", *params, "flava-joint-cli"]) == 2  # no such job: a clear error
    assert "no job flava/flava-joint-cli" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------ floor
def test_this_file_passes_under_the_declared_client_floor(tmp_path, project_root):
    """pyproject declares kubernetes>=29: run these tests again with kubernetes 29.0.0 first on the path (its
    own wheel, dependencies from this environment)."""
    declared = re.findall(r'"kubernetes>=([0-9.]+)"', (project_root / "pyproject.toml").read_text())
    assert declared == [FLOOR.split(".")[0]], declared
    if kubernetes.__version__ == FLOOR:
        pytest.skip("already running under the floor release")
    wheels = tmp_path / "wheels"
    got = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(wheels),
                          f"kubernetes=={FLOOR}"], capture_output=True, text=True, timeout=300)
    if got.returncode != 0:
        pytest.skip(f"kubernetes=={FLOOR} not downloadable here (package registry unreachable?): "
                    f"{got.stderr.strip()[-300:]}")
    (wheel,) = wheels.glob("kubernetes-*.whl")
    site = tmp_path / "site"
    with zipfile.ZipFile(wheel) as zf:
        zf.extractall(site)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(site), str(project_root)]))
    check = subprocess.run([sys.executable, "-c", "import kubernetes; print(kubernetes.__version__)"], env=env,
                           capture_output=True, text=True, timeout=120)
    assert check.stdout.strip() == FLOOR, check.stderr
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-x", __file__,
                           "-k", "not floor"], cwd=project_root, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert " passed" in proc.stdout and "failed" not in proc.stdout
