"""MDI: Memory Decay and Integration.

`LearnableDecay` turns the context modulation a_t into per-channel log decays
    log gamma_t = clamp(logsigmoid(beta + a_t), log_clamp_min, log_clamp_max)
entirely in log space and fp32. `MemoryIntegration` mixes the hierarchy's reads back into the
model width and gates them against the local state.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from mm_rec.config import MMRecConfig


class LearnableDecay(nn.Module):
    """Context-modulated decay.

    Parameters: beta [D] (sigma(beta) = decay_init at init); with `decay_rank` r > 0 the
    modulation arrives as [.., r] and an up-projection [r -> D] lifts it (low rank), otherwise
    it arrives as [.., D].
    """

    def __init__(self, config: MMRecConfig):
        super().__init__()
        D = config.hidden_dim
        self.log_clamp_min = config.log_clamp_min
        self.log_clamp_max = config.log_clamp_max
        self.decay_init = config.decay_init
        self.beta = nn.Parameter(torch.empty(D))
        self.up = nn.Linear(config.decay_rank, D, bias=False) if config.decay_rank else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.constant_(self.beta, math.log(self.decay_init / (1 - self.decay_init)))

    def forward(self, modulation: torch.Tensor) -> torch.Tensor:
        """modulation [..., r or D] -> log gamma [..., D] in fp32 (float64 for a float64 model)."""
        a = self.up(modulation) if self.up is not None else modulation
        a = a.to(torch.promote_types(a.dtype, torch.float32))
        return F.logsigmoid(self.beta.to(a.dtype) + a).clamp(self.log_clamp_min, self.log_clamp_max)


class MemoryIntegration(nn.Module):
    """Gated integration of the memory reads (docs/architecture.md, step 6).

    Per bank, learnable level weights (softmax over [attention read, level-2 read]) combine the
    level reads; the banks are projected back to D (`memory_t`), and a sigmoid gate mixes them
    with the normalised local state: o_t = g_t * memory_t + (1 - g_t) * h_hat_t.
    """

    NUM_LEVEL_READS = 2  # attention read (window and slots: levels 0, 1, 3), level-2 read

    def __init__(self, config: MMRecConfig):
        super().__init__()
        K, m = config.num_memories, config.mem_dim
        self.level_logits = nn.Parameter(torch.zeros(K, self.NUM_LEVEL_READS))
        self.memory_proj = nn.Linear(K * m, config.hidden_dim, bias=False)

    def reset_parameters(self) -> None:
        nn.init.zeros_(self.level_logits)  # no preference between the levels at init

    def forward(self, attention_read: torch.Tensor, level2_read: torch.Tensor, h_hat: torch.Tensor,
                gate_logits: torch.Tensor) -> torch.Tensor:
        """attention_read, level2_read [B, T, K, m]; h_hat, gate_logits [B, T, D] -> o [B, T, D]."""
        w = torch.softmax(self.level_logits.float(), dim=-1).to(attention_read.dtype)  # [K, 2]
        reads = w[:, 0, None] * attention_read + w[:, 1, None] * level2_read.to(attention_read.dtype)
        memory = self.memory_proj(reads.flatten(-2))
        gate = torch.sigmoid(gate_logits)
        return gate * memory + (1 - gate) * h_hat
