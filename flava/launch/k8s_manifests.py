"""The Kubernetes objects of a distributed joint run and of a sweep's workers, as plain manifest dicts.

Joint run = a ConfigMap holding the effective ``params.yaml`` (the pods train on exactly the rendered config),
a headless Service whose DNS names (``{job}-{index}.{service}``) give torchrun a rendezvous endpoint, and an
Indexed ``batch/v1`` Job with one pod per node running ``python -m flava.launch.gang`` (torchrun passing its
failed worker's exit code through) ``... -m flava pretrain joint``.

Why a plain Indexed Job, not JobSet or Kubeflow Trainer's TrainJob: it needs nothing installed in the cluster
(both of those are controllers with CRDs a team must run and upgrade), every Kubernetes >= 1.29 has it, and the
gang semantics the joint stage needs are expressible with the Job API alone:

- a defined leader: torchrun's c10d rendezvous is hosted on index 0 (``{job}-0.{job}``) and every node
  announces itself by its pod's stable DNS name (``--local-addr``); the rendezvous ranks nodes by that name, so
  rank 0 is always index 0;
- the leader decides: ``successPolicy`` succeeds the Job when index 0 succeeds (``leader_success_policy``;
  Kubernetes >= 1.31) and the other indexes are then terminated;
- gang restart: a lost node makes torchrun on the others restart its worker group (``max_restarts``) and wait
  ``rdzv_join_timeout_s`` for the replacement pod, which gets the same index and DNS name
  (``podReplacementPolicy: Failed``: only after the old pod is gone, so two pods never share an index); all
  resume from the last checkpoint on the shared workspace;
- failures: ``podFailurePolicy`` ignores disruptions (preemption, eviction, drain: ``DisruptionTarget``) and
  pods that exited ``PREEMPTED`` after saving a checkpoint on SIGTERM, fails the Job at once on
  ``NON_RETRYABLE`` (bad config or data: retrying cannot help), and counts the rest against ``backoffLimit``,
  which scales with the gang (a lost leader makes every peer fail once);
- gang admission: with ``kueue_queue`` the Job is created suspended and labelled for Kueue, which admits all
  pods at once (pair with Kueue's ``waitForPodsReady``).

What JobSet would add is restarting the gang as one unit on a single pod failure (``failurePolicy.maxRestarts``)
and multi-template jobs; torchrun's elastic restarts cover the former for this one-template gang. Moving to
JobSet means wrapping this Job template in a ReplicatedJob.

Sweep workers = the ConfigMap and an Indexed Job of ``launch.sweep.workers`` pods, each running ``flava sweep``
as worker ``$(JOB_COMPLETION_INDEX)`` (its sampler seed offset) on the study's shared storage, with the same pod
template (security context, workspace, env, failure policy).
"""
from __future__ import annotations

import copy
import uuid
from typing import Any
from urllib.parse import urlparse

import yaml

from flava.exitcodes import NON_RETRYABLE, PREEMPTED
from flava.launch.config import DNS_LABEL, K8sConfig, SweepConfig, launch_section
from flava.tracking import lineage
from flava.tracking.runs import tracking_uri

CONTAINER = "trainer"
RUN_LABEL = "flava/run"
INDEX_ANNOTATION = "batch.kubernetes.io/job-completion-index"
KUEUE_QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
PARAMS_FILE = "params.yaml"
INDEX = "$(JOB_COMPLETION_INDEX)"  # expanded by the kubelet from the pod's env
# Kubernetes versions the rendered objects are validated against (tests/unit/test_k8s_manifests.py);
# successPolicy (leader_success_policy) exists from 1.31 on (beta there, enabled by default).
SUPPORTED_VERSIONS = tuple(f"1.{minor}.0" for minor in range(29, 38))
SUCCESS_POLICY_SINCE = "1.31.0"
# Stores a pod cannot reach: a file on the launching machine.
LOCAL_SCHEMES = ("", "file", "sqlite")


def k8s_section(cfg, k8s: K8sConfig | None = None) -> K8sConfig:
    return k8s if k8s is not None else launch_section(cfg).k8s


