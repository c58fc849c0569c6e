"""The sweep machinery: seeding, resume by name, best params, per-trial isolation, MLflow nesting, reporting.

The joint stage is replaced by a cheap deterministic function of the sampled ratios and warm-up (its optimum is
known), so these tests check the machinery, not training."""
from __future__ import annotations

import json
import os
from pathlib import Path

import mlflow
import optuna
import pytest

from flava.config import PipelineConfig
from flava.launch import sweep as sweeplib
from flava.launch.config import SearchParam, SweepConfig
from flava.tracking.lineage import PARENT_RUN_ENV

optuna.logging.set_verbosity(optuna.logging.WARNING)


def score(cfg) -> float:
    """Peaks at a 60 % pair share and 8 warm-up steps."""
    ratios = cfg.data.mixing.ratios
    share = ratios["pair"] / sum(ratios.values())
    warmup = cfg.train.joint.warmup_steps
    return 1.0 - (share - 0.6) ** 2 - ((warmup - 8) / 20.0) ** 2


class FakeJoint:
    """Records what each trial saw and writes outputs where the joint stage would."""

    def __init__(self, fail_on: set[int] = frozenset(), metric="best_zeroshot_top1"):
        self.calls: list[dict] = []
        self.fail_on, self.metric = fail_on, metric

    def __call__(self, cfg):
        n = len(self.calls)
        models = Path(cfg.paths.models)
        self.calls.append({
            "models": str(models), "checkpoints": cfg.paths.checkpoints, "reports": cfg.paths.reports,
            "steps": cfg.train.joint.steps, "eval_every": cfg.train.eval_every,
            "parent": os.environ.get(PARENT_RUN_ENV), "text_encoder": (models / "text" / "w.bin").read_text(),
            "ratios": dict(cfg.data.mixing.ratios), "warmup": cfg.train.joint.warmup_steps,
        })
        if n in self.fail_on:
            raise RuntimeError("loss is nan at step 3")
        (models / "joint" / "best").mkdir(parents=True)
        Path(cfg.paths.reports).mkdir(parents=True, exist_ok=True)
        (Path(cfg.paths.reports) / "joint.json").write_text("{}")
        return {self.metric: score(cfg), "steps": cfg.train.joint.steps}


@pytest.fixture(scope="module")
def tracking_uri(tmp_path_factory):
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"


@pytest.fixture
def workspace(tmp_path, monkeypatch, tracking_uri):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking_uri)
    monkeypatch.delenv(PARENT_RUN_ENV, raising=False)
    (tmp_path / "models" / "text").mkdir(parents=True)
    (tmp_path / "models" / "text" / "w.bin").write_text("text-encoder")
    (tmp_path / "models" / "image").mkdir()
    return tmp_path


def make(fake, monkeypatch, **fields):
    monkeypatch.setattr(sweeplib, "run_joint_stage", fake)
    fields.setdefault("n_startup_trials", 3)
    return SweepConfig(**fields)


def test_sweep_finds_the_optimum_region_and_reports_best(workspace, monkeypatch):
    fake = FakeJoint()
    sweep = make(fake, monkeypatch, n_trials=12)
    cfg = PipelineConfig()
    out = sweeplib.run_sweep(cfg, sweep=sweep)

    doc = json.loads((workspace / "reports" / "sweep.json").read_text())
    values = [t["value"] for t in doc["trials"]]
    assert len(fake.calls) == 12 and doc["n_complete"] == 12
    assert doc["best"]["value"] == max(values) == out["best_value"]
    assert out["best_params"] == doc["best"]["params"]
    # TPE after 3 random trials beats the random start-up trials.
    assert max(values[3:]) >= max(values[:3])
    # The best overrides, applied like --set, reproduce the best trial's score.
    best_cfg = sweeplib.apply_best(cfg, out)
    assert score(best_cfg) == pytest.approx(out["best_value"])
    assert set(out["best_params"]) == {p.key for p in sweep.space}


def test_trials_are_short_and_isolated_from_the_pipeline_outputs(workspace, monkeypatch):
    fake = FakeJoint()
    sweeplib.run_sweep(PipelineConfig(), sweep=make(fake, monkeypatch, n_trials=2))
    first, second = fake.calls
    assert first["steps"] == 60 and first["eval_every"] == 20  # launch.sweep.trial_overrides
    assert first["models"] != second["models"] and first["checkpoints"] != second["checkpoints"]
    assert "trial-0000" in first["checkpoints"] and "trial-0001" in second["checkpoints"]
    assert first["text_encoder"] == "text-encoder"  # unimodal encoders linked in
    assert not (workspace / "models" / "joint").exists()  # the pipeline's joint model untouched
    # Trial weights are removed (keep_trial_models: false), trial reports kept.
    assert not Path(first["models"]).exists()
    assert (Path(first["reports"]) / "joint.json").exists()


def test_same_seed_same_trials_other_seed_other_trials(workspace, monkeypatch):
    runs = {}
    for name, seed in (("a", 7), ("b", 7), ("c", 8)):
        fake = FakeJoint()
        sweeplib.run_sweep(PipelineConfig(), sweep=make(fake, monkeypatch, n_trials=5, seed=seed, study_name=name,
                                                          report=f"{name}.json"))
        runs[name] = [(c["ratios"], c["warmup"]) for c in fake.calls]
    assert runs["a"] == runs["b"]
    assert runs["a"] != runs["c"]


