"""MDI: the decay parameterisation and the gated integration."""

import math

import torch

from mm_rec.config import MMRecConfig
from mm_rec.core.mdi import LearnableDecay, MemoryIntegration


def test_decay_starts_at_decay_init_and_stays_in_clamp_range():
    cfg = MMRecConfig(hidden_dim=16, num_heads=2, decay_init=0.97, log_clamp_min=-3.0)
    decay = LearnableDecay(cfg)
    log_gamma = decay(torch.zeros(4, 16))
    torch.testing.assert_close(log_gamma.exp(), torch.full((4, 16), 0.97))
    extreme = decay(torch.tensor([[-1e4] * 16, [1e4] * 16]))
    assert extreme.dtype == torch.float32
    assert extreme.min() == -3.0 and extreme.max() <= 0.0


def test_decay_is_logsigmoid_of_beta_plus_modulation_and_low_rank_lifts():
    cfg = MMRecConfig(hidden_dim=16, num_heads=2, decay_rank=3)
    decay = LearnableDecay(cfg)
    a = torch.randn(5, 3)
    expected = torch.nn.functional.logsigmoid(decay.beta + a @ decay.up.weight.T).clamp(-50, 0)
    torch.testing.assert_close(decay(a), expected)
    full_rank = LearnableDecay(MMRecConfig(hidden_dim=16, num_heads=2))
    assert full_rank(torch.randn(5, 16).bfloat16()).dtype == torch.float32  # log space is fp32


def test_decay_gradient_reaches_beta():
    decay = LearnableDecay(MMRecConfig(hidden_dim=8, num_heads=2))
    decay(torch.randn(3, 8)).sum().backward()
    assert decay.beta.grad.abs().min() > 0


def test_integration_is_a_gate_between_memory_and_local_state():
    cfg = MMRecConfig(hidden_dim=8, num_heads=2, num_memories=3, mem_dim=4)
    integ = MemoryIntegration(cfg).double()
    slot, agg = torch.randn(2, 5, 3, 4, dtype=torch.float64), torch.randn(2, 5, 3, 4, dtype=torch.float64)
    h_hat, gate = torch.randn(2, 5, 8, dtype=torch.float64), torch.randn(2, 5, 8, dtype=torch.float64)
    w = torch.softmax(integ.level_logits, -1)
    memory = integ.memory_proj((w[:, 0, None] * slot + w[:, 1, None] * agg).flatten(-2))
    g = torch.sigmoid(gate)
    torch.testing.assert_close(integ(slot, agg, h_hat, gate), g * memory + (1 - g) * h_hat)
    # Gate fully closed -> the local state passes through unchanged.
    torch.testing.assert_close(integ(slot, agg, h_hat, torch.full_like(gate, -1e4)), h_hat)
    assert math.isclose(float(w.detach().sum()), 3.0)
