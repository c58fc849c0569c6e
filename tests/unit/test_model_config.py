"""Model configs: presets validate and mean what they say; overrides and fixed values apply; errors name fields."""
from pathlib import Path

import pytest

from flava.config import load_config
from flava.model.config import FlavaConfig, ModelSection, preset

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("name", ["tiny", "small", "base"])
def test_every_preset_validates(name):
    cfg = preset(name)
    assert isinstance(cfg, FlavaConfig)
    assert cfg.attention == "sdpa"
    assert cfg.image.image_size % cfg.image.patch_size == 0


def test_base_preset_is_the_papers_flava():
    cfg = preset("base")
    assert (cfg.image.image_size, cfg.image.patch_size, cfg.image.num_patches) == (224, 16, 196)
    assert (cfg.image.num_layers, cfg.text.num_layers, cfg.multimodal.num_layers) == (12, 12, 6)
    for tower in (cfg.image, cfg.text, cfg.multimodal):
        assert (tower.hidden_size, tower.num_heads, tower.intermediate_size) == (768, 12, 3072)
    assert (cfg.text.vocab_size, cfg.codebook_size) == (30522, 8192)


def test_small_preset_is_the_embedded_default():
    cfg = ModelSection().build()
    assert (cfg.image.image_size, cfg.image.patch_size, cfg.image.hidden_size) == (64, 8, 192)
    assert (cfg.image.num_layers, cfg.text.num_layers, cfg.multimodal.num_layers) == (4, 4, 2)


def test_build_applies_nested_overrides_and_fixed_values():
    section = ModelSection(preset="tiny", overrides={"image": {"num_layers": 3}, "loss": {"itm": 0.0}})
    cfg = section.build(vocab_size=123, codebook_size=77)
    assert cfg.image.num_layers == 3 and cfg.image.hidden_size == 32  # sibling fields kept
    assert cfg.loss.itm == 0.0 and cfg.loss.mim == 1.0
    assert cfg.text.vocab_size == 123 and cfg.codebook_size == 77
    assert section.build().text.vocab_size == preset("tiny").text.vocab_size


def test_unknown_override_names_the_field():
    with pytest.raises(ValueError, match=r"image\.hiden_size"):
        ModelSection(preset="tiny", overrides={"image": {"hiden_size": 64}})


def test_heads_must_divide_width_and_patch_must_tile_image():
    with pytest.raises(ValueError, match="hidden_size.*num_heads"):
        preset("tiny", {"text": {"hidden_size": 30, "num_heads": 4}})
    with pytest.raises(ValueError, match="patch_size"):
        preset("tiny", {"image": {"image_size": 30}})
    with pytest.raises(ValueError, match="logit_scale_init"):
        preset("tiny", {"logit_scale_init": 9.0})
    with pytest.raises(ValueError, match=r"loss\.mim"):
        preset("tiny", {"loss": {"mim": -1}})


def test_unknown_preset_is_rejected():
    with pytest.raises(ValueError, match="huge"):
        preset("huge")
    with pytest.raises(ValueError, match="preset"):
        ModelSection(preset="huge")


def test_params_yaml_model_section_rejects_bad_override_naming_it():
    cfg = load_config(ROOT / "params.yaml")
    assert isinstance(cfg.model.resolved, FlavaConfig)
    with pytest.raises(ValueError, match="num_heads"):
        load_config(ROOT / "params.yaml", ["model.overrides.text.num_heads=7"])


def test_model_section_is_resolved_once_at_parse_time_into_a_typed_config():
    section = ModelSection(preset="tiny", overrides={"image": {"image_size": 48}})
    resolved = section.resolved
    assert isinstance(resolved, FlavaConfig)
    assert (resolved.image.image_size, resolved.image.patch_size) == (48, 8)
    resolved.image.image_size = 1  # a reader's copy: the section is unchanged
    assert section.resolved.image.image_size == 48
    assert section.build() == section.resolved


def test_text_length_beyond_the_model_positions_fails_at_load_naming_both_keys():
    with pytest.raises(ValueError, match=r"data\.tokenizer\.max_length \(80\).*text positions \(64"):
        load_config(ROOT / "params.yaml", ["data.tokenizer.max_length=80"])
    cfg = load_config(ROOT / "params.yaml", ["data.tokenizer.max_length=80",
                                               "model.overrides.text.max_position_embeddings=80"])
    assert cfg.model.resolved.text.max_position_embeddings == 80
