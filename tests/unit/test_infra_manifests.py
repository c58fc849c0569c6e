"""Every manifest in infra/: kustomize bases and overlays rendered, the Prefect Kubernetes work pool's Job template
rendered with its defaults, and the local CPU run's training Job, each validated strictly (kubernetes-validate, no
unknown fields) for every Kubernetes version from 1.29 to the newest the package ships; then the references
between them: URLs name Services and ports that exist, Secret keys exist in the committed examples, claims,
ConfigMaps and service accounts exist, and the names agree with launch.k8s in params.yaml.

No kustomize binary is assumed: ``render`` resolves the features infra/ uses (resources, namespace, images,
JSON 6902 patches) and refuses any other; where ``kubectl`` is installed its ``kustomize`` must agree with it.
"""
from __future__ import annotations

import copy
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from kubernetes_validate import utils as kv
from packaging.version import Version
from prefect.utilities.templating import apply_values

from flava.config import load_config
from flava.launch import k8s as k8slib
from flava.launch import k8s_manifests

ROOT = Path(__file__).resolve().parents[2]
INFRA = ROOT / "infra"
KUSTOMIZATIONS = sorted(p.parent.relative_to(INFRA).as_posix() for p in INFRA.rglob("kustomization.yaml"))
# Files in infra/ that are not Kubernetes objects.
NOT_MANIFESTS = {"prefect.yaml", "local/kind.yaml"}
VERSIONS = [v for v in kv.all_versions() if Version(v) >= Version("1.29")]
CLUSTER_SCOPED = {"Namespace", "ClusterRole", "ClusterRoleBinding", "StorageClass", "PersistentVolume"}
WORKLOADS = {"Deployment", "StatefulSet", "Job"}
SECRET_EXAMPLES = {"flava-platform": INFRA / "platform/secrets.env.example",
                   "flava-s3": INFRA / "platform/s3.env.example"}
JOB_TEMPLATE = INFRA / "prefect/k8s-base-job-template.json"
CPU_SET = INFRA / "local/joint-cpu.set"


# ------------------------------------------------------------------------------------------------ kustomize subset
def _json_patch(doc: dict, ops: list[dict], where: str) -> dict:
    """RFC 6902 add / replace / remove on ``doc`` (a copy is returned)."""
    doc = copy.deepcopy(doc)
    for op in ops:
        *parents, last = [p.replace("~1", "/").replace("~0", "~") for p in op["path"].split("/")[1:]]
        node = doc
        for part in parents:
            node = node[int(part)] if isinstance(node, list) else node[part]
        key = int(last) if isinstance(node, list) and last != "-" else last
        if op["op"] == "add":
            if isinstance(node, list):
                node.insert(len(node) if key == "-" else key, op["value"])
            else:
                node[key] = op["value"]
        elif op["op"] == "replace":
            if isinstance(node, dict) and key not in node:
                raise ValueError(f"{where}: replace of missing {op['path']}")
            node[key] = op["value"]
        elif op["op"] == "remove":
            del node[key]
        else:
            raise ValueError(f"{where}: patch op {op['op']!r} is not supported here")
    return doc


def _set_images(doc: dict, images: list[dict]) -> None:
    pod = _pod_spec(doc)
    if pod is None:
        return
    for container in pod.get("initContainers", []) + pod["containers"]:
        name = re.split(r"[@]|:(?=[^/]*$)", container["image"])[0]
        for image in images:
            if image["name"] == name:
                container["image"] = f"{image.get('newName', name)}:{image['newTag']}"


def render(directory: str) -> list[dict]:
    """The objects ``kubectl kustomize infra/<directory>`` builds, for the kustomization features infra/ uses."""
    path = INFRA / directory
    spec = yaml.safe_load((path / "kustomization.yaml").read_text())
    unknown = set(spec) - {"apiVersion", "kind", "namespace", "resources", "images", "patches"}
    assert not unknown, f"{directory}/kustomization.yaml uses {unknown}: teach render() or keep infra/ simpler"
    docs: list[dict] = []
    for resource in spec.get("resources", []):
        target = (path / resource).resolve()
        if target.is_dir():
            docs += render(target.relative_to(INFRA).as_posix())
        else:
            docs += [d for d in yaml.safe_load_all(target.read_text()) if d]
    for patch in spec.get("patches", []):
        target, ops = patch["target"], yaml.safe_load(patch["patch"])
        hits = [i for i, d in enumerate(docs)
                if d["kind"] == target["kind"] and d["metadata"]["name"] == target["name"]]
        assert hits, f"{directory}: patch target {target} matches nothing"
        for i in hits:
            docs[i] = _json_patch(docs[i], ops, f"{directory} patch {target}")
    for doc in docs:
        _set_images(doc, spec.get("images", []))
        if "namespace" in spec and doc["kind"] not in CLUSTER_SCOPED:
            doc["metadata"]["namespace"] = spec["namespace"]
    return docs


