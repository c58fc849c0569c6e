"""The Prefect flow with the REAL stages (tiny model, short stages, the synthetic world) against a real temporary
Prefect server: same params + same data = same bytes, whichever route ran them. Two flow runs on two copies of
one workspace and a plain `dvc repro` on a third give byte-identical models and metrics files. Slow (minutes on
2 CPU cores): the data stages run once, in the shared base, and the three routes train from there.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from prefect.testing.utilities import prefect_test_harness

from flava import pipeline as pl
from flava.config import load_config
from flava.tracking.lineage import PARENT_RUN_ENV
from flows import pipeline as pipe
from tests.e2e.conftest import make_project, run

pytestmark = [pytest.mark.slow, pytest.mark.timeout(2400)]

COMPARED = ("models/joint/best/model.safetensors", "reports/joint.json", "reports/eval/metrics.json")


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """A fresh project (tiny preset, short stages) whose raw data and data stages are in place."""
    root = tmp_path_factory.mktemp("determinism")
    repo = make_project(root, root / "remote")
    assert pl.ensure_raw_data(load_config(repo / "params.yaml"), repo) == "generated"
    run(repo, "dvc", "repro", "shard", "fit")
    return repo


def _copy(base: Path, name: str) -> Path:
    copy = base.parent / name
    shutil.copytree(base, copy, symlinks=True)
    return copy


def test_two_flow_runs_and_dvc_repro_give_the_same_bytes(base, monkeypatch):
    by_dvc = _copy(base, "by-dvc")
    run(by_dvc, "dvc", "repro")
    flows = [_copy(base, "flow-a"), _copy(base, "flow-b")]
    with prefect_test_harness(server_startup_timeout=180):
        for ws in flows:
            monkeypatch.chdir(ws)
            monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{ws / 'mlflow.db'}")
            monkeypatch.delenv(PARENT_RUN_ENV, raising=False)
            state = pipe.flava_pipeline(return_state=True)
            assert state.is_completed(), state
            result = state.result()
            # The data stages were done in the base: DVC skips them on this route too.
            assert {result[s]["status"] for s in ("prepare", "validate", "shard", "fit")} == {"up to date"}
            assert {result[s]["status"] for s in ("pretrain_text", "pretrain_image", "joint", "evaluate")} == {"ran"}
    for rel in COMPARED:
        reference = (by_dvc / rel).read_bytes()
        for ws in flows:
            assert (ws / rel).read_bytes() == reference, f"{rel} differs between dvc repro and the flow in {ws.name}"
