"""Run the joint stage as a distributed Kubernetes Job, through the official ``kubernetes`` client.

One run = three objects:
- a ConfigMap holding the effective ``params.yaml`` (so the pods train on exactly the config that was rendered);
- a headless Service whose DNS names (``{job}-{index}.{service}``) give torchrun a rendezvous endpoint;
- an Indexed ``batch/v1`` Job with one pod per node (completions = parallelism = nodes), each running
  ``torchrun --nnodes N --nproc-per-node G --node-rank $(JOB_COMPLETION_INDEX) --rdzv-backend c10d ... -m flava
  pretrain joint``.

Preemption: pods use ``restartPolicy: Never`` and a pod failure policy that ignores disruptions
(``DisruptionTarget``), so a preempted pod is replaced under the same index without spending ``backoffLimit``;
torchrun's rendezvous admits the replacement and the trainer resumes from ``paths.checkpoints`` on the shared
workspace volume. Real crashes count against ``backoffLimit``.

``build_manifests`` is pure (plain dicts, ready for ``kubectl apply -f``); ``submit``, ``wait`` and ``logs`` talk
to the API server through ``kubernetes.client`` (``BatchV1Api``/``CoreV1Api``).
"""
from __future__ import annotations

import copy
import json
import logging
import os
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import yaml
from kubernetes import client, config
from kubernetes.client.exceptions import ApiException
from kubernetes.config.config_exception import ConfigException

from flava.launch.config import DNS_LABEL, K8sConfig, launch_section
from flava.tracking import lineage

log = logging.getLogger(__name__)

CONTAINER = "trainer"
RUN_LABEL = "flava/run"
INDEX_ANNOTATION = "batch.kubernetes.io/job-completion-index"
PARAMS_FILE = "params.yaml"
# This client release sends no Content-Type on create (and ignores `_content_type`): set the header ourselves.
JSON = "application/json"


@dataclass(frozen=True)
class SubmittedJob:
    name: str
    namespace: str
    uid: str
    completions: int


@dataclass(frozen=True)
class JobStatus:
    state: str  # "Succeeded" | "Failed"
    succeeded: int
    failed: int
    active: int
    reason: str = ""
    message: str = ""
    conditions: list[dict[str, Any]] = field(default_factory=list)


def _k8s(cfg, k8s: K8sConfig | None) -> K8sConfig:
    return k8s if k8s is not None else launch_section(cfg).k8s


def job_name(k8s: K8sConfig, run_id: str) -> str:
    """``{name_prefix}-{run_id}``; checked so that pod hostnames ``{job}-{index}`` stay valid DNS labels."""
    name = f"{k8s.name_prefix}-{run_id}"
    longest_host = f"{name}-{k8s.nodes - 1}"
    if not DNS_LABEL.match(name) or len(longest_host) > 63:
        raise ValueError(
            f"job name {name!r} (prefix launch.k8s.name_prefix + run id {run_id!r}) must be a lowercase RFC 1123 "
            f"label short enough that the pod hostname {longest_host!r} has at most 63 characters"
        )
    return name


def new_run_id(cfg) -> str:
    """Config digest + a random suffix: names show what ran and a resubmission never collides."""
    return f"{cfg.digest()[:8]}-{uuid.uuid4().hex[:5]}"


def torchrun_command(k8s: K8sConfig, name: str, overrides: list[str] = ()) -> list[str]:
    """The container command. ``$(JOB_COMPLETION_INDEX)`` is expanded by the kubelet from the pod's env."""
    endpoint = f"{name}-0.{name}.{k8s.namespace}.svc:{k8s.rdzv_port}"
    cmd = [
        "torchrun",
        f"--nnodes={k8s.nodes}",
        f"--nproc-per-node={k8s.procs_per_node}",
        "--node-rank=$(JOB_COMPLETION_INDEX)",
        "--rdzv-backend=c10d",
        f"--rdzv-endpoint={endpoint}",
        f"--rdzv-id={name}",
        f"--max-restarts={k8s.max_restarts}",
        "-m", "flava", "pretrain", "joint",
        "--params", f"{k8s.config_mount}/{PARAMS_FILE}",
    ]
    for item in [*k8s.overrides, *overrides]:
        cmd += ["--set", item]
    return cmd


