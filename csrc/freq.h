// Block-DCT frequency transform kernels (METHODS.md §2): torch-free declarations shared by the CPU
// (freq_cpu.cpp) and CUDA (freq_cuda.cu) implementations and their pybind11 bindings.
//
// All tensors are contiguous, row-major. The math lives in the tables built by ppfr/ops/_freq_tables.py:
//   enc idx (3, N) int32 / enc w (8, 3, N): 3-tap banded operator per axis and frequency (encode)
//   dec idx (2, N) int32 / dec w (8, 2, N): 2-tap banded operator per axis and frequency (decode)
//   affine (3, 4): per output colour c, out_c = sum_d affine[c][d] * in_d + affine[c][3]
#pragma once
#include <cstdint>

namespace ppfr {

constexpr int kEncTaps = 3;
constexpr int kDecTaps = 2;
constexpr int kNumChannels = 192;

// x (B,3,H,W) RGB in [-1,1] -> out (B,K,H,W); chan (B,K) int64 channel ids 64c + 8u + v.
template <typename T>
void freq_encode_cpu(const T* x, T* out, int64_t B, int64_t H, int64_t W, int64_t K, const int64_t* chan,
                     const int32_t* ridx, const T* rw, const int32_t* cidx, const T* cw, const T* affine,
                     int nthreads);

// f (B,K,H,W) coefficients, src (B,192) int64: input position feeding decode slot j or -1 -> out (B,3,H,W)
// linear (unclamped) RGB on a [0,1] scale.
template <typename T>
void freq_decode_cpu(const T* f, T* out, int64_t B, int64_t H, int64_t W, int64_t K, const int64_t* src,
                     const int32_t* ridx, const T* rw, const int32_t* cidx, const T* cw, const T* affine,
                     int nthreads);

// out[b,k,i,j] = sign[b,k] * f[b,k,i,W-1-j]; sign (B,K) float32.
template <typename T>
void freq_hflip_cpu(const T* f, T* out, int64_t B, int64_t K, int64_t H, int64_t W, const float* sign,
                    int nthreads);

#ifdef PPFR_WITH_CUDA
// CUDA launchers (float32). Return a cudaError_t as int (0 = success); `stream` is a cudaStream_t.
int freq_encode_cuda(const float* x, float* out, int64_t B, int64_t H, int64_t W, int64_t K, const int64_t* chan,
                     const int32_t* ridx, const float* rw, const int32_t* cidx, const float* cw,
                     const float* affine, void* stream);
int freq_decode_cuda(const float* f, float* out, int64_t B, int64_t H, int64_t W, int64_t K, const int64_t* src,
                     const int32_t* ridx, const float* rw, const int32_t* cidx, const float* cw,
                     const float* affine, void* stream);
#endif

}  // namespace ppfr
