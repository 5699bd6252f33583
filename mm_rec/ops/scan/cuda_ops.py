"""The CUDA scan (mm_rec/cuda/scan_kernel.cu) as differentiable operators.

Reference: `mm_rec.ops.scan.reference`; public entry point (backend "cuda"):
`mm_rec.core.associative_scan.associative_scan_exponential`.

As the Triton kernels do, these take log_a as it is given (fp32, or b's dtype), clamp it
themselves and read it through its strides (`kernel_view`): the dispatcher neither casts nor clamps, and a decay
broadcast over trailing channels ([B, T, K, M] with stride 0 in M) is never materialised. The
backward returns d log_a dense in log_a's dtype (autograd then sums it over broadcast dims).
"""

from __future__ import annotations

import torch

from mm_rec.cuda import load_extension
from mm_rec.ops.scan.layout import kernel_view


def _ext():
    ext = load_extension()
    if ext is None:  # the dispatcher checks first; this is reached only by direct calls
        raise RuntimeError("mm_rec CUDA kernels are not available here (see the log for why)")
    return ext


@torch.library.custom_op("mm_rec::cuda_scan_fwd", mutates_args=())
def cuda_scan_fwd(log_a: torch.Tensor, b: torch.Tensor, h0: torch.Tensor | None, clamp_min: float,
                  clamp_max: float) -> tuple[torch.Tensor, torch.Tensor]:
    """h [B, T, D] in b's dtype and final_state [B, D] fp32 of h_t = exp(clamp(log_a_t)) h_{t-1} + b_t;
    log_a [B, T, D] or [B, T, K, M] (K * M = D), any strides."""
    h, final = _ext().scan_fwd(log_a, b, h0, clamp_min, clamp_max)
    return h, final


@cuda_scan_fwd.register_fake
def _fwd_fake(log_a, b, h0, clamp_min, clamp_max):
    B, _, D = b.shape
    return torch.empty_like(b), b.new_empty((B, D), dtype=torch.float32)


@torch.library.custom_op("mm_rec::cuda_scan_bwd", mutates_args=())
def cuda_scan_bwd(dh: torch.Tensor, d_final: torch.Tensor | None, log_a: torch.Tensor, h: torch.Tensor,
                  h0: torch.Tensor | None, clamp_min: float, clamp_max: float
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(d log_a [B, T, D] in log_a's dtype, db in h's dtype, dh0 [B, D] fp32)."""
    d_log_a, db, dh0 = _ext().scan_bwd(dh, d_final, log_a, h, h0, clamp_min, clamp_max)
    return d_log_a, db, dh0


@cuda_scan_bwd.register_fake
def _bwd_fake(dh, d_final, log_a, h, h0, clamp_min, clamp_max):
    B, T, D = h.shape
    return h.new_empty((B, T, D), dtype=log_a.dtype), torch.empty_like(h), h.new_empty((B, D), dtype=torch.float32)


def _setup_context(ctx, inputs, output) -> None:
    log_a, _, h0, clamp_min, clamp_max = inputs
    ctx.clamps = (clamp_min, clamp_max)
    ctx.h0_dtype = h0.dtype if h0 is not None else None
    ctx.save_for_backward(log_a, output[0], h0)


def _grads(ctx, dh, d_final, bwd):
    log_a, h, h0 = ctx.saved_tensors
    dh = dh.contiguous() if dh is not None else torch.zeros_like(h)  # h unused downstream
    d_final = d_final.float().contiguous() if d_final is not None else None
    d_log_a, db, dh0 = bwd(dh, d_final, log_a, h, h0, *ctx.clamps)
    return d_log_a.view(log_a.shape), db, dh0.to(ctx.h0_dtype) if h0 is not None else None, None, None


def _backward(ctx, dh, d_final):
    return _grads(ctx, dh, d_final, torch.ops.mm_rec.cuda_scan_bwd)


cuda_scan_fwd.register_autograd(_backward, setup_context=_setup_context)


class _CudaScanFunction(torch.autograd.Function):
    """The operators without the custom-operator dispatch, for eager mode (less host time)."""

    @staticmethod
    def forward(ctx, log_a, b, h0, clamp_min, clamp_max):
        h, final = _ext().scan_fwd(log_a, b, h0, clamp_min, clamp_max)
        _setup_context(ctx, (log_a, b, h0, clamp_min, clamp_max), (h, final))
        return h, final

    @staticmethod
    def backward(ctx, dh, d_final):
        return _grads(ctx, dh, d_final, lambda *a: _ext().scan_bwd(*a))


def scan_cuda(log_a: torch.Tensor, b: torch.Tensor, initial_state: torch.Tensor | None, clamp_min: float,
              clamp_max: float) -> tuple[torch.Tensor, torch.Tensor]:
    """h [B, T, ...] in b's dtype and final_state [B, ...] fp32; log_a as given (fp32 or b's dtype,
    any strides, not yet clamped), b any layout (made contiguous), h0 any float dtype or None."""
    B, T = b.shape[:2]
    features = b.shape[2:]
    flat_b = b.reshape(B, T, -1).contiguous()
    if log_a.dtype != torch.float32 and log_a.dtype != b.dtype:
        log_a = log_a.float()
    la = kernel_view(log_a, B, T)
    h0 = initial_state.reshape(B, -1).float().contiguous() if initial_state is not None else None
    if torch.compiler.is_compiling():
        h, final = torch.ops.mm_rec.cuda_scan_fwd(la, flat_b, h0, clamp_min, clamp_max)
    else:
        h, final = _CudaScanFunction.apply(la, flat_b, h0, clamp_min, clamp_max)
    return h.view(b.shape), final.view(B, *features)