def _checked_name(prefix: str, run_id: str, pods: int, key: str) -> str:
    name = f"{prefix}-{run_id}"
    longest_host = f"{name}-{pods - 1}"
    if not DNS_LABEL.match(name) or len(longest_host) > 63:
        raise ValueError(
            f"job name {name!r} ({key} + run id {run_id!r}) must be a lowercase RFC 1123 label short enough that "
            f"the pod hostname {longest_host!r} has at most 63 characters"
        )
    return name


def job_name(k8s: K8sConfig, run_id: str) -> str:
    """``{name_prefix}-{run_id}``; checked so that pod hostnames ``{job}-{index}`` stay valid DNS labels."""
    return _checked_name(k8s.name_prefix, run_id, k8s.nodes, "launch.k8s.name_prefix")


def sweep_job_name(k8s: K8sConfig, sweep: SweepConfig, run_id: str) -> str:
    return _checked_name(k8s.sweep_name_prefix, run_id, sweep.workers, "launch.k8s.sweep_name_prefix")


def new_run_id(cfg) -> str:
    """Config digest + a random suffix: names show what ran and a resubmission never collides."""
    return f"{cfg.digest()[:8]}-{uuid.uuid4().hex[:5]}"


def pod_tracking_uri(cfg, k8s: K8sConfig, parent_run_id: str | None) -> str:
    """The MLflow tracking URI the pods log to: ``launch.k8s.mlflow_tracking_uri``, else the launching process's
    (``$MLFLOW_TRACKING_URI``, else ``tracking.tracking_uri``).

    Under a parent run the pods nest their runs under it, so they must reach the store it lives in: a parent run
    in a local file store, or ``launch.k8s.mlflow_tracking_uri`` naming another store, is a ``ValueError`` here,
    before anything is submitted (else rank 0 dies with "Run ... not found" in every replacement pod)."""
    launching = tracking_uri(cfg)
    pods = k8s.mlflow_tracking_uri or launching
    if parent_run_id:
        if urlparse(launching).scheme in LOCAL_SCHEMES:
            raise ValueError(
                f"the parent MLflow run {parent_run_id} is in the local store {launching!r} "
                f"($MLFLOW_TRACKING_URI or tracking.tracking_uri), which the pods cannot reach: point "
                f"MLFLOW_TRACKING_URI / tracking.tracking_uri at the team's tracking server (and leave "
                f"launch.k8s.mlflow_tracking_uri null or equal to it)"
            )
        if pods != launching:
            raise ValueError(
                f"the parent MLflow run {parent_run_id} is in {launching!r} ($MLFLOW_TRACKING_URI or "
                f"tracking.tracking_uri) but launch.k8s.mlflow_tracking_uri sends the pods to {pods!r}: the pods "
                f"must log where the parent run is (set launch.k8s.mlflow_tracking_uri to null or the same URI)"
            )
    return pods


def gang_command(k8s: K8sConfig, name: str, overrides: list[str] = ()) -> list[str]:
    """The joint container's command: torchrun through :mod:`flava.launch.gang`, rank 0 on index 0."""
    domain = f"{name}.{k8s.namespace}.svc"  # the headless Service
    cmd = [
        "python", "-m", "flava.launch.gang",
        f"--nnodes={k8s.nodes}",
        f"--nproc-per-node={k8s.procs_per_node}",
        f"--node-rank={INDEX}",
        "--rdzv-backend=c10d",
        f"--rdzv-endpoint={name}-0.{domain}:{k8s.rdzv_port}",
        f"--rdzv-id={name}",
        f"--rdzv-conf=join_timeout={k8s.rdzv_join_timeout_s}",
        # The c10d rendezvous ranks nodes by this name: "{job}-0." sorts first, so index 0 is rank 0.
        f"--local-addr={name}-{INDEX}.{domain}",
        f"--max-restarts={k8s.max_restarts}",
        "-m", "flava", "pretrain", "joint",
        "--params", f"{k8s.config_mount}/{PARAMS_FILE}",
    ]
    for item in [*k8s.overrides, *overrides]:
        cmd += ["--set", item]
    return cmd


