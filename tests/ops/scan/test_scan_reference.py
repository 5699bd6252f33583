"""I1 for the torch backend: the chunked scan equals the float64 sequential loop, forward and
backward. Both run through the public dispatcher (which clamps log_a and flattens the trailing
dims) with the backend forced; the dispatcher's own contract is tested in tests/core."""

import pytest
import torch

from mm_rec.core.associative_scan import associative_scan_exponential as scan


def rel_err(x, ref):
    return ((x.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30)).item()


def random_inputs(B, T, D, dtype=torch.float32, extreme=True):
    log_a = -torch.rand(B, T, D) * 4
    if extreme:  # decays at both clamps, and beyond them (must be clamped)
        log_a[:, ::5] = -50.0
        log_a[:, 1::7] = 0.0
        log_a[:, 2::11] = -80.0
        log_a[:, 3::13] = 0.5
    b = torch.randn(B, T, D)
    h0 = torch.randn(B, D)
    return log_a.to(dtype), b.to(dtype), h0


@pytest.mark.parametrize("T", [1, 2, 63, 64, 65, 67, 300, 1000])
@pytest.mark.parametrize("D", [1, 33])
def test_forward_matches_float64_loop(T, D):
    log_a, b, h0 = random_inputs(2, T, D)
    h, final = scan(log_a, b, h0, backend="torch")
    h_ref, final_ref = scan(log_a.double(), b.double(), h0.double(), backend="sequential")
    assert h.dtype == torch.float32 and final.dtype == torch.float32
    assert rel_err(h, h_ref) < 1e-5
    assert rel_err(final, final_ref) < 1e-5


def test_forward_32k_tokens():
    log_a, b, h0 = random_inputs(1, 32768, 3)
    h, final = scan(log_a, b, h0, backend="torch")
    h_ref, _ = scan(log_a.double(), b.double(), h0.double(), backend="sequential")
    assert rel_err(h, h_ref) < 1e-5


def test_slow_decay_long_sequence_keeps_precision():
    # Sum of log decays reaches ~ -1e4 over the sequence: a global cumsum would lose 1e-3.
    T = 20000
    log_a = torch.full((1, T, 2), -0.5) + 0.01 * torch.randn(1, T, 2)
    b = torch.randn(1, T, 2)
    h, _ = scan(log_a, b, backend="torch")
    h_ref, _ = scan(log_a.double(), b.double(), backend="sequential")
    assert rel_err(h, h_ref) < 1e-5


def test_bf16_inputs_accumulate_in_fp32():
    log_a, b, h0 = random_inputs(2, 300, 33, dtype=torch.bfloat16)
    h, final = scan(log_a, b, h0, backend="torch")
    assert h.dtype == torch.bfloat16 and final.dtype == torch.float32
    h_ref, _ = scan(log_a.double(), b.double(), h0.double(), backend="sequential")
    assert rel_err(h, h_ref) < 1e-2


@pytest.mark.parametrize("T", [1, 67, 300])
def test_gradients_match_float64_loop(T):
    log_a, b, h0 = random_inputs(2, T, 5)
    log_a = log_a.clamp(-50, 0)  # gradients inside the clamp range
    w_h, w_f = torch.randn(2, T, 5), torch.randn(2, 5)

    def grads(backend, dtype):
        leaves = [t.detach().to(dtype).clone().requires_grad_() for t in (log_a, b, h0)]
        h, final = scan(*leaves, backend=backend)
        ((h * w_h.to(dtype)).sum() + (final * w_f.to(dtype)).sum()).backward()
        return [leaf.grad for leaf in leaves]

    for got, ref in zip(grads("torch", torch.float32), grads("sequential", torch.float64)):
        assert rel_err(got, ref) < 1e-5


def test_gradcheck_float64():
    log_a = (-torch.rand(2, 37, 3, dtype=torch.float64) * 3).requires_grad_()
    b = torch.randn(2, 37, 3, dtype=torch.float64, requires_grad=True)
    h0 = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *x: scan(*x, backend="torch"), (log_a, b, h0))
