#!/usr/bin/env bash
# Creates what the deployments in infra/prefect.yaml need on a Prefect server, then deploys them:
#   - work pool flava-process (a worker in a checkout on a machine) and flava-k8s (a Kubernetes worker that starts
#     each flow run as a Job from infra/prefect/k8s-base-job-template.json);
#   - the global concurrency limit launch.schedule.concurrency_limit (flava-workspace, 1 slot) that every deployed
#     run of flows/pipeline.py holds for its whole run, whichever pool it runs in: the weekly and the monthly
#     deployments share one workspace and never run at once.
# Idempotent (pools are overwritten with the files' templates, an existing limit is set back to 1 slot).
# Run from the project root with PREFECT_API_URL pointing at the server, e.g. after
#   kubectl -n flava port-forward svc/prefect-server 4200 &  export PREFECT_API_URL=http://localhost:4200/api
# FLAVA_IMAGE (default ghcr.io/flava-mlops/flava:latest) is the image of the flow-run Jobs.
set -euo pipefail
cd "$(dirname "$0")/../.."
: "${PREFECT_API_URL:?set PREFECT_API_URL to the Prefect server API, e.g. http://localhost:4200/api}"
export FLAVA_IMAGE="${FLAVA_IMAGE:-ghcr.io/flava-mlops/flava:latest}"
export FLAVA_HOME="${FLAVA_HOME:-/workspace}"
prefect="${PREFECT:-prefect}"
limit="$(python -c 'from flava.config import load_config; print(load_config().launch.schedule.concurrency_limit)')"

"$prefect" work-pool create flava-process --type process --overwrite
"$prefect" work-pool create flava-k8s --type kubernetes \
  --base-job-template infra/prefect/k8s-base-job-template.json --overwrite
if "$prefect" global-concurrency-limit inspect "$limit" >/dev/null 2>&1; then
  "$prefect" global-concurrency-limit update "$limit" --limit 1
else
  "$prefect" global-concurrency-limit create "$limit" --limit 1
fi
"$prefect" --no-prompt deploy --all --prefect-file infra/prefect.yaml
