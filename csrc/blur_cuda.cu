// CUDA kernel of the exact k x k median with zero padding (float32). Torch-free; see blur.h for the layout.
//
// One thread per output pixel, a 32 x 8 block per output tile. The block loads its (32 + k - 1) x (8 + k - 1)
// input tile once into shared memory as order-preserving unsigned keys (out-of-image positions as the key of
// 0.0f: kornia's zero padding). Each thread then builds its median's key bit by bit from the top (radix
// select): a bit is kept when at most mid = (k*k - 1)/2 window keys lie below the candidate. That is 32
// passes of k^2 shared-memory compares per pixel, with no per-pixel buffer (the unfold formulation stores
// k^2 floats per pixel), and the answer is decoded back to the exact input element.
// A warp covers 32 consecutive columns of one row, so the shared loads of a pass are conflict-free.
#include <cuda_runtime.h>

#include "blur.h"

namespace ppfr {
namespace {

constexpr int kTileW = 32;
constexpr int kTileH = 8;
constexpr int64_t kMaxGridZ = 65535;
constexpr int kMaxSharedBytes = 48 * 1024;  // default dynamic shared memory limit without opt-in

__device__ __forceinline__ unsigned order_key(float v) {
  const unsigned u = __float_as_uint(v);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

__device__ __forceinline__ float key_value(unsigned key) {
  return __uint_as_float((key & 0x80000000u) ? (key & 0x7FFFFFFFu) : ~key);
}

__global__ void median_blur_fwd_kernel(const float* __restrict__ x, float* __restrict__ out, int C, int H, int W,
                                       int k, const uint8_t* __restrict__ mask, int64_t p0) {
  extern __shared__ unsigned tile[];
  const int64_t p = p0 + blockIdx.z;
  const int64_t HW = static_cast<int64_t>(H) * W;
  const int half = k / 2;
  const int tw = kTileW + k - 1, th = kTileH + k - 1;
  const int i0 = static_cast<int>(blockIdx.y) * kTileH - half, j0 = static_cast<int>(blockIdx.x) * kTileW - half;
  const float* xp = x + p * HW;
  for (int t = threadIdx.y * kTileW + threadIdx.x; t < tw * th; t += kTileW * kTileH) {
    const int i = i0 + t / tw, j = j0 + t % tw;
    const float v = (i >= 0 && i < H && j >= 0 && j < W) ? __ldg(xp + static_cast<int64_t>(i) * W + j) : 0.f;
    tile[t] = order_key(v);
  }
  __syncthreads();

  const int i = static_cast<int>(blockIdx.y) * kTileH + static_cast<int>(threadIdx.y);
  const int j = static_cast<int>(blockIdx.x) * kTileW + static_cast<int>(threadIdx.x);
  if (i >= H || j >= W) return;
  const int64_t pix = static_cast<int64_t>(i) * W + j;
  if (mask != nullptr && mask[(p / C) * HW + pix] == 0) {  // not a median pixel of the hybrid blur
    out[p * HW + pix] = xp[pix];
    return;
  }
  const int mid = (k * k - 1) / 2;
  unsigned ans = 0u;
  for (int bit = 31; bit >= 0; --bit) {
    const unsigned trial = ans | (1u << bit);
    int cnt = 0;
    for (int dy = 0; dy < k; ++dy) {
      const unsigned* row = tile + (threadIdx.y + dy) * tw + threadIdx.x;
      for (int dx = 0; dx < k; ++dx) cnt += (row[dx] < trial) ? 1 : 0;
    }
    if (cnt <= mid) ans = trial;
  }
  out[p * HW + pix] = key_value(ans);
}

}  // namespace

int median_blur_cuda(const float* x, float* out, int64_t B, int64_t C, int64_t H, int64_t W, int k,
                     const uint8_t* mask, void* stream) {
  if (k < 1 || k % 2 == 0) return static_cast<int>(cudaErrorInvalidValue);
  const size_t smem = sizeof(unsigned) * static_cast<size_t>(kTileW + k - 1) * static_cast<size_t>(kTileH + k - 1);
  if (smem > static_cast<size_t>(kMaxSharedBytes)) return static_cast<int>(cudaErrorInvalidValue);  // k > 91
  const int64_t P = B * C;
  const dim3 block(kTileW, kTileH);
  for (int64_t z0 = 0; z0 < P; z0 += kMaxGridZ) {
    const int64_t nz = (P - z0) < kMaxGridZ ? (P - z0) : kMaxGridZ;
    const dim3 grid(static_cast<unsigned>((W + kTileW - 1) / kTileW),
                    static_cast<unsigned>((H + kTileH - 1) / kTileH), static_cast<unsigned>(nz));
    median_blur_fwd_kernel<<<grid, block, smem, static_cast<cudaStream_t>(stream)>>>(
        x, out, static_cast<int>(C), static_cast<int>(H), static_cast<int>(W), k, mask, z0);
    const cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return static_cast<int>(err);
  }
  return 0;
}

}  // namespace ppfr