def sweep_command(k8s: K8sConfig, overrides: list[str] = ()) -> list[str]:
    """A sweep worker's command: one ``flava sweep`` worker whose index (its seed offset) is the pod's."""
    cmd = ["python", "-m", "flava", "sweep", "--params", f"{k8s.config_mount}/{PARAMS_FILE}",
           "--workers", "1", "--worker-index", INDEX]
    for item in [*k8s.overrides, *overrides]:
        cmd += ["--set", item]
    return cmd


def _env(k8s: K8sConfig, mlflow_uri: str, parent_run_id: str | None) -> list[dict[str, Any]]:
    env: list[dict[str, Any]] = [
        # The Job controller injects this too; declaring it makes `$(JOB_COMPLETION_INDEX)` expansion explicit.
        {"name": "JOB_COMPLETION_INDEX",
         "valueFrom": {"fieldRef": {"fieldPath": f"metadata.annotations['{INDEX_ANNOTATION}']"}}},
        {"name": "PYTHONUNBUFFERED", "value": "1"},
        {"name": "MLFLOW_TRACKING_URI", "value": mlflow_uri},
    ]
    if parent_run_id:
        env.append({"name": lineage.PARENT_RUN_ENV, "value": parent_run_id})
    return env + storage_env(k8s)


def storage_env(k8s: K8sConfig) -> list[dict[str, Any]]:
    """The S3 endpoint and credentials (from ``launch.k8s.s3_secret``) and ``launch.k8s.env``: what every pod that
    reads or writes the project's data needs."""
    env: list[dict[str, Any]] = []
    if k8s.s3_endpoint_url:
        env += [{"name": "AWS_ENDPOINT_URL", "value": k8s.s3_endpoint_url},
                {"name": "MLFLOW_S3_ENDPOINT_URL", "value": k8s.s3_endpoint_url}]
    if k8s.s3_secret:
        env += [{"name": key, "valueFrom": {"secretKeyRef": {"name": k8s.s3_secret, "key": key}}}
                for key in k8s.s3_secret_keys]
    env += [{"name": key, "value": value} for key, value in sorted(k8s.env.items())]
    return env


def _resources(k8s: K8sConfig) -> dict[str, dict[str, str]]:
    resources: dict[str, dict[str, str]] = {
        "requests": {"cpu": k8s.cpu, "memory": k8s.memory},
        "limits": {"memory": k8s.memory},
    }
    if k8s.gpus_per_node:
        resources["limits"]["nvidia.com/gpu"] = str(k8s.gpus_per_node)
        resources["requests"]["nvidia.com/gpu"] = str(k8s.gpus_per_node)
    return resources


def workspace_volume(k8s: K8sConfig) -> dict[str, Any]:
    """The ``workspace`` volume: the PVC ``launch.k8s.workspace_pvc``, else an emptyDir that dies with the pod."""
    if k8s.workspace_pvc:
        return {"name": "workspace", "persistentVolumeClaim": {"claimName": k8s.workspace_pvc}}
    return {"name": "workspace", "emptyDir": {}}


def pod_security_context(k8s: K8sConfig) -> dict[str, Any]:
    """The image's non-root user, the workspace group-owned by ``fs_group``: the restricted Pod Security profile."""
    return {
        "runAsNonRoot": True,
        "runAsUser": k8s.run_as_user,
        "runAsGroup": k8s.run_as_group,
        "fsGroup": k8s.fs_group,
        # Re-own the volume only when its root does not already match (a recursive chown of a large RWX
        # workspace on every pod start would take minutes).
        "fsGroupChangePolicy": "OnRootMismatch",
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def container_security_context() -> dict[str, Any]:
    return {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}}


