"""The main job: the whole pipeline as ``dvc repro`` under one MLflow parent run.

``dvc.yaml`` is the single description of the stage graph; this module only makes sure the raw data is in
place (pulled from the DVC remote, else generated: the embedded synthetic world), opens the parent run the stage
runs nest under (``$FLAVA_PARENT_RUN_ID``), runs ``dvc repro`` and logs the pipeline's outcome to the parent run.
"""
from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Sequence

from flava.config import PipelineConfig, flatten
from flava.tracking import lineage

log = logging.getLogger(__name__)


def _tool_env() -> dict[str, str]:
    """Environment for subprocesses: this interpreter's bin dir first, so `flava` and `dvc` resolve to ours."""
    env = dict(os.environ)
    bin_dir = str(Path(sys.executable).parent)
    env["PATH"] = bin_dir + os.pathsep + env.get("PATH", "")
    return env


def _dvc(args: Sequence[str], root: Path, env: dict[str, str] | None = None, check: bool = True):
    cmd = [str(Path(sys.executable).parent / "dvc"), *args]
    log.info("running: dvc %s", " ".join(args))
    return subprocess.run(cmd, cwd=root, env=env or _tool_env(), check=check)


def ensure_raw_data(cfg: PipelineConfig, root: Path) -> str:
    """Make ``paths.raw`` present: keep it, else pull it from the DVC remote, else generate the synthetic world.

    Returns how it got there: ``present``, ``pulled`` or ``generated``.
    """
    raw = root / cfg.paths.raw
    if raw.is_dir() and any(raw.iterdir()):
        return "present"
    if (root / "data.dvc").exists():
        pulled = _dvc(["pull", "-q", "data.dvc"], root, check=False)
        if pulled.returncode == 0 and raw.is_dir() and any(raw.iterdir()):
            return "pulled"
        log.info("no DVC remote holds %s; generating the embedded synthetic world", cfg.paths.raw)
    from flava.data.synthetic import generate

    generate(cfg.data.generate, cfg.seed, raw)
    return "generated"


def _numeric_metrics(path: Path, prefix: str) -> dict[str, float]:
    if not path.exists():
        return {}
    flat = flatten(json.loads(path.read_text()), prefix)
    return {k.replace("@", "_at_"): float(v) for k, v in flat.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def run_pipeline(
    cfg: PipelineConfig, root: str | Path = ".", *, force: bool = False, dry: bool = False
) -> dict[str, Any]:
    """Run every stage of ``dvc.yaml`` that is not up to date, nested under one MLflow parent run."""
    from mlflow import MlflowClient
    from mlflow.entities import Metric, Param

    from flava.tracking.runs import STAGE_TAG, param_value, parent_run, tracking_uri

    root = Path(root).resolve()
    source = ensure_raw_data(cfg, root)
    uri = tracking_uri(cfg)
    client = MlflowClient(uri)
    tags = {
        STAGE_TAG: "pipeline",
        "git_commit": lineage.git_commit(root),
        "data_version": lineage.data_version(root),
        "raw_data": source,
        "host": lineage.host(),
    }
    with parent_run(cfg, tags) as run_id:
        params = [Param(k, param_value(v)) for k, v in cfg.flat().items()]
        for start in range(0, len(params), 100):  # MLflow takes at most 100 params per batch
            client.log_batch(run_id, params=params[start:start + 100])
        env = _tool_env()  # after parent_run: carries $FLAVA_PARENT_RUN_ID to the stages
        env["MLFLOW_TRACKING_URI"] = uri
        args = ["repro"] + (["--force"] if force else []) + (["--dry"] if dry else [])
        result = _dvc(args, root, env=env, check=False)
        if result.returncode != 0:
            raise RuntimeError(f"dvc repro failed with exit code {result.returncode}; see the stage output above")
        reports = root / cfg.paths.reports
        metrics = _numeric_metrics(reports / "eval" / "metrics.json", "eval.")
        metrics.update(_numeric_metrics(reports / "joint.json", "joint."))
        now = int(time.time() * 1000)
        client.log_batch(run_id, metrics=[Metric(k, v, now, 0) for k, v in metrics.items()])
        for name in ("dvc.lock", "params.yaml"):
            if (root / name).exists():
                client.log_artifact(run_id, str(root / name))
        promotion = reports / "promotion.json"
        outcome = json.loads(promotion.read_text()) if promotion.exists() else {}
        if outcome:
            client.log_dict(run_id, outcome, "promotion.json")
        return {"parent_run_id": run_id, "raw_data": source, "metrics": metrics, "promotion": outcome}
