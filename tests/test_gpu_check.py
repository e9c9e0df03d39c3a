"""``scripts/gpu_check.sh`` on a CPU: the dry run obeys the GPU run's limits, and an unusable interpreter fails.

The GPU machines are lent briefly (one command of at most 10 minutes, at most 8 files at most 2 folders deep come
back from OUT), so these run the script's own logic without a GPU: ``PPFR_GPU_CHECK_DRYRUN=1`` runs the preflight
and ``scripts/gpu_headline.py --dry-run`` (CPU, tiny sizes) for real and records every other step with its cap.
A missing or torch-less interpreter must be a failure with the reason in OUT/summary.json, never "no CUDA device".
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu_check.sh"
HEADLINE = ROOT / "scripts" / "gpu_headline.py"
MAX_FILES, MAX_DEPTH, MAX_SECONDS = 8, 2, 480  # what comes back from a device run; the run's time limit (8 min)

pytestmark = pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None,
                                reason="needs bash and coreutils timeout")  # fmt: skip


def _run(out: Path, script: Path = SCRIPT, timeout: float = 300, **env: str) -> subprocess.CompletedProcess:
    e = {k: v for k, v in os.environ.items() if k not in ("PYTHON", "PPFR_GPU_CHECK_DRYRUN", "PPFR_GPU_CHECK_BUDGET_S")}
    e.update(env)
    return subprocess.run(["bash", str(script), str(out)], env=e, capture_output=True, text=True, timeout=timeout)


def _summary(out: Path) -> dict:
    return json.loads((out / "summary.json").read_text())


def _torchless_python(tmp: Path, name: str = "python-no-torch") -> Path:
    """An interpreter that runs but cannot import torch: this Python, isolated (-I) and without site-packages (-S)."""
    p = tmp / name
    p.write_text(f'#!/bin/sh\nexec "{sys.executable}" -I -S "$@"\n')
    p.chmod(0o755)
    return p


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory) -> tuple[subprocess.CompletedProcess, Path, float]:
    out = tmp_path_factory.mktemp("gpu_check_dry") / "OUT"
    t0 = time.monotonic()
    res = _run(out, PYTHON=sys.executable, PPFR_GPU_CHECK_DRYRUN="1")
    return res, out, time.monotonic() - t0


def test_dry_run_obeys_the_file_and_time_limits(dry_run):
    res, out, seconds = dry_run
    s = _summary(out)
    assert res.returncode == s["exit_code"], res.stdout[-3000:] + res.stderr[-2000:]
    files = [p for p in out.rglob("*") if p.is_file()]
    assert 1 <= len(files) <= MAX_FILES, files
    assert all(len(p.relative_to(out).parts) - 1 <= MAX_DEPTH for p in out.rglob("*")), files
    assert {"summary.json", "log.txt", "logs.tgz"} <= {p.name for p in files}
    assert s["caps_total_s"] + s["reserve_s"] <= s["budget_s"] < MAX_SECONDS
    assert s["elapsed_s"] <= s["budget_s"] and seconds < s["budget_s"]


def test_dry_run_lists_every_step_with_its_cap(dry_run):
    res, out, _ = dry_run
    s = _summary(out)
    assert s["dry_run"] is True and s["status"] == "dry run"
    plan = [p["name"] for p in s["plan"]]
    assert plan[:3] == ["preflight", "build", "headline"]  # the headline numbers come right after the build
    assert {"gpu_tests", "sync_free", "sync_gpu"} <= set(plan)
    assert len([n for n in plan if n.startswith("bench_")]) >= 6  # one benchmark file per step
    assert (
        all(p["cap_s"] > 0 for p in s["plan"]) and next(p for p in s["plan"] if p["name"] == "preflight")["cap_s"] <= 30
    )
    steps = {st["name"]: st for st in s["steps"]}
    assert list(steps) == plan, res.stdout[-3000:]
    for name, st in steps.items():
        assert st["cap_s"] == next(p["cap_s"] for p in s["plan"] if p["name"] == name)
        if name in ("preflight", "headline"):  # run for real (CPU, tiny sizes)
            assert st["rc"] is not None and not st["timed_out"], st
        else:
            assert st["dry_run"] == "not run" and st["command"], st
    assert steps["preflight"]["rc"] == 0 and s["environment"]["torch"]


def test_dry_run_headline_uses_the_real_apis(dry_run):
    _, out, _ = dry_run
    h = _summary(out)["headline"]
    assert h == json.loads((out / "headline.json").read_text())
    assert h["complete"] and h["interrupted"] is None and not h["errors"], h.get("errors")
    assert "providers" in h["onnxruntime"] or "error" in h["onnxruntime"]
    enc = h["freq_encode"]
    assert {k.split("/")[1] for k in enc} == {"all192", "ranks27"}
    assert all(v["correct"] and v["ms"] > 0 for v in enc.values()), enc  # checked against float64, then timed
    train = {k: v for k, v in h["train_partialface"].items() if isinstance(v, dict)}
    assert {k.split("/")[1] for k in train} == {"fused", "ref", "torch"}
    assert {k.split("/")[0] for k in train} == {"float32", "bf16"}
    assert all(("img_per_s" in v and "protect_ms" in v) or "error" in v for v in train.values())
    assert train["float32/fused"]["img_per_s"] > 0


def test_missing_interpreter_fails_with_the_reason(tmp_path):
    res = _run(tmp_path / "OUT", PYTHON="/nonexistent", timeout=60)
    s = _summary(tmp_path / "OUT")
    assert res.returncode != 0 and s["exit_code"] == res.returncode and s["ok"] is False
    assert s["status"] == "no interpreter" and "/nonexistent" in s["reason"]
    assert "cuda" not in s["status"].lower()


def test_torchless_interpreter_fails_with_the_reason(tmp_path):
    res = _run(tmp_path / "OUT", PYTHON=str(_torchless_python(tmp_path)), timeout=60)
    s = _summary(tmp_path / "OUT")
    assert res.returncode != 0 and s["exit_code"] == res.returncode and s["ok"] is False, res.stdout[-2000:]
    assert s["status"] == "no torch" and "torch" in s["reason"] and s["environment"]["torch"] is None
    assert "cuda" not in s["status"].lower()


def test_fresh_clone_without_venv_uses_python3_and_fails_without_torch(tmp_path):
    """A copy with no .venv and no $PYTHON takes python3 from PATH; here one without torch."""
    (tmp_path / "repo" / "scripts").mkdir(parents=True)
    script = tmp_path / "repo" / "scripts" / "gpu_check.sh"
    shutil.copy(SCRIPT, script)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    _torchless_python(bin_dir, "python3")
    res = _run(tmp_path / "OUT", script=script, timeout=60, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    s = _summary(tmp_path / "OUT")
    assert res.returncode == 2 and s["status"] == "no torch", res.stdout[-2000:]
    assert s["python_from"] == "python3 on PATH"


def test_headline_stopped_by_a_timeout_keeps_its_partial_results(tmp_path):
    """gpu_check.sh stops a step with SIGINT at its cap: what the headline measured so far stays in its JSON."""
    out = tmp_path / "headline.json"
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    p = subprocess.Popen([sys.executable, str(HEADLINE), str(out), "--dry-run"], cwd=ROOT, env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and p.poll() is None:
        try:
            if "freq_encode" in json.loads(out.read_text()):
                break
        except (OSError, ValueError):
            pass
        time.sleep(0.05)
    p.send_signal(signal.SIGINT)
    log = p.communicate(timeout=60)[0]
    h = json.loads(out.read_text())
    assert h["freq_encode"] and "device" in h, log[-2000:]
    if p.returncode == 124:  # stopped mid-run (it may, rarely, have finished first on a fast machine)
        assert h["interrupted"] and not h["complete"]
    else:
        assert p.returncode in (0, 1) and h["complete"], log[-2000:]
