"""The recurrences' implementations, one package per op, each kernel beside its reference:

    mm_rec/ops/scan/         log-space associative scan h_t = exp(log_a_t) * h_{t-1} + b_t
    mm_rec/ops/recurrence/   exact core recurrence h_t = z_t * sigmoid(h_{t-1} W_g + b_g) + gamma_t * h_{t-1}
    mm_rec/ops/delta_rule/   gated delta rule S_t = alpha_t S_{t-1} (I - beta_t k_t k_t^T) + beta_t v_t k_t^T
                             (level 2 of the memory; its own public function `gated_delta_rule`)
    mm_rec/ops/memory_step/  the memory's part of one decoding step (window, ring read, pooling sums,
                             delta rule) as one Triton kernel; its reference is the torch step of
                             `HDSHierarchy.step_token` + `MultiMemoryAttention.step`

In each, `reference.py` holds the torch backend and the float64 sequential loop it is tested
against, `triton_kernels.py` the Triton kernels and their torch.library operators (imported only
when the "triton" backend runs: Triton is an optional dependency). Callers go through the public
dispatchers `mm_rec.core.associative_scan` and `mm_rec.core.recurrence`, which validate the
arguments and pick a backend from `BACKENDS`.
"""

from __future__ import annotations

import os

import torch

from mm_rec.cuda import load_extension

BACKENDS = ("auto", "torch", "triton", "cuda", "sequential")
"""Backends of every op: "auto" (the fastest measured GPU kernels on CUDA tensors, torch
otherwise), "torch" (vectorised reference, the CPU path), "triton" (the Triton GPU kernels),
"cuda" (CUDA C++ kernels of `mm_rec.cuda`, built on first use; where they cannot be built or do
not cover the call, the Triton or torch backend with a notice), "sequential" (the float64 loop,
the oracle)."""

_TRITON_AVAILABLE: bool | None = None  # probed once; a plain global, which torch.compile traces without warnings


def compute_dtype(*tensors: torch.Tensor | None) -> torch.dtype:
    """float64 if any input is float64, else float32 (bf16/fp16 inputs accumulate in fp32)."""
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32


def cuda_kernels_available() -> bool:
    """True when the CUDA C++ kernels are built (or build now) and can run here."""
    return load_extension() is not None


def triton_available() -> bool:
    """True when Triton imports and can run here (a CUDA GPU, or TRITON_INTERPRET=1)."""
    global _TRITON_AVAILABLE
    if _TRITON_AVAILABLE is None:
        _TRITON_AVAILABLE = _probe_triton()
    return _TRITON_AVAILABLE


def _probe_triton() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:
        return False
    if os.environ.get("TRITON_INTERPRET") == "1":
        return True
    return torch.cuda.is_available()
