// The `ppfr._C_cuda` module: CUDA kernels. Bindings register themselves (registry.h). Launch errors
// (including "no driver" on a GPU-less machine) surface as RuntimeError.
#include <cuda_runtime.h>

#include "registry.h"

PYBIND11_MODULE(_C_cuda, m) {
  m.doc() = "ppfr CUDA kernels (raw-pointer interface; call through ppfr.ops)";
  m.def("device_count", [] {
    int n = 0;
    return cudaGetDeviceCount(&n) == cudaSuccess ? n : 0;
  });
  for (auto& [name, bind] : ppfr::binders()) bind(m);
}
