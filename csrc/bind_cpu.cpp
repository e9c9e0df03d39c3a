// pybind11 binding of the CPU kernels as `ppfr._C`. Torch-free on purpose: arguments are raw data pointers
// (tensor.data_ptr()) that ppfr/ops/*.py validates (device, dtype, contiguity, shapes) before calling, so
// this module compiles in seconds and cannot mismatch the torch ABI. The GIL is released while kernels run.
#include <pybind11/pybind11.h>

#include <cstdint>

#include "freq.h"

namespace py = pybind11;
using ptr_t = std::uintptr_t;

template <typename T>
static const T* cp(ptr_t p) { return reinterpret_cast<const T*>(p); }
template <typename T>
static T* mp(ptr_t p) { return reinterpret_cast<T*>(p); }

static void encode(ptr_t x, ptr_t out, int64_t B, int64_t H, int64_t W, int64_t K, ptr_t chan, ptr_t ridx,
                   ptr_t rw, ptr_t cidx, ptr_t cw, ptr_t affine, bool is_double, int nthreads) {
  if (is_double)
    ppfr::freq_encode_cpu<double>(cp<double>(x), mp<double>(out), B, H, W, K, cp<int64_t>(chan),
                                  cp<int32_t>(ridx), cp<double>(rw), cp<int32_t>(cidx), cp<double>(cw),
                                  cp<double>(affine), nthreads);
  else
    ppfr::freq_encode_cpu<float>(cp<float>(x), mp<float>(out), B, H, W, K, cp<int64_t>(chan), cp<int32_t>(ridx),
                                 cp<float>(rw), cp<int32_t>(cidx), cp<float>(cw), cp<float>(affine), nthreads);
}

static void decode(ptr_t f, ptr_t out, int64_t B, int64_t H, int64_t W, int64_t K, ptr_t src, ptr_t ridx,
                   ptr_t rw, ptr_t cidx, ptr_t cw, ptr_t affine, bool is_double, int nthreads) {
  if (is_double)
    ppfr::freq_decode_cpu<double>(cp<double>(f), mp<double>(out), B, H, W, K, cp<int64_t>(src),
                                  cp<int32_t>(ridx), cp<double>(rw), cp<int32_t>(cidx), cp<double>(cw),
                                  cp<double>(affine), nthreads);
  else
    ppfr::freq_decode_cpu<float>(cp<float>(f), mp<float>(out), B, H, W, K, cp<int64_t>(src), cp<int32_t>(ridx),
                                 cp<float>(rw), cp<int32_t>(cidx), cp<float>(cw), cp<float>(affine), nthreads);
}

static void hflip(ptr_t f, ptr_t out, int64_t B, int64_t K, int64_t H, int64_t W, ptr_t sign, bool is_double,
                  int nthreads) {
  if (is_double)
    ppfr::freq_hflip_cpu<double>(cp<double>(f), mp<double>(out), B, K, H, W, cp<float>(sign), nthreads);
  else
    ppfr::freq_hflip_cpu<float>(cp<float>(f), mp<float>(out), B, K, H, W, cp<float>(sign), nthreads);
}

PYBIND11_MODULE(_C, m) {
  m.doc() = "ppfr C++/OpenMP CPU kernels (raw-pointer interface; call through ppfr.ops)";
  auto nogil = py::call_guard<py::gil_scoped_release>();
  m.def("freq_encode", &encode, nogil);
  m.def("freq_decode", &decode, nogil);
  m.def("freq_hflip", &hflip, nogil);
#ifdef _OPENMP
  m.attr("openmp") = true;
#else
  m.attr("openmp") = false;
#endif
}
