"""Ahead-of-time compile every Triton kernel of ppfr.kernels to PTX + cubin for the given GPU archs.

No GPU is needed: triton.compile with a GPUTarget runs the whole pipeline (ttir -> ttgir -> llir -> ptx ->
cubin via ptxas). This catches what Triton's interpreter accepts but the GPU compiler rejects. Each compile
runs in its own subprocess with a timeout (a register blow-up can make ptxas run for many minutes).

Usage: python -m ppfr.kernels.aot [--arch 80 90] [--timeout 300] [--out DIR]
Exit status 1 if any kernel fails to compile for any arch.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import subprocess
import sys
import time

_CHILD = r"""
import importlib, json, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
mod, name, arch, out = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
fn, sig, consts = importlib.import_module(mod).AOT_SPECS[name]
ck = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts), target=GPUTarget("cuda", arch, 32))
info = {"ptx_bytes": len(ck.asm["ptx"]), "cubin_bytes": len(ck.asm["cubin"]), "shared": ck.metadata.shared}
if out:
    import os, pathlib
    p = pathlib.Path(out); p.mkdir(parents=True, exist_ok=True)
    (p / f"{name}.sm{arch}.ptx").write_text(ck.asm["ptx"])
    (p / f"{name}.sm{arch}.cubin").write_bytes(ck.asm["cubin"])
print(json.dumps(info))
"""


def compile_one(module: str, name: str, arch: int, timeout: float, out: str = "") -> tuple[bool, str, float]:
    """Compile one kernel for one arch in a subprocess; returns (ok, detail, seconds)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # compile for real
    t0 = time.perf_counter()
    try:
        res = subprocess.run(
            [sys.executable, "-c", _CHILD, module, name, str(arch), out],
            capture_output=True, text=True, timeout=timeout, env=env,
        )  # fmt: skip
        ok = res.returncode == 0
        detail = res.stdout.strip().splitlines()[-1] if ok else res.stderr.strip()[-3000:]
    except subprocess.TimeoutExpired:
        ok, detail = False, f"timed out after {timeout:.0f} s"
    return ok, detail, time.perf_counter() - t0


def all_specs() -> list[tuple[str, str]]:
    """(module, kernel name) of every Triton kernel ppfr ships."""
    kernels_pkg = importlib.import_module("ppfr.kernels")
    return [(mod, name) for mod in kernels_pkg.kernel_modules() for name in importlib.import_module(mod).AOT_SPECS]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", nargs="+", type=int, default=[80, 90])
    ap.add_argument("--timeout", type=float, default=300.0)
    ap.add_argument("--out", default="", help="write .ptx/.cubin files here")
    args = ap.parse_args()

    failures = 0
    for mod, name in all_specs():
        for arch in args.arch:
            ok, detail, dt = compile_one(mod, name, arch, args.timeout, args.out)
            print(f"{'OK  ' if ok else 'FAIL'} {mod}.{name} sm_{arch} ({dt:.1f} s) {detail if ok else ''}", flush=True)
            if not ok:
                print(detail, file=sys.stderr)
                failures += 1
    print(json.dumps({"failures": failures}))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
