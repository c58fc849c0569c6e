"""Helpers shared by unit and integration tests."""
from __future__ import annotations

from pathlib import Path
from typing import Any


def tracking_in(root: Path) -> dict[str, Any]:
    """A ``tracking:`` section whose MLflow store and artifacts live under ``root`` (stage functions log runs; with
    the defaults they would write ``mlflow.db`` and ``mlruns/`` into the directory pytest runs in)."""
    return {"tracking_uri": f"sqlite:///{root}/mlflow.db", "artifact_location": str(root / "mlruns"),
            "log_system_metrics": False}
