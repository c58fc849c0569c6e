"""SIGTERM/SIGINT during ``Trainer.fit``: a real signal to this process stops the run at the next step boundary with
a checkpoint of that step, the handlers are restored, and the resumed run ends with the same weights."""
import os
import signal
import threading

import pytest
import torch

from flava.exitcodes import Preempted
from flava.train.checkpoint import Checkpointer
from flava.train.stop import StopSignals
from tests.toy import build, toy_args

TRAIN = {"joint": {"steps": 20, "batch_size": 16}, "optimizer": {"lr": 3e-2}, "schedule": {"warmup_steps": 3},
         "log_every": 1, "checkpoint_every": 5, "keep_last": 2}


def _signal_at(trainer, step: int, sig: signal.Signals) -> None:
    """Send ``sig`` to this process from the metrics sink of ``step`` (after that step's all-reduce)."""
    def sink(at, metrics):
        if at == step:
            os.kill(os.getpid(), sig)
    trainer.sink = sink


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_saves_the_next_step_boundary_and_resume_is_exact(tmp_path, sig):
    ref_model, ref = build(toy_args(train=TRAIN, ckpt=tmp_path / "ref", dropout=0.2))
    ref.fit()

    before = signal.getsignal(sig)
    _, trainer = build(toy_args(train=TRAIN, ckpt=tmp_path / "cut", dropout=0.2))
    _signal_at(trainer, 7, sig)
    with pytest.raises(Preempted, match=f"joint: {sig.name} at step 8/20") as stopped:
        trainer.fit()
    # the flag is read by step 8's all-reduce: step 8 is finished and saved, not only the boundary at 5
    assert stopped.value.step == 8 and Checkpointer(tmp_path / "cut").steps() == [5, 8]
    assert stopped.value.checkpoint == Checkpointer(tmp_path / "cut").uri(8)
    assert signal.getsignal(sig) is before  # the handler lives only while fit() runs

    model, again = build(toy_args(train=TRAIN, ckpt=tmp_path / "cut", dropout=0.2))
    assert again.resume() == 8
    assert again.fit()["steps"] == 20
    for (name, want), got in zip(ref_model.state_dict().items(), model.state_dict().values()):
        assert torch.equal(want, got), name
    strip = lambda rows: [{k: v for k, v in r.items() if k not in ("samples_per_s",)} for r in rows]  # noqa: E731
    assert strip(again.history) == strip(ref.history)


def test_a_signal_during_the_last_step_lets_the_run_finish(tmp_path):
    _, trainer = build(toy_args(train=TRAIN, ckpt=tmp_path))
    _signal_at(trainer, 19, signal.SIGTERM)  # read by step 20's all-reduce: the run is complete at that boundary
    assert trainer.fit()["steps"] == 20
    assert Checkpointer(tmp_path).steps() == [15, 20]


def test_a_second_ctrl_c_interrupts_at_once():
    before = signal.getsignal(signal.SIGINT)
    with StopSignals() as stop:
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.received == signal.SIGINT
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is before


def test_nothing_is_installed_outside_the_main_thread():
    seen = {}

    def body():
        with StopSignals():
            seen["inside"] = signal.getsignal(signal.SIGTERM)

    before = signal.getsignal(signal.SIGTERM)
    thread = threading.Thread(target=body)
    thread.start()
    thread.join()
    assert seen["inside"] is before
