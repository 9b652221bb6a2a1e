// Reading and writing NumPy .npy files (format versions 1-3, C order, little-endian) as tensors.
#pragma once

#include <ATen/core/Tensor.h>

#include <string>

namespace scalearn_fast {

// The array in `path` as a CPU tensor of its dtype: int64, int32, float32, float16 or float64
// ('<i8', '<i4', '<f4', '<f2', '<f8'). Throws std::runtime_error naming the file on any other
// dtype, Fortran order, a bad header or a short file.
at::Tensor read_npy(const std::string& path);

// Write `tensor` (moved to the CPU, made contiguous) to `path` as a version 1.0 .npy file.
// bfloat16 is written as float32 (NumPy has no bfloat16); bool as '|b1'.
void write_npy(const std::string& path, const at::Tensor& tensor);

}  // namespace scalearn_fast
