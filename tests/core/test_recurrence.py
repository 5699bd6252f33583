"""The public recurrence dispatcher: argument checks, defaults and backend choice. The backends'
numerics (I2) are tested beside them, in tests/ops/recurrence/."""

import pytest
import torch

from mm_rec.core.recurrence import mmrec_recurrence


def rel_err(x, ref):
    return ((x.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30)).item()


def random_inputs(B, T, H, d):
    """z, log_gamma (<= 0), W_g, b_g, h0."""
    return (torch.randn(B, T, H, d), -torch.rand(B, T, H, d) * 2, torch.randn(H, d, d) / d**0.5,
            torch.randn(H, d), torch.randn(B, H, d))


def test_defaults_are_zero_state_and_zero_bias():
    z, log_gamma, W_g, _, _ = random_inputs(2, 9, 2, 4)
    h, _ = mmrec_recurrence(z, log_gamma, W_g, backend="torch")
    h_ref, _ = mmrec_recurrence(z, log_gamma, W_g, torch.zeros(2, 4), torch.zeros(2, 2, 4), backend="sequential")
    assert rel_err(h, h_ref) < 1e-6


def test_auto_runs_the_torch_backend_on_cpu_tensors():
    inputs = random_inputs(2, 7, 2, 4)
    for got, ref in zip(mmrec_recurrence(*inputs), mmrec_recurrence(*inputs, backend="torch")):
        assert torch.equal(got, ref)


def test_shape_errors_are_clear():
    z, log_gamma, W_g, b_g, h0 = random_inputs(2, 5, 2, 4)
    with pytest.raises(ValueError, match="W_g"):
        mmrec_recurrence(z, log_gamma, W_g[:, :3], b_g, h0)
    with pytest.raises(ValueError, match="initial_state"):
        mmrec_recurrence(z, log_gamma, W_g, b_g, h0[:1])
    with pytest.raises(ValueError, match="backend"):
        mmrec_recurrence(z, log_gamma, W_g, b_g, h0, backend="cudnn")
