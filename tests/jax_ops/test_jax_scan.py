"""I1 for the JAX scan (mm_rec.jax.associative_scan_exponential): equal to the PyTorch float64
loop (mm_rec.core.associative_scan with backend="sequential") forward and backward, with the
PyTorch function's rules: clamping, dtypes, defaults, argument checks. Also jit and vmap."""

import numpy as np
import pytest
import torch

jax = pytest.importorskip("jax")
import jax.numpy as jnp  # noqa: E402
from jax_helpers import enable_x64, rel_err  # noqa: E402

from mm_rec.core.associative_scan import associative_scan_exponential as torch_scan  # noqa: E402
from mm_rec.jax import associative_scan_exponential as scan  # noqa: E402


def random_inputs(B, T, D, extreme=True):
    """log_a, b [B, T, D] and h0 [B, D] as float32 numpy arrays (torch's seeded generator)."""
    log_a = -torch.rand(B, T, D) * 4
    if extreme:  # decays at both clamps, and beyond them (must be clamped)
        log_a[:, ::5] = -50.0
        log_a[:, 1::7] = 0.0
        log_a[:, 2::11] = -80.0
        log_a[:, 3::13] = 0.5
    return log_a.numpy(), torch.randn(B, T, D).numpy(), torch.randn(B, D).numpy()


@jax.jit
def scan_and_grads(args, cotangents):
    """h, final and the gradients of <h, dh> + <final, d_final> to every argument. (Inputs are cast
    to bf16 before, not in here: XLA may skip an f32 -> bf16 -> f32 round trip inside a jitted function.)"""
    (h, final), vjp = jax.vjp(scan, *args)
    return h, final, vjp(cotangents)


def torch_reference(args, cotangents=None):
    """The same from the float64 loop, through torch autograd (h and final alone without cotangents)."""
    leaves = [torch.tensor(np.asarray(x).astype(np.float64), requires_grad=cotangents is not None) for x in args]
    h, final = torch_scan(*leaves, backend="sequential")
    if cotangents is None:
        return h, final
    torch.autograd.backward([h, final], [torch.tensor(np.asarray(c), dtype=torch.float64) for c in cotangents])
    return h, final, [leaf.grad for leaf in leaves]


# Every T with both widths, with and without h0 (each case is one compilation: a few seconds).
@pytest.mark.parametrize("T,D,with_h0", [(1, 33, True), (1, 1, False), (67, 1, True), (67, 33, False),
                                         (300, 33, True), (300, 1, False)])
def test_matches_float64_loop_forward_and_backward(T, D, with_h0):
    log_a, b, h0 = random_inputs(2, T, D)
    args = (log_a, b, h0) if with_h0 else (log_a, b)
    cotangents = (torch.randn(2, T, D).numpy(), torch.randn(2, D).numpy())
    h, final, grads = scan_and_grads(tuple(map(jnp.asarray, args)), tuple(map(jnp.asarray, cotangents)))
    h_ref, final_ref, grads_ref = torch_reference(args, cotangents)
    assert h.dtype == jnp.float32 and final.dtype == jnp.float32
    assert h.shape == (2, T, D) and final.shape == (2, D)
    assert rel_err(h, h_ref) < 1e-5
    assert rel_err(final, final_ref) < 1e-5
    assert len(grads) == len(args)
    for name, got, ref in zip(["d log_a", "d b", "d h0"], grads, grads_ref):
        assert got.dtype == jnp.float32, name
        assert rel_err(got, ref) < 1e-5, name
    # Beyond the clamps, log_a gets no gradient; at them it does (torch.clamp's rule).
    d_log_a = np.asarray(grads[0])
    assert np.all(d_log_a[(log_a < -50) | (log_a > 0)] == 0)
    at_bounds = (log_a == 0) | (log_a == -50)
    at_bounds[:, 0] = False  # h_0 = 0 without an initial state: no gradient to log_a_0
    assert np.all(d_log_a[at_bounds] != 0)


def test_bf16_inputs_accumulate_in_fp32():
    log_a, b, h0 = random_inputs(2, 67, 33)
    cotangents = (torch.randn(2, 67, 33).numpy(), torch.randn(2, 33).numpy())
    bf16 = lambda x: jnp.asarray(x, jnp.bfloat16)
    h, final, grads = scan_and_grads((bf16(log_a), bf16(b), jnp.asarray(h0)),
                                     (bf16(cotangents[0]), jnp.asarray(cotangents[1])))
    assert h.dtype == jnp.bfloat16 and final.dtype == jnp.float32
    assert [g.dtype for g in grads] == [jnp.bfloat16, jnp.bfloat16, jnp.float32]
    # The reference gets the bf16-rounded inputs and cotangent, exactly.
    to_bf16 = lambda x: np.asarray(jnp.asarray(x, jnp.bfloat16)).astype(np.float32)
    rounded = (to_bf16(log_a), to_bf16(b), h0)
    dh_rounded = to_bf16(cotangents[0])
    h_ref, final_ref, grads_ref = torch_reference(rounded, (dh_rounded, cotangents[1]))
    assert rel_err(h, h_ref) < 1e-2
    assert rel_err(final, final_ref) < 1e-5  # fp32 state: only fp32 rounding
    for name, got, ref in zip(["d log_a", "d b", "d h0"], grads, grads_ref):
        assert rel_err(got, ref) < 1e-2, name


