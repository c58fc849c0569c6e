"""Kubernetes manifests for a distributed joint run: structure, torchrun command, and a lossless round trip through
the official client's models (a misspelt field would be dropped by ``from_dict`` and break the round trip)."""
from __future__ import annotations

import pytest
import yaml
from kubernetes import client

from flava.config import PipelineConfig
from flava.launch import k8s as k8slib
from flava.launch.config import K8sConfig, LaunchConfig, Toleration, launch_section


def manifests(**k8s_fields):
    k8s = K8sConfig(**k8s_fields)
    return k8s, k8slib.build_manifests(PipelineConfig(), run_id="abc123", k8s=k8s, parent_run_id="parent42")


def by_kind(items):
    return {m["kind"]: m for m in items}


def test_three_objects_share_name_namespace_and_run_label():
    k8s, items = manifests(namespace="ml", nodes=2)
    assert [m["kind"] for m in items] == ["ConfigMap", "Service", "Job"]
    for m in items:
        assert m["metadata"]["name"] == "flava-joint-abc123"
        assert m["metadata"]["namespace"] == "ml"
        assert m["metadata"]["labels"][k8slib.RUN_LABEL] == "flava-joint-abc123"
        assert m["metadata"]["annotations"]["flava/params-hash"] == PipelineConfig().digest()


