"""FlavaForPretraining on the tiny preset: objectives per batch kind, masking edge cases, ITM negatives,
input validation, feature API, attention kernels, checkpointing and parameter groups."""
from __future__ import annotations

import math
import time

import pytest
import torch

from flava.model import FlavaForPretraining, preset
from flava.model.batch import on_host, validate_batch
from flava.model.losses import contrastive_loss
from flava.train.config import OptimizerConfig
from flava.train.optim import param_groups


def make_batch(cfg, kind: str, batch_size: int = 4, length: int = 12, seed: int = 0) -> dict:
    """A batch as flava.data produces it, with masks built in plain torch."""
    g = torch.Generator().manual_seed(seed)
    out: dict = {"kind": kind}
    if kind in ("image", "pair"):
        size, patches = cfg.image.image_size, cfg.image.num_patches
        out["pixel_values"] = torch.randn(batch_size, cfg.image.num_channels, size, size, generator=g)
        mask = torch.zeros(batch_size, patches, dtype=torch.bool)
        mask[:, 1 : 1 + patches // 2] = True
        out["image_mask"] = mask
        out["mim_labels"] = torch.randint(0, cfg.codebook_size, (batch_size, patches), generator=g)
    if kind in ("text", "pair"):
        ids = torch.randint(5, cfg.text.vocab_size, (batch_size, length), generator=g)
        attention = torch.ones(batch_size, length, dtype=torch.long)
        attention[0, length - 3 :] = 0  # one padded row
        ids[0, length - 3 :] = cfg.text.pad_token_id
        labels = torch.full_like(ids, -100)
        labels[:, 2:4] = ids[:, 2:4]
        masked = ids.clone()
        masked[:, 2:4] = 4  # a [MASK]-like id
        out.update(input_ids=ids, input_ids_masked=masked, attention_mask=attention, mlm_labels=labels)
    return out


@pytest.fixture
def cfg():
    return preset("tiny")


@pytest.fixture
def model(cfg):
    torch.manual_seed(0)
    return FlavaForPretraining(cfg)


EXPECTED = {"image": {"mim"}, "text": {"mlm"}, "pair": {"contrastive", "itm", "mmm_image", "mmm_text"}}


@pytest.mark.parametrize("kind", ["image", "text", "pair"])
def test_batch_kind_decides_the_objectives(model, cfg, kind):
    out = model(make_batch(cfg, kind))
    assert set(out.losses) == EXPECTED[kind]
    weighted = sum(cfg.loss.weight(name) * value for name, value in out.losses.items())
    assert torch.isfinite(out.loss) and torch.allclose(out.loss, weighted)
    out.loss.backward()
    tower = {"image": model.image_encoder, "text": model.text_encoder, "pair": model.multimodal_encoder}[kind]
    assert all(p.grad is not None for p in tower.encoder.blocks.parameters())


def test_unimodal_batches_leave_the_other_towers_untouched(model, cfg):
    model(make_batch(cfg, "image")).loss.backward()
    assert all(p.grad is None for p in model.text_encoder.parameters())
    assert all(p.grad is None for p in model.multimodal_encoder.parameters())


def test_a_tiny_training_step_is_fast(model, cfg):
    optimizer = torch.optim.AdamW(param_groups(model, OptimizerConfig(weight_decay=0.01)), lr=1e-3)
    batch = make_batch(cfg, "pair", batch_size=8)
    model(batch).loss.backward()  # warm-up
    timings = []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one thread, timed in CPU time: the test machine is shared with other jobs
    try:
        for _ in range(3):
            start = time.process_time()
            model(batch).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            timings.append(time.process_time() - start)
    finally:
        torch.set_num_threads(threads)
    assert min(timings) < 1.0


def test_first_losses_sit_near_log_vocabulary():
    cfg = preset("tiny", {"text": {"vocab_size": 500}, "codebook_size": 300, "projection_dim": 256})
    torch.manual_seed(0)
    model = FlavaForPretraining(cfg).eval()
    batch = make_batch(cfg, "pair", batch_size=16)
    with torch.no_grad():
        pair = model(batch).losses
        mlm = model(dict(make_batch(cfg, "text", batch_size=16), kind="text")).losses["mlm"]
        mim = model(make_batch(cfg, "image", batch_size=16)).losses["mim"]
    assert abs(mlm.item() - math.log(500)) < 0.5
    assert abs(pair["mmm_text"].item() - math.log(500)) < 0.5
    assert abs(mim.item() - math.log(300)) < 0.5
    assert abs(pair["mmm_image"].item() - math.log(300)) < 0.5
    assert abs(pair["contrastive"].item() - math.log(16)) < 0.75
    assert abs(pair["itm"].item() - math.log(2)) < 0.2


def test_no_masked_token_gives_zero_loss_with_a_gradient_path(model, cfg):
    image = make_batch(cfg, "image")
    image["image_mask"] = torch.zeros_like(image["image_mask"])
    text = make_batch(cfg, "text")
    text["mlm_labels"] = torch.full_like(text["mlm_labels"], -100)
    for batch, name in ((image, "mim"), (text, "mlm")):
        out = model(batch)
        assert out.losses[name].item() == 0.0 and out.loss.requires_grad
        out.loss.backward()  # must not raise


def test_ablation_contrastive_only_skips_the_fusion_pass():
    cfg = preset("tiny", {"loss": {"mim": 0, "mlm": 0, "mmm_image": 0, "mmm_text": 0, "itm": 0}})
    model = FlavaForPretraining(cfg)
    calls = {"image": 0, "mm": 0}
    model.image_encoder.register_forward_hook(lambda *a: calls.__setitem__("image", calls["image"] + 1))
    model.multimodal_encoder.register_forward_hook(lambda *a: calls.__setitem__("mm", calls["mm"] + 1))
    batch = make_batch(cfg, "pair")
    del batch["image_mask"], batch["mlm_labels"], batch["input_ids_masked"], batch["mim_labels"]
    out = model(batch)
    assert set(out.losses) == {"contrastive"} and calls == {"image": 1, "mm": 0}


def test_image_batch_runs_one_encoder_pass_and_pair_batch_two(model, cfg):
    calls = []
    model.image_encoder.register_forward_hook(lambda module, args, output: calls.append(len(args)))
    model(make_batch(cfg, "image"))
    assert len(calls) == 1
    calls.clear()
    model(make_batch(cfg, "pair"))
    assert len(calls) == 2  # unmasked (contrastive) + masked (fusion)


def test_itm_negatives_are_seeded_and_mmm_runs_on_matched_pairs_only():
    cfg = preset("tiny", {"loss": {"itm_negative_prob": 0.5}})
    torch.manual_seed(0)
    model = FlavaForPretraining(cfg).eval()
    batch = make_batch(cfg, "pair", batch_size=8)
    with torch.no_grad():
        a = model(batch, generator=torch.Generator().manual_seed(1)).losses
        b = model(batch, generator=torch.Generator().manual_seed(1)).losses
        c = model(batch, generator=torch.Generator().manual_seed(2)).losses
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["itm"], c["itm"])
    labels, index = model._itm_negatives(8, torch.Generator().manual_seed(1), torch.device("cpu"))
    rows = torch.arange(8)
    assert torch.equal(labels.bool(), index == rows)  # negatives are exactly the re-paired rows
    assert 0 < int(labels.sum()) < 8


