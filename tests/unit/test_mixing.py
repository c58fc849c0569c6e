"""Corpus mixing: ratios respected, identical choices on every rank, exact resume, bad ratios."""
from __future__ import annotations

import itertools

import pytest

from flava.data.mixing import CorpusMixer


class Counter:
    """A resumable fake stream: batch i of kind k is {"kind": k, "i": i}."""

    def __init__(self, kind):
        self.kind, self.i = kind, 0

    def __next__(self):
        self.i += 1
        return {"kind": self.kind, "i": self.i - 1}

    def state_dict(self):
        return {"i": self.i}

    def load_state_dict(self, state):
        self.i = state["i"]


def mixer(ratios, seed=0):
    return CorpusMixer({k: Counter(k) for k in ("pair", "image", "text")}, ratios, seed)


def test_ratios_are_respected():
    m = mixer({"pair": 0.5, "image": 0.3, "text": 0.2})
    kinds = [b["kind"] for b in itertools.islice(m, 6000)]
    for kind, p in [("pair", 0.5), ("image", 0.3), ("text", 0.2)]:
        assert abs(kinds.count(kind) / 6000 - p) < 0.025
    assert m.counts == {k: kinds.count(k) for k in ("image", "pair", "text")}


def test_zero_ratio_disables_a_corpus_and_unnormalised_ratios_work():
    kinds = {b["kind"] for b in itertools.islice(mixer({"pair": 2, "image": 0, "text": 2}), 200)}
    assert kinds == {"pair", "text"}


def test_same_choices_on_every_rank_and_different_per_seed():
    ranks = [[b["kind"] for b in itertools.islice(mixer({"pair": 1, "image": 1, "text": 1}, seed=5), 300)]
             for _ in range(3)]
    assert ranks[0] == ranks[1] == ranks[2]
    other = [b["kind"] for b in itertools.islice(mixer({"pair": 1, "image": 1, "text": 1}, seed=6), 300)]
    assert other != ranks[0]


def test_resume_continues_exactly():
    ratios = {"pair": 0.6, "image": 0.2, "text": 0.2}
    a = mixer(ratios, seed=1)
    list(itertools.islice(a, 37))
    state = a.state_dict()
    expected = list(itertools.islice(a, 50))
    b = mixer(ratios, seed=1)
    b.load_state_dict(state)
    assert list(itertools.islice(b, 50)) == expected
    with pytest.raises(ValueError, match="ratios"):
        mixer({"pair": 1.0}, seed=1).load_state_dict(state)


def test_bad_ratios():
    with pytest.raises(ValueError, match="non-negative"):
        mixer({"pair": -1, "text": 1})
    with pytest.raises(ValueError, match="positive"):
        mixer({"pair": 0})
    with pytest.raises(ValueError, match="no stream"):
        CorpusMixer({"pair": Counter("pair")}, {"pair": 1, "text": 1}, 0)
