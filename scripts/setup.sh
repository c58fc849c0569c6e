#!/usr/bin/env bash
# Create .venv and install the project with its pipeline and test extras. Idempotent.
# torch==2.13.0 first: that pin takes the local CPU build here; users with GPUs may install any torch in the
# project's range (>=2.4,<3) before running this, and pip keeps it.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -c "import torch" 2>/dev/null || .venv/bin/python -m pip install -q "torch==2.13.0"
.venv/bin/python -m pip install -q -e ".[pipeline,test,team]"
