"""Typed configuration of evaluation and promotion (``eval:`` in params.yaml).

Defaults are the embedded (synthetic, small) pipeline's values. Each task has its own small section so a real
evaluation set can change, e.g., the probe's regularisation grid without touching the others.
"""
from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from flava.configbase import StrictModel


class ZeroShotConfig(StrictModel):
    """CLIP-style zero-shot classification; prompt templates come from ``zeroshot/classes.json``."""

    enabled: bool = True
    split: Literal["val", "test"] = "test"
    top_k: list[int] = Field(default_factory=lambda: [1, 5])

    @field_validator("top_k")
    @classmethod
    def _positive(cls, value: list[int]) -> list[int]:
        if not value or any(k < 1 for k in value):
            raise ValueError("eval.zeroshot.top_k must be a non-empty list of integers >= 1")
        return sorted(set(value))


class RetrievalConfig(StrictModel):
    """Zero-shot image<->text retrieval, Recall@K with several captions per image (Flickr30K/COCO protocol)."""

    enabled: bool = True
    ks: list[int] = Field(default_factory=lambda: [1, 5, 10])
    # Scoring runs over (query_chunk x key_chunk) blocks with a running top-k, so the full N x 5N similarity
    # matrix never exists; these bound the block to query_chunk * key_chunk floats.
    query_chunk: int = Field(default=1024, ge=1)
    key_chunk: int = Field(default=16384, ge=1)
    # Largest K of the recall curve drawn in the report (also capped by the number of candidates).
    curve_max_k: int = Field(default=20, ge=1)

    @field_validator("ks")
    @classmethod
    def _positive(cls, value: list[int]) -> list[int]:
        if not value or any(k < 1 for k in value):
            raise ValueError("eval.retrieval.ks must be a non-empty list of integers >= 1")
        return sorted(set(value))


class ProbeConfig(StrictModel):
    """Linear probe on frozen image features: L-BFGS logistic regression, C swept on val (paper, Sec. 5)."""

    enabled: bool = True
    # Inverse L2 strength C of sklearn's LogisticRegression, swept on the validation split.
    c_grid: list[float] = Field(default_factory=lambda: [0.01, 0.1, 1.0, 10.0, 100.0])
    max_iter: int = Field(default=1000, ge=1)
    standardize: bool = True  # z-score features with train statistics (helps L-BFGS converge)
    refit_on_train_val: bool = True  # after the sweep, refit the chosen C on train+val before testing
    # BLAS threads for the L-BFGS fits. The probe's matrices are too small to gain from more threads, and on a busy
    # machine extra threads oversubscribe the cores and slow the sweep down many times over (figures:
    # benchmarks/README.md, "Figures cited by the code").
    blas_threads: int = Field(default=1, ge=1)

    @field_validator("c_grid")
    @classmethod
    def _positive(cls, value: list[float]) -> list[float]:
        if not value or any(c <= 0 for c in value):
            raise ValueError("eval.probe.c_grid must be a non-empty list of positive numbers")
        return value


class FinetuneConfig(StrictModel):
    """A head fine-tuned together with a copy of the encoder; the best epoch on val is tested."""

    enabled: bool = True
    epochs: int = Field(default=3, ge=1)
    batch_size: int = Field(default=32, ge=1)
    lr: float = Field(default=1e-4, gt=0)
    head_lr: float = Field(default=1e-3, gt=0)
    weight_decay: float = Field(default=0.01, ge=0)
    dropout: float = Field(default=0.1, ge=0, lt=1)


class TextFinetuneConfig(FinetuneConfig):
    """GLUE-style text classification (or regression) on the text encoder's CLS."""

    task: Literal["auto", "classification", "regression"] = "auto"


class MultimodalFinetuneConfig(FinetuneConfig):
    """VQA-style closed-answer classification on the multimodal CLS."""


class RegistryConfig(StrictModel):
    """MLflow Model Registry and the promotion gate against ``@champion``."""

    model_name: str = "flava"
    # Pass iff overall macro >= champion overall + margin (and strictly above it) AND no domain macro < champion's
    # - domain_tolerance.
    margin: float = Field(default=0.01, ge=0)  # a retrain that scores about the same does not replace the champion
    domain_tolerance: float = Field(default=0.02, ge=0)
    # First model: champion iff it beats the chance baselines by more than chance_margin (+ chance_tolerance) --
    # on every task ("every_task") or on the overall macro average of tasks vs baselines ("macro").
    chance_rule: Literal["every_task", "macro"] = "every_task"
    chance_margin: float = Field(default=0.0, ge=0)
    # "Above chance" is strict: score > chance + chance_margin + chance_tolerance. Scores are float32, so a score
    # exactly at chance can exceed the float64 baseline by rounding (0.026666667 vs 0.02666666666666667); the
    # tolerance absorbs that for scores in [0, 1] (float32 spacing there is <= 6e-8).
    chance_tolerance: float = Field(default=1e-6, ge=0)
    # Under `dvc exp run` ($DVC_EXP_NAME set) `flava promote` registers and promotes in the shared registry only
    # when this is true; otherwise promotion.json says "skipped" and why.
    register_experiments: bool = False
    lock_timeout_s: float = Field(default=120.0, gt=0)
    # Team mode: the PostgreSQL database where promotions are serialised by an advisory lock (e.g. the tracking
    # server's own, postgresql+psycopg://user@host:5432/mlflow); every promoter must name the same database.
    # Null: the tracking store's own database when it is PostgreSQL, a lock file beside it when it is the embedded
    # sqlite file; promoting through a tracking server (http) then fails, asking for this key.
    lock_uri: str | None = None
    champion_alias: str = "champion"
    challenger_alias: str = "challenger"
    previous_alias: str = "previous"

    @field_validator("lock_uri")
    @classmethod
    def _postgresql(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("postgresql://", "postgresql+")):
            raise ValueError(f"eval.registry.lock_uri must be a PostgreSQL URL (postgresql://user@host:port/db or "
                             f"postgresql+psycopg://...), got {value!r}")
        return value

    @model_validator(mode="after")
    def _distinct_aliases(self) -> "RegistryConfig":
        aliases = {self.champion_alias, self.challenger_alias, self.previous_alias}
        if len(aliases) != 3:
            raise ValueError("eval.registry aliases champion/challenger/previous must be distinct")
        return self


class EvalConfig(StrictModel):
    """The ``eval:`` section: shared knobs plus one section per task and the registry gate."""

    device: str = "auto"  # "auto" = cuda when available, else cpu
    batch_size: int = Field(default=64, ge=1)  # feature extraction batch size
    zeroshot: ZeroShotConfig = Field(default_factory=ZeroShotConfig)
    retrieval: RetrievalConfig = Field(default_factory=RetrievalConfig)
    probe: ProbeConfig = Field(default_factory=ProbeConfig)
    text_finetune: TextFinetuneConfig = Field(default_factory=TextFinetuneConfig)
    multimodal_finetune: MultimodalFinetuneConfig = Field(default_factory=MultimodalFinetuneConfig)
    registry: RegistryConfig = Field(default_factory=RegistryConfig)
    # Report plots.
    plot_dpi: int = Field(default=100, ge=20)
    # Log the evaluated model as an MLflow pyfunc of the evaluate run; the registry version points at it.
    log_model: bool = True
