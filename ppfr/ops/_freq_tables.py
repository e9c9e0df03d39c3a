"""Exact operator tables for the block-DCT frequency transform (METHODS.md §2.3).

The reference transform (8x bilinear up-sample with ``align_corners=True`` -> 8x8 orthonormal block DCT) is
linear and separable. For one image axis of length N and one frequency f in 0..7 it is the N x N matrix

    M_f[i, :] = sum_x C[f, x] * U[8 i + x, :]          (encode; U: the 8N x N up-sampling matrix)

and every row of M_f has at most 3 non-zeros, all in 3 consecutive columns (8 consecutive up-sampled rows
span less than one source pixel). Likewise the inverse (§2.2: block IDCT then align_corners down-sampling
by 1/8) is

    P_f[p, i] = sum_x Dn[p, 8 i + x] * C[f, x]          (decode; Dn: the N x 8N down-sampling matrix)

with at most 2 non-zeros per row. Kernels therefore never build the 8N x 8N intermediate: they apply a
spatially varying 3-tap (encode) or 2-tap (decode) filter along each axis. This module computes the taps in
float64 once per N and hands every backend the same tables, so all backends share one definition of the math:

    idx (T, N) int32      source row/column of tap t for output n (always in range; padded taps weigh 0)
    w   (8, T, N) float   weight of tap t for frequency f and output n
"""

from __future__ import annotations

import functools
import math

import numpy as np
import torch

ENC_TAPS = 3
DEC_TAPS = 2
BLOCK = 8

# JPEG full-range RGB -> YCbCr (torchjpeg `to_ycbcr`, data range 255) and its inverse as the spec writes it.
RGB2YCC = np.array(
    [[0.299, 0.587, 0.114], [-0.168736, -0.331264, 0.5], [0.5, -0.418688, -0.081312]], dtype=np.float64
)
YCC2RGB = np.array([[1.0, 0.0, 1.402], [1.0, -0.344136, -0.714136], [1.0, 1.772, 0.0]], dtype=np.float64)
YCC_OFFSET = np.array([0.0, 128.0, 128.0])

# Encode colour step folded with the [-1,1] -> [0,255] scaling and the -128 shift (METHODS §2.1 steps 1,3,4):
#   Z_c = 255 * (A (x/2 + 1/2) + off)_c / 255 ... = 127.5 * (A x)_c + ENC_BIAS_c
# Up-sampling preserves constants (bilinear rows sum to 1), so the colour step commutes with it exactly.
ENC_SCALE = 127.5
ENC_BIAS = ENC_SCALE * RGB2YCC.sum(axis=1) + YCC_OFFSET - 128.0  # (-0.5, 0, 0)


def dct_matrix(n: int = BLOCK) -> np.ndarray:
    """Orthonormal DCT-II matrix C (n, n): C[u, x] = a(u) sqrt(2/n) cos((2x+1) u pi / 2n), a(0) = 1/sqrt(2)."""
    k = np.arange(n)
    c = np.sqrt(2.0 / n) * np.cos((2 * k[None, :] + 1) * k[:, None] * math.pi / (2 * n))
    c[0] /= math.sqrt(2.0)
    return c


def _interp_matrix(n_out: int, n_in: int) -> np.ndarray:
    """Bilinear interpolation with align_corners=True as a dense (n_out, n_in) matrix (matches F.interpolate)."""
    m = np.zeros((n_out, n_in))
    scale = (n_in - 1) / (n_out - 1) if n_out > 1 else 0.0
    for d in range(n_out):
        pos = d * scale
        i0 = min(int(math.floor(pos)), n_in - 1)
        frac = pos - i0
        i1 = min(i0 + 1, n_in - 1)
        m[d, i0] += 1.0 - frac
        m[d, i1] += frac
    return m


@functools.lru_cache(maxsize=64)
def dense_operators(n: int) -> tuple[np.ndarray, np.ndarray]:
    """(M, P): encode operators M (8, n, n) and decode operators P (8, n, n), float64."""
    c = dct_matrix()
    up = _interp_matrix(BLOCK * n, n).reshape(n, BLOCK, n)  # [i, x, src]
    m = np.einsum("fx,ixs->fis", c, up)
    down = _interp_matrix(n, BLOCK * n).reshape(n, n, BLOCK)  # [p, i, x]
    p = np.einsum("pix,fx->fpi", down, c)
    return m, p