def _pod_spec(doc: dict) -> dict | None:
    if doc["kind"] in WORKLOADS:
        return doc["spec"]["template"]["spec"]
    return None


def _key(doc: dict) -> tuple[str, str]:
    meta = doc["metadata"]
    return doc["kind"], meta.get("name") or meta["generateName"]


def _strings(node):
    if isinstance(node, dict):
        for value in node.values():
            yield from _strings(value)
    elif isinstance(node, list):
        for value in node:
            yield from _strings(value)
    elif isinstance(node, str):
        yield node


# --------------------------------------------------------------------------------- the Prefect pool's Job template
def flow_run_job(**variables) -> dict:
    """The Job the Kubernetes worker creates for a flow run: the template's variables (defaults + ``variables``)
    applied as Prefect applies them; then, as prefect-kubernetes does, the ``env`` mapping is put before the
    container's own env list (which takes values from Secrets) and the command string becomes its args."""
    template = json.loads(JOB_TEMPLATE.read_text())
    values = {k: v["default"] for k, v in template["variables"]["properties"].items() if "default" in v}
    values |= {"name": "flava-pipeline-run", "command": "prefect flow-run execute"} | variables
    config = apply_values(template["job_configuration"], values)
    job = config["job_manifest"]
    container = job["spec"]["template"]["spec"]["containers"][0]
    container["env"] = [{"name": k, "value": v} for k, v in config["env"].items()] + container["env"]
    container["args"] = container["args"].split()
    return job


def cpu_run_overrides() -> list[str]:
    return [line for line in CPU_SET.read_text().splitlines() if line.strip() and not line.startswith("#")]


def cpu_training_objects() -> list[dict]:
    cfg = load_config(ROOT / "params.yaml", cpu_run_overrides())
    # `flava k8s submit` opens no parent run: the pods log to launch.k8s.mlflow_tracking_uri (the in-cluster server)
    return k8slib.build_manifests(cfg, run_id="local1", k8s=cfg.launch.k8s)


def all_manifests() -> dict[str, list[dict]]:
    rendered = {directory: render(directory) for directory in KUSTOMIZATIONS}
    rendered["prefect/k8s-base-job-template.json"] = [flow_run_job()]
    rendered["local/joint-cpu.set (flava k8s render)"] = cpu_training_objects()
    return rendered


RENDERED = all_manifests()
DEFAULTS = load_config(ROOT / "params.yaml")


# ------------------------------------------------------------------------------------------------------ the tests
def test_every_yaml_file_in_infra_is_rendered_by_some_kustomization():
    listed = set()
    for directory in KUSTOMIZATIONS:
        for resource in yaml.safe_load((INFRA / directory / "kustomization.yaml").read_text()).get("resources", []):
            listed.add((INFRA / directory / resource).resolve())
    for path in INFRA.rglob("*.yaml"):
        rel = path.relative_to(INFRA).as_posix()
        if path.name != "kustomization.yaml" and rel not in NOT_MANIFESTS:
            assert path.resolve() in listed, f"infra/{rel} is in no kustomization: nothing validates or applies it"
    assert {"k8s", "platform", "local", "workspace", "storage/nfs", "storage/efs", "storage/filestore",
            "storage/azurefile"} <= set(KUSTOMIZATIONS)


@pytest.mark.parametrize("source", sorted(RENDERED))
def test_manifests_validate_strictly_for_each_kubernetes_version(source):
    assert VERSIONS[0] == "1.29.0" and len(VERSIONS) >= 9, VERSIONS
    errors = []
    for doc in RENDERED[source]:
        # The launcher's leader successPolicy is a Kubernetes >= 1.31 field (launch.k8s.leader_success_policy).
        since = k8s_manifests.SUCCESS_POLICY_SINCE if "successPolicy" in doc.get("spec", {}) else VERSIONS[0]
        for version in [v for v in VERSIONS if Version(v) >= Version(since)]:
            try:
                kv.validate(doc, version, strict=True)
            except kv.ValidationError as err:
                errors.append(f"{_key(doc)} on {version}: {err.message} at {list(err.path)}")
    assert not errors, "\n".join(errors[:20])


