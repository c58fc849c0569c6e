"""The real pretraining stages on a tiny generated world: text || image -> joint, outputs, MLflow model, CLI
resume after SIGKILL (bitwise), divergence handling and clear errors."""
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from flava.config import PipelineConfig, apply_overrides, dump_config
from flava.train.checkpoint import Checkpointer, load_weights

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow

DIRS = dict(raw="raw", prepared="prepared", validated="validated", shards="shards", artifacts="artifacts",
            models="models", checkpoints="checkpoints", reports="reports")


def _tree(root: Path) -> dict:
    return {
        "paths": {k: str(root / v) for k, v in DIRS.items()},
        "model": {"preset": "tiny"},
        "data": {
            "generate": {"pairs": 96, "images_per_class": 2, "text_passages": 64,
                         "zeroshot_per_class": {"train": 1, "val": 1, "test": 1}, "retrieval_images": 6,
                         "text_cls": {"train": 6, "val": 6, "test": 6}, "vqa": {"train": 6, "val": 6, "test": 6}},
            "codebook": {"num_codes": 16, "iters": 3, "sample_images": 32},
            "tokenizer": {"vocab_size": 200, "max_length": 16},
        },
        "train": {"text": {"steps": 6, "batch_size": 8}, "image": {"steps": 6, "batch_size": 8},
                  "joint": {"steps": 8, "batch_size": 8}, "log_every": 2, "eval_every": 4, "checkpoint_every": 4,
                  "eval_batch_size": 16},
        "tracking": {"tracking_uri": f"sqlite:///{root}/mlflow.db", "artifact_location": str(root / "mlartifacts"),
                     "log_system_metrics": False, "experiment": "train-tests"},
    }


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from flava.data.fit import run_fit
    from flava.data.ingest import run_prepare
    from flava.data.shards import run_shard
    from flava.data.synthetic import run_generate
    from flava.data.validate import run_validate

    root = tmp_path_factory.mktemp("world")
    cfg = PipelineConfig.model_validate(_tree(root))
    for stage in (run_generate, run_prepare, run_validate, run_shard, run_fit):
        stage(cfg)
    return root


def _cfg(root: Path, out: Path, *overrides: str) -> PipelineConfig:
    tree = _tree(root)
    for key in ("models", "checkpoints", "reports"):
        tree["paths"][key] = str(out / key)
    tree["tracking"]["tracking_uri"] = f"sqlite:///{out}/mlflow.db"
    tree["tracking"]["artifact_location"] = str(out / "mlartifacts")
    return PipelineConfig.model_validate(apply_overrides(tree, list(overrides)))


