#!/usr/bin/env bash
# Quick start: set everything up, then run the main job on its embedded default (synthetic faces, CPU backends).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ppfr demo "$@"
