"""infra/Dockerfile and .dockerignore, read as text (no Docker engine here), and the commit the image bakes in."""
from __future__ import annotations

import shlex
import subprocess
from pathlib import Path

import pytest

from flava.tracking import lineage

ROOT = Path(__file__).resolve().parents[2]
SOURCE = {".", "pyproject.toml", "README.md", "flava", "flows"}


def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order, continuation lines joined and comments dropped."""
    out, pending = [], ""
    for line in text.splitlines():
        if line.strip().startswith("#") or not line.strip():
            continue
        pending += line.rstrip()
        if pending.endswith("\\"):
            pending = pending[:-1] + " "
            continue
        keyword, _, args = pending.strip().partition(" ")
        out.append((keyword.upper(), " ".join(args.split())))
        pending = ""
    return out


@pytest.fixture(scope="module")
def steps():
    return instructions((ROOT / "infra" / "Dockerfile").read_text())


def index(steps, keyword: str, contains: str) -> int:
    hits = [i for i, (k, args) in enumerate(steps) if k == keyword and contains in args]
    assert hits, f"no {keyword} with {contains!r} in infra/Dockerfile"
    return hits[0]


def copied(args: str) -> list[str]:
    return [a.rstrip("/") for a in shlex.split(args) if not a.startswith("--")][:-1]


def test_dependencies_install_from_the_lock_before_any_source_is_copied(steps):
    first_source = min(i for i, (k, args) in enumerate(steps) if k == "COPY" and set(copied(args)) & SOURCE)
    lock_copy = index(steps, "COPY", "requirements/lock.txt")
    lock_install = index(steps, "RUN", "-r requirements/lock.txt")
    torch_install = index(steps, "RUN", "-r requirements/torch.txt")
    assert lock_copy < lock_install < torch_install < first_source
    assert "--require-hashes" in steps[lock_install][1] and "--no-deps" in steps[lock_install][1]
    uv_install = index(steps, "RUN", "-r requirements/uv.txt")
    assert "--require-hashes" in steps[uv_install][1]
    project_install = index(steps, "RUN", "--no-build-isolation .")
    assert project_install > first_source and "--no-deps" in steps[project_install][1]


def test_the_image_has_a_c_compiler_for_torch_compile(steps):
    apt = steps[index(steps, "RUN", "apt-get install")][1]
    assert {"gcc", "g++", "libc6-dev"} <= set(apt.split())


def test_the_image_runs_as_uid_1000_numerically(steps):
    users = [args for k, args in steps if k == "USER"]
    assert users[-1] == "1000:1000"
    useradd = steps[index(steps, "RUN", "useradd")][1]
    assert "--uid 1000" in useradd and "--gid 1000" in useradd
    assert index(steps, "USER", "1000:1000") > index(steps, "RUN", "useradd")


def test_the_commit_is_a_build_arg_an_oci_label_and_the_env_lineage_reads(steps):
    arg = index(steps, "ARG", "GIT_COMMIT")
    label = index(steps, "LABEL", "org.opencontainers.image.revision")
    env = index(steps, "ENV", lineage.GIT_COMMIT_ENV)
    assert '"${GIT_COMMIT}"' in steps[label][1]
    assert steps[env][1] == f"{lineage.GIT_COMMIT_ENV}=${{GIT_COMMIT}}"
    # Declared after every install, so a new commit rebuilds no dependency layer.
    assert arg > max(i for i, (k, args) in enumerate(steps) if k == "RUN" and "install" in args and "apt" not in args)


def test_the_lock_the_image_installs_has_the_gpu_metrics_library():
    assert "\nnvidia-ml-py==" in (ROOT / "requirements" / "lock.txt").read_text()


def test_dockerignore_keeps_local_state_out_and_what_the_image_copies_in(steps):
    ignored = {line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")}
    assert {".git", ".venv", "data", "mlruns", "mlartifacts", "models", "artifacts", "checkpoints",
            "**/__pycache__", ".dvc"} <= ignored
    for _, args in (s for s in steps if s[0] == "COPY"):
        for path in copied(args):
            assert not {path, path.split("/")[0]} & ignored, f"{path} is copied but .dockerignore excludes it"


def test_git_commit_outside_a_checkout_is_the_baked_in_commit(tmp_path, monkeypatch):
    monkeypatch.delenv(lineage.GIT_COMMIT_ENV, raising=False)
    assert lineage.git_commit(tmp_path) == "unknown"
    monkeypatch.setenv(lineage.GIT_COMMIT_ENV, "a" * 40)
    assert lineage.git_commit(tmp_path) == "a" * 40


def test_a_checkout_wins_over_the_baked_in_commit(tmp_path, monkeypatch):
    monkeypatch.setenv(lineage.GIT_COMMIT_ENV, "a" * 40)
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-c", "commit.gpgsign=false"]
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    (tmp_path / "f").write_text("x")
    subprocess.run(["git", "add", "f"], cwd=tmp_path, check=True)
    subprocess.run([*git, "commit", "-qm", "c"], cwd=tmp_path, check=True)
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=tmp_path, capture_output=True, text=True).stdout.strip()
    assert lineage.git_commit(tmp_path) == head
