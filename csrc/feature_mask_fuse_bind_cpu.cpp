// Bindings of the feature-mask fusion CPU kernels (feature_mask_fuse_cpu.cpp) into ppfr._C. A pointer of 0 is
// nullptr (optional ROI, gradients not requested).
#include "feature_mask_fuse.h"
#include "registry.h"

namespace py = pybind11;
using ppfr::cptr;
using ppfr::mptr;
using ppfr::ptr_t;

template <typename T>
static void fwd(ptr_t h, ptr_t z, ptr_t roi, ptr_t w, ptr_t out, ptr_t mask, ptr_t k, int64_t B, int64_t C,
                int64_t Cz, int64_t HW, double eps, int nt) {
  ppfr::mask_fuse_fwd_cpu<T>(cptr<T>(h), cptr<T>(z), cptr<T>(roi), cptr<T>(w), mptr<T>(out), mptr<T>(mask),
                             mptr<T>(k), B, C, Cz, HW, eps, nt);
}

template <typename T>
static void bwd(ptr_t g, ptr_t h, ptr_t mask, ptr_t roi, ptr_t k, ptr_t w, ptr_t gh, ptr_t gz, ptr_t gw, int64_t B,
                int64_t C, int64_t Cz, int64_t HW, int nt) {
  ppfr::mask_fuse_bwd_cpu<T>(cptr<T>(g), cptr<T>(h), cptr<T>(mask), cptr<T>(roi), cptr<T>(k), cptr<T>(w),
                             mptr<T>(gh), mptr<T>(gz), mptr<T>(gw), B, C, Cz, HW, nt);
}

PPFR_BIND(feature_mask_fuse) {
  auto nogil = py::call_guard<py::gil_scoped_release>();
  m.def("mask_fuse_fwd", [](ptr_t h, ptr_t z, ptr_t roi, ptr_t w, ptr_t out, ptr_t mask, ptr_t k, int64_t B,
                            int64_t C, int64_t Cz, int64_t HW, double eps, bool dbl, int nt) {
    (dbl ? fwd<double> : fwd<float>)(h, z, roi, w, out, mask, k, B, C, Cz, HW, eps, nt);
  }, nogil);
  m.def("mask_fuse_bwd", [](ptr_t g, ptr_t h, ptr_t mask, ptr_t roi, ptr_t k, ptr_t w, ptr_t gh, ptr_t gz, ptr_t gw,
                            int64_t B, int64_t C, int64_t Cz, int64_t HW, bool dbl, int nt) {
    (dbl ? bwd<double> : bwd<float>)(g, h, mask, roi, k, w, gh, gz, gw, B, C, Cz, HW, nt);
  }, nogil);
  m.def("residual_fuse_fwd", [](ptr_t h, ptr_t a, ptr_t key, ptr_t out, int64_t B, int64_t N, bool dbl, int nt) {
    if (dbl)
      ppfr::residual_fuse_fwd_cpu<double>(cptr<double>(h), cptr<double>(a), cptr<double>(key), mptr<double>(out), B,
                                          N, nt);
    else
      ppfr::residual_fuse_fwd_cpu<float>(cptr<float>(h), cptr<float>(a), cptr<float>(key), mptr<float>(out), B, N,
                                         nt);
  }, nogil);
  m.def("residual_fuse_bwd", [](ptr_t g, ptr_t h, ptr_t a, ptr_t key, ptr_t gh, ptr_t ga, ptr_t gkey, int64_t B,
                                int64_t N, bool dbl, int nt) {
    if (dbl)
      ppfr::residual_fuse_bwd_cpu<double>(cptr<double>(g), cptr<double>(h), cptr<double>(a), cptr<double>(key),
                                          mptr<double>(gh), mptr<double>(ga), mptr<double>(gkey), B, N, nt);
    else
      ppfr::residual_fuse_bwd_cpu<float>(cptr<float>(g), cptr<float>(h), cptr<float>(a), cptr<float>(key),
                                         mptr<float>(gh), mptr<float>(ga), mptr<float>(gkey), B, N, nt);
  }, nogil);
}
