"""The sweep machinery: seeding, resume by name, best params, per-trial isolation, MLflow nesting, reporting,
the simplex and fractional search space, pruning, and several worker processes on one study (budget, seeds, a
killed worker's trial retried while live trials are left alone).

The joint stage is replaced by a cheap deterministic function of the sampled ratios and warm-up (its optimum is
known), so these tests check the machinery, not training."""
from __future__ import annotations

import json
import multiprocessing
import os
import signal
import threading
import time
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
    """Peaks at a 60 % pair share and 8 warm-up steps (of a trial's 60)."""
    ratios = cfg.data.mixing.ratios
    share = ratios["pair"] / sum(ratios.values())
    warmup = cfg.train.joint.warmup_steps
    return 1.0 - (share - 0.6) ** 2 - ((warmup - 8) / 20.0) ** 2


class FakeJoint:
    """Records what each trial saw and writes outputs where the joint stage would."""

    def __init__(self, fail_on: set[int] = frozenset(), metric="best_zeroshot_top1"):
        self.calls: list[dict] = []
        self.fail_on, self.metric = fail_on, metric

    def __call__(self, cfg, on_eval=None):
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
        final = score(cfg)
        if on_eval is not None:  # a curve rising to the final score, reported at each evaluation
            for step in range(cfg.train.eval_every, cfg.train.joint.steps + 1, cfg.train.eval_every):
                early = final - 0.3 * (1 - step / cfg.train.joint.steps)
                on_eval(step, {"top1": early, "mrr": (1 + early) / 2})
        return {self.metric: final, "steps": cfg.train.joint.steps}


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
    fields.setdefault("pruner", "none")
    return SweepConfig(**fields)


def trials_of(sweep: SweepConfig) -> list[optuna.trial.FrozenTrial]:
    return sweeplib.open_study(sweep).get_trials(deepcopy=False)


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
    # The best trial sits in the optimum region (score 1 at a 60 % pair share, 8 warm-up steps of 60).
    assert out["best_value"] > 0.97
    assert out["best_values"]["data.mixing.ratios.pair"] == pytest.approx(0.6, abs=0.12)
    # The best overrides, applied like --set to a trial-length config, reproduce the best trial's score; on the
    # pipeline's own config the warm-up keeps its share of the (longer) joint stage.
    short = PipelineConfig.model_validate(sweeplib.apply_overrides(cfg.model_dump(mode="json"),
                                                                   sweep.trial_overrides))
    trial_cfg = sweeplib.trial_config(short, SweepConfig(trial_overrides=[], space=sweep.space),
                                      out["best_params"], workspace / "again")
    assert score(trial_cfg) == pytest.approx(out["best_value"])
    best_cfg = sweeplib.apply_best(cfg, out)
    fraction = out["best_params"]["train.joint.warmup_steps"]
    assert best_cfg.train.joint.warmup_steps == round(fraction * cfg.train.joint.steps)
    assert sum(best_cfg.data.mixing.ratios.values()) == pytest.approx(1.0)
    assert set(out["best_values"]) == {"data.mixing.ratios.pair", "data.mixing.ratios.image",
                                       "data.mixing.ratios.text", "train.joint.warmup_steps"}


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

    second = FakeJoint()
    out = sweeplib.run_sweep(PipelineConfig(), sweep=make(second, monkeypatch, n_trials=5))
    doc = json.loads((workspace / "reports" / "sweep.json").read_text())
    assert len(second.calls) == 2 and out["n_complete"] == 5
    assert doc["trials"][:3] == before  # history kept
    assert doc["best"]["value"] == max(t["value"] for t in doc["trials"])
    assert len({json.dumps(c["ratios"]) for c in first.calls + second.calls}) == 5  # no draw replayed

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
        assert float(run.data.params["data.mixing.ratios.pair"]) == pytest.approx(
            trial["values"]["data.mixing.ratios.pair"])
        assert call["ratios"]["pair"] == pytest.approx(trial["values"]["data.mixing.ratios.pair"])
        assert call["parent"] == trial["mlflow_run_id"]  # the stage run nests under its trial run
    assert os.environ[PARENT_RUN_ENV] == pipeline_run  # restored
    assert sweep_run.data.tags["sweep.best_trial_run_id"] == trials[
        [t["number"] for t in trials].index(json.loads((workspace / "reports" / "sweep.json").read_text())[
            "best"]["number"])]["mlflow_run_id"]
    logged = {a.path for a in client.list_artifacts(out["mlflow_run_id"], "plots")}
    assert {"plots/optimization_history.png", "plots/parallel_coordinate.png", "plots/slice.png"} <= logged
    assert (workspace / "reports" / "plots" / "optimization_history.png").stat().st_size > 1000


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
        def __call__(self, cfg, on_eval=None):
            return dict(super().__call__(cfg), best_zeroshot_top1=None)

    with pytest.raises(ValueError, match="evaluated nothing.*train.eval_every"):
        sweeplib.run_sweep(PipelineConfig(), sweep=make(NoEval(), monkeypatch, n_trials=1, study_name="none"))
    with pytest.raises(ValueError, match="low"):
        SearchParam(key="a", low=1.0, high=0.5)
    with pytest.raises(ValueError, match="whole bounds"):
        SearchParam(key="a", low=0.5, high=3, kind="int")
    with pytest.raises(ValueError, match="more than once"):
        SweepConfig(space=[SearchParam(key="a", low=0, high=1), SearchParam(key="a", low=0, high=2)])
    with pytest.raises(ValueError, match="two or more distinct parts"):
        SearchParam(key="data.mixing.ratios", kind="simplex", parts=["pair"])
    with pytest.raises(ValueError, match="parts only"):
        SearchParam(key="data.mixing.ratios", kind="simplex", parts=["pair", "text"], low=0, high=1)
    with pytest.raises(ValueError, match="fraction_of needs kind float"):
        SearchParam(key="train.joint.warmup_steps", kind="int", low=0, high=5, fraction_of="train.joint.steps")
    with pytest.raises(ValueError, match="train.joint.stepz"):
        sweeplib.run_sweep(PipelineConfig(), sweep=make(FakeJoint(), monkeypatch, n_trials=1, space=[
            SearchParam(key="train.joint.warmup_steps", low=0, high=0.2, fraction_of="train.joint.stepz")]))



