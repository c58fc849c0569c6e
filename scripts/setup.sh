#!/usr/bin/env bash
# Create .venv and install the project with every extra, identically on every machine. Idempotent.
#   1. uv, hash-pinned (requirements/uv.txt), with the venv's own pip.
#   2. requirements/lock.txt with uv: every dependency (all extras and torch's own dependencies), pinned and
#      hash-checked, --no-deps so nothing is resolved; uv downloads in parallel (pip took minutes here).
#   3. torch from requirements/torch.txt with pip (pip's config picks this machine's local CPU wheel), unless a torch
#      is already importable: users with GPUs install the build they need first (any version in pyproject's range)
#      and it is kept. Its dependencies are already there from the lock; a CUDA build adds its nvidia-* runtime.
#   4. the project itself, editable, no dependencies, no build isolation (setuptools comes from the lock).
#   5. pip check: a torch installed beforehand that disagrees with the lock fails here, not at run time.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --require-hashes --no-deps -r requirements/uv.txt
.venv/bin/uv pip install -q --python .venv/bin/python --require-hashes --no-deps -r requirements/lock.txt
.venv/bin/python -c "import torch" 2>/dev/null || .venv/bin/python -m pip install -q -r requirements/torch.txt
.venv/bin/uv pip install -q --python .venv/bin/python --no-deps --no-build-isolation -e .
.venv/bin/python -m pip check