def test_hard_itm_negatives_follow_the_contrastive_logits_and_skip_identical_captions():
    cfg = preset("tiny", {"loss": {"itm_negative_prob": 1.0, "itm_negatives": "hard"}})
    model = FlavaForPretraining(cfg, seed=0)
    ids = torch.tensor([[1, 5, 2], [1, 5, 2], [1, 6, 2], [1, 7, 2]])  # rows 0 and 1: one caption twice
    logits = torch.zeros(4, 4)
    logits[0, 1] = logits[0, 3] = 50.0  # row 0's closest "other" caption is its own text again (row 1)
    logits[2, 3] = logits[3, 2] = 50.0
    labels, index = model._itm_negatives(4, torch.Generator().manual_seed(0), torch.device("cpu"),
                                         logits=logits, input_ids=ids)
    assert labels.tolist() == [0, 0, 0, 0]  # every row drew a negative (probability 1)
    assert index[0] == 3 and index[2] == 3 and index[3] == 2  # the most confusable caption, never an identical one
    assert index[1] != 0  # row 1's caption is row 0's: that would be a false negative
    again = model._itm_negatives(4, torch.Generator().manual_seed(0), torch.device("cpu"), logits=logits,
                                 input_ids=ids)
    assert torch.equal(again[1], index)  # drawn from the given generator: the same seed, the same negatives
    # A row whose every other caption is its own stays matched.
    same = torch.tensor([[1, 5, 2]] * 3)
    labels, index = model._itm_negatives(3, torch.Generator().manual_seed(0), torch.device("cpu"),
                                         logits=torch.zeros(3, 3), input_ids=same)
    assert labels.tolist() == [1, 1, 1] and index.tolist() == [0, 1, 2]


