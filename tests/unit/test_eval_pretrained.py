"""The image preprocessing a pretrained checkpoint is evaluated with: its processor's normalisation and filter,
from either file ``save_pretrained`` writes; a size that disagrees with the model is refused."""
from __future__ import annotations

import json

import pytest

from flava.config import PipelineConfig
from flava.eval.pretrained import checkpoint_transform

CLIP_MEAN, CLIP_STD = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]


def test_hub_layout_preprocessor_config_gives_normalisation_and_filter(tmp_path):
    # facebook/flava-full's preprocessor_config.json (abridged): flat, sizes as ints or dicts, PIL filter numbers
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "FlavaImageProcessor", "do_resize": True, "size": {"height": 224, "width": 224},
        "do_center_crop": True, "crop_size": 224, "resample": 2, "do_normalize": True,
        "image_mean": CLIP_MEAN, "image_std": CLIP_STD}))
    transform = checkpoint_transform(tmp_path, 224, PipelineConfig())
    assert list(transform.mean) == pytest.approx(CLIP_MEAN) and list(transform.std) == pytest.approx(CLIP_STD)
    assert transform.resample == "bilinear" and transform.size == 224


def test_processor_config_of_transformers_5_and_a_size_mismatch(tmp_path):
    (tmp_path / "processor_config.json").write_text(json.dumps({"image_processor": {
        "crop_size": {"height": 32, "width": 32}, "do_center_crop": True, "resample": 3,
        "image_mean": [0.5, 0.4, 0.3], "image_std": [0.2, 0.3, 0.25]}}))
    assert list(checkpoint_transform(tmp_path, 32, PipelineConfig()).mean) == pytest.approx([0.5, 0.4, 0.3])
    with pytest.raises(ValueError, match="makes 32-pixel images, the model takes 64"):
        checkpoint_transform(tmp_path, 64, PipelineConfig())


def test_without_processor_settings_the_pipeline_normalisation_is_used(tmp_path):
    cfg = PipelineConfig()
    transform = checkpoint_transform(tmp_path, 32, cfg)
    assert list(transform.mean) == pytest.approx(list(cfg.data.loader.mean))