def test_float64_stays_float64_with_x64():
    log_a, b, h0 = random_inputs(2, 67, 1)
    with enable_x64():
        h, final = jax.jit(scan)(*(jnp.asarray(x, jnp.float64) for x in (log_a, b, h0)))
        assert h.dtype == jnp.float64 and final.dtype == jnp.float64
        h_ref, final_ref = torch_reference((log_a, b, h0))
        assert rel_err(h, h_ref) < 1e-12 and rel_err(final, final_ref) < 1e-12


def test_slow_decay_long_sequence_keeps_precision():
    # The log decays sum to ~ -1e4 over the sequence: a global cumulative sum, later subtracted, would
    # lose ~1e-3 in fp32.
    T = 20000
    log_a = (torch.full((1, T, 2), -0.5) + 0.01 * torch.randn(1, T, 2)).numpy()
    b = torch.randn(1, T, 2).numpy()
    h, _ = jax.jit(scan)(jnp.asarray(log_a), jnp.asarray(b))
    h_ref, _ = torch_reference((log_a, b))
    assert rel_err(h, h_ref) < 1e-5


def test_trailing_dims_are_kept():
    log_a, b, h0 = (x.reshape(x.shape[0], -1, 2, 3) if x.ndim == 3 else x.reshape(-1, 2, 3)
                    for x in random_inputs(3, 17, 6))
    h, final = jax.jit(scan)(jnp.asarray(log_a), jnp.asarray(b), jnp.asarray(h0))
    assert h.shape == (3, 17, 2, 3) and final.shape == (3, 2, 3)
    h_ref, final_ref = torch_reference((log_a, b, h0))
    assert rel_err(h, h_ref) < 1e-5 and rel_err(final, final_ref) < 1e-5


def test_log_a_is_clamped_to_the_clamp_range():
    log_a, b = (torch.randn(2, 9, 4) * 60).numpy(), torch.randn(2, 9, 4).numpy()  # far beyond [-50, 0] both ways
    jitted = jax.jit(scan)  # the clamp bounds traced: one compilation for all four calls
    h, final = jitted(jnp.asarray(log_a), jnp.asarray(b))
    h_ref, final_ref = jitted(jnp.asarray(np.clip(log_a, -50.0, 0.0)), jnp.asarray(b))
    assert np.array_equal(h, h_ref) and np.array_equal(final, final_ref)
    h_tight, _ = jitted(jnp.asarray(log_a), jnp.asarray(b), log_clamp_min=-1.0)
    h_tight_ref, _ = jitted(jnp.asarray(np.clip(log_a, -1.0, 0.0)), jnp.asarray(b))
    assert np.array_equal(h_tight, h_tight_ref)
    assert not np.allclose(h_tight, h)


def test_jit_and_vmap_give_the_same_result():
    log_a, b, h0 = random_inputs(2, 5, 3)
    args = tuple(map(jnp.asarray, (log_a, b, h0)))
    eager = scan(*args)  # op by op, each op compiled on first use: a short sequence
    for got, ref in zip(jax.jit(scan)(*args), eager):
        np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-6)
    # vmap over a leading axis of 3 independent problems equals 3 separate calls.
    stacked = [jnp.stack([x, 2 * x, x[::-1]]) for x in args]
    h_v, final_v = jax.jit(jax.vmap(scan))(*stacked)
    assert h_v.shape == (3, 2, 5, 3) and final_v.shape == (3, 2, 3)
    for i in range(3):
        h_i, final_i = jax.jit(scan)(*(x[i] for x in stacked))
        np.testing.assert_allclose(h_v[i], h_i, rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(final_v[i], final_i, rtol=1e-6, atol=1e-6)


def test_bad_arguments_are_refused():
    zeros = jnp.zeros
    with pytest.raises(ValueError, match="same shape"):
        scan(zeros((1, 3, 2)), zeros((1, 3, 3)))
    with pytest.raises(ValueError, match="initial_state"):
        scan(zeros((1, 3, 2)), zeros((1, 3, 2)), zeros((2, 2)))
    with pytest.raises(ValueError, match="T >= 1"):
        scan(zeros((1, 0, 2)), zeros((1, 0, 2)))
    with pytest.raises(ValueError, match="T >= 1"):
        scan(zeros((3,)), zeros((3,)))