def test_indexed_job_one_pod_per_node_with_gpus_and_preemption_policy():
    k8s, items = manifests(nodes=4, gpus_per_node=8, backoff_limit=6, node_selector={"gpu": "h100"},
                           tolerations=[Toleration(key="nvidia.com/gpu")], active_deadline_s=7200)
    job = by_kind(items)["Job"]
    spec = job["spec"]
    assert (job["apiVersion"], spec["completionMode"]) == ("batch/v1", "Indexed")
    assert spec["completions"] == spec["parallelism"] == 4
    assert spec["backoffLimit"] == 6 and spec["activeDeadlineSeconds"] == 7200
    pod = spec["template"]["spec"]
    # podFailurePolicy only works with restartPolicy Never; it ignores preemption so the index is simply re-run.
    assert pod["restartPolicy"] == "Never"
    assert spec["podFailurePolicy"]["rules"][0] == {
        "action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]}
    assert pod["subdomain"] == "flava-joint-abc123"
    assert pod["nodeSelector"] == {"gpu": "h100"}
    assert pod["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    (container,) = pod["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "8"
    assert spec["template"]["metadata"]["labels"] == job["metadata"]["labels"]


def test_torchrun_command_targets_rank0_pod_through_headless_service():
    k8s, items = manifests(nodes=3, gpus_per_node=2, rdzv_port=29400, max_restarts=5,
                           overrides=["paths.shards=s3://bucket/shards"])
    cmd = by_kind(items)["Job"]["spec"]["template"]["spec"]["containers"][0]["command"]
    assert cmd[0] == "torchrun"
    assert "--nnodes=3" in cmd and "--nproc-per-node=2" in cmd and "--max-restarts=5" in cmd
    assert "--node-rank=$(JOB_COMPLETION_INDEX)" in cmd
    assert "--rdzv-backend=c10d" in cmd
    assert "--rdzv-endpoint=flava-joint-abc123-0.flava-joint-abc123.flava.svc:29400" in cmd
    module = cmd.index("-m")
    assert cmd[module:module + 4] == ["-m", "flava", "pretrain", "joint"]
    assert cmd[cmd.index("--params") + 1] == "/etc/flava/params.yaml"
    assert cmd[-2:] == ["--set", "paths.shards=s3://bucket/shards"]
    svc = by_kind(items)["Service"]["spec"]
    assert svc["clusterIP"] == "None" and svc["publishNotReadyAddresses"] is True
    assert svc["selector"] == {k8slib.RUN_LABEL: "flava-joint-abc123"}
    assert svc["ports"][0]["port"] == 29400


def test_env_secrets_volumes_and_mounted_config():
    k8s, items = manifests(s3_secret="s3creds", s3_endpoint_url="http://minio:9000",
                           mlflow_tracking_uri="http://mlflow:5000", env={"NCCL_DEBUG": "INFO"}, shm_size="16Gi")
    kinds = by_kind(items)
    container = kinds["Job"]["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e for e in container["env"]}
    assert env["MLFLOW_TRACKING_URI"]["value"] == "http://mlflow:5000"
    assert env["FLAVA_PARENT_RUN_ID"]["value"] == "parent42"
    assert env["AWS_ENDPOINT_URL"]["value"] == env["MLFLOW_S3_ENDPOINT_URL"]["value"] == "http://minio:9000"
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        assert env[key]["valueFrom"]["secretKeyRef"] == {"name": "s3creds", "key": key}
    assert env["JOB_COMPLETION_INDEX"]["valueFrom"]["fieldRef"]["fieldPath"] == (
        "metadata.annotations['batch.kubernetes.io/job-completion-index']")
    assert env["NCCL_DEBUG"]["value"] == "INFO"
    volumes = {v["name"]: v for v in kinds["Job"]["spec"]["template"]["spec"]["volumes"]}
    assert volumes["dshm"]["emptyDir"] == {"medium": "Memory", "sizeLimit": "16Gi"}
    assert volumes["workspace"]["persistentVolumeClaim"]["claimName"] == "flava-workspace"
    assert volumes["params"]["configMap"]["name"] == "flava-joint-abc123"
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert mounts == {"workspace": "/workspace", "params": "/etc/flava", "dshm": "/dev/shm"}
    # The pods train on exactly the rendered config.
    rendered = yaml.safe_load(kinds["ConfigMap"]["data"]["params.yaml"])
    assert PipelineConfig.model_validate(rendered).digest() == PipelineConfig().digest()


def test_cpu_only_and_no_secret_variants():
    k8s, items = manifests(gpus_per_node=0, s3_secret=None, workspace_pvc=None, tolerations=[],
                           mlflow_tracking_uri=None)
    pod = by_kind(items)["Job"]["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert "nvidia.com/gpu" not in container["resources"]["limits"]
    assert "--nproc-per-node=1" in container["command"]
    names = {e["name"] for e in container["env"]}
    assert "AWS_ACCESS_KEY_ID" not in names
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["MLFLOW_TRACKING_URI"] == PipelineConfig().tracking.tracking_uri
    assert {"name": "workspace", "emptyDir": {}} in pod["volumes"]
    assert "tolerations" not in pod


@pytest.mark.parametrize("kind,model", [("ConfigMap", client.V1ConfigMap), ("Service", client.V1Service),
                                        ("Job", client.V1Job)])
def test_round_trip_through_official_client_models(kind, model):
    _, items = manifests(nodes=2, service_account="trainer", active_deadline_s=60)
    manifest = by_kind(items)[kind]
    obj = model.from_dict(manifest)
    assert client.ApiClient().sanitize_for_serialization(obj) == manifest


def test_round_trip_catches_a_misspelt_field():
    _, items = manifests()
    job = by_kind(items)["Job"]
    job["spec"]["completionz"] = 3
    assert client.ApiClient().sanitize_for_serialization(client.V1Job.from_dict(job)) != job


def test_render_yaml_is_a_kubectl_stream():
    _, items = manifests()
    text = k8slib.render_yaml(items)
    assert "&id" not in text and "*id" not in text  # no YAML anchors/aliases
    assert list(yaml.safe_load_all(text)) == items


def test_invalid_names_and_config_raise_value_errors():
    with pytest.raises(ValueError, match="name_prefix"):
        K8sConfig(name_prefix="Flava_Joint")
    with pytest.raises(ValueError, match="63"):
        k8slib.build_manifests(PipelineConfig(), run_id="x" * 50, k8s=K8sConfig(nodes=12))
    with pytest.raises(ValueError, match="workdir"):
        K8sConfig(workdir="relative/dir")
    with pytest.raises(ValueError, match="key.path=value"):
        K8sConfig(overrides=["no-equals"])
    with pytest.raises(ValueError, match="Exists takes no value"):
        Toleration(key="a", operator="Exists", value="b")
    with pytest.raises(ValueError, match="extra"):
        LaunchConfig.model_validate({"k8s": {"gpus": 2}})


def test_new_run_ids_differ_and_default_section():
    cfg = PipelineConfig()
    assert k8slib.new_run_id(cfg) != k8slib.new_run_id(cfg)
    assert k8slib.new_run_id(cfg).startswith(cfg.digest()[:8])
    assert launch_section(cfg) is cfg.launch
    with pytest.raises(ValueError, match="no launch: section"):
        launch_section(object())


def test_cli_render_writes_the_manifests(tmp_path, project_root, monkeypatch):
    from flava.cli import main

    monkeypatch.chdir(tmp_path)
    out = tmp_path / "job.yaml"
    code = main(["k8s", "render", "--params", str(project_root / "params.yaml"), "--run-id", "cli1",
                 "--set", "seed=3", "-o", str(out)])
    assert code == 0
    text = out.read_text()
    assert "params.yaml: |" in text  # the embedded config stays readable
    docs = list(yaml.safe_load_all(text))
    assert [d["kind"] for d in docs] == ["ConfigMap", "Service", "Job"]
    assert docs[2]["metadata"]["name"] == "flava-joint-cli1"
    assert yaml.safe_load(docs[0]["data"]["params.yaml"])["seed"] == 3


def test_cluster_prerequisites_in_infra_k8s_are_valid_and_sufficient(project_root):
    """The kustomize base round-trips through the client models, provides the PVC the Job mounts, and its Role
    grants every API call flava.launch.k8s makes."""
    base = project_root / "infra" / "k8s"
    kustomization = yaml.safe_load((base / "kustomization.yaml").read_text())
    models = {"Namespace": client.V1Namespace, "PersistentVolumeClaim": client.V1PersistentVolumeClaim,
              "ServiceAccount": client.V1ServiceAccount, "Role": client.V1Role, "RoleBinding": client.V1RoleBinding}
    docs = [d for name in kustomization["resources"] for d in yaml.safe_load_all((base / name).read_text())]
    for doc in docs:
        obj = models[doc["kind"]].from_dict(doc)
        assert client.ApiClient().sanitize_for_serialization(obj) == doc, doc["kind"]
    kinds = {d["kind"]: d for d in docs}
    default = K8sConfig()
    assert kinds["PersistentVolumeClaim"]["metadata"]["name"] == default.workspace_pvc
    assert "ReadWriteMany" in kinds["PersistentVolumeClaim"]["spec"]["accessModes"]
    assert kustomization["namespace"] == default.namespace == kinds["Namespace"]["metadata"]["name"]
    granted = {(group, resource, verb) for rule in kinds["Role"]["rules"] for group in rule["apiGroups"]
               for resource in rule["resources"] for verb in rule["verbs"]}
    needed = {("batch", "jobs", "create"), ("batch", "jobs", "delete"), ("batch", "jobs/status", "get"),
              ("", "configmaps", "create"), ("", "services", "create"), ("", "pods", "list"),
              ("", "pods/log", "get")}
    assert needed <= granted, needed - granted
    binding = kinds["RoleBinding"]
    assert binding["roleRef"]["name"] == kinds["Role"]["metadata"]["name"]
    assert binding["subjects"][0]["name"] == kinds["ServiceAccount"]["metadata"]["name"]
