"""The shared block-DCT frequency transform of DuetFace, PartialFace and MinusFace (METHODS.md §2).

Ops (registered as ``ppfr::freq_encode`` / ``ppfr::freq_decode`` / ``ppfr::freq_hflip``):

* :func:`freq_encode` -- e(X): RGB in [-1, 1] -> 192 raw DCT channels at the input's spatial size,
  channel = 64 c + 8 u + v (c in Y, Cb, Cr; raster frequency order, not zig-zag). Only requested
  channels are computed.
* :func:`freq_decode` -- d(x): the §2.2 inverse, from a full or partial channel set, with an optional
  per-sample channel permutation fused in (MinusFace's X_p = d(shuffle(r))). Output in [0, 1].
* :func:`freq_hflip` -- horizontal flip in the frequency domain (§2.3: e(flip X)[u,v,i,j] = (-1)^v e(X)[u,v,i,W-1-j]).

Each has ``*_ref`` (the literal reference that builds the 8H x 8W intermediate, exactly as the paper code
does), a fast PyTorch form (``backend="torch"``), and C++ / Triton / CUDA kernels. All fast backends share
the exact banded operators of :mod:`ppfr.ops._freq_tables`.

Numerics: float32 and float64 run natively; float16/bfloat16 inputs are computed in float32 and rounded
once at the end (more accurate than the reference run in half precision).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Optional, Union

import torch
import torch.nn.functional as F

from ppfr import _backend, _ext
from ppfr.ops import _freq_tables as T
from ppfr.ops._validate import FLOAT_TYPES, as_index, check_planes, compiling, on_host, require, to_device

NUM_CHANNELS = 192
ChannelsLike = Union[None, torch.Tensor, Sequence[int]]

ENCODE_BACKENDS = ("ref", "torch", "cpp", "triton", "cuda")
DECODE_BACKENDS = ("ref", "torch", "cpp", "triton", "cuda")
HFLIP_BACKENDS = ("torch", "cpp", "triton")



# ----------------------------------------------------------------------------------------------------------
# Input validation (the API boundary): wrong shapes and dtypes are rejected here with messages that say what.
# ----------------------------------------------------------------------------------------------------------
def normalize_channels(channels: ChannelsLike, batch: int, device: torch.device) -> Optional[torch.Tensor]:
    """Validate a channel selection; returns None (all 192), a (K,) or a (B, K) int64 tensor on ``device``.

    Index values are range-checked on the host when they come as a list or a CPU tensor (a ValueError now);
    an index tensor already on a device is checked there by a device-side assert (no host sync; the error
    surfaces at the next synchronisation). The methods' own channel tables are fixed at construction.
    """
    if channels is None:
        return None
    host = not isinstance(channels, torch.Tensor) or on_host(channels)
    ch = as_index("channels", channels, torch.device("cpu") if host else device)
    if ch.dim() == 2:
        if ch.shape[0] != batch:
            raise ValueError(f"per-sample channels must be (B={batch}, K), got {tuple(ch.shape)}")
    elif ch.dim() != 1:
        raise ValueError(f"channels must be 1-D (K,) or 2-D (B, K), got shape {tuple(ch.shape)}")
    if ch.shape[-1] < 1:
        raise ValueError("channels must select at least one channel")
    if ch.numel() and not compiling():
        if on_host(ch):
            if int(ch.min()) < 0 or int(ch.max()) >= NUM_CHANNELS:
                raise ValueError(f"channels must lie in [0, {NUM_CHANNELS}), got [{int(ch.min())}, {int(ch.max())}]")
        else:
            require(((ch >= 0) & (ch < NUM_CHANNELS)).all(), f"channels must lie in [0, {NUM_CHANNELS})")
    return to_device(ch, device).contiguous()


def _check_unique_rows(name: str, idx: torch.Tensor) -> None:
    s = idx.reshape(-1, idx.shape[-1]).sort(dim=-1).values
    require((s[:, 1:] != s[:, :-1]).all(), f"{name} must not repeat a channel within a sample")


def _decode_source_map(
    k: int, batch: int, channels: Optional[torch.Tensor], perm: Optional[torch.Tensor], device: torch.device
) -> torch.Tensor:
    """(B, 192) int64: for decode slot j (after the permutation), the input channel position holding it, or -1.

    Semantics: the full coefficient set is ``full[:, channels[i]] = f[:, i]`` (other channels 0), then
    ``shuffled[:, j] = full[:, perm[j]]`` (gather), then ``d(shuffled)``.
    """
    if channels is None:
        pos = torch.arange(NUM_CHANNELS, device=device).expand(batch, NUM_CHANNELS)
    else:
        ch = channels.expand(batch, -1) if channels.dim() == 1 else channels
        pos = torch.full((batch, NUM_CHANNELS), -1, dtype=torch.int64, device=device)
        pos.scatter_(1, ch, torch.arange(k, device=device).expand(batch, k).contiguous())
    if perm is not None:
        pos = pos.gather(1, perm.expand(batch, -1))
    return pos.contiguous()


# ----------------------------------------------------------------------------------------------------------
# Literal references: follow METHODS.md §2.1 / §2.2 step by step through the 8H x 8W intermediate.
# ----------------------------------------------------------------------------------------------------------
def _split_channels(ch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return ch // 64, (ch // 8) % 8, ch % 8


def _select(full: torch.Tensor, channels: Optional[torch.Tensor]) -> torch.Tensor:
    if channels is None:
        return full
    b, _, h, w = full.shape
    if channels.dim() == 1:
        return full.index_select(1, channels)
    return full.gather(1, channels[:, :, None, None].expand(b, channels.shape[1], h, w))


def _outside_autocast(fn):
    """Run a reference in its input's dtype even inside ``torch.autocast``: autocast would run its einsum and
    matmuls in bf16/fp16 and return that dtype, where the fused backends (and the payload spec) keep float32."""

    @functools.wraps(fn)
    def wrapper(t: torch.Tensor, *args, **kwargs):
        with torch.autocast(device_type=t.device.type, enabled=False):
            return fn(t, *args, **kwargs)

    return wrapper


@_outside_autocast
def freq_encode_ref(x: torch.Tensor, channels: ChannelsLike = None) -> torch.Tensor:
    """Literal reference of e(X) (METHODS §2.1): up-sample 8x, YCbCr, -128, 8x8 block DCT, select.

    Args:
        x: (B, 3, H, W) float RGB in [-1, 1].
        channels: None (all 192), (K,) or (B, K) channel indices in [0, 192).
    Returns:
        (B, K, H, W) raw DCT coefficients in ``x.dtype`` (Y-DC spans about +-1024), also under autocast.
    """
    check_planes("x", x, 3)
    ch = normalize_channels(channels, x.shape[0], x.device)
    b, _, h, w = x.shape
    dt = x.dtype
    col = T.colour_tensors(x.device, dt)
    up = F.interpolate(x * 0.5 + 0.5, scale_factor=8, mode="bilinear", align_corners=True) * 255.0
    ycc = torch.einsum("dc,bchw->bdhw", col["rgb2ycc"], up)
    ycc = ycc + torch.tensor(T.YCC_OFFSET, dtype=dt, device=x.device)[None, :, None, None] - 128.0
    blocks = ycc.reshape(b, 3, h, 8, w, 8).permute(0, 1, 2, 4, 3, 5)  # (B,3,H,W,8x,8y)
    cm = torch.tensor(T.dct_matrix(), dtype=dt, device=x.device)
    coef = cm @ blocks @ cm.T  # (B,3,H,W,8u,8v)
    full = coef.permute(0, 1, 4, 5, 2, 3).reshape(b, NUM_CHANNELS, h, w)
    return _select(full, ch)


@_outside_autocast
def _decode_ref_linear(f: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
    b, k, h, w = f.shape
    dt = f.dtype
    f_pad = torch.cat([f, f.new_zeros(b, 1, h, w)], 1)
    idx = torch.where(src < 0, k, src)
    full = f_pad.gather(1, idx[:, :, None, None].expand(b, NUM_CHANNELS, h, w))
    coef = full.reshape(b, 3, 8, 8, h, w).permute(0, 1, 4, 5, 2, 3)  # (B,3,H,W,u,v)
    cm = torch.tensor(T.dct_matrix(), dtype=dt, device=f.device)
    blocks = cm.T @ coef @ cm  # inverse orthonormal DCT -> (B,3,H,W,x,y)
    ycc = blocks.permute(0, 1, 2, 4, 3, 5).reshape(b, 3, 8 * h, 8 * w) + 128.0
    ycc = ycc - torch.tensor(T.YCC_OFFSET, dtype=dt, device=f.device)[None, :, None, None]
    rgb = torch.einsum("cd,bdhw->bchw", T.colour_tensors(f.device, dt)["ycc2rgb"], ycc) / 255.0
    return F.interpolate(rgb, size=(h, w), mode="bilinear", align_corners=True)


def freq_decode_ref(f: torch.Tensor, channels: ChannelsLike = None, perm: ChannelsLike = None) -> torch.Tensor:
    """Literal reference of d(x) (METHODS §2.2) with the :func:`freq_decode` channel/permutation semantics."""
    ch, pm = _check_decode_args(f, channels, perm)
    src = _decode_source_map(f.shape[1], f.shape[0], ch, pm, f.device)
    return _decode_ref_linear(f, src).clamp(0.0, 1.0)


# ----------------------------------------------------------------------------------------------------------
# Fast PyTorch form: dense separable operators (exactly the banded tables, expanded), any device.
# ----------------------------------------------------------------------------------------------------------
def _compute_dtype(dt: torch.dtype) -> torch.dtype:
    return dt if dt in (torch.float32, torch.float64) else torch.float32


def _encode_torch(x: torch.Tensor, channels: Optional[torch.Tensor]) -> torch.Tensor:
    b, _, h, w = x.shape
    col = T.colour_tensors(x.device, x.dtype)
    m_r = T.tables(h, x.device, x.dtype)["M"]  # (8, H, H)
    m_c = T.tables(w, x.device, x.dtype)["M"]  # (8, W, W)
    z = torch.einsum("dc,bchw->bdhw", col["rgb2ycc"], x) * T.ENC_SCALE + col["enc_bias"][None, :, None, None]
    rows = torch.einsum("uih,bchw->bcuiw", m_r, z)  # row operator for all 24 (c, u) planes
    if channels is None:
        return torch.einsum("bcuiw,vjw->bcuvij", rows, m_c).reshape(b, NUM_CHANNELS, h, w)
    c, u, v = _split_channels(channels)
    rows = rows.reshape(b, 24, h, w)
    sel = _select(rows, c * 8 + u)
    return sel @ m_c[v].transpose(-1, -2)


def _decode_torch_linear(f: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
    b, k, h, w = f.shape
    p_r = T.tables(h, f.device, f.dtype)["P"]
    p_c = T.tables(w, f.device, f.dtype)["P"]
    f_pad = torch.cat([f, f.new_zeros(b, 1, h, w)], 1)
    idx = torch.where(src < 0, k, src)
    full = f_pad.gather(1, idx[:, :, None, None].expand(b, NUM_CHANNELS, h, w)).reshape(b, 3, 8, 8, h, w)
    cols = torch.einsum("bcuvhw,vqw->bcuhq", full, p_c)
    ycc = torch.einsum("uph,bcuhq->bcpq", p_r, cols)
    rgb = torch.einsum("cd,bdhw->bchw", T.colour_tensors(f.device, f.dtype)["ycc2rgb"], ycc)
    return (rgb + 128.0) / 255.0


# Adjoints (the backward of both linear ops), in the dense torch form: device-agnostic and traceable.
def _encode_adjoint(g: torch.Tensor, channels: Optional[torch.Tensor]) -> torch.Tensor:
    b, k, h, w = g.shape
    m_r = T.tables(h, g.device, g.dtype)["M"]
    m_c = T.tables(w, g.device, g.dtype)["M"]
    if channels is None:
        channels = torch.arange(NUM_CHANNELS, device=g.device)
    c, u, v = _split_channels(channels)
    back = m_r[u].transpose(-1, -2) @ g @ m_c[v]  # (B,K,H,W)
    gz = g.new_zeros(b, 3, h, w)
    if c.dim() == 1:
        gz.index_add_(1, c, back)
    else:
        gz.scatter_add_(1, c[:, :, None, None].expand_as(back), back)
    return torch.einsum("dc,bdhw->bchw", T.colour_tensors(g.device, g.dtype)["rgb2ycc"], gz) * T.ENC_SCALE


def _decode_adjoint(g: torch.Tensor, src: torch.Tensor, k: int) -> torch.Tensor:
    b, _, h, w = g.shape
    p_r = T.tables(h, g.device, g.dtype)["P"]
    p_c = T.tables(w, g.device, g.dtype)["P"]
    gd = torch.einsum("cd,bchw->bdhw", T.colour_tensors(g.device, g.dtype)["ycc2rgb"], g) / 255.0
    rows = torch.einsum("uph,bcpq->bcuhq", p_r, gd)
    full = torch.einsum("bcuhq,vqw->bcuvhw", rows, p_c).reshape(b, NUM_CHANNELS, h, w)
    idx = torch.where(src < 0, k, src)
    out = g.new_zeros(b, k + 1, h, w)
    out.scatter_add_(1, idx[:, :, None, None].expand(b, NUM_CHANNELS, h, w), full)
    return out[:, :k]


# ----------------------------------------------------------------------------------------------------------
# Kernel launchers for the compiled backends (they take contiguous float32/float64 tensors).
# ----------------------------------------------------------------------------------------------------------
def _full_channel_index(b: int, channels: Optional[torch.Tensor], device: torch.device) -> torch.Tensor:
    """(B, K) contiguous int64 channel index (rows may alias one 1-D selection via expand + contiguous)."""
    if channels is None:
        return torch.arange(NUM_CHANNELS, device=device).expand(b, NUM_CHANNELS).contiguous()
    return channels.expand(b, -1).contiguous() if channels.dim() == 1 else channels.contiguous()


def _launch_encode(backend: str, x: torch.Tensor, channels: Optional[torch.Tensor]) -> torch.Tensor:
    b, _, h, w = x.shape
    ch = _full_channel_index(b, channels, x.device)
    dt = torch.float64 if (backend == "cpp" and x.dtype == torch.float64) else torch.float32
    xc = x.to(dt).contiguous()
    tr, tc = T.tables(h, x.device, dt), T.tables(w, x.device, dt)
    aff = T.colour_tensors(x.device, dt)["enc_affine"]
    out = torch.empty(b, ch.shape[1], h, w, device=x.device, dtype=dt)
    if backend == "cpp":
        _ext.cpu_module().freq_encode(
            xc.data_ptr(), out.data_ptr(), b, h, w, ch.shape[1], ch.data_ptr(),
            tr["enc_idx"].data_ptr(), tr["enc_w"].data_ptr(), tc["enc_idx"].data_ptr(), tc["enc_w"].data_ptr(),
            aff.data_ptr(), dt == torch.float64, torch.get_num_threads(),
        )  # fmt: skip
    elif backend == "cuda":
        _ext.cuda_module().freq_encode(
            xc.data_ptr(), out.data_ptr(), b, h, w, ch.shape[1], ch.data_ptr(),
            tr["enc_idx"].data_ptr(), tr["enc_w"].data_ptr(), tc["enc_idx"].data_ptr(), tc["enc_w"].data_ptr(),
            aff.data_ptr(), *_ext.cuda_stream_and_device("freq_encode", xc, out, ch),
        )  # fmt: skip
    else:
        from ppfr.kernels.freq import freq_encode_triton

        freq_encode_triton(xc, out, ch, tr["enc_idx"], tr["enc_w"], tc["enc_idx"], tc["enc_w"], aff)
    return out


def _launch_decode(backend: str, f: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
    b, k, h, w = f.shape
    dt = torch.float64 if (backend == "cpp" and f.dtype == torch.float64) else torch.float32
    fc = f.to(dt).contiguous()
    tr, tc = T.tables(h, f.device, dt), T.tables(w, f.device, dt)
    aff = T.colour_tensors(f.device, dt)["dec_affine"]
    out = torch.empty(b, 3, h, w, device=f.device, dtype=dt)
    if backend == "cpp":
        _ext.cpu_module().freq_decode(
            fc.data_ptr(), out.data_ptr(), b, h, w, k, src.data_ptr(),
            tr["dec_idx"].data_ptr(), tr["dec_w"].data_ptr(), tc["dec_idx"].data_ptr(), tc["dec_w"].data_ptr(),
            aff.data_ptr(), dt == torch.float64, torch.get_num_threads(),
        )  # fmt: skip
    elif backend == "cuda":
        _ext.cuda_module().freq_decode(
            fc.data_ptr(), out.data_ptr(), b, h, w, k, src.data_ptr(),
            tr["dec_idx"].data_ptr(), tr["dec_w"].data_ptr(), tc["dec_idx"].data_ptr(), tc["dec_w"].data_ptr(),
            aff.data_ptr(), *_ext.cuda_stream_and_device("freq_decode", fc, out, src),
        )  # fmt: skip
    else:
        from ppfr.kernels.freq import freq_decode_triton

        freq_decode_triton(fc, out, src, tr["dec_idx"], tr["dec_w"], tc["dec_idx"], tc["dec_w"], aff)
    return out


# ----------------------------------------------------------------------------------------------------------
# torch.library registration: one op per transform; the backend is an argument, resolved before the call.
# ----------------------------------------------------------------------------------------------------------
@torch.library.custom_op("ppfr::freq_encode", mutates_args=())
def _freq_encode_op(x: torch.Tensor, channels: Optional[torch.Tensor], backend: str) -> torch.Tensor:
    if backend == "ref":
        return freq_encode_ref(x, channels).contiguous()
    if backend == "torch":
        return _encode_torch(x.to(_compute_dtype(x.dtype)), channels).to(x.dtype).contiguous()
    return _launch_encode(backend, x, channels).to(x.dtype)


@_freq_encode_op.register_fake
def _(x, channels, backend):
    k = NUM_CHANNELS if channels is None else channels.shape[-1]
    return x.new_empty(x.shape[0], k, x.shape[2], x.shape[3])


def _encode_setup(ctx, inputs, output):
    _, channels, _ = inputs
    ctx.save_for_backward(channels)


def _encode_backward(ctx, grad):
    (channels,) = ctx.saved_tensors
    dt = _compute_dtype(grad.dtype)
    return _encode_adjoint(grad.to(dt), channels).to(grad.dtype), None, None


_freq_encode_op.register_autograd(_encode_backward, setup_context=_encode_setup)


@torch.library.custom_op("ppfr::freq_decode", mutates_args=())
def _freq_decode_op(f: torch.Tensor, src: torch.Tensor, backend: str) -> torch.Tensor:
    """Linear part of d(x) (unclamped): (B,K,H,W) coefficients + (B,192) source map -> (B,3,H,W)."""
    if backend == "ref":
        return _decode_ref_linear(f, src).contiguous()
    if backend == "torch":
        return _decode_torch_linear(f.to(_compute_dtype(f.dtype)), src).to(f.dtype).contiguous()
    return _launch_decode(backend, f, src).to(f.dtype)


@_freq_decode_op.register_fake
def _(f, src, backend):
    return f.new_empty(f.shape[0], 3, f.shape[2], f.shape[3])


def _decode_setup(ctx, inputs, output):
    f, src, _ = inputs
    ctx.k = f.shape[1]
    ctx.save_for_backward(src)


def _decode_backward(ctx, grad):
    (src,) = ctx.saved_tensors
    dt = _compute_dtype(grad.dtype)
    return _decode_adjoint(grad.to(dt), src, ctx.k).to(grad.dtype), None, None


_freq_decode_op.register_autograd(_decode_backward, setup_context=_decode_setup)


def _hflip_signs(k: int, channels: Optional[torch.Tensor], device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    ch = torch.arange(k, device=device) if channels is None else channels
    return (1 - 2 * (ch % 2)).to(dtype)  # (-1)^v with v = ch % 8, and (-1)^v = (-1)^(ch % 2)


@torch.library.custom_op("ppfr::freq_hflip", mutates_args=())
def _freq_hflip_op(f: torch.Tensor, channels: Optional[torch.Tensor], backend: str) -> torch.Tensor:
    if backend == "torch":
        s = _hflip_signs(f.shape[1], channels, f.device, f.dtype)
        s = s[None, :, None, None] if s.dim() == 1 else s[:, :, None, None]
        return (f.flip(-1) * s).contiguous()
    b, k, h, w = f.shape
    signs = _hflip_signs(k, channels, f.device, torch.float32)
    signs = signs.expand(b, k).contiguous()
    dt = torch.float64 if (backend == "cpp" and f.dtype == torch.float64) else torch.float32
    fc = f.to(dt).contiguous()
    out = torch.empty_like(fc)
    if backend == "cpp":
        _ext.cpu_module().freq_hflip(
            fc.data_ptr(), out.data_ptr(), b, k, h, w, signs.data_ptr(), dt == torch.float64, torch.get_num_threads()
        )
    else:
        from ppfr.kernels.freq import freq_hflip_triton

        freq_hflip_triton(fc, out, signs)
    return out.to(f.dtype)


@_freq_hflip_op.register_fake
def _(f, channels, backend):
    return torch.empty_like(f)


def _hflip_setup(ctx, inputs, output):
    _, channels, _ = inputs
    ctx.save_for_backward(channels)


def _hflip_backward(ctx, grad):
    (channels,) = ctx.saved_tensors
    return _freq_hflip_op(grad, channels, "torch"), None, None  # the flip is its own adjoint


_freq_hflip_op.register_autograd(_hflip_backward, setup_context=_hflip_setup)


# ----------------------------------------------------------------------------------------------------------
# Public functional API.
# ----------------------------------------------------------------------------------------------------------
def freq_encode(x: torch.Tensor, channels: ChannelsLike = None, *, backend: str = "auto") -> torch.Tensor:
    """Block-DCT frequency transform e(X) of METHODS.md §2.1, computing only the requested channels.

    Args:
        x: (B, 3, H, W) float RGB in [-1, 1] (any H, W >= 2; 112 x 112 for the methods).
        channels: None for all 192 channels; a (K,) index tensor/sequence (same selection for the whole
            batch); or a (B, K) index tensor (per-sample selection, e.g. PartialFace ranks). Channel
            ``64 c + 8 u + v``: colour c (Y, Cb, Cr), vertical frequency u, horizontal frequency v.
        backend: ``auto`` | ``ref`` | ``torch`` | ``cpp`` | ``triton`` | ``cuda`` (``PPFR_BACKEND`` overrides auto).

    Returns:
        (B, K, H, W) raw DCT coefficients in ``x.dtype`` (no normalisation; Y-DC spans about +-1024).

    Raises:
        TypeError / ValueError: bad shapes, dtypes or channel indices.
        BackendUnavailableError: the requested backend cannot run here.

    Example:
        >>> x = torch.rand(2, 3, 112, 112) * 2 - 1
        >>> freq_encode(x, channels=[0, 1, 64]).shape
        torch.Size([2, 3, 112, 112])
    """
    check_planes("x", x, 3)
    ch = normalize_channels(channels, x.shape[0], x.device)
    be = _backend.resolve("freq_encode", backend, x.device, ENCODE_BACKENDS, dtype=x.dtype)
    return _freq_encode_op(x, ch, be)


def _check_decode_args(
    f: torch.Tensor, channels: ChannelsLike, perm: ChannelsLike
) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    check_planes("f", f)
    b, k = f.shape[:2]
    ch = normalize_channels(channels, b, f.device)
    if ch is None and k != NUM_CHANNELS:
        raise ValueError(f"f has {k} channels; pass `channels` (which of the 192 they are) or all 192")
    if ch is not None:
        if ch.shape[-1] != k:
            raise ValueError(f"channels selects {ch.shape[-1]} channels but f has {k}")
        if not compiling():
            _check_unique_rows("channels", ch)
    pm = None
    if perm is not None:
        host = not isinstance(perm, torch.Tensor) or on_host(perm)
        pm = as_index("perm", perm, torch.device("cpu") if host else f.device)
        if pm.shape[-1] != NUM_CHANNELS or pm.dim() not in (1, 2) or (pm.dim() == 2 and pm.shape[0] != b):
            raise ValueError(f"perm must be (192,) or (B={b}, 192), got {tuple(pm.shape)}")
        if not compiling():  # a CPU perm is checked right here, a device one on the device (no host sync)
            ok = (pm.sort(dim=-1).values == torch.arange(NUM_CHANNELS, device=pm.device)).all()
            require(ok, "perm must be a permutation of 0..191 in every row")
        pm = to_device(pm, f.device)
    return ch, pm


def freq_decode(
    f: torch.Tensor, channels: ChannelsLike = None, perm: ChannelsLike = None, *, backend: str = "auto"
) -> torch.Tensor:
    """Inverse transform d(x) of METHODS.md §2.2 from a full or partial channel set, with a fused shuffle.

    Semantics: ``full[:, channels[i]] = f[:, i]`` (missing channels are 0); if ``perm`` is given,
    ``shuffled[:, j] = full[:, perm[j]]``; the result is ``d(shuffled)``: inverse block DCT, +128,
    YCbCr -> RGB, /255, bilinear 1/8 down-sampling with align_corners=True, clamp to [0, 1].

    Args:
        f: (B, K, H, W) float DCT coefficients (K = 192 when ``channels`` is None).
        channels: None, (K,) or (B, K) distinct channel indices in [0, 192): which channels ``f`` holds.
        perm: None, (192,) or (B, 192) permutation of 0..191 applied before decoding (MinusFace).
        backend: as for :func:`freq_encode`.

    Returns:
        (B, 3, H, W) RGB in [0, 1] (note: not [-1, 1]), in ``f.dtype``. d(e(X)) ~ X/2 + 1/2 only
        approximately (RMSE ~1e-4 on smooth images, METHODS §2.3).
    """
    ch, pm = _check_decode_args(f, channels, perm)
    be = _backend.resolve("freq_decode", backend, f.device, DECODE_BACKENDS, dtype=f.dtype)
    src = _decode_source_map(f.shape[1], f.shape[0], ch, pm, f.device)
    return _freq_decode_op(f, src, be).clamp(0.0, 1.0)


def freq_hflip(f: torch.Tensor, channels: ChannelsLike = None, *, backend: str = "auto") -> torch.Tensor:
    """Horizontal flip in the frequency domain: ``freq_hflip(e(X)) == e(X.flip(-1))`` exactly (§2.3).

    Args:
        f: (B, K, H, W) DCT coefficients; K = 192 when ``channels`` is None.
        channels: None, (K,) or (B, K): which channels ``f`` holds (their horizontal frequency v sets the sign).
    Returns:
        (B, K, H, W): ``(-1)^v * f[..., ::-1]``.
    """
    check_planes("f", f)
    ch = normalize_channels(channels, f.shape[0], f.device)
    if ch is None and f.shape[1] != NUM_CHANNELS:
        raise ValueError(f"f has {f.shape[1]} channels; pass `channels` or all 192")
    if ch is not None and ch.shape[-1] != f.shape[1]:
        raise ValueError(f"channels selects {ch.shape[-1]} channels but f has {f.shape[1]}")
    be = _backend.resolve("freq_hflip", backend, f.device, HFLIP_BACKENDS, dtype=f.dtype)
    return _freq_hflip_op(f, ch, be)


# ----------------------------------------------------------------------------------------------------------
# Self-checks for `python -m ppfr.info`: run each backend once on a tiny input against the reference.
# ----------------------------------------------------------------------------------------------------------
def _check_encode(backend: str, dev: torch.device) -> float:
    x = torch.rand(1, 3, 8, 8, device=dev) * 2 - 1
    ch = torch.tensor([0, 9, 100], device=dev)
    return (freq_encode(x, ch, backend=backend) - freq_encode_ref(x, ch)).abs().max().item()


def _check_decode(backend: str, dev: torch.device) -> float:
    f = freq_encode_ref(torch.rand(1, 3, 8, 8, device=dev) * 2 - 1)
    return (freq_decode(f, backend=backend) - freq_decode_ref(f)).abs().max().item()


def _check_hflip(backend: str, dev: torch.device) -> float:
    x = torch.rand(1, 3, 8, 8, device=dev) * 2 - 1
    f = freq_encode_ref(x)
    return (freq_hflip(f, backend=backend) - freq_encode_ref(x.flip(-1))).abs().max().item()


SELF_CHECKS = {
    "freq_encode": (ENCODE_BACKENDS, _check_encode),
    "freq_decode": (DECODE_BACKENDS, _check_decode),
    "freq_hflip": (HFLIP_BACKENDS, _check_hflip),
}
