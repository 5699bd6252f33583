"""The exact MM-Rec core recurrence, per head:

    h_t = z_t * sigmoid(h_{t-1} W_g + b_g) + exp(log_gamma_t) * h_{t-1}

with h_{t-1} W_g a row vector times a [d, d] matrix (W_g is [H, d, d], block diagonal over
heads). The gate depends on h_{t-1}, so the recurrence is nonlinear and runs step by step.

This module is the public dispatcher: it checks the arguments, fills in the defaults (zero bias,
zero initial state) and hands the work to a backend of `mm_rec.ops.recurrence`: "torch" (a loop
of batched matmuls whose backward is a hand-written reverse loop, so memory is O(B*T*H*d) rather
than a T-step autograd graph), "triton" (the fused kernels), "cuda" (the CUDA C++ kernels of
`mm_rec.cuda`, one head's step spread over a Hopper thread-block cluster; head dims 32, 64, 128,
fp32 accumulation: everything else, and a machine where they cannot be built, runs what "auto"
runs), "sequential" (float64 loop through autograd: the oracle), and "auto" (Triton on CUDA, torch
elsewhere).
"""

from __future__ import annotations

import torch

from mm_rec.ops import BACKENDS, compute_dtype, cuda_kernels_available, triton_available
from mm_rec.ops.recurrence import MMRecRecurrence, recurrence_sequential, recurrence_step

__all__ = ["MMRecRecurrence", "mmrec_recurrence", "mmrec_recurrence_step"]


def mmrec_recurrence(
    z: torch.Tensor,
    log_gamma: torch.Tensor,
    W_g: torch.Tensor,
    b_g: torch.Tensor | None = None,
    initial_state: torch.Tensor | None = None,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the core recurrence.

    Args:
        z: [B, T, H, d] recurrence input.
        log_gamma: [B, T, H, d] log decay (<= 0; the caller clamps it).
        W_g: [H, d, d] gate weights (row vector times matrix); b_g: [H, d] or None.
        initial_state: [B, H, d] h_0, or None for zeros.

    Returns:
        h: [B, T, H, d] all states, in z's dtype.
        h_last: [B, H, d] the final state in the accumulation dtype (fp32 or float64).
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if z.dim() != 4 or z.shape[1] == 0:
        raise ValueError(f"z must be [B, T, H, d] with T >= 1, got {tuple(z.shape)}")
    B, T, H, d = z.shape
    if log_gamma.shape != z.shape:
        raise ValueError(f"log_gamma {tuple(log_gamma.shape)} must match z {tuple(z.shape)}")
    if W_g.shape != (H, d, d):
        raise ValueError(f"W_g {tuple(W_g.shape)} must be {(H, d, d)}")
    if b_g is not None and b_g.shape != (H, d):
        raise ValueError(f"b_g {tuple(b_g.shape)} must be {(H, d)}")
    if initial_state is not None and initial_state.shape != (B, H, d):
        raise ValueError(f"initial_state {tuple(initial_state.shape)} must be {(B, H, d)}")
    acc = compute_dtype(z, log_gamma, W_g, initial_state)
    if b_g is None:
        b_g = torch.zeros(H, d, device=z.device, dtype=acc)
    if initial_state is None:
        initial_state = torch.zeros(B, H, d, device=z.device, dtype=acc)
    if backend == "cuda":
        from mm_rec.ops.recurrence import cuda_ops  # registers the operators on first use

        if cuda_ops.covers(z, log_gamma, W_g, b_g, initial_state) and cuda_kernels_available():
            return cuda_ops.recurrence_cuda(z, log_gamma, W_g, b_g, initial_state)
        backend = "auto"  # not built here (load_extension said why), float64, other head dims or CPU tensors
    if backend == "auto":
        backend = "triton" if z.is_cuda and triton_available() else "torch"

    if backend == "triton":
        from mm_rec.ops.recurrence.triton_kernels import recurrence_triton  # needs Triton: imported on first use

        return recurrence_triton(z, log_gamma, W_g, b_g, initial_state)
    if backend == "sequential":
        h = recurrence_sequential(z, log_gamma, W_g, b_g, initial_state)
        return h.to(z.dtype), h[:, -1].to(acc)

    to_loop = lambda x: x.to(acc).permute(1, 2, 0, 3).contiguous()  # [B,T,H,d] -> [T,H,B,d]
    states = MMRecRecurrence.apply(
        to_loop(z), to_loop(log_gamma), W_g.to(acc), b_g.to(acc).unsqueeze(1),
        initial_state.to(acc).transpose(0, 1).contiguous(),
    )
    h = states.permute(2, 0, 1, 3)  # [T,H,B,d] -> [B,T,H,d]
    return h.to(z.dtype), h[:, -1]


def mmrec_recurrence_step(z: torch.Tensor, log_gamma: torch.Tensor, W_g: torch.Tensor, b_g: torch.Tensor,
                          h: torch.Tensor) -> torch.Tensor:
    """One token of the recurrence (decoding): z, log_gamma, h [B, H, d] -> h_t [B, H, d] in the
    accumulation dtype (fp32 or float64), the same step as the torch backend's loop. Shapes are
    the caller's contract (no checks: this runs once per token and layer, inside CUDA graphs)."""
    acc = compute_dtype(z, log_gamma, W_g, h)
    head_major = lambda x: x.to(acc).transpose(0, 1)  # [B, H, d] -> [H, B, d]
    h_t = recurrence_step(head_major(h), head_major(z), head_major(log_gamma).exp(), W_g.to(acc),
                          b_g.to(acc).unsqueeze(1))
    return h_t.transpose(0, 1)
