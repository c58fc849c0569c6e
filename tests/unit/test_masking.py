"""Masking: BEiT block masks (exact ratio, blocks, determinism) and BERT masking (80/10/10, specials untouched)."""
from __future__ import annotations

import pytest
import torch

from flava.data.masking import IGNORE_INDEX, bert_mask, block_mask


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("grid,ratio", [((14, 14), 0.4), ((8, 8), 0.4), ((4, 4), 0.5), ((7, 5), 0.3)])
def test_block_mask_shape_and_exact_ratio(grid, ratio):
    for seed in range(20):
        m = block_mask(grid, mask_ratio=ratio, min_block_patches=4, min_aspect=0.3, generator=gen(seed))
        assert m.shape == (grid[0] * grid[1],) and m.dtype == torch.bool
        assert int(m.sum()) == round(ratio * grid[0] * grid[1])


def test_block_mask_is_blocky_not_scattered():
    # Neighbouring masked patches: blocks give far more 4-neighbour pairs than a random mask of the same count.
    def neighbour_pairs(m, h, w):
        g = m.view(h, w)
        return int((g[1:] & g[:-1]).sum() + (g[:, 1:] & g[:, :-1]).sum())

    h = w = 14
    block = sum(neighbour_pairs(block_mask((h, w), mask_ratio=0.4, min_block_patches=16, generator=gen(s)), h, w)
                for s in range(10))
    rand = 0
    for s in range(10):
        m = torch.zeros(h * w, dtype=torch.bool)
        m[torch.randperm(h * w, generator=gen(s))[:78]] = True
        rand += neighbour_pairs(m, h, w)
    assert block > 1.5 * rand


def test_block_mask_deterministic_for_seed_and_varies_across_seeds():
    a = block_mask((8, 8), mask_ratio=0.4, min_block_patches=4, generator=gen(3))
    b = block_mask((8, 8), mask_ratio=0.4, min_block_patches=4, generator=gen(3))
    c = block_mask((8, 8), mask_ratio=0.4, min_block_patches=4, generator=gen(4))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_block_mask_respects_max_block():
    # With max_block_patches=1 every block is one patch: still exactly the ratio.
    m = block_mask((10, 10), mask_ratio=0.25, min_block_patches=1, max_block_patches=1, generator=gen(0))
    assert int(m.sum()) == 25


@pytest.mark.parametrize("kwargs", [dict(grid=(0, 4)), dict(mask_ratio=1.0), dict(mask_ratio=0.0),
                                    dict(min_block_patches=0), dict(min_aspect=0.0)])
def test_block_mask_bad_arguments(kwargs):
    args = dict(grid=(4, 4), mask_ratio=0.4, min_block_patches=2, min_aspect=0.3) | kwargs
    grid = args.pop("grid")
    with pytest.raises(ValueError):
        block_mask(grid, **args)


VOCAB, PAD, UNK, CLS, SEP, MASK = 1000, 0, 1, 2, 3, 4
SPECIALS = [PAD, UNK, CLS, SEP, MASK]


def make_batch(b=64, t=40, seed=0):
    g = gen(seed)
    lengths = torch.randint(5, t + 1, (b,), generator=g)
    ids = torch.randint(5, VOCAB, (b, t), generator=g)
    att = (torch.arange(t)[None] < lengths[:, None]).long()
    ids[:, 0] = CLS
    ids[torch.arange(b), lengths - 1] = SEP
    ids[att == 0] = PAD
    return ids, att


def test_bert_mask_statistics_80_10_10():
    ids, att = make_batch(b=512, t=64)
    masked, labels = bert_mask(ids, att, special_ids=SPECIALS, vocab_size=VOCAB, mask_token_id=MASK, prob=0.15,
                               generator=gen(1))
    chosen = labels != IGNORE_INDEX
    candidates = (att == 1) & ~torch.isin(ids, torch.tensor(SPECIALS))
    rate = chosen.sum().item() / candidates.sum().item()
    assert abs(rate - 0.15) < 0.01
    n = chosen.sum().item()
    as_mask = (masked[chosen] == MASK).sum().item() / n
    unchanged = (masked[chosen] == ids[chosen]).sum().item() / n
    random_tok = 1 - as_mask - unchanged
    assert abs(as_mask - 0.8) < 0.02 and abs(unchanged - 0.1) < 0.02 and abs(random_tok - 0.1) < 0.02
    # Labels hold the original ids; unchosen positions are untouched.
    assert torch.equal(labels[chosen], ids[chosen])
    assert torch.equal(masked[~chosen], ids[~chosen])


def test_bert_mask_never_touches_special_or_padding():
    ids, att = make_batch(b=256, t=32, seed=5)
    masked, labels = bert_mask(ids, att, special_ids=SPECIALS, vocab_size=VOCAB, mask_token_id=MASK, prob=0.5,
                               generator=gen(2))
    protected = (att == 0) | torch.isin(ids, torch.tensor(SPECIALS))
    assert torch.equal(masked[protected], ids[protected])
    assert (labels[protected] == IGNORE_INDEX).all()
    # Random replacements are never special tokens.
    replaced = (labels != IGNORE_INDEX) & (masked != ids) & (masked != MASK)
    assert replaced.any() and not torch.isin(masked[replaced], torch.tensor(SPECIALS)).any()


def test_bert_mask_min_masked_and_deterministic():
    ids = torch.tensor([[CLS, 10, 11, SEP, PAD], [CLS, SEP, PAD, PAD, PAD]])
    att = (ids != PAD).long()
    out = [bert_mask(ids, att, special_ids=SPECIALS, vocab_size=VOCAB, mask_token_id=MASK, prob=0.01,
                     min_masked=1, generator=gen(s)) for s in (7, 7)]
    assert torch.equal(out[0][0], out[1][0]) and torch.equal(out[0][1], out[1][1])
    labels = out[0][1]
    assert (labels[0] != IGNORE_INDEX).sum() == 1  # forced one of the two real tokens
    assert (labels[1] == IGNORE_INDEX).all()  # nothing maskable in row 2


def test_bert_mask_1d_and_errors():
    ids, att = make_batch(b=1, t=16)
    m, l = bert_mask(ids[0], att[0], special_ids=SPECIALS, vocab_size=VOCAB, mask_token_id=MASK, generator=gen(0))
    assert m.shape == (16,) and l.shape == (16,)
    with pytest.raises(ValueError, match="attention_mask shape"):
        bert_mask(ids, att[:, :3], special_ids=SPECIALS, vocab_size=VOCAB, mask_token_id=MASK)
    with pytest.raises(ValueError, match="outside"):
        bert_mask(ids + VOCAB, att, special_ids=SPECIALS, vocab_size=VOCAB, mask_token_id=MASK)
    with pytest.raises(ValueError, match="prob"):
        bert_mask(ids, att, special_ids=SPECIALS, vocab_size=VOCAB, mask_token_id=MASK, prob=1.5)
