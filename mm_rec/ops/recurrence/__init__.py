"""The exact core recurrence h_t = z_t * sigmoid(h_{t-1} W_g + b_g) + exp(log_gamma_t) * h_{t-1}.

    reference.py        torch backend (`MMRecRecurrence`, hand-written backward) and float64 loop
    triton_kernels.py   fused Triton kernels and the `mm_rec::recurrence_fwd` / `_bwd` operators
                        (imported on demand: needs Triton)
    cuda_ops.py         the CUDA kernels of mm_rec/cuda (recurrence_kernel.cu) as the
                        `mm_rec::cuda_recurrence_fwd` / `_bwd` operators (backend "cuda")

Public entry point, with argument checks and backend choice: `mm_rec.core.recurrence`.
Tests: tests/ops/recurrence/.
"""

from mm_rec.ops.recurrence.reference import MMRecRecurrence, recurrence_sequential, recurrence_step

__all__ = ["MMRecRecurrence", "backward_flops", "forward_flops", "recurrence_sequential", "recurrence_step"]


def forward_flops(B: int, T: int, H: int, d: int) -> int:
    """FLOPs of the forward's math on z [B, T, H, d]: h_{t-1} W_g, a [d] x [d, d] product for
    every step, row and head. Element-wise work counts zero, as in FlopCounterMode (which finds
    the same count in the torch backend's batched matmuls)."""
    return 2 * B * T * H * d * d


def backward_flops(B: int, T: int, H: int, d: int) -> int:
    """FLOPs of the backward's math: the reverse product with W_g^T and dW_g, each the size of
    the forward's product."""
    return 2 * forward_flops(B, T, H, d)
