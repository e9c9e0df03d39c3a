// PRO-Face C client-feature protection kernels (METHODS.md §6.3): per-block channel shuffle, magnitude
// pruning, uniform symmetric per-(sample, channel) quantization to int8/int4 and the packed wire format.
// Torch-free; semantics in ppfr/ops/block_shuffle.py.
#pragma once
#include <cstdint>

namespace ppfr {

// out[b, j, h, w] = x[b, perm[block(h, w), j], h, w]; perm (n_blocks, C) int64, blocks of bh x bw in raster order
// over a ceil(H/bh) x ceil(W/bw) grid (partial blocks at the right/bottom edges).
template <typename T>
void block_shuffle_cpu(const T* x, T* out, int64_t B, int64_t C, int64_t H, int64_t W, const int64_t* perm,
                       int64_t bh, int64_t bw, int nthreads);

// Per sample, keep the values with |v| >= the k-th largest |v| (ties at the threshold all kept), zero the rest.
template <typename T>
void prune_cpu(const T* x, T* out, int64_t B, int64_t N, int64_t k, int nthreads);

// Per (b, c) over N = H*W values: scale = amax / qmax (1 if amax == 0), code = round_half_even(v * (1 / scale)),
// clamped to [-qmax, qmax]; packed little-nibble-first for bits == 4. wire (B, C, nbytes) uint8, scales (B, C) f32.
void quantize_cpu(const float* x, uint8_t* wire, float* scales, int64_t B, int64_t C, int64_t N, int bits,
                  int nthreads);
void dequantize_cpu(const uint8_t* wire, const float* scales, float* out, int64_t B, int64_t C, int64_t N, int bits,
                    int nthreads);

// Fused client path: prune (keep k of C*N per sample; k >= C*N disables) -> block shuffle -> quantize, one sample
// at a time through a per-thread buffer (no batch-sized intermediates).
void shuffle_quantize_cpu(const float* x, uint8_t* wire, float* scales, int64_t B, int64_t C, int64_t H, int64_t W,
                          const int64_t* perm, int64_t bh, int64_t bw, int64_t keep_k, int bits, int nthreads);

// Fused server path: dequantize -> inverse block shuffle (pass the inverse permutation table).
void dequantize_unshuffle_cpu(const uint8_t* wire, const float* scales, float* out, int64_t B, int64_t C, int64_t H,
                              int64_t W, const int64_t* inv_perm, int64_t bh, int64_t bw, int bits, int nthreads);

}  // namespace ppfr
