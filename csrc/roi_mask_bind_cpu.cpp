// Binding of the ROI-mask CPU kernel (roi_mask_cpu.cpp) into ppfr._C.
#include <stdexcept>
#include <string>

#include "registry.h"
#include "roi_mask.h"

namespace py = pybind11;
using ppfr::cptr;
using ppfr::mptr;
using ppfr::ptr_t;

PPFR_BIND(roi_mask) {
  m.def("roi_mask", [](ptr_t landmarks, ptr_t out, int64_t B, int64_t P, int64_t H, int64_t W, int out_kind,
                       int nthreads) {
    if (B < 0 || P < 1 || H < 1 || W < 1)
      throw std::invalid_argument("roi_mask: need B >= 0, P >= 1, H >= 1, W >= 1");
    if (out_kind != ppfr::kRoiMaskU8 && out_kind != ppfr::kRoiMaskF32 && out_kind != ppfr::kRoiMaskF64)
      throw std::invalid_argument("roi_mask: unknown output kind " + std::to_string(out_kind));
    const double* lm = cptr<double>(landmarks);
    py::gil_scoped_release nogil;
    switch (out_kind) {
      case ppfr::kRoiMaskU8: ppfr::roi_mask_cpu<uint8_t>(lm, mptr<uint8_t>(out), B, P, H, W, nthreads); break;
      case ppfr::kRoiMaskF32: ppfr::roi_mask_cpu<float>(lm, mptr<float>(out), B, P, H, W, nthreads); break;
      case ppfr::kRoiMaskF64: ppfr::roi_mask_cpu<double>(lm, mptr<double>(out), B, P, H, W, nthreads); break;
      default: break;  // rejected above, before the GIL was released
    }
  });
}
