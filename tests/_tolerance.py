"""The float tolerance rule shared by the op tests (flash-attn style): a backend's error against the float64
reference may be at most twice the error of the literal reference run in the same dtype, plus a hair for the
final rounding (relative to the output's scale)."""

from __future__ import annotations

import torch

REL_SLACK = {torch.float64: 1e-12, torch.float32: 1e-6, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def assert_close_to_ref(out: torch.Tensor, ref64: torch.Tensor, ref_same_dtype: torch.Tensor) -> None:
    scale = ref64.abs().max().item()
    base = (ref_same_dtype.double() - ref64).abs().max().item()
    err = (out.double() - ref64).abs().max().item()
    bound = 2 * base + REL_SLACK[out.dtype] * scale
    assert err <= bound, f"max error {err:.3g} > bound {bound:.3g} (ref-in-dtype error {base:.3g}, scale {scale:.3g})"
