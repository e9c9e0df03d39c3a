// C++/OpenMP CPU kernels for PRO-Face C feature protection (see block_shuffle.h).
//
// Bit-exactness with the PyTorch reference: the amax is exact, scale = amax / qmax and inv = 1 / scale are single
// IEEE operations (as in torch), and the code is nearbyint(v * inv) under the default round-to-nearest-even mode
// (torch.round). No multiply-add is adjacent, so FMA contraction cannot change a result.
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "block_shuffle.h"

namespace ppfr {
namespace {

inline int64_t nbytes_for(int64_t n, int bits) { return bits == 8 ? n : (n + 1) / 2; }

template <typename T>
void shuffle_one(const T* x, T* out, int64_t C, int64_t H, int64_t W, const int64_t* perm, int64_t bh, int64_t bw) {
  const int64_t nbw = (W + bw - 1) / bw;
  for (int64_t j = 0; j < C; ++j) {
    for (int64_t h = 0; h < H; ++h) {
      const int64_t brow = (h / bh) * nbw;
      T* o = out + (j * H + h) * W;
      for (int64_t w0 = 0; w0 < W; w0 += bw) {
        const int64_t src = perm[(brow + w0 / bw) * C + j];
        const int64_t len = std::min(bw, W - w0);
        const T* xs = x + (src * H + h) * W + w0;
        for (int64_t t = 0; t < len; ++t) o[w0 + t] = xs[t];  // blocks are often 2 px: a call per block costs more
      }
    }
  }
}

template <typename T>
void prune_one(const T* x, T* out, int64_t N, int64_t k, std::vector<T>& buf) {
  if (k >= N) {
    if (out != x) std::memcpy(out, x, static_cast<size_t>(N) * sizeof(T));
    return;
  }
  if (k <= 0) {
    std::fill(out, out + N, T(0));
    return;
  }
  buf.resize(static_cast<size_t>(N));
  for (int64_t i = 0; i < N; ++i) buf[i] = std::abs(x[i]);
  // k-th largest magnitude
  std::nth_element(buf.begin(), buf.begin() + (N - k), buf.end());
  const T thr = buf[N - k];
  for (int64_t i = 0; i < N; ++i) out[i] = std::abs(x[i]) >= thr ? x[i] : T(0);
}

void quantize_one(const float* x, uint8_t* wire, float* scales, int64_t C, int64_t N, int bits) {
  const float qmax = bits == 8 ? 127.f : 7.f;
  const int64_t nb = nbytes_for(N, bits);
  for (int64_t c = 0; c < C; ++c) {
    const float* v = x + c * N;
    float amax = 0.f;
    for (int64_t i = 0; i < N; ++i) amax = std::max(amax, std::abs(v[i]));
    const float scale = amax > 0.f ? amax / qmax : 1.f;
    const float inv = 1.f / scale;
    scales[c] = scale;
    uint8_t* wc = wire + c * nb;
    if (bits == 8) {
      for (int64_t i = 0; i < N; ++i) {
        const float q = std::min(qmax, std::max(-qmax, std::nearbyint(v[i] * inv)));
        wc[i] = static_cast<uint8_t>(static_cast<int8_t>(q));
      }
    } else {
      std::memset(wc, 0, static_cast<size_t>(nb));
      for (int64_t i = 0; i < N; ++i) {
        const float q = std::min(qmax, std::max(-qmax, std::nearbyint(v[i] * inv)));
        const uint8_t nib = static_cast<uint8_t>(static_cast<int>(q) & 0xF);
        wc[i >> 1] |= static_cast<uint8_t>((i & 1) ? (nib << 4) : nib);
      }
    }
  }
}

void dequantize_one(const uint8_t* wire, const float* scales, float* out, int64_t C, int64_t N, int bits) {
  const int64_t nb = nbytes_for(N, bits);
  for (int64_t c = 0; c < C; ++c) {
    const uint8_t* wc = wire + c * nb;
    const float s = scales[c];
    float* o = out + c * N;
    if (bits == 8) {
      for (int64_t i = 0; i < N; ++i) o[i] = static_cast<float>(static_cast<int8_t>(wc[i])) * s;
    } else {
      for (int64_t i = 0; i < N; ++i) {
        int nib = (i & 1) ? (wc[i >> 1] >> 4) : (wc[i >> 1] & 0xF);
        if (nib >= 8) nib -= 16;  // sign-extend the two's-complement nibble
        o[i] = static_cast<float>(nib) * s;
      }
    }
  }
}

}  // namespace

template <typename T>
void block_shuffle_cpu(const T* x, T* out, int64_t B, int64_t C, int64_t H, int64_t W, const int64_t* perm,
                       int64_t bh, int64_t bw, int nthreads) {
#pragma omp parallel for num_threads(nthreads) schedule(static)
  for (int64_t b = 0; b < B; ++b) shuffle_one(x + b * C * H * W, out + b * C * H * W, C, H, W, perm, bh, bw);
}

template <typename T>
void prune_cpu(const T* x, T* out, int64_t B, int64_t N, int64_t k, int nthreads) {
#pragma omp parallel num_threads(nthreads)
  {
    std::vector<T> buf;
#pragma omp for schedule(static)
    for (int64_t b = 0; b < B; ++b) prune_one(x + b * N, out + b * N, N, k, buf);
  }
}

void quantize_cpu(const float* x, uint8_t* wire, float* scales, int64_t B, int64_t C, int64_t N, int bits,
                  int nthreads) {
  const int64_t nb = nbytes_for(N, bits);
#pragma omp parallel for num_threads(nthreads) schedule(static)
  for (int64_t b = 0; b < B; ++b) quantize_one(x + b * C * N, wire + b * C * nb, scales + b * C, C, N, bits);
}

void dequantize_cpu(const uint8_t* wire, const float* scales, float* out, int64_t B, int64_t C, int64_t N, int bits,
                    int nthreads) {
  const int64_t nb = nbytes_for(N, bits);
#pragma omp parallel for num_threads(nthreads) schedule(static)
  for (int64_t b = 0; b < B; ++b) dequantize_one(wire + b * C * nb, scales + b * C, out + b * C * N, C, N, bits);
}

void shuffle_quantize_cpu(const float* x, uint8_t* wire, float* scales, int64_t B, int64_t C, int64_t H, int64_t W,
                          const int64_t* perm, int64_t bh, int64_t bw, int64_t keep_k, int bits, int nthreads) {
  const int64_t N = H * W, nb = nbytes_for(N, bits);
#pragma omp parallel num_threads(nthreads)
  {
    std::vector<float> pruned(static_cast<size_t>(C * N)), shuffled(static_cast<size_t>(C * N)), buf;
#pragma omp for schedule(static)
    for (int64_t b = 0; b < B; ++b) {
      prune_one(x + b * C * N, pruned.data(), C * N, keep_k, buf);
      shuffle_one(pruned.data(), shuffled.data(), C, H, W, perm, bh, bw);
      quantize_one(shuffled.data(), wire + b * C * nb, scales + b * C, C, N, bits);
    }
  }
}

void dequantize_unshuffle_cpu(const uint8_t* wire, const float* scales, float* out, int64_t B, int64_t C, int64_t H,
                              int64_t W, const int64_t* inv_perm, int64_t bh, int64_t bw, int bits, int nthreads) {
  const int64_t N = H * W, nb = nbytes_for(N, bits);
#pragma omp parallel num_threads(nthreads)
  {
    std::vector<float> deq(static_cast<size_t>(C * N));
#pragma omp for schedule(static)
    for (int64_t b = 0; b < B; ++b) {
      dequantize_one(wire + b * C * nb, scales + b * C, deq.data(), C, N, bits);
      shuffle_one(deq.data(), out + b * C * N, C, H, W, inv_perm, bh, bw);
    }
  }
}

template void block_shuffle_cpu<float>(const float*, float*, int64_t, int64_t, int64_t, int64_t, const int64_t*,
                                       int64_t, int64_t, int);
template void block_shuffle_cpu<double>(const double*, double*, int64_t, int64_t, int64_t, int64_t, const int64_t*,
                                        int64_t, int64_t, int);
template void prune_cpu<float>(const float*, float*, int64_t, int64_t, int64_t, int);
template void prune_cpu<double>(const double*, double*, int64_t, int64_t, int64_t, int);

}  // namespace ppfr
