"""Screenshots of the Prefect and MLflow UIs for the README (docs/screenshots/), taken from a real run.

    .venv/bin/python scripts/screenshots.py [--out docs/screenshots] [--keep]

Everything is temporary and on loopback: a Prefect server and an MLflow server (SQLite stores, registry, served
artifacts) on free ports of 127.0.0.1, and a copy of the project as committed (``git archive HEAD``) in a fresh
git repo with short stages (tiny preset, 12/12/300 steps) and an empty DVC remote of its own. The copy serves the
flow's deployment (``python -m flows.serve``), the script starts one run of it through the API as the UI's Run
button does, waits for it, and photographs with headless Chromium:

    prefect-run-form.png          the deployment's custom run form (parameters, descriptions, preset choice)
    prefect-flow-run.png          the flow run: task graph and the stages' log lines
    prefect-summary-artifact.png  the summary artifact: per-stage table, decision, MLflow links
    mlflow-registry.png           models/flava: versions and the @champion alias
    mlflow-parent-run.png         the pipeline's parent run (params, metrics, link back to the flow run)

Both servers and the served deployment are stopped at the end, also on error. It installs nothing: Chromium must
be on PATH (Debian: ``apt-get install -y chromium``). The run trains the real stages: about 6 minutes on 2 busy cores.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import os
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Iterator

import httpx
from mlflow import MlflowClient
from PIL import Image

from flava import pipeline as pl

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
BROWSERS = ("chromium", "chromium-browser", "google-chrome")
# Short stages: every stage runs for real, in minutes. The joint stage trains long enough (300 tiny steps, about
# a minute) for the first model to beat chance on every task, so the gate makes it @champion; with the end-to-end
# tests' 16 steps zero-shot stays at chance and the version is only a challenger.
SHORT_STAGES = ["model.preset=tiny", "train.text.steps=12", "train.image.steps=12", "train.joint.steps=300",
                "train.eval_every=25", "train.checkpoint_every=100", "train.log_every=25"]
FLOW = "flava-pipeline"
SUMMARY_KEY = "flava-pipeline-summary"
MODEL = "flava"
# A single-page UI renders after its API calls: Chromium's virtual time budget (ms) lets them finish. A page whose
# rendered DOM lacks the text it must show (still a spinner, an error page) is taken again with a longer budget.
BUDGETS_MS = (30000, 60000, 90000)
MIN_COLOURS = 300  # rendered pages have about 800-5000; a spinner on a plain background or one line of text fewer


def log(message: str) -> None:
    print(f"[screenshots {time.strftime('%H:%M:%S')}] {message}", flush=True)


def find_browser() -> str:
    for name in BROWSERS:
        path = shutil.which(name)
        if path:
            return path
    raise SystemExit(f"scripts/screenshots.py: error: no headless browser found (looked for {', '.join(BROWSERS)} "
                     "on PATH); install one, e.g. `apt-get install -y chromium`")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_http(url: str, what: str, proc: subprocess.Popen, logfile: Path, timeout_s: float = 300) -> None:
    """Poll ``url`` until it answers 200; fail naming ``what`` and its log if the process dies or time runs out."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode} before answering {url}; its log "
                               f"{logfile}:\n{logfile.read_text()[-3000:]}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url, timeout=5).status_code == 200:
                return
        time.sleep(1)
    raise RuntimeError(f"{what} did not answer {url} within {timeout_s:.0f} s; its log {logfile}")


