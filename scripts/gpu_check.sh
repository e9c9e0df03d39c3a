#!/usr/bin/env bash
# ppfr GPU check, one prepared run: build the extensions, the kernel tests on real CUDA, a host-sync check of every
# method on the GPU, the GPU benchmarks -> OUT/summary.json (plus logs, junit XML, benchmark JSON).
#
#   bash scripts/gpu_check.sh OUT        (from the repository root; Python: $PYTHON, else .venv/bin/python)
#
# Without a usable CUDA device (no GPU, or a CPU-only torch) it checks what it can (interpreter and library
# versions, ppfr import, backend availability), writes summary.json with status "no CUDA device" and exits 0.
# Time: every step has its own cap and the whole run stays under PPFR_GPU_CHECK_BUDGET_S (default 470 s, under 8 minutes; run it with a 600 s limit), so
# summary.json is always written; the exit status is 0 when every step that ran passed, 1 otherwise.
set -uo pipefail
OUT=${1:?usage: bash scripts/gpu_check.sh OUT}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
cd "$(dirname "$0")/.." || exit 1
PY=${PYTHON:-.venv/bin/python}
BUDGET=${PPFR_GPU_CHECK_BUDGET_S:-470}
START=$SECONDS
STEPS="$OUT/steps.jsonl"
: >"$STEPS"
: >"$OUT/log.txt"
export PYTHONUNBUFFERED=1 TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-$PWD/.cache/triton}

log() { echo "== [$((SECONDS - START)) s] $*" | tee -a "$OUT/log.txt"; }

# step NAME CAP_S CMD...: run CMD with a timeout of min(CAP_S, what is left of the budget - 30 s for the summary),
# log its output to OUT/NAME.log and record {name, rc, seconds} in steps.jsonl. A step with no time left is skipped.
step() {
  local name=$1 cap=$2
  shift 2
  local left=$((BUDGET - (SECONDS - START) - 30))
  ((left < cap)) && cap=$left
  if ((cap < 10)); then
    log "$name: skipped (time budget spent)"
    echo "{\"name\": \"$name\", \"rc\": null, \"seconds\": 0, \"skipped\": \"time budget spent\"}" >>"$STEPS"
    return 0
  fi
  log "$name (cap ${cap} s): $*"
  local t0=$SECONDS
  timeout --kill-after=5 "$cap" "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  tail -n 15 "$OUT/$name.log" | tee -a "$OUT/log.txt"
  log "$name: rc=$rc in $((SECONDS - t0)) s"
  echo "{\"name\": \"$name\", \"rc\": $rc, \"seconds\": $((SECONDS - t0)), \"timed_out\": $([ $rc -eq 124 ] || [ $rc -eq 137 ] && echo true || echo false)}" >>"$STEPS"
  return 0
}

# ---------------------------------------------------------------------------------------------- environment
ENV_JSON="$OUT/environment.json"
"$PY" - "$ENV_JSON" <<'P' 2>>"$OUT/log.txt"
import json, platform, shutil, subprocess, sys
env = {"python": sys.version.split()[0], "python_executable": sys.executable, "platform": platform.platform()}
try:
    import torch
    env.update(torch=torch.__version__, torch_cuda_build=torch.version.cuda, cuda_available=torch.cuda.is_available(),
               cuda_device_count=torch.cuda.device_count())
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        env.update(device=torch.cuda.get_device_name(0), capability=f"{p.major}.{p.minor}",
                   memory_gib=round(p.total_memory / 2**30, 1), l2_mib=round(getattr(p, "L2_cache_size", 0) / 2**20, 1))
except Exception as exc:  # noqa: BLE001 - reported, not raised: the summary says what is missing
    env.update(torch=None, torch_error=repr(exc), cuda_available=False)
try:
    import triton
    env["triton"] = triton.__version__
except Exception as exc:  # noqa: BLE001
    env["triton"], env["triton_error"] = None, repr(exc)
# versions that differ from requirements.txt's pins are reported, never refused (a GPU image brings its own torch)
pins = {}
try:
    for line in open("requirements.txt", encoding="utf-8"):
        name, sep, ver = line.split("#")[0].strip().partition("==")
        if sep:
            pins[name.split("[")[0].lower()] = ver
except OSError:
    pass
env["differs_from_pins"] = {k: {"pinned": pins[k], "installed": env.get(k)} for k in ("torch", "triton")
                            if k in pins and env.get(k) and str(env[k]).split("+")[0] != pins[k]}