def _env(cfg, k8s: K8sConfig, parent_run_id: str | None) -> list[dict[str, Any]]:
    env: list[dict[str, Any]] = [
        # The Job controller injects this too; declaring it makes `$(JOB_COMPLETION_INDEX)` expansion explicit.
        {"name": "JOB_COMPLETION_INDEX",
         "valueFrom": {"fieldRef": {"fieldPath": f"metadata.annotations['{INDEX_ANNOTATION}']"}}},
        {"name": "PYTHONUNBUFFERED", "value": "1"},
        {"name": "MLFLOW_TRACKING_URI", "value": k8s.mlflow_tracking_uri or cfg.tracking.tracking_uri},
    ]
    if parent_run_id:
        env.append({"name": lineage.PARENT_RUN_ENV, "value": parent_run_id})
    if k8s.s3_endpoint_url:
        env += [{"name": "AWS_ENDPOINT_URL", "value": k8s.s3_endpoint_url},
                {"name": "MLFLOW_S3_ENDPOINT_URL", "value": k8s.s3_endpoint_url}]
    if k8s.s3_secret:
        env += [{"name": key, "valueFrom": {"secretKeyRef": {"name": k8s.s3_secret, "key": key}}}
                for key in k8s.s3_secret_keys]
    env += [{"name": key, "value": value} for key, value in sorted(k8s.env.items())]
    return env


def build_manifests(
    cfg,
    *,
    run_id: str | None = None,
    k8s: K8sConfig | None = None,
    parent_run_id: str | None = None,
    overrides: list[str] = (),
) -> list[dict[str, Any]]:
    """ConfigMap, headless Service and Indexed Job for one distributed joint run, as plain manifest dicts."""
    k8s = _k8s(cfg, k8s)
    name = job_name(k8s, run_id or new_run_id(cfg))
    labels = {
        "app.kubernetes.io/name": "flava",
        "app.kubernetes.io/component": "joint-pretrain",
        "app.kubernetes.io/managed-by": "flava-launch",
        RUN_LABEL: name,
    }
    annotations = {"flava/params-hash": cfg.digest(), "flava/git-commit": lineage.git_commit()}
    meta = {"name": name, "namespace": k8s.namespace, "labels": labels, "annotations": annotations}

    config_map = {
        "apiVersion": "v1", "kind": "ConfigMap", "metadata": meta,
        "data": {PARAMS_FILE: yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)},
    }
    service = {
        "apiVersion": "v1", "kind": "Service", "metadata": meta,
        "spec": {
            "clusterIP": "None",
            "selector": {RUN_LABEL: name},
            # Rendezvous happens before any pod is Ready: publish addresses of unready pods too.
            "publishNotReadyAddresses": True,
            "ports": [{"name": "rdzv", "port": k8s.rdzv_port, "targetPort": k8s.rdzv_port, "protocol": "TCP"}],
        },
    }
    pod_spec = _pod_spec(cfg, k8s, name, list(overrides), parent_run_id)
    template = {"metadata": {"labels": labels, "annotations": annotations}, "spec": pod_spec}
    job = {"apiVersion": "batch/v1", "kind": "Job", "metadata": meta, "spec": _job_spec(k8s, template)}
    return [copy.deepcopy(m) for m in (config_map, service, job)]  # callers may edit one without the others


