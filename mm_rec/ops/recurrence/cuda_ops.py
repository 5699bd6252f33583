"""The CUDA core recurrence (mm_rec/cuda/recurrence_kernel.cu) as differentiable operators.

Reference: `mm_rec.ops.recurrence.reference`; public entry point (backend "cuda"):
`mm_rec.core.recurrence.mmrec_recurrence`.

One (batch row, head) runs on a thread-block cluster of `cluster_size` CTAs (1, 2 or 4; Hopper),
each owning d / cluster_size columns of the state and of W_g (2 and 4 only where d / cluster_size
>= 32); 0 picks the default, 1 (the fastest measured: docs/benchmarks.md). Head dims 32, 64 and 128; z and
log_gamma in fp32, bf16 or fp16, read in place; W_g, b_g and h_0 in fp32; accumulation fp32.
The dispatcher sends everything else (float64, other head dims, CPU tensors) to Triton or torch.

The operators save what the Triton kernels save (the gate s, and the fp32 states when z is not
fp32) and organise the backward the same way: the kernel runs the reverse loop and writes dz,
d log_gamma, dp (shifted one step) and per-(b, head) sums of dp; dW_g is then one batched matmul
over (b, t) (`weight_grad`) and db_g a sum over b.
"""

from __future__ import annotations

import torch

from mm_rec.cuda import load_extension
from mm_rec.ops import compute_dtype

HEAD_DIMS = (32, 64, 128)
CLUSTER_SIZES = (0, 1, 2, 4)  # 0: the default rule
_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _ext():
    ext = load_extension()
    if ext is None:  # the dispatcher checks first; this is reached only by direct calls
        raise RuntimeError("mm_rec CUDA kernels are not available here (see the log for why)")
    return ext


def covers(z: torch.Tensor, log_gamma: torch.Tensor, W_g: torch.Tensor, b_g: torch.Tensor,
           h0: torch.Tensor) -> bool:
    """Whether the kernels take these arguments (device, head dim, dtypes; not whether they are built)."""
    return (z.is_cuda and z.shape[-1] in HEAD_DIMS and z.dtype in _DTYPES and log_gamma.dtype in _DTYPES
            and compute_dtype(z, log_gamma, W_g, b_g, h0) == torch.float32)


def weight_grad(states: torch.Tensor, dp: torch.Tensor, h0: torch.Tensor, dp0: torch.Tensor) -> torch.Tensor:
    """dW[head] = sum over (b, t) of h_{t-1}^T dp_t [H, d, d]: the states [B, T, H, d] against dp
    shifted by one step (row t holds dp_{t+1}), plus h0^T dp_0 for t = 0."""
    B, T, H, d = dp.shape
    states_hdn = states.reshape(B * T, H, d).permute(1, 2, 0)  # [H, d, B*T]
    dp_hnd = dp.reshape(B * T, H, d).transpose(0, 1)  # [H, B*T, d]
    return torch.baddbmm(torch.einsum("bhd,bhe->hde", h0, dp0), states_hdn, dp_hnd)


def _backward_math(ext, dh, dh_last, z, log_gamma, W_g, h0, gate, states, cluster_size):
    dz, dlg, dp, dp0, db_part, dh0 = ext.recurrence_bwd(dh, dh_last, z, log_gamma, W_g, h0, gate, states,
                                                        cluster_size)
    return dz, dlg, weight_grad(states, dp, h0, dp0), db_part.sum(0), dh0


@torch.library.custom_op("mm_rec::cuda_recurrence_fwd", mutates_args=())
def cuda_recurrence_fwd(z: torch.Tensor, log_gamma: torch.Tensor, W_g: torch.Tensor, b_g: torch.Tensor,
                        h0: torch.Tensor, cluster_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                                      torch.Tensor]:
    """(h [B, T, H, d] in z's dtype, h_last [B, H, d], gate [B, T, H, d], states [B, T, H, d] or [0]),
    all but h fp32; states is empty when z is fp32 (h is then the state). z, log_gamma contiguous
    (fp32, bf16 or fp16); W_g [H, d, d], b_g [H, d], h0 [B, H, d] contiguous fp32."""
    h, h_last, gate, states = _ext().recurrence_fwd(z, log_gamma, W_g, b_g, h0, cluster_size)
    return h, h_last, gate, states


@cuda_recurrence_fwd.register_fake
def _fwd_fake(z, log_gamma, W_g, b_g, h0, cluster_size):
    B, T, H, d = z.shape
    states_shape = (B, T, H, d) if z.dtype != torch.float32 else (0,)
    return (torch.empty_like(z), z.new_empty((B, H, d), dtype=torch.float32),
            z.new_empty((B, T, H, d), dtype=torch.float32), z.new_empty(states_shape, dtype=torch.float32))


