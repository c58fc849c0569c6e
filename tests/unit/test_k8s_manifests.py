"""Kubernetes manifests for a distributed joint run and for sweep workers: structure, the gang command, the pod's
security context and failure policy, the one tracking URI, strict OpenAPI validation of every variant for every
supported Kubernetes version (kubernetes-validate), and a lossless round trip through the official client's
models (a misspelt field would be dropped by ``from_dict`` and break the round trip)."""
from __future__ import annotations

import itertools
import random

import kubernetes_validate
import pytest
import yaml
from kubernetes import client
from torch.distributed.elastic.rendezvous.dynamic_rendezvous import _NodeDesc

from flava.config import PipelineConfig
from flava.exitcodes import NON_RETRYABLE, PREEMPTED
from flava.launch import k8s as k8slib
from flava.launch import k8s_manifests
from flava.launch.config import K8sConfig, LaunchConfig, Toleration, launch_section
from flava.tracking.lineage import PARENT_RUN_ENV

SERVER = "http://mlflow.example:5000"


@pytest.fixture(autouse=True)
def _tracking_env(monkeypatch):
    """The pods' tracking URI derives from the launching process's: fix it, and no pipeline parent run."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", SERVER)
    monkeypatch.delenv(PARENT_RUN_ENV, raising=False)


def manifests(parent=True, **k8s_fields):
    k8s = K8sConfig(**k8s_fields)
    return k8s, k8slib.build_manifests(PipelineConfig(), run_id="abc123", k8s=k8s,
                                       parent_run_id="parent42" if parent else None)


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
    k8s, items = manifests(nodes=4, gpus_per_node=8, backoff_limit_per_node=3, node_selector={"gpu": "h100"},
                           tolerations=[Toleration(key="nvidia.com/gpu")], active_deadline_s=7200,
                           termination_grace_s=900)
    job = by_kind(items)["Job"]
    spec = job["spec"]
    assert (job["apiVersion"], spec["completionMode"]) == ("batch/v1", "Indexed")
    assert spec["completions"] == spec["parallelism"] == 4
    assert spec["backoffLimit"] == 12 and spec["activeDeadlineSeconds"] == 7200  # 3 per node x 4 nodes
    assert spec["successPolicy"] == {"rules": [{"succeededIndexes": "0"}]}  # the leader's success is the Job's
    assert spec["podReplacementPolicy"] == "Failed"  # never two pods (two DNS answers) for one index
    assert "suspend" not in spec
    pod = spec["template"]["spec"]
    # podFailurePolicy only works with restartPolicy Never; it ignores preemption so the index is simply re-run.
    assert pod["restartPolicy"] == "Never"
    assert pod["terminationGracePeriodSeconds"] == 900
    assert spec["podFailurePolicy"]["rules"] == [
        {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]},
        {"action": "FailJob", "onExitCodes": {"containerName": "trainer", "operator": "In",
                                              "values": [NON_RETRYABLE]}},
        {"action": "Ignore", "onExitCodes": {"containerName": "trainer", "operator": "In", "values": [PREEMPTED]}},
    ]
    assert pod["subdomain"] == "flava-joint-abc123"
    assert pod["nodeSelector"] == {"gpu": "h100"}
    assert pod["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    (container,) = pod["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "8"
    assert spec["template"]["metadata"]["labels"] == job["metadata"]["labels"]


def test_torchrun_command_targets_rank0_pod_through_headless_service():
    k8s, items = manifests(nodes=3, gpus_per_node=2, rdzv_port=29400, max_restarts=5, rdzv_join_timeout_s=2400,
                           overrides=["paths.shards=s3://bucket/shards"])
    cmd = by_kind(items)["Job"]["spec"]["template"]["spec"]["containers"][0]["command"]
    assert cmd[:3] == ["python", "-m", "flava.launch.gang"]  # torchrun, passing the worker's exit code on
    assert "--nnodes=3" in cmd and "--nproc-per-node=2" in cmd and "--max-restarts=5" in cmd
    assert "--node-rank=$(JOB_COMPLETION_INDEX)" in cmd
    assert "--rdzv-backend=c10d" in cmd
    assert "--rdzv-endpoint=flava-joint-abc123-0.flava-joint-abc123.flava.svc:29400" in cmd
    assert "--rdzv-conf=join_timeout=2400" in cmd
    assert "--local-addr=flava-joint-abc123-$(JOB_COMPLETION_INDEX).flava-joint-abc123.flava.svc" in cmd
    module = cmd.index("-m", 3)
    assert cmd[module:module + 4] == ["-m", "flava", "pretrain", "joint"]
    assert cmd[cmd.index("--params") + 1] == "/etc/flava/params.yaml"
    assert cmd[-2:] == ["--set", "paths.shards=s3://bucket/shards"]
    svc = by_kind(items)["Service"]["spec"]
    assert svc["clusterIP"] == "None" and svc["publishNotReadyAddresses"] is True
    assert svc["selector"] == {k8slib.RUN_LABEL: "flava-joint-abc123"}
    assert svc["ports"][0]["port"] == 29400


def test_env_secrets_volumes_and_mounted_config():
    k8s, items = manifests(s3_secret="s3creds", s3_endpoint_url="http://minio:9000",
                           mlflow_tracking_uri="http://mlflow:5000", env={"NCCL_DEBUG": "INFO"}, shm_size="16Gi",
                           parent=False)
    kinds = by_kind(items)
    container = kinds["Job"]["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e for e in container["env"]}
    assert env["MLFLOW_TRACKING_URI"]["value"] == "http://mlflow:5000"
    assert "FLAVA_PARENT_RUN_ID" not in env
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
    assert env["MLFLOW_TRACKING_URI"] == SERVER  # the launching process's
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
    with pytest.raises(ValueError, match="create_workspace_pvc needs launch.k8s.workspace_pvc"):
        K8sConfig(create_workspace_pvc=True, workspace_pvc=None)


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
    assert k8slib.API_PERMISSIONS <= granted, k8slib.API_PERMISSIONS - granted
    # The optional PVC read (a Pending pod's reason) is granted; PVC create is not needed: the base ships the claim.
    assert ("", "persistentvolumeclaims", "get") in granted
    assert ("", "persistentvolumeclaims", "create") not in granted and not default.create_workspace_pvc
    binding = kinds["RoleBinding"]
    assert binding["roleRef"]["name"] == kinds["Role"]["metadata"]["name"]
    assert binding["subjects"][0]["name"] == kinds["ServiceAccount"]["metadata"]["name"]


# ------------------------------------------------------------------------------------------------ first run
def test_pods_run_as_the_image_user_with_restricted_security():
    _, items = manifests(run_as_user=1000, run_as_group=1000, fs_group=1000)
    pod = by_kind(items)["Job"]["spec"]["template"]["spec"]
    assert pod["securityContext"] == {
        "runAsNonRoot": True, "runAsUser": 1000, "runAsGroup": 1000, "fsGroup": 1000,
        "fsGroupChangePolicy": "OnRootMismatch", "seccompProfile": {"type": "RuntimeDefault"}}
    (container,) = pod["containers"]
    assert container["securityContext"] == {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}}
    assert container["terminationMessagePolicy"] == "FallbackToLogsOnError"
    assert pod["automountServiceAccountToken"] is False


def test_workspace_pvc_rendered_with_its_storage_class_when_the_launcher_creates_it():
    _, items = manifests(create_workspace_pvc=True, workspace_storage_class="nfs-rwx", workspace_size="500Gi")
    claim = items[0]
    assert [m["kind"] for m in items] == ["PersistentVolumeClaim", "ConfigMap", "Service", "Job"]
    assert claim["metadata"]["name"] == "flava-workspace"
    assert claim["spec"] == {"accessModes": ["ReadWriteMany"], "storageClassName": "nfs-rwx",
                             "resources": {"requests": {"storage": "500Gi"}}}
    assert "storageClassName" not in k8s_manifests.workspace_claim(K8sConfig())["spec"]  # the cluster default


def test_kueue_queue_labels_the_job_and_creates_it_suspended():
    _, items = manifests(kueue_queue="gpu-team", priority_class="training-high")
    job = by_kind(items)["Job"]
    assert job["metadata"]["labels"][k8s_manifests.KUEUE_QUEUE_LABEL] == "gpu-team"
    assert job["spec"]["suspend"] is True
    assert job["spec"]["template"]["spec"]["priorityClassName"] == "training-high"
    assert k8s_manifests.KUEUE_QUEUE_LABEL not in by_kind(items)["ConfigMap"]["metadata"]["labels"]


def test_default_deadline_and_launcher_timeout_outlast_it():
    k8s = K8sConfig()
    assert k8s.active_deadline_s == 7 * 86400
    assert k8s.wait_timeout_s > k8s.active_deadline_s  # the Job's own deadline fails it first
    assert by_kind(manifests()[1])["Job"]["spec"]["activeDeadlineSeconds"] == 7 * 86400


def test_rank_zero_is_index_zero_under_torchs_rendezvous_ordering():
    """The c10d rendezvous ranks nodes by sorting their descriptors (address, pid, local id): with each pod's
    --local-addr its stable DNS name, index 0 sorts first whatever the pids and however many nodes."""
    k8s = K8sConfig(nodes=16)
    name = k8slib.job_name(k8s, "abc123")
    (addr_arg,) = [a for a in k8s_manifests.gang_command(k8s, name) if a.startswith("--local-addr=")]
    rng = random.Random(0)
    for nodes in (2, 3, 11, 16):
        order = list(range(nodes))
        rng.shuffle(order)
        descs = [_NodeDesc(addr_arg.split("=", 1)[1].replace("$(JOB_COMPLETION_INDEX)", str(i)),
                           rng.randrange(1, 2**22), 0) for i in order]
        assert sorted(descs)[0].addr.startswith(f"{name}-0.")


# ------------------------------------------------------------------------------------------------ tracking URI
def test_pods_get_the_tracking_uri_the_parent_run_lives_in(monkeypatch):
    _, items = manifests()  # MLFLOW_TRACKING_URI=SERVER in the launching process
    env = {e["name"]: e.get("value") for e in by_kind(items)["Job"]["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["MLFLOW_TRACKING_URI"] == SERVER and env["FLAVA_PARENT_RUN_ID"] == "parent42"
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    cfg = PipelineConfig.model_validate({"tracking": {"tracking_uri": "http://mlflow.flava:5000"}})
    job = by_kind(k8slib.build_manifests(cfg, run_id="x", k8s=K8sConfig(), parent_run_id="p"))["Job"]
    env = {e["name"]: e.get("value") for e in job["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["MLFLOW_TRACKING_URI"] == "http://mlflow.flava:5000"


def test_a_parent_run_in_a_local_store_is_refused_naming_both_keys(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    for uri in ("sqlite:///mlflow.db", "file:///tmp/mlruns", "./mlruns"):
        cfg = PipelineConfig.model_validate({"tracking": {"tracking_uri": uri}})
        with pytest.raises(ValueError, match=r"(?s)parent MLflow run p1 is in the local store.*tracking\.tracking_uri"
                                             r".*launch\.k8s\.mlflow_tracking_uri"):
            k8slib.build_manifests(cfg, run_id="x", k8s=K8sConfig(), parent_run_id="p1")
        # Without a parent run the pods may use the workspace's file store (relative to their workdir).
        k8slib.build_manifests(cfg, run_id="x", k8s=K8sConfig(), parent_run_id=None)


def test_pods_sent_to_another_server_than_the_parent_run_is_refused():
    with pytest.raises(ValueError, match=r"(?s)parent MLflow run parent42 is in 'http://mlflow.example:5000'.*"
                                         r"launch.k8s.mlflow_tracking_uri sends the pods to 'http://other:5000'"):
        manifests(mlflow_tracking_uri="http://other:5000")
    manifests(mlflow_tracking_uri=SERVER)  # the same server, stated: fine


# ------------------------------------------------------------------------------------------------ sweep workers
def sweep_cfg(**sweep_fields):
    return PipelineConfig.model_validate({"launch": {"sweep": {
        "storage": "postgresql://optuna@db.flava:5432/optuna", "workers": 3, **sweep_fields}}})


def test_sweep_workers_are_one_indexed_job_each_pod_a_seeded_worker():
    cfg = sweep_cfg()
    items = k8slib.build_sweep_manifests(cfg, run_id="s1", k8s=K8sConfig(gpus_per_node=1), parent_run_id="p")
    assert [m["kind"] for m in items] == ["ConfigMap", "Job"]  # no rendezvous: no Service
    job = by_kind(items)["Job"]
    assert job["metadata"]["name"] == "flava-sweep-s1"
    assert job["metadata"]["labels"]["app.kubernetes.io/component"] == "sweep-worker"
    spec = job["spec"]
    assert spec["completions"] == spec["parallelism"] == 3 and spec["completionMode"] == "Indexed"
    assert "successPolicy" not in spec  # every worker finishes the study's budget
    assert spec["backoffLimit"] == 3 * K8sConfig().backoff_limit_per_node
    assert spec["podFailurePolicy"] == k8s_manifests.failure_policy()
    pod = spec["template"]["spec"]
    assert "subdomain" not in pod and pod["securityContext"]["runAsUser"] == 1000
    cmd = pod["containers"][0]["command"]
    assert cmd[:5] == ["python", "-m", "flava", "sweep", "--params"]
    assert cmd[cmd.index("--worker-index") + 1] == "$(JOB_COMPLETION_INDEX)"
    assert cmd[cmd.index("--workers") + 1] == "1"
    stored = yaml.safe_load(by_kind(items)["ConfigMap"]["data"]["params.yaml"])
    assert stored["launch"]["sweep"]["storage"].startswith("postgresql://")


def test_several_sweep_workers_need_a_server_storage():
    with pytest.raises(ValueError, match=r"launch.sweep.storage='reports/sweep/optuna.db' cannot be shared by 2"):
        k8slib.build_sweep_manifests(sweep_cfg(storage="reports/sweep/optuna.db", workers=2), run_id="s")
    one = k8slib.build_sweep_manifests(sweep_cfg(storage="reports/sweep/optuna.db", workers=1), run_id="s")
    assert by_kind(one)["Job"]["spec"]["completions"] == 1
    with pytest.raises(ValueError, match="pod hostname"):
        k8slib.build_sweep_manifests(sweep_cfg(workers=12), run_id="y" * 55)


# ------------------------------------------------------------------------------------------------ validation
VARIANTS = {
    "default": {},
    "multi-node-gpu": {"nodes": 4, "gpus_per_node": 8, "node_selector": {"gpu": "h100"}, "priority_class": "hi",
                       "service_account": "trainer", "env": {"NCCL_DEBUG": "INFO"}},
    "cpu-emptydir-no-secret": {"gpus_per_node": 0, "workspace_pvc": None, "s3_secret": None, "tolerations": [],
                               "active_deadline_s": None, "ttl_after_finished_s": None},
    "kueue-pvc-s3": {"kueue_queue": "team", "create_workspace_pvc": True, "workspace_storage_class": "nfs",
                     "s3_endpoint_url": "http://minio:9000"},
    "no-success-policy": {"leader_success_policy": False},
}


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(p) for p in text.split("."))


def rendered(variant: str, what: str) -> tuple[list[dict], list[str]]:
    """A rendered variant (joint or sweep), with the Kubernetes versions it is meant for."""
    k8s = K8sConfig(**VARIANTS[variant])
    if what == "sweep":
        return (k8slib.build_sweep_manifests(sweep_cfg(), run_id="v1", k8s=k8s, parent_run_id="p"),
                list(k8s_manifests.SUPPORTED_VERSIONS))
    needs = k8s_manifests.SUCCESS_POLICY_SINCE if k8s.leader_success_policy else "1.29.0"
    return (k8slib.build_manifests(PipelineConfig(), run_id="v1", k8s=k8s, parent_run_id="p"),
            [v for v in k8s_manifests.SUPPORTED_VERSIONS if _version(v) >= _version(needs)])


def test_supported_versions_are_what_kubernetes_validate_ships():
    assert k8s_manifests.SUPPORTED_VERSIONS[0] == "1.29.0"
    assert _version(kubernetes_validate.latest_version()) >= _version(k8s_manifests.SUPPORTED_VERSIONS[-1])


@pytest.mark.parametrize("what", ["joint", "sweep"])
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_every_rendered_variant_passes_strict_openapi_validation(variant, what):
    items, versions = rendered(variant, what)
    assert len(versions) >= 7  # 1.31-1.37 at least
    for version, manifest in itertools.product(versions, items):
        kubernetes_validate.validate(manifest, version, strict=True)


def test_strict_validation_rejects_what_a_version_lacks_and_misspellings():
    items = k8slib.build_manifests(PipelineConfig(), run_id="v1", k8s=K8sConfig(), parent_run_id="p")
    job = by_kind(items)["Job"]
    with pytest.raises(kubernetes_validate.ValidationError, match="successPolicy"):
        kubernetes_validate.validate(job, "1.29.0", strict=True)  # why leader_success_policy can be turned off
    job["spec"]["template"]["spec"]["securityContext"]["fsGroupChangePolicyy"] = "OnRootMismatch"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(job, "1.33.0", strict=True)


def test_cli_sweep_renders_the_worker_job(tmp_path, project_root, monkeypatch):
    from flava.cli import main

    monkeypatch.chdir(tmp_path)
    out = tmp_path / "sweep.yaml"
    code = main(["k8s", "sweep", "--params", str(project_root / "params.yaml"), "--run-id", "cli2",
                 "--set", "launch.sweep.workers=2", "--set", "launch.sweep.storage=postgresql://db/optuna",
                 "-o", str(out)])
    assert code == 0
    docs = list(yaml.safe_load_all(out.read_text()))
    assert [d["kind"] for d in docs] == ["ConfigMap", "Job"]
    assert docs[1]["metadata"]["name"] == "flava-sweep-cli2" and docs[1]["spec"]["completions"] == 2
    code = main(["k8s", "sweep", "--params", str(project_root / "params.yaml"), "--set", "launch.sweep.workers=2",
                 "-o", str(out)])
    assert code == 2  # the SQLite default cannot be shared by two pods: a config error
