// DuetFace ROI mask from landmarks (METHODS.md §3.4): torch-free declarations of the CPU kernel
// (roi_mask_cpu.cpp) and its pybind11 binding. Semantics: ppfr/ops/roi_mask.py (module docstring).
//
// landmarks: (B, P, 2) float64, contiguous, canonical (finite, |v| <= 2^100, |v| < 2^-100 already
//            flushed to 0 by the Python side): x = column, y = row, in pixels.
// out:       (B, H, W) contiguous (the (B, 1, H, W) tensor): 1 where the integer grid point (x = j, y = i)
//            lies in the closed convex hull of the sample's points (exact), else 0.
#pragma once
#include <cstdint>

namespace ppfr {

// Output element types the kernel writes directly (uint8 also serves torch.bool: 0x00 / 0x01 bytes).
enum RoiMaskOut : int { kRoiMaskU8 = 0, kRoiMaskF32 = 1, kRoiMaskF64 = 2 };

template <typename T>
void roi_mask_cpu(const double* landmarks, T* out, int64_t B, int64_t P, int64_t H, int64_t W, int nthreads);

}  // namespace ppfr
