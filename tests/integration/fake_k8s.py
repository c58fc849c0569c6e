"""A small fake Kubernetes API server on loopback, for the launcher's tests through the official client.

It serves only the endpoints the launcher calls and plays the Job controller's part from the Job's own spec:
pods per completion index; a scripted event per status read (a pod exits with a code, is disrupted, stays
Pending); ``podFailurePolicy`` rules evaluated in order (Ignore / FailJob / Count), ``backoffLimit``,
``successPolicy`` on succeeded indexes, replacement pods under the same index; and API faults (HTTP 5xx/429,
connections reset without a response) injected before the next requests. Deployments and Services (the Dask
cluster of ``flava.launch.dask_cluster``) are stored, read and deleted as they are, with no controller behind them.
"""
from __future__ import annotations

import json
import re
import threading
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

from flava.launch import k8s as k8slib

NOW = "2026-01-01T00:00:00Z"


def at(second: int) -> str:
    return f"2026-01-01T00:{second // 60:02d}:{second % 60:02d}Z"


def status_error(code: int, reason: str, message: str) -> dict:
    return {"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": reason, "code": code,
            "message": message}


class FakeCluster:
    """State of the fake API server.

    ``script[job name]``: events, one consumed per read of the Job's status (what ``wait`` polls):
    ``"tick"`` (nothing happens), ``("exit", index, code, log)`` (the index's current pod terminates),
    ``("disrupt", index)`` (preempted: DisruptionTarget condition, exit 143 after its checkpoint),
    ``("pending", index, "Unschedulable" | "ImagePullBackOff")``, ``("admit",)`` (Kueue unsuspends).
    Without a script a Job runs ``polls`` reads, then every index exits 0.
    ``faults``: HTTP codes (or ``"reset"``) answered to the next requests instead of serving them.
    ``pvc_phase``: phase reported for any PVC read."""

    def __init__(self, polls: int = 2):
        self.polls = polls
        self.script: dict[str, list] = {}
        self.faults: list = []
        self.pvc_phase = "Bound"
        self.objects: dict[tuple[str, str, str], dict] = {}  # (kind, namespace, name) -> object
        self.requests: list[tuple[str, str]] = []
        self.served_faults: list = []
        self.deletions: list = []  # (kind, namespace, name, propagationPolicy) of Deployments and Services
        self.lock = threading.RLock()
        self.clock = 0

    # ------------------------------------------------------------------ objects
    def create(self, kind, namespace, body):
        name = body["metadata"]["name"]
        with self.lock:
            if (kind, namespace, name) in self.objects:
                return 409, status_error(409, "AlreadyExists", f'{kind.lower()}s "{name}" already exists')
            if body["metadata"].get("namespace", namespace) != namespace:
                return 400, status_error(400, "BadRequest", "namespace mismatch")
            body["metadata"].update(uid=str(uuid.uuid4()), creationTimestamp=NOW, namespace=namespace)
            if kind == "Job":
                body["status"] = {}
                if not body["spec"].get("suspend"):
                    self._start(namespace, body)
            if kind == "PersistentVolumeClaim":
                body["status"] = {"phase": self.pvc_phase}
            self.objects[(kind, namespace, name)] = body
        return 201, body

    def delete_job(self, namespace, name):
        """The Job, its pods and the objects it owns (what the garbage collector does, at once here)."""
        with self.lock:
            job = self.objects.pop(("Job", namespace, name), None)
            if job is None:
                return False
            uid = job["metadata"]["uid"]
            for key, obj in list(self.objects.items()):
                owners = obj["metadata"].get("ownerReferences", [])
                if (key[0] == "Pod" and obj["metadata"]["labels"].get(k8slib.RUN_LABEL) == name) or any(
                        o["uid"] == uid for o in owners):
                    del self.objects[key]
            return True

    def pods(self, namespace, job_name):
        return [o for (kind, ns, _), o in self.objects.items()
                if kind == "Pod" and ns == namespace and o["metadata"]["labels"].get(k8slib.RUN_LABEL) == job_name]

    def current_pod(self, namespace, job_name, index):
        live = [p for p in self.pods(namespace, job_name)
                if p["metadata"]["annotations"][k8slib.INDEX_ANNOTATION] == str(index)
                and p["status"]["phase"] in ("Pending", "Running")]
        return live[-1]

    def _start(self, namespace, job):
        job["status"].update(active=0, succeeded=0, failed=0, startTime=NOW, conditions=[])
        job["_succeeded_indexes"] = []
        for index in range(job["spec"]["completions"]):
            self._new_pod(namespace, job, index)

    def _new_pod(self, namespace, job, index):
        template = job["spec"]["template"]
        name = f"{job['metadata']['name']}-{index}-{uuid.uuid4().hex[:5]}"
        annotations = dict(template["metadata"].get("annotations", {}))
        annotations[k8slib.INDEX_ANNOTATION] = str(index)
        self.clock += 1
        pod = {"apiVersion": "v1", "kind": "Pod",
               "metadata": {"name": name, "namespace": namespace, "uid": str(uuid.uuid4()),
                            "creationTimestamp": at(self.clock), "labels": dict(template["metadata"]["labels"]),
                            "annotations": annotations},
               "spec": template["spec"],
               "status": {"phase": "Running", "containerStatuses": [
                   {"name": k8slib.CONTAINER, "image": "img", "imageID": "", "ready": True, "restartCount": 0,
                    "state": {"running": {"startedAt": at(self.clock)}}}]},
               "_log": self._command_echo(template, index)}
        self.objects[("Pod", namespace, name)] = pod
        job["status"]["active"] = job["status"].get("active", 0) + 1

    @staticmethod
    def _command_echo(template, index):
        cmd = " ".join(template["spec"]["containers"][0]["command"]).replace("$(JOB_COMPLETION_INDEX)", str(index))
        return f"+ {cmd}\n"

    # ------------------------------------------------------------------ the Job controller
    def job_status(self, namespace, name):
        with self.lock:
            job = self.objects.get(("Job", namespace, name))
            if job is None:
                return None
            if not self._terminal(job):
                script = self.script.setdefault(name, ["tick"] * self.polls + [
                    ("exit", i, 0, f"node {i}: training done\n") for i in range(job["spec"]["completions"])])
                if script:
                    self._apply(namespace, job, script.pop(0))
            return {k: v for k, v in job.items() if not k.startswith("_")}

    @staticmethod
    def _terminal(job):
        return any(c["type"] in ("Complete", "Failed") and c["status"] == "True"
                   for c in job["status"].get("conditions", []))

    def _apply(self, namespace, job, event):
        if event == "tick":
            return
        kind = event[0]
        if kind == "admit":
            job["spec"]["suspend"] = False
            self._start(namespace, job)
            return
        pod = self.current_pod(namespace, job["metadata"]["name"], event[1])
        if kind == "pending":
            pod["status"]["phase"] = "Pending"
            if event[2] == "Unschedulable":
                pod["status"]["containerStatuses"] = []
                pod["status"]["conditions"] = [{"type": "PodScheduled", "status": "False", "reason": "Unschedulable",
                                                "message": "0/3 nodes are available: pod has unbound immediate "
                                                           "PersistentVolumeClaims."}]
            else:
                pod["status"]["containerStatuses"][0]["state"] = {"waiting": {
                    "reason": event[2], "message": 'Back-off pulling image "ghcr.io/flava-mlops/flava:typo"'}}
            return
        if kind == "disrupt":
            pod.setdefault("status", {})["conditions"] = [
                {"type": "DisruptionTarget", "status": "True", "reason": "PreemptionByScheduler"}]
            self._exit(namespace, job, pod, 143, "SIGTERM: checkpoint saved\n")
            return
        assert kind == "exit", event
        self._exit(namespace, job, pod, event[2], event[3])

    def _exit(self, namespace, job, pod, code, log):
        self.clock += 1
        pod["_log"] += log
        pod["status"]["phase"] = "Succeeded" if code == 0 else "Failed"
        pod["status"]["containerStatuses"][0]["state"] = {"terminated": {
            "exitCode": code, "reason": "Completed" if code == 0 else "Error", "message": log.strip()[-200:],
            "startedAt": NOW, "finishedAt": at(self.clock)}}
        status = job["status"]
        status["active"] -= 1
        index = int(pod["metadata"]["annotations"][k8slib.INDEX_ANNOTATION])
        if code == 0:
            status["succeeded"] += 1
            job["_succeeded_indexes"].append(index)
            rules = job["spec"].get("successPolicy", {}).get("rules", [])
            if any(str(index) in r["succeededIndexes"].split(",") for r in rules):
                self._finish(namespace, job, "Complete", "SuccessPolicy", "Matched rules at index 0")
            elif len(set(job["_succeeded_indexes"])) == job["spec"]["completions"]:
                self._finish(namespace, job, "Complete", "", "")
            return
        action = self._policy_action(job, pod, code)
        if action == "FailJob":
            status["failed"] += 1
            self._finish(namespace, job, "Failed", "PodFailurePolicy",
                         f"Container {k8slib.CONTAINER} for pod {namespace}/{pod['metadata']['name']} failed with "
                         f"exit code {code} matching FailJob rule at index 1")
            return
        if action != "Ignore":
            status["failed"] += 1
            if status["failed"] > job["spec"]["backoffLimit"]:
                self._finish(namespace, job, "Failed", "BackoffLimitExceeded",
                             "Job has reached the specified backoff limit")
                return
        self._new_pod(namespace, job, index)  # the replacement, same index

    @staticmethod
    def _policy_action(job, pod, code):
        for rule in job["spec"].get("podFailurePolicy", {}).get("rules", []):
            on_codes = rule.get("onExitCodes")
            if on_codes and on_codes.get("containerName", k8slib.CONTAINER) == k8slib.CONTAINER:
                inside = code in on_codes["values"]
                if inside == (on_codes["operator"] == "In"):
                    return rule["action"]
            for cond in rule.get("onPodConditions", []):
                if any(c["type"] == cond["type"] and c["status"] == cond.get("status", "True")
                       for c in pod["status"].get("conditions", [])):
                    return rule["action"]
        return "Count"

    def _finish(self, namespace, job, kind, reason, message):
        status = job["status"]
        status["conditions"].append({"type": kind, "status": "True", "reason": reason, "message": message,
                                     "lastTransitionTime": NOW})
        if kind == "Complete":
            status["completionTime"] = NOW
        for pod in self.pods(namespace, job["metadata"]["name"]):  # the rest are terminated
            if pod["status"]["phase"] in ("Pending", "Running"):
                pod["status"]["phase"] = "Failed" if kind == "Failed" else "Succeeded"
                pod["status"]["containerStatuses"] = []
        status["active"] = 0


