#!/usr/bin/env bash
# Quick start: set everything up, train PartialFace's tiny config and say how accurate it is and what to run next.
#
# With the project's faces at ../shared/data/celeba112 (every developer and CI has them) it trains runs/pf_celeba
# for 3 epochs and reports 10-fold verification on val_pairs.txt before and after (README, "Quick start", says how
# long it took): the model the README's eval / attack / export / serve commands use. Without them it trains
# runs/partialface_tiny on the embedded synthetic source (random images: a smoke run with no accuracy to report).
# Extra arguments are config overrides, applied last, e.g.  bash scripts/quickstart.sh epochs=1
# The run is disposable: running the quick start again starts it afresh (--overwrite), unless --resume is given.
set -euo pipefail
cd "$(dirname "$0")/.."
start=$SECONDS
say() { printf '[quickstart %d:%02d] %s\n' $(((SECONDS - start) / 60)) $(((SECONDS - start) % 60)) "$*"; }

# Setup prints nothing for a minute or two (pip, then the C++ build): say so, then show that it is alive.
say "setting up .venv: pinned requirements, then the C++ kernels (minutes; build log in .venv/ppfr-build.log)"
bash scripts/setup.sh &
setup=$!
while kill -0 "$setup" 2>/dev/null; do
  for _ in $(seq 15); do sleep 1; kill -0 "$setup" 2>/dev/null || break; done
  if kill -0 "$setup" 2>/dev/null; then say "still setting up"; fi
done
wait "$setup"

faces=../shared/data/celeba112
fresh=(--overwrite)
for a in "$@"; do
  if [ "$a" = "--resume" ] || [ "$a" = "--overwrite" ]; then fresh=(); fi
done
if [ -f "$faces/val_pairs.txt" ]; then
  data=(name=pf_celeba "data.source=$faces/train" "eval.pairs=$faces/val_pairs.txt" epochs=3)
  say "training partialface_tiny on $faces/train: first the untrained model's 10-fold verification on 3000 pairs"
  say "(silent until its result), then 3 epochs with progress lines, then the trained model's verification"
else
  data=()
  say "no faces at $faces: training partialface_tiny on the embedded synthetic source"
fi
log=$(mktemp)
trap 'rm -f "$log"' EXIT
.venv/bin/ppfr train configs/partialface_tiny.yaml "${fresh[@]}" "${data[@]}" "$@" 2>&1 | tee "$log"

model=$(sed -n 's/^wrote \(.*model\.pt\)$/\1/p' "$log" | tail -1)
echo
say "done: ${model:-no model written (see above)}"
if grep -q '^verification after training: ' "$log"; then
  sed -n 's/^verification \(before\|after\) training: \(.*\)$/  \1 training: \2/p' "$log"
  echo "next: the privacy attacks on what leaves the client (several minutes on 2 cores):"
  echo "  .venv/bin/ppfr attack $model --data $faces/train --val $faces/val_pairs.txt --kind all"
  echo "or export and serve it: README.md, \"Evaluate, attack, deploy, compare\""
else
  echo "no accuracy: the synthetic source is random images. To train on faces and report verification accuracy:"
  echo "  bash scripts/quickstart.sh data.source=DIR/train eval.pairs=DIR/pairs.txt   (ppfr data pairs writes one)"
fi
