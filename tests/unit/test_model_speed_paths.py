"""The model's compute-saving paths against the full computation they replace: skipping padded positions in the
transformer blocks (``Positions.plan(..., skip_padding=True)``) must leave every read output and every gradient unchanged."""
from __future__ import annotations

import pytest
import torch

from flava.model import FlavaForPretraining, preset
from flava.model.layers import Packing, Positions, TransformerStack

ATOL = 1e-5


def padded_mask(batch: int, length: int, lengths: list[int]) -> torch.Tensor:
    mask = torch.zeros(batch, length, dtype=torch.long)
    for row, real in enumerate(lengths):
        mask[row, :real] = 1
    return mask


def stack_and_inputs(attention: str, seed: int = 0, lengths: tuple[int, ...] = (9, 3, 6, 1)):
    torch.manual_seed(seed)
    cfg = preset("tiny", {"attention": attention}).text
    stack = TransformerStack(cfg, attention).train()
    with torch.no_grad():  # make the final norm's bias matter (post_norm = norm(pre_norm))
        stack.norm.bias.normal_()
    x = torch.randn(4, 9, cfg.hidden_size, requires_grad=True)
    mask = padded_mask(4, 9, list(lengths))
    return stack, x, mask


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@pytest.mark.parametrize("lengths", [(9, 3, 6, 1), (5, 3, 6, 2)])  # the second: trailing all-padding columns
def test_skipping_padding_keeps_real_outputs_and_gradients(attention, lengths):
    stack, x, mask = stack_and_inputs(attention, lengths=lengths)
    real = mask.bool()
    outputs, grads = [], []
    for skip in (False, True):
        stack.zero_grad()
        x.grad = None
        pre, post = stack(x, Positions.plan(mask, skip_padding=skip))
        assert pre.shape == x.shape and post.shape == x.shape
        # a loss that reads the real positions only, as MLM/MMM/ITM/contrastive do
        (post[real] * torch.linspace(-1, 1, post.shape[-1])).sum().backward()
        outputs.append((pre.detach(), post.detach()))
        grads.append({n: p.grad.clone() for n, p in stack.named_parameters()} | {"x": x.grad.clone()})
    (full_pre, full_post), (fast_pre, fast_post) = outputs
    assert torch.allclose(full_pre[real], fast_pre[real], atol=ATOL)
    assert torch.allclose(full_post[real], fast_post[real], atol=ATOL)
    # skipped (padded) positions pass the stack's input through, normalised in post_norm
    assert torch.equal(fast_pre[~real], x.detach()[~real])
    assert torch.allclose(fast_post[~real], stack.norm(x.detach()[~real]), atol=ATOL)
    for name in grads[0]:
        assert torch.allclose(grads[0][name], grads[1][name], atol=ATOL), name


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_selected_positions_are_computed_even_where_padded(attention):
    """The CLS selected with a padded CLS, selected indices and ``needed`` at padded positions: exact, not passed
    through."""
    stack, x, mask = stack_and_inputs(attention, seed=1)
    mask[2, 0] = 0  # a row whose CLS is masked as a key
    with torch.no_grad():
        full_pre, full_post = stack(x, Positions.plan(mask))
        _, cls = stack(x, Positions.plan(mask, select=1, skip_padding=True))
        assert cls.shape == (4, 1, x.shape[-1])
        assert torch.allclose(cls[:, 0], full_post[:, 0], atol=ATOL)
        select = torch.tensor([[0, 2, 8], [1, 4, 7], [0, 5, 6], [0, 3, 8]])  # includes padded positions
        _, picked = stack(x, Positions.plan(mask, select=select, skip_padding=True))
        expected = torch.gather(full_post, 1, select[..., None].expand(-1, -1, x.shape[-1]))
        assert torch.allclose(picked, expected, atol=ATOL)
        needed = torch.zeros(4, 9, dtype=torch.bool)
        needed[1, 7] = True  # padded, but read by the caller
        pre, _ = stack(x, Positions.plan(mask, skip_padding=True, needed=needed))
        assert torch.allclose(pre[1, 7], full_pre[1, 7], atol=ATOL)
        assert torch.equal(pre[1, 8], x[1, 8])  # padded and not needed: passed through


