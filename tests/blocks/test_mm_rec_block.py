"""The MM-Rec block: gradcheck, and the gate_input ablation equals its definition."""

import torch

from mm_rec.blocks.mm_rec_block import MMRecBlock
from mm_rec.config import MMRecConfig
from mm_rec.core.memory_state import MemoryBank


def tiny_block(**overrides):
    cfg = MMRecConfig(**{**dict(hidden_dim=8, num_heads=2, num_memories=2, mem_dim=3, memory_size_M=2,
                                chunk_size=3, ffn_dim=6, num_layers=1, decay_rank=2), **overrides})
    return cfg, MMRecBlock(cfg).double()


def fresh_bank(cfg, B):
    return MemoryBank.zeros(B, cfg.num_heads, cfg.head_dim, cfg.num_memories, cfg.mem_dim, cfg.memory_size_M,
                            dtype=torch.float64)


def test_gradcheck_one_tiny_block():
    cfg, block = tiny_block()
    x = torch.randn(2, 10, 8, dtype=torch.float64, requires_grad=True)
    bank = fresh_bank(cfg, 2)
    h0 = torch.randn(2, 2, 4, dtype=torch.float64, requires_grad=True)
    position = torch.tensor([0, 2])

    def f(x, h0):
        bank.h = h0
        y, new_bank = block(x, bank, position)
        return y, new_bank.h, new_bank.slot_keys, new_bank.aggregate

    assert torch.autograd.gradcheck(f, (x, h0))


def test_gate_input_ablation_is_a_linear_recurrence():
    cfg, block = tiny_block(gate_input="input")
    mixer = block.mixer
    x = torch.randn(1, 7, 8, dtype=torch.float64)
    z, modulation, _ = mixer.in_proj(x).split(mixer.split_sizes, -1)
    z = z.view(1, 7, 2, 4)
    gamma = mixer.decay(modulation).exp().view(1, 7, 2, 4)
    h, states = torch.zeros(1, 2, 4, dtype=torch.float64), []
    for t in range(7):  # h_t = z_t * sigmoid(z_t W_g + b_g) + gamma_t * h_{t-1}
        h = z[:, t] * torch.sigmoid(torch.einsum("bhd,hde->bhe", z[:, t], mixer.W_g) + mixer.b_g) + gamma[:, t] * h
        states.append(h)
    _, bank = mixer(x, fresh_bank(cfg, 1), torch.zeros(1, dtype=torch.long))
    torch.testing.assert_close(bank.h, states[-1])
