// C++/OpenMP CPU kernel of the DuetFace ROI mask (see roi_mask.h and ppfr/ops/roi_mask.py).
//
// Per image (one OpenMP task each): sort the points lexicographically, drop exact duplicates, build the
// strict convex hull with Andrew's monotone chain (CCW, collinear points dropped), then fill each row with
// the exact integer interval between the hull edges that cross it, clipped to the bounding box. Work per image
// is O(P log P + H * h) predicate evaluations plus the H * W output write. Nothing per pixel is tested.
//
// Exactness: every orientation sign is exact. A float64 filter with a rigorous error bound decides almost all
// of them; the rest (e.g. a grid point exactly on an edge) are summed exactly as 12 error-free product terms
// (grow-expansion). That is what makes this kernel bit-identical to the torch reference, which finds the
// hull by a different algorithm. The build uses -march=native and GCC contracts a*b + c into FMA even
// in -std=c++17 mode, which would break the error-free transforms. Products that feed additions therefore
// pass through `opaque()`, and product errors use an explicit std::fma.
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "roi_mask.h"

namespace ppfr {
namespace {

struct Pt {
  double x, y;
};

// Relative error bound of the filtered orientation (textbook bound (3 + 16 eps) eps ~ 3.3e-16, 3x margin).
constexpr double kOrientErr = 1e-15;

// Hides a value from the optimiser, so the multiplication producing it cannot be fused into a later addition.
inline double opaque(double v) {
  __asm__("" : "+m"(v));
  return v;
}

inline void two_sum(double a, double b, double& s, double& e) {
  s = a + b;
  const double bb = s - a;
  e = (a - (s - bb)) + (b - bb);
}

inline void two_prod(double a, double b, double& p, double& e) {
  p = opaque(a * b);
  e = std::fma(a, b, -p);  // exact: no underflow in the canonical domain
}

// Exact sign of orient(a, b, c) = bx cy - bx ay - ax cy - by cx + by ax + ay cx (the ax ay terms cancel).
int orient_exact(const Pt& a, const Pt& b, double cx, double cy) {
  double t[12];
  two_prod(b.x, cy, t[1], t[0]);
  two_prod(-b.x, a.y, t[3], t[2]);
  two_prod(-a.x, cy, t[5], t[4]);
  two_prod(-b.y, cx, t[7], t[6]);
  two_prod(b.y, a.x, t[9], t[8]);
  two_prod(a.y, cx, t[11], t[10]);
  // Grow-expansion with zero elimination: e stays non-overlapping, increasing in magnitude.
  double e[12];
  int m = 0;
  for (int k = 0; k < 12; ++k) {
    double q = t[k];
    int mm = 0;
    for (int i = 0; i < m; ++i) {
      double s, h;
      two_sum(q, e[i], s, h);
      q = s;
      if (h != 0.0) e[mm++] = h;
    }
    if (q != 0.0) e[mm++] = q;
    m = mm;
  }
  return m == 0 ? 0 : (e[m - 1] > 0.0 ? 1 : -1);
}

// Exact sign of orient(a, b, c): > 0 when c is left of a -> b (CCW, x right / y up convention).
inline int orient(const Pt& a, const Pt& b, double cx, double cy) {
  const double t1 = (b.x - a.x) * (cy - a.y);
  const double t2 = (b.y - a.y) * (cx - a.x);
  const double det = t1 - t2;
  const double bound = kOrientErr * (std::fabs(t1) + std::fabs(t2));
  if (det > bound) return 1;
  if (-det > bound) return -1;
  if (bound == 0.0) return 0;  // both products exactly 0
  return orient_exact(a, b, cx, cy);
}

inline bool lex_less(const Pt& p, const Pt& q) { return p.x < q.x || (p.x == q.x && p.y < q.y); }

// Strict convex hull in CCW order (Andrew's monotone chain on sorted, duplicate-free points).
// n == 1 -> {p}; collinear -> its two endpoints.
void monotone_chain(const std::vector<Pt>& pts, std::vector<Pt>& hull) {
  const size_t n = pts.size();
  hull.clear();
  if (n == 1) {
    hull.push_back(pts[0]);
    return;
  }
  for (size_t i = 0; i < n; ++i) {
    while (hull.size() >= 2 && orient(hull[hull.size() - 2], hull.back(), pts[i].x, pts[i].y) <= 0) hull.pop_back();
    hull.push_back(pts[i]);
  }
  const size_t lower = hull.size() + 1;
  for (size_t i = n - 1; i-- > 0;) {
    while (hull.size() >= lower && orient(hull[hull.size() - 2], hull.back(), pts[i].x, pts[i].y) <= 0)
      hull.pop_back();
    hull.push_back(pts[i]);
  }
  hull.pop_back();  // the first point again
}

// max{x in [a, b] : x == a || pred(x)} for pred true-then-false on (a, b]; `guess` is a float estimate of
// the change. A 3-wide window around it settles almost every case; otherwise binary search (huge coordinates).
template <class Pred>
int64_t last_true(const Pred& pred, int64_t a, int64_t b, double guess) {
  auto P = [&](int64_t x) { return x <= a ? true : (x > b ? false : pred(x)); };
  const int64_t k = static_cast<int64_t>(std::floor(std::min(std::max(guess, double(a)), double(b))));
  int64_t lo = a, hi = b + 1;  // invariant: P(lo) true, P(hi) false
  if (P(k)) {
    if (!P(k + 1)) return k;
    if (!P(k + 2)) return k + 1;
    lo = k + 2;
  } else {
    if (P(k - 1)) return k - 1;
    hi = k - 1;
  }
  while (hi - lo > 1) {
    const int64_t mid = lo + (hi - lo) / 2;
    if (P(mid)) lo = mid; else hi = mid;
  }
  return lo;
}

template <typename T>
void fill_row(T* row, int64_t W, int64_t lo, int64_t hi) {
  std::fill(row, row + W, T(0));
  if (lo <= hi) std::fill(row + lo, row + hi + 1, T(1));
}

template <typename T>
void one_image(const double* lm, T* out, int64_t P, int64_t H, int64_t W, std::vector<Pt>& pts,
               std::vector<Pt>& hull) {
  pts.resize(P);
  double xmin = lm[0], xmax = lm[0], ymin = lm[1], ymax = lm[1];
  for (int64_t k = 0; k < P; ++k) {
    pts[k] = {lm[2 * k], lm[2 * k + 1]};
    xmin = std::min(xmin, pts[k].x), xmax = std::max(xmax, pts[k].x);
    ymin = std::min(ymin, pts[k].y), ymax = std::max(ymax, pts[k].y);
  }
  std::sort(pts.begin(), pts.end(), lex_less);
  pts.erase(std::unique(pts.begin(), pts.end(), [](const Pt& p, const Pt& q) { return p.x == q.x && p.y == q.y; }),
            pts.end());
  monotone_chain(pts, hull);
  const size_t nh = hull.size();

  // Bounding box on the grid (clamped as doubles first: coordinates may be far outside int64).
  const int64_t x_lo = std::max<int64_t>(0, static_cast<int64_t>(std::ceil(std::min(std::max(xmin, -1.0), double(W)))));
  const int64_t x_hi =
      std::min<int64_t>(W - 1, static_cast<int64_t>(std::floor(std::min(std::max(xmax, -1.0), double(W)))));

  for (int64_t i = 0; i < H; ++i) {
    T* row = out + i * W;
    const double y = static_cast<double>(i);
    if (y < ymin || y > ymax || x_lo > x_hi) {
      fill_row(row, W, 0, -1);
      continue;
    }
    int64_t lo = x_lo, hi = x_hi;
    // Only edges whose closed y-span holds the row can cut it; horizontal edges never cut a row inside the
    // bbox (a horizontal hull edge lies on y = ymin or y = ymax).
    for (size_t e = 0; e < nh && nh >= 2 && lo <= hi; ++e) {
      const Pt& a = hull[e];
      const Pt& b = hull[e + 1 == nh ? 0 : e + 1];
      const double dy = b.y - a.y;
      if (dy == 0.0 || y < std::min(a.y, b.y) || y > std::max(a.y, b.y)) continue;
      const double est = a.x + (b.x - a.x) * (y - a.y) / dy;  // the edge line's crossing of this row
      if (dy > 0) {  // orient >= 0  <=>  x <= X*
        hi = last_true([&](int64_t x) { return orient(a, b, double(x), y) >= 0; }, lo - 1, hi, est);
      } else {  // orient >= 0  <=>  x >= X*: the last x with orient < 0, plus one
        lo = last_true([&](int64_t x) { return orient(a, b, double(x), y) < 0; }, lo - 1, hi, est) + 1;
      }
    }
    fill_row(row, W, lo, hi);
  }
}

}  // namespace

template <typename T>
void roi_mask_cpu(const double* landmarks, T* out, int64_t B, int64_t P, int64_t H, int64_t W, int nthreads) {
#pragma omp parallel num_threads(nthreads)
  {
    std::vector<Pt> pts, hull;
    pts.reserve(P);
    hull.reserve(2 * P + 1);
#pragma omp for schedule(dynamic, 4)
    for (int64_t b = 0; b < B; ++b) one_image(landmarks + b * P * 2, out + b * H * W, P, H, W, pts, hull);
  }
}

template void roi_mask_cpu<uint8_t>(const double*, uint8_t*, int64_t, int64_t, int64_t, int64_t, int);
template void roi_mask_cpu<float>(const double*, float*, int64_t, int64_t, int64_t, int64_t, int);
template void roi_mask_cpu<double>(const double*, double*, int64_t, int64_t, int64_t, int64_t, int);

}  // namespace ppfr
