"""Weight-decay groups and the warm-up + decay schedule."""
import math

import pytest
import torch
from torch import nn

from flava.model import FlavaForPretraining, preset
from flava.train.config import OptimizerConfig, ScheduleConfig
from flava.train.optim import build_optimizer, build_scheduler, lr_factor, param_groups
from tests.unit.test_model import make_batch


class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.cls_token = nn.Parameter(torch.zeros(1, 1, 4))
        self.mask_token = nn.Parameter(torch.zeros(1, 1, 4))
        self.position_embeddings = nn.Embedding(5, 4)
        self.word_embeddings = nn.Embedding(10, 4)
        self.dense = nn.Linear(4, 4)
        self.layernorm = nn.LayerNorm(4)
        self.logit_scale = nn.Parameter(torch.ones([]))
        self.frozen = nn.Linear(4, 4)
        self.frozen.requires_grad_(False)


def test_no_decay_group_holds_biases_norms_tokens_positions_and_logit_scale():
    model = Toy()
    groups = {g["name"]: g for g in param_groups(model, OptimizerConfig(weight_decay=0.1))}
    names = {id(p): n for n, p in model.named_parameters()}
    decay = {names[id(p)] for p in groups["decay"]["params"]}
    no_decay = {names[id(p)] for p in groups["no_decay"]["params"]}
    assert decay == {"word_embeddings.weight", "dense.weight"}
    assert no_decay == {
        "cls_token", "mask_token", "position_embeddings.weight", "dense.bias", "layernorm.weight",
        "layernorm.bias", "logit_scale",
    }
    assert groups["decay"]["weight_decay"] == 0.1 and groups["no_decay"]["weight_decay"] == 0.0


def test_optimizer_decays_only_the_decay_group():
    model = Toy()
    opt = build_optimizer(model, OptimizerConfig(lr=0.1, weight_decay=0.5), lr=0.1, device=torch.device("cpu"))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for p in model.parameters():
        if p.requires_grad:
            p.grad = torch.zeros_like(p)  # only decay can move a parameter
    opt.step()
    after = dict(model.named_parameters())
    assert not torch.equal(before["dense.weight"], after["dense.weight"].detach())
    for name in ("cls_token", "layernorm.weight", "logit_scale", "dense.bias", "position_embeddings.weight"):
        assert torch.equal(before[name], after[name].detach()), name


def test_fused_is_the_cpu_default_and_steps_like_foreach():
    torch.manual_seed(0)
    models = {"default": Toy(), "foreach": Toy()}
    models["foreach"].load_state_dict(models["default"].state_dict())
    start = models["default"].dense.weight.detach().clone()
    opts = {name: build_optimizer(m, OptimizerConfig(fused=None if name == "default" else False), lr=1e-2,
                                  device=torch.device("cpu")) for name, m in models.items()}
    assert opts["default"].defaults["fused"] and not opts["foreach"].defaults["fused"]
    for _ in range(5):
        x = torch.randn(3, 4)
        for name, m in models.items():
            opts[name].zero_grad()
            m.dense(x).pow(2).sum().backward()
            opts[name].step()
    assert not torch.allclose(models["default"].dense.weight, start, atol=1e-3)  # it did train
    for (name, a), b in zip(models["default"].named_parameters(), models["foreach"].parameters()):
        assert torch.allclose(a, b, atol=1e-6), name


def test_fused_on_a_device_without_it_is_an_error():
    with pytest.raises(ValueError, match="fused=true needs one of the devices"):
        build_optimizer(Toy(), OptimizerConfig(fused=True), lr=1e-3, device=torch.device("meta"))


def test_no_trainable_parameters_is_an_error():
    model = nn.Linear(2, 2).requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable"):
        param_groups(model, OptimizerConfig())