def test_hard_itm_negatives_train_through_the_forward_and_need_the_contrastive_loss():
    cfg = preset("tiny", {"loss": {"itm_negative_prob": 0.5, "itm_negatives": "hard"}})
    model = FlavaForPretraining(cfg, seed=0)
    batch = make_batch(cfg, "pair", batch_size=8)
    a = model(batch, generator=torch.Generator().manual_seed(1))
    a.loss.backward()  # the drawn negatives are indices: nothing of the draw sits in the graph
    b = model(batch, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a.loss, b.loss) and torch.isfinite(a.loss)
    assert all(p.grad is not None for p in model.itm_head.parameters())
    uniform = FlavaForPretraining(preset("tiny", {"loss": {"itm_negative_prob": 0.5}}), seed=0)
    with torch.no_grad():
        c = uniform(batch, generator=torch.Generator().manual_seed(1))
    assert not torch.equal(a.losses["itm"].detach(), c.losses["itm"])  # the hard draw is not the uniform one
    with pytest.raises(ValueError, match="itm_negatives 'hard'.*contrastive > 0"):
        preset("tiny", {"loss": {"itm_negatives": "hard", "contrastive": 0.0}})


def test_given_itm_labels_restrict_mmm_and_contrastive_to_matched_rows(model, cfg):
    model.eval()
    batch = make_batch(cfg, "pair")
    batch["itm_labels"] = torch.tensor([1, 0, 1, 1])
    with torch.no_grad():
        base = model(batch).losses
        changed = dict(batch)
        labels = batch["mlm_labels"].clone()
        labels[1, 5] = batch["input_ids"][1, 5]  # an extra target on the unmatched row
        changed["mlm_labels"] = labels
        after = model(changed).losses
    assert torch.allclose(base["mmm_text"], after["mmm_text"])
    changed_itm = dict(batch, itm_labels=torch.tensor([1, 1, 1, 1]))
    with torch.no_grad():
        assert not torch.allclose(model(changed_itm).losses["mmm_text"], base["mmm_text"])


def test_eager_and_sdpa_attention_agree(cfg):
    torch.manual_seed(0)
    sdpa = FlavaForPretraining(cfg).eval()
    eager = FlavaForPretraining(preset("tiny", {"attention": "eager"})).eval()
    eager.load_state_dict(sdpa.state_dict())
    batch = make_batch(cfg, "pair")
    batch["itm_labels"] = torch.tensor([1, 0, 1, 1])
    with torch.no_grad():
        a, b = sdpa(batch).losses, eager(batch).losses
    for name in a:
        assert torch.allclose(a[name], b[name], atol=1e-5), name


