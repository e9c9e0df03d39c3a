"""ppfr.kernels: Triton kernels and their launchers (``<op>_triton``), one module per op family.

Importing this package never imports triton; each kernel module does, so ``import ppfr`` works without it.
Set ``TRITON_INTERPRET=1`` before a kernel module is imported to run the kernels on CPU tensors.
Each kernel module declares ``AOT_SPECS`` (the GPU compile configuration of every kernel), which
``python -m ppfr.kernels.aot`` compiles to cubin for sm_80/sm_90.
"""

from __future__ import annotations

import pkgutil


def kernel_modules() -> list[str]:
    """Fully qualified names of the Triton kernel modules (every module here but the tools)."""
    return [f"{__name__}.{m.name}" for m in pkgutil.iter_modules(__path__) if m.name != "aot" and not m.name.startswith("_")]