def test_simplex_ratios_are_uniform_shares_and_fractions_scale_with_steps():
    space = [SearchParam(key="data.mixing.ratios", kind="simplex", parts=["pair", "image", "text"]),
             SearchParam(key="train.joint.warmup_steps", low=0.0, high=0.3, fraction_of="train.joint.steps")]
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    tree = PipelineConfig().model_dump(mode="json")
    shares = []
    for _ in range(600):
        trial = study.ask()
        values = sweeplib.applied(tree, space, sweeplib.suggest(trial, space))
        study.tell(trial, 0.0)
        parts = [values[f"data.mixing.ratios.{k}"] for k in ("pair", "image", "text")]
        assert sum(parts) == pytest.approx(1.0) and min(parts) > 0
        assert values["train.joint.warmup_steps"] == round(trial.params["train.joint.warmup_steps"] * 300)
        shares.append(parts)
    # Dirichlet(1, 1, 1): each share has mean 1/3 and P(share > 1/2) = 1/4; renormalised uniform ranges do not.
    for k in range(3):
        column = [row[k] for row in shares]
        assert sum(column) / len(column) == pytest.approx(1 / 3, abs=0.03)
        assert sum(c > 0.5 for c in column) / len(column) == pytest.approx(0.25, abs=0.05)


def test_categorical_and_conditional_params():
    """A categorical param takes one of its choices; a conditional one (``when``) is drawn and applied only in the
    trials where its condition holds, and the config keeps its own value elsewhere."""
    space = [SearchParam(key="train.schedule.decay", kind="categorical", choices=["cosine", "linear", "constant"]),
             SearchParam(key="train.schedule.min_lr_ratio", low=0.0, high=0.5,
                         when={"train.schedule.decay": "cosine"})]
    cfg = PipelineConfig()
    sweeplib.check_space(cfg, space)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    tree = cfg.model_dump(mode="json")
    seen = set()
    for _ in range(40):
        trial = study.ask()
        params = sweeplib.suggest(trial, space)
        values = sweeplib.applied(tree, space, params)
        study.tell(trial, 0.0)
        decay = params["train.schedule.decay"]
        seen.add(decay)
        assert ("train.schedule.min_lr_ratio" in params) == (decay == "cosine") == (
            "train.schedule.min_lr_ratio" in values)
        applied_cfg = sweeplib.apply_best(cfg, {"best_overrides": sweeplib.as_overrides(values)})
        assert applied_cfg.train.schedule.decay == decay
        expected = values.get("train.schedule.min_lr_ratio", cfg.train.schedule.min_lr_ratio)
        assert applied_cfg.train.schedule.min_lr_ratio == pytest.approx(expected)
    assert seen == {"cosine", "linear", "constant"}

    with pytest.raises(ValueError, match="two or more distinct choices"):
        SearchParam(key="train.schedule.decay", kind="categorical", choices=["cosine"])
    with pytest.raises(ValueError, match="choices are for kind categorical only"):
        SearchParam(key="train.schedule.min_lr_ratio", low=0.0, high=0.5, choices=[0.1, 0.2])
    later = [space[1], space[0]]  # the condition's param must come first
    with pytest.raises(ValueError, match="earlier in the space"):
        sweeplib.check_space(cfg, later)
    wrong = [space[0], space[1].model_copy(update={"when": {"train.schedule.decay": "step"}})]
    with pytest.raises(ValueError, match="not among"):
        sweeplib.check_space(cfg, wrong)


