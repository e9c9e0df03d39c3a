// Self-registering pybind11 bindings, so that adding an op never edits a shared file: each
// `csrc/<op>_bind_cpu.cpp` (and `<op>_bind_cuda.cpp`) defines its functions in a PPFR_BIND block, and the module
// files (cpu_module.cpp, cuda_module.cpp) call every registered binder when Python imports the module.
#pragma once
#include <pybind11/pybind11.h>

#include <cstdint>
#include <utility>
#include <vector>

namespace ppfr {

using Binder = void (*)(pybind11::module_&);

inline std::vector<std::pair<const char*, Binder>>& binders() {
  static std::vector<std::pair<const char*, Binder>> registry;  // function-local: safe static-init order
  return registry;
}

struct RegisterBinder {
  RegisterBinder(const char* name, Binder fn) { binders().emplace_back(name, fn); }
};

// Pointers cross the boundary as integers (tensor.data_ptr()); Python validates device/dtype/shape first.
using ptr_t = std::uintptr_t;
template <typename T>
inline const T* cptr(ptr_t p) { return reinterpret_cast<const T*>(p); }
template <typename T>
inline T* mptr(ptr_t p) { return reinterpret_cast<T*>(p); }

}  // namespace ppfr

#define PPFR_BIND(name)                                                               \
  static void ppfr_bind_##name(pybind11::module_& m);                                 \
  static const ppfr::RegisterBinder ppfr_register_##name(#name, &ppfr_bind_##name);   \
  static void ppfr_bind_##name(pybind11::module_& m)
