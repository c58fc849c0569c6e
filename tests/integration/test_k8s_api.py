"""submit / wait / logs / run_joint against a small fake Kubernetes API server on loopback, through the official
``kubernetes`` client (``Configuration(host=...)``). The fake implements only the endpoints the launcher uses and
plays a Job's life: pods per completion index, active for a few polls, then Complete or Failed."""
from __future__ import annotations

import json
import re
import threading
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

import pytest
from kubernetes import client

from flava.config import PipelineConfig
from flava.launch import k8s as k8slib
from flava.launch.config import K8sConfig

NOW = "2026-01-01T00:00:00Z"


class FakeCluster:
    """State of the fake API server. ``outcome``: "Complete" | "Failed" | "never"; ``polls``: reads while active."""

    def __init__(self, outcome="Complete", polls=2):
        self.outcome, self.polls = outcome, polls
        self.objects: dict[tuple[str, str, str], dict] = {}  # (kind, namespace, name) -> object
        self.reads: dict[str, int] = {}
        self.requests: list[tuple[str, str]] = []
        self.lock = threading.Lock()

    def create(self, kind, namespace, body):
        name = body["metadata"]["name"]
        with self.lock:
            if (kind, namespace, name) in self.objects:
                return 409, {"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "AlreadyExists",
                             "code": 409, "message": f'{kind.lower()}s "{name}" already exists'}
            if body["metadata"].get("namespace", namespace) != namespace:
                return 400, {"kind": "Status", "apiVersion": "v1", "code": 400, "message": "namespace mismatch"}
            body["metadata"].update(uid=str(uuid.uuid4()), creationTimestamp=NOW, namespace=namespace)
            self.objects[(kind, namespace, name)] = body
            if kind == "Job":
                self._make_pods(namespace, body)
        return 201, body

    def _make_pods(self, namespace, job):
        template = job["spec"]["template"]
        for index in range(job["spec"]["completions"]):
            name = f"{job['metadata']['name']}-{index}-{uuid.uuid4().hex[:5]}"
            annotations = dict(template["metadata"].get("annotations", {}))
            annotations[k8slib.INDEX_ANNOTATION] = str(index)
            pod = {"apiVersion": "v1", "kind": "Pod",
                   "metadata": {"name": name, "namespace": namespace, "uid": str(uuid.uuid4()),
                                "creationTimestamp": NOW, "labels": dict(template["metadata"]["labels"]),
                                "annotations": annotations},
                   "spec": template["spec"], "status": {"phase": "Running"}}
            self.objects[("Pod", namespace, name)] = pod

    def job_status(self, namespace, name):
        job = self.objects.get(("Job", namespace, name))
        if job is None:
            return None
        with self.lock:
            self.reads[name] = self.reads.get(name, 0) + 1
            n = self.reads[name]
        completions = job["spec"]["completions"]
        if self.outcome == "never" or n <= self.polls:
            status = {"active": completions, "startTime": NOW}
        elif self.outcome == "Complete":
            status = {"succeeded": completions, "startTime": NOW, "completionTime": NOW, "conditions": [
                {"type": "Complete", "status": "True", "lastTransitionTime": NOW}]}
        else:
            status = {"failed": job["spec"]["backoffLimit"] + 1, "startTime": NOW, "conditions": [
                {"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded",
                 "message": "Job has reached the specified backoff limit", "lastTransitionTime": NOW}]}
        return dict(job, status=status)

    def pod_log(self, pod):
        # What the container would print: its command after the kubelet's $(VAR) expansion.
        index = pod["metadata"]["annotations"][k8slib.INDEX_ANNOTATION]
        cmd = " ".join(pod["spec"]["containers"][0]["command"]).replace("$(JOB_COMPLETION_INDEX)", index)
        verdict = "training done" if self.outcome == "Complete" else "RuntimeError: CUDA out of memory"
        return f"+ {cmd}\nnode {index}: {verdict}\n"