def test_activation_checkpointing_keeps_loss_and_gradients(model, cfg):
    batch = make_batch(cfg, "pair")
    batch["itm_labels"] = torch.tensor([1, 0, 1, 1])
    out = model(batch)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    model.set_activation_checkpointing(True)
    again = model(batch)
    again.loss.backward()
    assert torch.allclose(out.loss, again.loss)
    for name, grad in grads.items():
        assert torch.allclose(grad, dict(model.named_parameters())[name].grad, atol=1e-6), name


def test_touch_unused_parameters_gives_every_parameter_a_gradient(model, cfg):
    model.touch_unused_parameters = True
    out = model(make_batch(cfg, "image"))
    out.loss.backward()
    assert all(p.grad is not None for p in model.parameters())
    assert all(torch.count_nonzero(p.grad) == 0 for p in model.text_encoder.parameters())


def test_logit_scale_is_clamped_in_training(model, cfg):
    with torch.no_grad():
        model.logit_scale.fill_(10.0)
    model.train()
    model(make_batch(cfg, "pair"))
    assert model.logit_scale.item() == pytest.approx(math.log(100.0))


def test_feature_api_shapes_and_normalisation(model, cfg):
    batch = make_batch(cfg, "pair")
    with torch.no_grad():
        image = model.encode_image(batch["pixel_values"])
        text = model.encode_text(batch["input_ids"], batch["attention_mask"])
        assert image.shape == text.shape == (4, cfg.projection_dim)
        assert torch.allclose(image.norm(dim=-1), torch.ones(4), atol=1e-5)
        assert model.image_features(batch["pixel_values"]).shape == (4, cfg.image.hidden_size)
        assert model.text_features(batch["input_ids"]).shape == (4, cfg.text.hidden_size)
        mm = model.multimodal_features(batch["pixel_values"], batch["input_ids"], batch["attention_mask"])
        assert mm.shape == (4, cfg.multimodal.hidden_size)
        assert model.itm_logits(batch["pixel_values"], batch["input_ids"], batch["attention_mask"]).shape == (4, 2)


def test_padding_does_not_change_text_features(model, cfg):
    model.eval()
    ids = torch.randint(5, cfg.text.vocab_size, (1, 6))
    padded = torch.cat([ids, torch.zeros(1, 4, dtype=torch.long)], dim=1)
    mask = torch.cat([torch.ones(1, 6), torch.zeros(1, 4)], dim=1).long()
    pixels = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(model.text_features(ids), model.text_features(padded, mask), atol=1e-5)
        assert torch.allclose(model.multimodal_features(pixels, ids),
                              model.multimodal_features(pixels, padded, mask), atol=1e-5)


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda b: b.update(pixel_values=torch.randn(4, 3, 16, 16)), r"pixel_values .*\(B, 3, 32, 32\)"),
        (lambda b: b.update(pixel_values=torch.randn(4, 1, 32, 32)), r"pixel_values .*\(B, 3, 32, 32\)"),
        (lambda b: b["input_ids"].__setitem__((0, 0), 10_000), r"input_ids .*vocab_size=64"),
        (lambda b: b.update(attention_mask=torch.ones(3, 12, dtype=torch.long)), r"attention_mask .*\(4, 12\)"),
        (lambda b: b.update(image_mask=torch.zeros(3, 16, dtype=torch.bool)), "batch size"),
        (lambda b: b.pop("mlm_labels"), "mlm_labels"),
        (lambda b: b.pop("image_mask"), "image_mask"),
        (lambda b: b.pop("mim_labels"), "codebook"),
        (lambda b: b.update(itm_labels=torch.tensor([0, 1, 2, 1])), "itm_labels"),
        (lambda b: b.update(kind="video"), "kind"),
        (lambda b: b.update(input_ids=torch.randint(5, 60, (4, 40))), "max_position_embeddings"),
    ],
)
def test_bad_input_raises_naming_the_tensor(model, cfg, change, message):
    batch = make_batch(cfg, "pair")
    change(batch)
    with pytest.raises(ValueError, match=message):
        model(batch)
    with pytest.raises(ValueError, match=message):  # the trainer's check, before a batch leaves the host
        validate_batch(cfg, batch, has_codebook=False)


