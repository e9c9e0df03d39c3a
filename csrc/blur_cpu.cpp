// C++/OpenMP CPU kernels of the PRO-Face C blurs (see blur.h and ppfr/ops/blur.py).
//
// Median (exact, never materialises the k*k neighbours). Per plane:
//   1. Rank transform: sort the H*W values once (LSD radix sort on an order-preserving integer image of the
//      float bits, stable, so ties are broken by pixel index) and replace every pixel by its rank. Ranks are
//      distinct, and the median of a window in rank space is the median in value space (the map is monotone).
//   2. Sliding window over a row, Huang-style, but the window is a bitset over the H*W ranks (1.5 KB for
//      112x112: it lives in L1) plus a count of set bits per 512-rank block. Moving one column right flips
//      2k bits. The answer is the t-th set bit, found by walking a block cursor that remembers the number of
//      set bits before it (the median moves little between neighbours for large k, so the walk is short),
//      then at most 8 word popcounts and one pdep/tzcnt inside the block.
//   3. Zero padding: the out-of-image part of a window contributes `pad` zeros. With `neg` = set ranks below
//      the rank where 0.0 would sort, the sorted window is [neg values] [pad zeros] [the rest], so the middle
//      element is found without inserting anything.
//   Cost per pixel ~2k bit flips + a short walk (k=19: ~40 ns) against ~k^2 log k for sorting each window;
//   extra memory per thread: O(H*W) (values, ranks, bitset), nothing per pixel.
// Gaussian: separable reflect-padded correlation, a horizontal pass into a per-thread plane buffer and a
// vertical pass, both as contiguous axpy loops the compiler vectorises (2k MACs per pixel instead of k^2).
#include <omp.h>

#include <algorithm>
#include <cstring>
#include <vector>
#if defined(__BMI2__)
#include <immintrin.h>
#endif

#include "blur.h"

namespace ppfr {
namespace {

// Order-preserving unsigned image of the float bits: a < b (as floats, -0.0 before +0.0) iff key(a) < key(b).
inline uint32_t order_key(float v) {
  uint32_t u;
  std::memcpy(&u, &v, sizeof(u));
  return (u >> 31) ? ~u : (u | 0x80000000u);
}
inline uint64_t order_key(double v) {
  uint64_t u;
  std::memcpy(&u, &v, sizeof(u));
  return (u >> 63) ? ~u : (u | (uint64_t(1) << 63));
}

template <typename T>
struct KeyOf;
template <>
struct KeyOf<float> {
  using type = uint32_t;
};
template <>
struct KeyOf<double> {
  using type = uint64_t;
};

template <typename K>
struct Item {
  K key;
  uint32_t idx;
};

// Stable LSD radix sort of `a` by key, 8 bits per pass; passes whose byte is the same for every item are
// skipped (images in [-1, 1] share their top key byte within each sign, so usually 3 of 4 float passes run).
// ~4 n memory passes: 10x faster than std::sort for a 112x112 plane, which matters because the sort is
// ~1/4 of the median's total work at k = 7.
template <typename K>
void radix_sort(std::vector<Item<K>>& a, std::vector<Item<K>>& tmp) {
  constexpr int kBytes = sizeof(K);
  const size_t n = a.size();
  if (n < 2) return;
  tmp.resize(n);
  std::vector<uint32_t> hist(kBytes * 256, 0);
  for (size_t i = 0; i < n; ++i) {
    const K key = a[i].key;
    for (int b = 0; b < kBytes; ++b) ++hist[b * 256 + ((key >> (8 * b)) & 0xFF)];
  }
  for (int b = 0; b < kBytes; ++b) {
    uint32_t* h = hist.data() + b * 256;
    if (h[(a[0].key >> (8 * b)) & 0xFF] == n) continue;  // every key has this byte: the pass is the identity
    uint32_t sum = 0;
    for (int v = 0; v < 256; ++v) {
      const uint32_t c = h[v];
      h[v] = sum;
      sum += c;
    }
    for (size_t i = 0; i < n; ++i) tmp[h[(a[i].key >> (8 * b)) & 0xFF]++] = a[i];
    a.swap(tmp);
  }
}

// Position of the j-th (0-based) set bit of w; w has more than j set bits.
inline int select_in_word(uint64_t w, int j) {
#if defined(__BMI2__)
  return __builtin_ctzll(_pdep_u64(uint64_t(1) << j, w));
#else
  int pos = 0;
  for (int width = 32; width >= 1; width >>= 1) {
    const int c = __builtin_popcountll(w & ((uint64_t(1) << width) - 1));
    if (j >= c) {
      j -= c;
      w >>= width;
      pos += width;
    }
  }
  return pos;
#endif
}

// Sorted values and per-pixel ranks of one plane.
template <typename T>
struct PlaneRanks {
  using K = typename KeyOf<T>::type;
  std::vector<Item<K>> items, tmp;
  std::vector<T> vals;       // vals[r]: the value of rank r
  std::vector<uint32_t> rank;  // rank[pixel]
  int64_t zero_rank = 0;     // number of values whose key is below key(+0.0): where the padding zeros sort

