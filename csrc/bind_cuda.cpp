// pybind11 binding of the CUDA kernels as `ppfr._C_cuda` (torch-free; raw pointers and a cudaStream_t).
// Launch errors (including "no device" on a GPU-less machine) surface as RuntimeError.
#include <pybind11/pybind11.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "freq.h"

namespace py = pybind11;
using ptr_t = std::uintptr_t;

static void check(int err, const char* what) {
  if (err != 0) throw std::runtime_error(std::string(what) + ": " + ppfr::cuda_error_string(err));
}

static void encode(ptr_t x, ptr_t out, int64_t B, int64_t H, int64_t W, int64_t K, ptr_t chan, ptr_t ridx,
                   ptr_t rw, ptr_t cidx, ptr_t cw, ptr_t affine, ptr_t stream) {
  check(ppfr::freq_encode_cuda(reinterpret_cast<const float*>(x), reinterpret_cast<float*>(out), B, H, W, K,
                               reinterpret_cast<const int64_t*>(chan), reinterpret_cast<const int32_t*>(ridx),
                               reinterpret_cast<const float*>(rw), reinterpret_cast<const int32_t*>(cidx),
                               reinterpret_cast<const float*>(cw), reinterpret_cast<const float*>(affine),
                               reinterpret_cast<void*>(stream)),
        "freq_encode_cuda");
}

static void decode(ptr_t f, ptr_t out, int64_t B, int64_t H, int64_t W, int64_t K, ptr_t src, ptr_t ridx,
                   ptr_t rw, ptr_t cidx, ptr_t cw, ptr_t affine, ptr_t stream) {
  check(ppfr::freq_decode_cuda(reinterpret_cast<const float*>(f), reinterpret_cast<float*>(out), B, H, W, K,
                               reinterpret_cast<const int64_t*>(src), reinterpret_cast<const int32_t*>(ridx),
                               reinterpret_cast<const float*>(rw), reinterpret_cast<const int32_t*>(cidx),
                               reinterpret_cast<const float*>(cw), reinterpret_cast<const float*>(affine),
                               reinterpret_cast<void*>(stream)),
        "freq_decode_cuda");
}

PYBIND11_MODULE(_C_cuda, m) {
  m.doc() = "ppfr CUDA kernels (raw-pointer interface; call through ppfr.ops)";
  m.def("freq_encode", &encode, py::call_guard<py::gil_scoped_release>());
  m.def("freq_decode", &decode, py::call_guard<py::gil_scoped_release>());
  m.def("device_count", &ppfr::cuda_device_count);
}
