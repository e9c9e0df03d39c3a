// PRO-Face C blur kernels (METHODS.md §6.2): torch-free declarations shared by the CPU (blur_cpu.cpp) and
// CUDA (blur_cuda.cu) implementations and their pybind11 bindings. Semantics live in ppfr/ops/blur.py.
//
// All tensors are contiguous, row-major; an image batch (B, C, H, W) is handled as P = B*C planes of H x W.
//
// median_blur: out[p, i, j] = the middle (index (k*k-1)/2, k odd) of the k*k window centred on (i, j), with
//   out-of-image positions counting as 0 (kornia's zero padding). The result is an element of the window,
//   so every backend is bit-exact. An optional per-pixel mask (B, H, W) uint8 restricts the work: where
//   mask == 0 the output is a copy of the input (the hybrid blur only needs the median on its median patches).
// gaussian_blur: separable correlation with a 1-D kernel w[k] (symmetric, sums to 1) along rows then columns,
//   with reflect padding of k/2 (no edge repeat: index -1 -> 1); requires k/2 < H and k/2 < W.
#pragma once
#include <cstdint>

namespace ppfr {

// x, out: (P, H, W) with P = B * C; mask: nullptr or (B, H, W) uint8, shared by the C planes of an image.
template <typename T>
void median_blur_cpu(const T* x, T* out, int64_t B, int64_t C, int64_t H, int64_t W, int k,
                     const uint8_t* mask, int nthreads);

// x, out: (P, H, W); w: (k,) 1-D Gaussian taps (odd k); reflect padding.
template <typename T>
void gaussian_blur_cpu(const T* x, T* out, int64_t P, int64_t H, int64_t W, const T* w, int k, int nthreads);

#ifdef PPFR_WITH_CUDA
// CUDA launchers (float32). Return a cudaError_t as int (0 = success); `stream` is a cudaStream_t.
int median_blur_cuda(const float* x, float* out, int64_t B, int64_t C, int64_t H, int64_t W, int k,
                     const uint8_t* mask, void* stream);
#endif

}  // namespace ppfr