def test_the_forward_checks_host_batches_only():
    batch = make_batch(preset("tiny"), "pair")
    assert on_host(batch)
    assert not on_host({**batch, "input_ids": batch["input_ids"].to("meta")})  # a device batch: checked before


def test_codebook_must_match_config(cfg):
    class FakeCodebook:
        num_codes = 7

    with pytest.raises(ValueError, match="codebook_size"):
        FlavaForPretraining(cfg, codebook=FakeCodebook())


def test_codebook_targets_are_used_when_labels_absent(cfg):
    class PatchMeanCodebook:
        """Deterministic stand-in: code = bucket of each 8x8 patch's mean."""

        num_codes = cfg.codebook_size

        def __call__(self, pixels):
            means = torch.nn.functional.avg_pool2d(pixels.mean(1, keepdim=True), 8).flatten(1)
            return ((means.sigmoid() * self.num_codes).long()).clamp(max=self.num_codes - 1)

    torch.manual_seed(0)
    model = FlavaForPretraining(cfg, codebook=PatchMeanCodebook()).eval()
    batch = make_batch(cfg, "image")
    expected = PatchMeanCodebook()(batch["pixel_values"])
    with torch.no_grad():
        from_codebook = model(dict(batch, mim_labels=None)).losses["mim"]
        from_labels = model(dict(batch, mim_labels=expected)).losses["mim"]
    assert torch.allclose(from_codebook, from_labels)


def test_contrastive_loss_world_size_one_needs_no_process_group():
    torch.manual_seed(0)
    image = torch.nn.functional.normalize(torch.randn(6, 8), dim=-1)
    loss, accuracy = contrastive_loss(image, image.clone(), torch.tensor(math.log(100.0)))
    assert loss.item() < 0.1 and accuracy.item() == 1.0  # identical embeddings: the diagonal wins


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_cls_only_last_block_equals_the_full_pass(attention):
    torch.manual_seed(0)
    model = FlavaForPretraining(preset("tiny", {"attention": attention})).eval()
    batch = make_batch(model.config, "pair")
    with torch.no_grad():
        for full, short in (
            (model.image_encoder(batch["pixel_values"]), model.image_encoder(batch["pixel_values"], cls_only=True)),
            (model.text_encoder(batch["input_ids"], batch["attention_mask"]),
             model.text_encoder(batch["input_ids"], batch["attention_mask"], cls_only=True)),
        ):
            assert short.hidden.shape[1] == 1
            assert torch.allclose(full.cls, short.cls, atol=1e-5)
            assert torch.allclose(full.pre_norm[:, 0], short.pre_norm[:, 0], atol=1e-5)
    # and under activation checkpointing in training, gradients flow through the shortened block
    model.train()
    model.set_activation_checkpointing(True)
    model.image_encoder(batch["pixel_values"], cls_only=True).cls.sum().backward()
    assert model.image_encoder.encoder.blocks[-1].mlp.fc1.weight.grad is not None


def fixed_batch_losses(model, batches: list[dict], steps: int = 30, lr: float = 5e-3):
    """Train ``model`` on the same ``batches`` for ``steps`` rounds (AdamW, no weight decay) -> each objective's
    loss at the first round and at the last."""
    optimizer = torch.optim.AdamW(param_groups(model, OptimizerConfig(weight_decay=0.0)), lr=lr)
    first: dict[str, float] = {}
    last: dict[str, float] = {}
    for step in range(steps):
        for batch in batches:
            out = model(batch)
            out.loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            for name, value in out.losses.items():
                (first if step == 0 else last)[name] = value.item()
    return first, last


