"""Ahead-of-time compile every Triton kernel of ppfr.kernels to PTX + cubin for the given GPU archs.

No GPU is needed: triton.compile with a GPUTarget runs the whole pipeline (ttir -> ttgir -> llir -> ptx ->
cubin via ptxas). This catches what Triton's interpreter accepts but the GPU compiler rejects, and reports
what ptxas allocated: registers per thread and spill bytes (``CompiledKernel.n_regs``/``n_spills`` are only
filled in when a kernel is loaded onto a GPU, so they are read from ptxas's ``-v`` report instead). Each compile
runs in its own subprocess with a timeout (a register blow-up can make ptxas run for many minutes).

Usage: python -m ppfr.kernels.aot [--arch 80 90] [--timeout 300] [--out DIR] [--json]
Exit status 1 if any kernel fails to compile for any arch, or spills.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import re
import subprocess
import sys
import time

# The child compiles one kernel. Triton runs ptxas with -v; with dump_ptxas_log on it prints that report to
# stdout, which the child captures. A compile served from Triton's cache runs no ptxas, so then the child runs
# ptxas -v itself on the cached PTX (same flags Triton uses for the resource report: -v, --gpu-name).
_CHILD = r"""
import contextlib, importlib, io, json, subprocess, sys, tempfile, os
import triton
from triton import knobs
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
mod, name, arch, out = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
fn, sig, consts = importlib.import_module(mod).AOT_SPECS[name]
knobs.nvidia.dump_ptxas_log = True
buf = io.StringIO()
with contextlib.redirect_stdout(buf):
    ck = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts), target=GPUTarget("cuda", arch, 32))
log = buf.getvalue()
if "Used" not in log:  # cache hit: no ptxas ran in this process
    from triton.backends.nvidia.compiler import get_ptxas
    arch_name = f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"
    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "k.ptx")
        with open(src, "w") as fh:
            fh.write(ck.asm["ptx"])
        res = subprocess.run([get_ptxas(arch).path, "-v", "--regAllocOptLevel=2", f"--gpu-name={arch_name}", src,
                              "-o", os.path.join(d, "k.o")], capture_output=True, text=True)
        log = res.stdout + res.stderr
info = {"ptx_bytes": len(ck.asm["ptx"]), "cubin_bytes": len(ck.asm["cubin"]), "shared": ck.metadata.shared,
        "num_warps": ck.metadata.num_warps, "ptxas_log": log}
if out:
    import pathlib
    p = pathlib.Path(out); p.mkdir(parents=True, exist_ok=True)
    (p / f"{name}.sm{arch}.ptx").write_text(ck.asm["ptx"])
    (p / f"{name}.sm{arch}.cubin").write_bytes(ck.asm["cubin"])
print("\n" + json.dumps(info))
"""

_REGS = re.compile(r"Used (\d+) registers")
_SPILL = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")
_STACK = re.compile(r"(\d+) bytes stack frame")


def parse_ptxas_log(log: str) -> dict[str, int]:
    """Registers per thread, spill store/load bytes and stack frame bytes from a ``ptxas -v`` report.

    Raises:
        ValueError: the report has no register line (ptxas did not run or its format changed).
    """
    regs = _REGS.findall(log)
    if not regs:
        raise ValueError(f"no 'Used N registers' line in the ptxas report: {log[-500:]!r}")
    spills = _SPILL.findall(log)
    stack = _STACK.findall(log)
    return {
        "regs": max(int(r) for r in regs),
        "spill_stores": sum(int(s) for s, _ in spills),
        "spill_loads": sum(int(ld) for _, ld in spills),
        "stack": max((int(s) for s in stack), default=0),
    }


def compile_one(module: str, name: str, arch: int, timeout: float, out: str = "") -> tuple[bool, dict | str, float]:
    """Compile one kernel for one arch in a subprocess.

    Returns:
        (ok, detail, seconds): on success ``detail`` is a dict with ptx_bytes, cubin_bytes, shared, num_warps,
        regs, spill_stores, spill_loads, stack; on failure the compiler's error text.
    """
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # compile for real
    t0 = time.perf_counter()
    try:
        res = subprocess.run(
            [sys.executable, "-c", _CHILD, module, name, str(arch), out],
            capture_output=True, text=True, timeout=timeout, env=env,
        )  # fmt: skip
        if res.returncode == 0:
            info = json.loads(res.stdout.strip().splitlines()[-1])
            info.update(parse_ptxas_log(info.pop("ptxas_log")))
            return True, info, time.perf_counter() - t0
        detail: dict | str = res.stderr.strip()[-3000:]
    except subprocess.TimeoutExpired:
        detail = f"timed out after {timeout:.0f} s"
    return False, detail, time.perf_counter() - t0


def all_specs() -> list[tuple[str, str]]:
    """(module, kernel name) of every Triton kernel ppfr ships."""
    kernels_pkg = importlib.import_module("ppfr.kernels")
    return [(mod, name) for mod in kernels_pkg.kernel_modules() for name in importlib.import_module(mod).AOT_SPECS]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", nargs="+", type=int, default=[80, 90])
    ap.add_argument("--timeout", type=float, default=300.0)
    ap.add_argument("--out", default="", help="write .ptx/.cubin files here")
    ap.add_argument("--json", action="store_true", help="print one JSON object per kernel and arch")
    args = ap.parse_args()

    failures = 0
    for mod, name in all_specs():
        for arch in args.arch:
            ok, detail, dt = compile_one(mod, name, arch, args.timeout, args.out)
            if ok and isinstance(detail, dict):
                spills = detail["spill_stores"] + detail["spill_loads"]
                if args.json:
                    print(json.dumps({"kernel": f"{mod}.{name}", "arch": arch, "seconds": round(dt, 1), **detail}))
                else:
                    print(f"{'OK  ' if not spills else 'SPILL'} {mod}.{name} sm_{arch} ({dt:.1f} s) "
                          f"regs={detail['regs']} spill_stores={detail['spill_stores']} "
                          f"spill_loads={detail['spill_loads']} stack={detail['stack']} shared={detail['shared']} "
                          f"warps={detail['num_warps']} cubin={detail['cubin_bytes']}", flush=True)  # fmt: skip
                failures += bool(spills)
            else:
                print(f"FAIL {mod}.{name} sm_{arch} ({dt:.1f} s)", flush=True)
                print(detail, file=sys.stderr)
                failures += 1
    print(json.dumps({"failures": failures}))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
