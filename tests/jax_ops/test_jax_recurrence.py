"""I2 for the JAX recurrence (mm_rec.jax.mmrec_recurrence): equal to the PyTorch float64 loop
(mm_rec.core.recurrence with backend="sequential") forward and backward, with the PyTorch
function's defaults, dtype rules and argument checks. Also jit and vmap."""

import numpy as np
import pytest
import torch

jax = pytest.importorskip("jax")
import jax.numpy as jnp  # noqa: E402
from jax_helpers import enable_x64, rel_err  # noqa: E402

from mm_rec.core.recurrence import mmrec_recurrence as torch_recurrence  # noqa: E402
from mm_rec.jax import mmrec_recurrence  # noqa: E402

NAMES = ["d z", "d log_gamma", "d W_g", "d b_g", "d h0"]


def random_inputs(B, T, H, d):
    """z, log_gamma [B, T, H, d] (decays at both clamps, -50 and 0, mixed in), W_g [H, d, d],
    b_g [H, d], h0 [B, H, d]: float32 numpy arrays from torch's seeded generator."""
    log_gamma = -torch.rand(B, T, H, d) * 2
    log_gamma[:, ::3] = -50.0
    log_gamma[:, 1::4] = 0.0
    inputs = (torch.randn(B, T, H, d), log_gamma, torch.randn(H, d, d) / d**0.5, torch.randn(H, d),
              torch.randn(B, H, d))
    return tuple(x.numpy() for x in inputs)


@jax.jit
def recurrence_and_grads(args, cotangents):
    """h, h_last and the gradients of <h, dh> + <h_last, d_last> to every argument. (Inputs are cast
    to bf16 before, not in here: XLA may skip an f32 -> bf16 -> f32 round trip inside a jitted function.)"""
    (h, h_last), vjp = jax.vjp(mmrec_recurrence, *args)
    return h, h_last, vjp(cotangents)


def torch_reference(args, cotangents=None):
    """The same from the float64 loop, through torch autograd (None arguments stay None)."""
    leaves = [None if x is None else torch.tensor(np.asarray(x).astype(np.float64), requires_grad=True)
              for x in args]
    h, h_last = torch_recurrence(*leaves, backend="sequential")
    if cotangents is None:
        return h, h_last
    torch.autograd.backward([h, h_last], [torch.tensor(np.asarray(c), dtype=torch.float64) for c in cotangents])
    return h, h_last, [None if leaf is None else leaf.grad for leaf in leaves]


# Every T with both head widths, with and without b_g and h0 (each case one compilation).
@pytest.mark.parametrize("T,H,d,defaults", [(1, 2, 33, False), (1, 3, 1, True), (67, 3, 1, False),
                                            (67, 2, 33, True), (300, 2, 33, False), (300, 3, 1, True)])
def test_matches_float64_loop_forward_and_backward(T, H, d, defaults):
    z, log_gamma, W_g, b_g, h0 = random_inputs(2, T, H, d)
    args = (z, log_gamma, W_g) if defaults else (z, log_gamma, W_g, b_g, h0)
    cotangents = (torch.randn(2, T, H, d).numpy(), torch.randn(2, H, d).numpy())
    h, h_last, grads = recurrence_and_grads(tuple(map(jnp.asarray, args)), tuple(map(jnp.asarray, cotangents)))
    h_ref, last_ref, grads_ref = torch_reference(args, cotangents)
    assert h.dtype == jnp.float32 and h_last.dtype == jnp.float32
    assert h.shape == (2, T, H, d) and h_last.shape == (2, H, d)
    assert rel_err(h, h_ref) < 1e-5
    assert rel_err(h_last, last_ref) < 1e-5
    assert len(grads) == len(args)
    for name, got, ref in zip(NAMES, grads, grads_ref):
        assert got.dtype == jnp.float32, name
        assert rel_err(got, ref) < 1e-5, name


