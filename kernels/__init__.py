"""ppfr.kernels: Triton kernels and their launchers (``<op>_triton``).

Importing this package never imports triton; each kernel module does, so ``import ppfr`` works without it.
Set ``TRITON_INTERPRET=1`` before a kernel module is imported to run the kernels on CPU tensors.
"""

KERNEL_MODULES = ("ppfr.kernels.freq",)
