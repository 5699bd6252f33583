"""The gated delta rule: level 2 of the MM-Rec memory (reference: `reference.py`).

    o, final_state = gated_delta_rule(q, k, v, log_alpha, beta, initial_state=None, backend="auto")

over axis 1 of [B, T, K, m] tensors (K banks, each with its own [m_v, m_k] matrix memory):
q, k [B, T, K, m_k] (the caller L2-normalises k), v [B, T, K, m_v], log_alpha and beta [B, T, K],
initial_state [B, K, m_v, m_k]. Accumulation is fp32 whatever the input dtype (float64 stays
float64); with bf16/fp16 inputs the chunks' large products multiply half operands (as fla's
kernels do) while the state and the sums of its chunk-to-chunk recursion stay fp32; o comes back
in v's dtype, the final state in the accumulation dtype.

Backends: "torch" (chunkwise-parallel PyTorch, differentiable; CPU and GPU), "triton" (the same, its
chunk-to-chunk pass one Triton kernel: `triton_kernels.py`; on the CPU through TRITON_INTERPRET=1),
"sequential" (float64 loop, the oracle), "auto" (triton on CUDA tensors where Triton runs, an fp32
state and m_k <= 512; torch elsewhere).
"""

from __future__ import annotations

import torch

from mm_rec.ops import compute_dtype, triton_available
from mm_rec.ops.delta_rule.reference import (
    CHUNK_LEN,
    chunk_len_for,
    delta_rule_chunked,
    delta_rule_sequential,
    delta_rule_step,
)

DELTA_BACKENDS = ("auto", "torch", "triton", "sequential")


def gated_delta_rule(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, log_alpha: torch.Tensor,
                     beta: torch.Tensor, initial_state: torch.Tensor | None = None,
                     backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    if backend not in DELTA_BACKENDS:
        raise ValueError(f"backend must be one of {DELTA_BACKENDS}, got {backend!r}")
    if q.dim() != 4 or q.shape != k.shape or v.shape[:3] != q.shape[:3]:
        raise ValueError(f"q, k must be [B, T, K, m_k] and v [B, T, K, m_v], got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    B, T, K, mk = q.shape
    mv = v.shape[-1]
    if log_alpha.shape != (B, T, K) or beta.shape != (B, T, K):
        raise ValueError(f"log_alpha and beta must be [B, T, K] = {(B, T, K)}, got {tuple(log_alpha.shape)}, "
                         f"{tuple(beta.shape)}")
    if initial_state is not None and initial_state.shape != (B, K, mv, mk):
        raise ValueError(f"initial_state must be [B, K, m_v, m_k] = {(B, K, mv, mk)}, got {tuple(initial_state.shape)}")
    acc = compute_dtype(q, k, v, initial_state)
    # half inputs: the chunk loop's matmuls take half operands (fp32 accumulation, fp32 state), so q, k, v
    # stay half (their rows copied once, in half) and the chunked form widens them where it adds or scales
    half = v.dtype if v.dtype in (torch.bfloat16, torch.float16) and q.dtype == k.dtype == v.dtype else None

    def rows(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:  # [B, T, K, ...] -> [B * K, T, ...] in dtype
        return x.to(dtype).transpose(1, 2).reshape(B * K, T, *x.shape[3:])

    S0 = (initial_state.to(acc) if initial_state is not None else q.new_zeros(B, K, mv, mk, dtype=acc))
    if backend == "sequential":
        args = (rows(q, acc), rows(k, acc), rows(v, acc), rows(log_alpha, acc), rows(beta, acc))
        o, S = delta_rule_sequential(*args, S0.reshape(B * K, mv, mk))
        o, S = o.to(acc), S.to(acc)
    else:
        inputs = half or acc
        args = (rows(q, inputs), rows(k, inputs), rows(v, inputs), rows(log_alpha, acc), rows(beta, acc))
        o, S = delta_rule_chunked(*args, S0.reshape(B * K, mv, mk), matmul_dtype=half,
                                  chain=_chain_for(backend, q, acc, mk))
    o = o.view(B, K, T, mv).transpose(1, 2)
    return o.to(v.dtype), S.view(B, K, mv, mk)


def _chain_for(backend: str, q: torch.Tensor, acc: torch.dtype, mk: int) -> str:
    """What runs the chunk-to-chunk pass for `backend`: "torch" (the loop) or "triton"."""
    if backend == "torch" or (backend == "auto" and not (q.is_cuda and acc == torch.float32 and triton_available())):
        return "torch"
    from mm_rec.ops.delta_rule.triton_kernels import MAX_KEY_DIM  # needs Triton

    return "torch" if backend == "auto" and mk > MAX_KEY_DIM else "triton"


def delta_rule_flops(batch: int, seq_len: int, banks: int, key_dim: int, value_dim: int,
                     chunk_len: int | None = None) -> int:
    """Forward matmul FLOPs of the chunked form (2 per multiply-add); the backward is about twice this."""
    L = min(chunk_len or chunk_len_for(seq_len), seq_len)
    per_token = 2 * (L * key_dim  # k k^T
                     + L * L + L * key_dim + L * value_dim  # triangular solve, W, U_v
                     + L * key_dim  # q k^T
                     + 3 * key_dim * value_dim + L * value_dim)  # W S^T, q S^T, attend U, U^T k
    return batch * banks * seq_len * per_token


__all__ = ["CHUNK_LEN", "DELTA_BACKENDS", "delta_rule_chunked", "delta_rule_flops", "delta_rule_sequential",
           "delta_rule_step", "gated_delta_rule"]
