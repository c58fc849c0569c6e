"""The generic training loop on a tiny module: learning, accumulation, precision, per-kind heads, divergence,
evaluation and best-checkpoint selection, progress output."""
import logging

import pytest
import torch

from flava.configbase import deep_merge
from flava.train.checkpoint import Checkpointer, load_weights, step_name
from flava.train.loop import LoopSettings, NonFiniteLossError
from flava.train.progress import Progress
from flava.train.unused import UnusedParameters, probe_unused
from tests.toy import ToyModel, build, toy_args

FAST = {"joint": {"steps": 40, "batch_size": 16}, "optimizer": {"lr": 3e-2}, "schedule": {"warmup_steps": 5},
        "log_every": 5, "checkpoint_every": 10, "keep_last": 2}


def _cfg(**over):
    return deep_merge(FAST, over)


def test_loss_goes_down_and_lr_follows_the_schedule():
    _, trainer = build(toy_args(train=_cfg()))
    summary = trainer.fit()
    losses = [h["loss"] for h in trainer.history]
    assert summary["steps"] == 40 and summary["samples"] == 40 * 16
    assert losses[-1] < 0.5 * losses[0]
    assert trainer.history[0]["lr"] == pytest.approx(3e-2)  # step 5 (end of warm-up)
    assert trainer.history[-1]["lr"] < 3e-2
    assert all(h["samples_per_s"] > 0 and h["grad_norm"] > 0 for h in trainer.history)


def test_accumulation_draws_micro_batches_per_step():
    _, trainer = build(toy_args(train=_cfg(accumulation=2)))
    trainer.fit()
    assert trainer.stream.index == 80 and trainer.stream.batch_size == 8


def test_global_batch_must_split_over_ranks_and_micro_steps():
    settings = LoopSettings(stage="joint", steps=1, global_batch=10, accumulation=4)
    with pytest.raises(ValueError, match="divisible"):
        settings.micro_batch(world_size=1)


def test_each_batch_is_checked_before_the_model_sees_it():
    _, trainer = build(toy_args(train=_cfg(joint={"steps": 3})))
    seen = []
    trainer.check_batch = lambda batch: seen.append(batch["kind"])
    trainer.fit()
    assert len(seen) == 3

    def reject(batch):
        raise ValueError("bad batch")

    _, trainer = build(toy_args(train=_cfg(joint={"steps": 3})))
    trainer.check_batch = reject
    with pytest.raises(ValueError, match="bad batch"):
        trainer.fit()
    assert trainer.state.step == 0


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_trains(precision):
    _, trainer = build(toy_args(train=_cfg(precision=precision)))
    trainer.fit()
    losses = [h["loss"] for h in trainer.history]
    assert losses[-1] < losses[0]
    assert (trainer.scaler is not None) == (precision == "fp16")


def test_unused_head_is_not_moved_by_momentum_under_touch():
    torch.manual_seed(0)
    model = ToyModel()
    probes = {k: {"kind": k, "x": torch.randn(2, 8), "y": torch.randn(2)} for k in ("a", "b")}
    unused = probe_unused(model, probes, torch.device("cpu"))
    assert unused == {"a": {"heads.b.weight", "heads.b.bias"}, "b": {"heads.a.weight", "heads.a.bias"}}
    assert all(p.grad is None for p in model.parameters())
    guard = UnusedParameters.setup(model, probes, torch.device("cpu"), distributed=True)
    assert model.touch_unused_parameters  # as under DDP: every parameter gets a (zero) gradient
    assert guard.frozen == [] and {k: len(v) for k, v in guard.by_kind.items()} == {"a": 2, "b": 2}
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)

    def step(kind, clear):
        model(probes[kind]).loss.backward()
        if clear:
            guard.clear([kind])
        opt.step()
        opt.zero_grad(set_to_none=True)

    step("b", clear=True)  # head b now has AdamW momentum
    before = model.heads.b.weight.detach().clone()
    step("a", clear=True)
    assert torch.equal(model.heads.b.weight, before)  # skipped like in one process
    step("a", clear=False)
    assert not torch.equal(model.heads.b.weight, before)  # a zero gradient would still move it


def test_nonfinite_stop_saves_last_good_state_and_raises(tmp_path):
    _, trainer = build(toy_args(train=_cfg(checkpoint_every=4), ckpt=tmp_path, nan_at=6))
    with pytest.raises(NonFiniteLossError, match="non-finite loss.*step 6.*on_nonfinite=skip"):
        trainer.fit()
    ckpt = Checkpointer(tmp_path)
    assert ckpt.steps() == [4, 6]
    weights = load_weights(tmp_path / step_name(6) / "model.safetensors")
    assert all(torch.isfinite(t).all() for t in weights.values())
    # step 6 holds the weights after 6 good updates: resuming continues past the bad batch and finishes
    _, again = build(toy_args(train=_cfg(checkpoint_every=4), ckpt=tmp_path, nan_at=6))
    assert again.resume() == 6
    assert again.fit()["steps"] == 40


