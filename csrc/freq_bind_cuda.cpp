// Bindings of the frequency-transform CUDA kernels (freq_cuda.cu) into ppfr._C_cuda.
#include "cuda_check.h"
#include "freq.h"
#include "registry.h"

namespace py = pybind11;
using ppfr::cptr;
using ppfr::mptr;
using ppfr::ptr_t;

PPFR_BIND(freq_cuda) {
  auto nogil = py::call_guard<py::gil_scoped_release>();
  m.def("freq_encode", [](ptr_t x, ptr_t out, int64_t B, int64_t H, int64_t W, int64_t K, ptr_t chan, ptr_t ridx,
                          ptr_t rw, ptr_t cidx, ptr_t cw, ptr_t affine, ptr_t stream) {
    ppfr::cuda_check(ppfr::freq_encode_cuda(cptr<float>(x), mptr<float>(out), B, H, W, K, cptr<int64_t>(chan),
                                            cptr<int32_t>(ridx), cptr<float>(rw), cptr<int32_t>(cidx),
                                            cptr<float>(cw), cptr<float>(affine), reinterpret_cast<void*>(stream)),
                     "freq_encode_cuda");
  }, nogil);
  m.def("freq_decode", [](ptr_t f, ptr_t out, int64_t B, int64_t H, int64_t W, int64_t K, ptr_t src, ptr_t ridx,
                          ptr_t rw, ptr_t cidx, ptr_t cw, ptr_t affine, ptr_t stream) {
    ppfr::cuda_check(ppfr::freq_decode_cuda(cptr<float>(f), mptr<float>(out), B, H, W, K, cptr<int64_t>(src),
                                            cptr<int32_t>(ridx), cptr<float>(rw), cptr<int32_t>(cidx),
                                            cptr<float>(cw), cptr<float>(affine), reinterpret_cast<void*>(stream)),
                     "freq_decode_cuda");
  }, nogil);
}
