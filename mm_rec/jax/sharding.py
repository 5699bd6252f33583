"""The scan and the recurrence with the batch split across devices, through shard_map.

Batch rows are independent in both recurrences, so each device runs the plain function on its
own rows and nothing is communicated: the inputs' batch axis is sharded over one mesh axis, the
recurrence weights W_g and b_g are replicated. Example, on a CPU with two host devices
(XLA_FLAGS=--xla_force_host_platform_device_count=2, set before jax is imported):

    from mm_rec.jax import batch_mesh, sharded_scan
    mesh = batch_mesh()                      # all devices on one axis, "batch"
    h, final = sharded_scan(mesh, log_a, b)  # log_a, b [B, T, ...], B divisible by the device count

Both functions are jitted; the outputs come back sharded over the batch like the inputs.
"""

from __future__ import annotations

from functools import partial

import jax
import numpy as np
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from mm_rec.jax.associative_scan import LOG_CLAMP_MAX, LOG_CLAMP_MIN, associative_scan_exponential
from mm_rec.jax.recurrence import mmrec_recurrence

try:  # newer jax; older versions (0.4.30 included) have it in jax.experimental, with the same keywords
    from jax import shard_map
except ImportError:
    from jax.experimental.shard_map import shard_map

__all__ = ["batch_mesh", "sharded_recurrence", "sharded_scan"]

BATCH_AXIS = "batch"


def batch_mesh(devices=None, axis_name: str = BATCH_AXIS) -> Mesh:
    """A one-axis mesh over `devices` (default: all of jax.devices())."""
    return Mesh(np.asarray(devices if devices is not None else jax.devices()), (axis_name,))


def _over_rows(fn, mesh: Mesh, axis_name: str, args: tuple, replicated: tuple[int, ...] = ()):
    """fn(*args) under shard_map: every array argument split along axis 0 over mesh axis
    `axis_name` except those at the indices `replicated`, which every device gets whole; None
    arguments are passed on as None (shard_map's specs cover arrays only). Both outputs come back
    split along axis 0."""
    batch, n = args[0].shape[0], mesh.shape[axis_name]
    if batch % n:
        raise ValueError(f"batch size {batch} must be divisible by the {n} devices of mesh axis {axis_name!r}")
    present = [i for i, x in enumerate(args) if x is not None]

    def local(*arrays):  # runs on each device with its rows
        full = [None] * len(args)
        for i, x in zip(present, arrays):
            full[i] = x
        return fn(*full)

    specs = tuple(P() if i in replicated else P(axis_name) for i in present)  # P(axis): split axis 0
    rows = P(axis_name)
    return shard_map(local, mesh=mesh, in_specs=specs, out_specs=(rows, rows))(*(args[i] for i in present))


@partial(jax.jit, static_argnames=("mesh", "axis_name", "log_clamp_min", "log_clamp_max"))
def sharded_scan(
    mesh: Mesh,
    log_a: jax.Array,
    b: jax.Array,
    initial_state: jax.Array | None = None,
    axis_name: str = BATCH_AXIS,
    log_clamp_min: float = LOG_CLAMP_MIN,
    log_clamp_max: float = LOG_CLAMP_MAX,
) -> tuple[jax.Array, jax.Array]:
    """associative_scan_exponential with the batch (axis 0) of log_a, b and initial_state split
    over mesh axis `axis_name`; same arguments, results and rules. The batch size must be
    divisible by the number of devices on that axis."""
    scan = partial(associative_scan_exponential, log_clamp_min=log_clamp_min, log_clamp_max=log_clamp_max)
    return _over_rows(scan, mesh, axis_name, (log_a, b, initial_state))


@partial(jax.jit, static_argnames=("mesh", "axis_name"))
def sharded_recurrence(
    mesh: Mesh,
    z: jax.Array,
    log_gamma: jax.Array,
    W_g: jax.Array,
    b_g: jax.Array | None = None,
    initial_state: jax.Array | None = None,
    axis_name: str = BATCH_AXIS,
) -> tuple[jax.Array, jax.Array]:
    """mmrec_recurrence with the batch of z, log_gamma and initial_state split over mesh axis
    `axis_name`, W_g and b_g replicated on every device; same arguments, results and rules. The
    batch size must be divisible by the number of devices on that axis."""
    return _over_rows(mmrec_recurrence, mesh, axis_name, (z, log_gamma, W_g, b_g, initial_state), replicated=(2, 3))