@pytest.fixture
def clean_env(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("FLAVA_PARENT_RUN_ID", raising=False)


def test_text_image_then_joint(world, tmp_path, clean_env):
    from flava.model.io import load_model
    from flava.train.stages import run_pretrain

    cfg = _cfg(world, tmp_path)
    text = run_pretrain(cfg, "text")
    image = run_pretrain(cfg, "image")
    for name, result in (("text", text), ("image", image)):
        assert (tmp_path / "models" / name / "model.safetensors").exists()
        report = json.loads((tmp_path / "reports" / f"pretrain_{name}.json").read_text())
        assert report["steps"] == 6 and report["final_loss"] < report["first_loss"] * 1.5
        assert report["frozen_parameters"] > 0  # the other tower is neither trained nor held by the optimizer
    assert set(text["final_losses"]) == {"loss_mlm"} and set(image["final_losses"]) == {"loss_mim"}

    # the image stage left the text tower untouched (frozen), the text stage trained it
    text_model = load_model(tmp_path / "models" / "text")
    image_model = load_model(tmp_path / "models" / "image")
    assert not torch.equal(text_model.text_encoder.word_embeddings.weight,
                           image_model.text_encoder.word_embeddings.weight)
    fresh = image_model.text_encoder.state_dict()  # the image stage's text tower: still its initial weights
    assert not any(torch.equal(v, text_model.text_encoder.state_dict()[k]) for k, v in fresh.items() if v.ndim == 2)

    joint = run_pretrain(cfg, "joint")
    assert joint["steps"] == 8 and joint["best_step"] in (4, 8)
    assert set(joint["init_from_unimodal"]) == {"text_encoder", "mlm_head", "image_encoder", "mim_head"}
    assert 0.0 <= joint["best_zeroshot_top1"] <= 1.0 and "zeroshot_top5" in joint
    assert sum(joint["mixing_counts"].values()) == 8
    for sub in ("last", "best"):
        directory = tmp_path / "models" / "joint" / sub
        assert (directory / "model.safetensors").exists() and (directory / "tokenizer" / "tokenizer.json").exists()
    selection = json.loads((tmp_path / "models" / "joint" / "best" / "selection.json").read_text())
    assert selection["step"] == joint["best_step"] and selection["top1"] == joint["best_zeroshot_top1"]
    assert Checkpointer(tmp_path / "checkpoints" / "joint").steps() == [4, 8]

    # metrics files hold metrics only; what the run was goes beside them; curves for dvc plots
    reports = tmp_path / "reports"
    metrics = json.loads((reports / "joint.json").read_text())
    record = json.loads((reports / "joint.run.json").read_text())
    assert metrics["best_step"] == joint["best_step"]
    assert not {"mlflow_run_id", "model_uri", "best_dir", "model_dir", "checkpoint", "samples_per_s",
                "resumed_from", "stage"} & set(metrics)
    assert record["mlflow_run_id"] == joint["mlflow_run_id"] and record["model_uri"] == joint["model_uri"]
    assert record["resumed_from"] is None and record["samples_per_s"] > 0
    assert "mlflow_run_id" in json.loads((reports / "pretrain_text.run.json").read_text())
    curve = (reports / "curves" / "joint.csv").read_text().splitlines()
    assert curve[0].split(",")[:2] == ["step", "loss"] and curve[0].endswith(",lr")
    assert "loss_contrastive" in curve[0] and "samples_per_s" not in curve[0]
    assert [int(row.split(",")[0]) for row in curve[1:]] == [2, 4, 6, 8]
    zeroshot = (reports / "curves" / "joint_zeroshot.csv").read_text().splitlines()
    assert zeroshot[0].startswith("step,") and "top1" in zeroshot[0] and len(zeroshot) == 3  # evals at 4 and 8
    text_curve = (reports / "curves" / "pretrain_text.csv").read_text().splitlines()
    assert text_curve[0] == "step,loss,loss_mlm,lr" and len(text_curve) == 4  # rows at 2, 4, 6

    # the logged model loads back from MLflow and embeds texts and images
    import mlflow
    import pandas as pd

    mlflow.set_tracking_uri(cfg.tracking.tracking_uri)
    loaded = mlflow.pyfunc.load_model(joint["model_uri"])
    flavor = loaded.metadata.flavors["python_function"]
    assert "model_code_path" in flavor and "python_model" not in flavor  # logged from code: no pickle inside
    png = io.BytesIO()
    Image.new("RGB", (40, 40), (200, 30, 30)).save(png, format="PNG")
    out = loaded.predict(pd.DataFrame({"text": ["a red circle", None], "image": [None, png.getvalue()]}))
    emb = np.stack([out["text_embedding"][0], out["image_embedding"][1]])  # each row's one input
    assert emb.shape == (2, text_model.config.projection_dim)
    assert np.allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-4)
    run = mlflow.get_run(joint["mlflow_run_id"])
    assert run.data.tags["flava.stage"] == "joint" and "best_zeroshot_top1" in run.data.metrics
    assert "loss_contrastive" in run.data.metrics and "lr" in run.data.metrics


def test_joint_needs_the_unimodal_encoders_unless_from_scratch(world, tmp_path, clean_env):
    from flava.train.stages import run_pretrain

    with pytest.raises(FileNotFoundError, match="flava pretrain text"):
        run_pretrain(_cfg(world, tmp_path), "joint")
    result = run_pretrain(_cfg(world, tmp_path, "train.joint.init_from_unimodal=false",
                               "train.joint.steps=4"), "joint")
    assert result["init_from_unimodal"] == {} and result["steps"] == 4


