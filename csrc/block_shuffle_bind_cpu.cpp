// Bindings of the PRO-Face C feature-protection CPU kernels (block_shuffle_cpu.cpp) into ppfr._C.
#include "block_shuffle.h"
#include "registry.h"

namespace py = pybind11;
using ppfr::cptr;
using ppfr::mptr;
using ppfr::ptr_t;

PPFR_BIND(block_shuffle) {
  auto nogil = py::call_guard<py::gil_scoped_release>();
  m.def("block_shuffle", [](ptr_t x, ptr_t out, int64_t B, int64_t C, int64_t H, int64_t W, ptr_t perm, int64_t bh,
                            int64_t bw, bool is_double, int nthreads) {
    if (is_double)
      ppfr::block_shuffle_cpu<double>(cptr<double>(x), mptr<double>(out), B, C, H, W, cptr<int64_t>(perm), bh, bw,
                                      nthreads);
    else
      ppfr::block_shuffle_cpu<float>(cptr<float>(x), mptr<float>(out), B, C, H, W, cptr<int64_t>(perm), bh, bw,
                                     nthreads);
  }, nogil);
  m.def("prune", [](ptr_t x, ptr_t out, int64_t B, int64_t N, int64_t k, bool is_double, int nthreads) {
    if (is_double)
      ppfr::prune_cpu<double>(cptr<double>(x), mptr<double>(out), B, N, k, nthreads);
    else
      ppfr::prune_cpu<float>(cptr<float>(x), mptr<float>(out), B, N, k, nthreads);
  }, nogil);
  m.def("quantize", [](ptr_t x, ptr_t wire, ptr_t scales, int64_t B, int64_t C, int64_t N, int bits, int nthreads) {
    ppfr::quantize_cpu(cptr<float>(x), mptr<uint8_t>(wire), mptr<float>(scales), B, C, N, bits, nthreads);
  }, nogil);
  m.def("dequantize", [](ptr_t wire, ptr_t scales, ptr_t out, int64_t B, int64_t C, int64_t N, int bits,
                         int nthreads) {
    ppfr::dequantize_cpu(cptr<uint8_t>(wire), cptr<float>(scales), mptr<float>(out), B, C, N, bits, nthreads);
  }, nogil);
  m.def("shuffle_quantize", [](ptr_t x, ptr_t wire, ptr_t scales, int64_t B, int64_t C, int64_t H, int64_t W,
                               ptr_t perm, int64_t bh, int64_t bw, int64_t keep_k, int bits, int nthreads) {
    ppfr::shuffle_quantize_cpu(cptr<float>(x), mptr<uint8_t>(wire), mptr<float>(scales), B, C, H, W,
                               cptr<int64_t>(perm), bh, bw, keep_k, bits, nthreads);
  }, nogil);
  m.def("dequantize_unshuffle", [](ptr_t wire, ptr_t scales, ptr_t out, int64_t B, int64_t C, int64_t H, int64_t W,
                                   ptr_t inv_perm, int64_t bh, int64_t bw, int bits, int nthreads) {
    ppfr::dequantize_unshuffle_cpu(cptr<uint8_t>(wire), cptr<float>(scales), mptr<float>(out), B, C, H, W,
                                   cptr<int64_t>(inv_perm), bh, bw, bits, nthreads);
  }, nogil);
}