def make_handler(cluster: FakeCluster):
    routes = [
        ("POST", re.compile(r"^/api/v1/namespaces/([^/]+)/configmaps$"), "ConfigMap"),
        ("POST", re.compile(r"^/api/v1/namespaces/([^/]+)/services$"), "Service"),
        ("POST", re.compile(r"^/apis/batch/v1/namespaces/([^/]+)/jobs$"), "Job"),
        ("GET", re.compile(r"^/apis/batch/v1/namespaces/([^/]+)/jobs/([^/]+)/status$"), "job_status"),
        ("DELETE", re.compile(r"^/apis/batch/v1/namespaces/([^/]+)/jobs/([^/]+)$"), "delete_job"),
        ("GET", re.compile(r"^/api/v1/namespaces/([^/]+)/pods$"), "list_pods"),
        ("GET", re.compile(r"^/api/v1/namespaces/([^/]+)/pods/([^/]+)/log$"), "pod_log"),
    ]

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def _send(self, code, payload, content_type="application/json"):
            data = payload.encode() if isinstance(payload, str) else json.dumps(payload).encode()
            self.send_response(code)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _dispatch(self, method):
            url = urlparse(self.path)
            query = parse_qs(url.query)
            cluster.requests.append((method, self.path))
            body = None
            if method == "POST":
                assert self.headers.get("Content-Type", "").startswith("application/json"), dict(self.headers)
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            for verb, pattern, action in routes:
                match = pattern.match(url.path)
                if verb != method or not match:
                    continue
                ns = match.group(1)
                if action in ("ConfigMap", "Service", "Job"):
                    if body.get("kind") != action:
                        return self._send(400, {"kind": "Status", "code": 400, "message": "wrong kind"})
                    return self._send(*cluster.create(action, ns, body))
                if action == "job_status":
                    job = cluster.job_status(ns, match.group(2))
                    return self._send(200, job) if job else self._send(404, {"kind": "Status", "code": 404})
                if action == "delete_job":
                    cluster.objects.pop(("Job", ns, match.group(2)), None)
                    return self._send(200, {"kind": "Status", "apiVersion": "v1", "status": "Success"})
                if action == "list_pods":
                    key, _, value = query["labelSelector"][0].partition("=")
                    items = [o for (kind, pns, _), o in cluster.objects.items()
                             if kind == "Pod" and pns == ns and o["metadata"]["labels"].get(key) == value]
                    return self._send(200, {"kind": "PodList", "apiVersion": "v1", "metadata": {}, "items": items})
                if action == "pod_log":
                    pod = cluster.objects.get(("Pod", ns, match.group(2)))
                    assert query.get("container") == [k8slib.CONTAINER]
                    return self._send(200, cluster.pod_log(pod), "text/plain") if pod else self._send(404, {})
            self._send(404, {"kind": "Status", "code": 404, "message": f"no route {method} {url.path}"})

        def do_GET(self):
            self._dispatch("GET")

        def do_POST(self):
            self._dispatch("POST")

        def do_DELETE(self):
            self._dispatch("DELETE")

    return Handler


@pytest.fixture
def fake_k8s():
    cluster = FakeCluster()
    server = ThreadingHTTPServer(("127.0.0.1", 0), make_handler(cluster))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    host = f"http://127.0.0.1:{server.server_address[1]}"
    api = client.ApiClient(client.Configuration(host=host))
    try:
        yield cluster, api
    finally:
        server.shutdown()
        server.server_close()


def render(nodes=2, run_id="r1"):
    return k8slib.build_manifests(PipelineConfig(), run_id=run_id, k8s=K8sConfig(namespace="ml", nodes=nodes))


def test_submit_creates_job_then_owned_configmap_and_service(fake_k8s):
    cluster, api = fake_k8s
    job = k8slib.submit(render(), api=api)
    assert (job.name, job.namespace, job.completions) == ("flava-joint-r1", "ml", 2)
    posts = [path for method, path in cluster.requests if method == "POST"]
    assert posts == ["/apis/batch/v1/namespaces/ml/jobs", "/api/v1/namespaces/ml/configmaps",
                     "/api/v1/namespaces/ml/services"]
    stored_job = cluster.objects[("Job", "ml", "flava-joint-r1")]
    assert stored_job["metadata"]["uid"] == job.uid
    assert stored_job["spec"]["completionMode"] == "Indexed"
    for kind in ("ConfigMap", "Service"):
        (owner,) = cluster.objects[(kind, "ml", "flava-joint-r1")]["metadata"]["ownerReferences"]
        assert (owner["kind"], owner["name"], owner["uid"]) == ("Job", "flava-joint-r1", job.uid)


