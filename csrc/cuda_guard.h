// Device selection for the CUDA bindings (torch-free): every launch runs on the device that owns the caller's
// tensors and on the stream the caller passes, whatever device the calling thread has current.
//
// The CUDA runtime launches on the thread's current device. Python passes the tensors' device index (and
// torch's current stream on it); -1 means "the device that owns the output" (found with
// cudaPointerGetAttributes), so callers that pass no index are still launched in the right context.
#pragma once
#include <cuda_runtime.h>

#include <initializer_list>
#include <stdexcept>
#include <string>

#include "cuda_check.h"

namespace ppfr {

// The device owning `ptr`; throws std::invalid_argument (Python ValueError) for memory that is not CUDA device
// or managed memory, and std::runtime_error when CUDA cannot be queried (e.g. no driver).
inline int pointer_device(const void* ptr, const char* what) {
  cudaPointerAttributes attr{};
  cuda_check(static_cast<int>(cudaPointerGetAttributes(&attr, ptr)), what);
  if (attr.type != cudaMemoryTypeDevice && attr.type != cudaMemoryTypeManaged)
    throw std::invalid_argument(std::string(what) + ": a tensor is not in CUDA device memory");
  return attr.device;
}

// The device to launch on: `device` if >= 0, else the owner of the first non-null pointer, else the current
// device (an empty launch: null data pointers). Every non-null pointer must live on that device.
inline int resolve_device(int device, std::initializer_list<const void*> ptrs, const char* what) {
  for (const void* p : ptrs) {
    if (p == nullptr) continue;  // empty tensors have no storage
    const int d = pointer_device(p, what);
    if (device < 0) device = d;
    if (d != device)
      throw std::invalid_argument(std::string(what) + ": tensors on different CUDA devices (" + std::to_string(d) +
                                  " and " + std::to_string(device) + ")");
  }
  if (device < 0) cuda_check(static_cast<int>(cudaGetDevice(&device)), what);
  return device;
}

// RAII: make `device` current for the scope; the previous device is restored on exit (also on exceptions).
class CudaDeviceGuard {
 public:
  CudaDeviceGuard(int device, const char* what) {
    cuda_check(static_cast<int>(cudaGetDevice(&prev_)), what);
    if (device != prev_) {
      cuda_check(static_cast<int>(cudaSetDevice(device)), what);
      restore_ = true;
    }
  }
  ~CudaDeviceGuard() {
    if (restore_) cudaSetDevice(prev_);  // best effort: a destructor must not throw
  }
  CudaDeviceGuard(const CudaDeviceGuard&) = delete;
  CudaDeviceGuard& operator=(const CudaDeviceGuard&) = delete;

 private:
  int prev_ = 0;
  bool restore_ = false;
};

}  // namespace ppfr
