"""The Dask cluster on Kubernetes (``flava dask manifests``): the scheduler Deployment and Service and the worker
Deployment rendered from ``launch.dask`` and ``launch.k8s`` -- names, replicas, commands, the workspace where the
stages see it, restricted security, no credentials on the scheduler -- validated strictly (kubernetes-validate) for
every supported Kubernetes version, round-tripped through the client's models, and the RBAC Role granting every
call ``up``/``down`` make."""
from __future__ import annotations

import itertools

import kubernetes_validate
import pytest
import yaml
from kubernetes import client

from flava.config import PipelineConfig
from flava.launch import dask_cluster, k8s_manifests
from flava.launch.config import DaskClusterConfig, K8sConfig

VARIANTS = {
    "defaults": ({}, {}),
    "emptydir-s3-account": ({"workspace_pvc": None, "s3_endpoint_url": "http://minio.flava:9000",
                             "service_account": "flava-data", "env": {"DASK_LOGGING__DISTRIBUTED": "info"}},
                            {"node_selector": {"pool": "cpu"}, "workers": 8}),
}


def render(k8s_fields=None, dask_fields=None):
    k8s, dask = K8sConfig(**(k8s_fields or {})), DaskClusterConfig(**(dask_fields or {}))
    return k8s, dask, dask_cluster.build_dask_manifests(PipelineConfig(), k8s=k8s, dask=dask)


def pod(manifest):
    return manifest["spec"]["template"]["spec"]


def test_scheduler_service_and_workers_with_their_commands():
    k8s, dask, items = render({"namespace": "data"}, {"name": "dc", "workers": 5, "port": 8800})
    assert [(m["kind"], m["metadata"]["name"]) for m in items] == [
        ("Deployment", "dc-scheduler"), ("Service", "dc-scheduler"), ("Deployment", "dc-worker")]
    scheduler, service, workers = items
    assert all(m["metadata"]["namespace"] == "data" for m in items)
    assert scheduler["spec"]["replicas"] == 1 and workers["spec"]["replicas"] == 5
    address = dask_cluster.scheduler_address(k8s, dask)
    assert address == "tcp://dc-scheduler.data.svc:8800"
    (sched,) = pod(scheduler)["containers"]
    (work,) = pod(workers)["containers"]
    assert sched["command"] == ["dask", "scheduler", "--port", "8800", "--no-dashboard"]
    assert work["command"] == ["dask", "worker", address, "--nthreads", "1", "--no-dashboard"]
    assert service["spec"]["ports"] == [{"name": "dask", "port": 8800, "targetPort": 8800, "protocol": "TCP"}]
    assert sched["readinessProbe"]["tcpSocket"]["port"] == 8800
    # the Service reaches the scheduler pod and nothing else; each Deployment selects its own pods
    sched_labels, worker_labels = (d["spec"]["template"]["metadata"]["labels"] for d in (scheduler, workers))
    assert service["spec"]["selector"].items() <= sched_labels.items()
    assert not service["spec"]["selector"].items() <= worker_labels.items()
    for deployment in (scheduler, workers):
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()


def test_workers_see_the_workspace_where_the_stages_do():
    k8s, _, items = render({"workdir": "/data/ws", "workspace_pvc": "ws-claim"})
    scheduler, _, workers = items
    (work,) = pod(workers)["containers"]
    assert work["workingDir"] == "/data/ws"  # the stages' relative paths resolve under the workspace
    assert work["volumeMounts"] == [{"name": "workspace", "mountPath": "/data/ws"}]
    assert pod(workers)["volumes"] == [{"name": "workspace", "persistentVolumeClaim": {"claimName": "ws-claim"}}]
    assert work["image"] == k8s.image
    assert "volumes" not in pod(scheduler)


def test_restricted_security_and_credentials_only_on_workers():
    k8s, dask, items = render({"run_as_user": 1234, "fs_group": 4321, "s3_secret": "s3-creds"},
                              {"worker_memory": "6Gi", "worker_cpu": "2"})
    scheduler, _, workers = items
    for deployment in (scheduler, workers):
        spec = pod(deployment)
        assert spec["securityContext"]["runAsNonRoot"] is True
        assert (spec["securityContext"]["runAsUser"], spec["securityContext"]["fsGroup"]) == (1234, 4321)
        assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        assert spec["automountServiceAccountToken"] is False
        (container,) = spec["containers"]
        assert container["securityContext"] == {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}}
    secrets = {e["valueFrom"]["secretKeyRef"]["name"] for e in pod(workers)["containers"][0]["env"] if "valueFrom" in e}
    assert secrets == {"s3-creds"}
    assert all("valueFrom" not in e for e in pod(scheduler)["containers"][0]["env"])
    assert pod(workers)["containers"][0]["resources"] == {"requests": {"cpu": "2", "memory": "6Gi"},
                                                         "limits": {"memory": "6Gi"}}


def test_the_spec_digest_changes_with_what_the_pods_run():
    digests = [[m["metadata"]["annotations"][dask_cluster.SPEC_ANNOTATION] for m in render(*fields)[2]]
               for fields in (({}, {}), ({}, {}), ({}, {"workers": 3}), ({"image": "other:1"}, {}))]
    assert digests[0] == digests[1]
    assert digests[2][:2] == digests[0][:2] and digests[2][2] != digests[0][2]  # only the workers changed
    assert digests[3][0] != digests[0][0] and digests[3][1] == digests[0][1]  # the Service runs no image


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_every_variant_passes_strict_openapi_validation_and_round_trips(variant):
    _, _, items = render(*VARIANTS[variant])
    for version, manifest in itertools.product(k8s_manifests.SUPPORTED_VERSIONS, items):
        kubernetes_validate.validate(manifest, version, strict=True)
    models = {"Deployment": client.V1Deployment, "Service": client.V1Service}
    for manifest in items:
        obj = models[manifest["kind"]].from_dict(manifest)
        assert client.ApiClient().sanitize_for_serialization(obj) == manifest


def test_strict_validation_catches_a_misspelt_field():
    _, _, items = render()
    items[2]["spec"]["template"]["spec"]["containers"][0]["workDir"] = "/workspace"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(items[2], k8s_manifests.SUPPORTED_VERSIONS[-1], strict=True)


def test_the_launcher_role_grants_what_up_and_down_call(project_root):
    docs = list(yaml.safe_load_all((project_root / "infra" / "k8s" / "rbac.yaml").read_text()))
    (role,) = [d for d in docs if d["kind"] == "Role"]
    granted = {(group, resource, verb) for rule in role["rules"] for group in rule["apiGroups"]
               for resource in rule["resources"] for verb in rule["verbs"]}
    assert dask_cluster.API_PERMISSIONS <= granted, dask_cluster.API_PERMISSIONS - granted


def test_cluster_name_must_be_a_dns_label():
    with pytest.raises(ValueError, match="launch.dask.name"):
        DaskClusterConfig(name="Flava_Dask")


def test_cli_manifests_renders_the_configured_cluster(tmp_path, project_root, monkeypatch):
    from flava.cli import main

    monkeypatch.chdir(tmp_path)
    out = tmp_path / "dask.yaml"
    code = main(["dask", "manifests", "--params", str(project_root / "params.yaml"),
                 "--set", "launch.dask.workers=4", "-o", str(out)])
    assert code == 0
    docs = list(yaml.safe_load_all(out.read_text()))
    assert [d["kind"] for d in docs] == ["Deployment", "Service", "Deployment"]
    assert docs[2]["spec"]["replicas"] == 4
