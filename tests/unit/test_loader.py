"""Training streams: batch layout, determinism, rank/worker disjointness, exact resume, endless resampling."""
from __future__ import annotations

import json
from itertools import islice

import pytest
import torch

from flava.data.loader import SlotPlan, build_stream
from flava.data.masking import IGNORE_INDEX
from flava.data.shards import run_shard
from flava.data.tokenizer import fit_wordpiece
from tests.unit.shard_fixtures import config, make_validated


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("loader")
    validated = make_validated(root, n_pairs=24, n_images=13, n_text=30)
    cfg = config(root)
    run_shard(cfg)
    texts = [json.loads(l)["text"] for c in ("pairs", "text") for l in (validated / f"{c}.jsonl").read_text().splitlines()]
    tok = fit_wordpiece(texts, 200, root / "tok")
    return root, cfg, tok


def stream(world, corpus="pairs", *, rank=0, world_size=1, seed=0, batch_size=4, workers=0, start_method=None,
           **data):
    root, cfg, tok = world
    loader = {"num_workers": workers} | ({"start_method": start_method} if start_method else {})
    cfg = config(root, loader=loader, **data) if (workers or data) else cfg
    return build_stream(cfg, corpus, batch_size=batch_size, rank=rank, world_size=world_size, seed=seed,
                        tokenizer=tok, include_keys=True)


def same(a, b):
    return a.keys() == b.keys() and all(
        torch.equal(a[k], b[k]) if isinstance(a[k], torch.Tensor) else a[k] == b[k] for k in a)


def test_batch_layout_per_corpus(world):
    _, cfg, tok = world
    image_size, grid = 32, 4  # tiny preset: 32 px, patch 8
    pair = next(stream(world, "pairs"))
    assert pair["kind"] == "pair"
    assert pair["pixel_values"].shape == (4, 3, image_size, image_size) and pair["pixel_values"].dtype == torch.float32
    assert pair["image_mask"].shape == (4, grid * grid) and pair["image_mask"].dtype == torch.bool
    assert (pair["image_mask"].sum(1) == round(0.4 * grid * grid)).all()
    t = cfg.data.tokenizer.max_length  # every text tensor is padded to it
    for key in ("input_ids", "input_ids_masked", "attention_mask", "mlm_labels"):
        assert pair[key].shape == (4, t) and pair[key].dtype == torch.long
    assert (pair["mlm_labels"][pair["attention_mask"] == 0] == IGNORE_INDEX).all()
    assert ((pair["mlm_labels"] != IGNORE_INDEX).sum(1) >= 1).all()
    assert (pair["input_ids"][:, 0] == tok.cls_token_id).all()
    image = next(stream(world, "images"))
    assert image["kind"] == "image" and "input_ids" not in image and image["pixel_values"].shape[0] == 4
    text = next(stream(world, "text"))
    assert text["kind"] == "text" and "pixel_values" not in text and text["input_ids"].shape == (4, t)


def test_deterministic_for_seed(world):
    a = list(islice(stream(world, seed=3), 8))
    b = list(islice(stream(world, seed=3), 8))
    c = list(islice(stream(world, seed=4), 8))
    assert all(same(x, y) for x, y in zip(a, b))
    assert [x["keys"] for x in a] != [x["keys"] for x in c]


def test_endless_and_every_sample_once_per_epoch(world):
    s = stream(world, batch_size=4)
    keys = [k for batch in islice(s, 12) for k in batch["keys"]]  # 48 samples = exactly 2 epochs of 24
    assert len(set(keys[:24])) == 24 and len(set(keys[24:])) == 24
    assert keys[:24] != keys[24:]  # each epoch reshuffles


@pytest.mark.parametrize("slots", [2, 3, 8])  # 5 shards: by shard for 2 and 3 slots, by sample for 8
def test_slots_disjoint_and_cover_the_epoch(world, slots):
    root, cfg, _ = world
    index = json.loads((root / "shards" / "pairs" / "index.json").read_text())
    seen = []
    for epoch in (0, 1):
        per_slot = []
        for slot in range(slots):
            plan = SlotPlan(index["shards"], corpus="pairs", seed=0, slot=slot, slots=slots)
            per_slot.append({(shard, pos) for shard, _ in plan.epoch(epoch) for pos in plan.positions(epoch, shard)})
        union = set().union(*per_slot)
        assert sum(len(p) for p in per_slot) == len(union) == 24
        seen.append(per_slot)
    assert seen[0] != seen[1]


def test_ranks_get_disjoint_batches(world):
    # 24 samples in shards of 5,5,5,5,4 over 2 ranks: each rank's epoch holds at least 9 samples.
    k0 = {k for b in islice(stream(world, rank=0, world_size=2, batch_size=2), 4) for k in b["keys"]}
    k1 = {k for b in islice(stream(world, rank=1, world_size=2, batch_size=2), 4) for k in b["keys"]}
    assert len(k0) == 8 and len(k1) == 8 and not k0 & k1
    # More slots than shards: samples are dealt round-robin, still disjoint.
    k = [{k for b in islice(stream(world, rank=r, world_size=8, batch_size=3), 1) for k in b["keys"]}
         for r in range(8)]
    assert sum(map(len, k)) == 24 and len(set().union(*k)) == 24