def test_submit_twice_is_a_value_error(fake_k8s):
    _, api = fake_k8s
    k8slib.submit(render(), api=api)
    with pytest.raises(ValueError, match="already exists"):
        k8slib.submit(render(), api=api)


def test_failed_dependent_object_deletes_the_job(fake_k8s):
    cluster, api = fake_k8s
    cluster.objects[("ConfigMap", "ml", "flava-joint-r1")] = {"metadata": {"name": "flava-joint-r1"}}
    with pytest.raises(RuntimeError, match="ConfigMap.*job was deleted"):
        k8slib.submit(render(), api=api)
    assert ("Job", "ml", "flava-joint-r1") not in cluster.objects
    assert ("DELETE", "/apis/batch/v1/namespaces/ml/jobs/flava-joint-r1") in [
        (m, p.split("?")[0]) for m, p in cluster.requests]


def test_wait_polls_until_complete_and_logs_come_back_per_index(fake_k8s):
    cluster, api = fake_k8s
    cluster.polls = 3
    job = k8slib.submit(render(nodes=3), api=api)
    sleeps = []
    status = k8slib.wait(job, api=api, timeout_s=60, poll_s=0.5, sleep=sleeps.append)
    assert status.state == "Succeeded" and status.succeeded == 3
    assert sleeps == [0.5, 0.5, 0.5]  # three active polls, the fourth read is terminal
    out = k8slib.logs(job, api=api)
    assert len(out) == 3
    for index, text in enumerate(out.values()):
        assert f"--node-rank={index} " in text and f"node {index}: training done" in text


def test_wait_reports_failure_and_times_out(fake_k8s):
    cluster, api = fake_k8s
    cluster.outcome, cluster.polls = "Failed", 0
    job = k8slib.submit(render(run_id="bad"), api=api)
    status = k8slib.wait(job, api=api, timeout_s=5, poll_s=0, sleep=lambda s: None)
    assert status.state == "Failed" and status.reason == "BackoffLimitExceeded"

    cluster.outcome = "never"
    slow = k8slib.submit(render(run_id="slow"), api=api)
    now = [0.0]

    def tick(seconds):
        now[0] += seconds

    with pytest.raises(TimeoutError, match="flava-joint-slow not finished after 30s"):
        k8slib.wait(slow, api=api, timeout_s=30, poll_s=10, sleep=tick, clock=lambda: now[0])
    assert now[0] == 30


def test_run_joint_end_to_end_writes_logs_and_raises_on_failure(fake_k8s, tmp_path):
    cluster, api = fake_k8s
    cluster.polls = 1
    cfg = PipelineConfig.model_validate({"paths": {"reports": str(tmp_path / "reports")}})
    fast = K8sConfig(poll_interval_s=0.01)
    summary = k8slib.run_joint(cfg, api=api, run_id="e2e", parent_run_id="p1", k8s=fast)
    assert summary["state"] == "Succeeded" and summary["namespace"] == "flava"
    log_dir = tmp_path / "reports" / "k8s" / "flava-joint-e2e"
    assert json.loads((log_dir / "status.json").read_text())["job"] == "flava-joint-e2e"
    (pod_log,) = log_dir.glob("flava-joint-e2e-0-*.log")
    assert "training done" in pod_log.read_text()
    env = {e["name"]: e.get("value") for e in
           cluster.objects[("Job", "flava", "flava-joint-e2e")]["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["FLAVA_PARENT_RUN_ID"] == "p1"

    cluster.outcome = "Failed"
    with pytest.raises(RuntimeError, match="(?s)BackoffLimitExceeded.*CUDA out of memory"):
        k8slib.run_joint(cfg, api=api, run_id="oom", k8s=fast)
