"""The main job end to end, for real: a fresh git repo holding the project's tracked files, `flava pipeline run`
(synthetic raw data generated because no DVC remote holds it, then `dvc repro` of every stage under an MLflow
parent run), then the checks a user would make: metrics, nested MLflow runs, the registry champion, and that
a second run is a no-op.

The model is the `tiny` preset with short stages so this runs in a few minutes on 2 CPU cores; the raw data is the
default synthetic world, so it matches the committed `data.dvc`.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent

# Short stages: enough to exercise every path (checkpoints, zero-shot eval, best/last), not to learn much.
E2E_PARAMS = {
    ("model", "preset"): "tiny",
    ("train", "text", "steps"): 12,
    ("train", "image", "steps"): 12,
    ("train", "joint", "steps"): 16,
    ("train", "eval_every"): 8,
    ("train", "checkpoint_every"): 8,
    ("train", "log_every"): 4,
}


def _copy_tracked_tree(dst: Path) -> None:
    files = subprocess.run(
        ["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.split("\0")
    for name in filter(None, files):
        src = ROOT / name
        if src.is_file():
            (dst / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst / name)


def _set(tree: dict, path: tuple[str, ...], value) -> None:
    node = tree
    for part in path[:-1]:
        node = node.setdefault(part, {})
    node[path[-1]] = value


def _git(repo: Path, *args: str) -> None:
    subprocess.run(["git", *args], cwd=repo, check=True, capture_output=True)


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    repo = tmp_path_factory.mktemp("e2e") / "project"
    repo.mkdir()
    _copy_tracked_tree(repo)
    params = yaml.safe_load((repo / "params.yaml").read_text())
    for path, value in E2E_PARAMS.items():
        _set(params, path, value)
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    _git(repo, "init", "-q")
    _git(repo, "-c", "user.name=t", "-c", "user.email=t@t", "add", "-A")
    _git(repo, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "e2e")
    return repo


def _run_pipeline(repo: Path) -> dict:
    env = dict(os.environ)
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env["MLFLOW_TRACKING_URI"] = f"sqlite:///{repo / 'mlflow.db'}"
    env.pop("FLAVA_PARENT_RUN_ID", None)
    proc = subprocess.run(
        [str(BIN / "flava"), "pipeline", "run"], cwd=repo, env=env, capture_output=True, text=True
    )
    assert proc.returncode == 0, f"pipeline failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}"
    # The stages print their own JSON results first (dvc passes their stdout through); ours is the last object.
    return json.loads(proc.stdout[proc.stdout.rindex("\n{") + 1:])


@pytest.mark.slow
def test_main_job_end_to_end(project: Path):
    first = _run_pipeline(project)
    assert first["raw_data"] == "generated"

    # The regenerated synthetic world is byte-identical to what data.dvc records.
    status = subprocess.run(
        [str(BIN / "dvc"), "status", "--json"], cwd=project, capture_output=True, text=True, check=True
    )
    assert json.loads(status.stdout) == {}, status.stdout

    # Data stages: counts add up per corpus.
    data_metrics = json.loads((project / "data/validated/metrics.json").read_text())
    for corpus in ("pairs", "images", "text"):
        m = data_metrics[corpus]
        assert m["in"] == m["accepted"] + m["rejected"] and m["accepted"] > 0

    # Every stage's outputs exist; the joint stage kept best beside last.
    for out in ("models/text", "models/image", "models/joint/last", "models/joint/best", "artifacts/tokenizer"):
        assert any((project / out).iterdir()), out
    eval_metrics = json.loads((project / "reports/eval/metrics.json").read_text())
    assert (project / "reports/eval/report.md").read_text().strip()
    assert list((project / "reports/eval/plots").glob("*.png"))

    # MLflow: stage runs nest under the pipeline run; the registry holds a champion or a reasoned challenger.
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{project / 'mlflow.db'}")
    parent_id = first["parent_run_id"]
    experiment = client.get_experiment_by_name("flava")
    children = client.search_runs(
        [experiment.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent_id}'"
    )
    stages = {run.data.tags.get("flava.stage") or run.data.tags.get("stage") for run in children}
    assert {"text", "image", "joint", "evaluate"} <= stages, stages
    promotion = json.loads((project / "reports/promotion.json").read_text())
    assert promotion["decision"] in {"champion", "challenger"}
    if promotion["decision"] == "champion":
        assert client.get_model_version_by_alias(promotion["model_name"], "champion").version == str(
            promotion["version"]
        )
    else:
        assert promotion["reasons"], "a challenger carries the reasons it was not promoted"
    assert {"vision", "language", "multimodal", "overall"} <= set(eval_metrics["macro"])

    # A second run changes nothing: every stage is up to date and no output is rewritten.
    lock_before = (project / "dvc.lock").read_text()
    best_before = sorted(p.stat().st_mtime_ns for p in (project / "models/joint/best").rglob("*") if p.is_file())
    second = _run_pipeline(project)
    assert second["raw_data"] == "present"
    assert (project / "dvc.lock").read_text() == lock_before
    best_after = sorted(p.stat().st_mtime_ns for p in (project / "models/joint/best").rglob("*") if p.is_file())
    assert best_after == best_before
