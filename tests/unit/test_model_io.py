"""flava.model.io: a saved model reloads bit for bit, codebook included; bad directories fail clearly."""
from __future__ import annotations

import json

import pytest
import torch

from flava.model import FlavaForPretraining, preset
from flava.model.codebook import KMeansCodebook
from flava.model.io import load_model, save_model


def test_save_load_roundtrip_with_codebook(tmp_path):
    cfg = preset("tiny", {"codebook_size": 8, "loss": {"itm": 0.5}})
    images = torch.randn(4, 3, 32, 32)
    codebook = KMeansCodebook.fit(images, num_codes=8, patch_size=8, iters=3, seed=0)
    model = FlavaForPretraining(cfg, codebook=codebook)
    with torch.no_grad():
        model.logit_scale.fill_(3.0)
    save_model(model, tmp_path / "m")
    assert {p.name for p in (tmp_path / "m").iterdir()} == {"model.safetensors", "config.json", "codebook"}
    loaded = load_model(tmp_path / "m")
    assert loaded.config == cfg
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name
    assert torch.equal(loaded.codebook(images), codebook(images))
    with torch.no_grad():
        assert torch.equal(model.eval().encode_image(images), loaded.eval().encode_image(images))


def test_load_with_overrides_and_without_codebook(tmp_path):
    model = FlavaForPretraining(preset("tiny"))
    save_model(model, tmp_path / "m")
    eager = load_model(tmp_path / "m", config_overrides={"attention": "eager"})
    assert eager.config.attention == "eager" and eager.codebook is None
    with pytest.raises(ValueError, match="wrong shape"):
        load_model(tmp_path / "m", config_overrides={"projection_dim": 8})


def test_load_rejects_foreign_or_incomplete_directories(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_model(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(ValueError, match="format"):
        load_model(tmp_path)


def test_saving_a_wrapped_model_saves_the_inner_one(tmp_path):
    model = FlavaForPretraining(preset("tiny"))

    class Wrapper(torch.nn.Module):  # what DDP looks like from the outside
        def __init__(self, module):
            super().__init__()
            self.module = module

    save_model(Wrapper(model), tmp_path / "m")
    assert torch.equal(load_model(tmp_path / "m").logit_scale, model.logit_scale)