smi = shutil.which("nvidia-smi")
env["nvidia_smi"] = bool(smi)
if smi:
    q = subprocess.run([smi, "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                       capture_output=True, text=True, timeout=20)
    env["nvidia_smi_gpus"] = q.stdout.strip().splitlines()
try:
    from ppfr import _backend, _ext
    from ppfr.methods import available_methods
    env["ppfr_methods"] = available_methods()
    env["ppfr_C"] = _ext.load("_C")[1] or "loaded"
    env["ppfr_C_cuda"] = _ext.load("_C_cuda")[1] or "loaded"
    dev = torch.device("cuda" if env.get("cuda_available") else "cpu")
    env["backends"] = {b: (_backend.unavailable_reason(b, dev) or "available") for b in ("torch", "cpp", "triton", "cuda")}
except Exception as exc:  # noqa: BLE001
    env["ppfr_error"] = repr(exc)
json.dump(env, open(sys.argv[1], "w"), indent=2)
print(json.dumps(env, indent=2))
P
cat "$ENV_JSON" >>"$OUT/log.txt" 2>/dev/null
CUDA=$("$PY" -c 'import json,sys; print(int(bool(json.load(open(sys.argv[1])).get("cuda_available"))))' "$ENV_JSON" 2>/dev/null || echo 0)

summary() {  # summary STATUS: OUT/summary.json from environment.json, steps.jsonl, junit XML and benchmark figures
  "$PY" - "$OUT" "$1" <<'P'
import json, sys, xml.etree.ElementTree as ET
from pathlib import Path
out, status = Path(sys.argv[1]), sys.argv[2]
def load(name, default):
    try:
        return json.loads((out / name).read_text())
    except (OSError, ValueError):
        return default
steps = [json.loads(l) for l in (out / "steps.jsonl").read_text().splitlines() if l.strip()]
s = {"status": status, "environment": load("environment.json", {}), "steps": steps}
tests = {}
for xml in sorted(out.glob("*.xml")):
    try:
        r = ET.parse(xml).getroot()
        suites = [r] if r.tag == "testsuite" else list(r)
        c = {k: sum(int(x.get(k, 0)) for x in suites) for k in ("tests", "failures", "errors", "skipped")}
        c["failed"] = [f"{t.get('classname')}::{t.get('name')}" for t in r.iter("testcase")
                       if t.find("failure") is not None or t.find("error") is not None][:30]
        tests[xml.stem] = c
    except (OSError, ET.ParseError) as exc:
        tests[xml.stem] = {"error": repr(exc)}
if tests:
    s["tests"] = tests
sync = load("sync_check.json", None)
if sync is not None:
    s["sync_check"] = sync
figs = load("bench_figures.json", None)
if figs is not None:
    s["benchmarks"] = {"figures": [{k: r.get(k) for k in ("case", "provider", "seconds", "images_per_s",
                                    "gb_per_s_total", "fraction_of_peak_bw", "rounds", "warmup_calls", "warmup_settled")}
                                   for r in figs.get("results", [])], "ratio_checks": figs.get("checks", [])}
ran = [x for x in steps if x.get("rc") is not None]
s["ok"] = status == "no CUDA device" or (bool(ran) and all(x["rc"] == 0 for x in ran))
(out / "summary.json").write_text(json.dumps(s, indent=2))
print(f"summary: {out / 'summary.json'} status={status} ok={s['ok']}")
P
}

if [ "$CUDA" != 1 ]; then
  log "no CUDA device for $PY (see environment.json): nothing to run on a GPU"
  step cpu_sanity 60 "$PY" -c 'import torch; from ppfr.ops.freq import freq_encode
x = torch.rand(2, 3, 16, 16) * 2 - 1; print("freq_encode on the CPU:", tuple(freq_encode(x).shape))'
  summary "no CUDA device"
  exit 0
fi

# ----------------------------------------------------------------------------------------------- GPU steps
NVCC=$(command -v nvcc || { [ -x /usr/local/cuda/bin/nvcc ] && echo /usr/local/cuda/bin/nvcc; } || true)
[ -n "$NVCC" ] && export PATH="$(dirname "$NVCC"):$PATH" || export PPFR_SKIP_CUDA_BUILD=1
ARCH=$("$PY" -c 'import torch; p = torch.cuda.get_device_properties(0); print(f"{p.major}{p.minor}")')
# offline build (the GPU machine may have no network): the C++ and CUDA modules for this GPU's architecture only
step build 150 env PPFR_CUDA_ARCHS="$ARCH" MAX_JOBS="$(nproc)" "$PY" -m pip install -q --no-build-isolation --no-deps \
  --no-index -e .

# the cuda tier and the interpret tier (with a GPU present the Triton kernels run on it, not in the interpreter)
KERNEL_TESTS=()
for f in test_freq test_blur test_roi_mask test_block_shuffle test_feature_mask_fuse test_sample_ranks \
  test_launch_device test_kernel_tiling; do
  [ -f "tests/$f.py" ] && KERNEL_TESTS+=("tests/$f.py")
done
step kernel_tests 150 "$PY" -m pytest -q -p no:cacheprovider -m "cuda or interpret" --timeout 120 \
  --junitxml="$OUT/kernel_tests.xml" "${KERNEL_TESTS[@]}"
step cuda_module 40 "$PY" -m pytest -q -p no:cacheprovider --timeout 60 --junitxml="$OUT/cuda_module.xml" \
  tests/test_gpu_compile.py -k cuda_module

# Every method's protect / recognize / training step on the GPU under torch.cuda.set_sync_debug_mode("warn"): each
# synchronising CUDA call (item, nonzero, blocking copies) warns once; the count per call must be 0.
step sync_check 60 "$PY" - "$OUT/sync_check.json" <<'P'
import json, sys, warnings
import torch
import torch.nn.functional as F
import ppfr
from ppfr.methods import available_methods

dev = torch.device("cuda")
CASES = {"arcface": {}, "arcface_fd": {}, "duetface": {}, "partialface": {}, "minusface": {"gen_width": 4},
         "profacec": {}, "profacec-quant": {"keep_ratio": 0.5, "bits": 8}}
assert {c.split("-")[0] for c in CASES} == set(available_methods())

def syncs(fn):
    """(number of synchronising CUDA calls fn made, first messages); warm-up calls happen before."""
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

results, failed = [], False
x = torch.rand(8, 3, 112, 112, device=dev) * 2 - 1
labels = torch.randint(0, 4, (8,), device=dev)
for case, opts in CASES.items():
    torch.manual_seed(0)
    m = ppfr.build_method(case.split("-")[0], depth=18, width=16, embedding_size=64, **opts).to(dev)
    head = torch.nn.Linear(64, 4).to(dev)
    def margin(emb, y):
        logits = head(emb)
        return F.cross_entropy(logits, y), logits
    for mode in ("eval", "train"):
        m.train(mode == "train")
        for gen in (None, "cpu"):
            g = lambda: None if gen is None else torch.Generator().manual_seed(0)
            def call():
                with torch.no_grad():
                    return m.recognize(m.protect(x, labels=labels, generator=g()))
            try:
                call(); call()  # warm-up: kernels compile, per-device tables are made once
                n, first = syncs(call)
                row = {"case": case, "mode": mode, "generator": gen, "call": "protect+recognize", "syncs": n, "first": first}
            except Exception as exc:  # noqa: BLE001 - recorded per call
                row = {"case": case, "mode": mode, "generator": gen, "call": "protect+recognize", "error": repr(exc)[:400]}
            results.append(row)
    for stage in m.stages():
        m.set_stage(stage.name)
        m.train()
        step_ = lambda: m.training_step(stage.name, x, labels, margin)["loss"].backward()
        try:
            step_(); step_()
            n, first = syncs(step_)
            row = {"case": case, "stage": stage.name, "call": "training_step+backward", "syncs": n, "first": first}
        except Exception as exc:  # noqa: BLE001
            row = {"case": case, "stage": stage.name, "call": "training_step+backward", "error": repr(exc)[:400]}
        results.append(row)
for r in results:
    failed |= bool(r.get("error")) or r.get("syncs", 0) > 0
    print(json.dumps(r))
json.dump({"ok": not failed, "calls": results}, open(sys.argv[1], "w"), indent=2)
sys.exit(1 if failed else 0)
P

step benchmarks 220 env PPFR_BENCH_RATIOS="$OUT/bench_figures.json" "$PY" -m pytest -q -p no:cacheprovider \
  --benchmark-only -k "triton or cuda" --benchmark-json="$OUT/bench.json" --junitxml="$OUT/benchmarks.xml" \
  benchmarks/bench_freq.py benchmarks/bench_blur.py benchmarks/bench_block_shuffle.py \
  benchmarks/bench_feature_mask_fuse.py benchmarks/bench_roi_mask.py benchmarks/bench_sample_ranks.py

summary "ran on $("$PY" -c 'import torch; print(torch.cuda.get_device_name(0))')"
"$PY" -c 'import json, sys; sys.exit(0 if json.load(open(sys.argv[1]))["ok"] else 1)' "$OUT/summary.json"
