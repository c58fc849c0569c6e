"""The image tower's convolutional stem (``model.image.stem: conv``): the patch grid the patch convolution gives,
per-sample tokens, seeded initialisation, a round trip through ``flava.model.io``, training through every
objective, FLOPs, and a clear refusal where transformers' FLAVA cannot follow."""
from __future__ import annotations

import pytest
import torch

from flava.model import FlavaForPretraining, preset
from flava.model.encoders import ConvStem
from flava.model.hf import check_transformers_compatible
from flava.model.io import load_model, save_model
from flava.train.config import OptimizerConfig
from flava.train.flops import stem_flops, step_flops
from flava.train.optim import param_groups
from tests.unit.test_model import fixed_batch_losses, make_batch

CONV = {"image": {"stem": "conv", "stem_channels": [16, 32, 64]}}


@pytest.fixture
def cfg():
    return preset("tiny", CONV)


def test_conv_stem_gives_the_patch_grid_and_tokens_that_see_across_patch_borders(cfg):
    model = FlavaForPretraining(cfg)
    assert isinstance(model.image_encoder.patch_embed, ConvStem)
    pixels = torch.randn(2, 3, cfg.image.image_size, cfg.image.image_size, generator=torch.Generator().manual_seed(0))
    tokens = model.image_encoder.patchify(pixels)
    assert tokens.shape == (2, cfg.image.num_patches, cfg.image.hidden_size)
    # overlapping 3x3 windows: a change in the first patch's last pixel column reaches its right-hand neighbour,
    # which the patch convolution (linear in its own patch only) never does
    changed = pixels.clone()
    changed[:, :, :cfg.image.patch_size, cfg.image.patch_size - 1] += 1.0
    moved = (model.image_encoder.patchify(changed) - tokens).abs().amax(dim=-1)  # (B, P)
    assert bool((moved[:, 1] > 0).all())
    patch = FlavaForPretraining(preset("tiny"))
    p_moved = (patch.image_encoder.patchify(changed) - patch.image_encoder.patchify(pixels)).abs().amax(dim=-1)
    assert bool((p_moved[:, 1] == 0).all()) and bool((p_moved[:, 0] > 0).all())


def test_a_samples_tokens_do_not_depend_on_its_batch(cfg):
    """GroupNorm normalises each sample alone (BatchNorm would not): features are batch-size invariant, as the
    zero-shot evaluation and the contrastive loss across ranks assume."""
    model = FlavaForPretraining(cfg).eval()
    pixels = torch.randn(5, 3, cfg.image.image_size, cfg.image.image_size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        together = model.image_features(pixels)
        alone = torch.cat([model.image_features(pixels[i:i + 1]) for i in range(5)])
    torch.testing.assert_close(together, alone, rtol=1e-5, atol=1e-6)


def test_stem_initialisation_is_seeded_and_he_scaled(cfg):
    a, b, other = FlavaForPretraining(cfg, seed=3), FlavaForPretraining(cfg, seed=3), FlavaForPretraining(cfg, seed=4)
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(x, y), name
    first = a.image_encoder.patch_embed[0].weight
    assert not torch.equal(first, other.image_encoder.patch_embed[0].weight)
    fan_in = first.shape[1] * first.shape[2] * first.shape[3]
    assert first.std().item() == pytest.approx((2 / fan_in) ** 0.5, rel=0.25)
    names = {id(p): n for n, p in a.named_parameters()}
    decay, no_decay = param_groups(a, OptimizerConfig(weight_decay=0.05))
    assert "image_encoder.patch_embed.0.weight" in {names[id(p)] for p in decay["params"]}
    assert "image_encoder.patch_embed.1.weight" in {names[id(p)] for p in no_decay["params"]}  # GroupNorm scale


def test_conv_stem_model_round_trips_through_save_and_load(cfg, tmp_path):
    model = FlavaForPretraining(cfg, seed=5)
    save_model(model, tmp_path / "m")
    loaded = load_model(tmp_path / "m")
    assert loaded.config == cfg and loaded.config.image.stem == "conv"
    for (name, x), (_, y) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(x, y), name
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.equal(model.eval().encode_image(pixels), loaded.eval().encode_image(pixels))


def test_every_objective_learns_through_the_conv_stem(cfg):
    model = FlavaForPretraining(cfg, seed=0)
    batches = [make_batch(cfg, kind, batch_size=8, seed=3) for kind in ("pair", "image")]
    batches[0]["itm_labels"] = torch.tensor([1, 0, 1, 1, 0, 1, 1, 1])
    stem_before = model.image_encoder.patch_embed[0].weight.detach().clone()
    first, last = fixed_batch_losses(model, batches)
    assert not torch.equal(stem_before, model.image_encoder.patch_embed[0].weight)
    for name in ("contrastive", "mim", "mmm_image"):
        assert last[name] < 0.75 * first[name], (name, first[name], last[name])


def test_stem_flops_count_each_convolution():
    cfg = preset("small", {"image": {"stem": "conv"}})
    img = cfg.image  # 64 px, stem (32, 64, 128), width 192, 8 x 8 patches
    expected = 2 * (32 * 32 * 27 * 32 + 16 * 16 * 288 * 64 + 8 * 8 * 576 * 128 + 64 * 128 * 192)
    assert stem_flops(img) == expected
    assert stem_flops(preset("small").image) == 2 * 64 * 192 * 192
    batch = {"kind": "image", "pixel_values": torch.zeros(2, 3, 64, 64),
             "image_mask": torch.zeros(2, img.num_patches, dtype=torch.bool)}
    assert step_flops(cfg, batch) - step_flops(preset("small"), batch) == pytest.approx(
        3 * 2 * (expected - 2 * 64 * 192 * 192))


def test_bad_stem_settings_and_transformers_export_are_refused_naming_the_field():
    with pytest.raises(ValueError, match=r"patch_size \(8\) needs 3 entries, got 2"):
        preset("tiny", {"image": {"stem": "conv", "stem_channels": [8, 8]}})
    with pytest.raises(ValueError, match="power-of-two patch_size"):
        preset("tiny", {"image": {"stem": "conv", "image_size": 36, "patch_size": 6}})
    with pytest.raises(ValueError, match="positive widths"):
        preset("tiny", {"image": {"stem": "conv", "stem_channels": [8, 0, 8]}})
    with pytest.raises(ValueError, match=r"image\.stem must be 'patch', got 'conv'"):
        check_transformers_compatible(preset("tiny", CONV))
    check_transformers_compatible(preset("tiny"))  # the default patch stem converts
