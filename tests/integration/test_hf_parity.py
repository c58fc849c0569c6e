"""Our FLAVA against transformers' FlavaForPreTraining, the numerical oracle.

A small random transformers model (every tensor perturbed so that biases, norms, CLS/mask tokens and positions
all matter) is converted to ours; embeddings and every loss must agree with transformers' own forward pass on the
same inputs, masks and labels to 1e-4 in fp32, with both of our attention kernels. Conversions round-trip.
"""
from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from flava.model import FlavaForPretraining, preset  # noqa: E402
from flava.model.codebook import DalleCodebook  # noqa: E402
from flava.model.hf import (  # noqa: E402
    HF_ONLY_PREFIXES,
    from_transformers,
    from_transformers_state_dict,
    load_transformers_checkpoint,
    to_transformers,
    to_transformers_state_dict,
)

ATOL = 1e-4
WIDTH, HEADS, MLP = 32, 4, 64
IMAGE, PATCH, CODES, VOCAB, LENGTH, BATCH = 32, 8, 48, 80, 10, 6


def hf_config(**weights) -> "transformers.FlavaConfig":
    tower = dict(hidden_size=WIDTH, num_attention_heads=HEADS, intermediate_size=MLP)
    return transformers.FlavaConfig(
        image_config=dict(tower, num_hidden_layers=2, image_size=IMAGE, patch_size=PATCH, vocab_size=CODES),
        text_config=dict(tower, num_hidden_layers=2, vocab_size=VOCAB, max_position_embeddings=16),
        multimodal_config=dict(tower, num_hidden_layers=2),
        image_codebook_config=dict(hidden_size=8, vocab_size=CODES, num_blocks_per_group=1),
        hidden_size=WIDTH, projection_dim=24, **weights,
    )


def random_hf_model(seed: int = 0, **weights):
    torch.manual_seed(seed)
    model = transformers.FlavaForPreTraining(hf_config(**weights)).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("logit_scale"):
                continue
            # transformers initialises biases/positions/tokens to 0 and norms to 1: make every tensor matter
            param.add_(0.05 * torch.randn_like(param) if "codebook" not in name else 0.02 * torch.randn_like(param))
    return model