  void build(const T* xp, int64_t hw) {
    items.resize(hw);
    vals.resize(hw);
    rank.resize(hw);
    for (int64_t i = 0; i < hw; ++i) items[i] = {order_key(xp[i]), static_cast<uint32_t>(i)};
    radix_sort(items, tmp);
    for (int64_t r = 0; r < hw; ++r) {
      vals[r] = xp[items[r].idx];
      rank[items[r].idx] = static_cast<uint32_t>(r);
    }
    const K zkey = order_key(T(0));
    zero_rank = std::lower_bound(items.begin(), items.end(), zkey,
                                 [](const Item<K>& it, K key) { return it.key < key; }) -
                items.begin();
  }
};

constexpr int kBlockShift = 9;  // 512 ranks (8 words) per counted block
constexpr int kWordsPerBlock = 1 << (kBlockShift - 6);

// Median of rows [i0, i1) of one plane. `bits` (ceil(H*W/64) words, padded to whole blocks) and `bcnt` (set
// bits per 512-rank block) must be all zero on entry; they are all zero again on exit. mp: nullptr or the
// plane's (H, W) mask (0 = copy the input pixel).
template <typename T>
void median_rows(const T* xp, T* op, int64_t H, int64_t W, int k, const uint8_t* mp, const PlaneRanks<T>& pr,
                 uint64_t* bits, int32_t* bcnt, int64_t i0, int64_t i1) {
  const int64_t h = k / 2;
  const int64_t mid = (static_cast<int64_t>(k) * k - 1) / 2;
  const int64_t r0 = pr.zero_rank;
  const uint32_t* rank = pr.rank.data();
  const T* vals = pr.vals.data();
  // Cursor state: `below` = set bits in blocks [0, cb). Every flip keeps it exact, so it survives window
  // rebuilds and row changes; `neg` = set ranks < r0 (window values that sort before a padding zero).
  // The select walks whole blocks first: for small k the median jumps across the plane's ranks from one
  // pixel to the next (k = 3: ~1/3 of the plane), and a word-by-word walk made k = 3 slower than k = 19.
  int64_t cb = 0, below = 0, neg = 0;

  for (int64_t i = i0; i < i1; ++i) {
    const T* xr = xp + i * W;
    T* orow = op + i * W;
    const uint8_t* mr = mp ? mp + i * W : nullptr;
    const int64_t rlo = std::max<int64_t>(0, i - h), rhi = std::min<int64_t>(H - 1, i + h);
    const int64_t nrows = rhi - rlo + 1;
    const uint32_t* rank_rows = rank + rlo * W;

    auto flip_col = [&](int64_t c, int d) {  // d = +1 add / -1 remove column c of the window rows
      const uint32_t* rc = rank_rows + c;
      for (int64_t r = 0; r < nrows; ++r) {
        const uint32_t q = rc[r * W];
        const int64_t bi = q >> kBlockShift;
        bits[q >> 6] ^= uint64_t(1) << (q & 63);
        bcnt[bi] += d;
        below += (bi < cb) ? d : 0;
        neg += (static_cast<int64_t>(q) < r0) ? d : 0;
      }
    };
    auto select = [&](int64_t t) -> T {  // the t-th smallest set rank (0-based) -> its value
      while (below > t) below -= bcnt[--cb];
      while (below + bcnt[cb] <= t) below += bcnt[cb++];
      int64_t rem = t - below;
      const uint64_t* wp = bits + (cb << (kBlockShift - 6));
      for (;;) {
        const int64_t c = __builtin_popcountll(*wp);
        if (rem < c) break;
        rem -= c;
        ++wp;
      }
      return vals[(wp - bits) * 64 + select_in_word(*wp, static_cast<int>(rem))];
    };

    int64_t lo = 0, hi = -1;  // columns currently in the window (empty)
    for (int64_t j = 0; j < W; ++j) {
      if (mr && !mr[j]) {
        orow[j] = xr[j];
        continue;
      }
      const int64_t clo = std::max<int64_t>(0, j - h), chi = std::min<int64_t>(W - 1, j + h);
      // Slide (or, after a masked gap with no overlap, rebuild): drop columns left of clo, add new ones.
      for (int64_t c = lo; c <= std::min(hi, clo - 1); ++c) flip_col(c, -1);
      for (int64_t c = std::max(hi + 1, clo); c <= chi; ++c) flip_col(c, +1);
      lo = clo;
      hi = chi;
      const int64_t pad = static_cast<int64_t>(k) * k - nrows * (chi - clo + 1);
      if (mid < neg)
        orow[j] = select(mid);
      else if (mid < neg + pad)
        orow[j] = T(0);
      else
        orow[j] = select(mid - pad);
    }
    for (int64_t c = lo; c <= hi; ++c) flip_col(c, -1);  // leave the bitset empty for the next row
  }
}

inline bool any_set(const uint8_t* m, int64_t n) {
  for (int64_t i = 0; i < n; ++i)
    if (m[i]) return true;
  return false;
}

// dst[0:n] += a * src[0:n]
template <typename T>
inline void axpy(T* __restrict dst, const T* __restrict src, T a, int64_t n) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) dst[j] += a * src[j];
}

