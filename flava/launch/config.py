"""Typed configuration of the launchers (``launch:`` in params.yaml).

``launch.k8s`` describes the Kubernetes Job that runs the joint stage under ``torchrun`` on GPU nodes,
``launch.sweep`` the Optuna study over the joint sampling ratios and warm-up, ``launch.dask`` the Dask cluster the
data stages can run their partitions on, ``launch.schedule`` the Prefect deployment schedule.
Defaults are the embedded (synthetic, small) pipeline's values.
"""
from __future__ import annotations

import re
from typing import Literal

from pydantic import Field, field_validator, model_validator

from flava.configbase import StrictModel

# RFC 1123 label (names of Services, Jobs, ConfigMaps; pod hostnames), at most 63 characters.
DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")


class Toleration(StrictModel):
    """A pod toleration (GPU nodes are usually tainted, e.g. ``nvidia.com/gpu=present:NoSchedule``)."""

    key: str
    operator: Literal["Equal", "Exists"] = "Exists"
    value: str | None = None
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = "NoSchedule"

    @model_validator(mode="after")
    def _value_needs_equal(self) -> "Toleration":
        if self.operator == "Exists" and self.value is not None:
            raise ValueError(f"toleration {self.key!r}: operator Exists takes no value")
        return self


class K8sConfig(StrictModel):
    """One Indexed Job (one pod per node) + a headless Service for the torchrun rendezvous; sweep workers as an
    Indexed Job of their own (``launch.sweep.workers`` pods). See :mod:`flava.launch.k8s_manifests`."""

    namespace: str = "flava"
    name_prefix: str = "flava-joint"  # Job/Service/ConfigMap names are ``{name_prefix}-{run id}``
    sweep_name_prefix: str = "flava-sweep"  # the sweep workers' Job: ``{sweep_name_prefix}-{run id}``
    image: str = "ghcr.io/flava-mlops/flava:latest"
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] = "IfNotPresent"
    service_account: str | None = None
    nodes: int = Field(default=1, ge=1)
    gpus_per_node: int = Field(default=1, ge=0)  # 0 = CPU-only pods (gloo), one process per node
    nproc_per_node: int | None = Field(default=None, ge=1)  # default: gpus_per_node (or 1 without GPUs)
    cpu: str = "8"
    memory: str = "32Gi"
    shm_size: str = "8Gi"  # /dev/shm for dataloader workers and NCCL
    node_selector: dict[str, str] = Field(default_factory=dict)
    tolerations: list[Toleration] = Field(
        default_factory=lambda: [Toleration(key="nvidia.com/gpu", operator="Exists", effect="NoSchedule")]
    )
    # The image's user: the pods run as it, and volumes are group-owned by fs_group (changed only on a mismatch).
    run_as_user: int = Field(default=1000, ge=1)
    run_as_group: int = Field(default=1000, ge=1)
    fs_group: int = Field(default=1000, ge=1)
    rdzv_port: int = Field(default=29500, ge=1, le=65535)
    # How long torchrun on a node waits for the others to join (a replaced pod 0 must be rescheduled, pull the
    # image and start within it) before the node gives up.
    rdzv_join_timeout_s: int = Field(default=1800, ge=1)
    max_restarts: int = Field(default=3, ge=0)  # torchrun restarts of the worker group inside the pods
    # Failed pods the Job tolerates, per node: one lost leader makes every peer fail once, so the budget scales
    # with the gang (backoffLimit = this x nodes). Preemptions and SIGTERM-checkpointed exits are not counted.
    backoff_limit_per_node: int = Field(default=2, ge=0)
    # Job successPolicy "index 0 succeeded => the Job succeeded" (the leader's result is the run's). Needs
    # Kubernetes >= 1.31 (JobSuccessPolicy beta); set false on 1.29/1.30, where all indexes must succeed.
    leader_success_policy: bool = True
    # Seconds a terminating pod has to save its checkpoint on SIGTERM before SIGKILL (one checkpoint save, with
    # margin for a slow volume).
    termination_grace_s: int = Field(default=600, ge=1)
    active_deadline_s: int | None = Field(default=7 * 86400, ge=1)  # the Job's wall-clock limit, enforced by it
    ttl_after_finished_s: int | None = Field(default=86400, ge=0)
    # Kueue LocalQueue: the Job is created suspended with kueue.x-k8s.io/queue-name, and Kueue admits the whole
    # gang at once (pair with Kueue's waitForPodsReady). None = no Kueue.
    kueue_queue: str | None = None
    priority_class: str | None = None
    # The workspace (data, models, checkpoints) lives on this PVC so a replacement pod resumes from
    # ``paths.checkpoints``. None = an emptyDir: outputs and checkpoints die with the pod.
    workspace_pvc: str | None = "flava-workspace"
    # With create_workspace_pvc the launcher creates the PVC when it is missing (ReadWriteMany, this size and
    # storage class; None = the cluster's default class, which must provision RWX volumes).
    create_workspace_pvc: bool = False
    workspace_storage_class: str | None = None
    workspace_size: str = "100Gi"
    workdir: str = "/workspace"
    config_mount: str = "/etc/flava"  # the effective params.yaml is mounted here from a ConfigMap
    s3_secret: str | None = "flava-s3"  # Secret holding the S3 credentials (keys below)
    s3_secret_keys: list[str] = Field(default_factory=lambda: ["AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"])
    s3_endpoint_url: str | None = None  # e.g. http://minio.flava:9000; None = AWS
    # The pods' MLflow server. None = the launching process's resolved tracking URI ($MLFLOW_TRACKING_URI, else
    # tracking.tracking_uri). Under a parent run the pods must log where the parent run is: a value here that
    # differs, or a parent run in a local file store, is refused before anything is submitted.
    mlflow_tracking_uri: str | None = None
    env: dict[str, str] = Field(default_factory=dict)  # extra environment, e.g. NCCL_DEBUG
    overrides: list[str] = Field(default_factory=list)  # `--set` overrides for the pods only (e.g. paths)
    kube_context: str | None = None  # kubeconfig context outside a cluster; in-cluster config inside
    poll_interval_s: float = Field(default=10.0, gt=0)
    wait_timeout_s: float = Field(default=7 * 86400.0 + 3600.0, gt=0)  # the launcher's own limit; then deletes
    # A pod Pending this long (unschedulable, image not pullable, PVC unbound, Secret missing) fails the launch
    # with the reason, and the Job is deleted. Kueue-suspended Jobs have no pods and wait out wait_timeout_s.
    pending_timeout_s: float = Field(default=900.0, gt=0)
    api_retries: int = Field(default=8, ge=0)  # transient API errors (429, 5xx, resets) in a row before failing

    @field_validator("namespace", "name_prefix", "sweep_name_prefix")
    @classmethod
    def _dns_label(cls, value: str, info) -> str:
        if not DNS_LABEL.match(value) or len(value) > 40:
            raise ValueError(
                f"launch.k8s.{info.field_name}={value!r} must be a lowercase RFC 1123 label of at most 40 characters"
            )
        return value

    @field_validator("workdir", "config_mount")
    @classmethod
    def _absolute(cls, value: str, info) -> str:
        if not value.startswith("/"):
            raise ValueError(f"launch.k8s.{info.field_name}={value!r} must be an absolute path")
        return value

    @field_validator("overrides")
    @classmethod
    def _overrides_have_equals(cls, value: list[str]) -> list[str]:
        for item in value:
            if "=" not in item:
                raise ValueError(f"launch.k8s.overrides: {item!r} must look like key.path=value")
        return value

    @model_validator(mode="after")
    def _pvc_to_create(self) -> "K8sConfig":
        if self.create_workspace_pvc and not self.workspace_pvc:
            raise ValueError("launch.k8s.create_workspace_pvc needs launch.k8s.workspace_pvc (the claim's name)")
        return self

    @property
    def procs_per_node(self) -> int:
        return self.nproc_per_node or max(1, self.gpus_per_node)

    @property
    def backoff_limit(self) -> int:
        return self.backoff_limit_per_node * self.nodes


