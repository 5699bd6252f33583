"""Shared by the recurrence kernels' tests: fresh random inputs, outputs and gradients of a
recurrence function, and the relative error against the float64 oracle."""

import torch
from grad_helpers import outputs_and_grads, rel_err  # noqa: F401  (re-exported to the tests)

GRAD_NAMES = ["h", "h_last", "dz", "dlog_gamma", "dW_g", "db_g", "dh0"]


def random_inputs(B, T, H, d, extreme=False, device="cpu", seed=None):
    """Fresh (z, log_gamma, W_g, b_g, h0), from the global generator or from `seed`; `extreme` puts
    decays at both clamps (gamma = e^-50 and gamma = 1)."""
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    z = torch.randn(B, T, H, d, generator=gen)
    log_gamma = -torch.rand(B, T, H, d, generator=gen) * 2
    if extreme:
        log_gamma[:, ::3] = -50.0
        log_gamma[:, 1::4] = 0.0
    W_g = torch.randn(H, d, d, generator=gen) / d**0.5
    b_g = torch.randn(H, d, generator=gen)
    h0 = torch.randn(B, H, d, generator=gen)
    return [t.to(device) for t in (z, log_gamma, W_g, b_g, h0)]
