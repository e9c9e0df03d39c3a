"""ppfr: privacy-preserving face recognition on fused kernels.

Importing ppfr never needs a GPU, Triton, DALI or TensorRT: optional pieces load lazily, and
``python -m ppfr.info`` reports what works here.
"""

from __future__ import annotations

__version__ = "0.1.0"

from ppfr._backend import BACKENDS, BackendUnavailableError
from ppfr.ops.block_shuffle import block_channel_shuffle, dequantize, prune, quantize, shuffle_quantize
from ppfr.ops.blur import hybrid_blur, median_blur
from ppfr.ops.feature_mask_fuse import feature_mask_fuse, feature_mask_fuse_residual
from ppfr.ops.freq import freq_decode, freq_encode, freq_hflip
from ppfr.ops.roi_mask import roi_mask
from ppfr.ops.sample_ranks import sample_ranks


def build_method(name: str, **options):
    """Build a method plugin by name (lazy import keeps ``import ppfr`` light); see ppfr.methods."""
    from ppfr.methods import build_method as _build

    return _build(name, **options)


def load_method(path, map_location="cpu", **overrides):
    """Rebuild a trained method from a ``model.pt`` written by ``ppfr train``; see ppfr.methods.load_method."""
    from ppfr.methods import load_method as _load

    return _load(path, map_location, **overrides)


__all__ = [
    "BACKENDS", "BackendUnavailableError", "__version__", "block_channel_shuffle", "build_method", "dequantize",
    "feature_mask_fuse", "feature_mask_fuse_residual", "freq_decode", "freq_encode", "freq_hflip", "hybrid_blur", "load_method",
    "median_blur", "prune", "quantize", "roi_mask", "sample_ranks", "shuffle_quantize",
]  # fmt: skip
