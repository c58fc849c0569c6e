"""Typed configuration of the launchers (``launch:`` in params.yaml).

``launch.k8s`` describes the Kubernetes Job that runs the joint stage under ``torchrun`` on GPU nodes,
``launch.sweep`` the Optuna study over the joint sampling ratios and warm-up, ``launch.schedule`` the Prefect deployment schedule.
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
    """One Indexed Job (one pod per node) + a headless Service for the torchrun rendezvous."""

    namespace: str = "flava"
    name_prefix: str = "flava-joint"  # Job/Service/ConfigMap names are ``{name_prefix}-{run id}``
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
    rdzv_port: int = Field(default=29500, ge=1, le=65535)
    max_restarts: int = Field(default=3, ge=0)  # torchrun restarts of the worker group inside the pods
    backoff_limit: int = Field(default=4, ge=0)  # failed pods the Job tolerates (preemptions are not counted)
    active_deadline_s: int | None = Field(default=None, ge=1)
    ttl_after_finished_s: int | None = Field(default=86400, ge=0)
    # The workspace (data, models, checkpoints) lives on this PVC so a replacement pod resumes from
    # ``paths.checkpoints``. None = an emptyDir: outputs and checkpoints die with the pod.
    workspace_pvc: str | None = "flava-workspace"
    workdir: str = "/workspace"
    config_mount: str = "/etc/flava"  # the effective params.yaml is mounted here from a ConfigMap
    s3_secret: str | None = "flava-s3"  # Secret holding the S3 credentials (keys below)
    s3_secret_keys: list[str] = Field(default_factory=lambda: ["AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"])
    s3_endpoint_url: str | None = None  # e.g. http://minio.flava:9000; None = AWS
    mlflow_tracking_uri: str | None = "http://mlflow.flava:5000"  # None = the config's tracking.tracking_uri
    env: dict[str, str] = Field(default_factory=dict)  # extra environment, e.g. NCCL_DEBUG
    overrides: list[str] = Field(default_factory=list)  # `--set` overrides for the pods only (e.g. paths)
    kube_context: str | None = None  # kubeconfig context outside a cluster; in-cluster config inside
    poll_interval_s: float = Field(default=10.0, gt=0)
    wait_timeout_s: float = Field(default=7 * 86400.0, gt=0)

    @field_validator("namespace", "name_prefix")
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

    @property
    def procs_per_node(self) -> int:
        return self.nproc_per_node or max(1, self.gpus_per_node)


class SearchParam(StrictModel):
    """One dimension of the sweep: a params key (``data.mixing....``, ``train....warmup...``) and its range."""

    key: str
    low: float
    high: float
    kind: Literal["float", "int"] = "float"
    log: bool = False

    @model_validator(mode="after")
    def _range(self) -> "SearchParam":
        if not self.low < self.high:
            raise ValueError(f"launch.sweep.space[{self.key}]: low ({self.low}) must be below high ({self.high})")
        if self.log and self.low <= 0:
            raise ValueError(f"launch.sweep.space[{self.key}]: a log range needs low > 0")
        if self.kind == "int" and not (float(self.low).is_integer() and float(self.high).is_integer()):
            raise ValueError(f"launch.sweep.space[{self.key}]: an int range needs whole bounds")
        return self


def _default_space() -> list[SearchParam]:
    return [
        # Unnormalised weights: the corpus mixer divides by their sum.
        SearchParam(key="data.mixing.ratios.pair", low=0.2, high=1.0),
        SearchParam(key="data.mixing.ratios.image", low=0.05, high=0.5),
        SearchParam(key="data.mixing.ratios.text", low=0.05, high=0.5),
        SearchParam(key="train.joint.warmup_steps", low=0, high=20, kind="int"),
    ]


class SweepConfig(StrictModel):
    """Optuna study over the joint stage. Each trial is a short joint run (``trial_overrides``)."""

    study_name: str = "flava-joint"
    storage: str = "reports/sweep/optuna.db"  # SQLite file; the study resumes by name from it
    n_trials: int = Field(default=6, ge=1)  # total completed trials wanted (a resumed study runs the rest)
    timeout_s: float | None = Field(default=None, gt=0)
    seed: int | None = None  # TPE seed; None = the pipeline seed
    n_startup_trials: int = Field(default=3, ge=1)  # random trials before TPE models the history
    direction: Literal["maximize", "minimize"] = "maximize"
    metric: str = "best_zeroshot_top1"  # key of the joint stage's result dict
    space: list[SearchParam] = Field(default_factory=_default_space)
    # Short trials; evaluate zero-shot often enough that every trial reports the metric.
    trial_overrides: list[str] = Field(default_factory=lambda: ["train.joint.steps=60", "train.eval_every=20"])
    workdir: str = "reports/sweep"  # per-trial models/checkpoints/reports go under here
    keep_trial_models: bool = False
    report: str = "sweep.json"  # written under paths.reports

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


class LaunchConfig(StrictModel):
    k8s: K8sConfig = Field(default_factory=K8sConfig)
    sweep: SweepConfig = Field(default_factory=SweepConfig)
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig)


def launch_section(cfg) -> LaunchConfig:
    """``cfg.launch`` of a PipelineConfig, checked (the launchers take the whole config, like every stage)."""
    section = getattr(cfg, "launch", None)
    if not isinstance(section, LaunchConfig):
        raise ValueError(f"the config has no launch: section (got {type(section).__name__})")
    return section
