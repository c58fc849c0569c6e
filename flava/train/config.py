"""Typed configuration of the training stages (``train:`` in params.yaml).

Field defaults are the embedded pipeline's values: a small run that finishes in a few CPU minutes and learns.
``train.preset`` picks a named recipe whose values sit under any field given explicitly, so

    train:
      preset: base            # the paper's recipe: global batch 8192, lr 1e-3, wd 0.1, 10,000 warm-up steps
      joint: {steps: 2000}    # any field still overrides the preset

is enough to switch recipes. The preset is resolved when the section is parsed, so the dumped (effective) config
spells out every value and re-parses to the same object.
"""
from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from flava.configbase import StrictModel, deep_merge

Stage = Literal["text", "image", "joint"]
STAGES: tuple[str, ...] = ("text", "image", "joint")


class OptimizerConfig(StrictModel):
    """AdamW. Parameters whose name contains one of ``no_decay`` (or that are 1-D: biases, norm scales) get no
    weight decay."""

    lr: float = Field(1e-3, gt=0)
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = Field(1e-8, gt=0)
    weight_decay: float = Field(0.01, ge=0)
    fused: bool | None = None  # None: fused kernels where the device has them (CUDA, CPU, ...), foreach otherwise
    no_decay: list[str] = Field(
        default_factory=lambda: ["bias", "norm", "cls_token", "position", "mask_token", "logit_scale"]
    )

    @field_validator("betas")
    @classmethod
    def _betas_in_range(cls, value: tuple[float, float]) -> tuple[float, float]:
        if not all(0.0 <= b < 1.0 for b in value):
            raise ValueError(f"optimizer.betas must lie in [0, 1), got {value}")
        return value


class ScheduleConfig(StrictModel):
    """Linear warm-up from ~0 to the peak lr, then decay to ``min_lr_ratio * lr`` at the stage's last step."""

    warmup_steps: int = Field(20, ge=0)
    decay: Literal["cosine", "linear", "constant"] = "cosine"
    min_lr_ratio: float = Field(0.1, ge=0, le=1)


class StageSettings(StrictModel):
    """Per-stage length and batch. ``batch_size`` is global: split over ranks and accumulation micro-steps."""

    steps: int = Field(gt=0)
    batch_size: int = Field(gt=0)
    lr: float | None = Field(None, gt=0)  # overrides optimizer.lr for this stage
    warmup_steps: int | None = Field(None, ge=0)  # overrides schedule.warmup_steps for this stage


class JointSettings(StageSettings):
    init_from_unimodal: bool = True  # False: the whole model from scratch (an ablation of the paper's recipe)
    # A pretrained checkpoint directory (a transformers FLAVA ``save_pretrained`` dir, e.g. facebook/flava-full, or
    # a flava.model.io dir) the whole joint model starts from. When set it takes precedence: the unimodal models
    # are not read, whatever init_from_unimodal says. Its shapes must match the model config (see README).
    init_from: str | None = None


class TrainConfig(StrictModel):
    preset: Literal["small", "base"] = "small"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig)
    grad_clip: float | None = Field(1.0, gt=0)  # max global grad norm; None disables clipping
    accumulation: int = Field(1, ge=1)  # micro-steps per optimizer step
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"  # fp16 uses a GradScaler
    activation_checkpointing: bool = False
    compile: bool = False
    strategy: Literal["ddp", "fsdp"] = "ddp"
    deterministic: bool = False  # torch.use_deterministic_algorithms; bitwise resume on CPU holds without it
    on_nonfinite: Literal["stop", "skip"] = "stop"
    max_consecutive_skips: int = Field(10, ge=1)  # with on_nonfinite=skip: give up after this many in a row
    log_every: int = Field(10, ge=1)
    eval_every: int = Field(50, ge=1)  # joint stage: zero-shot evaluation on the validation split
    eval_batch_size: int = Field(64, ge=1)
    checkpoint_every: int = Field(50, ge=1)
    keep_last: int = Field(2, ge=1)  # complete checkpoints kept besides the best one
    peak_tflops: float | None = Field(None, gt=0)  # device peak for MFU; None: looked up from the GPU name
    text: StageSettings = Field(default_factory=lambda: StageSettings(**TRAIN_PRESETS["small"]["text"]))
    image: StageSettings = Field(default_factory=lambda: StageSettings(**TRAIN_PRESETS["small"]["image"]))
    joint: JointSettings = Field(default_factory=lambda: JointSettings(**TRAIN_PRESETS["small"]["joint"]))

    @model_validator(mode="before")
    @classmethod
    def _apply_preset(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        name = data.get("preset", "small")
        if name not in TRAIN_PRESETS:
            raise ValueError(f"train.preset must be one of {sorted(TRAIN_PRESETS)}, got {name!r}")
        return deep_merge(TRAIN_PRESETS[name], data)

    def stage(self, name: str) -> StageSettings:
        if name not in STAGES:
            raise ValueError(f"stage must be one of {STAGES}, got {name!r}")
        return getattr(self, name)

    def stage_lr(self, name: str) -> float:
        return self.stage(name).lr or self.optimizer.lr

    def stage_warmup(self, name: str) -> int:
        warmup = self.stage(name).warmup_steps
        return self.schedule.warmup_steps if warmup is None else warmup


# Named recipes, as partial ``train:`` trees laid under the user's values. ``small`` holds the per-stage defaults
# (so ``joint: {steps: 50}`` keeps the preset's batch size); its other values are the field defaults.
TRAIN_PRESETS: dict[str, dict[str, Any]] = {
    "small": {
        "text": {"steps": 150, "batch_size": 32},
        "image": {"steps": 150, "batch_size": 32},
        "joint": {"steps": 300, "batch_size": 32},
    },
    # Singh et al. 2022, Sec. 4 / App.: AdamW, global batch 8192, peak lr 1e-3, weight decay 0.1, 10,000 warm-up
    # steps, mixed precision. Steps follow torchmultimodal's FLAVA example (450k joint).
    "base": {
        "optimizer": {"lr": 1e-3, "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": 0.1},
        "schedule": {"warmup_steps": 10_000, "decay": "cosine", "min_lr_ratio": 0.0},
        "precision": "bf16",
        "grad_clip": 1.0,
        "log_every": 50,
        "eval_every": 5_000,
        "eval_batch_size": 256,
        "checkpoint_every": 5_000,
        "keep_last": 3,
        "text": {"steps": 100_000, "batch_size": 8192},
        "image": {"steps": 100_000, "batch_size": 8192},
        "joint": {"steps": 450_000, "batch_size": 8192},
    },
}
