"""The toy stream that drives the trainer tests: deterministic, resumable, and rank slices tile the global batch."""
import torch

from tests.toy import ToyStream


def test_stream_is_deterministic_and_resumable():
    a = ToyStream(batch_size=4, seed=3)
    first = [next(a) for _ in range(3)]
    state = a.state_dict()
    nxt = next(a)
    b = ToyStream(batch_size=4, seed=3)
    b.load_state_dict(state)
    assert torch.equal(next(b)["x"], nxt["x"])
    c = ToyStream(batch_size=4, seed=3)
    assert torch.equal(next(c)["x"], first[0]["x"])


def test_rank_slices_tile_the_global_batch():
    whole = next(ToyStream(batch_size=4, seed=1))
    parts = [next(ToyStream(batch_size=2, seed=1, rank=r, world_size=2)) for r in range(2)]
    assert torch.equal(torch.cat([p["x"] for p in parts]), whole["x"])
    assert all(p["kind"] == whole["kind"] for p in parts)
