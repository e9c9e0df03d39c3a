// CUDA kernels of the block-DCT frequency transform (float32). Torch-free; see freq.h for the layout.
//
// Encode: one thread per output coefficient (b, k, i, j). The 3x3 taps read the (cached) input image and
// colour-convert on the fly, so the kernel's DRAM traffic is the output write plus one read of the image:
// it is bound by the write of K*H*W floats per image, which is the floor for this op.
// Decode: one thread per output pixel; the channel loop reads each input coefficient plane with 2x2 taps.
#include <cuda_runtime.h>

#include "freq.h"

namespace ppfr {
namespace {

constexpr int64_t kMaxGridZ = 65535;

__global__ void freq_encode_fwd_kernel(const float* __restrict__ x, float* __restrict__ out, int H, int W, int K,
                                       const int64_t* __restrict__ chan, const int32_t* __restrict__ ridx,
                                       const float* __restrict__ rw, const int32_t* __restrict__ cidx,
                                       const float* __restrict__ cw, const float* __restrict__ affine,
                                       int64_t bk0) {
  const int j = blockIdx.x * blockDim.x + threadIdx.x;
  const int i = blockIdx.y * blockDim.y + threadIdx.y;
  const int64_t bk = bk0 + blockIdx.z;
  if (i >= H || j >= W) return;
  const int64_t b = bk / K;
  const int64_t ch = chan[bk];
  const int c = static_cast<int>(ch / 64), u = static_cast<int>((ch / 8) % 8), v = static_cast<int>(ch % 8);
  const int64_t HW = static_cast<int64_t>(H) * W;
  const float* xb = x + b * 3 * HW;
  const float a0 = affine[c * 4 + 0], a1 = affine[c * 4 + 1], a2 = affine[c * 4 + 2], a3 = affine[c * 4 + 3];
  float acc = 0.f;
#pragma unroll
  for (int t1 = 0; t1 < kEncTaps; ++t1) {
    const float wr = rw[(u * kEncTaps + t1) * H + i];
    const int64_t row = static_cast<int64_t>(ridx[t1 * H + i]) * W;
#pragma unroll
    for (int t2 = 0; t2 < kEncTaps; ++t2) {
      const float wc = cw[(v * kEncTaps + t2) * W + j];
      const int64_t p = row + cidx[t2 * W + j];
      const float z = a0 * __ldg(xb + p) + a1 * __ldg(xb + HW + p) + a2 * __ldg(xb + 2 * HW + p) + a3;
      acc += wr * wc * z;
    }
  }
  out[bk * HW + static_cast<int64_t>(i) * W + j] = acc;
}

__global__ void freq_decode_fwd_kernel(const float* __restrict__ f, float* __restrict__ out, int H, int W, int K,
                                       const int64_t* __restrict__ src, const int32_t* __restrict__ ridx,
                                       const float* __restrict__ rw, const int32_t* __restrict__ cidx,
                                       const float* __restrict__ cw, const float* __restrict__ affine,
                                       int64_t b0) {
  const int q = blockIdx.x * blockDim.x + threadIdx.x;
  const int p = blockIdx.y * blockDim.y + threadIdx.y;
  const int64_t b = b0 + blockIdx.z;
  if (p >= H || q >= W) return;
  const int64_t HW = static_cast<int64_t>(H) * W;
  const int64_t r0 = static_cast<int64_t>(ridx[p]) * W, r1 = static_cast<int64_t>(ridx[H + p]) * W;
  const int c0 = cidx[q], c1 = cidx[W + q];
  float d[3] = {0.f, 0.f, 0.f};
  for (int c = 0; c < 3; ++c) {
    for (int u = 0; u < 8; ++u) {
      const float wr0 = rw[(u * kDecTaps) * H + p], wr1 = rw[(u * kDecTaps + 1) * H + p];
      for (int v = 0; v < 8; ++v) {
        const int64_t k = src[b * kNumChannels + c * 64 + u * 8 + v];
        if (k < 0) continue;
        const float* fk = f + (b * K + k) * HW;
        const float wc0 = cw[(v * kDecTaps) * W + q], wc1 = cw[(v * kDecTaps + 1) * W + q];
        d[c] += wr0 * (wc0 * __ldg(fk + r0 + c0) + wc1 * __ldg(fk + r0 + c1)) +
                wr1 * (wc0 * __ldg(fk + r1 + c0) + wc1 * __ldg(fk + r1 + c1));
      }
    }
  }
  float* ob = out + b * 3 * HW + static_cast<int64_t>(p) * W + q;
#pragma unroll
  for (int c = 0; c < 3; ++c)
    ob[c * HW] = affine[c * 4] * d[0] + affine[c * 4 + 1] * d[1] + affine[c * 4 + 2] * d[2] + affine[c * 4 + 3];
}

}  // namespace

int freq_encode_cuda(const float* x, float* out, int64_t B, int64_t H, int64_t W, int64_t K, const int64_t* chan,
                     const int32_t* ridx, const float* rw, const int32_t* cidx, const float* cw,
                     const float* affine, void* stream) {
  const dim3 block(32, 8);
  // gridDim.z is capped at 65535: launch the (b, k) planes in chunks.
  for (int64_t z0 = 0; z0 < B * K; z0 += kMaxGridZ) {
    const int64_t nz = (B * K - z0) < kMaxGridZ ? (B * K - z0) : kMaxGridZ;
    const dim3 grid(static_cast<unsigned>((W + 31) / 32), static_cast<unsigned>((H + 7) / 8),
                    static_cast<unsigned>(nz));
    freq_encode_fwd_kernel<<<grid, block, 0, static_cast<cudaStream_t>(stream)>>>(
        x, out, static_cast<int>(H), static_cast<int>(W), static_cast<int>(K), chan, ridx, rw, cidx, cw, affine,
        z0);
    const cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return static_cast<int>(err);
  }
  return 0;
}

int freq_decode_cuda(const float* f, float* out, int64_t B, int64_t H, int64_t W, int64_t K, const int64_t* src,
                     const int32_t* ridx, const float* rw, const int32_t* cidx, const float* cw,
                     const float* affine, void* stream) {
  const dim3 block(32, 8);
  for (int64_t z0 = 0; z0 < B; z0 += kMaxGridZ) {
    const int64_t nz = (B - z0) < kMaxGridZ ? (B - z0) : kMaxGridZ;
    const dim3 grid(static_cast<unsigned>((W + 31) / 32), static_cast<unsigned>((H + 7) / 8),
                    static_cast<unsigned>(nz));
    freq_decode_fwd_kernel<<<grid, block, 0, static_cast<cudaStream_t>(stream)>>>(
        f, out, static_cast<int>(H), static_cast<int>(W), static_cast<int>(K), src, ridx, rw, cidx, cw, affine,
        z0);
    const cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return static_cast<int>(err);
  }
  return 0;
}

}  // namespace ppfr
