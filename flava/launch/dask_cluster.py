"""A Dask cluster on Kubernetes for the data stages: plain manifests rendered from ``launch.dask`` and ``launch.k8s``,
created and deleted through the official ``kubernetes`` client (``flava dask manifests|up|down``).

The cluster is three objects: a scheduler Deployment (one pod running ``dask scheduler``), a Service in front of it
on ``launch.dask.port``, and a worker Deployment of ``launch.dask.workers`` pods, each running one single-threaded
``dask worker`` (the partitions are CPU-bound Python: processes, not threads) in the project's image with the
workspace PVC mounted at ``launch.k8s.workdir``, its working directory. ``up`` prints the scheduler's address; a
data stage run with ``data.engine.kind=address`` and that ``data.engine.address`` maps its partitions there
(:mod:`flava.data.engine`). The stage's own process is the Dask client: it must run where it reaches the Service (in
the cluster: the Prefect worker's pod, or any pod of the image) and see the workspace at the same path as the
workers, because a partition task carries the config's paths, relative to the workspace root.

Why not dask-kubernetes' operator (``KubeCluster``, the ``DaskCluster`` resource): it needs its CRDs and its
controller installed and upgraded in the cluster, the same reason the joint run is a plain Indexed Job rather than
a JobSet (:mod:`flava.launch.k8s_manifests`). Two Deployments and a Service need nothing but the API server, and a
worker pod that dies is replaced by its Deployment; the stages resume from their finished partitions anyway.

``up`` creates what is missing and keeps what is there with the same spec (an annotation holds its digest); an
object there with another spec (other image, replicas, resources) is a ``ValueError``: ``down`` first.
"""
from __future__ import annotations

import copy
import hashlib
import json
import time
from typing import Any, Callable

from kubernetes import client
from kubernetes.client.exceptions import ApiException

from flava.launch.config import DaskClusterConfig, K8sConfig, launch_section
from flava.launch.k8s import json_client, retrying
from flava.launch.k8s_manifests import (
    container_security_context,
    k8s_section,
    pod_security_context,
    storage_env,
    workspace_volume,
)

CLUSTER_LABEL = "flava/dask-cluster"
SPEC_ANNOTATION = "flava/spec-digest"
# One thread per worker process: the partitions hold the GIL (image decoding, GE in Python).
WORKER_THREADS = 1
# What `flava dask up|down` asks of the API server (group, resource, verb); infra/k8s's Role grants it.
API_PERMISSIONS = frozenset({
    ("apps", "deployments", "create"), ("apps", "deployments", "get"), ("apps", "deployments", "delete"),
    ("", "services", "create"), ("", "services", "get"), ("", "services", "delete"),
})


def dask_section(cfg, dask: DaskClusterConfig | None = None) -> DaskClusterConfig:
    return dask if dask is not None else launch_section(cfg).dask


def scheduler_name(dask: DaskClusterConfig) -> str:
    """The scheduler's Deployment and Service."""
    return f"{dask.name}-scheduler"


def worker_name(dask: DaskClusterConfig) -> str:
    return f"{dask.name}-worker"


def scheduler_address(k8s: K8sConfig, dask: DaskClusterConfig) -> str:
    """What ``data.engine.address`` is set to: the Service's DNS name inside the cluster."""
    return f"tcp://{scheduler_name(dask)}.{k8s.namespace}.svc:{dask.port}"


def scheduler_command(dask: DaskClusterConfig) -> list[str]:
    return ["dask", "scheduler", "--port", str(dask.port), "--no-dashboard"]


def worker_command(address: str) -> list[str]:
    return ["dask", "worker", address, "--nthreads", str(WORKER_THREADS), "--no-dashboard"]


def _digest(manifest: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(manifest, sort_keys=True).encode()).hexdigest()[:16]


def _labels(dask: DaskClusterConfig, component: str) -> dict[str, str]:
    return {"app.kubernetes.io/name": "flava", "app.kubernetes.io/component": component,
            "app.kubernetes.io/managed-by": "flava-launch", CLUSTER_LABEL: dask.name}


def _deployment(k8s: K8sConfig, dask: DaskClusterConfig, name: str, component: str, replicas: int,
                command: list[str], cpu: str, memory: str, *, workspace: bool) -> dict[str, Any]:
    labels = _labels(dask, component)
    container: dict[str, Any] = {
        "name": component,
        "image": k8s.image,
        "imagePullPolicy": k8s.image_pull_policy,
        "workingDir": k8s.workdir,
        "command": command,
        # The workers read and write the data (S3 included); the scheduler only routes tasks: no credentials.
        "env": [{"name": "PYTHONUNBUFFERED", "value": "1"}, *(storage_env(k8s) if workspace else [])],
        "resources": {"requests": {"cpu": cpu, "memory": memory}, "limits": {"memory": memory}},
        "securityContext": container_security_context(),
    }
    pod: dict[str, Any] = {
        "automountServiceAccountToken": False,  # Dask never calls the API server
        "securityContext": pod_security_context(k8s),
        "containers": [container],
    }
    if workspace:  # the workers read and write the stages' paths, at the path the client sees them
        container["volumeMounts"] = [{"name": "workspace", "mountPath": k8s.workdir}]
        pod["volumes"] = [workspace_volume(k8s)]
    else:
        container["ports"] = [{"name": "dask", "containerPort": dask.port, "protocol": "TCP"}]
        container["readinessProbe"] = {"tcpSocket": {"port": dask.port}, "periodSeconds": 5}
    if k8s.service_account:
        pod["serviceAccountName"] = k8s.service_account
    if dask.node_selector:
        pod["nodeSelector"] = dict(dask.node_selector)
    return {
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": name, "namespace": k8s.namespace, "labels": labels},
        "spec": {"replicas": replicas, "selector": {"matchLabels": {CLUSTER_LABEL: dask.name,
                                                                     "app.kubernetes.io/component": component}},
                 "template": {"metadata": {"labels": labels}, "spec": pod}},
    }