def _resources(k8s: K8sConfig) -> dict[str, dict[str, str]]:
    resources: dict[str, dict[str, str]] = {
        "requests": {"cpu": k8s.cpu, "memory": k8s.memory},
        "limits": {"memory": k8s.memory},
    }
    if k8s.gpus_per_node:
        resources["limits"]["nvidia.com/gpu"] = str(k8s.gpus_per_node)
        resources["requests"]["nvidia.com/gpu"] = str(k8s.gpus_per_node)
    return resources


def _pod_spec(cfg, k8s: K8sConfig, name: str, overrides: list[str], parent_run_id: str | None) -> dict[str, Any]:
    """One trainer container running torchrun, with the workspace, the params ConfigMap and a RAM-backed /dev/shm."""
    workspace = (
        {"name": "workspace", "persistentVolumeClaim": {"claimName": k8s.workspace_pvc}}
        if k8s.workspace_pvc else {"name": "workspace", "emptyDir": {}}
    )
    pod_spec: dict[str, Any] = {
        "restartPolicy": "Never",
        "subdomain": name,  # with the Indexed Job's hostname {job}-{index}: DNS {job}-{index}.{service}
        "containers": [{
            "name": CONTAINER,
            "image": k8s.image,
            "imagePullPolicy": k8s.image_pull_policy,
            "workingDir": k8s.workdir,
            "command": torchrun_command(k8s, name, overrides),
            "env": _env(cfg, k8s, parent_run_id),
            "ports": [{"name": "rdzv", "containerPort": k8s.rdzv_port, "protocol": "TCP"}],
            "resources": _resources(k8s),
            "volumeMounts": [
                {"name": "workspace", "mountPath": k8s.workdir},
                {"name": "params", "mountPath": k8s.config_mount, "readOnly": True},
                {"name": "dshm", "mountPath": "/dev/shm"},
            ],
        }],
        "volumes": [
            workspace,
            {"name": "params", "configMap": {"name": name}},
            {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": k8s.shm_size}},
        ],
    }
    if k8s.service_account:
        pod_spec["serviceAccountName"] = k8s.service_account
    if k8s.node_selector:
        pod_spec["nodeSelector"] = dict(k8s.node_selector)
    if k8s.tolerations:
        pod_spec["tolerations"] = [t.model_dump(exclude_none=True) for t in k8s.tolerations]
    return pod_spec


def _job_spec(k8s: K8sConfig, template: dict[str, Any]) -> dict[str, Any]:
    """Indexed completions, one pod per node; disruptions do not count against ``backoffLimit``."""
    job_spec: dict[str, Any] = {
        "completionMode": "Indexed",
        "completions": k8s.nodes,
        "parallelism": k8s.nodes,
        "backoffLimit": k8s.backoff_limit,
        "podFailurePolicy": {"rules": [
            # Preempted/evicted pods are replaced without counting as failures; training resumes from checkpoints.
            {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]},
        ]},
        "template": template,
    }
    if k8s.ttl_after_finished_s is not None:
        job_spec["ttlSecondsAfterFinished"] = k8s.ttl_after_finished_s
    if k8s.active_deadline_s is not None:
        job_spec["activeDeadlineSeconds"] = k8s.active_deadline_s
    return job_spec


class _BlockDumper(yaml.SafeDumper):
    """Multi-line strings (the embedded params.yaml) as readable ``|`` blocks; repeated objects (labels) written
    out again rather than as YAML anchors and aliases."""

    def ignore_aliases(self, data) -> bool:
        return True


def _str(dumper: yaml.SafeDumper, value: str):
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_BlockDumper.add_representer(str, _str)


def render_yaml(manifests: list[dict[str, Any]]) -> str:
    """A multi-document YAML stream, as ``kubectl apply -f`` reads it."""
    return yaml.dump_all(manifests, Dumper=_BlockDumper, sort_keys=False)