@torch.library.custom_op("mm_rec::cuda_recurrence_bwd", mutates_args=())
def cuda_recurrence_bwd(dh: torch.Tensor, dh_last: torch.Tensor, z: torch.Tensor, log_gamma: torch.Tensor,
                        W_g: torch.Tensor, h0: torch.Tensor, gate: torch.Tensor, states: torch.Tensor,
                        cluster_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                                    torch.Tensor]:
    """(dz in z's dtype, d log_gamma in log_gamma's dtype, dW_g [H, d, d], db_g [H, d], dh0 [B, H, d]);
    `states` are the forward's fp32 states (h itself when z is fp32), dh in h's dtype, dh_last fp32."""
    return _backward_math(_ext(), dh, dh_last, z, log_gamma, W_g, h0, gate, states, cluster_size)


@cuda_recurrence_bwd.register_fake
def _bwd_fake(dh, dh_last, z, log_gamma, W_g, h0, gate, states, cluster_size):
    B, T, H, d = z.shape
    return (torch.empty_like(z), torch.empty_like(log_gamma), z.new_empty((H, d, d), dtype=torch.float32),
            z.new_empty((H, d), dtype=torch.float32), z.new_empty((B, H, d), dtype=torch.float32))


def _save(ctx, inputs, h, gate, states) -> None:
    z, log_gamma, W_g, _, h0, cluster_size = inputs
    ctx.cluster_size = cluster_size
    # the fp32 states the backward reads: h itself when z is fp32 (the kernel then returns no copy)
    ctx.save_for_backward(z, log_gamma, W_g, h0, gate, h if z.dtype == torch.float32 else states)


def _setup_context(ctx, inputs, output) -> None:
    h, _, gate, states = output
    ctx.mark_non_differentiable(gate, states)
    _save(ctx, inputs, h, gate, states)


def _grads(ctx, dh, dh_last, bwd):
    z, log_gamma, W_g, h0, gate, states = ctx.saved_tensors
    B, T, H, d = z.shape
    dh = torch.zeros_like(z) if dh is None else dh.to(z.dtype).contiguous()  # h is in z's dtype
    dh_last = z.new_zeros((B, H, d), dtype=torch.float32) if dh_last is None else dh_last.float().contiguous()
    dz, dlg, dW, db, dh0 = bwd(dh, dh_last, z, log_gamma, W_g, h0, gate, states, ctx.cluster_size)
    return dz, dlg, dW, db, dh0, None


def _backward(ctx, dh, dh_last, _dgate, _dstates):
    return _grads(ctx, dh, dh_last, torch.ops.mm_rec.cuda_recurrence_bwd)


cuda_recurrence_fwd.register_autograd(_backward, setup_context=_setup_context)


class _CudaRecurrenceFunction(torch.autograd.Function):
    """The operators without the custom-operator dispatch, for eager mode (less host time)."""

    @staticmethod
    def forward(ctx, z, log_gamma, W_g, b_g, h0, cluster_size):
        h, h_last, gate, states = _ext().recurrence_fwd(z, log_gamma, W_g, b_g, h0, cluster_size)
        _save(ctx, (z, log_gamma, W_g, b_g, h0, cluster_size), h, gate, states)
        return h, h_last

    @staticmethod
    def backward(ctx, dh, dh_last):
        return _grads(ctx, dh, dh_last, lambda *a: _backward_math(_ext(), *a))


def recurrence_cuda(z: torch.Tensor, log_gamma: torch.Tensor, W_g: torch.Tensor, b_g: torch.Tensor,
                    initial_state: torch.Tensor, cluster_size: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """The core recurrence through the CUDA kernels, differentiable in every input.

    Args:
        z, log_gamma: [B, T, H, d] (fp32, bf16 or fp16 each; log_gamma already clamped to <= 0).
        W_g: [H, d, d]; b_g: [H, d]; initial_state: [B, H, d] (any float dtype but float64: cast
            to fp32, gradients cast back by autograd).
        cluster_size: CTAs per (batch row, head), 1, 2 or 4 (2 and 4 where d / cluster_size >= 32,
            else the binding refuses it); 0 for the default rule (1).

    Returns:
        h: [B, T, H, d] all states in z's dtype; h_last: [B, H, d] the final state in fp32.
    """
    if cluster_size not in CLUSTER_SIZES:
        raise ValueError(f"cluster_size must be one of {CLUSTER_SIZES}, got {cluster_size!r}")
    args = (z.contiguous(), log_gamma.contiguous(), W_g.float().contiguous(), b_g.float().contiguous(),
            initial_state.float().contiguous(), cluster_size)
    if torch.compiler.is_compiling():
        h, h_last, _, _ = torch.ops.mm_rec.cuda_recurrence_fwd(*args)
    else:
        h, h_last = _CudaRecurrenceFunction.apply(*args)
    return h, h_last
