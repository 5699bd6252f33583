"""JAX versions of MM-Rec's two recurrences, with the semantics of the PyTorch ones (docs/jax.md).

    associative_scan_exponential(log_a, b, initial_state=None)    h_t = exp(log_a_t) * h_{t-1} + b_t
    mmrec_recurrence(z, log_gamma, W_g, b_g=None, initial_state=None)
                                   h_t = z_t * sigmoid(h_{t-1} W_g + b_g) + exp(log_gamma_t) * h_{t-1}
    sharded_scan, sharded_recurrence   the same over a device mesh, the batch split across devices

    associative_scan.py   the log-space scan (jax.lax.associative_scan, reverse-scan custom VJP)
    recurrence.py         the exact nonlinear recurrence (jax.lax.scan)
    sharding.py           shard_map over the batch

JAX is an optional dependency (`pip install mm-rec[jax]`). Nothing else in mm_rec imports this
package, and it imports nothing of the rest of mm_rec (nor torch): tests/test_layering.py checks both.
The PyTorch functions with backend="sequential" are its test oracles (tests/jax_ops/).
"""

try:
    import jax  # noqa: F401
except ImportError as error:
    raise ImportError("mm_rec.jax needs JAX: pip install mm-rec[jax]") from error

from mm_rec.jax.associative_scan import LOG_CLAMP_MAX, LOG_CLAMP_MIN, associative_scan_exponential
from mm_rec.jax.common import compute_dtype
from mm_rec.jax.recurrence import mmrec_recurrence
from mm_rec.jax.sharding import batch_mesh, sharded_recurrence, sharded_scan

__all__ = [
    "LOG_CLAMP_MAX", "LOG_CLAMP_MIN", "associative_scan_exponential", "batch_mesh", "compute_dtype",
    "mmrec_recurrence", "sharded_recurrence", "sharded_scan",
]
