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


class ImageNetConfig(StrictModel):
    """ImageNet-1k in its official folder layout (``<folder>/n01440764/*.JPEG``): zero-shot on ``val``, the linear
    probe trained on ``train`` and tested on ``val``."""

    val: str | None = None  # folder of synset folders; null = ImageNet is not evaluated
    train: str | None = None  # same layout; null = no ImageNet linear probe
    # Synset -> class name: LOC_synset_mapping.txt lines ``n01440764 tench, Tinca tinca``, or JSON, either
    # {synset: name} or Keras' {"0": [synset, name]}. The first comma-separated name is the class name.
    synsets: str | None = None
    # Prompt templates with a '{}' for the class name; null = those of the eval sets' zeroshot/classes.json.
    templates: list[str] | None = None
    # Train images per class the probe encodes (the first in name order); null = all of them.
    probe_train_per_class: int | None = Field(default=None, ge=2)

    @field_validator("templates")
    @classmethod
    def _placeholders(cls, value: list[str] | None) -> list[str] | None:
        if value is not None and (not value or any("{}" not in t for t in value)):
            raise ValueError("eval.benchmarks.imagenet.templates must be a non-empty list of strings with '{}'")
        return value

    @model_validator(mode="after")
    def _needs_synsets(self) -> "ImageNetConfig":
        if self.train is not None and self.val is None:
            raise ValueError("eval.benchmarks.imagenet.train needs eval.benchmarks.imagenet.val (the probe's test)")
        if self.val is not None and self.synsets is None:
            raise ValueError("eval.benchmarks.imagenet.val needs eval.benchmarks.imagenet.synsets, the synset -> "
                             "class-name file (e.g. LOC_synset_mapping.txt)")
        return self


class KarpathyConfig(StrictModel):
    """A Karpathy-split retrieval set: ``dataset_coco.json`` / ``dataset_flickr30k.json`` and its image folder."""

    karpathy_json: str | None = None  # null = this set is not evaluated
    image_root: str | None = None  # images at image_root/[filepath/]filename
    split: Literal["test", "val"] = "test"
    captions_per_image: int = Field(default=5, ge=1)  # the first N captions of each image (COCO has a few with 6-7)

    @model_validator(mode="after")
    def _both(self) -> "KarpathyConfig":
        if (self.karpathy_json is None) != (self.image_root is None):
            raise ValueError("karpathy_json and image_root of a Karpathy retrieval set are set together")
        return self


GLUE_TASK_NAMES = ("cola", "sst2", "mrpc", "qqp", "stsb", "mnli", "qnli", "rte")


class GlueConfig(StrictModel):
    """GLUE from its TSVs as distributed (``<root>/SST-2/{train,dev}.tsv``, ...): fine-tuned on train, scored on dev."""

    root: str | None = None  # null = GLUE is not evaluated
    # Tasks to evaluate; null = every known task whose folder is under root (the others are reported skipped).
    tasks: list[str] | None = None

    @field_validator("tasks")
    @classmethod
    def _known(cls, value: list[str] | None) -> list[str] | None:
        if value is not None:
            unknown = sorted(set(value) - set(GLUE_TASK_NAMES))
            if not value or unknown:
                raise ValueError(f"eval.benchmarks.glue.tasks must name tasks among {list(GLUE_TASK_NAMES)}, "
                                 f"got unknown {unknown}" if unknown else "eval.benchmarks.glue.tasks is empty")
        return value


class VqaV2Config(StrictModel):
    """VQAv2 from the official JSONs: fine-tuned on train2014, scored on val2014 with the VQA accuracy."""

    val_questions: str | None = None  # v2_OpenEnded_mscoco_val2014_questions.json; null = VQAv2 is not evaluated
    val_annotations: str | None = None  # v2_mscoco_val2014_annotations.json
    val_images: str | None = None  # folder of COCO_val2014_%012d.jpg
    train_questions: str | None = None  # the train2014 counterparts; fine-tuning needs them
    train_annotations: str | None = None
    train_images: str | None = None
    # The answer classes: the most frequent train answers (3129 is the usual VQAv2 answer head).
    num_answers: int = Field(default=3129, ge=2)

    @model_validator(mode="after")
    def _triples(self) -> "VqaV2Config":
        for split in ("val", "train"):
            keys = [f"{split}_{part}" for part in ("questions", "annotations", "images")]
            given = [getattr(self, k) is not None for k in keys]
            if any(given) and not all(given):
                raise ValueError(f"eval.benchmarks.vqav2: {', '.join(keys)} are set together")
        return self


class BenchmarksConfig(StrictModel):
    """The paper's benchmarks from local copies in their official layouts; every path null = none is evaluated
    (then metrics.json and the report are those of the evaluation sets alone). Relative paths are taken from the
    working directory."""

    imagenet: ImageNetConfig = Field(default_factory=ImageNetConfig)
    coco: KarpathyConfig = Field(default_factory=KarpathyConfig)
    flickr30k: KarpathyConfig = Field(default_factory=KarpathyConfig)
    glue: GlueConfig = Field(default_factory=GlueConfig)
    vqav2: VqaV2Config = Field(default_factory=VqaV2Config)
    # Share of a benchmark's train split held out (evenly spread; by image for VQAv2, per class for ImageNet) to
    # pick the fine-tune epoch or the probe's C; the official dev/val split is the one reported.
    select_fraction: float = Field(default=0.1, gt=0, lt=1)

    @property
    def configured(self) -> bool:
        """True when any benchmark is set (then every benchmark appears in the metrics, run or skipped)."""
        return any(
            v is not None
            for v in (self.imagenet.val, self.coco.karpathy_json, self.flickr30k.karpathy_json, self.glue.root,
                      self.vqav2.val_questions)
        )


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
    benchmarks: BenchmarksConfig = Field(default_factory=BenchmarksConfig)
    # Report plots.
    plot_dpi: int = Field(default=100, ge=20)
    # Log the evaluated model as an MLflow pyfunc of the evaluate run; the registry version points at it.
    log_model: bool = True
