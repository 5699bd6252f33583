"""I2 for the torch backend: the loop of batched matmuls with its hand-written backward equals
the float64 loop, forward and backward. Both run through the public dispatcher with the backend
forced; the dispatcher's own contract is tested in tests/core."""

import pytest
import torch

from mm_rec.core.recurrence import mmrec_recurrence


def rel_err(x, ref):
    return ((x.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30)).item()


def random_inputs(B, T, H, d, extreme=False):
    z = torch.randn(B, T, H, d)
    log_gamma = -torch.rand(B, T, H, d) * 2
    if extreme:
        log_gamma[:, ::3] = -50.0
        log_gamma[:, 1::4] = 0.0
    W_g = torch.randn(H, d, d) / d**0.5
    b_g = torch.randn(H, d)
    h0 = torch.randn(B, H, d)
    return z, log_gamma, W_g, b_g, h0


@pytest.mark.parametrize("B,T,H,d", [(1, 1, 1, 1), (3, 37, 2, 5), (2, 130, 3, 16)])
@pytest.mark.parametrize("extreme", [False, True])
def test_torch_backend_matches_float64_loop(B, T, H, d, extreme):
    inputs = random_inputs(B, T, H, d, extreme)
    w_h, w_last = torch.randn(B, T, H, d), torch.randn(B, H, d)

    def run(backend, dtype):
        leaves = [t.detach().to(dtype).clone().requires_grad_() for t in inputs]
        h, h_last = mmrec_recurrence(*leaves, backend=backend)
        ((h * w_h.to(dtype)).sum() + (h_last * w_last.to(dtype)).sum()).backward()
        return [h, h_last] + [leaf.grad for leaf in leaves]

    names = ["h", "h_last", "dz", "dlog_gamma", "dW_g", "db_g", "dh0"]
    for name, got, ref in zip(names, run("torch", torch.float32), run("sequential", torch.float64)):
        assert rel_err(got, ref) < 1e-5, name


def test_recurrence_is_the_formula():
    # One explicit step, written out: h_1 = z_1 * sigmoid(h_0 W_g + b_g) + gamma_1 * h_0.
    z, log_gamma, W_g, b_g, h0 = (t.double() for t in random_inputs(2, 1, 3, 4))
    h, _ = mmrec_recurrence(z, log_gamma, W_g, b_g, h0, backend="torch")
    expected = z[:, 0] * torch.sigmoid(torch.einsum("bhd,hde->bhe", h0, W_g) + b_g) + log_gamma[:, 0].exp() * h0
    assert torch.allclose(h[:, 0], expected, atol=1e-12)


def test_gradcheck_float64():
    inputs = [t.double().requires_grad_() for t in random_inputs(2, 7, 2, 3)]
    assert torch.autograd.gradcheck(lambda *x: mmrec_recurrence(*x, backend="torch"), inputs)


def test_bf16_input_keeps_fp32_state():
    z, log_gamma, W_g, b_g, h0 = random_inputs(2, 20, 2, 8)
    h, h_last = mmrec_recurrence(z.bfloat16(), log_gamma, W_g, b_g, h0, backend="torch")
    assert h.dtype == torch.bfloat16 and h_last.dtype == torch.float32
    h_ref, _ = mmrec_recurrence(z.bfloat16().double(), log_gamma.double(), W_g.double(), b_g.double(),
                                h0.double(), backend="sequential")
    assert rel_err(h, h_ref) < 1e-2
