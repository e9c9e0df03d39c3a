#!/usr/bin/env bash
# The install a user gets: build ppfr's wheel, install it into a clean venv holding only the CPU torch wheel and
# the core dependencies (no extras), and check what must work there and how what needs an extra refuses:
#   ppfr info                      exit 0, lists the missing extras
#   ppfr serve ...                 exit 2, one line naming pip install 'ppfr[serve]'
#   ppfr train NO_SUCH_CONFIG      exit 2, one line listing the configs that ship in the wheel
#   build_method("partialface").protect(...) then .recognize(...)
#   ppfr demo and one step of `ppfr train partialface_tiny` (the shipped config, found by name)
# Run by .ci/run after the test suite; about 2-4 minutes (the C++ build, unpacking torch). Needs .venv (setup.sh)
# for the build tools. Torch comes from the machine's pip configuration exactly as requirements.txt's `torch==2.13.0`
# does (a CPU wheel on CI machines); a CUDA build is refused rather than silently tested.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT="$PWD"
PY="$ROOT/.venv/bin/python"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/ppfr-wheel.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT
step() { printf 'wheel_check: %s\n' "$*"; }
fail() { printf 'wheel_check: FAIL: %s\n' "$*" >&2; exit 1; }
quiet_pip() { "$@" 2> >(grep -v "^WARNING: Location" >&2); }  # this machine's pip config names absent indexes

# 1. The wheel, from a copy of the tracked (and new, not ignored) files: setuptools' build/ inside a worktree keeps
#    modules that were since deleted, so an in-tree build could ship files the source no longer has.
step "building the wheel (CPU module only)"
mkdir -p "$WORK/src"
git ls-files -z -co --exclude-standard | (cd "$ROOT" && tar --null -T - -cf -) | tar -xf - -C "$WORK/src"
PPFR_SKIP_CUDA_BUILD=1 MAX_JOBS="${MAX_JOBS:-2}" "$PY" -m pip wheel --quiet --no-deps --no-build-isolation \
  -w "$WORK/dist" "$WORK/src" > "$WORK/build.log" 2>&1 || { tail -40 "$WORK/build.log"; fail "wheel build"; }
WHEEL="$(ls "$WORK"/dist/ppfr-*.whl)"
"$PY" - "$WHEEL" <<'EOF' || fail "wheel contents"
import sys, zipfile
names = set(zipfile.ZipFile(sys.argv[1]).namelist())
need = ["ppfr/cli/__init__.py", "ppfr/configs/partialface_tiny.yaml", "ppfr/configs/tiny_base.yaml",
        "ppfr/kernels/__init__.py", "ppfr/pipelines/__init__.py"]
missing = [n for n in need if n not in names]
if not any(n.startswith("ppfr/_C.") and n.endswith(".so") for n in names):
    missing.append("ppfr/_C*.so")
if missing:
    sys.exit(f"the wheel lacks {missing}")
EOF

# 2. A clean venv: the CPU torch wheel, then the wheel with its core dependencies only.
step "clean venv: torch==2.13.0 (CPU), then $(basename "$WHEEL")"
"$PY" -m venv "$WORK/venv"
V="$WORK/venv/bin"
quiet_pip "$V/python" -m pip install --quiet --disable-pip-version-check --only-binary=:all: "torch==2.13.0"
"$V/python" -W ignore -c "import torch, sys; sys.exit(torch.version.cuda and f'a CUDA torch ({torch.version.cuda}) was installed')"
quiet_pip "$V/python" -m pip install --quiet --disable-pip-version-check "$WHEEL"
"$V/python" -m pip check > /dev/null || { "$V/python" -m pip check; fail "pip check"; }

# 3. The checks, from a folder with no ppfr source in it.
cd "$WORK"
step "ppfr info"
rc=0
"$V/ppfr" info > info.txt 2>&1 || rc=$?
[ "$rc" = 0 ] || { cat info.txt; fail "ppfr info exited $rc"; }
for extra in data eval export serve fleet train; do
  grep -q "^extra $extra missing" info.txt || { cat info.txt; fail "ppfr info does not list the missing extra $extra"; }
done
grep "^extras installed\|^extra " info.txt

expect_one_line() {  # expect_one_line NEEDLE CMD...: exit 2 and exactly one stderr line that contains NEEDLE
  local needle="$1" rc=0
  shift
  "$@" > out.txt 2> err.txt || rc=$?
  [ "$rc" = 2 ] && [ "$(wc -l < err.txt)" = 1 ] && grep -qF -- "$needle" err.txt \
    || { cat out.txt err.txt; fail "$* -> exit $rc (want 2 and one line naming $needle)"; }
  step "$(basename "$1") ${2:-}: exit 2: $(cat err.txt)"
}
expect_one_line "pip install 'ppfr[serve]'" "$V/ppfr" serve model.pt --gallery gallery
expect_one_line "partialface_tiny" "$V/ppfr" train no_such_config

step "build_method(\"partialface\").protect(...).recognize(...)"
"$V/python" - <<'EOF' || fail "protect / recognize"
import torch

import ppfr

m = ppfr.build_method("partialface", depth=18, width=16).eval()
with torch.no_grad():
    payload = m.protect(torch.rand(2, 3, 112, 112) * 2 - 1, generator=torch.Generator().manual_seed(0))
    emb = m.recognize(payload)
assert emb.shape[0] == 2 and torch.isfinite(emb).all(), emb.shape
print(f"wheel_check: partialface protect -> recognize: {tuple(emb.shape)} from {ppfr.__file__}")
EOF
step "ppfr demo --batch 4"
"$V/ppfr" demo --batch 4 --out demo > demo.txt 2>&1 && [ -s demo/demo_freq.png ] || { cat demo.txt; fail "ppfr demo"; }
step "ppfr train partialface_tiny, one step"
"$V/ppfr" train partialface_tiny epochs=1 max_steps_per_epoch=1 data.num_samples=64 eval.before=false \
  eval.after=false out_dir=runs > train.txt 2>&1 && [ -s runs/partialface_tiny/model.pt ] \
  || { cat train.txt; fail "ppfr train partialface_tiny"; }
step "ok"