class SearchParam(StrictModel):
    """One dimension of the sweep.

    - ``float`` / ``int``: a params key drawn from ``[low, high]`` (``log``: log-uniformly).
    - ``simplex``: a mapping params key (``data.mixing.ratios``) whose ``parts`` are drawn as a point on the
      probability simplex, uniformly (Dirichlet(1): one exponential draw per part, normalised), so the corpus
      ratios are searched as the shares they are rather than as independent ranges renormalised afterwards.

    - ``categorical``: a params key set to one of ``choices``.

    ``fraction_of`` (``float`` only) makes the drawn value a fraction of another params key: the applied value is
    ``round(fraction * <that key>)`` of whichever config it is applied to, so a warm-up found on short trials keeps
    its share of the steps when the winner is applied to the full joint stage.

    ``when`` makes the param conditional: it is drawn (and applied) only in trials where each named param, a
    ``categorical`` or ``int`` one earlier in the space, drew the given value; elsewhere the config keeps its value.
    Fixed params are not searched: ``trial_overrides`` sets them for every trial.
    """

    key: str
    kind: Literal["float", "int", "simplex", "categorical"] = "float"
    low: float | None = None
    high: float | None = None
    log: bool = False
    parts: list[str] = Field(default_factory=list)
    fraction_of: str | None = None
    choices: list[bool | int | float | str] = Field(default_factory=list)
    when: dict[str, bool | int | float | str] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _range(self) -> "SearchParam":
        where = f"launch.sweep.space[{self.key}]"
        if self.kind == "categorical":
            if len(self.choices) < 2 or len(set(map(repr, self.choices))) != len(self.choices):
                raise ValueError(f"{where}: a categorical needs two or more distinct choices, got {self.choices}")
            if self.low is not None or self.high is not None or self.log or self.fraction_of or self.parts:
                raise ValueError(f"{where}: a categorical takes choices only (no low/high/log/fraction_of/parts)")
            return self
        if self.choices:
            raise ValueError(f"{where}: choices are for kind categorical only")
        if self.kind == "simplex":
            if len(self.parts) < 2 or len(set(self.parts)) != len(self.parts):
                raise ValueError(f"{where}: a simplex needs two or more distinct parts, got {self.parts}")
            if self.low is not None or self.high is not None or self.log or self.fraction_of:
                raise ValueError(f"{where}: a simplex takes parts only (no low/high/log/fraction_of)")
            return self
        if self.parts:
            raise ValueError(f"{where}: parts are for kind simplex only")
        if self.low is None or self.high is None or not self.low < self.high:
            raise ValueError(f"{where}: low ({self.low}) must be below high ({self.high})")
        if self.log and self.low <= 0:
            raise ValueError(f"{where}: a log range needs low > 0")
        if self.kind == "int" and not (float(self.low).is_integer() and float(self.high).is_integer()):
            raise ValueError(f"{where}: an int range needs whole bounds")
        if self.fraction_of and self.kind != "float":
            raise ValueError(f"{where}: fraction_of needs kind float (the fraction is drawn)")
        return self