def _band(mats: np.ndarray, taps: int) -> tuple[np.ndarray, np.ndarray]:
    """Compress (8, n, n) banded matrices to (idx (taps, n), w (8, taps, n)); checks the band is exact."""
    f, n, _ = mats.shape
    idx = np.zeros((taps, n), dtype=np.int32)
    w = np.zeros((f, taps, n))
    nz = np.abs(mats).max(axis=0) > 0
    for r in range(n):
        cols = np.nonzero(nz[r])[0]
        start = int(cols.min()) if cols.size else 0
        start = max(0, min(start, n - taps)) if n >= taps else 0
        if cols.size and cols.max() >= start + taps:
            raise AssertionError(f"operator row {r} is wider than {taps} taps: {cols}")
        for t in range(taps):
            col = start + t
            idx[t, r] = min(col, n - 1)  # padded taps (n < taps) point in range and weigh 0
            if col < n:
                w[:, t, r] = mats[:, r, col]
    # exactness: re-expanding the band gives back the dense operator
    back = np.zeros_like(mats)
    rows = np.arange(n)
    for t in range(taps):
        np.add.at(back, (slice(None), rows, idx[t]), w[:, t, :])
    if not np.allclose(back, mats, atol=1e-13, rtol=0):
        raise AssertionError("banded tables do not reproduce the dense operator")
    return idx, w


@functools.lru_cache(maxsize=64)
def banded_operators(n: int) -> dict[str, np.ndarray]:
    """The kernel tables for axis length n: enc_idx/enc_w (3 taps) and dec_idx/dec_w (2 taps)."""
    if n < 2:
        raise ValueError(f"the frequency transform needs spatial size >= 2, got {n}")
    m, p = dense_operators(n)
    enc_idx, enc_w = _band(m, ENC_TAPS)
    dec_idx, dec_w = _band(p, DEC_TAPS)
    return {"enc_idx": enc_idx, "enc_w": enc_w, "dec_idx": dec_idx, "dec_w": dec_w}


@functools.lru_cache(maxsize=256)
def _tensor_tables(n: int, device: str, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    b = banded_operators(n)
    m, p = dense_operators(n)
    out = {
        "enc_idx": torch.from_numpy(b["enc_idx"]).to(device),
        "dec_idx": torch.from_numpy(b["dec_idx"]).to(device),
        "enc_w": torch.from_numpy(b["enc_w"]).to(device=device, dtype=dtype).contiguous(),
        "dec_w": torch.from_numpy(b["dec_w"]).to(device=device, dtype=dtype).contiguous(),
        "M": torch.from_numpy(m).to(device=device, dtype=dtype).contiguous(),
        "P": torch.from_numpy(p).to(device=device, dtype=dtype).contiguous(),
    }
    return out


def tables(n: int, device: torch.device, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Tables for axis length ``n`` as tensors on ``device`` (weights in ``dtype``; cached)."""
    return _tensor_tables(int(n), str(device), dtype)


def colour_tensors(device: torch.device, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """RGB2YCC (3,3), ENC_BIAS (3,), YCC2RGB (3,3) and the packed (3,4) kernel affines as tensors."""
    return _colour(str(device), dtype)


@functools.lru_cache(maxsize=32)
def _colour(device: str, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    # Packed (3, 4) affine maps for the kernels: out_c = sum_d m[c, d] in_d + m[c, 3].
    enc = np.concatenate([ENC_SCALE * RGB2YCC, ENC_BIAS[:, None]], axis=1)
    dec = np.concatenate([YCC2RGB / 255.0, np.full((3, 1), 128.0 / 255.0)], axis=1)
    return {
        "rgb2ycc": torch.tensor(RGB2YCC, device=device, dtype=dtype),
        "enc_bias": torch.tensor(ENC_BIAS, device=device, dtype=dtype),
        "ycc2rgb": torch.tensor(YCC2RGB, device=device, dtype=dtype),
        "enc_affine": torch.tensor(enc, device=device, dtype=dtype).contiguous(),
        "dec_affine": torch.tensor(dec, device=device, dtype=dtype).contiguous(),
    }
