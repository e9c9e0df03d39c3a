// Bindings of the blur CPU kernels (blur_cpu.cpp) into ppfr._C. Python (ppfr/ops/blur.py) validates device,
// dtype, contiguity and shapes before passing raw pointers.
#include "blur.h"
#include "registry.h"

namespace py = pybind11;
using ppfr::cptr;
using ppfr::mptr;
using ppfr::ptr_t;

PPFR_BIND(blur) {
  auto nogil = py::call_guard<py::gil_scoped_release>();
  m.def("median_blur", [](ptr_t x, ptr_t out, int64_t B, int64_t C, int64_t H, int64_t W, int k, ptr_t mask,
                          bool is_double, int nthreads) {
    const uint8_t* mk = mask ? ppfr::cptr<uint8_t>(mask) : nullptr;
    if (is_double)
      ppfr::median_blur_cpu<double>(cptr<double>(x), mptr<double>(out), B, C, H, W, k, mk, nthreads);
    else
      ppfr::median_blur_cpu<float>(cptr<float>(x), mptr<float>(out), B, C, H, W, k, mk, nthreads);
  }, nogil);
  m.def("gaussian_blur", [](ptr_t x, ptr_t out, int64_t P, int64_t H, int64_t W, ptr_t w, int k, bool is_double,
                            int nthreads) {
    if (is_double)
      ppfr::gaussian_blur_cpu<double>(cptr<double>(x), mptr<double>(out), P, H, W, cptr<double>(w), k, nthreads);
    else
      ppfr::gaussian_blur_cpu<float>(cptr<float>(x), mptr<float>(out), P, H, W, cptr<float>(w), k, nthreads);
  }, nogil);
}
