"""Lineage facts for tags: git commit, data version (from ``data.dvc``), host. No MLflow import here."""
from __future__ import annotations

import os
import socket
import subprocess
from pathlib import Path

import yaml

PARENT_RUN_ENV = "FLAVA_PARENT_RUN_ID"  # set by `flava pipeline run`; stage runs nest under it
GIT_COMMIT_ENV = "FLAVA_GIT_COMMIT"  # baked into the image (infra/Dockerfile), which has no git checkout


def git_commit(root: str | Path = ".") -> str:
    """HEAD commit, with ``-dirty`` when tracked files differ; outside a git checkout the commit the image was built
    from (``FLAVA_GIT_COMMIT``), else ``unknown``."""
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=root, capture_output=True, text=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return os.environ.get(GIT_COMMIT_ENV) or "unknown"
    return f"{sha}-dirty" if dirty else sha


def data_version(root: str | Path = ".", dvc_file: str = "data.dvc") -> str:
    """The md5 DVC recorded for the raw data (``outs[0].md5``), or ``untracked`` without a .dvc file."""
    path = Path(root) / dvc_file
    if not path.exists():
        return "untracked"
    outs = (yaml.safe_load(path.read_text()) or {}).get("outs") or [{}]
    return str(outs[0].get("md5", "untracked"))


def host() -> str:
    return socket.gethostname()


def short_commit(commit: str) -> str:
    """``git_commit``'s value shortened for names: 7 hex digits, keeping ``-dirty``; other values unchanged."""
    sha, dirty, _ = commit.partition("-dirty")
    if len(sha) == 40 and all(c in "0123456789abcdef" for c in sha):
        return sha[:7] + dirty
    return commit
