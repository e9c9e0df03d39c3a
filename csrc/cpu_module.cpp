// The `ppfr._C` module: C++/OpenMP CPU kernels. Bindings register themselves (registry.h).
#include "registry.h"

PYBIND11_MODULE(_C, m) {
  m.doc() = "ppfr C++/OpenMP CPU kernels (raw-pointer interface; call through ppfr.ops)";
  for (auto& [name, bind] : ppfr::binders()) bind(m);
#ifdef _OPENMP
  m.attr("openmp") = true;
#else
  m.attr("openmp") = false;
#endif
}
