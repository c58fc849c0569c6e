"""The team platform started for real on loopback, for the team-mode tests: PostgreSQL 15 (databases ``mlflow``,
``prefect``, ``optuna``), a moto S3 server, an ``mlflow server`` on PostgreSQL whose artifacts land in the moto
bucket (``--serve-artifacts``), and a Prefect server on PostgreSQL. Every server gets a free port and a temporary
directory, is waited for with a bounded health check (its log tail in the error when it does not come up) and is
stopped at the end. ``tests/integration/conftest.py`` turns these into session fixtures.

PostgreSQL refuses to run as root: as root the cluster is created and run as the ``postgres`` system user (in a
directory that user owns), otherwise as the current user.
"""
from __future__ import annotations

import contextlib
import glob
import multiprocessing
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import boto3
import httpx
from moto.server import ThreadedMotoServer

try:
    import psycopg  # the team extra's PostgreSQL driver
except ImportError:  # the fixture skips, naming the extra
    psycopg = None

DATABASES = ("mlflow", "prefect", "optuna")
PG_USER = "flava"  # the cluster's superuser; loopback connections are trusted (a throwaway test cluster)
BUCKET = "flava-team"
AWS_ENV = {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1"}
START_TIMEOUT_S = 180.0  # a server not healthy by then fails the fixture with its log tail


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def log_tail(path: Path, lines: int = 40) -> str:
    if not path.exists():
        return f"(no log at {path})"
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def wait_until(ready: Callable[[], bool], what: str, log: Path, proc: subprocess.Popen | None = None,
               timeout_s: float = START_TIMEOUT_S) -> None:
    """Poll ``ready`` until it holds; fail with the server's log tail if its process dies or time runs out."""
    deadline = time.monotonic() + timeout_s
    while True:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode} before it was ready; log tail:\n{log_tail(log)}")
        try:
            if ready():
                return
        except (httpx.HTTPError, OSError):
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} not ready after {timeout_s:.0f}s; log tail:\n{log_tail(log)}")
        time.sleep(0.3)


def http_ok(url: str) -> Callable[[], bool]:
    return lambda: httpx.get(url, timeout=5).status_code == 200


def stop_process(proc: subprocess.Popen, timeout_s: float = 20.0) -> None:
    """SIGTERM the server's process group (uvicorn workers included), SIGKILL it if it lingers."""
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=timeout_s)


# --------------------------------------------------------------------------------------------------- PostgreSQL
def run_together(target: Callable[..., None], arg_tuples: list[tuple], timeout_s: float) -> list:
    """One spawned process per args tuple, each called as ``target(*args, barrier, queue)``: they wait at the shared
    barrier so their work overlaps, and each puts one result on the queue. Returns the results in arrival order."""
    ctx = multiprocessing.get_context("spawn")
    barrier, queue = ctx.Barrier(len(arg_tuples)), ctx.Queue()
    procs = [ctx.Process(target=target, args=(*args, barrier, queue)) for args in arg_tuples]
    for proc in procs:
        proc.start()
    results = [queue.get(timeout=timeout_s) for _ in procs]
    for proc in procs:
        proc.join(timeout=60)
    return results


def pg_bindir() -> Path | None:
    """The directory of PostgreSQL's server binaries (``$FLAVA_PG_BIN``, ``initdb`` on PATH, or Debian's layout)."""
    if os.environ.get("FLAVA_PG_BIN"):
        return Path(os.environ["FLAVA_PG_BIN"])
    found = shutil.which("initdb")
    if found:
        return Path(os.path.realpath(found)).parent
    versions = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    return Path(versions[-1]).parent if versions else None


