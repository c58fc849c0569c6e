#!/usr/bin/env bash
# Create .venv and install the project with every extra, identically on every machine. Idempotent.
#   1. requirements/lock.txt: every dependency (all extras, torch's own dependencies), pinned and hash-checked,
#      installed with --no-deps, so pip resolves nothing.
#   2. torch from requirements/torch.txt, unless a torch is already importable: users with GPUs may install the
#      build they need first (any version in pyproject's range) and it is kept. Its dependencies are already there
#      from the lock (a CUDA build adds its nvidia-* runtime). Here the pin takes this machine's local CPU wheel.
#   3. the project itself, editable, with no dependencies and no build isolation (setuptools comes from the lock).
#   4. pip check: a torch installed beforehand that disagrees with the lock fails here, not at run time.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
pip=(.venv/bin/python -m pip)
"${pip[@]}" install -q --require-hashes --no-deps -r requirements/lock.txt
.venv/bin/python -c "import torch" 2>/dev/null || "${pip[@]}" install -q -r requirements/torch.txt
"${pip[@]}" install -q --no-deps --no-build-isolation -e .
"${pip[@]}" check
