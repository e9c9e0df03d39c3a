// Feature-mask fusion kernels (METHODS.md §3.3 DuetFace interactive block, §6.4 PRO-Face C compensation).
// Torch-free; semantics and the reference formulation in ppfr/ops/feature_mask_fuse.py.
#pragma once
#include <cstdint>

namespace ppfr {

// DuetFace, per sample b (HW = H*W pixels):
//   m = mean_c z[b, :, p];  m1 = (m - min m) / max(max m - min m, eps)
//   roi given: m2 = m1 * roi[b, p]; mask = (m2 - min m2) / max(max m2 - min m2, eps); else mask = m1
//   out[b, c, p] = sigmoid(h[b, c, p]) * (1 + w * mask[b, p])
// kscale[b] = d(mask)/d(m) / roi (the min/max are constants, as the reference's .item() makes them).
template <typename T>
void mask_fuse_fwd_cpu(const T* h, const T* z, const T* roi, const T* w, T* out, T* mask, T* kscale, int64_t B,
                       int64_t C, int64_t Cz, int64_t HW, double eps, int nthreads);

// Backward: gh (B,C,HW); gz (B,Cz,HW) or nullptr; gw_b (B,) per-sample partial sums of dL/dw.
template <typename T>
void mask_fuse_bwd_cpu(const T* g, const T* h, const T* mask, const T* roi, const T* kscale, const T* w, T* gh, T* gz,
                       T* gw_b, int64_t B, int64_t C, int64_t Cz, int64_t HW, int nthreads);

// PRO-Face C: out = h + sigmoid(h) * a * key, key (N) broadcast over the batch, N = C*H*W.
template <typename T>
void residual_fuse_fwd_cpu(const T* h, const T* a, const T* key, T* out, int64_t B, int64_t N, int nthreads);

// Backward: gh, ga (B,N); gkey (N) = sum_b g * sigmoid(h) * a. ga/gkey may be nullptr.
template <typename T>
void residual_fuse_bwd_cpu(const T* g, const T* h, const T* a, const T* key, T* gh, T* ga, T* gkey, int64_t B,
                           int64_t N, int nthreads);

}  // namespace ppfr
