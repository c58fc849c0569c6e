"""Retrieval math: chunked top-k equals the dense computation; Recall@K follows the multi-caption protocol."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from flava.eval.retrieval import (
    chance_recall,
    chunked_topk,
    flatten_captions,
    recall_curves,
    retrieval_recall,
)


def _dense_recall(images, texts, owner, ks):
    """Reference: full similarity matrix, rank of the best ground truth."""
    sim = images @ texts.T  # (N, M)
    out = {}
    n = images.shape[0]
    order_i2t = sim.argsort(dim=1, descending=True)
    order_t2i = sim.T.argsort(dim=1, descending=True)
    for k in ks:
        i2t = [(owner[order_i2t[i, :k]] == i).any().item() for i in range(n)]
        t2i = [(order_t2i[j, :k] == owner[j]).any().item() for j in range(texts.shape[0])]
        out[f"i2t_r{k}"] = sum(i2t) / n
        out[f"t2i_r{k}"] = sum(t2i) / texts.shape[0]
    return out


def _random_world(n=37, caps=5, dim=16, noise=1.0, seed=0):
    gen = torch.Generator().manual_seed(seed)
    images = F.normalize(torch.randn(n, dim, generator=gen), dim=-1)
    owner = torch.arange(n).repeat_interleave(caps)
    texts = F.normalize(images[owner] + noise * torch.randn(n * caps, dim, generator=gen), dim=-1)
    return images, texts, owner


@pytest.mark.parametrize("query_chunk,key_chunk", [(1, 1), (3, 7), (8, 1000), (1000, 5)])
def test_chunked_topk_matches_dense_topk(query_chunk, key_chunk):
    images, texts, _ = _random_world()
    got = chunked_topk(images, texts, 10, query_chunk=query_chunk, key_chunk=key_chunk)
    want = (images @ texts.T).topk(10, dim=1).indices
    assert torch.equal(got, want)


@pytest.mark.parametrize("query_chunk,key_chunk", [(2, 3), (64, 64), (5, 1)])
def test_recall_matches_dense_reference_for_any_chunking(query_chunk, key_chunk):
    images, texts, owner = _random_world(noise=1.5)
    ks = (1, 5, 10)
    got = retrieval_recall(images, texts, owner, ks, query_chunk=query_chunk, key_chunk=key_chunk)
    want = _dense_recall(images, texts, owner, ks)
    for key, value in want.items():
        assert got[key] == pytest.approx(value), key
    # The numbers are neither trivial 0 nor 1 in this noisy world, so the comparison means something.
    assert 0.0 < got["i2t_r1"] < 1.0 and 0.0 < got["t2i_r1"] < 1.0
    assert got["mean_recall"] == pytest.approx(sum(want.values()) / len(want))


def test_image_to_text_counts_any_of_the_captions():
    # One image, its three captions; a distractor image with one caption. Only the 3rd caption of image 0 is
    # close to it, the other two point away: i2t R@1 for image 0 must still be 1.
    images = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    texts = F.normalize(torch.tensor([[-1.0, 0.2], [-1.0, -0.3], [1.0, 0.0], [0.0, 1.0]]), dim=-1)
    owner = torch.tensor([0, 0, 0, 1])
    r = retrieval_recall(images, texts, owner, ks=(1, 2))
    assert r["i2t_r1"] == 1.0
    # Captions 0 and 1 of image 0 are closer to image 1 (dots 0.20 / -0.29) than to image 0 (-0.98 / -0.96):
    # both miss at K=1, the other two captions hit.
    assert r["t2i_r1"] == pytest.approx(2 / 4)
    assert r["t2i_r2"] == 1.0


def test_recall_curve_is_monotone_and_saturates():
    images, texts, owner = _random_world(n=12, noise=2.0)
    curves = recall_curves(images, texts, owner, max_k=100)
    assert len(curves["t2i"]) == 12  # capped by the number of images
    assert len(curves["i2t"]) == 60
    for curve in curves.values():
        assert all(a <= b for a, b in zip(curve, curve[1:]))
        assert curve[-1] == 1.0


def test_perfect_embeddings_give_full_recall():
    images, texts, owner = _random_world(noise=0.0)
    r = retrieval_recall(images, texts, owner)
    assert all(v == 1.0 for v in r.values())


def test_chance_recall_closed_forms():
    r = chance_recall(10, [5] * 10, ks=(1, 5))
    assert r["t2i_r1"] == pytest.approx(0.1)
    assert r["t2i_r5"] == pytest.approx(0.5)
    assert r["i2t_r1"] == pytest.approx(5 / 50)
    assert r["i2t_r5"] == pytest.approx(1 - math.comb(45, 5) / math.comb(50, 5))
    # one caption per image: i2t R@K = K / M
    assert chance_recall(20, [1] * 20, ks=(3,))["i2t_r3"] == pytest.approx(3 / 20)


def test_chance_recall_matches_random_embeddings_on_average():
    gen = torch.Generator().manual_seed(1)
    n, caps = 30, 5
    owner = torch.arange(n).repeat_interleave(caps)
    trials = [
        retrieval_recall(F.normalize(torch.randn(n, 8, generator=gen), dim=-1),
                         F.normalize(torch.randn(n * caps, 8, generator=gen), dim=-1), owner, ks=(5,))
        for _ in range(40)
    ]
    chance = chance_recall(n, [caps] * n, ks=(5,))
    for key in ("i2t_r5", "t2i_r5"):
        mean = sum(t[key] for t in trials) / len(trials)
        assert mean == pytest.approx(chance[key], abs=0.05), key


def test_flatten_captions_and_bad_rows():
    texts, owner = flatten_captions([{"image": "a", "captions": ["x", "y"]}, {"image": "b", "captions": ["z"]}])
    assert texts == ["x", "y", "z"] and owner.tolist() == [0, 0, 1]
    with pytest.raises(ValueError, match="row 1"):
        flatten_captions([{"image": "a", "captions": ["x"]}, {"image": "b", "captions": []}])


def test_invalid_inputs_raise_value_errors():
    images, texts, owner = _random_world(n=4)
    with pytest.raises(ValueError, match="embedding dims differ"):
        chunked_topk(images, texts[:, :3], 1)
    with pytest.raises(ValueError, match="k="):
        chunked_topk(images, texts, 0)
    with pytest.raises(ValueError, match="text_to_image"):
        retrieval_recall(images, texts, owner[:-1])
    with pytest.raises(ValueError, match="at least one caption"):
        retrieval_recall(images, texts[:5], torch.zeros(5, dtype=torch.long))
