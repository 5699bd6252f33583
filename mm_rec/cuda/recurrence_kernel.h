// Host interface of the CUDA core recurrence (recurrence_kernel.cu), free of PyTorch so that the
// kernel file compiles with nvcc alone. The binding (binding.cpp) checks tensors and fills these.
//
//   h_t = z_t * sigmoid(h_{t-1} W_g + b_g) + exp(log_gamma_t) * h_{t-1}   per (batch row, head)
//
// Layout: z, log_gamma, h, dh, dz, d log_gamma, gate, states and dp are [B, T, H, D] contiguous;
// W [H, D, D] (row vector times matrix), bias [H, D], h0 / h_last / dh_last / dp0 / db / dh0
// [B, H, D] contiguous. z, log_gamma, h and dh may each be fp32, bf16 or fp16 (read and written
// in their own dtypes); everything else is fp32, as is the accumulation.
//
// Work split (details in recurrence_kernel.cu): one thread-block cluster of `cluster_size` CTAs
// per (batch row, head); CTA r of the cluster owns the D / cluster_size output columns
// [r D / cs, (r + 1) D / cs), keeps its slice of W_g in registers and sends its part of each new
// state to every CTA of the cluster through distributed shared memory.
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

#include "dtype.h"

namespace mmrec_cuda {

struct RecurrenceShape {
    int64_t B, T, H, D;
};

struct RecurrenceFwdArgs {
    RecurrenceShape shape;
    const void* z;          // [B, T, H, D], dtype z_dtype
    DType z_dtype;          // also the dtype of h
    const void* log_gamma;  // [B, T, H, D], dtype lg_dtype
    DType lg_dtype;
    const float* W;         // [H, D, D]
    const float* bias;      // [H, D]
    const float* h0;        // [B, H, D]
    void* h;                // out: [B, T, H, D] in z_dtype
    float* h_last;          // out: [B, H, D]
    float* gate;            // out: [B, T, H, D] s_t = sigmoid(h_{t-1} W + b)
    float* states;          // out: [B, T, H, D] the fp32 states, or nullptr (z fp32: h is the state)
};

struct RecurrenceBwdArgs {
    RecurrenceShape shape;
    const void* dh;         // [B, T, H, D], dtype dh_dtype
    DType dh_dtype;
    const float* dh_last;   // [B, H, D]
    const void* z;          // the forward's inputs
    DType z_dtype;          // also the dtype of dz
    const void* log_gamma;
    DType lg_dtype;         // also the dtype of d log_gamma
    const float* W;         // [H, D, D] (not transposed: the kernel reads W^T's columns as W's rows)
    const float* gate;      // the forward's gate [B, T, H, D]
    const float* states;    // the forward's fp32 states [B, T, H, D] (h itself when z is fp32)
    const float* h0;        // [B, H, D]
    void* dz;               // out: [B, T, H, D] in z_dtype
    void* dlg;              // out: [B, T, H, D] in lg_dtype
    float* dp;              // out: [B, T, H, D], row t holds dp_{t+1} (row T-1: zeros), so that
                            //      dW = states^T dp + h0^T dp0 needs no shifted copy of the states
    float* dp0;             // out: [B, H, D] dp_0
    float* db;              // out: [B, H, D] sum over t of dp_t (db_g = its sum over B)
    float* dh0;             // out: [B, H, D]
};

// Head dims built (32, 64, 128) and cluster sizes (1, 2, 4).
bool recurrence_supported(int64_t D, int cluster_size);

// The cluster size used for cluster_size = 0: the largest of 4, 2 whose B*H*cs CTAs fit on the
// `sm_count` multiprocessors, else 1.
int recurrence_default_cluster_size(int64_t programs, int64_t D, int sm_count);

// How many clusters of this kernel can be resident at once (cudaOccupancyMaxActiveClusters; for
// cluster_size 1, blocks per multiprocessor times the multiprocessors); < 0 on error. Diagnostic.
int recurrence_max_active_clusters(int64_t D, int cluster_size, bool forward, int sm_count);

// Launch on `stream`; cluster_size must be supported (cudaErrorInvalidValue otherwise).
cudaError_t recurrence_forward(const RecurrenceFwdArgs& args, int cluster_size, cudaStream_t stream);
cudaError_t recurrence_backward(const RecurrenceBwdArgs& args, int cluster_size, cudaStream_t stream);

}  // namespace mmrec_cuda