def test_resume_by_name_runs_only_the_missing_trials(workspace, monkeypatch):
    first = FakeJoint()
    sweeplib.run_sweep(PipelineConfig(), sweep=make(first, monkeypatch, n_trials=3))
    before = json.loads((workspace / "reports" / "sweep.json").read_text())["trials"]

    # A worker killed mid-trial leaves a RUNNING trial behind; resuming marks it failed.
    storage = f"sqlite:///{workspace / 'reports' / 'sweep' / 'optuna.db'}"
    optuna.load_study(study_name="flava-joint", storage=storage).ask()

    second = FakeJoint()
    out = sweeplib.run_sweep(PipelineConfig(), sweep=make(second, monkeypatch, n_trials=5))
    doc = json.loads((workspace / "reports" / "sweep.json").read_text())
    assert len(second.calls) == 2 and out["n_complete"] == 5
    assert doc["stale_marked_failed"] == 1 and doc["n_failed"] == 1
    assert doc["trials"][:3] == before  # history kept
    assert doc["best"]["value"] == max(t["value"] for t in doc["trials"] if t["value"] is not None)

    third = FakeJoint()
    sweeplib.run_sweep(PipelineConfig(), sweep=make(third, monkeypatch, n_trials=5))
    assert third.calls == []  # nothing left to do


def test_mlflow_sweep_run_nests_trials_and_their_stage_runs(workspace, monkeypatch, tracking_uri):
    client = mlflow.tracking.MlflowClient(tracking_uri)
    exp = client.get_experiment_by_name("flava") or client.get_experiment(client.create_experiment("flava"))
    pipeline_run = client.create_run(exp.experiment_id, run_name="pipeline").info.run_id
    monkeypatch.setenv(PARENT_RUN_ENV, pipeline_run)
    fake = FakeJoint()
    out = sweeplib.run_sweep(PipelineConfig(), sweep=make(fake, monkeypatch, n_trials=3))

    sweep_run = client.get_run(out["mlflow_run_id"])
    assert sweep_run.data.tags[sweeplib.PARENT_TAG] == pipeline_run
    assert sweep_run.info.status == "FINISHED"
    assert sweep_run.data.metrics["best_best_zeroshot_top1"] == pytest.approx(out["best_value"])
    trials = json.loads((workspace / "reports" / "sweep.json").read_text())["trials"]
    for call, trial in zip(fake.calls, trials):
        run = client.get_run(trial["mlflow_run_id"])
        assert run.data.tags[sweeplib.PARENT_TAG] == out["mlflow_run_id"]
        assert run.data.metrics["best_zeroshot_top1"] == pytest.approx(trial["value"])
        assert float(run.data.params["data.mixing.ratios.pair"]) == pytest.approx(trial["params"]["data.mixing.ratios.pair"])
        assert call["parent"] == trial["mlflow_run_id"]  # the stage run nests under its trial run
    assert os.environ[PARENT_RUN_ENV] == pipeline_run  # restored


def test_diverging_trial_fails_alone(workspace, monkeypatch):
    fake = FakeJoint(fail_on={1})
    out = sweeplib.run_sweep(PipelineConfig(), sweep=make(fake, monkeypatch, n_trials=3))
    doc = json.loads((workspace / "reports" / "sweep.json").read_text())
    assert [t["state"] for t in doc["trials"]] == ["COMPLETE", "FAIL", "COMPLETE"]
    assert out["n_complete"] == 2 and out["n_failed"] == 1


def test_configuration_errors_name_the_problem(workspace, monkeypatch):
    with pytest.raises(ValueError, match="data.mixing.ratio.pair"):
        sweeplib.run_sweep(PipelineConfig(), sweep=make(FakeJoint(), monkeypatch, n_trials=1, space=[
            SearchParam(key="data.mixing.ratio.pair", low=0.1, high=0.9)]))
    with pytest.raises(ValueError, match="'best_zeroshot_top1' is not in the joint stage's result"):
        sweeplib.run_sweep(PipelineConfig(), sweep=make(FakeJoint(metric="top1"), monkeypatch, n_trials=1,
                                                         study_name="m"))
    class NoEval(FakeJoint):
        def __call__(self, cfg):
            return dict(super().__call__(cfg), best_zeroshot_top1=None)

    with pytest.raises(ValueError, match="evaluated nothing.*train.eval_every"):
        sweeplib.run_sweep(PipelineConfig(), sweep=make(NoEval(), monkeypatch, n_trials=1, study_name="none"))
    with pytest.raises(ValueError, match="low"):
        SearchParam(key="a", low=1.0, high=0.5)
    with pytest.raises(ValueError, match="whole bounds"):
        SearchParam(key="a", low=0.5, high=3, kind="int")
    with pytest.raises(ValueError, match="more than once"):
        SweepConfig(space=[SearchParam(key="a", low=0, high=1), SearchParam(key="a", low=0, high=2)])
