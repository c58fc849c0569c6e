"""Checkpoints: exact state round trip, weights_only loading, atomic publication, pruning, S3."""
import json
import random

import numpy as np
import pytest
import torch
from torch import nn

from flava.train.checkpoint import (
    META,
    Checkpointer,
    LocalStore,
    S3Store,
    capture_rng,
    load_weights,
    restore_rng,
    save_weights,
    step_name,
)
from flava.train.config import ScheduleConfig
from flava.train.optim import build_scheduler


class Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(6, 4)
        self.norm = nn.LayerNorm(4)
        self.out = nn.Linear(4, 6, bias=False)
        self.out.weight = self.emb.weight  # tied, like an MLM decoder

    def forward(self, ids):
        return self.out(self.norm(self.emb(ids)))


def _train_objects(seed=0):
    torch.manual_seed(seed)
    model = Tied()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = build_scheduler(opt, ScheduleConfig(warmup_steps=2), total_steps=10, warmup_steps=2)
    return model, opt, sched


def _step(model, opt, sched):
    ids = torch.randint(0, 6, (3, 5))
    loss = nn.functional.cross_entropy(model(ids).flatten(0, 1), ids.flatten())
    loss.backward()
    opt.step()
    opt.zero_grad()
    sched.step()


def test_rng_states_round_trip():
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    state = capture_rng()
    a = (random.random(), np.random.rand(), torch.rand(2))
    restore_rng(state)
    b = (random.random(), np.random.rand(), torch.rand(2))
    assert a[0] == b[0] and a[1] == b[1] and torch.equal(a[2], b[2])


def test_tied_weights_are_stored_once_and_restored(tmp_path):
    model = Tied()
    save_weights(model.state_dict(), tmp_path / "w.safetensors")
    state = load_weights(tmp_path / "w.safetensors")
    assert set(state) == set(model.state_dict())
    fresh = Tied()
    fresh.load_state_dict(state)
    assert torch.equal(fresh.out.weight, model.emb.weight)


def test_resume_continues_bitwise(tmp_path):
    model, opt, sched = _train_objects()
    torch.manual_seed(5)
    for _ in range(3):
        _step(model, opt, sched)
    ckpt = Checkpointer(tmp_path / "ck", keep_last=2)
    ckpt.save(3, model=model, optimizer=opt, scheduler=sched, data_state={"cursor": 17, "epoch": [1, 2]},
              extra={"best_metric": 0.5})
    for _ in range(2):
        _step(model, opt, sched)
    expected = {k: v.clone() for k, v in model.state_dict().items()}

    model2, opt2, sched2 = _train_objects(seed=99)  # different init: everything must come from the checkpoint
    torch.manual_seed(1234)  # and the RNG too
    restored = ckpt.load(ckpt.latest(), model=model2, optimizer=opt2, scheduler=sched2)
    assert restored.step == 3 and restored.data_state == {"cursor": 17, "epoch": [1, 2]}
    assert restored.extra == {"best_metric": 0.5}
    for _ in range(2):
        _step(model2, opt2, sched2)
    for key, value in model2.state_dict().items():
        assert torch.equal(value, expected[key]), key
    assert sched2.get_last_lr() == sched.get_last_lr()


def test_files_load_with_weights_only(tmp_path):
    model, opt, sched = _train_objects()
    _step(model, opt, sched)
    ckpt = Checkpointer(tmp_path, keep_last=1)
    ckpt.save(1, model=model, optimizer=opt, scheduler=sched, data_state={"pos": 3})
    directory = tmp_path / step_name(1)
    assert sorted(p.name for p in directory.iterdir()) == [META, "model.safetensors", "rank-00000.pt", "trainer.pt"]
    for name in ("trainer.pt", "rank-00000.pt"):
        torch.load(directory / name, weights_only=True)
    assert json.loads((directory / META).read_text())["step"] == 1


def test_incomplete_checkpoint_is_ignored_and_replaced(tmp_path):
    model, opt, sched = _train_objects()
    ckpt = Checkpointer(tmp_path)
    ckpt.save(2, model=model, optimizer=opt, scheduler=sched)
    # A save killed mid-way leaves a staging dir, or a step dir without meta.json: neither counts.
    (tmp_path / ".tmp-step-0000004").mkdir()
    (tmp_path / step_name(4)).mkdir()
    (tmp_path / step_name(4) / "model.safetensors").write_bytes(b"garbage")
    assert ckpt.latest() == 2
    ckpt.save(4, model=model, optimizer=opt, scheduler=sched)
    assert ckpt.latest() == 4
    assert not (tmp_path / ".tmp-step-0000004").exists()
    ckpt.load(4, model=Tied())


def test_complete_checkpoint_is_never_overwritten(tmp_path):
    model, opt, sched = _train_objects()
    ckpt = Checkpointer(tmp_path)
    ckpt.save(2, model=model, optimizer=opt, scheduler=sched)
    before = (tmp_path / step_name(2) / "model.safetensors").read_bytes()
    with torch.no_grad():
        model.emb.weight.fill_(float("nan"))
    ckpt.save(2, model=model, optimizer=opt, scheduler=sched)
    assert (tmp_path / step_name(2) / "model.safetensors").read_bytes() == before


