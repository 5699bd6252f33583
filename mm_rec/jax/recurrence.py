"""The exact MM-Rec core recurrence in JAX, per head:

    h_t = z_t * sigmoid(h_{t-1} W_g + b_g) + exp(log_gamma_t) * h_{t-1}

with h_{t-1} W_g a row vector times a [d, d] matrix (W_g is [H, d, d], block diagonal over
heads). The gate depends on h_{t-1}, so the recurrence is nonlinear and runs step by step, as a
`jax.lax.scan` over time; gradients are JAX's autodiff of that scan (the reverse loop of the
PyTorch backend mm_rec.ops.recurrence.MMRecRecurrence, derived by JAX). The contract is that of
mm_rec.core.recurrence.mmrec_recurrence: same shapes, defaults and dtype rules.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from mm_rec.jax.common import compute_dtype

__all__ = ["mmrec_recurrence"]


def mmrec_recurrence(
    z: jax.Array,
    log_gamma: jax.Array,
    W_g: jax.Array,
    b_g: jax.Array | None = None,
    initial_state: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Run the core recurrence.

    Args:
        z: [B, T, H, d] recurrence input.
        log_gamma: [B, T, H, d] log decay (<= 0; the caller clamps it, as for the PyTorch function).
        W_g: [H, d, d] gate weights (row vector times matrix); b_g: [H, d] or None for zeros.
        initial_state: [B, H, d] h_0, or None for zeros.

    Returns:
        h: [B, T, H, d] all states, in z's dtype.
        h_last: [B, H, d] the final state in the accumulation dtype: float64 if any of z, log_gamma,
            W_g, initial_state is float64 (jax x64 on), else fp32. b_g is cast to it.

    The gate's matmul runs at full fp32 precision (Precision.HIGHEST: no TF32 or bf16 passes on
    GPUs and TPUs, whose errors would compound over the steps), as the PyTorch version does.
    """
    if z.ndim != 4 or z.shape[1] == 0:
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
    W = W_g.astype(acc)
    bias = jnp.zeros((H, d), acc) if b_g is None else b_g.astype(acc)
    # zeros_like(z) rather than zeros((B, H, d)): under shard_map the state then varies over the mesh like z.
    h0 = jnp.zeros_like(z[:, 0], dtype=acc) if initial_state is None else initial_state.astype(acc)
    # Time-major for the scan: [B, T, H, d] -> [T, B, H, d].
    z_steps = jnp.moveaxis(z.astype(acc), 1, 0)
    gamma_steps = jnp.exp(jnp.moveaxis(log_gamma.astype(acc), 1, 0))

    def step(h, inputs):  # h [B, H, d]
        z_t, gamma_t = inputs
        pre = jnp.einsum("bhd,hde->bhe", h, W, precision=jax.lax.Precision.HIGHEST) + bias
        h = z_t * jax.nn.sigmoid(pre) + gamma_t * h
        return h, h

    h_last, states = jax.lax.scan(step, h0, (z_steps, gamma_steps))  # states [T, B, H, d]
    return jnp.moveaxis(states, 0, 1).astype(z.dtype), h_last
