"""infra/prefect/setup.sh against a real temporary Prefect server (``prefect_test_harness``): it creates the process
pool and the Kubernetes pool with the project's base job template, the workspace's global concurrency limit that
flows/pipeline.py takes, and deploys infra/prefect.yaml; run again, it changes nothing but what drifted.
The server also checks the deployments' job variables against the Kubernetes pool's template."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import GlobalConcurrencyLimitUpdate, WorkPoolCreate
from prefect.settings import PREFECT_API_URL
from prefect.testing.utilities import prefect_test_harness

from flava.config import load_config

ROOT = Path(__file__).resolve().parents[2]
SETUP = ROOT / "infra/prefect/setup.sh"
TEMPLATE = ROOT / "infra/prefect/k8s-base-job-template.json"
IMAGE = "registry.example.org/flava@sha256:" + "ab" * 32

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


@pytest.fixture(scope="module")
def prefect_server():
    with prefect_test_harness(server_startup_timeout=180):
        yield


def setup(**env: str) -> subprocess.CompletedProcess:
    bindir = str(Path(sys.executable).parent)
    full = dict(os.environ, PREFECT_API_URL=PREFECT_API_URL.value(), PATH=f"{bindir}:{os.environ['PATH']}",
                PYTHONPATH=str(ROOT), **env)
    full.pop("FLAVA_HOME", None)
    done = subprocess.run(["bash", str(SETUP)], cwd="/", env=full, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


def test_setup_creates_pools_limit_and_deployments_and_is_idempotent(prefect_server):
    limit = load_config(ROOT / "params.yaml").launch.schedule.concurrency_limit
    setup(FLAVA_IMAGE=IMAGE)
    with get_client(sync_client=True) as client:
        k8s_pool = client.read_work_pool("flava-k8s")
        process_pool = client.read_work_pool("flava-process")
        gcl = client.read_global_concurrency_limit_by_name(limit)
        monthly = client.read_deployment_by_name("flava-pipeline/flava-monthly-sweep-k8s")
        weekly = client.read_deployment_by_name("flava-pipeline/flava-weekly")
    assert (k8s_pool.type, process_pool.type) == ("kubernetes", "process")
    assert k8s_pool.base_job_template == json.loads(TEMPLATE.read_text())
    assert gcl.limit == 1 and gcl.active
    assert monthly.work_pool_name == "flava-k8s" and monthly.job_variables == {"image": IMAGE}
    assert weekly.work_pool_name == "flava-process" and not weekly.job_variables
    assert monthly.pull_steps == weekly.pull_steps  # both run in the checkout the pull step names

    # Drift: someone widened the limit and edited the pool in the UI; the script puts both back.
    with get_client(sync_client=True) as client:
        client.update_global_concurrency_limit(limit, GlobalConcurrencyLimitUpdate(limit=3))
        client.create_work_pool(WorkPoolCreate(name="flava-k8s", type="kubernetes", base_job_template={}),
                                overwrite=True)
    setup(FLAVA_IMAGE=IMAGE)
    with get_client(sync_client=True) as client:
        assert client.read_global_concurrency_limit_by_name(limit).limit == 1
        assert client.read_work_pool("flava-k8s").base_job_template == json.loads(TEMPLATE.read_text())
        assert len([d for d in client.read_deployments() if d.name.startswith("flava-")]) == 2


def test_the_server_checks_job_variables_against_the_pool_template(prefect_server):
    setup(FLAVA_IMAGE=IMAGE)
    with get_client(sync_client=True) as client:
        deployment = client.read_deployment_by_name("flava-pipeline/flava-monthly-sweep-k8s")
        with pytest.raises(Exception, match="gpus"):
            client.create_flow_run_from_deployment(deployment.id, job_variables={"gpus": "two"})
        run = client.create_flow_run_from_deployment(deployment.id, job_variables={"gpus": 1})
    assert run.job_variables == {"gpus": 1}
