"""What `flava pipeline run` and the flow share, in real git + DVC repositories: the raw data is generated only when
data.dvc records the synthetic world; the workspace lock keeps a second run out with a clear message; the main job
ends with a few lines for a person (``--json`` for scripts)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from flava import pipeline as pl
from flava.config import load_config
from flava.tracking import lineage
from tests.integration.flow_workspace import ROOT, calls, make_workspace

BIN = Path(sys.executable).parent
OTHER_DATA_MD5 = "0123456789abcdef0123456789abcdef.dir"


def test_the_synthetic_world_constant_is_what_data_dvc_records():
    assert pl.SYNTHETIC_WORLD_MD5 == lineage.data_version(ROOT)


def _dvc_repo(path: Path, data_md5: str | None) -> Path:
    """A git + DVC repo with the project's params.yaml, a remote nobody can reach, and ``data.dvc`` (or none)."""
    path.mkdir()
    subprocess.run(["git", "init", "-q"], cwd=path, check=True)
    subprocess.run([pl.dvc_executable(), "init", "-q"], cwd=path, check=True)
    subprocess.run([pl.dvc_executable(), "remote", "add", "-d", "team", str(path / "unreachable" / "remote")],
                   cwd=path, check=True, capture_output=True)
    (path / "params.yaml").write_text((ROOT / "params.yaml").read_text())
    if data_md5:
        (path / "data.dvc").write_text(yaml.safe_dump(
            {"outs": [{"md5": data_md5, "size": 123, "nfiles": 2, "hash": "md5", "path": "data/raw"}]}))
    return path


@pytest.fixture
def generated(monkeypatch) -> list[Path]:
    """Records where the synthetic world would be generated (the real generator is the e2e test's)."""
    made: list[Path] = []

    def generate(gen, seed, root):
        made.append(Path(root))
        (Path(root) / "pairs").mkdir(parents=True)

    monkeypatch.setattr(pl, "generate", generate)
    return made


def test_other_data_that_no_remote_returns_is_not_replaced(tmp_path, generated):
    repo = _dvc_repo(tmp_path / "repo", OTHER_DATA_MD5)
    data_dvc = (repo / "data.dvc").read_text()
    with pytest.raises(FileNotFoundError) as err:
        pl.ensure_raw_data(load_config(repo / "params.yaml"), repo)
    message = str(err.value)
    assert f"team ({repo / 'unreachable' / 'remote'})" in message and OTHER_DATA_MD5 in message
    assert generated == [] and not (repo / "data" / "raw").exists()
    assert (repo / "data.dvc").read_text() == data_dvc


@pytest.mark.parametrize("data_md5", [pl.SYNTHETIC_WORLD_MD5, None], ids=["data.dvc-records-it", "no-data.dvc"])
def test_the_synthetic_world_is_generated_when_it_is_what_is_recorded(tmp_path, generated, data_md5):
    repo = _dvc_repo(tmp_path / "repo", data_md5)
    assert pl.ensure_raw_data(load_config(repo / "params.yaml"), repo) == "generated"
    assert generated == [repo / "data" / "raw"]
    assert pl.ensure_raw_data(load_config(repo / "params.yaml"), repo) == "present"


def _flava(ws: Path, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
               MLFLOW_TRACKING_URI=f"sqlite:///{ws / 'mlflow.db'}")
    env.pop(lineage.PARENT_RUN_ENV, None)
    return subprocess.run([str(BIN / "flava"), "pipeline", "run", *args], cwd=ws, env=env, capture_output=True,
                          text=True, timeout=600)


@pytest.mark.slow
def test_main_job_ends_with_lines_for_a_person_and_keeps_json_for_scripts(tmp_path):
    ws = make_workspace(tmp_path / "ws")
    first = _flava(ws)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    tail = first.stdout.strip().splitlines()[-4:]
    assert tail[0] == "flava v1 is @champion; overall 0.52, no earlier champion"
    assert tail[1] == "final loss text 1.25, image 1.25, joint 2.5; best zero-shot top-1 0.4; macro overall 0.52"
    assert tail[2] == "report: reports/eval/report.md"
    assert tail[3].startswith(f"MLflow: mlflow ui --backend-store-uri sqlite:///{ws / 'mlflow.db'} then open "
                              "http://127.0.0.1:5000/#/experiments/")
    assert "{" not in "\n".join(tail)

    second = _flava(ws, "--json")
    assert second.returncode == 0, second.stderr[-3000:]
    result = json.loads(second.stdout[second.stdout.rindex("\n{") + 1:])
    assert result["raw_data"] == "present" and result["promotion"]["decision"] == "champion"
    assert result["mlflow_url"].endswith(f"/runs/{result['parent_run_id']}")
    assert len(calls(ws)) == len(pl.dvc_stages(ws))  # the second run found every stage up to date

    # A second pipeline on a busy workspace fails at once and names the holder.
    with pl.workspace_lock(ws, "Prefect flow run busy-bee"):
        busy = _flava(ws)
    assert busy.returncode == 1
    assert "is busy: Prefect flow run busy-bee (pid" in busy.stderr and ".dvc/tmp/flava-pipeline.lock" in busy.stderr


def test_workspace_lock_waits_up_to_its_timeout(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from flava.pipeline import workspace_lock\n"
        f"with workspace_lock({str(tmp_path)!r}, 'the other run'):\n"
        "    print('held', flush=True); time.sleep(3)\n")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(pl.WorkspaceBusy, match="is busy: the other run"):
            with pl.workspace_lock(tmp_path, "me", timeout_s=0.5):
                pass
        start = time.monotonic()
        with pl.workspace_lock(tmp_path, "me", timeout_s=30):  # waits for the holder to let go
            assert time.monotonic() - start > 1.0
            assert "me (pid" in (tmp_path / pl.LOCK_FILE).read_text()
    finally:
        holder.wait(10)
