// C++/OpenMP CPU kernels of the block-DCT frequency transform (see freq.h and ppfr/ops/freq.py).
//
// Encode, per image: colour-convert once (3 planes), apply the 3-tap column operator for the (colour, v)
// pairs some requested channel needs (gather, 1/8 of the output work at most), then produce each requested
// channel with the 3-tap row operator: out row i = sum_t w[u][t][i] * R[c][v][idx[t][i]], a contiguous
// axpy over W that the compiler vectorises. Nothing of size 8H x 8W is ever built, and only requested
// channels are written. Decode mirrors it: the 2-tap row operator (vectorised axpy over 192 input planes)
// into 24 (colour, v) accumulators, then the 2-tap column operator and the colour transform.
#include <omp.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "freq.h"

namespace ppfr {
namespace {

// dst[0:n] += a * src[0:n]
template <typename T>
inline void axpy(T* __restrict dst, const T* __restrict src, T a, int64_t n) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) dst[j] += a * src[j];
}

}  // namespace

template <typename T>
void freq_encode_cpu(const T* x, T* out, int64_t B, int64_t H, int64_t W, int64_t K, const int64_t* chan,
                     const int32_t* ridx, const T* rw, const int32_t* cidx, const T* cw, const T* affine,
                     int nthreads) {
  const int64_t HW = H * W;
#pragma omp parallel num_threads(nthreads)
  {
    // Per-thread scratch: Z (3 planes), gathered columns (3 taps), R (3 colours x 8 v planes).
    std::vector<T> z(3 * HW), zg(kEncTaps * HW), r(24 * HW);
#pragma omp for schedule(dynamic, 1)
    for (int64_t b = 0; b < B; ++b) {
      const T* xb = x + b * 3 * HW;
      const int64_t* ch = chan + b * K;
      bool need[24] = {false};
      bool need_c[3] = {false};
      for (int64_t k = 0; k < K; ++k) {
        const int64_t c = ch[k] / 64, v = ch[k] % 8;
        need[c * 8 + v] = true;
        need_c[c] = true;
      }
      for (int c = 0; c < 3; ++c) {
        if (!need_c[c]) continue;
        const T a0 = affine[c * 4 + 0], a1 = affine[c * 4 + 1], a2 = affine[c * 4 + 2], a3 = affine[c * 4 + 3];
        T* zc = z.data() + c * HW;
#pragma omp simd
        for (int64_t p = 0; p < HW; ++p) zc[p] = a0 * xb[p] + a1 * xb[HW + p] + a2 * xb[2 * HW + p] + a3;
        // column gather: zg[t][row][j] = zc[row][cidx[t][j]]
        for (int t = 0; t < kEncTaps; ++t) {
          const int32_t* ci = cidx + t * W;
          for (int64_t row = 0; row < H; ++row) {
            const T* zr = zc + row * W;
            T* g = zg.data() + t * HW + row * W;
            for (int64_t j = 0; j < W; ++j) g[j] = zr[ci[j]];
          }
        }
        for (int v = 0; v < 8; ++v) {
          if (!need[c * 8 + v]) continue;
          T* rv = r.data() + (c * 8 + v) * HW;
          const T* w0 = cw + (v * kEncTaps + 0) * W;
          const T* w1 = cw + (v * kEncTaps + 1) * W;
          const T* w2 = cw + (v * kEncTaps + 2) * W;
          for (int64_t row = 0; row < H; ++row) {
            const T* g0 = zg.data() + row * W;
            const T* g1 = g0 + HW;
            const T* g2 = g1 + HW;
            T* o = rv + row * W;
#pragma omp simd
            for (int64_t j = 0; j < W; ++j) o[j] = w0[j] * g0[j] + w1[j] * g1[j] + w2[j] * g2[j];
          }
        }
      }
      for (int64_t k = 0; k < K; ++k) {
        const int64_t c = ch[k] / 64, u = (ch[k] / 8) % 8, v = ch[k] % 8;
        const T* rv = r.data() + (c * 8 + v) * HW;
        T* o = out + (b * K + k) * HW;
        const T* wu = rw + u * kEncTaps * H;
        for (int64_t i = 0; i < H; ++i) {
          const T* s0 = rv + ridx[i] * W;
          const T* s1 = rv + ridx[H + i] * W;
          const T* s2 = rv + ridx[2 * H + i] * W;
          const T c0 = wu[i], c1 = wu[H + i], c2 = wu[2 * H + i];
          T* oi = o + i * W;
#pragma omp simd
          for (int64_t j = 0; j < W; ++j) oi[j] = c0 * s0[j] + c1 * s1[j] + c2 * s2[j];
        }
      }
    }
  }
}

