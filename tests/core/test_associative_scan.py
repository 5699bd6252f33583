"""The public scan dispatcher: argument checks, clamping, defaults, shapes and backend choice.
The backends' numerics (I1) are tested beside them, in tests/ops/scan/."""

import pytest
import torch

import mm_rec
from mm_rec.core.associative_scan import associative_scan_exponential as scan
from mm_rec.ops import BACKENDS
from mm_rec.ops.scan import AssociativeScanExponential


def rel_err(x, ref):
    return ((x.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30)).item()


def test_no_initial_state_means_zeros_and_trailing_dims_are_kept():
    log_a, b = -torch.rand(3, 17, 2, 3) * 4, torch.randn(3, 17, 2, 3)
    h, final = scan(log_a, b, backend="torch")
    h_ref, _ = scan(log_a, b, torch.zeros(3, 2, 3), backend="sequential")
    assert h.shape == (3, 17, 2, 3) and final.shape == (3, 2, 3)
    assert rel_err(h, h_ref) < 1e-5


@pytest.mark.parametrize("backend", ["torch", "sequential"])
def test_log_a_is_clamped_to_the_clamp_range(backend):
    log_a, b = torch.randn(2, 9, 4) * 60, torch.randn(2, 9, 4)  # far beyond [-50, 0] both ways
    h, final = scan(log_a, b, backend=backend)
    h_ref, final_ref = scan(log_a.clamp(-50.0, 0.0), b, backend=backend)
    assert torch.equal(h, h_ref) and torch.equal(final, final_ref)
    h_tight, _ = scan(log_a, b, backend=backend, log_clamp_min=-1.0)
    h_tight_ref, _ = scan(log_a.clamp(-1.0, 0.0), b, backend=backend)
    assert torch.equal(h_tight, h_tight_ref)


def test_auto_runs_the_torch_backend_on_cpu_tensors():
    log_a, b, h0 = -torch.rand(2, 70, 5), torch.randn(2, 70, 5), torch.randn(2, 5)
    for got, ref in zip(scan(log_a, b, h0), scan(log_a, b, h0, backend="torch")):
        assert torch.equal(got, ref)


def test_public_names():
    assert mm_rec.AssociativeScanExponential is AssociativeScanExponential
    assert BACKENDS == ("auto", "torch", "triton", "cuda", "sequential")


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="same shape"):
        scan(torch.zeros(1, 3, 2), torch.zeros(1, 3, 3))
    with pytest.raises(ValueError, match="backend"):
        scan(torch.zeros(1, 3, 2), torch.zeros(1, 3, 2), backend="cudnn")
    with pytest.raises(ValueError, match="initial_state"):
        scan(torch.zeros(1, 3, 2), torch.zeros(1, 3, 2), torch.zeros(2, 2))
    with pytest.raises(ValueError, match="T >= 1"):
        scan(torch.zeros(1, 0, 2), torch.zeros(1, 0, 2))