def test_strict_validation_rejects_what_it_should():
    # The check itself: a misspelt field and a wrong type fail (so a pass above means something).
    job = flow_run_job()
    job["spec"]["template"]["spec"]["containers"][0]["imagePullPolice"] = "Never"
    with pytest.raises(kv.ValidationError, match="imagePullPolice"):
        kv.validate(job, VERSIONS[-1], strict=True)
    (pvc,) = [d for d in render("k8s") if d["kind"] == "PersistentVolumeClaim"]
    pvc["spec"]["accessModes"] = "ReadWriteMany"
    with pytest.raises(kv.ValidationError):
        kv.validate(pvc, VERSIONS[0], strict=True)


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl (its built-in kustomize) is not installed")
@pytest.mark.parametrize("directory", KUSTOMIZATIONS)
def test_render_agrees_with_kubectl_kustomize(directory):
    out = subprocess.run(["kubectl", "kustomize", str(INFRA / directory)], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    theirs = {_key(d): d for d in yaml.safe_load_all(out.stdout) if d}
    ours = {_key(d): d for d in render(directory)}
    assert ours == theirs


def test_urls_name_services_and_ports_that_exist():
    platform = render("local")
    services = {(d["metadata"]["namespace"], d["metadata"]["name"]): {p["port"] for p in d["spec"]["ports"]}
                for d in platform if d["kind"] == "Service"}
    urls = [u for u in [DEFAULTS.launch.k8s.mlflow_tracking_uri] if u]  # null: the pods use the launcher's URI
    for source, docs in RENDERED.items():
        urls += [s for s in _strings(docs) if "://" in s]
    checked = set()
    for url in urls:
        for host, port in re.findall(r"//(?:[^@/\s]*@)?([a-z0-9.-]+):(\d+)", url):
            if host in {"localhost", "127.0.0.1", "0.0.0.0"}:
                continue
            name, _, rest = host.partition(".")
            namespace = rest.split(".")[0] if rest else "flava"
            assert int(port) in services.get((namespace, name), set()), f"{url}: no Service {host} with port {port}"
            checked.add((name, int(port)))
    # The defaults and the team-mode URLs all point at the platform.
    assert {("mlflow", 5000), ("minio", 9000), ("postgres", 5432), ("prefect-server", 4200)} <= checked


def test_service_selectors_and_target_ports_reach_a_pod():
    docs = render("platform")
    for svc in (d for d in docs if d["kind"] == "Service"):
        pods = [_pod_spec(d) | {"labels": d["spec"]["template"]["metadata"]["labels"]}
                for d in docs if d["kind"] in {"Deployment", "StatefulSet"}]
        chosen = [p for p in pods if svc["spec"]["selector"].items() <= p["labels"].items()]
        assert len(chosen) == 1, f"Service {svc['metadata']['name']} selects {len(chosen)} workloads"
        ports = {p["name"] for c in chosen[0]["containers"] for p in c.get("ports", [])}
        for port in svc["spec"]["ports"]:
            assert port["targetPort"] in ports, (svc["metadata"]["name"], port)
    for sts in (d for d in docs if d["kind"] == "StatefulSet"):
        assert (("Service", sts["spec"]["serviceName"])) in {_key(d) for d in docs}


def _env_file_keys(path: Path) -> set[str]:
    return {line.split("=", 1)[0] for line in path.read_text().splitlines() if line and not line.startswith("#")}


def test_secret_keys_referenced_exist_in_the_committed_examples():
    referenced: dict[str, set[str]] = {}
    for docs in RENDERED.values():
        for doc in docs:
            pod = _pod_spec(doc)
            for container in (pod or {}).get("containers", []):
                for env in container.get("env", []):
                    ref = env.get("valueFrom", {}).get("secretKeyRef")
                    if ref:
                        referenced.setdefault(ref["name"], set()).add(ref["key"])
                for source in container.get("envFrom", []):
                    if "secretRef" in source:
                        referenced.setdefault(source["secretRef"]["name"], set())
    assert set(referenced) <= set(SECRET_EXAMPLES), f"Secrets with no committed example: {set(referenced)}"
    for name, keys in referenced.items():
        missing = keys - _env_file_keys(SECRET_EXAMPLES[name])
        assert not missing, f"Secret {name} needs {missing}, not in {SECRET_EXAMPLES[name].name}"
    # The launcher's S3 Secret is the example's, with the keys it reads.
    assert DEFAULTS.launch.k8s.s3_secret == "flava-s3"
    assert set(DEFAULTS.launch.k8s.s3_secret_keys) <= _env_file_keys(SECRET_EXAMPLES["flava-s3"])
    # Only the examples are committed; the filled-in files are ignored by git.
    for example in SECRET_EXAMPLES.values():
        real = example.with_name(example.name.removesuffix(".example"))
        check = subprocess.run(["git", "check-ignore", "-q", str(real)], cwd=ROOT)
        assert check.returncode == 0, f"{real.relative_to(ROOT)} is not git-ignored"


def test_claims_configmaps_and_service_accounts_exist():
    k8s = DEFAULTS.launch.k8s
    for directory in ("local", "platform", "workspace"):
        docs = render(directory) + (render("k8s") if directory != "local" else [])
        present = {_key(d) for d in docs}
        for doc in docs:
            pod = _pod_spec(doc)
            if pod is None:
                continue
            for volume in pod.get("volumes", []):
                if "configMap" in volume:
                    assert ("ConfigMap", volume["configMap"]["name"]) in present, (doc["metadata"]["name"], volume)
                if "persistentVolumeClaim" in volume:
                    assert ("PersistentVolumeClaim", volume["persistentVolumeClaim"]["claimName"]) in present
            if "serviceAccountName" in pod:
                assert ("ServiceAccount", pod["serviceAccountName"]) in present
        for binding in (d for d in docs if d["kind"] == "RoleBinding"):
            assert ("Role", binding["roleRef"]["name"]) in present
            for subject in binding["subjects"]:
                assert ("ServiceAccount", subject["name"]) in present
                assert subject["namespace"] == binding["metadata"]["namespace"] == k8s.namespace
    base = render("k8s")
    assert ("PersistentVolumeClaim", k8s.workspace_pvc) in {_key(d) for d in base}
    assert {d["metadata"]["name"] for d in base if d["kind"] == "Namespace"} == {k8s.namespace}
    # The flow-run Jobs of the Kubernetes pool mount the launcher's workspace and may launch training Jobs.
    pod = flow_run_job()["spec"]["template"]["spec"]
    assert pod["volumes"][0]["persistentVolumeClaim"]["claimName"] == k8s.workspace_pvc
    assert ("ServiceAccount", pod["serviceAccountName"]) in {_key(d) for d in base}
    assert flow_run_job()["metadata"]["namespace"] == k8s.namespace
    template = json.loads(JOB_TEMPLATE.read_text())["variables"]["properties"]
    assert template["image"]["default"] == k8s.image
    assert template["s3_secret"]["default"] == k8s.s3_secret


def test_storage_overlays_give_the_workspace_a_class_that_can_bind_it():
    (base,) = [d for d in render("k8s") if d["kind"] == "PersistentVolumeClaim"]
    assert base["spec"]["accessModes"] == ["ReadWriteMany"] and "storageClassName" not in base["spec"]
    classes = {}
    for directory in (k for k in KUSTOMIZATIONS if k.startswith("storage/")):
        (pvc,) = [d for d in render(directory) if d["kind"] == "PersistentVolumeClaim"]
        assert pvc["spec"]["accessModes"] == ["ReadWriteMany"], directory
        classes[directory] = pvc["spec"]["storageClassName"]
    assert classes == {"storage/nfs": "nfs-csi", "storage/efs": "efs-sc", "storage/filestore": "standard-rwx",
                       "storage/azurefile": "azurefile-csi"}
    (local,) = [d for d in render("local") if d["kind"] == "PersistentVolumeClaim"]
    assert local["spec"]["accessModes"] == ["ReadWriteOnce"]  # kind/k3d local-path, one node (see the overlay)


def test_pods_meet_the_restricted_profile_and_declare_probes_and_requests():
    namespace = next(d for d in render("k8s") if d["kind"] == "Namespace")
    assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
    sources = {k: v for k, v in RENDERED.items() if not k.startswith("local/joint-cpu")}  # the launcher's own tests
    for source, docs in sources.items():
        for doc in docs:
            pod = _pod_spec(doc)
            if pod is None:
                continue
            where = f"{source}: {_key(doc)}"
            assert pod["securityContext"]["runAsNonRoot"] is True, where
            assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}, where
            assert not any("hostPath" in v for v in pod.get("volumes", [])), where
            for container in pod["containers"]:
                ctx = container["securityContext"]
                assert ctx["allowPrivilegeEscalation"] is False and ctx["capabilities"]["drop"] == ["ALL"], where
                assert container["resources"]["requests"]["memory"], where
                assert container["resources"]["limits"]["memory"], where
                if doc["kind"] != "Job":
                    assert "livenessProbe" in container, where
            if doc["kind"] != "Job" and doc["metadata"]["name"] != "prefect-worker":
                assert pod["automountServiceAccountToken"] is False, where  # only the worker talks to the API


