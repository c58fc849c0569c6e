"""A real project for the end-to-end tests: the tracked tree copied into a fresh git repo with short stages, its
own DVC remote and MLflow store, run as a user runs it (byte-code writing on, the venv's `flava` and `dvc`).

The main job runs once per session (`main_job`); tests that change the workspace take a copy of it (`workspace`).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
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


def project_files() -> list[str]:
    """What a fresh clone holds: tracked files, plus new ones not yet committed (a developer's working tree)."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                            capture_output=True, text=True, check=True).stdout.split("\0")
    return sorted({name for name in listed if name and (ROOT / name).is_file()})


def git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=repo, check=True,
                          capture_output=True, text=True).stdout


def set_params(repo: Path, values: dict[tuple[str, ...], object]) -> None:
    path = repo / "params.yaml"
    params = yaml.safe_load(path.read_text())
    for keys, value in values.items():
        node = params
        for part in keys[:-1]:
            if node.get(part) is None:
                node[part] = {}
            node = node[part]
        node[keys[-1]] = value
    # the form DVC writes (empty values, not null), so DVC's own rewrites change nothing else
    path.write_text(yaml.safe_dump(params, sort_keys=False).replace(": null\n", ":\n"))


def user_env(repo: Path) -> dict[str, str]:
    """A user's environment: byte-code writing on (the CI machine sets PYTHONDONTWRITEBYTECODE), our venv on PATH,
    the project's own MLflow store."""
    env = dict(os.environ)
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    env.pop("FLAVA_PARENT_RUN_ID", None)
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    # The project's own code, as in a user's clone with its editable install (not this checkout's).
    env["PYTHONPATH"] = str(repo)
    env["MLFLOW_TRACKING_URI"] = f"sqlite:///{repo / 'mlflow.db'}"
    return env


def run(repo: Path, *cmd: str, env: dict[str, str] | None = None, check: bool = True,
        extra_env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    environment = env or user_env(repo)
    environment.update(extra_env or {})
    tool = str(BIN / cmd[0]) if (BIN / cmd[0]).exists() else cmd[0]
    proc = subprocess.run([tool, *cmd[1:]], cwd=repo, env=environment, capture_output=True, text=True)
    if check:
        assert proc.returncode == 0, f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n" \
                                     f"{proc.stderr[-6000:]}"
    return proc


def dvc_status(repo: Path) -> dict:
    return json.loads(run(repo, "dvc", "status", "--json").stdout)


def make_project(base: Path, remote: Path) -> Path:
    repo = base / "project"
    repo.mkdir(parents=True)
    for name in project_files():
        (repo / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, repo / name)
    set_params(repo, E2E_PARAMS)
    git(repo, "init", "-q")
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", "e2e")
    # the test's own remote (the default one is per user, ~/.cache/flava/dvc-remote): in .dvc/config.local
    run(repo, "dvc", "remote", "add", "--local", "-d", "e2e", str(remote))
    return repo


@dataclass
class MainJob:
    repo: Path
    remote: Path
    result: dict
    stdout: str
    reads: Path


@pytest.fixture(scope="session")
def main_job(tmp_path_factory) -> MainJob:
    """`flava pipeline run` once, on a fresh project, recording what each stage command read."""
    base = tmp_path_factory.mktemp("e2e")
    remote = base / "remote"
    repo = make_project(base, remote)
    reads = base / "reads"
    proc = run(repo, "flava", "pipeline", "run", "--json", extra_env={"FLAVA_RECORD_READS": str(reads)})
    # The stages print their own output first (dvc passes it through); the job's JSON object comes last.
    result = json.loads(proc.stdout[proc.stdout.rindex("\n{") + 1:])
    return MainJob(repo=repo, remote=remote, result=result, stdout=proc.stdout, reads=reads)


@pytest.fixture
def workspace(main_job: MainJob, tmp_path) -> Path:
    """A copy of the finished main job's project (git history, DVC cache, outputs, MLflow store) to change."""
    copy = tmp_path / "project"
    shutil.copytree(main_job.repo, copy, symlinks=True)
    return copy
