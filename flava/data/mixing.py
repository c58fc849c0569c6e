"""Corpus mixing for joint training: each step draws one whole batch from one corpus, chosen by sampling ratios.

The choice at step ``t`` is a pure function of ``(seed, t)`` (a generator seeded per step), so every rank picks the
same corpus at the same step without any broadcast, and a resumed run only needs the step counter.
"""
from __future__ import annotations

import bisect
import random
from itertools import accumulate
from typing import Any, Iterator, Mapping


class CorpusMixer:
    """``next()`` -> a batch from the stream of the kind drawn for this step (ratios need not sum to 1)."""

    def __init__(self, streams: Mapping[str, Iterator[dict]], ratios: Mapping[str, float], seed: int):
        if any(r < 0 for r in ratios.values()):
            raise ValueError(f"mixing ratios must be non-negative, got {dict(ratios)}")
        active = sorted(k for k, r in ratios.items() if r > 0)
        if not active:
            raise ValueError(f"mixing ratios need at least one positive entry, got {dict(ratios)}")
        missing = [k for k in active if k not in streams]
        if missing:
            raise ValueError(f"mixing ratios name {missing} but no stream was given for them "
                             f"(streams: {sorted(streams)})")
        self.streams = dict(streams)
        self.kinds = active
        total = sum(ratios[k] for k in active)
        self.probs = {k: ratios[k] / total for k in active}
        self._cum = list(accumulate(self.probs[k] for k in active))
        self.seed = seed
        self.step = 0
        self.counts = {k: 0 for k in active}  # batches drawn per kind (for logging)

    def kind_at(self, step: int) -> str:
        u = random.Random(f"flava-mixer:{self.seed}:{step}").random()  # str seeds are hashed with SHA-512
        return self.kinds[min(bisect.bisect_right(self._cum, u), len(self.kinds) - 1)]

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        kind = self.kind_at(self.step)
        batch = next(self.streams[kind])
        self.step += 1
        self.counts[kind] += 1
        return batch

    def state_dict(self) -> dict[str, Any]:
        return {
            "seed": self.seed, "step": self.step, "counts": dict(self.counts), "probs": dict(self.probs),
            "streams": {k: s.state_dict() for k, s in self.streams.items() if hasattr(s, "state_dict")},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("seed") != self.seed:
            raise ValueError(f"mixer state has seed {state.get('seed')}, this mixer {self.seed}")
        saved = {k: float(v) for k, v in state.get("probs", {}).items()}
        if saved.keys() != self.probs.keys() or any(abs(saved[k] - self.probs[k]) > 1e-12 for k in saved):
            raise ValueError(f"mixer state has ratios {saved}, this mixer {self.probs}: resume would not be exact")
        for kind, sub in state.get("streams", {}).items():
            if kind in self.streams and hasattr(self.streams[kind], "load_state_dict"):
                self.streams[kind].load_state_dict(sub)
        self.step = int(state["step"])
        self.counts = {k: int(state.get("counts", {}).get(k, 0)) for k in self.kinds}
