// Element types the CUDA kernels read and write (shared by scan_kernel.h and recurrence_kernel.h;
// free of PyTorch: the binding maps at::ScalarType onto it).
#pragma once

namespace mmrec_cuda {

enum class DType : int { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };

}  // namespace mmrec_cuda