def test_env_references_are_defined_before_use():
    # Kubernetes expands $(VAR) in args, command and env values only from variables defined earlier in env.
    for docs in RENDERED.values():
        for doc in docs:
            for container in (_pod_spec(doc) or {}).get("containers", []):
                defined: set[str] = set()
                for env in container.get("env", []):
                    for ref in re.findall(r"\$\(([A-Z0-9_]+)\)", env.get("value", "")):
                        assert ref in defined, (doc["metadata"]["name"], env["name"], ref)
                    defined.add(env["name"])
                for arg in container.get("args", []) + container.get("command", []):
                    for ref in re.findall(r"\$\(([A-Z0-9_]+)\)", arg):
                        assert ref in defined or ref == "JOB_COMPLETION_INDEX", (doc["metadata"]["name"], arg)


def test_team_mode_connection_urls_use_the_drivers_and_databases_of_the_init_script():
    docs = {d["metadata"]["name"]: d for d in render("platform") if d["kind"] in {"Deployment", "ConfigMap"}}
    mlflow = docs["mlflow"]["spec"]["template"]["spec"]["containers"][0]
    store = "--backend-store-uri=postgresql+psycopg://mlflow:$(MLFLOW_DB_PASSWORD)@postgres:5432/mlflow"
    assert store in mlflow["args"]
    assert "--serve-artifacts" in mlflow["args"]
    assert any(a.startswith("--artifacts-destination=s3://flava-mlflow/") for a in mlflow["args"])
    prefect = docs["prefect-server"]["spec"]["template"]["spec"]["containers"][0]
    url = next(e["value"] for e in prefect["env"] if e["name"] == "PREFECT_API_DATABASE_CONNECTION_URL")
    assert url == "postgresql+asyncpg://prefect:$(PREFECT_DB_PASSWORD)@postgres:5432/prefect"
    script = docs["postgres-init"]["data"]["10-flava-databases.sh"]
    assert "for store in mlflow prefect optuna" in script
    # MLflow 3 refuses requests whose Host header it does not know: the Service's names must be listed.
    hosts = next(e["value"] for e in mlflow["env"] if e["name"] == "MLFLOW_SERVER_ALLOWED_HOSTS").split(",")
    assert {"mlflow.flava:*", "mlflow:*", "localhost:*"} <= set(hosts) and all(" " not in h for h in hosts)


def test_local_cpu_overrides_make_a_two_pod_gloo_job_with_the_locally_loaded_image():
    cfg = load_config(ROOT / "params.yaml", cpu_run_overrides())
    k8s = cfg.launch.k8s
    assert (k8s.nodes, k8s.gpus_per_node, k8s.procs_per_node, k8s.tolerations) == (2, 0, 1, [])
    (image,) = yaml.safe_load((INFRA / "local/kustomization.yaml").read_text())["images"]
    assert k8s.image == f"{image['newName']}:{image['newTag']}" and k8s.image_pull_policy == "Never"
    job = next(d for d in cpu_training_objects() if d["kind"] == "Job")
    (container,) = job["spec"]["template"]["spec"]["containers"]
    assert "nvidia.com/gpu" not in container["resources"].get("limits", {})
    assert job["spec"]["completions"] == 2
    # Only launch.k8s changes: the stages' own params (what DVC hashes) stay those of params.yaml.
    assert all(line.startswith("launch.k8s.") for line in cpu_run_overrides())
