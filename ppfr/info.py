"""``ppfr info`` (``python -m ppfr.info``): versions, devices, installed extras, and which backend of which op works
here.

Each backend is not just looked up but run once on a tiny input and compared with the reference, so
"ok" means it computed the right answer on this machine.
"""

from __future__ import annotations

import importlib
import importlib.metadata as md
import json
import os
import platform
import sys
from collections.abc import Callable

import torch

from ppfr import __version__, _backend, _ext, _extras

_PACKAGES = ("torch", "triton", "numpy", "onnx", "onnxruntime", "nvidia-dali-cuda130", "nvidia-dali-cuda120",
             "tensorrt", "pybind11")  # fmt: skip


def _version(pkg: str) -> str | None:
    try:
        return md.version(pkg)
    except md.PackageNotFoundError:
        return None


def _op_checks() -> dict[str, tuple[tuple[str, ...], Callable[[str, torch.device], float]]]:
    """Every op module under ppfr.ops declares SELF_CHECKS = {op: (backends, check(backend, device) -> err)}."""
    import pkgutil

    import ppfr.ops

    checks: dict = {}
    for mod in pkgutil.iter_modules(ppfr.ops.__path__):
        if not mod.name.startswith("_"):
            checks.update(getattr(importlib.import_module(f"ppfr.ops.{mod.name}"), "SELF_CHECKS", {}))
    return checks


def collect() -> dict:
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    report: dict = {
        "ppfr": __version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "packages": {p: _version(p) for p in _PACKAGES},
        "torch_cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "cuda_devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
        "threads": torch.get_num_threads(),
        "env": {k: os.environ.get(k) for k in ("PPFR_BACKEND", "TRITON_INTERPRET", "OMP_NUM_THREADS")},
        "extras": _extras.status(),
        "extensions": {},
        "gpu_backends": _backend.gpu_status(),
        "ops": {},
    }
    for name in ("_C", "_C_cuda"):
        mod, reason = _ext.load(name)
        report["extensions"][f"ppfr.{name}"] = "loaded" if mod else reason
    for op, (backends, check) in _op_checks().items():
        rows = {}
        for dev_name in devices:
            dev = torch.device(dev_name)
            for be in backends:
                reason = _backend.unavailable_reason(be, dev)
                if reason is not None:
                    rows[f"{be}@{dev_name}"] = f"unavailable: {reason}"
                    continue
                try:
                    err = check(be, dev)
                    rows[f"{be}@{dev_name}"] = f"ok (max |err| vs ref {err:.1e})"
                except Exception as exc:  # report, never crash: this is a diagnostic tool
                    rows[f"{be}@{dev_name}"] = f"error: {type(exc).__name__}: {exc}"
            rows[f"auto@{dev_name}"] = _backend.resolve(op, "auto", dev, backends)
        if "cuda" not in devices:  # say why auto cannot pick this op's GPU backends here
            why = {be: _backend.gpu_unavailable_reason(be) for be in backends if be in _backend.GPU_BACKENDS}
            if why:
                texts = sorted({r for r in why.values() if r})
                rows["auto@cuda"] = f"no GPU backend ({', '.join(why)}): {'; '.join(texts)}"
        report["ops"][op] = rows
    try:
        importlib.import_module("nvidia.dali")
        report["dali"] = "importable"
    except Exception as exc:  # optional
        report["dali"] = f"not importable ({type(exc).__name__})"
    return report


def main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="ppfr info", description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    args = ap.parse_args(argv)
    rep = collect()
    if args.json:
        print(json.dumps(rep, indent=2))
        return 0
    print(f"ppfr {rep['ppfr']}  python {rep['python']}  {rep['platform']}")
    print("packages: " + ", ".join(f"{k}={v}" for k, v in rep["packages"].items() if v))
    missing = [k for k, v in rep["packages"].items() if not v]
    if missing:
        print("not installed: " + ", ".join(missing))
    print(f"torch CUDA build: {rep['torch_cuda']}  CUDA available: {rep['cuda_available']} {rep['cuda_devices']}")
    present = [e for e, missing in rep["extras"].items() if not missing]
    print("extras installed: " + (", ".join(present) or "none"))
    for extra, missing in rep["extras"].items():
        if missing:
            print(f"extra {extra} missing ({', '.join(missing)}): pip install 'ppfr[{extra}]'")
    print(f"threads: {rep['threads']}  env: {rep['env']}  DALI: {rep['dali']}")
    for name, status in rep["extensions"].items():
        print(f"{name}: {status}")
    for be, status in rep["gpu_backends"].items():
        print(f"backend {be}: {status}")
    for op, rows in rep["ops"].items():
        print(f"\n{op}")
        for key, status in rows.items():
            print(f"  {key:<14} {status}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