def _pod_spec(k8s: K8sConfig, name: str, command: list[str], env: list[dict[str, Any]], *,
              rendezvous: bool) -> dict[str, Any]:
    """One trainer container as the image's non-root user, with the workspace, the params ConfigMap and a
    RAM-backed /dev/shm; what the restricted Pod Security profile asks for."""
    container: dict[str, Any] = {
        "name": CONTAINER,
        "image": k8s.image,
        "imagePullPolicy": k8s.image_pull_policy,
        "workingDir": k8s.workdir,
        "command": command,
        "env": env,
        "resources": _resources(k8s),
        "volumeMounts": [
            {"name": "workspace", "mountPath": k8s.workdir},
            {"name": "params", "mountPath": k8s.config_mount, "readOnly": True},
            {"name": "dshm", "mountPath": "/dev/shm"},
        ],
        # The failure summary flava.launch.gang writes, else the log's tail: what `wait` reports on failure.
        "terminationMessagePolicy": "FallbackToLogsOnError",
        "securityContext": container_security_context(),
    }
    if rendezvous:
        container["ports"] = [{"name": "rdzv", "containerPort": k8s.rdzv_port, "protocol": "TCP"}]
    pod_spec: dict[str, Any] = {
        "restartPolicy": "Never",  # podFailurePolicy needs it; a failed pod is replaced under its index
        "terminationGracePeriodSeconds": k8s.termination_grace_s,
        "automountServiceAccountToken": False,  # the trainer never calls the API server
        "securityContext": pod_security_context(k8s),
        "containers": [container],
        "volumes": [
            workspace_volume(k8s),
            {"name": "params", "configMap": {"name": name}},
            {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": k8s.shm_size}},
        ],
    }
    if rendezvous:
        pod_spec["subdomain"] = name  # with the Indexed Job's hostname {job}-{index}: DNS {job}-{index}.{service}
    if k8s.service_account:
        pod_spec["serviceAccountName"] = k8s.service_account
    if k8s.priority_class:
        pod_spec["priorityClassName"] = k8s.priority_class
    if k8s.node_selector:
        pod_spec["nodeSelector"] = dict(k8s.node_selector)
    if k8s.tolerations:
        pod_spec["tolerations"] = [t.model_dump(exclude_none=True) for t in k8s.tolerations]
    return pod_spec


def failure_policy() -> dict[str, Any]:
    """Rules in order, first match wins (see the module docstring)."""
    return {"rules": [
        {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]},
        {"action": "FailJob",
         "onExitCodes": {"containerName": CONTAINER, "operator": "In", "values": [NON_RETRYABLE]}},
        {"action": "Ignore",
         "onExitCodes": {"containerName": CONTAINER, "operator": "In", "values": [PREEMPTED]}},
    ]}


def _job_spec(k8s: K8sConfig, template: dict[str, Any], pods: int, *, leader: bool) -> dict[str, Any]:
    job_spec: dict[str, Any] = {
        "completionMode": "Indexed",
        "completions": pods,
        "parallelism": pods,
        "backoffLimit": k8s.backoff_limit_per_node * pods,
        "podReplacementPolicy": "Failed",  # a replacement starts once the old pod is gone (its checkpoint saved)
        "podFailurePolicy": failure_policy(),
        "template": template,
    }
    if leader and k8s.leader_success_policy:
        job_spec["successPolicy"] = {"rules": [{"succeededIndexes": "0"}]}
    if k8s.kueue_queue:
        job_spec["suspend"] = True  # Kueue admits (unsuspends) the Job when the whole gang fits
    if k8s.ttl_after_finished_s is not None:
        job_spec["ttlSecondsAfterFinished"] = k8s.ttl_after_finished_s
    if k8s.active_deadline_s is not None:
        job_spec["activeDeadlineSeconds"] = k8s.active_deadline_s
    return job_spec


def workspace_claim(k8s: K8sConfig) -> dict[str, Any]:
    """The workspace PVC (ReadWriteMany: every node's pod mounts it), created by the launcher when missing with
    ``create_workspace_pvc``. Not owned by a Job: it outlives runs, and holds their checkpoints."""
    spec: dict[str, Any] = {"accessModes": ["ReadWriteMany"],
                            "resources": {"requests": {"storage": k8s.workspace_size}}}
    if k8s.workspace_storage_class:
        spec["storageClassName"] = k8s.workspace_storage_class
    return {"apiVersion": "v1", "kind": "PersistentVolumeClaim",
            "metadata": {"name": k8s.workspace_pvc, "namespace": k8s.namespace,
                         "labels": {"app.kubernetes.io/name": "flava", "app.kubernetes.io/managed-by": "flava-launch"}},
            "spec": spec}