def make_inputs(seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, VOCAB, (BATCH, LENGTH), generator=g)
    attention = torch.ones(BATCH, LENGTH, dtype=torch.long)
    attention[1, 6:] = 0
    attention[4, 8:] = 0
    ids[attention == 0] = 0
    mlm_labels = torch.full_like(ids, -100)
    positions = torch.rand(BATCH, LENGTH, generator=g) < 0.3
    positions[:, 0] = False
    positions &= attention.bool()
    positions[:, 1] = True  # at least one masked token per row
    mlm_labels[positions] = ids[positions]
    masked = ids.clone()
    masked[positions] = 3
    patches = (IMAGE // PATCH) ** 2
    image_mask = torch.rand(BATCH, patches, generator=g) < 0.4
    image_mask[:, 0] = True
    return {
        "pixel_values": torch.randn(BATCH, 3, IMAGE, IMAGE, generator=g),
        "codebook_pixel_values": torch.rand(BATCH, 3, IMAGE, IMAGE, generator=g),
        "input_ids": ids,
        "input_ids_masked": masked,
        "attention_mask": attention,
        "mlm_labels": mlm_labels,
        "image_mask": image_mask,
        "mim_labels": torch.randint(0, CODES, (BATCH, patches), generator=g),
        "itm_labels": torch.tensor([1, 0, 1, 1, 0, 1]),
    }


def hf_losses(hf, **kwargs) -> dict[str, float]:
    kwargs = {k: v.clone() for k, v in kwargs.items()}  # transformers writes into its label tensors
    if "image_mask" in kwargs:
        kwargs["bool_masked_pos"] = kwargs.pop("image_mask")
    with torch.no_grad():
        out = hf(**kwargs, return_loss=True)
    info = out.loss_info
    names = {"mim": info.mim, "mlm": info.mlm, "itm": info.itm, "contrastive": info.global_contrastive,
             "mmm_image": info.mmm_image, "mmm_text": info.mmm_text}
    return {k: v for k, v in names.items() if v is not None}, out


def our_losses(model, kind, inputs, **pick) -> dict[str, torch.Tensor]:
    batch = {"kind": kind, **{k: inputs[k] for k in pick["keys"]}}
    with torch.no_grad():
        return model(batch).losses


def assert_losses_match(ours: dict, theirs: dict, weights: dict | None = None) -> None:
    assert set(ours) == set(theirs), (set(ours), set(theirs))
    for name in ours:
        weight = (weights or {}).get(name, 1.0)
        assert torch.allclose(ours[name] * weight, theirs[name], atol=ATOL, rtol=0), (name, ours[name], theirs[name])


@pytest.fixture(scope="module")
def hf():
    return random_hf_model()


@pytest.fixture(scope="module", params=["sdpa", "eager"])
def ours(request, hf):
    return from_transformers(hf, attention=request.param).eval()


@pytest.fixture(scope="module")
def inputs():
    return make_inputs()


def test_embeddings_match(hf, ours, inputs):
    pix, ids, mask = inputs["pixel_values"], inputs["input_ids"], inputs["attention_mask"]
    with torch.no_grad():
        out = hf.flava(input_ids=ids, pixel_values=pix, attention_mask=mask)
        image = ours.image_encoder(pix).hidden
        text = ours.text_encoder(ids, mask).hidden
        fused = ours.fuse(pix, ids, mask).hidden
        assert torch.allclose(image, out.image_embeddings, atol=ATOL)
        assert torch.allclose(text, out.text_embeddings, atol=ATOL)
        assert torch.allclose(fused, out.multimodal_embeddings, atol=ATOL)
        # contrastive projections of the CLS states
        hf_image = hf.flava.get_image_features(pixel_values=pix).pooler_output[:, 0]
        hf_text = hf.flava.get_text_features(input_ids=ids, attention_mask=mask).pooler_output[:, 0]
        assert torch.allclose(ours.image_projection(ours.image_features(pix)), hf_image, atol=ATOL)
        assert torch.allclose(ours.text_projection(ours.text_features(ids, mask)), hf_text, atol=ATOL)


def test_mim_loss_matches_with_given_labels_and_with_the_codebook(hf, ours, inputs):
    theirs, _ = hf_losses(hf, pixel_values=inputs["pixel_values"], image_mask=inputs["image_mask"],
                          mim_labels=inputs["mim_labels"])
    assert_losses_match(our_losses(ours, "image", inputs, keys=["pixel_values", "image_mask", "mim_labels"]), theirs)
    # MIM targets from the (converted) DALL-E codebook on codebook_pixel_values
    assert isinstance(ours.codebook, DalleCodebook)
    theirs, _ = hf_losses(hf, pixel_values=inputs["pixel_values"], image_mask=inputs["image_mask"],
                          codebook_pixel_values=inputs["codebook_pixel_values"])
    mine = our_losses(ours, "image", inputs, keys=["pixel_values", "image_mask", "codebook_pixel_values"])
    assert_losses_match(mine, theirs)


def test_mlm_loss_matches(hf, ours, inputs):
    keys = ["input_ids", "input_ids_masked", "attention_mask", "mlm_labels"]
    theirs, _ = hf_losses(hf, **{k: inputs[k] for k in keys})
    assert_losses_match(our_losses(ours, "text", inputs, keys=keys), theirs)


def test_pair_losses_match_with_itm_labels(hf, ours, inputs):
    """contrastive, ITM, MMM-image, MMM-text; MMM and contrastive rows restricted to the matched pairs."""
    keys = ["pixel_values", "image_mask", "mim_labels", "input_ids", "input_ids_masked", "attention_mask",
            "mlm_labels", "itm_labels"]
    theirs, out = hf_losses(hf, **{k: inputs[k] for k in keys})
    assert set(theirs) == {"contrastive", "itm", "mmm_image", "mmm_text"}
    mine = our_losses(ours, "pair", inputs, keys=keys)
    assert_losses_match(mine, theirs)
    with torch.no_grad():
        total = ours({"kind": "pair", **{k: inputs[k] for k in keys}}).loss
    assert torch.allclose(total, out.loss, atol=ATOL)


def test_pair_losses_match_without_itm_and_with_weights():
    """No ITM (so no pos-mask) and non-unit weights: transformers reports weighted losses, we report raw ones."""
    weights = dict(itm_weight=0.0, mmm_image_weight=0.5, mmm_text_weight=2.0, global_contrastive_weight=0.3)
    hf = random_hf_model(seed=3, **weights)
    ours = from_transformers(hf).eval()
    assert ours.config.loss.itm == 0.0 and ours.config.loss.mmm_text == 2.0
    inputs = make_inputs(seed=5)
    keys = ["pixel_values", "image_mask", "mim_labels", "input_ids", "input_ids_masked", "attention_mask",
            "mlm_labels"]
    theirs, out = hf_losses(hf, **{k: inputs[k] for k in keys})
    mine = our_losses(ours, "pair", inputs, keys=keys)
    assert_losses_match(mine, theirs, weights={"mmm_image": 0.5, "mmm_text": 2.0, "contrastive": 0.3})
    with torch.no_grad():
        assert torch.allclose(ours({"kind": "pair", **{k: inputs[k] for k in keys}}).loss, out.loss, atol=ATOL)


def test_ours_to_hf_to_ours_is_lossless():
    cfg = preset("tiny", {"multimodal": {"num_layers": 1}, "text": {"qkv_bias": False}})
    torch.manual_seed(0)
    model = FlavaForPretraining(cfg)
    back = from_transformers(to_transformers(model), attention="eager")
    assert back.config.model_dump(exclude={"attention"}) == cfg.model_dump(exclude={"attention"})
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, back.state_dict()[name]), name