def test_warmup_then_cosine_reaches_min_at_last_step():
    kw = dict(warmup=10, total=110, decay="cosine", min_ratio=0.1)
    assert lr_factor(0, **kw) == pytest.approx(0.1)
    assert lr_factor(9, **kw) == pytest.approx(1.0)
    assert lr_factor(10, **kw) == pytest.approx(1.0)
    assert lr_factor(109, **kw) == pytest.approx(0.1)
    mid = lr_factor(10 + 99 // 2, **kw)
    assert 0.1 < mid < 1.0
    values = [lr_factor(s, **kw) for s in range(10, 110)]
    assert all(a >= b for a, b in zip(values, values[1:]))


def test_linear_and_constant_decay():
    assert lr_factor(50, warmup=0, total=101, decay="linear", min_ratio=0.0) == pytest.approx(0.5)
    assert lr_factor(80, warmup=0, total=101, decay="constant", min_ratio=0.0) == 1.0
    with pytest.raises(ValueError, match="decay"):
        lr_factor(5, warmup=0, total=10, decay="step", min_ratio=0.0)


def test_scheduler_drives_optimizer_lr_and_state_round_trips():
    model = nn.Linear(2, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=1.0)
    sched = build_scheduler(opt, ScheduleConfig(warmup_steps=4, decay="cosine", min_lr_ratio=0.0), total_steps=20,
                            warmup_steps=4)
    seen = []
    for _ in range(6):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert seen[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    state = sched.state_dict()
    opt2 = torch.optim.AdamW(nn.Linear(2, 2).parameters(), lr=1.0)
    sched2 = build_scheduler(opt2, ScheduleConfig(warmup_steps=4, decay="cosine", min_lr_ratio=0.0), total_steps=20,
                             warmup_steps=4)
    sched2.load_state_dict(state)
    assert sched2.get_last_lr() == sched.get_last_lr()
    assert math.isclose(sched2.get_last_lr()[0], lr_factor(6, warmup=4, total=20, decay="cosine", min_ratio=0.0))


def test_flava_weight_decay_groups():
    """The rule on the real model: every token, position, norm and bias and the logit scale are exempt."""
    model = FlavaForPretraining(preset("tiny"))
    decay, no_decay = param_groups(model, OptimizerConfig(weight_decay=0.05))
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    names = {id(p): n for n, p in model.named_parameters()}
    skipped = {names[id(p)] for p in no_decay["params"]}
    decayed = {names[id(p)] for p in decay["params"]}
    for name in ("logit_scale", "image_encoder.cls_token", "image_encoder.mask_token",
                 "image_encoder.position_embeddings", "text_encoder.position_embeddings.weight",
                 "multimodal_encoder.cls_token", "text_encoder.embed_norm.weight",
                 "image_encoder.encoder.blocks.0.attn.qkv.bias"):
        assert name in skipped, name
    for name in ("image_encoder.encoder.blocks.0.attn.qkv.weight", "text_encoder.word_embeddings.weight",
                 "mlm_head.decoder.weight", "image_encoder.patch_embed.weight"):
        assert name in decayed, name
    assert len(skipped) + len(decayed) == len(list(model.parameters()))


def test_flava_pair_backward_is_bit_reproducible_on_two_threads():
    """The same pair batch twice gives bit-identical gradients with 2 intra-op threads: no backward adds with
    parallel atomics in thread-timing order (advanced indexing with repeated indices did, in the ITM negatives,
    and the joint model then differed between two fresh clones)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        cfg = preset("small")
        model = FlavaForPretraining(cfg, seed=0)
        build_optimizer(model, OptimizerConfig(), 1e-3, torch.device("cpu"))
        batch = make_batch(cfg, "pair", batch_size=32, length=16, seed=0)
        grads = []
        for _ in range(2):
            model.zero_grad(set_to_none=True)
            model(batch, generator=torch.Generator().manual_seed(0)).loss.backward()
            grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    finally:
        torch.set_num_threads(threads)
    differ = [n for n in grads[0] if not torch.equal(grads[0][n], grads[1][n])]
    assert not differ, differ[:5]