def test_keep_last_n_and_the_protected_best(tmp_path):
    model, opt, sched = _train_objects()
    ckpt = Checkpointer(tmp_path, keep_last=2)
    for step in (1, 2, 3, 4, 5):
        ckpt.save(step, model=model, optimizer=opt, scheduler=sched, keep={2})
    assert ckpt.steps() == [2, 4, 5]


def test_world_size_mismatch_is_refused(tmp_path):
    model, opt, sched = _train_objects()
    Checkpointer(tmp_path).save(1, model=model, optimizer=opt, scheduler=sched)
    meta = json.loads((tmp_path / step_name(1) / META).read_text())
    meta["world_size"] = 2
    (tmp_path / step_name(1) / META).write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="same world size"):
        Checkpointer(tmp_path).load(1, model=model)


def test_s3_store_round_trip_and_prune():
    moto = pytest.importorskip("moto")
    import boto3

    with moto.mock_aws():
        client = boto3.client("s3", region_name="us-east-1")
        client.create_bucket(Bucket="ckpts")
        model, opt, sched = _train_objects()
        _step(model, opt, sched)
        ckpt = Checkpointer("s3://ckpts/runs/text", keep_last=1)
        ckpt.store = S3Store("s3://ckpts/runs/text", client=client)
        ckpt.save(1, model=model, optimizer=opt, scheduler=sched, data_state={"pos": 1})
        # a partial upload (no meta.json) does not count as a checkpoint
        client.put_object(Bucket="ckpts", Key="runs/text/step-0000009/model.safetensors", Body=b"partial")
        assert ckpt.steps() == [1]
        assert ckpt.uri(1) == "s3://ckpts/runs/text/step-0000001"
        _step(model, opt, sched)
        ckpt.save(2, model=model, optimizer=opt, scheduler=sched, data_state={"pos": 2})
        assert ckpt.steps() == [2]
        fresh, opt2, sched2 = _train_objects(seed=3)
        restored = ckpt.load(2, model=fresh, optimizer=opt2, scheduler=sched2)
        assert restored.data_state == {"pos": 2}
        assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), model.state_dict().values()))


def test_local_store_lists_only_complete(tmp_path):
    store = LocalStore(tmp_path / "missing")
    assert store.steps() == []


def test_checkpoints_of_another_fingerprint_are_discarded(tmp_path):
    model, opt, sched = _train_objects()
    old = Checkpointer(tmp_path, fingerprint="config-a")
    old.save(3, model=model, optimizer=opt, scheduler=sched)
    assert Checkpointer(tmp_path, fingerprint="config-a").discard_unresumable() == []
    new = Checkpointer(tmp_path, fingerprint="config-b")
    assert new.discard_unresumable() == [3]
    assert new.latest() is None
    new.save(3, model=model, optimizer=opt, scheduler=sched)  # the same step number can be written again
    assert json.loads((tmp_path / step_name(3) / META).read_text())["fingerprint"] == "config-b"


def test_a_finished_run_is_not_resumed_but_an_interrupted_one_is(tmp_path):
    model, opt, sched = _train_objects()
    first = Checkpointer(tmp_path, fingerprint="same")
    first.run_id = "run-1"
    for step in (2, 4):
        first.save(step, model=model, optimizer=opt, scheduler=sched)
    interrupted = Checkpointer(tmp_path, fingerprint="same")
    assert interrupted.discard_unresumable() == [] and interrupted.latest() == 4
    assert interrupted.resumable_run_id() == "run-1"  # the resumed stage continues that MLflow run
    interrupted.mark_complete(4)
    rerun = Checkpointer(tmp_path, fingerprint="same")
    assert rerun.discard_unresumable() == [2, 4]  # a re-run of a finished run (dvc repro --force) trains again
    assert rerun.latest() is None and rerun.resumable_run_id() is None
    assert not (tmp_path / "complete.json").exists()
    rerun.save(2, model=model, optimizer=opt, scheduler=sched)
    assert Checkpointer(tmp_path, fingerprint="same").discard_unresumable() == []  # interrupted again: resumed


def test_s3_store_keeps_the_completion_marker():
    moto = pytest.importorskip("moto")
    import boto3

    with moto.mock_aws():
        client = boto3.client("s3", region_name="us-east-1")
        client.create_bucket(Bucket="ckpt")
        model, opt, sched = _train_objects()
        done = Checkpointer("s3://ckpt/run/joint", s3_client=client, fingerprint="same")
        done.save(2, model=model, optimizer=opt, scheduler=sched)
        assert done.store.read_marker() is None
        done.mark_complete(2)
        assert done.store.read_marker()["step"] == 2
        assert Checkpointer("s3://ckpt/run/joint", s3_client=client, fingerprint="same").discard_unresumable() == [2]
        assert done.store.read_marker() is None and done.steps() == []
