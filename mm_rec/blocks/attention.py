"""Multi-memory attention: each token reads, per bank, the slots of the S blocks before its own.

Token t in block j attends over the slots of blocks j-S .. j-1 (never its own unfinished
block: the recurrence covers that) plus an always-present null slot whose value is zero, so a
token with no visible slot reads zeros instead of NaN. A learnable per-bank bias on slot age,
-slope_k * (age - 1), lets banks specialise in different time scales. Cost per token:
O(S * m) per bank, independent of the sequence length.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from mm_rec.config import MMRecConfig
from mm_rec.core.hds import Hierarchy


class MultiMemoryAttention(nn.Module):
    """Block-causal reads of the HDS slot timeline (levels 1 and 3)."""

    def __init__(self, config: MMRecConfig):
        super().__init__()
        K = config.num_memories
        self.memory_size = config.memory_size_M
        self.scale = 1.0 / math.sqrt(config.mem_dim)
        # ALiBi-like geometric spread of slopes: bank 0 favours recent blocks, bank K-1 is flat-ish.
        self.log_age_slope = nn.Parameter(torch.empty(K))
        self.null_logit = nn.Parameter(torch.zeros(K))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        K = self.log_age_slope.numel()
        with torch.no_grad():
            self.log_age_slope.copy_(-(torch.arange(K, dtype=torch.float32) + 1) * (8.0 / K) * math.log(2))
            self.null_logit.zero_()

    def slot_probabilities(self, hierarchy: Hierarchy) -> tuple[torch.Tensor, torch.Tensor]:
        """Attention of every token over the slot timeline.

        Returns probs [B, K, T, N + 1] (the last column is the null slot) in fp32, and the slot
        ages [B, 1, T, N] in blocks (token block minus slot block; only 1..S are visible).
        """
        age = hierarchy.token_block[:, None, :, None] - hierarchy.slot_block[:, None, None, :]
        return self._probabilities(hierarchy), age

    def _probabilities(self, hierarchy: Hierarchy) -> torch.Tensor:
        """probs [B, K, T, N + 1] (fp32 at least), without materialising the ages.

        The age bias -slope * (age - 1), age = token_block[t] - slot_block[n], splits into a slot
        term slope * (slot_block[n] - ref) and a row term -slope * (token_block[t] - ref - 1); a
        softmax row is unchanged when the row term moves, with the opposite sign, onto the null
        slot's logit. So the [B, K, T, N] scores take one broadcast add instead of an age tensor
        (ref = each row's first token block keeps both terms as small as the ages).
        """
        q = hierarchy.queries.transpose(1, 2)  # [B, K, T, m]
        keys = hierarchy.slot_keys.to(q.dtype)
        acc = torch.promote_types(q.dtype, torch.float32)  # softmax in fp32 (float64 stays)
        token_block, slot_block = hierarchy.token_block, hierarchy.slot_block  # [B, T], [B, N]
        ref = token_block[:, :1]
        slope = self.log_age_slope.to(acc).exp().view(1, -1, 1, 1)  # [1, K, 1, 1]
        slot_bias = slope * (slot_block - ref).to(acc)[:, None, None, :]  # [B, K, 1, N]
        scores = torch.matmul(q * self.scale, keys.transpose(-1, -2)).to(acc) + slot_bias  # [B, K, T, N]
        tb, sb = token_block[:, None, :, None], slot_block[:, None, None, :]
        hidden = (sb >= tb) | (sb < tb - self.memory_size) | ~hierarchy.slot_valid[:, None, None, :]  # [B, 1, T, N]
        scores = scores.masked_fill(hidden, float("-inf"))
        null = self.null_logit.to(acc).view(1, -1, 1, 1) + slope * (token_block - ref - 1).to(acc)[:, None, :, None]
        return torch.softmax(torch.cat([scores, null], dim=-1), dim=-1)

    def forward(self, hierarchy: Hierarchy) -> torch.Tensor:
        """Returns the slot read [B, T, K, m] for every token and bank."""
        probs = self._probabilities(hierarchy)
        values = hierarchy.slot_values.to(hierarchy.queries.dtype)
        read = torch.matmul(probs[..., :-1].to(values.dtype), values)  # the null slot's value is 0
        return read.transpose(1, 2)  # [B, T, K, m]


HDSAttention = MultiMemoryAttention
