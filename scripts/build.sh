#!/usr/bin/env bash
# Rebuild the compiled modules in place (after editing csrc/). Serialised with a lock so that concurrent
# callers (several developers or agents in one checkout) never run two CMake builds at once.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .cache
exec 9>.cache/build.lock
flock 9
MAX_JOBS="${MAX_JOBS:-2}" .venv/bin/python setup.py build_ext --inplace > .cache/build.log 2>&1 || { tail -60 .cache/build.log; exit 1; }
echo "build ok"