def test_hf_to_ours_to_hf_keeps_every_used_tensor(hf):
    ours = from_transformers(hf)
    theirs = hf.state_dict()
    converted = to_transformers_state_dict(ours)
    for name, tensor in theirs.items():
        if name.startswith(HF_ONLY_PREFIXES):
            assert name not in converted
            continue
        assert torch.equal(converted[name], tensor), name


def test_state_dict_conversion_accepts_either_head_bias_and_rejects_untied(hf):
    ours = from_transformers(hf)
    state = {k: v for k, v in hf.state_dict().items()}
    only_bias = {k: v for k, v in state.items() if not k.endswith("_head.decoder.bias")}
    only_decoder = {k: v for k, v in state.items() if not (k.endswith("_head.bias"))}
    for variant in (only_bias, only_decoder):
        converted = from_transformers_state_dict(variant, ours.config)
        assert torch.equal(converted["mlm_head.decoder.bias"], state["mlm_head.decoder.bias"])
    untied = dict(state, **{"mim_head.bias": state["mim_head.bias"] + 1})
    with pytest.raises(ValueError, match="tied"):
        from_transformers_state_dict(untied, ours.config)


def test_unequal_widths_cannot_export():
    model = FlavaForPretraining(preset("tiny", {"multimodal": {"hidden_size": 64}}))
    with pytest.raises(ValueError, match="hidden_size"):
        to_transformers(model)


def test_load_transformers_checkpoint_from_disk(hf, inputs, tmp_path):
    hf.save_pretrained(tmp_path / "flava")
    model = load_transformers_checkpoint(tmp_path / "flava").eval()
    keys = ["input_ids", "input_ids_masked", "attention_mask", "mlm_labels"]
    theirs, _ = hf_losses(hf, **{k: inputs[k] for k in keys})
    assert_losses_match(our_losses(model, "text", inputs, keys=keys), theirs)
    assert isinstance(model.codebook, DalleCodebook)
    (tmp_path / "pickled").mkdir()
    (tmp_path / "pickled" / "config.json").write_text((tmp_path / "flava" / "config.json").read_text())
    (tmp_path / "pickled" / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(ValueError, match="pickled"):
        load_transformers_checkpoint(tmp_path / "pickled")


def test_gradients_match(hf, inputs):
    """Backward parity: d(total pair loss)/d(weights), mapped to transformers' names (fused qkv split)."""
    ours = from_transformers(hf).eval()
    keys = ["pixel_values", "image_mask", "mim_labels", "input_ids", "input_ids_masked", "attention_mask",
            "mlm_labels", "itm_labels"]
    ours({"kind": "pair", **{k: inputs[k] for k in keys}}).loss.backward()
    grads = {n: (p.grad if p.grad is not None else torch.zeros_like(p)) for n, p in ours.named_parameters()}
    mapped = to_transformers_state_dict(grads, ours.config)
    hf.zero_grad()
    kwargs = {k: inputs[k].clone() for k in keys if k != "image_mask"}
    hf(**kwargs, bool_masked_pos=inputs["image_mask"].clone(), return_loss=True).loss.backward()
    checked = 0
    for name, param in hf.named_parameters():
        if name.startswith(HF_ONLY_PREFIXES) or name.startswith("image_codebook."):
            continue
        theirs = param.grad if param.grad is not None else torch.zeros_like(param)
        assert torch.allclose(mapped[name], theirs, atol=ATOL, rtol=1e-3), name
        checked += 1
    hf.zero_grad()
    assert checked > 100


def test_load_a_bare_flava_model_checkpoint_keeps_fresh_heads(hf, inputs, tmp_path):
    """A ``FlavaModel`` checkpoint (encoders only, no pretraining heads) loads; embeddings still match."""
    hf.flava.save_pretrained(tmp_path / "flava_model")
    model = load_transformers_checkpoint(tmp_path / "flava_model", attention="eager").eval()
    pix, ids, mask = inputs["pixel_values"], inputs["input_ids"], inputs["attention_mask"]
    with torch.no_grad():
        out = hf.flava(input_ids=ids, pixel_values=pix, attention_mask=mask)
        assert torch.allclose(model.fuse(pix, ids, mask).hidden, out.multimodal_embeddings, atol=ATOL)
    assert model.codebook is None
