// C++/OpenMP CPU kernels for feature-mask fusion (see feature_mask_fuse.h). One pass over z for the mask, one
// fused elementwise pass over h; the backward reads g and h once and writes gh (and gz) without temporaries.
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include "feature_mask_fuse.h"

namespace ppfr {
namespace {

// exp for float that vectorises (glibc's vector exp is only used under -ffast-math): Cody-Waite range reduction
// x = n ln2 + r, |r| <= ln2/2, a degree-6 minimax-style polynomial for e^r, and 2^n assembled in the exponent
// bits. Relative error ~2 ulp over [-87, 88]; inputs are clamped there (sigmoid saturates long before).
inline float vexp(float x) {
  x = std::min(88.0f, std::max(-87.0f, x));
  const float n = std::nearbyint(x * 1.44269504088896341f);
  const float r = (x - n * 0.693359375f) + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

template <typename T>
inline T sigmoid(T v) { return T(1) / (T(1) + std::exp(-v)); }
template <>
inline float sigmoid<float>(float v) { return 1.0f / (1.0f + vexp(-v)); }

// In place (v - min) / max(max - min, eps); returns the factor 1 / max(max - min, eps).
template <typename T>
T minmax_normalize(T* v, int64_t n, double eps) {
  T lo = std::numeric_limits<T>::infinity(), hi = -std::numeric_limits<T>::infinity();
  for (int64_t i = 0; i < n; ++i) {
    lo = std::min(lo, v[i]);
    hi = std::max(hi, v[i]);
  }
  const T inv = T(1) / std::max(hi - lo, static_cast<T>(eps));
  for (int64_t i = 0; i < n; ++i) v[i] = (v[i] - lo) * inv;
  return inv;
}

}  // namespace

template <typename T>
void mask_fuse_fwd_cpu(const T* h, const T* z, const T* roi, const T* w, T* out, T* mask, T* kscale, int64_t B,
                       int64_t C, int64_t Cz, int64_t HW, double eps, int nthreads) {
  const T wv = *w;
#pragma omp parallel for num_threads(nthreads) schedule(static)
  for (int64_t b = 0; b < B; ++b) {
    T* mb = mask + b * HW;
    std::fill(mb, mb + HW, T(0));
    const T* zb = z + b * Cz * HW;
    for (int64_t c = 0; c < Cz; ++c) {
      const T* zc = zb + c * HW;
#pragma omp simd
      for (int64_t p = 0; p < HW; ++p) mb[p] += zc[p];
    }
    const T invc = T(1) / static_cast<T>(Cz);
    for (int64_t p = 0; p < HW; ++p) mb[p] *= invc;
    T k = minmax_normalize(mb, HW, eps);
    if (roi != nullptr) {
      const T* rb = roi + b * HW;
      for (int64_t p = 0; p < HW; ++p) mb[p] *= rb[p];
      k *= minmax_normalize(mb, HW, eps);
    }
    kscale[b] = k;
    const T* hb = h + b * C * HW;
    T* ob = out + b * C * HW;
    for (int64_t c = 0; c < C; ++c) {
      const T* hc = hb + c * HW;
      T* oc = ob + c * HW;
#pragma omp simd
      for (int64_t p = 0; p < HW; ++p) oc[p] = sigmoid(hc[p]) * (T(1) + wv * mb[p]);
    }
  }
}

template <typename T>
void mask_fuse_bwd_cpu(const T* g, const T* h, const T* mask, const T* roi, const T* kscale, const T* w, T* gh, T* gz,
                       T* gw_b, int64_t B, int64_t C, int64_t Cz, int64_t HW, int nthreads) {
  const T wv = *w;
#pragma omp parallel num_threads(nthreads)
  {
    std::vector<T> s(static_cast<size_t>(HW));
#pragma omp for schedule(static)
    for (int64_t b = 0; b < B; ++b) {
      std::fill(s.begin(), s.end(), T(0));
      const T* mb = mask + b * HW;
      T* sp = s.data();
      for (int64_t c = 0; c < C; ++c) {
        const int64_t o = (b * C + c) * HW;
#pragma omp simd
        for (int64_t p = 0; p < HW; ++p) {
          const T sg = sigmoid(h[o + p]);
          const T gs = g[o + p] * sg;  // dL/d(1 + w m) up to the mask factor
          sp[p] += gs;
          gh[o + p] = gs * (T(1) - sg) * (T(1) + wv * mb[p]);
        }
      }
      T acc = 0;
      for (int64_t p = 0; p < HW; ++p) acc += s[p] * mb[p];
      gw_b[b] = acc;
      if (gz != nullptr) {
        // dL/dm = w * s * roi * k; m is the channel mean of z: each channel gets 1/Cz of it.
        const T base = wv * kscale[b] / static_cast<T>(Cz);
        const T* rb = roi != nullptr ? roi + b * HW : nullptr;
        for (int64_t p = 0; p < HW; ++p) s[p] *= base * (rb != nullptr ? rb[p] : T(1));
        for (int64_t c = 0; c < Cz; ++c) std::copy(s.begin(), s.end(), gz + (b * Cz + c) * HW);
      }
    }
  }
}

template <typename T>
void residual_fuse_fwd_cpu(const T* h, const T* a, const T* key, T* out, int64_t B, int64_t N, int nthreads) {
#pragma omp parallel for num_threads(nthreads) schedule(static)
  for (int64_t b = 0; b < B; ++b) {
    const T* hb = h + b * N;
    const T* ab = a + b * N;
    T* ob = out + b * N;
#pragma omp simd
    for (int64_t i = 0; i < N; ++i) ob[i] = hb[i] + sigmoid(hb[i]) * ab[i] * key[i];
  }
}

template <typename T>
void residual_fuse_bwd_cpu(const T* g, const T* h, const T* a, const T* key, T* gh, T* ga, T* gkey, int64_t B,
                           int64_t N, int nthreads) {
  // Parallel over chunks of elements (not samples) so the batch reduction into gkey needs no atomics; within a
  // chunk the loop over samples keeps every access contiguous.
  constexpr int64_t kChunk = 2048;
  const int64_t nchunks = (N + kChunk - 1) / kChunk;
#pragma omp parallel num_threads(nthreads)
  {
    std::vector<T> acc(kChunk);
#pragma omp for schedule(static)
    for (int64_t ch = 0; ch < nchunks; ++ch) {
      const int64_t i0 = ch * kChunk, len = std::min(kChunk, N - i0);
      std::fill(acc.begin(), acc.begin() + len, T(0));
      T* ac = acc.data();
      const T* kc = key + i0;
      for (int64_t b = 0; b < B; ++b) {
        const int64_t o = b * N + i0;
        const T *gb = g + o, *hb = h + o, *abp = a + o;
        T* ghb = gh + o;
        T* gab = ga != nullptr ? ga + o : nullptr;
#pragma omp simd
        for (int64_t i = 0; i < len; ++i) {
          const T sg = sigmoid(hb[i]);
          ghb[i] = gb[i] * (T(1) + sg * (T(1) - sg) * abp[i] * kc[i]);
          ac[i] += gb[i] * sg * abp[i];
        }
        if (gab != nullptr) {
#pragma omp simd
          for (int64_t i = 0; i < len; ++i) gab[i] = gb[i] * sigmoid(hb[i]) * kc[i];
        }
      }
      if (gkey != nullptr) std::copy(acc.begin(), acc.begin() + len, gkey + i0);
    }
  }
}

#define PPFR_INSTANTIATE(T)                                                                                      \
  template void mask_fuse_fwd_cpu<T>(const T*, const T*, const T*, const T*, T*, T*, T*, int64_t, int64_t,      \
                                     int64_t, int64_t, double, int);                                             \
  template void mask_fuse_bwd_cpu<T>(const T*, const T*, const T*, const T*, const T*, const T*, T*, T*, T*,     \
                                     int64_t, int64_t, int64_t, int64_t, int);                                   \
  template void residual_fuse_fwd_cpu<T>(const T*, const T*, const T*, T*, int64_t, int64_t, int);              \
  template void residual_fuse_bwd_cpu<T>(const T*, const T*, const T*, const T*, T*, T*, T*, int64_t, int64_t,  \
                                         int);

PPFR_INSTANTIATE(float)
PPFR_INSTANTIATE(double)

}  // namespace ppfr