@contextlib.contextmanager
def background(cmd: list[str], logfile: Path, **kwargs) -> Iterator[subprocess.Popen]:
    """``cmd`` in its own process group, output to ``logfile``; the whole group is stopped on exit."""
    with logfile.open("w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True, **kwargs)
        try:
            yield proc
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(30)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()


def make_project(base: Path) -> Path:
    """The project as committed, in a fresh git repo with short stages and an empty DVC remote of its own (so no
    shared remote answers for the raw data: the synthetic world is generated, as data.dvc records it)."""
    repo = base / "project"
    repo.mkdir()
    archive = subprocess.run(["git", "archive", "--format=tar", "HEAD"], cwd=ROOT, check=True,
                             capture_output=True).stdout
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(repo, filter="data")
    pl.set_params(repo, SHORT_STAGES)
    git = ["git", "-c", "user.name=screenshots", "-c", "user.email=screenshots@localhost"]
    for args in (["init", "-q"], ["add", "-A"], ["commit", "-qm", "screenshots: project with short stages"]):
        subprocess.run(git + args, cwd=repo, check=True, capture_output=True)
    subprocess.run([str(BIN / "dvc"), "remote", "add", "--local", "-d", "screenshots", str(base / "dvc-remote")],
                   cwd=repo, check=True, capture_output=True)
    return repo


def run_flow(api: str, deployment_id: str, timeout_s: float) -> dict:
    """Start a run of the deployment (as the UI's Run button does) and wait for its final state."""
    flow_run = httpx.post(f"{api}/deployments/{deployment_id}/create_flow_run",
                          json={"name": "screenshots", "parameters": {}}, timeout=30).raise_for_status().json()
    log(f"flow run {flow_run['id']} created; the served deployment picks it up")
    deadline, last = time.monotonic() + timeout_s, None
    while time.monotonic() < deadline:
        flow_run = httpx.get(f"{api}/flow_runs/{flow_run['id']}", timeout=30).raise_for_status().json()
        tasks = httpx.post(f"{api}/task_runs/filter", timeout=30, json={
            "flow_runs": {"id": {"any_": [flow_run["id"]]}}, "limit": 200, "offset": 0,
            "sort": "EXPECTED_START_TIME_ASC"}).raise_for_status().json()
        progress = f"{flow_run['state_type']}; " + ", ".join(f"{t['name']} {t['state_type']}" for t in tasks)
        if progress != last:
            log(progress)
            last = progress
        if flow_run["state_type"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED"):
            return flow_run
        time.sleep(5)
    raise RuntimeError(f"flow run {flow_run['id']} did not finish within {timeout_s:.0f} s")


def colours(png: Path) -> int:
    with Image.open(png) as image:
        found = image.convert("RGB").getcolors(maxcolors=100000)
    return len(found) if found is not None else 100000


def screenshot(browser: str, url: str, expect: str, png: Path, profile: Path) -> None:
    """``url`` as ``png`` (1400x1000) once its rendered DOM shows ``expect``, with longer virtual time budgets
    while it does not (the DOM is read by a second load with the same budget, just before the picture)."""
    for budget in BUDGETS_MS:
        chromium = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                    "--window-size=1400,1000", f"--virtual-time-budget={budget}", f"--user-data-dir={profile}"]
        timeout_s = budget / 1000 + 180
        dom = subprocess.run(chromium + ["--dump-dom", url], capture_output=True, text=True, timeout=timeout_s).stdout
        png.unlink(missing_ok=True)
        subprocess.run(chromium + [f"--screenshot={png}", url], capture_output=True, timeout=timeout_s)
        if expect in dom and png.exists() and colours(png) >= MIN_COLOURS:
            log(f"{png.name}: {url}")
            return
        log(f"{png.name}: {url} did not show {expect!r} after {budget} ms of virtual time; again, longer")
    raise RuntimeError(f"{url} did not show {expect!r} in headless Chromium within {BUDGETS_MS[-1]} ms of "
                       "virtual time")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="scripts/screenshots.py", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "screenshots", help="where the PNGs go")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory (servers' logs, stores)")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds the flow run may take")
    args = parser.parse_args(argv)
    browser = find_browser()
    started = time.monotonic()
    base = Path(tempfile.mkdtemp(prefix="flava-screenshots-"))
    log(f"working in {base}")
    try:
        shoot(browser, base, args.out.resolve(), args.timeout)
    finally:
        if args.keep:
            log(f"kept {base}")
        else:
            shutil.rmtree(base, ignore_errors=True)
    log(f"done in {time.monotonic() - started:.0f} s")


def shoot(browser: str, base: Path, out: Path, timeout_s: float) -> None:
    prefect_port, mlflow_port = free_port(), free_port()
    ui, mlflow_ui = f"http://127.0.0.1:{prefect_port}", f"http://127.0.0.1:{mlflow_port}"
    api = f"{ui}/api"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_", "FLAVA_"))}
    env.update(PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}", PREFECT_HOME=str(base / "prefect"),
               PREFECT_SERVER_ANALYTICS_ENABLED="false", PREFECT_API_URL=api, MLFLOW_TRACKING_URI=mlflow_ui)
    server_env = dict(env, PREFECT_API_DATABASE_CONNECTION_URL=f"sqlite+aiosqlite:///{base / 'prefect.db'}")
    prefect_cmd = [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(prefect_port)]
    mlflow_cmd = [str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(mlflow_port), "--workers", "1",
                  "--backend-store-uri", f"sqlite:///{base / 'mlflow.db'}",
                  "--artifacts-destination", str(base / "mlflow-artifacts")]
    with background(prefect_cmd, base / "prefect-server.log", env=server_env) as prefect_server, \
            background(mlflow_cmd, base / "mlflow-server.log", env=env) as mlflow_server:
        wait_http(f"{api}/health", "prefect server", prefect_server, base / "prefect-server.log")
        wait_http(f"{mlflow_ui}/health", "mlflow server", mlflow_server, base / "mlflow-server.log")
        log(f"Prefect UI {ui}, MLflow UI {mlflow_ui}")
        repo = make_project(base)
        # The copy's own code, not this checkout's editable install.
        serve_env = dict(env, PYTHONPATH=str(repo))
        with background([sys.executable, "-m", "flows.serve"], base / "serve.log", cwd=repo, env=serve_env) as served:
            deployment = wait_deployment(api, served, base / "serve.log")
            log(f"deployment {FLOW}/{deployment['name']} ({deployment['id']}) served from {repo}")
            flow_run = run_flow(api, deployment["id"], timeout_s)
            if flow_run["state_type"] != "COMPLETED":
                raise RuntimeError(f"flow run {flow_run['id']} ended {flow_run['state_type']}: "
                                   f"{flow_run['state']['message']}; the end of its log (python -m flows.serve; "
                                   f"--keep keeps every log):\n{(base / 'serve.log').read_text()[-4000:]}")
            pages = pages_to_shoot(api, ui, mlflow_ui, deployment["id"], flow_run["id"])
            out.mkdir(parents=True, exist_ok=True)
            for filename, (url, expect) in pages.items():
                screenshot(browser, url, expect, out / filename, base / "chromium-profile")