def test_no_padding_means_no_packing_and_bad_needed_shape_is_rejected():
    stack, x, _ = stack_and_inputs("sdpa")
    ones = torch.ones(4, 9, dtype=torch.long)
    assert Positions.plan(ones, skip_padding=True).packing is None
    assert Positions.plan(None, skip_padding=True).packing is None
    packing = Positions.plan(padded_mask(4, 9, [9, 3, 6, 1]), skip_padding=True).packing
    assert isinstance(packing, Packing) and packing.num_rows == 9 + 3 + 6 + 1
    with pytest.raises(ValueError, match="needed has shape"):
        stack(x, Positions.plan(ones, skip_padding=True, needed=torch.ones(4, 8, dtype=torch.bool)))
    with pytest.raises(ValueError, match="the mask covers"):
        stack(x[:, :8], Positions.plan(padded_mask(4, 9, [9, 3, 6, 1]), skip_padding=True))


def test_packing_round_trip_take_and_attention_layout():
    compute = torch.tensor([[True, False, True, False], [False, True, False, False]])
    packing = Packing(compute)
    x = torch.arange(16.0).view(2, 4, 2) + 1
    packed = packing.pack(x)
    assert torch.equal(packed, x[compute])
    assert torch.equal(packing.unpack(packed, fill=-x)[compute], x[compute])
    assert torch.equal(packing.unpack(packed, fill=-x)[~compute], -x[~compute])
    assert torch.equal(packing.unpack(packed)[~compute], torch.zeros(5, 2))
    assert torch.equal(packing.take(packed, torch.tensor([[2], [1]])), x[[0, 1], [2, 1]][:, None])
    # attention layout: the last column is padding in every row, so only the first 3 are kept
    assert packing.span == 3
    spread = packing.scatter(packed)
    assert spread.shape == (2, 3, 2)
    assert torch.equal(spread, torch.where(compute[:, :3, None], x[:, :3], torch.zeros(())))
    assert torch.equal(packing.gather(spread), packed)
    mask = compute[:, None, None, :]
    assert torch.equal(packing.attention_mask(mask), mask[..., :3])


def test_training_losses_and_gradients_match_the_full_computation(monkeypatch):
    """The pair and text objectives with padding skipped equal those with every position computed, including an
    MLM label on a padded position (kept by ``needed``)."""
    torch.manual_seed(0)
    cfg = preset("tiny")
    model = FlavaForPretraining(cfg).train()
    g = torch.Generator().manual_seed(0)
    batch_size, length, patches = 4, 10, cfg.image.num_patches
    ids = torch.randint(5, cfg.text.vocab_size, (batch_size, length), generator=g)
    mask = padded_mask(batch_size, length, [9, 4, 7, 5])  # the last column is padding in every row
    labels = torch.full_like(ids, -100)
    labels[:, 1:3] = ids[:, 1:3]
    labels[1, 8] = ids[1, 8]  # a label on padding: transformers would score it too
    masked = torch.where(labels != -100, torch.full_like(ids, 4), ids)
    image_mask = torch.zeros(batch_size, patches, dtype=torch.bool)
    image_mask[:, :: 3] = True
    pair = {
        "kind": "pair",
        "pixel_values": torch.randn(batch_size, 3, cfg.image.image_size, cfg.image.image_size, generator=g),
        "image_mask": image_mask,
        "mim_labels": torch.randint(0, cfg.codebook_size, (batch_size, patches), generator=g),
        "input_ids": ids, "input_ids_masked": masked, "attention_mask": mask, "mlm_labels": labels,
        "itm_labels": torch.tensor([1, 0, 1, 1]),
    }
    text = {"kind": "text", "input_ids": ids, "input_ids_masked": masked, "attention_mask": mask,
            "mlm_labels": labels}

    def run(batch):
        model.zero_grad()
        out = model(batch)
        out.loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        return {k: v.detach() for k, v in out.losses.items()}, grads

    fast = [run(pair), run(text)]
    plan = Positions.plan

    def full(mask, *, select=None, skip_padding=False, needed=None):
        return plan(mask, select=select)  # every position of every block but the last

    monkeypatch.setattr(Positions, "plan", staticmethod(full))
    slow = [run(pair), run(text)]
    for (fast_losses, fast_grads), (slow_losses, slow_grads) in zip(fast, slow):
        assert fast_losses.keys() == slow_losses.keys()
        for name in fast_losses:
            assert torch.allclose(fast_losses[name], slow_losses[name], atol=ATOL), name
        assert fast_grads.keys() == slow_grads.keys()
        for name in fast_grads:
            assert torch.allclose(fast_grads[name], slow_grads[name], atol=ATOL), name
    assert set(fast[0][0]) == {"contrastive", "itm", "mmm_image", "mmm_text"} and set(fast[1][0]) == {"mlm"}
