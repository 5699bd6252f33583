"""shard_map over the batch (mm_rec.jax.sharding) equals the unsharded functions, on two host CPU
devices. XLA_FLAGS must be set before jax is imported, so the check runs in a fresh interpreter."""

import os
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("jax")

SCRIPT = textwrap.dedent("""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from mm_rec.jax import associative_scan_exponential, batch_mesh, mmrec_recurrence, sharded_recurrence, sharded_scan

    assert jax.device_count() == 2, jax.devices()
    mesh = batch_mesh()
    rng = np.random.default_rng(0)
    normal = lambda *shape: jnp.asarray(rng.standard_normal(shape), jnp.float32)
    # The unsharded references, jitted too (op by op, each op would compile on first use).
    scan, recurrence = jax.jit(associative_scan_exponential, static_argnames="log_clamp_min"), jax.jit(mmrec_recurrence)

    def same(got, ref):
        for g, r in zip(got, ref):
            assert g.shape == r.shape and g.dtype == r.dtype
            assert len(g.sharding.device_set) == 2, g.sharding  # both devices hold rows
            assert g.sharding.shard_shape(g.shape)[0] == g.shape[0] // 2, g.sharding
            np.testing.assert_allclose(np.asarray(g), np.asarray(r), rtol=1e-6, atol=1e-6)

    # The scan, B = 4 rows over 2 devices, with and without an initial state; log_a beyond the clamps too.
    # (Short sequences: each call compiles.)
    log_a, b, h0 = 30 * normal(4, 11, 5) - 20, normal(4, 11, 5), normal(4, 5)
    same(sharded_scan(mesh, log_a, b), scan(log_a, b))
    same(sharded_scan(mesh, log_a, b, h0, log_clamp_min=-1.0), scan(log_a, b, h0, log_clamp_min=-1.0))

    # Gradients through the sharded scan equal the unsharded ones.
    loss = lambda fn: lambda *x: jnp.sum(fn(*x)[0] ** 2)
    grads = jax.jit(jax.grad(loss(lambda *x: sharded_scan(mesh, *x)), argnums=(0, 1, 2)))(log_a, b, h0)
    same(grads, jax.jit(jax.grad(loss(scan), argnums=(0, 1, 2)))(log_a, b, h0))

    # The recurrence: z, log_gamma, h0 split over the devices, W_g and b_g replicated.
    z, log_gamma = normal(4, 7, 2, 3), -jnp.abs(normal(4, 7, 2, 3))
    W_g, b_g, s0 = normal(2, 3, 3) / 3**0.5, normal(2, 3), normal(4, 2, 3)
    same(sharded_recurrence(mesh, z, log_gamma, W_g), recurrence(z, log_gamma, W_g))
    same(sharded_recurrence(mesh, z, log_gamma, W_g, b_g, s0), recurrence(z, log_gamma, W_g, b_g, s0))

    try:
        sharded_scan(mesh, log_a[:3], b[:3])
    except ValueError as error:
        assert "divisible" in str(error)
    else:
        raise AssertionError("a batch of 3 rows over 2 devices was not refused")
    print("sharded results equal")
""")


def test_sharded_over_two_host_devices_equals_unsharded():
    flags = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=2"  # keeps conftest's
    env = dict(os.environ, XLA_FLAGS=flags.strip(), JAX_PLATFORMS="cpu")
    result = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "sharded results equal" in result.stdout
