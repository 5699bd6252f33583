"""What the JAX scan and recurrence share: the accumulation dtype and torch's clamp gradient."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def compute_dtype(*arrays: jax.Array | None) -> jnp.dtype:
    """float64 if any input is float64, else float32 (bf16/fp16 inputs accumulate in fp32), as
    mm_rec.ops.compute_dtype. float64 arrays exist only with jax x64 enabled
    (`jax.config.update("jax_enable_x64", True)` or `with jax.enable_x64(True):`)."""
    if any(x is not None and jnp.dtype(x.dtype) == jnp.float64 for x in arrays):
        return jnp.dtype(jnp.float64)
    return jnp.dtype(jnp.float32)


def clamp(x: jax.Array, low: float, high: float) -> jax.Array:
    """x clamped to [low, high] with torch.clamp's gradient: passed through where low <= x <= high,
    the bounds included. (jnp.clip halves it at a bound, lax.clamp zeroes it there; decays sit
    exactly at -50 and 0 in practice: LearnableDecay clamps to them.)"""
    return jnp.where(x < low, low, jnp.where(x > high, high, x)).astype(x.dtype)