def build_dask_manifests(cfg, *, k8s: K8sConfig | None = None,
                         dask: DaskClusterConfig | None = None) -> list[dict[str, Any]]:
    """Scheduler Deployment, its Service, worker Deployment; each annotated with the digest of its own spec."""
    k8s, dask = k8s_section(cfg, k8s), dask_section(cfg, dask)
    name = scheduler_name(dask)
    objects = [
        _deployment(k8s, dask, name, "dask-scheduler", 1, scheduler_command(dask), dask.scheduler_cpu,
                    dask.scheduler_memory, workspace=False),
        {"apiVersion": "v1", "kind": "Service",
         "metadata": {"name": name, "namespace": k8s.namespace, "labels": _labels(dask, "dask-scheduler")},
         "spec": {"selector": {CLUSTER_LABEL: dask.name, "app.kubernetes.io/component": "dask-scheduler"},
                  "ports": [{"name": "dask", "port": dask.port, "targetPort": dask.port, "protocol": "TCP"}]}},
        _deployment(k8s, dask, worker_name(dask), "dask-worker", dask.workers,
                    worker_command(scheduler_address(k8s, dask)), dask.worker_cpu, dask.worker_memory,
                    workspace=True),
    ]
    for manifest in objects:
        manifest["metadata"]["annotations"] = {SPEC_ANNOTATION: _digest(manifest)}
    return objects


def _calls(api, kind: str):
    """(create, read, delete) of ``kind`` through the client."""
    if kind == "Deployment":
        apps = client.AppsV1Api(api)
        return (apps.create_namespaced_deployment, apps.read_namespaced_deployment,
                apps.delete_namespaced_deployment)
    core = client.CoreV1Api(api)
    return core.create_namespaced_service, core.read_namespaced_service, core.delete_namespaced_service


def up(cfg, *, api=None, retries: int | None = None,
       sleep: Callable[[float], None] = time.sleep) -> dict[str, Any]:
    """Create the cluster's objects that are missing; -> the scheduler's address and what happened to each."""
    k8s, dask = k8s_section(cfg), dask_section(cfg)
    api = json_client(api)
    retries = k8s.api_retries if retries is None else retries
    done: dict[str, str] = {}
    for manifest in build_dask_manifests(cfg):
        kind, name = manifest["kind"], manifest["metadata"]["name"]
        create, read, _ = _calls(api, kind)
        body = copy.deepcopy(manifest)
        try:
            retrying(lambda: create(k8s.namespace, body), retries=retries, sleep=sleep, what=f"create {kind} {name}")
            done[f"{kind}/{name}"] = "created"
            continue
        except ApiException as err:
            if err.status != 409:
                raise
        existing = retrying(lambda: read(name, k8s.namespace), retries=retries, sleep=sleep,
                            what=f"read {kind} {name}")
        theirs = (existing.metadata.annotations or {}).get(SPEC_ANNOTATION)
        ours = manifest["metadata"]["annotations"][SPEC_ANNOTATION]
        if theirs != ours:
            raise ValueError(
                f"{kind} {k8s.namespace}/{name} already exists with another spec (digest {theirs} vs {ours}: "
                f"image, replicas, resources or port changed); run `flava dask down` first, then `flava dask up`")
        done[f"{kind}/{name}"] = "unchanged"
    return {"address": scheduler_address(k8s, dask), "namespace": k8s.namespace, "workers": dask.workers,
            "objects": done}


def down(cfg, *, api=None, retries: int | None = None,
         sleep: Callable[[float], None] = time.sleep) -> dict[str, Any]:
    """Delete the cluster's objects (their pods go with the Deployments); -> which ones were there."""
    k8s = k8s_section(cfg)
    api = json_client(api)
    retries = k8s.api_retries if retries is None else retries
    deleted: dict[str, bool] = {}
    for manifest in reversed(build_dask_manifests(cfg)):  # workers first: they would only wait for the scheduler
        kind, name = manifest["kind"], manifest["metadata"]["name"]
        _, _, delete = _calls(api, kind)
        try:
            retrying(lambda: delete(name, k8s.namespace, propagation_policy="Foreground"), retries=retries,
                     sleep=sleep, what=f"delete {kind} {name}")
            deleted[f"{kind}/{name}"] = True
        except ApiException as err:
            if err.status != 404:
                raise
            deleted[f"{kind}/{name}"] = False
    return {"namespace": k8s.namespace, "deleted": deleted}