@dataclass
class Postgres:
    """A throwaway PostgreSQL cluster on 127.0.0.1:``port``."""

    bindir: Path
    root: Path
    port: int = field(default_factory=free_port)

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def log(self) -> Path:
        return self.root / "postgres.log"

    def url(self, database: str, driver: str | None = None, host: str = "127.0.0.1") -> str:
        """``postgresql[+driver]://flava@host:port/database`` (``driver``: psycopg, asyncpg, ...)."""
        scheme = f"postgresql+{driver}" if driver else "postgresql"
        return f"{scheme}://{PG_USER}@{host}:{self.port}/{database}"

    def _as_owner(self, *cmd: str) -> subprocess.CompletedProcess:
        argv = [str(self.bindir / cmd[0]), *cmd[1:]]
        if os.geteuid() == 0:
            argv = ["runuser", "-u", "postgres", "--", *argv]
        return subprocess.run(argv, capture_output=True, text=True, timeout=120)

    def start(self) -> None:
        if os.geteuid() == 0:  # the cluster's files belong to the user that runs it
            owner = pwd.getpwnam("postgres")
            os.chown(self.root, owner.pw_uid, owner.pw_gid)
        init = self._as_owner("initdb", "-D", str(self.data), "-U", PG_USER, "--auth=trust", "-E", "UTF8",
                              "--no-sync", "--locale=C")
        if init.returncode:
            raise RuntimeError(f"initdb failed ({init.returncode}):\n{init.stdout}\n{init.stderr}")
        options = f"-c listen_addresses=127.0.0.1 -p {self.port} -k {self.root} -c fsync=off -c max_connections=200"
        started = self._as_owner("pg_ctl", "-D", str(self.data), "-l", str(self.log), "-o", options, "-w",
                                 "-t", "60", "start")
        if started.returncode:
            raise RuntimeError(f"pg_ctl start failed ({started.returncode}): {started.stderr}\n{log_tail(self.log)}")
        wait_until(self._accepts, "PostgreSQL", self.log)
        with psycopg.connect(self.url("postgres"), autocommit=True) as conn:
            for name in DATABASES:
                conn.execute(f'CREATE DATABASE "{name}"')

    def _accepts(self) -> bool:
        try:
            with psycopg.connect(self.url("postgres"), connect_timeout=3):
                return True
        except psycopg.OperationalError:
            return False

    def stop(self) -> None:
        if (self.data / "postmaster.pid").exists():
            self._as_owner("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "-t", "60", "stop")


# --------------------------------------------------------------------------------------------------------- S3
@dataclass
class S3:
    """moto's S3 on 127.0.0.1, in a thread of this process, with the bucket ``BUCKET``."""

    server: object = None
    endpoint: str = ""

    def start(self) -> None:
        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
        self.server.start()
        host, port = self.server.get_host_and_port()
        self.endpoint = f"http://{host}:{port}"
        self.client().create_bucket(Bucket=BUCKET)

    def client(self):
        return boto3.client("s3", endpoint_url=self.endpoint, region_name=AWS_ENV["AWS_DEFAULT_REGION"],
                            aws_access_key_id=AWS_ENV["AWS_ACCESS_KEY_ID"],
                            aws_secret_access_key=AWS_ENV["AWS_SECRET_ACCESS_KEY"])

    def keys(self, prefix: str = "") -> list[str]:
        """Every key under ``prefix`` in the bucket."""
        pages = self.client().get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
        return [obj["Key"] for page in pages for obj in page.get("Contents", [])]

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()


# ----------------------------------------------------------------------------------------- MLflow and Prefect
def _server_env(home: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "PREFECT_"))}
    return {**env, **AWS_ENV, "HOME": str(home), **extra}


def _spawn(argv: list[str], env: dict[str, str], log: Path, cwd: Path) -> subprocess.Popen:
    with log.open("ab") as out:  # the child keeps its own descriptor
        return subprocess.Popen(argv, env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)


@dataclass
class MlflowServer:
    """``mlflow server`` with its tracking and registry store on PostgreSQL and artifacts in the moto bucket,
    proxied by the server (``--serve-artifacts``): clients need no S3 credentials."""

    backend_uri: str
    s3_endpoint: str
    root: Path
    artifacts: str = f"s3://{BUCKET}/mlartifacts"
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen | None = None

    @property
    def log(self) -> Path:
        return self.root / "mlflow-server.log"

    def uri(self, host: str = "127.0.0.1") -> str:
        return f"http://{host}:{self.port}"

    def start(self) -> None:
        argv = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(self.port),
                "--workers", "2", "--backend-store-uri", self.backend_uri, "--serve-artifacts",
                "--artifacts-destination", self.artifacts]
        env = _server_env(self.root, MLFLOW_S3_ENDPOINT_URL=self.s3_endpoint)
        self.proc = _spawn(argv, env, self.log, self.root)
        wait_until(http_ok(f"{self.uri()}/health"), "mlflow server", self.log, self.proc)

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc)


@dataclass
class PrefectServer:
    """``prefect server start`` with its database on PostgreSQL (asyncpg), UI off, home in a temporary dir."""

    database_url: str
    root: Path
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen | None = None

    @property
    def log(self) -> Path:
        return self.root / "prefect-server.log"

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/api"

    def start(self) -> None:
        home = self.root / "prefect-home"
        home.mkdir(exist_ok=True)
        env = _server_env(self.root, PREFECT_HOME=str(home), PREFECT_API_DATABASE_CONNECTION_URL=self.database_url,
                          PREFECT_UI_ENABLED="false", PREFECT_SERVER_ANALYTICS_ENABLED="false")
        argv = [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(self.port)]
        self.proc = _spawn(argv, env, self.log, self.root)
        wait_until(http_ok(f"{self.api_url}/health"), "prefect server", self.log, self.proc)

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc)


def temp_root(prefix: str) -> Path:
    """A fresh directory under the system temp dir (world-traversable parent, so ``postgres`` can reach it)."""
    return Path(tempfile.mkdtemp(prefix=prefix))