inline int64_t reflect(int64_t i, int64_t n) { return i < 0 ? -i : (i >= n ? 2 * (n - 1) - i : i); }

}  // namespace

template <typename T>
void median_blur_cpu(const T* x, T* out, int64_t B, int64_t C, int64_t H, int64_t W, int k,
                     const uint8_t* mask, int nthreads) {
  const int64_t P = B * C, HW = H * W;
  if (k == 1) {  // a 1 x 1 window: the median is the pixel itself
    std::memcpy(out, x, sizeof(T) * P * HW);
    return;
  }
  const int64_t nblocks = (HW + (int64_t(1) << kBlockShift) - 1) >> kBlockShift, nwords = nblocks * kWordsPerBlock;
  if (P >= nthreads) {
    // Plane-parallel: each thread ranks and filters whole planes with its own scratch.
#pragma omp parallel num_threads(nthreads)
    {
      PlaneRanks<T> pr;
      std::vector<uint64_t> bits(nwords, 0);
      std::vector<int32_t> bcnt(nblocks, 0);
#pragma omp for schedule(dynamic, 1)
      for (int64_t p = 0; p < P; ++p) {
        const T* xp = x + p * HW;
        T* op = out + p * HW;
        const uint8_t* mp = mask ? mask + (p / C) * HW : nullptr;
        if (mp && !any_set(mp, HW)) {
          std::memcpy(op, xp, sizeof(T) * HW);
          continue;
        }
        pr.build(xp, HW);
        median_rows(xp, op, H, W, k, mp, pr, bits.data(), bcnt.data(), 0, H);
      }
    }
  } else {
    // Few large planes: rank each plane once, then split its rows over the threads.
    PlaneRanks<T> pr;
    for (int64_t p = 0; p < P; ++p) {
      const T* xp = x + p * HW;
      T* op = out + p * HW;
      const uint8_t* mp = mask ? mask + (p / C) * HW : nullptr;
      pr.build(xp, HW);
#pragma omp parallel num_threads(nthreads)
      {
        std::vector<uint64_t> bits(nwords, 0);
        std::vector<int32_t> bcnt(nblocks, 0);
        const int nt = omp_get_num_threads(), t = omp_get_thread_num();
        const int64_t i0 = H * t / nt, i1 = H * (t + 1) / nt;
        median_rows(xp, op, H, W, k, mp, pr, bits.data(), bcnt.data(), i0, i1);
      }
    }
  }
}

template <typename T>
void gaussian_blur_cpu(const T* x, T* out, int64_t P, int64_t H, int64_t W, const T* w, int k, int nthreads) {
  const int64_t h = k / 2, HW = H * W;
  std::vector<int64_t> rrow(H + 2 * h), rcol(W + 2 * h);  // padded index -> source index (reflect)
  for (int64_t i = 0; i < H + 2 * h; ++i) rrow[i] = reflect(i - h, H);
  for (int64_t j = 0; j < W + 2 * h; ++j) rcol[j] = reflect(j - h, W);
#pragma omp parallel num_threads(nthreads)
  {
    std::vector<T> tmp(HW), padrow(W + 2 * h);
#pragma omp for schedule(dynamic, 1)
    for (int64_t p = 0; p < P; ++p) {
      const T* xp = x + p * HW;
      T* op = out + p * HW;
      for (int64_t i = 0; i < H; ++i) {  // horizontal pass: tmp[i, j] = sum_t w[t] xpad[i, j + t]
        const T* xr = xp + i * W;
        for (int64_t j = 0; j < W + 2 * h; ++j) padrow[j] = xr[rcol[j]];
        T* tr = tmp.data() + i * W;
        std::fill(tr, tr + W, T(0));
        for (int t = 0; t < k; ++t) axpy(tr, padrow.data() + t, w[t], W);
      }
      for (int64_t i = 0; i < H; ++i) {  // vertical pass: out[i, :] = sum_t w[t] tmp[reflect(i + t - h), :]
        T* orow = op + i * W;
        std::fill(orow, orow + W, T(0));
        for (int t = 0; t < k; ++t) axpy(orow, tmp.data() + rrow[i + t] * W, w[t], W);
      }
    }
  }
}

#define PPFR_BLUR_INSTANTIATE(T)                                                                                   \
  template void median_blur_cpu<T>(const T*, T*, int64_t, int64_t, int64_t, int64_t, int, const uint8_t*,     \
                                   int);                                                                      \
  template void gaussian_blur_cpu<T>(const T*, T*, int64_t, int64_t, int64_t, const T*, int, int);

PPFR_BLUR_INSTANTIATE(float)
PPFR_BLUR_INSTANTIATE(double)

}  // namespace ppfr
