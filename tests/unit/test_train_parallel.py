"""parallelize on one process: activation checkpointing and compile change speed/memory, not numbers;
unused-parameter probe."""
import pytest
import torch
from torch import nn

from flava.distributed import ProcessInfo
from flava.train.config import TrainConfig
from flava.train.parallel import parallelize
from flava.train.unused import UnusedParameters, freeze_never_used, peek, probe_unused


def _batch(cfg):
    g = torch.Generator().manual_seed(1)
    b, t, p = 4, 8, cfg.image.num_patches
    ids = torch.randint(5, cfg.text.vocab_size, (b, t), generator=g)
    labels = torch.full((b, t), -100)
    labels[:, 2] = ids[:, 2]
    size = cfg.image.image_size
    return {"kind": "pair", "pixel_values": torch.randn(b, 3, size, size, generator=g), "input_ids": ids,
            "input_ids_masked": ids, "attention_mask": torch.ones(b, t, dtype=torch.long), "mlm_labels": labels,
            "itm_labels": torch.ones(b, dtype=torch.long), "image_mask": torch.rand(b, p, generator=g) < 0.4,
            "mim_labels": torch.randint(0, cfg.codebook_size, (b, p), generator=g)}


def _step(cfg, **train):
    """One forward/backward through ``parallelize(model, TrainConfig(**train))`` -> (model, loss, gradients)."""
    from flava.model import FlavaForPretraining

    torch.manual_seed(0)
    model = FlavaForPretraining(cfg)
    wrapped = parallelize(model, TrainConfig(**train), ProcessInfo(), torch.device("cpu"))
    out = wrapped(_batch(cfg))
    out.loss.backward()
    return model, float(out.loss.detach()), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


def _grads(cfg, **train):
    _, loss, grads = _step(cfg, **train)
    return loss, grads


def test_activation_checkpointing_gives_the_same_gradients():
    from flava.model.config import preset

    cfg = preset("tiny")
    loss, grads = _grads(cfg)
    loss_ac, grads_ac = _grads(cfg, activation_checkpointing=True)
    assert loss == loss_ac and grads.keys() == grads_ac.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], grads_ac[name], rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_compile_is_regional_and_keeps_loss_and_gradients():
    """train.compile compiles each transformer block (inductor, a real C++ build on CPU) and leaves the rest of
    the model eager; the numbers stay those of eager mode. About a minute on a 2-core CPU."""
    from flava.model.config import preset
    from flava.model.layers import Block

    cfg = preset("tiny")
    loss, grads = _grads(cfg)
    model, loss_c, grads_c = _step(cfg, compile=True)
    blocks = [m for m in model.modules() if isinstance(m, Block)]
    assert blocks and all(b._compiled_call_impl is not None for b in blocks)
    assert model._compiled_call_impl is None  # the packing and the losses run eagerly
    assert grads.keys() == grads_c.keys()
    assert loss_c == pytest.approx(loss, abs=1e-5)
    for name in grads:
        torch.testing.assert_close(grads_c[name], grads[name], rtol=1e-4, atol=1e-5)


def test_generic_activation_checkpointing_wraps_repeated_blocks():
    model = nn.Sequential(nn.Linear(4, 4), nn.ModuleList([nn.Linear(4, 4), nn.Linear(4, 4)]))
    parallelize(model, TrainConfig(activation_checkpointing=True), ProcessInfo(), torch.device("cpu"))
    assert all(type(block).__name__ == "CheckpointWrapper" for block in model[1])
    assert isinstance(model[0], nn.Linear)


def test_probe_on_flava_per_kind_and_freezing():
    from flava.model import FlavaForPretraining
    from flava.model.config import preset

    cfg = preset("tiny")
    model = FlavaForPretraining(cfg)
    pair = _batch(cfg)
    text = {"kind": "text", **{k: pair[k] for k in ("input_ids", "input_ids_masked", "attention_mask", "mlm_labels")}}
    unused = probe_unused(model, {"text": text, "pair": pair}, torch.device("cpu"))
    assert any(n.startswith("image_encoder.") for n in unused["text"])
    assert not any(n.startswith("text_encoder.") for n in unused["text"])
    assert any(n.startswith("mim_head.") for n in unused["pair"])  # MIM runs on image batches only
    frozen = freeze_never_used(model, {"text": unused["text"]})
    assert frozen and all(not p.requires_grad for n, p in model.named_parameters() if n in set(frozen))
    assert all(p.requires_grad for n, p in model.named_parameters() if n.startswith("text_encoder."))


def test_setup_freezes_what_no_kind_uses_and_touches_only_under_ddp():
    from flava.model import FlavaForPretraining
    from flava.model.config import preset

    pair = _batch(preset("tiny"))
    text = {"kind": "text", **{k: pair[k] for k in ("input_ids", "input_ids_masked", "attention_mask", "mlm_labels")}}
    for distributed in (False, True):
        model = FlavaForPretraining(preset("tiny"))
        unused = UnusedParameters.setup(model, {"text": text}, torch.device("cpu"), distributed=distributed)
        assert unused.frozen and any(n.startswith("image_encoder.") for n in unused.frozen)
        assert all(not p.requires_grad for n, p in model.named_parameters() if n in set(unused.frozen))
        assert unused.by_kind == {"text": []}  # the text stage's only kind uses every parameter left trainable
        assert model.touch_unused_parameters is False  # nothing left for DDP to miss


def test_peek_rewinds_the_stream():
    class Stream:
        index = 0

        def __next__(self):
            self.index += 1
            return {"index": self.index}

        def state_dict(self):
            return {"index": self.index}

        def load_state_dict(self, state):
            self.index = state["index"]

    stream = Stream()
    assert peek(stream) == {"index": 1} and next(stream) == {"index": 1}
