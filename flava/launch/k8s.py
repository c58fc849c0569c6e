"""Run the joint stage (or a sweep's workers) as a Kubernetes Job, through the official ``kubernetes`` client.

The objects are rendered by :mod:`flava.launch.k8s_manifests` (pure, plain dicts, ready for ``kubectl apply -f``;
its docstring explains the gang design). This module is their life on the API server:

- ``submit`` sends the plain dict bodies (no client model classes, so every client release from the declared
  floor on works), the Job first and its ConfigMap and Service owned by it. The same run id gives the same Job
  name: submitting again re-attaches to a running or finished Job of the same config instead of creating a
  second one on the same checkpoints; a failed one is deleted first and replaced (it resumes from them).
- ``wait`` polls the Job, retrying transient API errors (429, 5xx, connection resets) with backoff, and fails
  fast with the reason when a pod stays Pending past ``pending_timeout_s`` (unschedulable, image not pullable,
  a Secret or ConfigMap missing, the workspace PVC unbound).
- ``run_joint`` / ``run_sweep_job`` render, submit, wait, save every pod's log, and on failure report the pod
  that failed first (its termination message and log), not whichever pod sorts last; on a timeout, an
  interrupt (a cancelled flow) or a crash of the launcher the Job is deleted, so nothing keeps training unseen.
  A Job failed by the ``NON_RETRYABLE`` exit code raises ``ValueError`` (the pipeline's "do not retry").
- ``status``, ``pod_logs`` and ``delete`` back ``flava k8s status|logs|delete``.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, TypeVar

from kubernetes import client, config
from kubernetes.client.exceptions import ApiException
from kubernetes.config.config_exception import ConfigException
from urllib3.exceptions import HTTPError as Urllib3Error

from flava.exitcodes import NON_RETRYABLE
from flava.launch.config import K8sConfig, SweepConfig, launch_section
from flava.launch.k8s_manifests import (  # noqa: F401 (re-exported: the launcher's one import)
    CONTAINER,
    INDEX_ANNOTATION,
    RUN_LABEL,
    build_manifests,
    build_sweep_manifests,
    job_name,
    k8s_section,
    new_run_id,
    render_yaml,
)
from flava.tracking import lineage

log = logging.getLogger(__name__)

JSON = "application/json"
PARAMS_HASH = "flava/params-hash"
TRANSIENT_STATUS = frozenset({0, 429, 500, 502, 503, 504})  # 0: the client saw no HTTP status (connection)
# Waiting reasons of a container that does not start by itself: reported as the reason a pod stays Pending.
STUCK_REASONS = frozenset({"ImagePullBackOff", "ErrImagePull", "InvalidImageName", "CreateContainerConfigError",
                           "CreateContainerError"})
T = TypeVar("T")
# What the launcher's service account must be allowed (group, resource, verb); infra/k8s's Role grants it.
API_PERMISSIONS = frozenset({
    ("batch", "jobs", "create"), ("batch", "jobs", "get"), ("batch", "jobs", "delete"), ("batch", "jobs/status", "get"),
    ("", "configmaps", "create"), ("", "services", "create"), ("", "pods", "list"), ("", "pods/log", "get"),
})
# Used when configured or for a better message: PVC create (create_workspace_pvc), PVC get (an unbound claim
# named as the reason pods stay Pending; without it the reason is the scheduler's message alone).
OPTIONAL_API_PERMISSIONS = frozenset({("", "persistentvolumeclaims", "create"), ("", "persistentvolumeclaims", "get")})


class JobFailed(RuntimeError):
    """The Job failed: a crash, or too many failed pods (``backoffLimit``); a retry may get further."""


class NonRetryableJobFailure(JobFailed, ValueError):
    """A pod exited ``NON_RETRYABLE`` (bad config or data) and the ``podFailurePolicy`` failed the Job."""


class PodsPending(RuntimeError):
    """A pod stayed Pending past ``pending_timeout_s``; the message says why."""


@dataclass(frozen=True)
class SubmittedJob:
    name: str
    namespace: str
    uid: str
    completions: int
    reattached: bool = False


@dataclass(frozen=True)
class JobStatus:
    state: str  # "Succeeded" | "Failed"
    succeeded: int
    failed: int
    active: int
    reason: str = ""
    message: str = ""
    conditions: list[dict[str, Any]] = field(default_factory=list)


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


def json_client(api=None) -> client.ApiClient:
    """``api`` (default: the client's default configuration) sending JSON bodies with their Content-Type."""
    api = api or client.ApiClient()
    # Client 37.x sends no Content-Type for a dict body (older ones send this one): the API server needs it.
    api.set_default_header("Content-Type", JSON)
    return api


def _apis(api) -> tuple[client.BatchV1Api, client.CoreV1Api]:
    api = json_client(api)
    return client.BatchV1Api(api), client.CoreV1Api(api)


def _transient(err: BaseException) -> bool:
    if isinstance(err, ApiException):
        return err.status in TRANSIENT_STATUS
    return isinstance(err, (Urllib3Error, ConnectionError))


def retrying(call: Callable[[], T], *, retries: int = 8, sleep: Callable[[float], None] = time.sleep,
             what: str = "Kubernetes API call") -> T:
    """``call()``, retried after transient API errors with exponential backoff (1 s, 2 s, ... capped at 60 s)."""
    for attempt in range(retries + 1):
        try:
            return call()
        except (ApiException, Urllib3Error, ConnectionError) as err:
            if not _transient(err) or attempt == retries:
                raise
            delay = min(60.0, 2.0 ** attempt)
            log.warning("%s failed (%s); retry %d/%d in %.0fs", what, _describe(err), attempt + 1, retries, delay)
            sleep(delay)
    raise AssertionError("unreachable")


def _describe(err: BaseException) -> str:
    if isinstance(err, ApiException):
        return f"{err.status} {err.reason}"
    return f"{type(err).__name__}: {err}"


def deterministic_run_id(cfg, parent_run_id: str) -> str:
    """The run id of a launch under a parent run: config digest + the parent run. A retried task (same flow run,
    same parent run) gets the same Job name and re-attaches; another flow run gets another Job."""
    return f"{cfg.digest()[:8]}-{hashlib.sha256(parent_run_id.encode()).hexdigest()[:5]}"


# ------------------------------------------------------------------------------------------------ submit
def _split(manifests: list[dict[str, Any]]) -> tuple[dict[str, Any], list[dict[str, Any]], dict[str, Any] | None]:
    """(the Job, its dependents: ConfigMap and optional Service, the optional workspace PVC)."""
    jobs = [m for m in manifests if m.get("kind") == "Job"]
    claims = [m for m in manifests if m.get("kind") == "PersistentVolumeClaim"]
    dependents = [m for m in manifests if m.get("kind") in ("ConfigMap", "Service")]
    kinds = [m.get("kind") for m in manifests]
    if len(jobs) != 1 or len(claims) > 1 or len(dependents) + len(jobs) + len(claims) != len(manifests) \
            or len({d["kind"] for d in dependents}) != len(dependents) or not any(
                d["kind"] == "ConfigMap" for d in dependents):
        raise ValueError(f"expected one Job, one ConfigMap, at most one Service and one PVC, got {kinds}")
    return jobs[0], dependents, (claims[0] if claims else None)


def _create(core: client.CoreV1Api, kind: str, namespace: str, body: dict[str, Any]):
    create = {"ConfigMap": core.create_namespaced_config_map, "Service": core.create_namespaced_service,
              "PersistentVolumeClaim": core.create_namespaced_persistent_volume_claim}[kind]
    return create(namespace, body)


def _terminal(job_obj, completions: int) -> JobStatus | None:
    """Terminal status of a Job object, or None while it runs (or waits, suspended, for Kueue)."""
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


def submit(manifests: list[dict[str, Any]], namespace: str | None = None, *, api=None, retries: int = 8,
           sleep: Callable[[float], None] = time.sleep) -> SubmittedJob:
    """Create the (missing) workspace PVC, the Job, then its ConfigMap and Service owned by it (deleted with it).

    A Job of that name already there with the same params re-attaches (``reattached=True``) unless it failed:
    then it is deleted (and gone) before the new one is created. With other params it is a ``ValueError``. If
    a dependent object cannot be created the new Job is deleted again."""
    job_manifest, dependents, claim = _split(manifests)
    namespace = namespace or job_manifest["metadata"].get("namespace") or "default"
    batch, core = _apis(api)
    name = job_manifest["metadata"]["name"]
    completions = int(job_manifest["spec"]["completions"])

    def call(fn: Callable[[], T], what: str) -> T:
        return retrying(fn, retries=retries, sleep=sleep, what=what)

    if claim is not None:
        try:
            call(lambda: _create(core, "PersistentVolumeClaim", namespace, claim), "create the workspace PVC")
            log.info("created PVC %s/%s", namespace, claim["metadata"]["name"])
        except ApiException as err:
            if err.status != 409:  # there already: it holds the workspace, keep it
                raise
    try:
        created = call(lambda: batch.create_namespaced_job(namespace, job_manifest), f"create job {name}")
    except ApiException as err:
        if err.status != 409:
            raise
        existing = call(lambda: batch.read_namespaced_job(name, namespace), f"read job {name}")
        theirs = (existing.metadata.annotations or {}).get(PARAMS_HASH)
        ours = job_manifest["metadata"]["annotations"][PARAMS_HASH]
        if theirs != ours:
            raise ValueError(
                f"job {namespace}/{name} already exists with other params (params hash {theirs} vs {ours}); "
                f"delete it (flava k8s delete {name}) or choose another run id") from err
        previous = _terminal(existing, completions)
        if previous is None or previous.state == "Succeeded":
            log.info("re-attached to job %s/%s (%s)", namespace, name, previous.state if previous else "running")
            return SubmittedJob(name, namespace, existing.metadata.uid, completions, reattached=True)
        log.info("job %s/%s failed before (%s): deleting it, then submitting again", namespace, name,
                 previous.reason)
        delete(SubmittedJob(name, namespace, existing.metadata.uid, completions), api=api, wait_gone=True,
               retries=retries, sleep=sleep)
        created = call(lambda: batch.create_namespaced_job(namespace, job_manifest), f"create job {name}")
    owner = {"apiVersion": "batch/v1", "kind": "Job", "name": name, "uid": created.metadata.uid,
             "controller": False, "blockOwnerDeletion": False}
    kind = "ConfigMap"
    try:
        for manifest in dependents:
            kind = manifest["kind"]
            body = json.loads(json.dumps(manifest))
            body["metadata"]["ownerReferences"] = [owner]
            call(lambda: _create(core, kind, namespace, body), f"create {kind} {name}")
    except (ApiException, Urllib3Error, ConnectionError) as err:
        batch.delete_namespaced_job(name, namespace, propagation_policy="Background")
        raise RuntimeError(
            f"could not create the {kind} of job {namespace}/{name} ({_describe(err)}); the job was deleted"
        ) from err
    log.info("submitted job %s/%s (%d pod(s))", namespace, name, completions)
    return SubmittedJob(name, namespace, created.metadata.uid, completions)


def delete(job: SubmittedJob, *, api=None, wait_gone: bool = False, timeout_s: float = 300.0, retries: int = 8,
           sleep: Callable[[float], None] = time.sleep, clock: Callable[[], float] = time.monotonic) -> bool:
    """Delete the Job and its pods (foreground: the Job goes once its pods are gone); ``wait_gone`` waits until
    the API server no longer has it. Returns False when it was not there."""
    batch, _ = _apis(api)
    try:
        retrying(lambda: batch.delete_namespaced_job(job.name, job.namespace, propagation_policy="Foreground"),
                 retries=retries, sleep=sleep, what=f"delete job {job.name}")
    except ApiException as err:
        if err.status == 404:
            return False
        raise
    log.info("deleted job %s/%s", job.namespace, job.name)
    deadline = clock() + timeout_s
    while wait_gone:
        try:
            retrying(lambda: batch.read_namespaced_job(job.name, job.namespace), retries=retries, sleep=sleep)
        except ApiException as err:
            if err.status == 404:
                break
            raise
        if clock() >= deadline:
            raise TimeoutError(f"job {job.namespace}/{job.name} still there {timeout_s:.0f}s after its deletion")
        sleep(1.0)
    return True


# ------------------------------------------------------------------------------------------------ wait
def _index(pod) -> int:
    value = (pod.metadata.annotations or {}).get(INDEX_ANNOTATION, "")
    return int(value) if value.isdigit() else -1


def _pods(core: client.CoreV1Api, job: SubmittedJob, retries: int, sleep) -> list:
    return retrying(lambda: core.list_namespaced_pod(job.namespace, label_selector=f"{RUN_LABEL}={job.name}"),
                    retries=retries, sleep=sleep, what=f"list pods of {job.name}").items


def pending_reason(pod) -> str:
    """Why a Pending pod has not started, from its conditions and container states ("" when none is stated)."""
    status = pod.status
    for cond in status.conditions or []:
        if cond.type == "PodScheduled" and cond.status == "False":
            return f"{cond.reason or 'not scheduled'}: {cond.message or ''}".strip()
    for cs in status.container_statuses or []:
        waiting = cs.state.waiting if cs.state else None
        if waiting and waiting.reason:
            return f"{waiting.reason}: {waiting.message or ''}".strip()
    return ""


def _claim_note(core: client.CoreV1Api, pod, namespace: str, retries: int, sleep) -> str:
    """"PVC x is Pending (storage class y)" for an unbound claim the pod mounts, else ""."""
    for volume in pod.spec.volumes or []:
        claim = volume.persistent_volume_claim
        if claim is None:
            continue
        try:
            pvc = retrying(lambda: core.read_namespaced_persistent_volume_claim(claim.claim_name, namespace),
                           retries=retries, sleep=sleep)
        except ApiException as err:
            if err.status == 404:
                return f"; PVC {claim.claim_name} does not exist"
            if err.status == 403:  # not granted (OPTIONAL_API_PERMISSIONS): the scheduler's reason stands alone
                return ""
            raise
        if pvc.status is None or pvc.status.phase != "Bound":
            phase = pvc.status.phase if pvc.status else "unknown"
            return (f"; PVC {claim.claim_name} is {phase} (storageClassName "
                    f"{pvc.spec.storage_class_name or 'the default'}; see launch.k8s.workspace_storage_class)")
    return ""


def wait(
    job: SubmittedJob,
    *,
    api=None,
    timeout_s: float = 3600.0,
    poll_s: float = 10.0,
    pending_timeout_s: float = 900.0,
    retries: int = 8,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
) -> JobStatus:
    """Poll the Job's status until it completes or fails.

    ``TimeoutError`` after ``timeout_s``; ``PodsPending`` when a pod stays Pending ``pending_timeout_s`` (from
    when this wait first saw it so); transient API errors are retried up to ``retries`` times in a row."""
    batch, core = _apis(api)
    deadline = clock() + timeout_s
    pending_since: dict[str, float] = {}
    while True:
        obj = retrying(lambda: batch.read_namespaced_job_status(job.name, job.namespace), retries=retries,
                       sleep=sleep, what=f"read job {job.name}")
        result = _terminal(obj, job.completions)
        if result is not None:
            log.info("job %s/%s %s (%s)", job.namespace, job.name, result.state, result.reason or "no reason")
            return result
        now = clock()
        if not obj.spec or not obj.spec.suspend:  # a suspended Job (queued by Kueue) has no pods yet
            pending = {p.metadata.name: p for p in _pods(core, job, retries, sleep) if p.status.phase == "Pending"}
            pending_since = {n: pending_since.get(n, now) for n in pending}
            stuck = sorted((n for n in pending if now - pending_since[n] >= pending_timeout_s),
                           key=lambda n: _index(pending[n]))
            if stuck:
                pod = pending[stuck[0]]
                reason = pending_reason(pod) or "no reason given"
                raise PodsPending(
                    f"job {job.namespace}/{job.name}: pod {pod.metadata.name} (index {_index(pod)}) Pending for "
                    f"{now - pending_since[stuck[0]]:.0f}s (launch.k8s.pending_timeout_s={pending_timeout_s:.0f}): "
                    f"{reason}{_claim_note(core, pod, job.namespace, retries, sleep)}"
                )
        if now >= deadline:
            st = obj.status
            raise TimeoutError(
                f"job {job.namespace}/{job.name} not finished after {timeout_s:.0f}s "
                f"(active={st.active or 0}, succeeded={st.succeeded or 0}, failed={st.failed or 0})"
            )
        sleep(poll_s)


# ------------------------------------------------------------------------------------------------ logs
def _terminated(pod):
    for cs in pod.status.container_statuses or []:
        if cs.name == CONTAINER and cs.state and cs.state.terminated:
            return cs.state.terminated
    return None


def failed_pods(pods: list) -> list:
    """The Job's failed pods, root cause first: a ``NON_RETRYABLE`` exit, then the earliest to finish."""
    failed = [p for p in pods if p.status.phase == "Failed"]

    def key(pod):
        term = _terminated(pod)
        code = term.exit_code if term else None
        finished = term.finished_at.timestamp() if term and term.finished_at else float("inf")
        return code != NON_RETRYABLE, finished, _index(pod), pod.metadata.name

    return sorted(failed, key=key)


def logs(job: SubmittedJob, *, api=None, tail_lines: int | None = None, retries: int = 8,
         sleep: Callable[[float], None] = time.sleep) -> dict[str, str]:
    """Trainer logs of every pod of the Job, keyed by pod name, in completion-index then creation order."""
    _, core = _apis(api)
    pods = _pods(core, job, retries, sleep)

    def order(pod):
        created = pod.metadata.creation_timestamp.timestamp() if pod.metadata.creation_timestamp else 0.0
        return _index(pod), created, pod.metadata.name

    out: dict[str, str] = {}
    for pod in sorted(pods, key=order):
        out[pod.metadata.name] = _pod_log(core, pod.metadata.name, job.namespace, tail_lines, retries, sleep)
    return out


def _pod_log(core, pod: str, namespace: str, tail_lines: int | None, retries: int, sleep) -> str:
    try:
        return retrying(lambda: core.read_namespaced_pod_log(pod, namespace, container=CONTAINER,
                                                             tail_lines=tail_lines),
                        retries=retries, sleep=sleep, what=f"read log of {pod}") or ""
    except ApiException as err:  # a pod that never started has no log
        return f"(no log: {_describe(err)})"


def status(job: SubmittedJob, *, api=None, retries: int = 8) -> dict[str, Any]:
    """The Job's counts and conditions, and each pod's index, phase and (terminated) exit code or pending reason."""
    batch, core = _apis(api)
    obj = retrying(lambda: batch.read_namespaced_job_status(job.name, job.namespace), retries=retries)
    st = obj.status
    pods = []
    for pod in sorted(_pods(core, job, retries, time.sleep), key=lambda p: (_index(p), p.metadata.name)):
        term = _terminated(pod)
        pods.append({"pod": pod.metadata.name, "index": _index(pod), "phase": pod.status.phase,
                     "exit_code": term.exit_code if term else None,
                     "reason": (term.reason or "") if term else pending_reason(pod)})
    terminal = _terminal(obj, job.completions)
    return {"job": job.name, "namespace": job.namespace, "state": terminal.state if terminal else "Running",
            "suspended": bool(obj.spec and obj.spec.suspend), "active": st.active or 0,
            "succeeded": st.succeeded or 0, "failed": st.failed or 0,
            "conditions": [{"type": c.type, "status": c.status, "reason": c.reason or ""}
                           for c in (st.conditions or [])], "pods": pods}


def lookup(k8s: K8sConfig, name: str, *, api=None) -> SubmittedJob:
    """A Job by name, as ``submit`` would have returned it (for ``flava k8s status|logs|delete``)."""
    batch, _ = _apis(api)
    try:
        obj = retrying(lambda: batch.read_namespaced_job(name, k8s.namespace), retries=k8s.api_retries)
    except ApiException as err:
        if err.status == 404:
            raise ValueError(f"no job {k8s.namespace}/{name} (launch.k8s.namespace)") from err
        raise
    return SubmittedJob(name, k8s.namespace, obj.metadata.uid, int(obj.spec.completions or 1))


# ------------------------------------------------------------------------------------------------ run
def run_joint(
    cfg,
    *,
    api=None,
    parent_run_id: str | None = None,
    run_id: str | None = None,
    k8s: K8sConfig | None = None,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
) -> dict[str, Any]:
    """Render, submit (or re-attach) and watch one joint run; save the pod logs under
    ``paths.reports/k8s/{job}/``.

    Without ``run_id`` a launch under a parent run (``$FLAVA_PARENT_RUN_ID``) names its Job after the config and
    the parent run, so a retried task re-attaches. The trainer writes its outputs to the shared workspace; the
    caller reads ``paths.reports/joint.json`` from there. A failed Job raises ``JobFailed`` (a ``ValueError``
    too when the failure is non-retryable)."""
    k8s = k8s_section(cfg, k8s)
    parent_run_id, run_id = _run_ids(cfg, parent_run_id, run_id)
    manifests = build_manifests(cfg, run_id=run_id, k8s=k8s, parent_run_id=parent_run_id)
    return _launch(cfg, k8s, manifests, api, sleep, clock)


def run_sweep_job(
    cfg,
    *,
    api=None,
    parent_run_id: str | None = None,
    run_id: str | None = None,
    k8s: K8sConfig | None = None,
    sweep: SweepConfig | None = None,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
) -> dict[str, Any]:
    """The sweep's workers as one Indexed Job (``launch.sweep.workers`` pods on the study), watched like
    :func:`run_joint`; the study's report is written by the workers to ``paths.reports`` on the workspace."""
    k8s = k8s_section(cfg, k8s)
    parent_run_id, run_id = _run_ids(cfg, parent_run_id, run_id)
    manifests = build_sweep_manifests(cfg, run_id=run_id, k8s=k8s, sweep=sweep or launch_section(cfg).sweep,
                                      parent_run_id=parent_run_id)
    return _launch(cfg, k8s, manifests, api, sleep, clock)


def _run_ids(cfg, parent_run_id: str | None, run_id: str | None) -> tuple[str | None, str]:
    """The parent run (given, else ``$FLAVA_PARENT_RUN_ID``) and the Job's run id (given, else derived from the
    config and the parent run so that a retried task re-attaches, else fresh)."""
    parent_run_id = parent_run_id or os.environ.get(lineage.PARENT_RUN_ENV)
    return parent_run_id, run_id or (deterministic_run_id(cfg, parent_run_id) if parent_run_id else new_run_id(cfg))


def _launch(cfg, k8s: K8sConfig, manifests: list[dict[str, Any]], api, sleep, clock) -> dict[str, Any]:
    api = api or api_client(k8s)
    job = submit(manifests, k8s.namespace, api=api, retries=k8s.api_retries, sleep=sleep)
    try:
        result = wait(job, api=api, timeout_s=k8s.wait_timeout_s, poll_s=k8s.poll_interval_s,
                      pending_timeout_s=k8s.pending_timeout_s, retries=k8s.api_retries, sleep=sleep, clock=clock)
    except BaseException as err:  # timeout, stuck pods, a cancelled flow (KeyboardInterrupt), a crash here
        log.error("deleting job %s/%s: the launcher stops watching it (%s)", job.namespace, job.name,
                  type(err).__name__)
        try:
            delete(job, api=api, retries=k8s.api_retries, sleep=sleep)
        except Exception as cleanup:  # the original error is the one to report
            log.error("could not delete job %s/%s: %s", job.namespace, job.name, cleanup)
        raise
    return _report(cfg, k8s, job, result, api, sleep)


def _report(cfg, k8s: K8sConfig, job: SubmittedJob, result: JobStatus, api, sleep) -> dict[str, Any]:
    log_dir = Path(cfg.paths.reports) / "k8s" / job.name
    log_dir.mkdir(parents=True, exist_ok=True)
    pod_logs = logs(job, api=api, retries=k8s.api_retries, sleep=sleep)
    for pod, text in pod_logs.items():
        (log_dir / f"{pod}.log").write_text(text or "")
    _, core = _apis(api)
    culprits = failed_pods(_pods(core, job, k8s.api_retries, sleep)) if result.state != "Succeeded" else []
    summary = {
        "job": job.name, "namespace": job.namespace, "state": result.state, "succeeded": result.succeeded,
        "failed": result.failed, "reason": result.reason, "reattached": job.reattached, "pods": sorted(pod_logs),
        "logs": str(log_dir),
    }
    if culprits:
        term = _terminated(culprits[0])
        summary["failed_pod"] = {"pod": culprits[0].metadata.name, "index": _index(culprits[0]),
                                 "exit_code": term.exit_code if term else None}
    (log_dir / "status.json").write_text(json.dumps(summary, indent=2))
    if result.state == "Succeeded":
        return summary
    detail, root_code = "", None
    if culprits:
        pod, term = culprits[0], _terminated(culprits[0])
        root_code = term.exit_code if term else None
        message = (term.message or "").strip() if term else ""
        tail = "\n".join(pod_logs.get(pod.metadata.name, "").splitlines()[-20:])
        detail = (f"\nfirst failed pod {pod.metadata.name} (index {_index(pod)}, exit code {root_code}): "
                  f"{message}\n{tail}")
    # The podFailurePolicy's FailJob rule fires on NON_RETRYABLE only: such a Job fails the same way every time.
    error = NonRetryableJobFailure if result.reason == "PodFailurePolicy" or root_code == NON_RETRYABLE else JobFailed
    raise error(f"job {job.namespace}/{job.name} failed ({result.reason}: {result.message}); logs in {log_dir}"
                f"{detail}")