def test_hopeless_trials_are_pruned_at_their_evaluations(workspace, monkeypatch, tracking_uri):
    fake = FakeJoint()
    sweep = make(fake, monkeypatch, n_trials=10, pruner="median", prune_startup_trials=2, prune_after_steps=0,
                 trial_overrides=["train.joint.steps=60", "train.eval_every=10"])
    out = sweeplib.run_sweep(PipelineConfig(), sweep=sweep)
    doc = json.loads((workspace / "reports" / "sweep.json").read_text())
    pruned = [t for t in doc["trials"] if t["state"] == "PRUNED"]
    assert pruned and out["n_pruned"] == len(pruned) and out["n_complete"] + len(pruned) == 10
    assert all(t["last_step"] < 60 for t in pruned)  # stopped before the last evaluation
    assert doc["trial_steps"] < 10 * 60
    client = mlflow.tracking.MlflowClient(tracking_uri)
    for t in pruned:
        run = client.get_run(t["mlflow_run_id"])
        assert run.info.status == "KILLED" and run.data.tags["sweep.trial_state"] == "PRUNED"
    curve = next(t for t in trials_of(sweep) if t.state == optuna.trial.TrialState.PRUNED).intermediate_values
    assert curve and max(curve) < 60  # the curve up to the step where it was pruned


# ------------------------------------------------------------------------------ several workers on one study
def quick_stage(cfg, on_eval=None):
    """Stage for worker processes (importable by spawned children): short, and scores like ``score``."""
    time.sleep(0.2)
    return {"best_zeroshot_top1": score(cfg)}


def stuck_stage(cfg, on_eval=None):
    """Stage of the worker that gets killed: says it started, then never finishes."""
    Path(cfg.paths.reports).mkdir(parents=True, exist_ok=True)
    (Path(cfg.paths.reports).parent.parent / "stuck-started").write_text(cfg.paths.reports)
    time.sleep(600)
    return {}


def test_two_worker_processes_share_one_budget_with_their_own_seeds(workspace):
    sweep = SweepConfig(n_trials=6, n_startup_trials=6, pruner="none", heartbeat_s=1)
    out = sweeplib.run_sweep(PipelineConfig(), sweep=sweep, workers=2, stage=quick_stage)
    trials = trials_of(sweep)
    complete = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(complete) == 6 == out["n_complete"]
    assert sorted(t.number for t in complete) == sorted(t.number for t in trials if sweeplib.counts(t, set()))
    draws = [json.dumps(t.params, sort_keys=True) for t in complete]
    assert len(set(draws)) == 6  # no trial twice: the two workers' samplers are seeded apart
    surplus = [t for t in trials if t.user_attrs.get("failure") == sweeplib.SURPLUS]
    assert len(trials) == 6 + len(surplus)


def test_a_killed_workers_trial_is_retried_and_live_trials_are_left_alone(workspace):
    sweep = SweepConfig(n_trials=4, pruner="none", heartbeat_s=1, grace_s=3, max_retry=1)
    cfg = PipelineConfig()
    sweeplib.open_study(sweep)
    victim = multiprocessing.get_context("spawn").Process(
        target=sweeplib._worker_process, args=(cfg, sweep, 0, 1, stuck_stage, ""))
    victim.start()
    started = workspace / "reports" / "sweep" / "flava-joint" / "stuck-started"
    deadline = time.monotonic() + 120
    while not started.exists():
        assert time.monotonic() < deadline and victim.is_alive(), "the victim worker never started its trial"
        time.sleep(0.2)

    seen: dict[str, object] = {}

    def kill_when_the_rest_is_done():
        # The other worker finishes its three trials while the victim's trial is live (heartbeating): it must
        # still be RUNNING then. Only after that is the victim killed.
        while sum(t.state == optuna.trial.TrialState.COMPLETE for t in trials_of(sweep)) < 3:
            time.sleep(0.2)
        time.sleep(4)  # longer than grace_s: a heartbeating trial is not stale however long it runs
        seen["victim_trial"] = trials_of(sweep)[0].state
        os.kill(victim.pid, signal.SIGKILL)

    killer = threading.Thread(target=kill_when_the_rest_is_done, daemon=True)
    killer.start()
    ran = sweeplib.work(cfg, sweep, stage=quick_stage)
    killer.join(timeout=60)
    victim.join(timeout=60)

    trials = trials_of(sweep)
    assert seen["victim_trial"] == optuna.trial.TrialState.RUNNING
    assert trials[0].state == optuna.trial.TrialState.FAIL  # failed by heartbeat once its worker died
    retry = [t for t in trials if optuna.storages.RetryHeartbeatStaleTrialCallback.retried_trial_number(t) == 0]
    assert len(retry) == 1 and retry[0].state == optuna.trial.TrialState.COMPLETE
    assert retry[0].params == trials[0].params  # retried with the lost trial's params
    complete = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(complete) == 4 and ran == 4
    assert len({json.dumps(t.params, sort_keys=True) for t in complete}) == 4