def test_joint_stopped_at_an_evaluation_ends_killed_with_its_curve(world, tmp_path, clean_env):
    """What a sweep's pruner does: on_eval raises EarlyStop; the run ends KILLED with the reason and the curve
    up to that evaluation, no model is exported, and the stop reaches the caller."""
    import mlflow

    from flava.train.stages import run_pretrain
    from flava.train.stop import EarlyStop

    seen = []

    def on_eval(step, results):
        seen.append((step, dict(results)))
        if step >= 4:
            raise EarlyStop(f"pruned at step {step}")

    cfg = _cfg(world, tmp_path, "train.joint.init_from_unimodal=false", "train.joint.steps=8",
               "train.eval_every=2")
    with pytest.raises(EarlyStop, match="pruned at step 4"):
        run_pretrain(cfg, "joint", on_eval=on_eval)
    assert [step for step, _ in seen] == [2, 4]
    assert all(set(r) == {"top1", "top5", "mrr"} and 0.0 < r["mrr"] <= 1.0 for _, r in seen)
    curve = (tmp_path / "reports" / "curves" / "joint_zeroshot.csv").read_text().splitlines()
    assert len(curve) == 3  # header + the evaluations at steps 2 and 4
    assert not (tmp_path / "models" / "joint").exists()
    client = mlflow.tracking.MlflowClient(cfg.tracking.tracking_uri)
    [run] = client.search_runs([client.get_experiment_by_name(cfg.tracking.experiment).experiment_id])
    assert run.info.status == "KILLED" and run.data.tags["flava.stopped_early"] == "pruned at step 4"
    assert "error" not in run.data.tags


def test_nonfinite_loss_stops_with_a_clear_error(world, tmp_path, clean_env):
    from flava.train.loop import NonFiniteLossError
    from flava.train.stages import run_pretrain

    # an absurd learning rate blows the MLM loss up within a few steps
    cfg = _cfg(world, tmp_path, "train.text.steps=40", "train.text.lr=1e6", "train.grad_clip=null",
               "train.schedule.warmup_steps=0", "train.checkpoint_every=1", "train.keep_last=3")
    with pytest.raises(NonFiniteLossError, match="non-finite"):
        run_pretrain(cfg, "text")
    ckpt = Checkpointer(tmp_path / "checkpoints" / "text")
    latest = ckpt.latest()
    assert latest is not None
    weights = load_weights(tmp_path / "checkpoints" / "text" / f"step-{latest:07d}" / "model.safetensors")
    assert all(torch.isfinite(t).all() for t in weights.values())


def _cli(params: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "flava", "pretrain", "text", "--params", str(params), *extra]


