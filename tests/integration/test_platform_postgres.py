"""infra/platform's PostgreSQL init script against a real PostgreSQL (Debian's, started here on loopback): it
creates one role and database per store, the connection URLs of the manifests (MLflow's psycopg, Prefect's asyncpg)
and the Optuna storage URL of infra/README.md connect with the Secret's passwords, and no store can open another's
database."""
from __future__ import annotations

import asyncio
import os
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

import optuna
import pytest
import sqlalchemy
import yaml
from sqlalchemy.ext.asyncio import create_async_engine

ROOT = Path(__file__).resolve().parents[2]
PG_BIN = next((p for p in sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True)), None)
PASSWORDS = {"POSTGRES_PASSWORD": "5up3r", "MLFLOW_DB_PASSWORD": "0a1b2c", "PREFECT_DB_PASSWORD": "3d4e5f",
             "OPTUNA_DB_PASSWORD": "6a7b8c"}

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300),
              pytest.mark.skipif(PG_BIN is None, reason="PostgreSQL server binaries are not installed")]


def _platform(kind: str, name: str) -> dict:
    for path in (ROOT / "infra/platform").glob("*.yaml"):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc and doc["kind"] == kind and doc["metadata"]["name"] == name:
                return doc
    raise LookupError(f"no {kind} {name} in infra/platform")


def _run(cmd: list[str]) -> None:
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"{cmd[-1]}: {done.stdout[-2000:]}{done.stderr[-2000:]}"


def _as_postgres_user(cmd: list[str]) -> list[str]:
    return ["runuser", "-u", "postgres", "--", *cmd] if os.geteuid() == 0 else cmd


@pytest.fixture(scope="module")
def postgres():
    """A fresh cluster with the image's settings (password auth on TCP), then the init script run as the image's
    entrypoint runs it: with POSTGRES_USER and the Secret's variables, psql over the local socket."""
    # Not under pytest's tmp_path: that is private to root, and the server runs as the postgres user.
    base = Path(tempfile.mkdtemp(prefix="flava-pg-"))
    data, sock = base / "data", base / "sock"
    sock.mkdir()
    pwfile = base / "pw"
    pwfile.write_text(PASSWORDS["POSTGRES_PASSWORD"])
    if os.geteuid() == 0:
        shutil.chown(base, "postgres")
        shutil.chown(sock, "postgres")
        shutil.chown(pwfile, "postgres")
    _run(_as_postgres_user([str(PG_BIN / "initdb"), "-D", str(data), "-U", "postgres", "--auth-local=trust",
                            "--auth-host=scram-sha-256", f"--pwfile={pwfile}"]))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    _run(_as_postgres_user([str(PG_BIN / "pg_ctl"), "-D", str(data), "-w", "-l", str(base / "log"),
                            "-o", f"-p {port} -k {sock} -c listen_addresses=127.0.0.1", "start"]))
    try:
        script = base / "init.sh"
        script.write_text(_platform("ConfigMap", "postgres-init")["data"]["10-flava-databases.sh"])
        env = dict(os.environ, POSTGRES_USER="postgres", PGHOST=str(sock), PGPORT=str(port), **PASSWORDS)
        done = subprocess.run(["sh", str(script)], env=env, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        yield port
    finally:
        subprocess.run(_as_postgres_user([str(PG_BIN / "pg_ctl"), "-D", str(data), "-m", "fast", "stop"]),
                       capture_output=True)
        shutil.rmtree(base, ignore_errors=True)


def _resolve(url: str, port: int) -> str:
    """A manifest's URL as the pod sees it ($(VAR) from the Secret), aimed at the loopback server."""
    for name, value in PASSWORDS.items():
        url = url.replace(f"$({name})", value)
    return url.replace("@postgres:5432/", f"@127.0.0.1:{port}/")


def _identity(url: str) -> tuple[str, str]:
    engine = sqlalchemy.create_engine(url)
    try:
        with engine.begin() as conn:
            conn.execute(sqlalchemy.text("CREATE TABLE owned_here (x int)"))  # the role owns its database
            return tuple(conn.execute(sqlalchemy.text("SELECT current_user, current_database()")).one())
    finally:
        engine.dispose()


def test_mlflow_url_of_the_manifest_connects_as_its_own_role(postgres):
    args = _platform("Deployment", "mlflow")["spec"]["template"]["spec"]["containers"][0]["args"]
    url = next(a for a in args if a.startswith("--backend-store-uri=")).split("=", 1)[1]
    assert _identity(_resolve(url, postgres)) == ("mlflow", "mlflow")


def test_prefect_url_of_the_manifest_connects_with_asyncpg(postgres):
    env = _platform("Deployment", "prefect-server")["spec"]["template"]["spec"]["containers"][0]["env"]
    url = _resolve(next(e["value"] for e in env if e["name"] == "PREFECT_API_DATABASE_CONNECTION_URL"), postgres)

    async def whoami():
        engine = create_async_engine(url)
        try:
            async with engine.connect() as conn:
                return tuple((await conn.execute(sqlalchemy.text("SELECT current_user, current_database()"))).one())
        finally:
            await engine.dispose()

    assert asyncio.run(whoami()) == ("prefect", "prefect")


def test_optuna_study_on_its_database_and_no_store_opens_another(postgres, monkeypatch):
    # The documented storage URL has no password: libpq takes PGPASSWORD, which the flow-run Job template sets
    # from the Secret, so params.yaml (in git) holds no secret.
    documented = "launch.sweep.storage=postgresql+psycopg://optuna@postgres.flava:5432/optuna"
    assert documented in (ROOT / "infra/README.md").read_text()
    template = (ROOT / "infra/prefect/k8s-base-job-template.json").read_text()
    assert '"name": "PGPASSWORD"' in template and '"key": "OPTUNA_DB_PASSWORD"' in template
    url = documented.split("=", 1)[1].replace("@postgres.flava:5432/", f"@127.0.0.1:{postgres}/")
    monkeypatch.setenv("PGPASSWORD", PASSWORDS["OPTUNA_DB_PASSWORD"])
    study = optuna.create_study(study_name="flava-joint", storage=url, direction="maximize")
    study.optimize(lambda trial: trial.suggest_float("x", 0, 1), n_trials=2)
    assert len(optuna.load_study(study_name="flava-joint", storage=url).trials) == 2
    monkeypatch.delenv("PGPASSWORD")
    wrong = f"postgresql+psycopg://mlflow:{PASSWORDS['MLFLOW_DB_PASSWORD']}@127.0.0.1:{postgres}/prefect"
    with pytest.raises(sqlalchemy.exc.OperationalError, match="permission denied for database"):
        _identity(wrong)
    with pytest.raises(sqlalchemy.exc.OperationalError, match="password authentication failed"):
        _identity(f"postgresql+psycopg://optuna:not-it@127.0.0.1:{postgres}/optuna")