def test_every_objective_learns_on_a_fixed_batch():
    torch.manual_seed(0)
    cfg = preset("tiny")
    model = FlavaForPretraining(cfg)
    batches = [make_batch(cfg, kind, batch_size=8, seed=3) for kind in ("pair", "image", "text")]
    batches[0]["itm_labels"] = torch.tensor([1, 0, 1, 1, 0, 1, 1, 1])
    first, last = fixed_batch_losses(model, batches)
    assert set(first) == {"contrastive", "itm", "mmm_image", "mmm_text", "mim", "mlm"}
    for name in first:
        assert last[name] < 0.75 * first[name], (name, first[name], last[name])


def test_bf16_weights_give_fp32_losses_close_to_fp32(model, cfg):
    batch = make_batch(cfg, "pair")
    batch["itm_labels"] = torch.tensor([1, 0, 1, 1])
    model.eval()
    with torch.no_grad():
        reference = model(batch).losses
        half = model.to(torch.bfloat16)
        losses = half(dict(batch, pixel_values=batch["pixel_values"].bfloat16())).losses
    for name, value in losses.items():
        assert value.dtype == torch.float32  # losses are reduced in fp32
        assert abs(value.item() - reference[name].item()) < 0.05, name
    # LayerNorm statistics are taken in fp32 under bf16 weights
    x = torch.randn(2, 5, cfg.image.hidden_size).bfloat16() * 100 + 1000
    norm = half.image_encoder.encoder.norm
    expected = torch.nn.functional.layer_norm(x.float(), (cfg.image.hidden_size,), norm.weight.float(),
                                              norm.bias.float(), norm.eps)
    assert torch.allclose(norm(x).float(), expected, atol=0.05)


def test_last_fusion_block_runs_only_where_heads_read(model, cfg, monkeypatch):
    batch = make_batch(cfg, "pair")
    batch["itm_labels"] = torch.tensor([1, 0, 1, 1])
    seen = []
    original = FlavaForPretraining._fused_positions

    def spy(*args):
        seen.append(original(*args))
        return seen[-1]

    monkeypatch.setattr(FlavaForPretraining, "_fused_positions", staticmethod(spy))
    out = model(batch)
    out.loss.backward()
    select = seen[0]
    full = 2 + cfg.image.num_patches + batch["input_ids"].shape[1]
    assert select is not None and select.shape[1] < full and bool((select[:, 0] == 0).all())
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    monkeypatch.setattr(FlavaForPretraining, "_fused_positions", staticmethod(lambda *a: None))  # every position
    again = model(batch)
    again.loss.backward()
    for name in out.losses:
        assert torch.allclose(out.losses[name], again.losses[name], atol=1e-6), name
    for name, grad in grads.items():
        assert torch.allclose(grad, dict(model.named_parameters())[name].grad, atol=1e-6), name


@pytest.mark.parametrize("only", ["itm", "mmm_image", "mmm_text"])
def test_single_fusion_objective_ablations(only):
    weights = {name: 0.0 for name in ("mim", "mlm", "mmm_image", "mmm_text", "itm", "contrastive")}
    weights[only] = 1.0
    cfg = preset("tiny", {"loss": weights})
    model = FlavaForPretraining(cfg)
    out = model(make_batch(cfg, "pair"))
    assert set(out.losses) == {only} and torch.isfinite(out.loss)
    out.loss.backward()
    assert model.multimodal_encoder.encoder.blocks[-1].mlp.fc2.weight.grad is not None


def test_output_is_pytree_visible(model, cfg):
    """FSDP2 hooks its gradient reduce-scatter on the output tensors it finds by pytree flattening."""
    from torch.utils._pytree import tree_flatten

    out = model(make_batch(cfg, "text"))
    leaves, _ = tree_flatten(out)
    assert any(leaf is out.loss for leaf in leaves) and any(leaf is out.losses["mlm"] for leaf in leaves)