def api_client(k8s: K8sConfig):
    """An ApiClient from the in-cluster service account, else from the kubeconfig (``launch.k8s.kube_context``)."""
    configuration = client.Configuration()
    try:
        if os.environ.get("KUBERNETES_SERVICE_HOST"):
            config.load_incluster_config(client_configuration=configuration)
        else:
            # The client reads $KUBECONFIG once at import; read it now so a later setting counts.
            config.load_kube_config(config_file=os.environ.get("KUBECONFIG"), context=k8s.kube_context,
                                    client_configuration=configuration)
    except ConfigException as err:
        raise ValueError(
            f"no usable Kubernetes configuration (in-cluster, $KUBECONFIG or ~/.kube/config, context "
            f"launch.k8s.kube_context={k8s.kube_context!r}): {err}"
        ) from err
    return client.ApiClient(configuration)


def _by_kind(manifests: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    kinds: dict[str, dict[str, Any]] = {}
    for manifest in manifests:
        kind = manifest.get("kind")
        if kind not in ("ConfigMap", "Service", "Job") or kind in kinds:
            raise ValueError(f"expected one ConfigMap, one Service and one Job, got a second or unknown {kind!r}")
        kinds[kind] = manifest
    if len(kinds) != 3:
        raise ValueError(f"expected a ConfigMap, a Service and a Job, got {sorted(kinds)}")
    return kinds


def submit(manifests: list[dict[str, Any]], namespace: str | None = None, *, api=None) -> SubmittedJob:
    """Create the Job, then its ConfigMap and Service owned by it (deleted with the Job, e.g. by its TTL).

    A name clash raises ``ValueError``; if a dependent object cannot be created the Job is deleted again.
    """
    kinds = _by_kind(manifests)
    namespace = namespace or kinds["Job"]["metadata"].get("namespace") or "default"
    api = api or client.ApiClient()
    batch, core = client.BatchV1Api(api), client.CoreV1Api(api)
    job_manifest = kinds["Job"]
    name = job_manifest["metadata"]["name"]
    try:
        created = batch.create_namespaced_job(
            namespace, client.V1Job.from_dict(job_manifest), _headers={"Content-Type": JSON}
        )
    except ApiException as err:
        if err.status == 409:
            raise ValueError(f"job {namespace}/{name} already exists; choose another run id") from err
        raise
    owner = {"apiVersion": "batch/v1", "kind": "Job", "name": name, "uid": created.metadata.uid,
             "controller": False, "blockOwnerDeletion": False}
    try:
        for kind, create, model in (
            ("ConfigMap", core.create_namespaced_config_map, client.V1ConfigMap),
            ("Service", core.create_namespaced_service, client.V1Service),
        ):
            body = json.loads(json.dumps(kinds[kind]))
            body["metadata"]["ownerReferences"] = [owner]
            create(namespace, model.from_dict(body), _headers={"Content-Type": JSON})
    except ApiException as err:
        batch.delete_namespaced_job(name, namespace, propagation_policy="Background")
        raise RuntimeError(
            f"could not create the {kind} of job {namespace}/{name} ({err.status} {err.reason}); the job was deleted"
        ) from err
    log.info("submitted job %s/%s (%d node(s))", namespace, name, job_manifest["spec"]["completions"])
    return SubmittedJob(name, namespace, created.metadata.uid, int(job_manifest["spec"]["completions"]))


def _status(job_obj, completions: int) -> JobStatus | None:
    """Terminal status of a V1Job, or None while it runs."""
    status = job_obj.status
    succeeded, failed, active = status.succeeded or 0, status.failed or 0, status.active or 0
    conditions = [
        {"type": c.type, "status": c.status, "reason": c.reason or "", "message": c.message or ""}
        for c in (status.conditions or [])
    ]
    for cond in conditions:
        if cond["status"] == "True" and cond["type"] in ("Complete", "Failed"):
            state = "Succeeded" if cond["type"] == "Complete" else "Failed"
            return JobStatus(state, succeeded, failed, active, cond["reason"], cond["message"], conditions)
    if succeeded >= completions and not active:
        return JobStatus("Succeeded", succeeded, failed, active, "", "", conditions)
    return None


def wait(
    job: SubmittedJob,
    *,
    api=None,
    timeout_s: float = 3600.0,
    poll_s: float = 10.0,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
) -> JobStatus:
    """Poll the Job's status until it completes or fails; ``TimeoutError`` after ``timeout_s``."""
    batch = client.BatchV1Api(api or client.ApiClient())
    deadline = clock() + timeout_s
    while True:
        obj = batch.read_namespaced_job_status(job.name, job.namespace)
        result = _status(obj, job.completions)
        if result is not None:
            log.info("job %s/%s %s (%s)", job.namespace, job.name, result.state, result.reason or "no reason")
            return result
        if clock() >= deadline:
            st = obj.status
            raise TimeoutError(
                f"job {job.namespace}/{job.name} not finished after {timeout_s:.0f}s "
                f"(active={st.active or 0}, succeeded={st.succeeded or 0}, failed={st.failed or 0})"
            )
        sleep(poll_s)


def logs(job: SubmittedJob, *, api=None, tail_lines: int | None = None) -> dict[str, str]:
    """Trainer logs of every pod of the Job, keyed by pod name, in completion-index then creation order."""
    core = client.CoreV1Api(api or client.ApiClient())
    pods = core.list_namespaced_pod(job.namespace, label_selector=f"{RUN_LABEL}={job.name}").items

    def order(pod):
        index = (pod.metadata.annotations or {}).get(INDEX_ANNOTATION, "0")
        return int(index) if index.isdigit() else 0, pod.metadata.creation_timestamp or 0, pod.metadata.name

    out: dict[str, str] = {}
    for pod in sorted(pods, key=order):
        out[pod.metadata.name] = core.read_namespaced_pod_log(
            pod.metadata.name, job.namespace, container=CONTAINER, tail_lines=tail_lines
        )
    return out


def run_joint(
    cfg,
    *,
    api=None,
    parent_run_id: str | None = None,
    run_id: str | None = None,
    k8s: K8sConfig | None = None,
) -> dict[str, Any]:
    """Render, submit and watch one joint run; save the pod logs under ``paths.reports/k8s/{job}/``.

    The trainer writes its outputs to the shared workspace; the caller reads ``paths.reports/joint.json`` from
    there (the same volume must be mounted where the pipeline runs). A failed Job raises ``RuntimeError``.
    """
    k8s = _k8s(cfg, k8s)
    parent_run_id = parent_run_id or os.environ.get(lineage.PARENT_RUN_ENV)
    manifests = build_manifests(cfg, run_id=run_id, k8s=k8s, parent_run_id=parent_run_id)
    api = api or api_client(k8s)
    job = submit(manifests, k8s.namespace, api=api)
    status = wait(job, api=api, timeout_s=k8s.wait_timeout_s, poll_s=k8s.poll_interval_s)
    log_dir = Path(cfg.paths.reports) / "k8s" / job.name
    log_dir.mkdir(parents=True, exist_ok=True)
    pod_logs = logs(job, api=api)
    for pod, text in pod_logs.items():
        (log_dir / f"{pod}.log").write_text(text or "")
    summary = {
        "job": job.name, "namespace": job.namespace, "state": status.state, "succeeded": status.succeeded,
        "failed": status.failed, "reason": status.reason, "pods": sorted(pod_logs), "logs": str(log_dir),
    }
    (log_dir / "status.json").write_text(json.dumps(summary, indent=2))
    if status.state != "Succeeded":
        last = next(reversed(pod_logs.values()), "") if pod_logs else ""
        tail = "\n".join((last or "").splitlines()[-20:])
        raise RuntimeError(
            f"job {job.namespace}/{job.name} failed ({status.reason}: {status.message}); logs in {log_dir}\n{tail}"
        )
    return summary