def test_cli_sweep_apply_writes_the_winner_into_params_yaml(workspace, monkeypatch):
    from flava.cli import main
    from flava.config import load_config

    root = Path(__file__).resolve().parents[2]
    (workspace / "params.yaml").write_text((root / "params.yaml").read_text())
    monkeypatch.setattr(sweeplib, "run_joint_stage", FakeJoint())
    assert main(["sweep", "--apply", "--set", "launch.sweep.n_trials=3", "--set", "launch.sweep.pruner=none"]) == 0
    doc = json.loads((workspace / "reports" / "sweep.json").read_text())
    applied = load_config(workspace / "params.yaml")
    for key, value in doc["best"]["values"].items():
        section, leaf = key.rsplit(".", 1)
        node = applied.model_dump(mode="json")
        for part in section.split("."):
            node = node[part]
        assert node[leaf] == pytest.approx(value)
    assert applied.train.joint.steps == load_config(root / "params.yaml").train.joint.steps  # only the winner changed


def test_workers_that_start_at_the_same_moment_never_draw_the_same_params(workspace):
    """Two `flava sweep` runs (each worker 0) that open the study before either has a trial: their samplers are
    seeded per trial number, which the storage hands out once, so their draws differ."""
    sweep = SweepConfig(n_trials=4, n_startup_trials=4, pruner="none")
    first, second = (sweeplib.open_study(sweep) for _ in range(2))
    for study in (first, second):
        study.sampler = sweeplib.trial_seeded_sampler(PipelineConfig(), sweep)
    space = sweep.space
    draws = []
    for study in (first, second, first, second):
        trial = study.ask()
        sweeplib.suggest(trial, space)
        draws.append(json.dumps(trial.params, sort_keys=True))
        study.tell(trial, 0.5)
    assert len(set(draws)) == 4, draws


def test_a_relative_study_storage_is_under_the_workspace_root(tmp_path, monkeypatch):
    """`launch.sweep.storage` as a relative path (the default) or a relative sqlite:/// URL means one file under the
    workspace root, so a worker started in a subdirectory (or a flow run whose cwd is elsewhere but runs under DVC)
    opens the same study as the CLI at the root; absolute paths and server URLs are kept as given."""
    monkeypatch.delenv("DVC_ROOT", raising=False)
    root = tmp_path / "project"
    (root / ".dvc").mkdir(parents=True)
    (root / "flows" / "sub").mkdir(parents=True)
    expected = f"sqlite:///{root / 'reports/sweep/optuna.db'}"
    monkeypatch.chdir(root)
    assert sweeplib.storage_url("reports/sweep/optuna.db") == expected
    sweep = SweepConfig(study_name="s", storage="reports/sweep/optuna.db")
    sweeplib.open_study(sweep).enqueue_trial({"x": 1})
    monkeypatch.chdir(root / "flows" / "sub")
    assert sweeplib.storage_url("reports/sweep/optuna.db") == expected
    assert sweeplib.storage_url("sqlite:///reports/sweep/optuna.db") == expected
    assert len(sweeplib.open_study(sweep).get_trials(deepcopy=False)) == 1  # the study written from the root
    assert not (root / "flows" / "sub" / "reports").exists()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    monkeypatch.setenv("DVC_ROOT", str(root))
    assert sweeplib.storage_url("reports/sweep/optuna.db") == expected
    for kept in ("postgresql://optuna@db/optuna", f"sqlite:///{tmp_path}/abs.db", "sqlite:///:memory:"):
        assert sweeplib.storage_url(kept) == kept


def test_the_pruner_is_told_the_configured_evaluation_metric(workspace, monkeypatch, tracking_uri):
    fake = FakeJoint()
    sweep = make(fake, monkeypatch, n_trials=2, pruner="median", prune_metric="top1",
                 trial_overrides=["train.joint.steps=60", "train.eval_every=20"])
    sweeplib.run_sweep(PipelineConfig(), sweep=sweep)
    for t in trials_of(sweep):  # the fake's top-1 curve ends at the trial's value; its mrr curve does not
        assert sorted(t.intermediate_values) == [20, 40, 60] and t.intermediate_values[60] == t.value
    bad = make(FakeJoint(), monkeypatch, n_trials=1, study_name="bad-metric", prune_metric="loss")
    with pytest.raises(ValueError, match="launch.sweep.prune_metric 'loss' is not in the evaluation's"):
        sweeplib.run_sweep(PipelineConfig(), sweep=bad)
