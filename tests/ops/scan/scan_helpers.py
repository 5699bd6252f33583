"""Shared by the scan kernels' tests: fresh random inputs, outputs and gradients of a scan
function, and the comparison against the float64 oracle."""

import torch
from grad_helpers import outputs_and_grads, rel_err  # noqa: F401  (re-exported to the tests)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
NAMES = ["h", "final_state", "dlog_a", "db", "dh0"]


def random_inputs(shape, with_h0=True, clamps=True, scale=2.0, device=DEVICE):
    """Fresh log_a uniform in [-scale, 0], b and h0; `clamps` puts some decays at -50 and at 0
    (a small `scale` without clamps: long memory, so states carry far across chunks)."""
    log_a = -torch.rand(shape, device=device) * scale
    if clamps:
        log_a[:, ::3] = -50.0
        log_a[:, 1::4] = 0.0
    b = torch.randn(shape, device=device)
    h0 = torch.randn((shape[0], *shape[2:]), device=device) if with_h0 else None
    return log_a, b, h0


def past_the_clamps(log_a: torch.Tensor) -> torch.Tensor:
    """log_a with some decays beyond both clamps (-80 below -50, +0.3 above 0), in place: the
    kernels clamp them inside, and their gradient must be zero there."""
    log_a[:, 2::7] = -80.0
    log_a[:, 5::11] = 0.3
    return log_a


def check(got, ref, tol):
    for name, x, r in zip(NAMES, got, ref):
        if r is None:
            assert x is None, name
            continue
        assert torch.isfinite(x.float()).all(), name
        assert rel_err(x, r) < tol, f"{name}: {rel_err(x, r):.2e}"