def test_is_the_formula():
    # Two explicit steps, written out: h_t = z_t * sigmoid(h_{t-1} W_g + b_g) + gamma_t * h_{t-1}.
    z, log_gamma, W_g, b_g, h0 = random_inputs(2, 2, 3, 4)
    h, h_last = jax.jit(mmrec_recurrence)(*map(jnp.asarray, (z, log_gamma, W_g, b_g, h0)))
    expected = h0
    for t in range(2):
        gate = 1 / (1 + np.exp(-(np.einsum("bhd,hde->bhe", expected, W_g) + b_g)))
        expected = z[:, t] * gate + np.exp(log_gamma[:, t]) * expected
        np.testing.assert_allclose(h[:, t], expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(h_last, h[:, -1])


def test_bf16_inputs_keep_an_fp32_state():
    z, log_gamma, W_g, b_g, h0 = random_inputs(2, 67, 2, 33)
    cotangents = (torch.randn(2, 67, 2, 33).numpy(), torch.randn(2, 2, 33).numpy())
    bf16 = lambda x: jnp.asarray(x, jnp.bfloat16)
    args = (bf16(z), bf16(log_gamma), bf16(W_g), jnp.asarray(b_g), jnp.asarray(h0))
    h, h_last, grads = recurrence_and_grads(args, (bf16(cotangents[0]), jnp.asarray(cotangents[1])))
    assert h.dtype == jnp.bfloat16 and h_last.dtype == jnp.float32
    assert [g.dtype for g in grads] == [jnp.bfloat16] * 3 + [jnp.float32] * 2
    # The reference gets the bf16-rounded inputs and cotangent, exactly.
    to_bf16 = lambda x: np.asarray(jnp.asarray(x, jnp.bfloat16)).astype(np.float32)
    h_ref, last_ref, grads_ref = torch_reference((to_bf16(z), to_bf16(log_gamma), to_bf16(W_g), b_g, h0),
                                                 (to_bf16(cotangents[0]), cotangents[1]))
    assert rel_err(h, h_ref) < 1e-2
    assert rel_err(h_last, last_ref) < 1e-5  # fp32 state: fp32 rounding only
    for name, got, ref in zip(NAMES, grads, grads_ref):
        assert rel_err(got, ref) < 1e-2, name


def test_float64_stays_float64_with_x64():
    args = random_inputs(2, 67, 2, 3)
    with enable_x64():
        h, h_last = jax.jit(mmrec_recurrence)(*(jnp.asarray(x, jnp.float64) for x in args))
        assert h.dtype == jnp.float64 and h_last.dtype == jnp.float64
        h_ref, last_ref = torch_reference(args)
        assert rel_err(h, h_ref) < 1e-12 and rel_err(h_last, last_ref) < 1e-12


def test_jit_and_vmap_give_the_same_result():
    args = tuple(map(jnp.asarray, random_inputs(2, 7, 2, 3)))
    eager = mmrec_recurrence(*args)
    for got, ref in zip(jax.jit(mmrec_recurrence)(*args), eager):
        np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-6)
    # vmap over 3 problems (W_g and b_g shared) equals 3 separate calls.
    z, log_gamma, W_g, b_g, h0 = args
    stacked = [jnp.stack([x, -x, x[::-1]]) for x in (z, h0)]
    batched = jax.jit(jax.vmap(mmrec_recurrence, in_axes=(0, None, None, None, 0)))
    h_v, last_v = batched(stacked[0], log_gamma, W_g, b_g, stacked[1])
    assert h_v.shape == (3, 2, 7, 2, 3) and last_v.shape == (3, 2, 2, 3)
    single = jax.jit(mmrec_recurrence)
    for i in range(3):
        h_i, last_i = single(stacked[0][i], log_gamma, W_g, b_g, stacked[1][i])
        np.testing.assert_allclose(h_v[i], h_i, rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(last_v[i], last_i, rtol=1e-6, atol=1e-6)


def test_bad_arguments_are_refused():
    z, log_gamma, W_g, b_g, h0 = map(jnp.asarray, random_inputs(2, 5, 2, 4))
    with pytest.raises(ValueError, match="z must be"):
        mmrec_recurrence(z[0], log_gamma[0], W_g, b_g, h0)
    with pytest.raises(ValueError, match="T >= 1"):
        mmrec_recurrence(z[:, :0], log_gamma[:, :0], W_g, b_g, h0)
    with pytest.raises(ValueError, match="log_gamma"):
        mmrec_recurrence(z, log_gamma[:, :3], W_g, b_g, h0)
    with pytest.raises(ValueError, match="W_g"):
        mmrec_recurrence(z, log_gamma, W_g[:, :3], b_g, h0)
    with pytest.raises(ValueError, match="b_g"):
        mmrec_recurrence(z, log_gamma, W_g, b_g[:1], h0)
    with pytest.raises(ValueError, match="initial_state"):
        mmrec_recurrence(z, log_gamma, W_g, b_g, h0[:1])