def _default_space() -> list[SearchParam]:
    return [
        SearchParam(key="data.mixing.ratios", kind="simplex", parts=["pair", "image", "text"]),
        # Warm-up as a share of the joint stage's steps (the paper warms up over ~10 % of its steps).
        SearchParam(key="train.joint.warmup_steps", low=0.0, high=0.3, fraction_of="train.joint.steps"),
    ]


class SweepConfig(StrictModel):
    """Optuna study over the joint stage. Each trial is a short joint run (``trial_overrides``).

    Any number of workers (``workers`` local processes, or several ``flava sweep`` runs on a shared ``storage``)
    cooperate on one study: the budget ``n_trials`` is the study's, each trial samples with its own seed, and a
    trial whose worker stops beating (killed, preempted) is failed after ``grace_s`` and retried with its params.
    """

    study_name: str = "flava-joint"
    # SQLite file (a relative path is under the workspace root, whatever the current directory), or an RDB URL
    # (postgresql://...) shared by workers on several machines; resumes by name.
    storage: str = "reports/sweep/optuna.db"
    # Trials the study runs in all: complete, pruned, or failed by their own params (a diverging run). A trial
    # lost with its worker does not count: it is retried (max_retry) with the same params.
    n_trials: int = Field(default=6, ge=1)
    # Workers on the study: local processes (`flava sweep --workers N`, threads split), or on Kubernetes the
    # pods of the sweep Job (`flava k8s sweep`), one `flava sweep` each.
    workers: int = Field(default=1, ge=1)
    timeout_s: float | None = Field(default=None, gt=0)
    seed: int | None = None  # sampler seed (each worker derives its own); None = the pipeline seed
    n_startup_trials: int = Field(default=3, ge=1)  # random trials before TPE models the history
    direction: Literal["maximize", "minimize"] = "maximize"
    metric: str = "best_zeroshot_top1"  # key of the joint stage's result dict
    space: list[SearchParam] = Field(default_factory=_default_space)
    # Short trials; evaluate zero-shot often enough that every trial reports the metric.
    trial_overrides: list[str] = Field(default_factory=lambda: ["train.joint.steps=60", "train.eval_every=20"])
    # Stop hopeless trials at their zero-shot evaluations: median (of the other trials at the same step) or
    # hyperband (successive halving); none runs every trial to its last step.
    pruner: Literal["none", "median", "hyperband"] = "median"
    prune_after_steps: int = Field(default=20, ge=0)  # never prune before this step (warm-up of the pruner)
    prune_startup_trials: int = Field(default=2, ge=0)  # median: trials that finish before any is pruned
    # What each zero-shot evaluation reports to the pruner (a key of its results: top1, top5, mrr). Early in a
    # trial top-1 sits at chance in steps of 1/rows; the mean reciprocal rank of the true class already moves.
    prune_metric: str = "mrr"
    heartbeat_s: int = Field(default=30, ge=1)  # a running trial records a heartbeat this often
    grace_s: int | None = Field(default=None, ge=1)  # stale after this long without one (None: 2 x heartbeat)
    max_retry: int = Field(default=1, ge=0)  # retries of a trial lost with its worker
    workdir: str = "reports/sweep"  # per-trial models/checkpoints/reports go under here
    keep_trial_models: bool = False
    report: str = "sweep.json"  # written under paths.reports, with plots/ beside it

    @model_validator(mode="after")
    def _unique_keys(self) -> "SweepConfig":
        keys = [p.key for p in self.space]
        dupes = sorted({k for k in keys if keys.count(k) > 1})
        if dupes:
            raise ValueError(f"launch.sweep.space lists {dupes} more than once")
        if not self.space:
            raise ValueError("launch.sweep.space is empty")
        return self


