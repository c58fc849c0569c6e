#!/usr/bin/env bash
# Regenerate requirements/lock.txt: every dependency of the project and all its extras, with hashes, for
# Python 3.10+ on any platform (uv's universal resolution), resolved together with requirements/torch.txt.
# Left out of the lock: the project itself, torch (see requirements/torch.txt) and the packages torch needs only
# for its CUDA build on Linux (nvidia-*, cuda-*, triton), which come with whichever torch build is installed.
# Versions already in the lock are kept where they still fit (uv reads the output file as preferences);
# `scripts/lock.sh --upgrade` moves everything to the newest allowed versions.
# Needs uv: the one setup.sh installs in .venv, else `uv` on PATH, or UV=/path/to/uv.
# Resolves against PyPI only (LOCK_INDEX_URL to change), never this machine's local indexes or pip config.
set -euo pipefail
cd "$(dirname "$0")/.."
UV=${UV:-$( [ -x .venv/bin/uv ] && echo .venv/bin/uv || echo uv)}
INDEX=${LOCK_INDEX_URL:-https://pypi.org/simple}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

# The CUDA-only part of torch's dependencies: what torch needs on Linux x86_64 beyond what it needs on Windows,
# whose PyPI wheels are the CPU build.
compile_torch() {
  "$UV" pip compile requirements/torch.txt --index-url "$INDEX" --python-platform "$1" --python-version 3.11 \
    --no-header --no-annotate --quiet | sed -n 's/^\([A-Za-z0-9._-]*\)==.*/\1/p' | tr 'A-Z_.' 'a-z--' | sort
}
compile_torch x86_64-manylinux_2_28 > "$tmp/linux"
compile_torch x86_64-pc-windows-msvc > "$tmp/cpu"
no_emit=(--no-emit-package torch)
while read -r name; do no_emit+=(--no-emit-package "$name"); done < <(comm -23 "$tmp/linux" "$tmp/cpu")

"$UV" pip compile pyproject.toml requirements/torch.txt --all-extras --universal --python-version 3.10 \
  --generate-hashes --index-url "$INDEX" \
  --custom-compile-command "scripts/lock.sh" "${no_emit[@]}" "$@" -o requirements/lock.txt

# uv itself, hash-pinned, for setup.sh and the Dockerfile to install with pip before anything else.
echo uv | "$UV" pip compile - --universal --python-version 3.10 --generate-hashes --index-url "$INDEX" \
  --custom-compile-command "scripts/lock.sh" "$@" -o requirements/uv.txt
