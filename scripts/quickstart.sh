#!/usr/bin/env bash
# Quick start: set everything up, then run the main job on its embedded default: train PartialFace's tiny config
# on synthetic faces (CPU backends; a few minutes on 2 cores). Extra arguments are config overrides, e.g.
#   bash scripts/quickstart.sh data.source=../shared/data/celeba112/train eval.pairs=../shared/data/celeba112/val_pairs.txt
# The demo run is disposable: running the quick start again starts it afresh (--overwrite), unless --resume is given.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
fresh=(--overwrite)
for a in "$@"; do
  if [ "$a" = "--resume" ] || [ "$a" = "--overwrite" ]; then fresh=(); fi
done
.venv/bin/ppfr train configs/partialface_tiny.yaml "${fresh[@]}" "$@"
