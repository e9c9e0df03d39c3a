"""ppfr ops: one module per op family with the reference, the torch.library registration and dispatch."""

from ppfr.ops.freq import freq_decode, freq_decode_ref, freq_encode, freq_encode_ref, freq_hflip

__all__ = ["freq_decode", "freq_decode_ref", "freq_encode", "freq_encode_ref", "freq_hflip"]