def test_cli_sigkill_and_resume_is_bitwise_equal(world, tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "FLAVA_PARENT_RUN_ID")}
    env["OMP_NUM_THREADS"] = "1"
    sets = ["--set", "train.text.steps=40", "--set", "train.checkpoint_every=3", "--set", "train.log_every=5"]
    ref_params = dump_config(_cfg(world, tmp_path / "ref"), tmp_path / "ref.yaml")
    subprocess.run(_cli(ref_params, *sets), cwd=ROOT, env=env, check=True, timeout=300, capture_output=True)

    out = tmp_path / "killed"
    params = dump_config(_cfg(world, out), tmp_path / "killed.yaml")
    proc = subprocess.Popen(_cli(params, *sets), cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    ckpt = Checkpointer(out / "checkpoints" / "text")
    deadline = time.time() + 240
    while time.time() < deadline and not ckpt.steps():
        assert proc.poll() is None, "the run finished before it could be killed"
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = ckpt.latest()
    assert killed_at is not None and killed_at < 40
    done = subprocess.run(_cli(params, *sets), cwd=ROOT, env=env, check=True, timeout=300, capture_output=True,
                          text=True)
    result = json.loads(done.stdout[done.stdout.index("{"):])
    assert result["resumed_from"] == killed_at and result["steps"] == 40
    ref = load_weights(tmp_path / "ref" / "models" / "text" / "model.safetensors")
    got = load_weights(out / "models" / "text" / "model.safetensors")
    assert ref.keys() == got.keys()
    assert all(torch.equal(ref[k], got[k]) for k in ref)


class _Interrupt(BaseException):
    """Stands for Ctrl-C: raised from inside the training loop."""


def _interrupt_at(monkeypatch, step: int) -> None:
    """Make the next run stop (like a KeyboardInterrupt) when it is about to train ``step``."""
    from flava.train.loop import Trainer

    inner = Trainer._train_step

    def train_step(self):
        if self.state.step == step - 1:
            monkeypatch.setattr(Trainer, "_train_step", inner)  # the next run trains normally
            raise _Interrupt
        inner(self)

    monkeypatch.setattr(Trainer, "_train_step", train_step)


def test_only_an_interrupted_run_of_the_same_identity_resumes(world, tmp_path, clean_env, monkeypatch):
    from flava.stages import stage_identity
    from flava.train.stages import run_pretrain

    cfg = _cfg(world, tmp_path, "train.text.steps=4", "train.checkpoint_every=2")
    first = run_pretrain(cfg, "text")
    assert first["resumed_from"] is None and first["steps"] == 4
    same = run_pretrain(cfg, "text")
    assert same["resumed_from"] is None and same["steps"] == 4  # a finished run is trained again (dvc repro -f)
    assert same["final_loss"] == first["final_loss"]

    _interrupt_at(monkeypatch, 3)
    with pytest.raises(_Interrupt):
        run_pretrain(cfg, "text")
    changed = _cfg(world, tmp_path, "train.text.steps=4", "train.checkpoint_every=2", "train.text.lr=5e-4")
    again = run_pretrain(changed, "text")  # another identity: the interrupted checkpoints are not resumed
    assert again["resumed_from"] is None and again["steps"] == 4
    meta = json.loads((tmp_path / "checkpoints" / "text" / "step-0000004" / "meta.json").read_text())
    assert meta["fingerprint"] == stage_identity(changed, "pretrain_text")


def test_a_resumed_stage_continues_its_mlflow_run(world, tmp_path, clean_env, monkeypatch):
    import mlflow

    from flava.train.stages import run_pretrain

    cfg = _cfg(world, tmp_path, "train.text.steps=6", "train.checkpoint_every=2", "train.log_every=1")
    ref = run_pretrain(_cfg(world, tmp_path / "ref", "train.text.steps=6", "train.checkpoint_every=2",
                            "train.log_every=1"), "text")
    # mlflow.set_tracking_uri exports $MLFLOW_TRACKING_URI, which would send the next stage to ref's store
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    _interrupt_at(monkeypatch, 4)
    with pytest.raises(_Interrupt):
        run_pretrain(cfg, "text")
    client = mlflow.MlflowClient(cfg.tracking.tracking_uri)
    (interrupted,) = client.search_runs([client.get_experiment_by_name("train-tests").experiment_id])
    assert interrupted.info.status == "FAILED"
    result = run_pretrain(cfg, "text")
    assert result["resumed_from"] == 2 and result["mlflow_run_id"] == interrupted.info.run_id
    run = client.get_run(result["mlflow_run_id"])
    assert run.info.status == "FINISHED" and run.data.tags["resumed_from_step"] == "2"
    steps = sorted({m.step for m in client.get_metric_history(run.info.run_id, "loss")})
    assert steps == [1, 2, 3, 4, 5, 6]  # one continuous curve across the two attempts
    assert result["final_loss"] == ref["final_loss"] and result["first_loss"] == ref["first_loss"]
    assert (tmp_path / "reports" / "curves" / "pretrain_text.csv").read_bytes() == (
        tmp_path / "ref" / "reports" / "curves" / "pretrain_text.csv").read_bytes()

    # the interrupted run was deleted from the store: a new run says which run it resumes
    _interrupt_at(monkeypatch, 4)
    with pytest.raises(_Interrupt):
        run_pretrain(cfg, "text")
    gone = json.loads((tmp_path / "checkpoints" / "text" / "step-0000002" / "meta.json").read_text())["mlflow_run_id"]
    client.delete_run(gone)
    fresh = run_pretrain(cfg, "text")
    assert fresh["resumed_from"] == 2 and fresh["mlflow_run_id"] != gone
    assert client.get_run(fresh["mlflow_run_id"]).data.tags["resumed_from_run"] == gone


def test_stages_trained_concurrently_in_threads_equal_sequential_runs(world, tmp_path, clean_env):
    """The Prefect route trains the text and image stages in two threads of one process: they must not perturb
    each other (no global RNG in model init or ITM negatives), so the bytes equal those of one-by-one runs."""
    import threading

    from flava.train.stages import run_pretrain

    sequential = _cfg(world, tmp_path / "sequential")
    for stage in ("text", "image"):
        run_pretrain(sequential, stage)
    concurrent = _cfg(world, tmp_path / "concurrent")
    errors: list[BaseException] = []

    def train(stage: str) -> None:
        try:
            run_pretrain(concurrent, stage)
        except BaseException as err:  # re-raised below, in the test's thread
            errors.append(err)

    threads = [threading.Thread(target=train, args=(stage,)) for stage in ("text", "image")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    for name in ("models/text/model.safetensors", "models/image/model.safetensors", "reports/pretrain_text.json",
                 "reports/pretrain_image.json", "reports/curves/pretrain_text.csv"):
        assert (tmp_path / "concurrent" / name).read_bytes() == (tmp_path / "sequential" / name).read_bytes(), name
