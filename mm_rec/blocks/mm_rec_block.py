"""The MM-Rec block: x = x + Mixer(RMSNorm(x), state); x = x + FFN(RMSNorm(x)).

The mixer runs the seven steps of DESIGN.md section 2:
  1. one fused input projection -> z_t (recurrence input), a_t (decay modulation), gate logits;
  2. MDI decay: log gamma_t = clamp(logsigmoid(beta + a_t)) in fp32;
  3. core recurrence per head: h_t = z_t * sigmoid(h_{t-1} W_g + b_g) + gamma_t * h_{t-1};
  4. HDS build from h_hat = RMSNorm(h): block slots, sequence aggregate, long-term ring;
  5. multi-memory attention over the slot timeline;
  6. MDI integration: o_t = g_t * memory_t + (1 - g_t) * h_hat_t, then the output projection;
  7. the new layer state (h_T, partial block sums, ring, G_T).
"""

from __future__ import annotations

import torch
from torch import nn

from mm_rec.blocks.attention import MultiMemoryAttention
from mm_rec.blocks.layers import RMSNorm, SwiGLU
from mm_rec.config import MMRecConfig
from mm_rec.core.associative_scan import associative_scan_exponential
from mm_rec.core.hds import HDSHierarchy
from mm_rec.core.mdi import LearnableDecay, MemoryIntegration
from mm_rec.core.memory_state import MemoryBank
from mm_rec.core.recurrence import mmrec_recurrence


class MMRecMixer(nn.Module):
    """Steps 1-7 on a normalised input x [B, T, D] with the layer's carried `MemoryBank`."""

    def __init__(self, config: MMRecConfig):
        super().__init__()
        D, H, d = config.hidden_dim, config.num_heads, config.head_dim
        self.num_heads, self.head_dim = H, d
        self.gate_input = config.gate_input
        self.split_sizes = (D, config.decay_modulation_dim, D)  # z, decay modulation, gate logits
        self.in_proj = nn.Linear(D, sum(self.split_sizes), bias=False)
        self.decay = LearnableDecay(config)
        self.W_g = nn.Parameter(torch.empty(H, d, d))
        self.b_g = nn.Parameter(torch.zeros(H, d))
        self.state_norm = RMSNorm(D, config.norm_eps)
        self.hds = HDSHierarchy(config)
        self.attention = MultiMemoryAttention(config)
        self.integration = MemoryIntegration(config)
        self.out_proj = nn.Linear(D, D, bias=False)
        self.recurrence_backend = "auto"

    def forward(self, x: torch.Tensor, bank: MemoryBank, position: torch.Tensor) -> tuple[torch.Tensor, MemoryBank]:
        B, T, D = x.shape
        H, d = self.num_heads, self.head_dim
        z, modulation, gate_logits = self.in_proj(x).split(self.split_sizes, dim=-1)
        log_gamma = self.decay(modulation).view(B, T, H, d)
        z = z.view(B, T, H, d)
        if self.gate_input == "state":
            h, h_last = mmrec_recurrence(z, log_gamma, self.W_g, self.b_g, bank.h, backend=self.recurrence_backend)
        else:  # ablation: sigma(z_t W_g + b_g) does not depend on h, so the recurrence is linear
            gate = torch.sigmoid(torch.einsum("bthd,hde->bthe", z.to(self.W_g.dtype), self.W_g) + self.b_g)
            h, h_last = associative_scan_exponential(log_gamma, z * gate.to(z.dtype), bank.h)
        h_hat = self.state_norm(h.reshape(B, T, D))
        hierarchy = self.hds.build_hierarchy(h_hat, bank, position)
        slot_read = self.attention(hierarchy)
        mixed = self.integration(slot_read, hierarchy.aggregate, h_hat, gate_logits)
        new_bank = hierarchy.new_bank
        new_bank.h = h_last
        return self.out_proj(mixed), new_bank


class MMRecBlock(nn.Module):
    """Pre-norm residual block: the MM-Rec mixer, then a SwiGLU FFN."""

    def __init__(self, config: MMRecConfig):
        super().__init__()
        self.mixer_norm = RMSNorm(config.hidden_dim, config.norm_eps)
        self.mixer = MMRecMixer(config)
        self.ffn_norm = RMSNorm(config.hidden_dim, config.norm_eps)
        self.ffn = SwiGLU(config.hidden_dim, config.ffn_dim)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor, bank: MemoryBank, position: torch.Tensor) -> tuple[torch.Tensor, MemoryBank]:
        """x [B, T, D] at stream positions position[b] + t -> (x [B, T, D], new bank)."""
        mixed, new_bank = self.mixer(self.mixer_norm(x), bank, position)
        x = x + self.dropout(mixed)
        x = x + self.dropout(self.ffn(self.ffn_norm(x)))
        return x, new_bank