def wait_deployment(api: str, served: subprocess.Popen, logfile: Path, timeout_s: float = 300) -> dict:
    """The deployment ``python -m flows.serve`` registers, once the server has it."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if served.poll() is not None:
            raise RuntimeError(f"python -m flows.serve exited with {served.returncode}; its log {logfile}:\n"
                               f"{logfile.read_text()[-3000:]}")
        found = httpx.post(f"{api}/deployments/filter", json={"flows": {"name": {"any_": [FLOW]}}, "limit": 10,
                                                               "offset": 0}, timeout=30).raise_for_status().json()
        if found:
            return found[0]
        time.sleep(2)
    raise RuntimeError(f"python -m flows.serve registered no deployment within {timeout_s:.0f} s; its log {logfile}")


def pages_to_shoot(api: str, ui: str, mlflow_ui: str, deployment_id: str,
                   flow_run_id: str) -> dict[str, tuple[str, str]]:
    artifacts = httpx.post(f"{api}/artifacts/filter", timeout=30, json={
        "artifacts": {"key": {"any_": [SUMMARY_KEY]}, "flow_run_id": {"any_": [flow_run_id]}},
        "limit": 1, "offset": 0, "sort": "CREATED_DESC"}).raise_for_status().json()
    if not artifacts:
        raise RuntimeError(f"flow run {flow_run_id} created no {SUMMARY_KEY!r} artifact")
    client = MlflowClient(mlflow_ui)
    champion = client.get_model_version_by_alias(MODEL, "champion")
    parents = client.search_runs([champion_experiment(client, champion)], "tags.trigger = 'prefect'",
                                 order_by=["attributes.start_time DESC"], max_results=1)
    if not parents:
        raise RuntimeError(f"no MLflow parent run tagged trigger=prefect in {mlflow_ui}")
    parent = parents[0].info
    log(f"{MODEL} v{champion.version} is @champion; parent run {parent.run_id}")
    # workflowType: the run page as a training run (MLflow 3 shows an experiment without a kind as GenAI).
    run_page = f"{mlflow_ui}/#/experiments/{parent.experiment_id}/runs/{parent.run_id}?workflowType=machine_learning"
    return {  # the page, and a text it shows once rendered
        "prefect-run-form.png": (f"{ui}/deployments/deployment/{deployment_id}/run", "joint_on_k8s"),
        "prefect-flow-run.png": (f"{ui}/runs/flow-run/{flow_run_id}", "Beginning flow run"),  # graph: a canvas
        "prefect-summary-artifact.png": (f"{ui}/artifacts/artifact/{artifacts[0]['id']}", "is @champion"),
        "mlflow-registry.png": (f"{mlflow_ui}/#/models/{MODEL}", "champion"),
        "mlflow-parent-run.png": (run_page, parent.run_name),
    }


def champion_experiment(client: MlflowClient, version) -> str:
    return client.get_run(version.run_id).info.experiment_id


if __name__ == "__main__":
    main()