def test_nonfinite_never_overwrites_an_existing_checkpoint(tmp_path):
    # the NaN batch is the first of step 8, right after the checkpoint of step 8 was written
    _, trainer = build(toy_args(train=_cfg(checkpoint_every=4), ckpt=tmp_path, nan_at=8))
    with pytest.raises(NonFiniteLossError):
        trainer.fit()
    meta_stream = torch.load(tmp_path / step_name(8) / "rank-00000.pt", weights_only=True)["data"]
    assert meta_stream == {"index": 8}  # the periodic checkpoint, not a re-save after the bad batch


def test_nonfinite_skip_skips_and_finishes(tmp_path):
    _, trainer = build(toy_args(train=_cfg(on_nonfinite="skip"), ckpt=tmp_path, nan_at=6))
    summary = trainer.fit()
    assert summary["skipped_steps"] == 1 and summary["steps"] == 40
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())


def test_too_many_consecutive_skips_stop(tmp_path):
    train = _cfg(on_nonfinite="skip", max_consecutive_skips=3)
    _, trainer = build(toy_args(train=train, ckpt=tmp_path, nan_at=6, nan_until=100))
    with pytest.raises(NonFiniteLossError, match="3 consecutive"):
        trainer.fit()
    assert trainer.state.skipped == 3


def test_evaluation_tracks_best_and_keeps_its_checkpoint(tmp_path):
    scores = iter([0.2, 0.6, 0.4, 0.5])
    bests = []
    train = _cfg(eval_every=10, checkpoint_every=10, keep_last=1)
    _, trainer = build(toy_args(train=train, ckpt=tmp_path, select_metric="top1"))
    trainer.evaluate = lambda: {"top1": next(scores), "top5": 1.0}
    trainer.on_best = lambda step, metrics: bests.append((step, metrics["top1"]))
    summary = trainer.fit()
    assert bests == [(10, 0.2), (20, 0.6)]
    assert summary["best_step"] == 20 and summary["best_metric"] == 0.6
    assert Checkpointer(tmp_path).steps() == [20, 40]  # the best is kept beside the last
    assert summary["last_eval"] == {"top1": 0.5, "top5": 1.0}


def test_evaluation_without_the_selection_metric_is_an_error():
    _, trainer = build(toy_args(train=_cfg(eval_every=10), select_metric="top1"))
    trainer.evaluate = lambda: {"top5": 1.0}
    with pytest.raises(ValueError, match="top1"):
        trainer.fit()


def test_plain_log_lines_without_a_terminal(caplog):
    _, trainer = build(toy_args(train=_cfg()))
    trainer.progress = Progress("joint", 40, enabled=True, interactive=False)
    with caplog.at_level(logging.INFO, logger="flava.train"):
        trainer.fit()
    lines = [r.getMessage() for r in caplog.records if r.name == "flava.train"]
    assert len(lines) == 8 and lines[0].startswith("joint step 5/40 loss=")
    assert "samples_per_s=" in lines[0]


def test_progress_bar_on_a_terminal(capsys):
    bar = Progress("joint", 10, enabled=True, interactive=True)
    bar.update(5, {"loss": 1.25, "samples_per_s": 100.0})
    bar.close()
    err = capsys.readouterr().err
    assert "pretrain joint" in err and "5/10" in err and "loss=1.25" in err


class _Stop(Exception):
    pass


def _run_with_records(ckpt, stop_after=None):
    """A toy run with evaluation drawing from a checkpointed generator; optionally interrupted after a step."""
    train = _cfg(log_every=4, checkpoint_every=6, eval_every=7)  # checkpoints fall inside logging windows
    _, trainer = build(toy_args(train=train, ckpt=ckpt, select_metric="top1"))
    gen = torch.Generator().manual_seed(7)
    trainer.generators = {"eval": gen}
    trainer.evaluate = lambda: {"top1": float(torch.rand((), generator=gen))}
    trainer.resume()
    if stop_after is not None:
        inner = trainer._train_step

        def step():
            if trainer.state.step == stop_after:
                raise _Stop
            inner()

        trainer._train_step = step
    summary = trainer.fit()
    return trainer, summary


def test_resume_restores_logged_rows_evaluations_window_and_generators(tmp_path):
    ref, ref_summary = _run_with_records(tmp_path / "ref")
    with pytest.raises(_Stop):
        _run_with_records(tmp_path / "cut", stop_after=20)  # last checkpoint at 18, between the rows of 16 and 20
    got, summary = _run_with_records(tmp_path / "cut")
    assert got.resumed_from == 18
    timing = {"samples_per_s", "mfu"}
    strip = lambda rows: [{k: v for k, v in row.items() if k not in timing} for row in rows]  # noqa: E731
    assert strip(got.history) == strip(ref.history) and len(got.history) == 10
    assert got.evals == ref.evals and [e["step"] for e in got.evals] == [7, 14, 21, 28, 35, 40]
    assert summary["best_step"] == ref_summary["best_step"] and got.state.best_eval == ref.state.best_eval
