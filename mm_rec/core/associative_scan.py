"""Log-space associative scan of the linear recurrence h_t = exp(log_a_t) * h_{t-1} + b_t.

The pair operator (l1, b1) o (l2, b2) = (l1 + l2, exp(l2) * b1 + b2) is associative; its first
component is the log of the exponential product prod_i a_i. Rules (docs/architecture.md, section 2):

* log_a is clamped to [log_clamp_min, log_clamp_max] = [-50, 0] before anything else;
* accumulation is fp32 whatever the input dtype (float64 stays float64);
* cumulative sums of log_a are only ever chunk-local and are never subtracted from each other,
  so every exponent is <= 0 and no precision is lost to cancellation;
* gradients flow to `initial_state` and from `final_state`.

This module is the public dispatcher: it checks the arguments and hands the work to a backend of
`mm_rec.ops.scan`: "torch" (vectorised, chunked; CPU reference and fallback), "triton" (GPU
kernels), "cuda" (the single-pass CUDA C++ kernel), "sequential" (float64 Python loop, the test
oracle), and "auto" (Triton on CUDA tensors, torch otherwise). The GPU kernels clamp and cast
log_a inside and read a broadcast log_a in place (no copy before them); for the torch and
sequential backends the dispatcher casts and clamps.
"""

from __future__ import annotations

import math

import torch

from mm_rec.ops import BACKENDS, compute_dtype, cuda_kernels_available, triton_available
from mm_rec.ops.scan import AssociativeScanExponential, scan_sequential

__all__ = [
    "LOG_CLAMP_MAX", "LOG_CLAMP_MIN", "AssociativeScanExponential", "associative_scan_exponential",
    "associative_scan_step", "compute_dtype",
]

_CUDA_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

LOG_CLAMP_MIN = -50.0
LOG_CLAMP_MAX = 0.0


def associative_scan_exponential(
    log_a: torch.Tensor,
    b: torch.Tensor,
    initial_state: torch.Tensor | None = None,
    backend: str = "auto",
    log_clamp_min: float = LOG_CLAMP_MIN,
    log_clamp_max: float = LOG_CLAMP_MAX,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Solve h_t = exp(log_a_t) * h_{t-1} + b_t over dim 1.

    Args:
        log_a: [B, T, ...] log decays (any float dtype; clamped to [log_clamp_min, log_clamp_max]).
        b: [B, T, ...] inputs, same shape as log_a.
        initial_state: [B, ...] h_0, or None for zeros.
        backend: "auto", "torch", "triton", "cuda" or "sequential" (`mm_rec.ops.BACKENDS`).

    Returns:
        h: [B, T, ...] in b's dtype.
        final_state: [B, ...] h_T in the accumulation dtype (fp32, or float64 for float64 input).
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if log_a.shape != b.shape:
        raise ValueError(f"log_a {tuple(log_a.shape)} and b {tuple(b.shape)} must have the same shape")
    if b.dim() < 2 or b.shape[1] == 0:
        raise ValueError(f"expected [B, T, ...] with T >= 1, got {tuple(b.shape)}")
    if initial_state is not None and initial_state.shape != b.shape[:1] + b.shape[2:]:
        raise ValueError(f"initial_state {tuple(initial_state.shape)} must be {tuple(b.shape[:1] + b.shape[2:])}")
    acc = compute_dtype(log_a, b, initial_state)
    if backend == "cuda" and not (cuda_kernels_available() and b.is_cuda and acc == torch.float32
                                  and b.dtype in _CUDA_DTYPES and log_a.dtype in _CUDA_DTYPES):
        backend = "auto"  # not built here (load_extension said why), or float64 / CPU tensors
    if backend == "auto":
        backend = "triton" if b.is_cuda and triton_available() else "torch"
    if backend in ("cuda", "triton"):
        # The kernels clamp and cast inside (no copy of log_a before them) when the bounds enclose 0:
        # the steps they pad a tile with load log_a = 0 as the identity.
        if not log_clamp_min <= 0.0 <= log_clamp_max:
            log_a = log_a.to(acc).clamp(log_clamp_min, log_clamp_max)
            log_clamp_min, log_clamp_max = -math.inf, math.inf
        if backend == "cuda":
            from mm_rec.ops.scan.cuda_ops import scan_cuda  # registers the operators on first use

            return scan_cuda(log_a, b, initial_state, log_clamp_min, log_clamp_max)
        from mm_rec.ops.scan.triton_kernels import scan_triton  # needs Triton: imported on first use

        return scan_triton(log_a, b, initial_state, log_clamp_min, log_clamp_max)

    log_a = log_a.to(acc).clamp(log_clamp_min, log_clamp_max)
    B, T = b.shape[:2]
    feature_shape = b.shape[2:]
    flat_log_a = log_a.reshape(B, T, -1)
    flat_b = b.to(acc).reshape(B, T, -1)
    flat_h0 = initial_state.to(acc).reshape(B, -1) if initial_state is not None else None
    if backend == "sequential":
        h = scan_sequential(flat_log_a, flat_b, flat_h0)
    else:
        h = AssociativeScanExponential.apply(flat_log_a, flat_b, flat_h0)
    final = h[:, -1].reshape(B, *feature_shape).to(acc)
    return h.reshape(b.shape).to(b.dtype), final


def associative_scan_step(log_a: torch.Tensor, b: torch.Tensor, h: torch.Tensor,
                          log_clamp_min: float = LOG_CLAMP_MIN, log_clamp_max: float = LOG_CLAMP_MAX) -> torch.Tensor:
    """One step of the scan (decoding): h_t = exp(clamp(log_a)) * h + b with the scan's rules (the same
    clamp, fp32 accumulation); log_a broadcasts against b and h. Returns h_t in the accumulation dtype."""
    acc = compute_dtype(log_a, b, h)
    return torch.exp(log_a.to(acc).clamp(log_clamp_min, log_clamp_max)) * h.to(acc) + b.to(acc)
