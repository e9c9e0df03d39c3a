"""ppfr ops: one module per op family with the reference, the torch.library registration and dispatch."""

from ppfr.ops.block_shuffle import (
    block_channel_shuffle, block_perm_table, dequantize, dequantize_unshuffle, prune, quantize, shuffle_quantize,
)  # fmt: skip
from ppfr.ops.blur import gaussian_blur, hybrid_blur, median_blur, pixelate, sample_hybrid_params
from ppfr.ops.feature_mask_fuse import feature_mask_fuse, feature_mask_fuse_residual
from ppfr.ops.freq import freq_decode, freq_decode_ref, freq_encode, freq_encode_ref, freq_hflip
from ppfr.ops.roi_mask import roi_mask, roi_mask_ref
from ppfr.ops.sample_ranks import RankSpace, sample_ranks

__all__ = [
    "RankSpace", "block_channel_shuffle", "block_perm_table", "dequantize", "dequantize_unshuffle",
    "feature_mask_fuse", "feature_mask_fuse_residual", "freq_decode", "freq_decode_ref", "freq_encode",
    "freq_encode_ref", "freq_hflip", "gaussian_blur", "hybrid_blur", "median_blur", "pixelate", "prune", "quantize",
    "roi_mask", "roi_mask_ref", "sample_hybrid_params", "sample_ranks", "shuffle_quantize",
]  # fmt: skip
