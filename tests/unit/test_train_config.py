"""The train section: defaults are the small embedded recipe, the base preset is the paper's, overrides win."""
import pytest
from pydantic import ValidationError

from flava.config import PipelineConfig, load_config
from flava.train.config import TRAIN_PRESETS, TrainConfig


def test_defaults_are_small_and_round_trip():
    cfg = TrainConfig()
    assert cfg.preset == "small"
    assert cfg.joint.init_from_unimodal is True
    assert cfg.precision == "fp32" and cfg.strategy == "ddp" and cfg.on_nonfinite == "stop"
    assert TrainConfig.model_validate(cfg.model_dump(mode="json")) == cfg


def test_base_preset_is_the_paper_recipe():
    cfg = TrainConfig.model_validate({"preset": "base"})
    assert cfg.joint.batch_size == 8192
    assert cfg.optimizer.lr == 1e-3 and cfg.optimizer.weight_decay == 0.1
    assert cfg.schedule.warmup_steps == 10_000
    assert cfg.stage_lr("joint") == 1e-3 and cfg.stage_warmup("joint") == 10_000


def test_fields_override_the_preset_and_partial_stage_keeps_the_rest():
    cfg = TrainConfig.model_validate({"preset": "base", "joint": {"steps": 7}, "optimizer": {"lr": 3e-4}})
    assert cfg.joint.steps == 7 and cfg.joint.batch_size == 8192
    assert cfg.optimizer.lr == 3e-4 and cfg.optimizer.weight_decay == 0.1
    small = TrainConfig.model_validate({"text": {"steps": 5}})
    assert small.text.batch_size == TRAIN_PRESETS["small"]["text"]["batch_size"]


def test_stage_overrides_of_lr_and_warmup():
    cfg = TrainConfig.model_validate({"text": {"lr": 5e-4, "warmup_steps": 3}})
    assert cfg.stage_lr("text") == 5e-4 and cfg.stage_warmup("text") == 3
    assert cfg.stage_lr("image") == cfg.optimizer.lr


@pytest.mark.parametrize(
    "tree, field",
    [
        ({"preset": "huge"}, "train.preset"),
        ({"precision": "fp8"}, "precision"),
        ({"optimizer": {"betas": [0.9, 1.5]}}, "optimizer.betas"),
        ({"joint": {"steps": 0}}, "steps"),
        ({"nonsense": 1}, "nonsense"),
        ({"strategy": "zero3"}, "strategy"),
    ],
)
def test_bad_values_are_rejected_naming_the_field(tree, field):
    with pytest.raises(ValidationError, match=field.replace(".", r"\.")):
        TrainConfig.model_validate(tree)
    with pytest.raises(ValueError):
        TrainConfig.model_validate(tree)


def test_unknown_stage_name():
    with pytest.raises(ValueError, match="stage must be one of"):
        TrainConfig().stage("audio")


def test_overrides_through_the_pipeline_config(project_root):
    cfg = load_config(project_root / "params.yaml", ["train.preset=base", "train.joint.steps=12"])
    assert isinstance(cfg, PipelineConfig)
    assert cfg.train.joint.steps == 12 and cfg.train.joint.batch_size == 8192
    assert cfg.flat()["train.optimizer.weight_decay"] == 0.1