template <typename T>
void freq_decode_cpu(const T* f, T* out, int64_t B, int64_t H, int64_t W, int64_t K, const int64_t* src,
                     const int32_t* ridx, const T* rw, const int32_t* cidx, const T* cw, const T* affine,
                     int nthreads) {
  const int64_t HW = H * W;
#pragma omp parallel num_threads(nthreads)
  {
    std::vector<T> s(24 * HW), d(3 * HW);
#pragma omp for schedule(dynamic, 1)
    for (int64_t b = 0; b < B; ++b) {
      const int64_t* sb = src + b * kNumChannels;
      std::fill(s.begin(), s.end(), T(0));
      std::fill(d.begin(), d.end(), T(0));
      // Stage 1 (rows): S[c][v] = sum_u P_u F[c,u,v]; P_u has 2 taps per output row.
      for (int c = 0; c < 3; ++c) {
        for (int u = 0; u < 8; ++u) {
          const T* wu = rw + u * kDecTaps * H;
          for (int v = 0; v < 8; ++v) {
            const int64_t k = sb[c * 64 + u * 8 + v];
            if (k < 0) continue;
            const T* fk = f + (b * K + k) * HW;
            T* sv = s.data() + (c * 8 + v) * HW;
            for (int64_t p = 0; p < H; ++p) {
              T* sp = sv + p * W;
              axpy(sp, fk + ridx[p] * W, wu[p], W);
              axpy(sp, fk + ridx[H + p] * W, wu[H + p], W);
            }
          }
        }
      }
      // Stage 2 (columns): D[c] = sum_v S[c][v] P_v^T, 2 taps per output column.
      for (int c = 0; c < 3; ++c) {
        T* dc = d.data() + c * HW;
        for (int v = 0; v < 8; ++v) {
          const T* sv = s.data() + (c * 8 + v) * HW;
          const T* w0 = cw + (v * kDecTaps + 0) * W;
          const T* w1 = cw + (v * kDecTaps + 1) * W;
          for (int64_t p = 0; p < H; ++p) {
            const T* sp = sv + p * W;
            T* dp = dc + p * W;
            for (int64_t q = 0; q < W; ++q) dp[q] += w0[q] * sp[cidx[q]] + w1[q] * sp[cidx[W + q]];
          }
        }
      }
      T* ob = out + b * 3 * HW;
      for (int c = 0; c < 3; ++c) {
        const T a0 = affine[c * 4 + 0], a1 = affine[c * 4 + 1], a2 = affine[c * 4 + 2], a3 = affine[c * 4 + 3];
        T* oc = ob + c * HW;
        const T* d0 = d.data();
#pragma omp simd
        for (int64_t p = 0; p < HW; ++p) oc[p] = a0 * d0[p] + a1 * d0[HW + p] + a2 * d0[2 * HW + p] + a3;
      }
    }
  }
}

template <typename T>
void freq_hflip_cpu(const T* f, T* out, int64_t B, int64_t K, int64_t H, int64_t W, const float* sign,
                    int nthreads) {
  const int64_t planes = B * K;
#pragma omp parallel for num_threads(nthreads) schedule(static)
  for (int64_t pk = 0; pk < planes; ++pk) {
    const T sg = static_cast<T>(sign[pk]);
    for (int64_t i = 0; i < H; ++i) {
      const T* src = f + (pk * H + i) * W;
      T* dst = out + (pk * H + i) * W;
      for (int64_t j = 0; j < W; ++j) dst[j] = sg * src[W - 1 - j];
    }
  }
}

#define PPFR_INSTANTIATE(T)                                                                                    \
  template void freq_encode_cpu<T>(const T*, T*, int64_t, int64_t, int64_t, int64_t, const int64_t*,           \
                                   const int32_t*, const T*, const int32_t*, const T*, const T*, int);         \
  template void freq_decode_cpu<T>(const T*, T*, int64_t, int64_t, int64_t, int64_t, const int64_t*,           \
                                   const int32_t*, const T*, const int32_t*, const T*, const T*, int);         \
  template void freq_hflip_cpu<T>(const T*, T*, int64_t, int64_t, int64_t, int64_t, const float*, int);

PPFR_INSTANTIATE(float)
PPFR_INSTANTIATE(double)

}  // namespace ppfr
