"""Session fixtures of the team platform (``tests/team.py``): each server starts on first use and stops at the end of
the session. Without PostgreSQL's binaries or the team extra's drivers, the tests that need them skip, saying why."""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Iterator, TypeVar

import pytest

from tests import team

Server = TypeVar("Server")


def _running(server: Server, root: Path | None = None) -> Iterator[Server]:
    """Start ``server``, yield it, and stop it (and remove its temp dir ``root``) however the session ends."""
    try:
        server.start()
        yield server
    finally:
        server.stop()
        if root is not None:
            shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def team_postgres():
    bindir = team.pg_bindir()
    if bindir is None or not (bindir / "pg_ctl").exists():
        pytest.skip("PostgreSQL server binaries (initdb, pg_ctl) not found: install postgresql (Debian: apt-get "
                    "install postgresql-15) or set FLAVA_PG_BIN to their directory")
    if team.psycopg is None:
        pytest.skip("psycopg (3) is not installed: pip install -e '.[team]'")
    root = team.temp_root("flava-pg-")
    yield from _running(team.Postgres(bindir=bindir, root=root), root)


@pytest.fixture(scope="session")
def team_s3():
    yield from _running(team.S3())


@pytest.fixture(scope="session")
def team_mlflow(team_postgres, team_s3):
    root = team.temp_root("flava-mlflow-")
    yield from _running(team.MlflowServer(backend_uri=team_postgres.url("mlflow", "psycopg"),
                                          s3_endpoint=team_s3.endpoint, root=root), root)


@pytest.fixture(scope="session")
def team_prefect(team_postgres):
    pytest.importorskip("asyncpg", reason="asyncpg (Prefect's PostgreSQL driver) is not installed: "
                                          "pip install -e '.[team]'")
    root = team.temp_root("flava-prefect-")
    yield from _running(team.PrefectServer(database_url=team_postgres.url("prefect", "asyncpg"), root=root), root)
