#!/usr/bin/env bash
# ppfr GPU check: one prepared run on a freshly lent GPU machine (no network; a copy of the repository, no .venv).
#
#   bash scripts/gpu_check.sh OUT                               (run it under a 600 s limit; it stops itself first)
#   PPFR_GPU_CHECK_DRYRUN=1 bash scripts/gpu_check.sh OUT       (CPU dry run of the same logic; tests/test_gpu_check.py)
#
# Interpreter: $PYTHON, else .venv/bin/python, else python3 (the GPU image's python3 holds torch). A missing
# interpreter, or one without torch, is a failure, never "no CUDA device".
# Steps, in order, each under its own cap (`timeout`, SIGINT first so pytest still writes its junit XML and
# benchmark JSON and gpu_headline.py keeps what it measured):
#   preflight   versions, the device, tools (30 s at most); stops the run early when torch sees no CUDA device
#   build       the offline install `pip install --no-build-isolation --no-deps --no-index -e .` for this GPU's
#               arch only, retried with PPFR_WERROR=0 (no -Werror) if the first attempt fails
#   headline    scripts/gpu_headline.py: freq_encode correctness + GB/s, a PartialFace IR-50 training step
#   gpu_tests   pytest -m "cuda or interpret" (with a GPU present the Triton tier runs on it; -n 4 with xdist)
#   sync_free   tests/test_sync_free.py, and sync_gpu: every method under torch.cuda.set_sync_debug_mode
#   bench_*     the GPU benchmarks, one file per step (a timeout loses one file)
# The caps sum to at most the budget (PPFR_GPU_CHECK_BUDGET_S, default 470 s) minus 20 s for the summary; a step
# may also use time that earlier steps left unused, never time reserved for later ones.
# OUT gets at most 4 files: summary.json (rewritten after every step, so it is there whatever stops the run),
# headline.json, log.txt, logs.tgz (every step's log, junit XML, benchmark JSON).
# Exit status: 0 every step passed; 1 a step failed; 2 no usable interpreter or no torch in it; 3 torch sees no
# CUDA device; 4 the preflight itself failed.
set -uo pipefail
OUT=${1:?usage: bash scripts/gpu_check.sh OUT}
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd) || exit 2
DRY=0
[ "${PPFR_GPU_CHECK_DRYRUN:-0}" = 1 ] && DRY=1
# the interpreter, resolved before the cd so a relative $PYTHON means what the caller meant
if [ -n "${PYTHON:-}" ]; then
  PY=$PYTHON PY_FROM='$PYTHON'
  case $PY in */*) [ "${PY#/}" = "$PY" ] && PY=$PWD/$PY ;; esac
else
  PY=.venv/bin/python PY_FROM=.venv
fi
cd "$(dirname "$0")/.." || exit 2
ROOT=$PWD
if [ -z "${PYTHON:-}" ] && [ ! -x "$PY" ]; then
  PY=$(command -v python3 || echo python3) PY_FROM='python3 on PATH'
fi
BUDGET=${PPFR_GPU_CHECK_BUDGET_S:-470}
RESERVE=20 # the summary and the log archive after the last step
START=$SECONDS
WORK=$(mktemp -d "${TMPDIR:-/tmp}/ppfr_gpu_check.XXXXXX") || exit 2
STEPS=$WORK/steps.jsonl
: >"$STEPS"
rm -f "$OUT/summary.json" "$OUT/headline.json" "$OUT/logs.tgz"
: >"$OUT/log.txt"

# The plan: name and cap (s) of every step, in order.
PLAN=(preflight:30 build:110 headline:100 gpu_tests:80 sync_free:25 sync_gpu:35 bench_freq:20 bench_blur:10
  bench_block_shuffle:10 bench_feature_mask_fuse:10 bench_roi_mask:10 bench_sample_ranks:10)
BENCH_FILES=(freq blur block_shuffle feature_mask_fuse roi_mask sample_ranks)
PLAN_TOTAL=0
for e in "${PLAN[@]}"; do PLAN_TOTAL=$((PLAN_TOTAL + ${e##*:})); done
if ((PLAN_TOTAL + RESERVE > BUDGET)); then # a budget below the plan: every cap shrinks in proportion (5 s at least)
  for i in "${!PLAN[@]}"; do
    c=$(((${PLAN[i]##*:} * (BUDGET - RESERVE)) / PLAN_TOTAL))
    PLAN[i]="${PLAN[i]%%:*}:$((c < 5 ? 5 : c))"
  done
fi

log() { echo "== [$((SECONDS - START)) s] $*" | tee -a "$OUT/log.txt"; }

plan_cap() { # plan_cap NAME -> its planned cap; plan_later NAME -> the caps of the steps after it, summed
  local e
  for e in "${PLAN[@]}"; do [ "${e%%:*}" = "$1" ] && echo "${e##*:}" && return; done
  echo 0
}
plan_later() {
  local e seen=0 sum=0
  for e in "${PLAN[@]}"; do
    ((seen)) && sum=$((sum + ${e##*:}))
    [ "${e%%:*}" = "$1" ] && seen=1
  done
  echo "$sum"
}

jstr() { # a JSON string literal of $1
  local s=${1//\\/\\\\}
  s=${s//\"/\\\"}
  s=${s//$'\n'/\\n}
  s=${s//$'\t'/\\t}
  printf '"%s"' "$(printf '%s' "$s" | tr -d '\000-\037')"
}

# summary.json from the shell alone: for failures before a working Python exists
shell_summary() { # shell_summary STATUS EXIT_CODE REASON
  local plan="" e
  for e in "${PLAN[@]}"; do plan+="${plan:+, }{\"name\": \"${e%%:*}\", \"cap_s\": ${e##*:}}"; done
  cat >"$OUT/summary.json" <<J
{
  "status": $(jstr "$1"),
  "ok": false,
  "exit_code": $2,
  "reason": $(jstr "$3"),
  "python": $(jstr "$PY"),
  "python_from": $(jstr "$PY_FROM"),
  "dry_run": $([ "$DRY" = 1 ] && echo true || echo false),
  "budget_s": $BUDGET,
  "elapsed_s": $((SECONDS - START)),
  "plan": [$plan],
  "steps": [$(paste -sd, "$STEPS")]
}
J
}

# summary.json from every record so far (stdlib only: works with a torch-less interpreter); the shell's if it fails
summary() { # summary STATUS EXIT_CODE [REASON]
  local plan="" e
  for e in "${PLAN[@]}"; do plan+="${plan:+,}${e}"; done
  tar -czf "$OUT/logs.tgz.part" -C "$WORK" . 2>/dev/null && mv -f "$OUT/logs.tgz.part" "$OUT/logs.tgz"
  [ -f "$WORK/headline.json" ] && cp -f "$WORK/headline.json" "$OUT/headline.json"
  timeout 20 "$PY" - "$WORK" "$OUT" "$1" "$2" "${3:-}" "$PY" "$PY_FROM" "$DRY" "$BUDGET" "$RESERVE" \
    "$((SECONDS - START))" "$plan" <<'P' 2>>"$OUT/log.txt" || shell_summary "$1" "$2" "${3:-summary.json from the shell: Python failed}"
import json, sys, xml.etree.ElementTree as ET
from pathlib import Path
work, out, status, code, reason, py, py_from, dry, budget, reserve, elapsed, plan = sys.argv[1:]
def load(p, default=None):
    try:
        return json.loads(Path(p).read_text())
    except (OSError, ValueError):
        return default
steps = [json.loads(l) for l in (Path(work) / "steps.jsonl").read_text().splitlines() if l.strip()]
plan = [{"name": e.split(":")[0], "cap_s": int(e.split(":")[1])} for e in plan.split(",")]
running = status == "running"  # written after every step: a run stopped from outside still leaves this
s = {"status": status, "ok": not running and int(code) == 0, "exit_code": None if running else int(code),
     "reason": reason or None, "dry_run": dry == "1",
     "python": py, "python_from": py_from, "budget_s": int(budget), "reserve_s": int(reserve),
     "caps_total_s": sum(p["cap_s"] for p in plan), "elapsed_s": int(elapsed),
     "headline": load(Path(work) / "headline.json"), "environment": load(Path(work) / "preflight.json"),
     "build": (Path(work) / "build_status.txt").read_text().strip() if (Path(work) / "build_status.txt").exists() else None,
     "plan": plan, "steps": steps}
tests = {}
for xml in sorted(Path(work).glob("*.xml")):
    try:
        r = ET.parse(xml).getroot()
        suites = [r] if r.tag == "testsuite" else list(r)
        c = {k: sum(int(x.get(k, 0)) for x in suites) for k in ("tests", "failures", "errors", "skipped")}
        c["failed"] = [f"{t.get('classname')}::{t.get('name')}" for t in r.iter("testcase")
                       if t.find("failure") is not None or t.find("error") is not None][:30]
        tests[xml.stem] = c
    except (OSError, ET.ParseError) as exc:
        tests[xml.stem] = {"error": repr(exc)}
s["tests"] = tests
s["sync_gpu"] = load(Path(work) / "sync_gpu.json")
bench = {}
for f in sorted(Path(work).glob("bench_*.figures.json")):
    figs = load(f, {})
    bench[f.name.split(".")[0]] = {
        "figures": [{k: r.get(k) for k in ("case", "provider", "seconds", "images_per_s", "gb_per_s_total",
                                          "fraction_of_peak_bw")} for r in figs.get("results", [])],
        "ratio_checks": figs.get("checks", [])}
s["benchmarks"] = bench
Path(out, "summary.json.part").write_text(json.dumps(s, indent=2))
Path(out, "summary.json.part").replace(Path(out, "summary.json"))
P
}

finish() { # finish STATUS EXIT_CODE [REASON]: the summary, then exit
  log "finish: $1 (exit $2)${3:+: $3}"
  summary "$@"
  rm -rf "$WORK"
  exit "$2"
}

# step NAME CMD...: run CMD under min(2 x its planned cap (the preflight: its cap), the time left less the reserve
# and the later steps' caps); SIGINT 5 s before the cap, SIGKILL at it. Output in WORK/NAME.log (its tail in log.txt); a record in steps.jsonl.
step() {
  local name=$1
  shift
  local planned cap left
  planned=$(plan_cap "$name")
  left=$((BUDGET - RESERVE - (SECONDS - START) - $(plan_later "$name")))
  cap=$((2 * planned))
  [ "$name" = preflight ] && cap=$planned
  ((left < cap)) && cap=$left
  if ((cap < 8)); then
    log "$name: skipped (time budget spent)"
    echo "{\"name\": \"$name\", \"cap_s\": $planned, \"rc\": null, \"seconds\": 0, \"skipped\": \"time budget spent\"}" >>"$STEPS"
    return 0
  fi
  if [ "$DRY" = 1 ] && [ "$name" != headline ] && [ "$name" != preflight ]; then
    log "$name (cap ${cap} s, dry run: not run): $*"
    echo "{\"name\": \"$name\", \"cap_s\": $planned, \"rc\": null, \"seconds\": 0, \"dry_run\": \"not run\", \"command\": $(jstr "$*")}" >>"$STEPS"
    summary running 0
    return 0
  fi
  log "$name (cap ${cap} s): $*"
  local t0=$SECONDS rc
  timeout -s INT -k 5 $((cap - 5)) "$@" >"$WORK/$name.log" 2>&1
  rc=$?
  tail -n 12 "$WORK/$name.log" | cut -c1-400 | tee -a "$OUT/log.txt"
  log "$name: rc=$rc in $((SECONDS - t0)) s"
  local timed_out=false
  { [ $rc -eq 124 ] || [ $rc -eq 137 ]; } && timed_out=true
  echo "{\"name\": \"$name\", \"cap_s\": $planned, \"rc\": $rc, \"seconds\": $((SECONDS - t0)), \"timed_out\": $timed_out, \"command\": $(jstr "$*")}" >>"$STEPS"
  FAILED=$((FAILED + (rc != 0)))
  summary running 0
  return $rc
}
FAILED=0

# ------------------------------------------------------------------------------------------ the interpreter
log "ppfr gpu_check: OUT=$OUT python=$PY ($PY_FROM) budget=${BUDGET} s dry_run=$DRY"
no_interpreter() { # no_interpreter REASON: summary.json from the shell, exit 2
  shell_summary "no interpreter" 2 "$1"
  log "FAIL: $1"
  rm -rf "$WORK"
  exit 2
}
command -v "$PY" >/dev/null 2>&1 || no_interpreter "python interpreter not found: $PY (from $PY_FROM)"
timeout 20 "$PY" -c 'import json, sys, xml.etree.ElementTree' >>"$OUT/log.txt" 2>&1 ||
  no_interpreter "python interpreter does not run (or lacks the standard library): $PY (from $PY_FROM)"
# the interpreter's own bin first (cmake, ninja, pytest of its environment), then nvcc
PATH="$(cd "$(dirname "$(command -v "$PY")")" && pwd):$PATH"
if ! command -v nvcc >/dev/null 2>&1 && [ -x /usr/local/cuda/bin/nvcc ]; then PATH=$PATH:/usr/local/cuda/bin; fi
if command -v nvcc >/dev/null 2>&1 && [ -z "${CUDA_HOME:-}" ]; then
  CUDA_HOME=$(dirname "$(dirname "$(readlink -f "$(command -v nvcc)")")")
  export CUDA_HOME
fi
export PATH PYTHONUNBUFFERED=1 PIP_NO_INDEX=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-$ROOT/.cache/triton} PPFR_BENCH_GPU_WARMUP_S=${PPFR_BENCH_GPU_WARMUP_S:-1}

# ------------------------------------------------------------------------------------------------ preflight
step preflight "$PY" - "$WORK/preflight.json" "$DRY" <<'P'
import importlib.metadata as md, json, os, platform, shutil, subprocess, sys, sysconfig
out, dry = sys.argv[1], sys.argv[2] == "1"
env = {"python": sys.version.split()[0], "executable": sys.executable, "platform": platform.platform(),
       "cpu_count": os.cpu_count(), "python_h": os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")),
       "tools": {t: shutil.which(t) for t in ("nvcc", "cmake", "ninja", "c++", "nvidia-smi")}}
def dump():
    json.dump(env, open(out, "w"), indent=2)
for d in ("triton", "numpy", "pybind11", "setuptools", "pytest", "pytest-xdist", "pytest-benchmark", "pytest-timeout",
          "onnx", "onnxruntime", "onnxruntime-gpu"):
    try:
        env.setdefault("packages", {})[d] = md.version(d)
    except md.PackageNotFoundError:
        env.setdefault("packages", {})[d] = None
try:
    import torch
except Exception as exc:  # noqa: BLE001 - the reason goes into the summary
    env.update(torch=None, torch_error=repr(exc)[:400])
    dump()
    print(f"no torch in {sys.executable}: {exc!r}")
    sys.exit(2)
env.update(torch=torch.__version__, torch_cuda=torch.version.cuda, cuda_available=torch.cuda.is_available())
if env["cuda_available"]:
    p = torch.cuda.get_device_properties(0)
    env["gpu"] = {"name": torch.cuda.get_device_name(0), "capability": f"{p.major}.{p.minor}", "arch": f"{p.major}{p.minor}",
                  "sms": p.multi_processor_count, "memory_gib": round(p.total_memory / 2**30, 1)}
pins = {}
try:  # versions that differ from requirements.txt's pins are reported, never refused (the image brings its own)
    for line in open("requirements.txt", encoding="utf-8"):
        name, sep, ver = line.split("#")[0].strip().partition("==")
        if sep:
            pins[name.split("[")[0].strip().lower()] = ver.strip()
except OSError:
    pass
have = {"torch": env["torch"], "triton": env["packages"]["triton"]}
env["differs_from_pins"] = {k: {"pinned": pins[k], "installed": v} for k, v in have.items()
                            if k in pins and v and v.split("+")[0] != pins[k]}
if env["tools"]["nvidia-smi"]:
    try:
        q = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                           capture_output=True, text=True, timeout=10)
        env["nvidia_smi"] = q.stdout.strip().splitlines()
    except (OSError, subprocess.SubprocessError) as exc:
        env["nvidia_smi"] = repr(exc)
dump()
print(json.dumps(env))
sys.exit(0 if env["cuda_available"] or dry else 3)
P
case $? in
  0) ;;
  2) finish "no torch" 2 "the interpreter $PY ($PY_FROM) cannot import torch (see environment.torch_error)" ;;
  3) finish "no CUDA device" 3 "torch $("$PY" -c 'import torch; print(torch.__version__)' 2>/dev/null) in $PY sees no CUDA device; stopped early" ;;
  *) finish "preflight failed" 4 "the preflight failed or timed out (see logs.tgz: preflight.log)" ;;
esac
ARCH=$("$PY" -c 'import json, sys; print(json.load(open(sys.argv[1]))["gpu"]["arch"])' "$WORK/preflight.json" 2>/dev/null || echo 90)

# ---------------------------------------------------------------------------------------------------- build
# The offline editable install for this GPU's architecture only; a second try without -Werror (a newer compiler's
# new warning must not cost the run). WORK/build_status.txt says which attempt built.
step build env PPFR_CUDA_ARCHS="$ARCH" MAX_JOBS="$(nproc)" bash -c '
  py=$1 status=$2
  pip_e() { "$py" -m pip install -v --no-build-isolation --no-deps --no-index -e .; }
  imports() { "$py" -c "import ppfr.kernels, ppfr._C, ppfr._C_cuda; print(\"modules import\")"; }
  echo "== build, attempt 1 (-Werror)"
  if pip_e && imports; then echo "built with -Werror, sm_$PPFR_CUDA_ARCHS" >"$status"; exit 0; fi
  echo "== build, attempt 2 (PPFR_WERROR=0)"
  if PPFR_WERROR=0 pip_e && imports; then echo "built WITHOUT -Werror (attempt 1 failed: see build.log), sm_$PPFR_CUDA_ARCHS" >"$status"; exit 0; fi
  echo "build failed twice (see build.log)" >"$status"; exit 1' build "$PY" "$WORK/build_status.txt"

# ------------------------------------------------------------------------------------------- headline numbers
HEADLINE_ARGS=()
[ "$DRY" = 1 ] && HEADLINE_ARGS=(--dry-run)
step headline "$PY" scripts/gpu_headline.py "$WORK/headline.json" "${HEADLINE_ARGS[@]}"

# ----------------------------------------------------------------------------------------- the GPU test tier
# pytest with SIGINT restored (a shell started in the background passes SIGINT on ignored): stopped at its cap, it
# still writes its junit XML and benchmark JSON. -n 4 with pytest-xdist (Triton compiles in parallel), a per-test
# limit with pytest-timeout, where the image has them.
PYTEST=("$PY" -c 'import signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); import pytest
sys.exit(pytest.main())' -q -p no:cacheprovider)
XDIST=() PER_TEST=()
"$PY" -c 'import xdist' 2>/dev/null && XDIST=(-n 4)
"$PY" -c 'import pytest_timeout' 2>/dev/null && PER_TEST=(--timeout 60)
# With a GPU present the interpret tier runs its Triton kernels on the GPU (tests/conftest.py: triton_device).
TEST_FILES=()
while IFS= read -r f; do TEST_FILES+=("$f"); done < <(grep -l -E 'mark\.(cuda|interpret)' tests/test_*.py)
step gpu_tests "${PYTEST[@]}" "${XDIST[@]}" -m "cuda or interpret" "${PER_TEST[@]}" --junitxml="$WORK/gpu_tests.xml" \
  "${TEST_FILES[@]}"

# ---------------------------------------------------------------------------------------- host-sync checks
step sync_free "${PYTEST[@]}" "${PER_TEST[@]}" --junitxml="$WORK/sync_free.xml" tests/test_sync_free.py
# Every method's protect / recognize / training step on the GPU under torch.cuda.set_sync_debug_mode("warn"): each
# synchronising CUDA call (item, nonzero, blocking copies) warns; the count per call must be 0.
step sync_gpu "$PY" - "$WORK/sync_gpu.json" <<'P'
import json, sys, warnings
import torch
import torch.nn.functional as F
import ppfr
from ppfr.methods import available_methods

dev = torch.device("cuda")
OPTIONS = {"minusface": {"gen_width": 4}, "profacec-quant": {"keep_ratio": 0.5, "bits": 8}}
CASES = [*available_methods(), "profacec-quant"]
results = []

def record(row):
    results.append(row)
    print(json.dumps(row), flush=True)
    json.dump({"ok": not any(r.get("error") or r.get("syncs", 0) for r in results), "calls": results},
              open(sys.argv[1], "w"), indent=2)  # after every call: a timeout keeps what ran

def syncs(fn):
    """(number of synchronising CUDA calls fn made, the first messages); warm-up calls happen before."""
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode(0)
    hits = [str(w.message) for w in caught if "synchroniz" in str(w.message)]
    return len(hits), hits[:3]

x = torch.rand(8, 3, 112, 112, device=dev) * 2 - 1
labels = torch.randint(0, 4, (8,), device=dev)
for case in CASES:
    torch.manual_seed(0)
    m = ppfr.build_method(case.split("-")[0], depth=18, width=16, embedding_size=64, **OPTIONS.get(case, {})).to(dev)
    head = torch.nn.Linear(64, 4).to(dev)
    def margin(emb, y):
        logits = head(emb)
        return F.cross_entropy(logits, y), logits
    for mode in ("eval", "train"):
        m.train(mode == "train")
        for gen in (None, "cpu"):
            def call():
                with torch.no_grad():
                    g = None if gen is None else torch.Generator().manual_seed(0)
                    return m.recognize(m.protect(x, labels=labels, generator=g))
            row = {"case": case, "mode": mode, "generator": gen, "call": "protect+recognize"}
            try:
                call(); call()  # warm-up: kernels compile, per-device tables are made once
                n, first = syncs(call)
                row.update(syncs=n, first=first)
            except Exception as exc:  # noqa: BLE001 - recorded per call
                row["error"] = repr(exc)[:400]
            record(row)
    for stage in m.stages():
        m.set_stage(stage.name)
        m.train()
        step_ = lambda: m.training_step(stage.name, x, labels, margin)["loss"].backward()
        row = {"case": case, "stage": stage.name, "call": "training_step+backward"}
        try:
            step_(); step_()
            n, first = syncs(step_)
            row.update(syncs=n, first=first)
        except Exception as exc:  # noqa: BLE001
            row["error"] = repr(exc)[:400]
        record(row)
sys.exit(0 if all(not r.get("error") and r.get("syncs", 0) == 0 for r in results) else 1)
P

# ------------------------------------------------------------------------------ benchmarks, one file per step
for f in "${BENCH_FILES[@]}"; do
  step "bench_$f" env PPFR_BENCH_RATIOS="$WORK/bench_$f.figures.json" "${PYTEST[@]}" --benchmark-only -k "triton or cuda" \
    --benchmark-json="$WORK/bench_$f.json" --junitxml="$WORK/bench_$f.xml" \
    "benchmarks/bench_$f.py"
done

if [ "$DRY" = 1 ]; then
  ((FAILED == 0)) && finish "dry run" 0 || finish "dry run" 1 "$FAILED step(s) failed"
fi
DEVICE=$("$PY" -c 'import json, sys; print(json.load(open(sys.argv[1]))["gpu"]["name"])' "$WORK/preflight.json" 2>/dev/null)
((FAILED == 0)) && finish "ran on $DEVICE" 0 || finish "ran on $DEVICE" 1 "$FAILED step(s) failed"
