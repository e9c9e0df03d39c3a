// Host-side error helper for the CUDA bindings (torch-free).
#pragma once
#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

namespace ppfr {
inline void cuda_check(int err, const char* what) {
  if (err != 0) throw std::runtime_error(std::string(what) + ": " + cudaGetErrorString(static_cast<cudaError_t>(err)));
}
}  // namespace ppfr
