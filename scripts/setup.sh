#!/usr/bin/env bash
# Set up a development environment from scratch: a venv in .venv with the pinned requirements, then build
# ppfr's compiled kernels with `python setup.py develop` (CPU module always; CUDA module if nvcc is found).
# Idempotent: re-running reuses the venv and rebuilds only what changed.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --disable-pip-version-check -r requirements.txt 2> >(grep -v "^WARNING: Location" >&2)
export MAX_JOBS="${MAX_JOBS:-2}"
# `setup.py develop` works with setuptools >= 80 because the build never imports torch (see setup.py).
.venv/bin/python setup.py develop > .venv/ppfr-build.log 2>&1 || { tail -50 .venv/ppfr-build.log; exit 1; }
.venv/bin/python -c "import ppfr, ppfr._C; print('ppfr', ppfr.__version__, 'built: ppfr._C loaded')"
