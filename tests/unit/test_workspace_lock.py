"""Every route holds the workspace: a stage command started outside a pipeline run (a plain `dvc repro`, a
`flava data ...` typed by hand) takes the workspace lock itself, and one a pipeline run started does not wait for
its own parent."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from flava.workspace import HELD_ENV, LOCK_FILE, workspace_lock

ROOT = Path(__file__).resolve().parents[2]
FLAVA = str(Path(sys.executable).parent / "flava")


def _resolve(ws: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([FLAVA, "stages", "resolve"], cwd=ws, env=env, capture_output=True, text=True)


def test_stage_command_respects_the_pipeline_holding_the_workspace(tmp_path):
    ws = tmp_path / "ws"
    (ws / ".dvc").mkdir(parents=True)
    shutil.copy(ROOT / "params.yaml", ws / "params.yaml")
    outsider = {k: v for k, v in os.environ.items() if k != HELD_ENV}
    with workspace_lock(ws, "flava pipeline run (test)"):
        assert os.environ[HELD_ENV] == str((ws / LOCK_FILE).resolve())
        busy = _resolve(ws, outsider)
        assert busy.returncode == 2, busy.stderr
        assert "is busy: flava pipeline run (test)" in busy.stderr
        assert not (ws / "reports/params.yaml").exists()
        child = _resolve(ws, dict(os.environ))  # started by the holder: inherits the mark
        assert child.returncode == 0, child.stderr
    assert HELD_ENV not in os.environ
    alone = _resolve(ws, outsider)  # nobody holds it: the command takes it for itself
    assert alone.returncode == 0, alone.stderr


def test_a_torchrun_group_is_one_stage_command(tmp_path):
    """Under torchrun every rank runs the stage command; rank 0 holds the workspace for the group and the other
    ranks do not queue behind it (they would fail as 'busy' and take the group down)."""
    ws = tmp_path / "ws"
    (ws / ".dvc").mkdir(parents=True)
    shutil.copy(ROOT / "params.yaml", ws / "params.yaml")
    outsider = {k: v for k, v in os.environ.items() if k not in (HELD_ENV, "RANK")}
    with workspace_lock(ws, "rank 0 of the group", timeout_s=0.0):
        assert _resolve(ws, {**outsider, "RANK": "1"}).returncode == 0
        assert _resolve(ws, {**outsider, "RANK": "0"}).returncode == 2