def _objects(cfg, k8s: K8sConfig, name: str, component: str, pods: int, command: list[str],
             env: list[dict[str, Any]], *, gang: bool) -> list[dict[str, Any]]:
    labels = {
        "app.kubernetes.io/name": "flava",
        "app.kubernetes.io/component": component,
        "app.kubernetes.io/managed-by": "flava-launch",
        RUN_LABEL: name,
    }
    annotations = {"flava/params-hash": cfg.digest(), "flava/git-commit": lineage.git_commit()}
    meta = {"name": name, "namespace": k8s.namespace, "labels": labels, "annotations": annotations}
    objects: list[dict[str, Any]] = []
    if k8s.create_workspace_pvc:
        objects.append(workspace_claim(k8s))
    objects.append({
        "apiVersion": "v1", "kind": "ConfigMap", "metadata": meta,
        "data": {PARAMS_FILE: yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)},
    })
    if gang:
        objects.append({
            "apiVersion": "v1", "kind": "Service", "metadata": meta,
            "spec": {
                "clusterIP": "None",
                "selector": {RUN_LABEL: name},
                # Rendezvous happens before any pod is Ready: publish addresses of unready pods too.
                "publishNotReadyAddresses": True,
                "ports": [{"name": "rdzv", "port": k8s.rdzv_port, "targetPort": k8s.rdzv_port, "protocol": "TCP"}],
            },
        })
    template = {"metadata": {"labels": labels, "annotations": annotations},
                "spec": _pod_spec(k8s, name, command, env, rendezvous=gang)}
    job_meta = copy.deepcopy(meta)
    if k8s.kueue_queue:
        job_meta["labels"][KUEUE_QUEUE_LABEL] = k8s.kueue_queue
    objects.append({"apiVersion": "batch/v1", "kind": "Job", "metadata": job_meta,
                    "spec": _job_spec(k8s, template, pods, leader=gang)})
    return [copy.deepcopy(m) for m in objects]  # callers may edit one without the others


def build_manifests(
    cfg,
    *,
    run_id: str | None = None,
    k8s: K8sConfig | None = None,
    parent_run_id: str | None = None,
    overrides: list[str] = (),
) -> list[dict[str, Any]]:
    """(workspace PVC,) ConfigMap, headless Service and Indexed Job for one distributed joint run."""
    k8s = k8s_section(cfg, k8s)
    name = job_name(k8s, run_id or new_run_id(cfg))
    env = _env(k8s, pod_tracking_uri(cfg, k8s, parent_run_id), parent_run_id)
    return _objects(cfg, k8s, name, "joint-pretrain", k8s.nodes, gang_command(k8s, name, list(overrides)), env,
                    gang=True)


def build_sweep_manifests(
    cfg,
    *,
    run_id: str | None = None,
    k8s: K8sConfig | None = None,
    sweep: SweepConfig | None = None,
    parent_run_id: str | None = None,
    overrides: list[str] = (),
) -> list[dict[str, Any]]:
    """(workspace PVC,) ConfigMap and an Indexed Job of ``launch.sweep.workers`` sweep workers on one study.

    Several workers need a storage every pod reaches and that takes concurrent writers (``postgresql://`` or
    ``mysql://``): SQLite on a network volume corrupts under concurrent writers, so a SQLite study is refused
    for more than one worker."""
    k8s = k8s_section(cfg, k8s)
    sweep = sweep if sweep is not None else launch_section(cfg).sweep
    scheme = urlparse(sweep.storage).scheme.split("+")[0]
    if sweep.workers > 1 and scheme not in ("postgresql", "mysql"):
        raise ValueError(
            f"launch.sweep.storage={sweep.storage!r} cannot be shared by {sweep.workers} worker pods "
            f"(launch.sweep.workers): use a postgresql:// (or mysql://) study storage, or one worker"
        )
    name = sweep_job_name(k8s, sweep, run_id or new_run_id(cfg))
    env = _env(k8s, pod_tracking_uri(cfg, k8s, parent_run_id), parent_run_id)
    return _objects(cfg, k8s, name, "sweep-worker", sweep.workers, sweep_command(k8s, list(overrides)), env,
                    gang=False)


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
