"""DVC's everyday paths on a real project after the main job (conftest.py): exactly what changed re-runs, a re-run
trains for real, a second clone pulls and is up to date, and experiments compare side by side.

Each test takes a copy of the finished main job's project, so they do not depend on each other.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from mlflow import MlflowClient

from tests.e2e.conftest import MainJob, dvc_status, git, run, set_params, user_env


def _changed_after_params(workspace: Path, values: dict) -> set[str]:
    """Stages DVC would re-run after ``values`` are set in params.yaml (the params stage resolved first)."""
    set_params(workspace, values)
    run(workspace, "dvc", "repro", "--single-item", "params")
    return set(dvc_status(workspace))


@pytest.mark.slow
def test_param_changes_re_run_only_the_stages_that_read_them(workspace: Path):
    assert _changed_after_params(workspace, {("train", "joint", "lr"): 5e-4}) == {"joint"}
    git(workspace, "checkout", "params.yaml")
    assert _changed_after_params(workspace, {("eval", "registry", "margin"): 0.2}) == {"promote"}
    git(workspace, "checkout", "params.yaml")
    # loader parallelism changes no result: nothing to re-run
    assert _changed_after_params(workspace, {("data", "loader", "num_workers"): 2}) == set()
    git(workspace, "checkout", "params.yaml")
    assert _changed_after_params(workspace, {("train", "text", "steps"): 13}) == {"pretrain_text"}
    git(workspace, "checkout", "params.yaml")
    # the model preset moves every stage that builds or fits for the model
    assert _changed_after_params(workspace, {("model", "preset"): "small"}) >= {"fit", "pretrain_text", "joint"}
    git(workspace, "checkout", "params.yaml")
    run(workspace, "dvc", "repro", "--single-item", "params")
    assert dvc_status(workspace) == {}


@pytest.mark.slow
def test_paths_come_from_params_yaml(workspace: Path):
    """`paths.prepared` moved in params.yaml moves the stage outputs DVC tracks (one source of truth)."""
    set_params(workspace, {("paths", "prepared"): "data/prep2"})
    status = dvc_status(workspace)
    assert "prepare" in status and "validate" in status
    run(workspace, "dvc", "repro", "--single-item", "params")
    run(workspace, "dvc", "repro", "--single-item", "prepare")
    assert (workspace / "data/prep2/pairs.jsonl").exists()


def _report(workspace: Path, stage: str) -> dict:
    return json.loads((workspace / f"reports/{stage}.run.json").read_text())


@pytest.mark.slow
def test_code_edit_and_force_train_again_with_the_same_result(workspace: Path):
    """A code edit re-runs the stages that run that code, and they train from step 0 (no stale checkpoint is
    resumed); `--force` trains again too; both give the same bytes as the first run (determinism)."""
    text_model = workspace / "models/text/model.safetensors"
    joint_best = workspace / "models/joint/best/model.safetensors"
    before_text, before_best = text_model.read_bytes(), joint_best.read_bytes()
    loop = workspace / "flava/train/loop.py"
    loop.write_text(loop.read_text() + "\n# an edit that changes no behaviour\n")
    changed = set(dvc_status(workspace))
    assert {"pretrain_text", "pretrain_image", "joint"} <= changed
    assert not changed & {"prepare", "validate", "shard", "fit", "evaluate", "promote"}, changed
    run(workspace, "dvc", "repro", "--single-item", "pretrain_text")
    report = _report(workspace, "pretrain_text")
    assert report["resumed_from"] is None
    assert json.loads((workspace / "reports/pretrain_text.json").read_text())["steps"] == 12
    assert text_model.read_bytes() == before_text

    run(workspace, "dvc", "repro", "--force", "--single-item", "joint")
    assert _report(workspace, "joint")["resumed_from"] is None
    assert json.loads((workspace / "reports/joint.json").read_text())["steps"] == 16
    assert joint_best.read_bytes() == before_best


DATA_OUTPUTS = ("data/prepared/metrics.json", "data/validated/metrics.json", "data/shards/metrics.json",
                "data/shards/pairs/index.json", "artifacts/fit.json", "artifacts/tokenizer/tokenizer.json")


def test_forced_data_stages_write_the_same_bytes(main_job: MainJob, workspace: Path):
    """The data stages run again from scratch write byte-identical outputs (metrics files hold no timings), so
    nothing downstream becomes stale."""
    run(workspace, "dvc", "repro", "--force", "--single-item", "prepare", "validate", "shard", "fit")
    for rel in DATA_OUTPUTS:
        assert (workspace / rel).read_bytes() == (main_job.repo / rel).read_bytes(), rel
    assert dvc_status(workspace) == {}


@pytest.mark.slow
def test_second_clone_pulls_and_is_up_to_date(main_job: MainJob, workspace: Path, tmp_path: Path):
    """Push from one clone, clone again, pull: nothing to re-run, and `flava promote` there explains itself when
    its MLflow store does not hold the evaluation run."""
    git(workspace, "add", "-A")
    git(workspace, "commit", "-qm", "main job results")
    run(workspace, "dvc", "push")
    clone = tmp_path / "clone"
    git(tmp_path, "clone", "-q", str(workspace), str(clone))
    run(clone, "dvc", "remote", "add", "--local", "-d", "e2e", str(main_job.remote))
    run(clone, "dvc", "pull")
    assert dvc_status(clone) == {}
    proc = run(clone, "dvc", "repro")
    assert "Running stage" not in proc.stdout, proc.stdout
    promotion_before = (clone / "reports/promotion.json").read_text()
    # the clone's own (empty) MLflow store does not hold the evaluation run
    proc = run(clone, "flava", "promote", check=False)
    assert proc.returncode != 0
    assert "not found" in proc.stderr and "MLFLOW_TRACKING_URI" in proc.stderr, proc.stderr[-2000:]
    assert (clone / "reports/promotion.json").read_text() == promotion_before


@pytest.mark.slow
def test_experiments_compare_side_by_side(workspace: Path, tmp_path: Path):
    """`dvc exp run --temp -S` twice (`+key` adds a key params.yaml leaves to its preset), with the default (relative) tracking URI: each run logs to the project's
    MLflow store (not one inside .dvc/tmp), leaves the registry alone and params.yaml as it was, and
    `dvc plots diff` draws both runs' training curves in one file; `exp show --only-changed` and `metrics diff`
    compare them."""
    git(workspace, "add", "-A")
    git(workspace, "commit", "-qm", "baseline")
    env = user_env(workspace)
    env.pop("MLFLOW_TRACKING_URI")  # params.yaml's sqlite:///mlflow.db, relative to the project
    client = MlflowClient(f"sqlite:///{workspace / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("flava").experiment_id
    runs_before = len(client.search_runs([experiment], max_results=1000))
    versions_before = len(client.search_model_versions("name='flava'"))
    params_before = (workspace / "params.yaml").read_text()
    for name, lr in (("lr-low", 2e-4), ("lr-high", 2e-3)):
        run(workspace, "dvc", "exp", "run", "--temp", "-n", name, "-S", f"+train.joint.lr={lr}", env=dict(env))
    assert (workspace / "params.yaml").read_text() == params_before
    assert not list((workspace / ".dvc").rglob("mlflow.db")), "an experiment logged to a throwaway store"
    assert len(client.search_runs([experiment], max_results=1000)) > runs_before
    assert len(client.search_model_versions("name='flava'")) == versions_before

    out = tmp_path / "plots"
    run(workspace, "dvc", "plots", "diff", "lr-low", "lr-high", "-o", str(out), env=dict(env))
    html = (out / "index.html").read_text()
    assert "lr-low" in html and "lr-high" in html and "joint.csv" in html
    # --md: the whole table (a terminal table cuts the columns past its width)
    table = run(workspace, "dvc", "exp", "show", "--only-changed", "--md", env=dict(env)).stdout
    assert "train.joint.lr" in table and "lr-high" in table
    metrics = json.loads(run(workspace, "dvc", "metrics", "diff", "lr-low", "lr-high", "--json", env=dict(env)).stdout)
    assert "reports/joint.json" in metrics


@pytest.mark.slow
def test_reverting_a_param_restores_from_the_run_cache(workspace: Path):
    """validate and evaluate write reports DVC does not cache in git's place: reverting a param still restores
    their outputs from DVC's run-cache instead of recomputing."""
    metrics = workspace / "data/validated/metrics.json"
    before = metrics.read_text()
    set_params(workspace, {("data", "validation", "min_accept_fraction"): 0.5})
    run(workspace, "dvc", "repro", "--single-item", "params")
    run(workspace, "dvc", "repro", "--single-item", "validate")
    git(workspace, "checkout", "params.yaml")
    run(workspace, "dvc", "repro", "--single-item", "params")
    proc = run(workspace, "dvc", "repro", "--single-item", "validate")
    assert "is cached" in proc.stdout, proc.stdout
    assert metrics.read_text() == before
    assert dvc_status(workspace) == {}