def make_handler(cluster: FakeCluster):
    api = r"^/api/v1/namespaces/([^/]+)/"
    batch = r"^/apis/batch/v1/namespaces/([^/]+)/"
    apps = r"^/apis/apps/v1/namespaces/([^/]+)/"
    routes = [
        ("POST", re.compile(apps + r"deployments$"), "Deployment"),
        # Deployments and Services are stored objects only: read and deleted as they are, no controller behind
        ("GET", re.compile(apps + r"deployments/([^/]+)$"), ("read", "Deployment")),
        ("DELETE", re.compile(apps + r"deployments/([^/]+)$"), ("delete", "Deployment")),
        ("GET", re.compile(api + r"services/([^/]+)$"), ("read", "Service")),
        ("DELETE", re.compile(api + r"services/([^/]+)$"), ("delete", "Service")),
        ("POST", re.compile(api + r"configmaps$"), "ConfigMap"),
        ("POST", re.compile(api + r"services$"), "Service"),
        ("POST", re.compile(api + r"persistentvolumeclaims$"), "PersistentVolumeClaim"),
        ("POST", re.compile(batch + r"jobs$"), "Job"),
        ("GET", re.compile(batch + r"jobs/([^/]+)/status$"), "job_status"),
        ("GET", re.compile(batch + r"jobs/([^/]+)$"), "read_job"),
        ("DELETE", re.compile(batch + r"jobs/([^/]+)$"), "delete_job"),
        ("GET", re.compile(api + r"pods$"), "list_pods"),
        ("GET", re.compile(api + r"pods/([^/]+)/log$"), "pod_log"),
        ("GET", re.compile(api + r"persistentvolumeclaims/([^/]+)$"), "read_pvc"),
    ]

    def public(obj):
        return {k: v for k, v in obj.items() if not k.startswith("_")}

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
                # The real API server refuses a body without a JSON (or YAML/protobuf) Content-Type: 415.
                if not self.headers.get("Content-Type", "").startswith("application/json"):
                    return self._send(415, status_error(415, "UnsupportedMediaType", "no JSON content type"))
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            with cluster.lock:
                fault = cluster.faults.pop(0) if cluster.faults else None
            if fault is not None:
                cluster.served_faults.append((fault, method, url.path))
                if fault == "reset":  # the connection drops without an answer
                    self.close_connection = True
                    self.connection.shutdown(2)
                    return None
                return self._send(fault, status_error(fault, "InternalError" if fault >= 500 else "TooManyRequests",
                                                      "injected fault"))
            for verb, pattern, action in routes:
                match = pattern.match(url.path)
                if verb != method or not match:
                    continue
                ns = match.group(1)
                if verb == "POST":
                    if body.get("kind") != action:
                        return self._send(400, status_error(400, "BadRequest", "wrong kind"))
                    return self._send(*cluster.create(action, ns, body))
                if isinstance(action, tuple):
                    op, kind = action
                    with cluster.lock:
                        obj = (cluster.objects.pop if op == "delete" else cluster.objects.get)(
                            (kind, ns, match.group(2)), None)
                    if obj is None:
                        return self._send(404, status_error(404, "NotFound", f"{kind.lower()} {match.group(2)}"))
                    if op == "delete":
                        cluster.deletions.append((kind, ns, match.group(2), query.get("propagationPolicy")))
                    return self._send(200, public(obj))
                if action == "job_status":
                    job = cluster.job_status(ns, match.group(2))
                    return self._send(200, job) if job else self._send(404, status_error(404, "NotFound", "job"))
                if action == "read_job":
                    job = cluster.objects.get(("Job", ns, match.group(2)))
                    return self._send(200, public(job)) if job else self._send(404, status_error(404, "NotFound",
                                                                                                 "job"))
                if action == "delete_job":
                    if not cluster.delete_job(ns, match.group(2)):
                        return self._send(404, status_error(404, "NotFound", "job"))
                    return self._send(200, {"kind": "Status", "apiVersion": "v1", "status": "Success"})
                if action == "list_pods":
                    key, _, value = query["labelSelector"][0].partition("=")
                    with cluster.lock:
                        items = [public(o) for (kind, pns, _), o in cluster.objects.items()
                                 if kind == "Pod" and pns == ns and o["metadata"]["labels"].get(key) == value]
                    return self._send(200, {"kind": "PodList", "apiVersion": "v1", "metadata": {}, "items": items})
                if action == "pod_log":
                    pod = cluster.objects.get(("Pod", ns, match.group(2)))
                    assert query.get("container") == [k8slib.CONTAINER]
                    if not pod:
                        return self._send(404, status_error(404, "NotFound", "pod"))
                    lines = pod["_log"].splitlines(keepends=True)
                    if "tailLines" in query:
                        lines = lines[-int(query["tailLines"][0]):]
                    return self._send(200, "".join(lines), "text/plain")
                if action == "read_pvc":
                    pvc = cluster.objects.get(("PersistentVolumeClaim", ns, match.group(2))) or {
                        "apiVersion": "v1", "kind": "PersistentVolumeClaim",
                        "metadata": {"name": match.group(2), "namespace": ns},
                        "spec": {"accessModes": ["ReadWriteMany"], "resources": {"requests": {"storage": "1Gi"}}}}
                    return self._send(200, dict(pvc, status={"phase": cluster.pvc_phase}))
            self._send(404, status_error(404, "NotFound", f"no route {method} {url.path}"))

        def do_GET(self):
            self._dispatch("GET")

        def do_POST(self):
            self._dispatch("POST")

        def do_DELETE(self):
            self._dispatch("DELETE")

    return Handler


class FakeServer:
    """The fake API server running on a loopback port in a thread."""

    def __init__(self, cluster: FakeCluster):
        self.cluster = cluster
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), make_handler(cluster))
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.host = f"http://127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self) -> "FakeServer":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()


def use_kubeconfig(api, directory, monkeypatch) -> None:
    """Point the CLI at the fake API server of ``api`` through a kubeconfig file in ``directory`` (as a user's
    ``KUBECONFIG`` would), outside any in-cluster environment, with ``directory`` as the working directory."""
    import yaml

    kubeconfig = directory / "kubeconfig"
    kubeconfig.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "fake",
        "clusters": [{"name": "fake", "cluster": {"server": api.configuration.host}}],
        "users": [{"name": "u", "user": {"token": "t"}}],
        "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "u"}}]}))
    monkeypatch.setenv("KUBECONFIG", str(kubeconfig))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    monkeypatch.chdir(directory)
