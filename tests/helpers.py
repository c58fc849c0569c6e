"""Helpers shared by unit and integration tests."""
from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator


def tracking_in(root: Path) -> dict[str, Any]:
    """A ``tracking:`` section whose MLflow store and artifacts live under ``root`` (stage functions log runs; with
    the defaults they would write ``mlflow.db`` and ``mlruns/`` into the directory pytest runs in)."""
    return {"tracking_uri": f"sqlite:///{root}/mlflow.db", "artifact_location": str(root / "mlruns"),
            "log_system_metrics": False}


AWS_TEST_ENV = {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1"}


@contextmanager
def moto_s3(monkeypatch, bucket: str) -> Iterator[tuple[str, Any]]:
    """moto's S3 server on a free loopback port with ``bucket`` created and dummy credentials in the environment;
    yields ``(endpoint, boto3 client)``."""
    import boto3
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    try:
        host, port = server.get_host_and_port()
        endpoint = f"http://{host}:{port}"
        for name, value in AWS_TEST_ENV.items():
            monkeypatch.setenv(name, value)
        client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
        client.create_bucket(Bucket=bucket)
        yield endpoint, client
    finally:
        server.stop()


def spy_partitions(monkeypatch, module, name: str) -> list[tuple[str, int]]:
    """Wrap ``module.<name>``, a data stage's per-partition function, so that each call first records its task's
    (corpus, partition index); returns that record."""
    done: list[tuple[str, int]] = []
    real = getattr(module, name)

    def counted(task):
        # validate's and shard's tasks carry a row range, prepare's the index of its source unit
        done.append((task.corpus, task.part.index if hasattr(task, "part") else task.index))
        return real(task)

    monkeypatch.setattr(module, name, counted)
    return done
