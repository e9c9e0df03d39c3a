// Bindings of the blur CUDA kernels (blur_cuda.cu) into ppfr._C_cuda.
#include "blur.h"
#include "cuda_check.h"
#include "registry.h"

namespace py = pybind11;
using ppfr::cptr;
using ppfr::mptr;
using ppfr::ptr_t;

PPFR_BIND(blur_cuda) {
  auto nogil = py::call_guard<py::gil_scoped_release>();
  m.def("median_blur", [](ptr_t x, ptr_t out, int64_t B, int64_t C, int64_t H, int64_t W, int k, ptr_t mask,
                          ptr_t stream) {
    const uint8_t* mk = mask ? cptr<uint8_t>(mask) : nullptr;
    ppfr::cuda_check(ppfr::median_blur_cuda(cptr<float>(x), mptr<float>(out), B, C, H, W, k, mk,
                                            reinterpret_cast<void*>(stream)),
                     "median_blur_cuda");
  }, nogil);
}