def test_workers_follow_the_round_robin_plan_and_resume(world):
    # A real DataLoader with 2 workers gives the batches the plan predicts, and resumes exactly mid-stream.
    s = stream(world, workers=2, batch_size=3)
    first = list(islice(s, 7))
    keys = [k for b in first[:6] for k in b["keys"]]  # 3 batches per worker, within each worker's epoch
    assert len(set(keys)) == 18
    plan = stream(world, workers=2, batch_size=3).dataset  # the same plan, iterated in this process
    w0, w1 = plan.batches(0), plan.batches(1)
    predicted = [next(w0) if i % 2 == 0 else next(w1) for i in range(7)]
    assert all(same(x, y) for x, y in zip(first, predicted))
    state = s.state_dict()
    after = list(islice(s, 4))
    s.close()
    resumed = stream(world, workers=2, batch_size=3)
    resumed.load_state_dict(state)
    again = list(islice(resumed, 4))
    resumed.close()
    assert all(same(x, y) for x, y in zip(after, again))


@pytest.mark.parametrize("consumed", [0, 1, 5, 13])  # 13 batches of 4 crosses into the third epoch
def test_resume_gives_identical_next_batches(world, consumed):
    a = stream(world, batch_size=4, seed=7)
    list(islice(a, consumed))
    state = a.state_dict()
    expected = list(islice(a, 3))
    b = stream(world, batch_size=4, seed=7)
    b.load_state_dict(json.loads(json.dumps(state)))  # survives a JSON round trip (checkpoint files)
    assert all(same(x, y) for x, y in zip(expected, islice(b, 3)))
    assert b.state_dict()["batches"] == consumed + 3


def test_errors(world, tmp_path):
    root, cfg, tok = world
    with pytest.raises(ValueError, match="corpus"):
        stream(world, "videos")
    with pytest.raises(ValueError, match="rank"):
        stream(world, rank=2, world_size=2)
    with pytest.raises(ValueError, match="too few"):
        stream(world, "images", world_size=14)  # 13 samples for 14 slots
    with pytest.raises(ValueError, match="tokenizer"):
        build_stream(cfg, "text", batch_size=2, rank=0, world_size=1, seed=0, tokenizer=None)
    s = stream(world)
    with pytest.raises(ValueError, match="seed"):
        s.load_state_dict(stream(world, seed=1).state_dict())
    missing = config(tmp_path)
    with pytest.raises(FileNotFoundError, match="flava data shard"):
        build_stream(missing, "pairs", batch_size=2, rank=0, world_size=1, seed=0, tokenizer=tok)


def test_corrupt_shard_is_detected(world, tmp_path):
    import shutil

    root, _, tok = world
    shutil.copytree(root / "shards", tmp_path / "shards")
    shard = tmp_path / "shards" / "text" / "shard-000000.tar"
    data = bytearray(shard.read_bytes())
    data[600] ^= 0xFF
    shard.write_bytes(bytes(data))
    cfg = config(root, out=str(tmp_path / "shards"))
    s = build_stream(cfg, "text", batch_size=30, rank=0, world_size=1, seed=0, tokenizer=tok)
    with pytest.raises(ValueError, match="sha256"):
        next(s)


def test_dalle_codebook_gets_its_own_pixels(world):
    from flava.model.codebook import DalleCodebook

    root, cfg, tok = world
    codebook = DalleCodebook(num_groups=4, num_blocks_per_group=1, hidden_size=8, vocab_size=16)
    s = build_stream(cfg, "images", batch_size=2, rank=0, world_size=1, seed=0, tokenizer=tok, codebook=codebook)
    batch = next(s)
    view = batch["codebook_pixel_values"]
    assert view.shape == (2, 3, 4 * 8, 4 * 8)  # tiny grid 4x4, DALL-E downsamples by 8
    assert view.min() >= 0.1 - 1e-6 and view.max() <= 0.9 + 1e-6
    assert codebook(view).shape == (2, 16)  # one code per patch of the 4x4 grid
    plain = next(build_stream(cfg, "images", batch_size=2, rank=0, world_size=1, seed=0, tokenizer=tok))
    assert "codebook_pixel_values" not in plain and torch.equal(plain["pixel_values"], batch["pixel_values"])


# The fork case reproduces the failure on purpose: after a Prefect test in this process, Prefect's own hook fails in
# the forked workers too, and the DataLoader reports that while it is collected.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_workers_start_fresh_without_the_training_process_exit_hooks(world, tmp_path, monkeypatch):
    """A process running a Prefect flow holds thread-exit hooks that break in a forked copy (Prefect 3.8's services
    assert when a forked DataLoader worker exits: "worker exited unexpectedly"). Workers started the default way
    (spawn) are fresh interpreters and never run the parent's hooks; forked ones do (shown with a hook that only
    leaves a mark)."""
    import gc
    import os
    import threading
    import time
    from pathlib import Path

    parent = os.getpid()

    def hook(marks: Path = tmp_path):
        if os.getpid() != parent:
            (marks / f"ran-in-{os.getpid()}").touch()

    monkeypatch.setattr(threading, "_threading_atexits", [*threading._threading_atexits, hook])

    def run(method: str) -> set[str]:
        before = set(os.listdir(tmp_path))
        s = stream(world, workers=2, batch_size=3, start_method=method)
        assert len(list(islice(s, 3))) == 3
        s.close()
        gc.collect()  # the DataLoader iterator joins its workers as it is collected
        deadline = time.monotonic() + 10
        while method == "fork" and set(os.listdir(tmp_path)) == before and time.monotonic() < deadline:
            time.sleep(0.1)
        return set(os.listdir(tmp_path)) - before

    assert run("spawn") == set()
    assert len(run("fork")) == 2  # both forked workers ran the inherited hook at exit
