// Bindings of the frequency-transform CPU kernels (freq_cpu.cpp) into ppfr._C.
#include "freq.h"
#include "registry.h"

namespace py = pybind11;
using ppfr::cptr;
using ppfr::mptr;
using ppfr::ptr_t;

PPFR_BIND(freq) {
  auto nogil = py::call_guard<py::gil_scoped_release>();
  m.def("freq_encode", [](ptr_t x, ptr_t out, int64_t B, int64_t H, int64_t W, int64_t K, ptr_t chan, ptr_t ridx,
                          ptr_t rw, ptr_t cidx, ptr_t cw, ptr_t affine, bool is_double, int nthreads) {
    if (is_double)
      ppfr::freq_encode_cpu<double>(cptr<double>(x), mptr<double>(out), B, H, W, K, cptr<int64_t>(chan),
                                    cptr<int32_t>(ridx), cptr<double>(rw), cptr<int32_t>(cidx), cptr<double>(cw),
                                    cptr<double>(affine), nthreads);
    else
      ppfr::freq_encode_cpu<float>(cptr<float>(x), mptr<float>(out), B, H, W, K, cptr<int64_t>(chan),
                                   cptr<int32_t>(ridx), cptr<float>(rw), cptr<int32_t>(cidx), cptr<float>(cw),
                                   cptr<float>(affine), nthreads);
  }, nogil);
  m.def("freq_decode", [](ptr_t f, ptr_t out, int64_t B, int64_t H, int64_t W, int64_t K, ptr_t src, ptr_t ridx,
                          ptr_t rw, ptr_t cidx, ptr_t cw, ptr_t affine, bool is_double, int nthreads) {
    if (is_double)
      ppfr::freq_decode_cpu<double>(cptr<double>(f), mptr<double>(out), B, H, W, K, cptr<int64_t>(src),
                                    cptr<int32_t>(ridx), cptr<double>(rw), cptr<int32_t>(cidx), cptr<double>(cw),
                                    cptr<double>(affine), nthreads);
    else
      ppfr::freq_decode_cpu<float>(cptr<float>(f), mptr<float>(out), B, H, W, K, cptr<int64_t>(src),
                                   cptr<int32_t>(ridx), cptr<float>(rw), cptr<int32_t>(cidx), cptr<float>(cw),
                                   cptr<float>(affine), nthreads);
  }, nogil);
  m.def("freq_hflip", [](ptr_t f, ptr_t out, int64_t B, int64_t K, int64_t H, int64_t W, ptr_t sign,
                         bool is_double, int nthreads) {
    if (is_double)
      ppfr::freq_hflip_cpu<double>(cptr<double>(f), mptr<double>(out), B, K, H, W, cptr<float>(sign), nthreads);
    else
      ppfr::freq_hflip_cpu<float>(cptr<float>(f), mptr<float>(out), B, K, H, W, cptr<float>(sign), nthreads);
  }, nogil);
}
