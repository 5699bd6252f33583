// Host interface of the CUDA log-space scan (scan_kernel.cu), free of PyTorch so that the kernel
// file compiles with nvcc alone. The binding (binding.cpp) checks tensors and fills these structs.
//
//   h_t = exp(clamp(log_a_t, clamp_min, clamp_max)) * h_{t-1} + b_t   over t = 0..T-1, h_{-1} = h0
//
// Layout: b, h, dh, db and d_log_a are [B, T, D] contiguous. log_a is read through strides
// (batch, time, and a two-level channel index d = outer * channel_inner + inner), so a decay that
// is broadcast over trailing channels (stride 0) is never materialised. Accumulation is fp32.
#pragma once

#include <cstddef>
#include <cstdint>

#include <cuda_runtime.h>

#include "dtype.h"

namespace mmrec_cuda {

struct LogAView {
    const void* data;
    DType dtype;
    int64_t stride_batch, stride_time;
    int64_t stride_outer, stride_inner;  // element offset of channel d: (d / inner) * outer + (d % inner) * inner
    int64_t channel_inner;               // channels per outer index (D when log_a is [B, T, D])
};

struct ScanShape {
    int64_t B, T, D;
    float clamp_min, clamp_max;
};

struct ScanFwdArgs {
    ScanShape shape;
    LogAView log_a;
    const void* b;          // [B, T, D], dtype b_dtype
    DType b_dtype;          // also the dtype of h
    const float* h0;        // [B, D] fp32 or nullptr (zeros)
    void* h;                // out: [B, T, D]
    float* final_state;     // out: [B, D] fp32
};

struct ScanBwdArgs {
    ScanShape shape;
    LogAView log_a;         // the forward's log_a (clamped inside, as in the forward)
    const void* dh;         // [B, T, D], dtype h_dtype
    const float* d_final;   // [B, D] fp32 or nullptr
    const void* h;          // the forward's output [B, T, D]
    DType h_dtype;          // dtype of dh, h and db
    const float* h0;        // [B, D] fp32 or nullptr
    void* db;               // out: [B, T, D], dtype h_dtype
    void* d_log_a;          // out: [B, T, D] contiguous, dtype log_a.dtype (zero where the clamp was active)
    float* dh0;             // out: [B, D] fp32
};

// Scratch of one call: `workspace_ints` int32 that must be ZERO on entry (tile flags and the block
// counter) and `workspace_floats` fp32 of any content (the tiles' aggregates and prefixes).
struct Workspace {
    int* ints;
    float* floats;
};
size_t workspace_ints(int64_t B, int64_t T, int64_t D);
size_t workspace_floats(int64_t B, int64_t T, int64_t D);

// Launch on `stream`; returns cudaSuccess or the launch error (unsupported dtype pairs return
// cudaErrorInvalidValue: the binding only passes log_a fp32 or log_a.dtype == b.dtype).
cudaError_t scan_forward(const ScanFwdArgs& args, const Workspace& ws, cudaStream_t stream);
cudaError_t scan_backward(const ScanBwdArgs& args, const Workspace& ws, cudaStream_t stream);

}  // namespace mmrec_cuda
