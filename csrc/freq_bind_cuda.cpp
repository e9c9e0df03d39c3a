// Bindings of the frequency-transform CUDA kernels (freq_cuda.cu) into ppfr._C_cuda.
// Each launch runs on `device` (the tensors' CUDA device index; -1: the device owning the output) and on
// `stream` (a cudaStream_t on that device, e.g. torch.cuda.current_stream(dev).cuda_stream).
#include "cuda_check.h"
#include "cuda_guard.h"
#include "freq.h"
#include "registry.h"

namespace py = pybind11;
using ppfr::cptr;
using ppfr::mptr;
using ppfr::ptr_t;

PPFR_BIND(freq_cuda) {
  auto nogil = py::call_guard<py::gil_scoped_release>();
  m.def("freq_encode", [](ptr_t x, ptr_t out, int64_t B, int64_t H, int64_t W, int64_t K, ptr_t chan, ptr_t ridx,
                          ptr_t rw, ptr_t cidx, ptr_t cw, ptr_t affine, ptr_t stream, int device) {
    const char* what = "freq_encode_cuda";
    const int dev = ppfr::resolve_device(device, {cptr<void>(out), cptr<void>(x)}, what);
    const ppfr::CudaDeviceGuard guard(dev, what);
    ppfr::cuda_check(ppfr::freq_encode_cuda(cptr<float>(x), mptr<float>(out), B, H, W, K, cptr<int64_t>(chan),
                                            cptr<int32_t>(ridx), cptr<float>(rw), cptr<int32_t>(cidx),
                                            cptr<float>(cw), cptr<float>(affine), reinterpret_cast<void*>(stream)),
                     what);
  }, py::arg("x"), py::arg("out"), py::arg("B"), py::arg("H"), py::arg("W"), py::arg("K"), py::arg("chan"),
     py::arg("ridx"), py::arg("rw"), py::arg("cidx"), py::arg("cw"), py::arg("affine"), py::arg("stream"),
     py::arg("device") = -1, nogil);
  m.def("freq_decode", [](ptr_t f, ptr_t out, int64_t B, int64_t H, int64_t W, int64_t K, ptr_t src, ptr_t ridx,
                          ptr_t rw, ptr_t cidx, ptr_t cw, ptr_t affine, ptr_t stream, int device) {
    const char* what = "freq_decode_cuda";
    const int dev = ppfr::resolve_device(device, {cptr<void>(out), cptr<void>(f)}, what);
    const ppfr::CudaDeviceGuard guard(dev, what);
    ppfr::cuda_check(ppfr::freq_decode_cuda(cptr<float>(f), mptr<float>(out), B, H, W, K, cptr<int64_t>(src),
                                            cptr<int32_t>(ridx), cptr<float>(rw), cptr<int32_t>(cidx),
                                            cptr<float>(cw), cptr<float>(affine), reinterpret_cast<void*>(stream)),
                     what);
  }, py::arg("f"), py::arg("out"), py::arg("B"), py::arg("H"), py::arg("W"), py::arg("K"), py::arg("src"),
     py::arg("ridx"), py::arg("rw"), py::arg("cidx"), py::arg("cw"), py::arg("affine"), py::arg("stream"),
     py::arg("device") = -1, nogil);
}
