// Bindings of the blur CUDA kernels (blur_cuda.cu) into ppfr._C_cuda.
// Each launch runs on `device` (the tensors' CUDA device index; -1: the device owning the output) and on
// `stream` (a cudaStream_t on that device, e.g. torch.cuda.current_stream(dev).cuda_stream).
#include "blur.h"
#include "cuda_check.h"
#include "cuda_guard.h"
#include "registry.h"

namespace py = pybind11;
using ppfr::cptr;
using ppfr::mptr;
using ppfr::ptr_t;

PPFR_BIND(blur_cuda) {
  auto nogil = py::call_guard<py::gil_scoped_release>();
  m.def("median_blur", [](ptr_t x, ptr_t out, int64_t B, int64_t C, int64_t H, int64_t W, int k, ptr_t mask,
                          ptr_t stream, int device) {
    const char* what = "median_blur_cuda";
    const int dev = ppfr::resolve_device(device, {cptr<void>(out), cptr<void>(x)}, what);
    if (mask) ppfr::resolve_device(dev, {cptr<void>(mask)}, what);
    const ppfr::CudaDeviceGuard guard(dev, what);
    const uint8_t* mk = mask ? cptr<uint8_t>(mask) : nullptr;
    ppfr::cuda_check(ppfr::median_blur_cuda(cptr<float>(x), mptr<float>(out), B, C, H, W, k, mk,
                                            reinterpret_cast<void*>(stream)),
                     what);
  }, py::arg("x"), py::arg("out"), py::arg("B"), py::arg("C"), py::arg("H"), py::arg("W"), py::arg("k"),
     py::arg("mask"), py::arg("stream"), py::arg("device") = -1, nogil);
}