class ScheduleConfig(StrictModel):
    """How the pipeline is operated: the deployment ``python -m flows.serve`` serves (infra/prefect.yaml holds the
    worker deployments, under other names), the workspace-wide concurrency limit and the failure notification."""

    # Not a name in infra/prefect.yaml: a served deployment replacing a worker's loses its pull steps and pool.
    deployment: str = "flava-weekly-serve"
    cron: str = "0 3 * * 1"  # Mondays 03:00
    timezone: str = "UTC"
    sweep: bool = False
    joint_on_k8s: bool = False
    # Prefect global concurrency limit (1 slot, created if missing) every served or deployed run holds.
    concurrency_limit: str = "flava-workspace"
    # Seconds a run (flow or `flava pipeline run`) waits for the workspace lock; 0 = fail at once, null = forever.
    lock_timeout_s: float | None = Field(default=0.0, ge=0)
    # Prefect notification block told when a flow run fails or crashes, as "<block-type-slug>/<name>"
    # (e.g. "slack-webhook/flava-alerts", "custom-webhook/flava-alerts", "email/flava-oncall"); null = none.
    notify_block: str | None = None

    @field_validator("notify_block")
    @classmethod
    def _block_slug(cls, value: str | None) -> str | None:
        if value is not None and value.count("/") != 1:
            raise ValueError(f"launch.schedule.notify_block={value!r} must look like <block-type-slug>/<name>, "
                             "e.g. slack-webhook/flava-alerts")
        return value


class DaskClusterConfig(StrictModel):
    """A Dask cluster on Kubernetes for the data stages (``flava dask up``; :mod:`flava.launch.dask_cluster`): a
    scheduler Deployment + Service and ``workers`` worker pods. Image, namespace, workspace PVC, security context,
    service account and S3 credentials are ``launch.k8s``'s."""

    # Deployments ``{name}-scheduler`` and ``{name}-worker``, Service ``{name}-scheduler``
    name: str = "flava-dask"
    # Worker pods of one single-threaded Dask worker each: the stages' partitions are CPU-bound Python.
    workers: int = Field(default=2, ge=1)
    port: int = Field(default=8786, ge=1, le=65535)  # the scheduler's, as Dask's default
    scheduler_cpu: str = "1"
    scheduler_memory: str = "2Gi"
    worker_cpu: str = "1"  # one thread per worker
    # The container's memory limit; `dask worker` reads it from the cgroup as its own (spills, then pauses, near it).
    worker_memory: str = "4Gi"
    node_selector: dict[str, str] = Field(default_factory=dict)  # e.g. CPU nodes; the GPU toleration is not applied

    @field_validator("name")
    @classmethod
    def _dns_label(cls, value: str) -> str:
        if not DNS_LABEL.match(value) or len(value) > 40:
            raise ValueError(f"launch.dask.name={value!r} must be a lowercase RFC 1123 label of at most 40 characters")
        return value


class LaunchConfig(StrictModel):
    k8s: K8sConfig = Field(default_factory=K8sConfig)
    sweep: SweepConfig = Field(default_factory=SweepConfig)
    dask: DaskClusterConfig = Field(default_factory=DaskClusterConfig)
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig)


def launch_section(cfg) -> LaunchConfig:
    """``cfg.launch`` of a PipelineConfig, checked (the launchers take the whole config, like every stage)."""
    section = getattr(cfg, "launch", None)
    if not isinstance(section, LaunchConfig):
        raise ValueError(f"the config has no launch: section (got {type(section).__name__})")
    return section
