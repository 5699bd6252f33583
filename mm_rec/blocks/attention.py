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
import torch.nn.functional as F
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
        N = hierarchy.slot_block.shape[1]
        age = hierarchy.token_block[:, None, :, None] - hierarchy.slot_block[:, None, None, :]
        probs, _ = self._probabilities(hierarchy)
        return probs[..., : N + 1], age

    def _probabilities(self, hierarchy: Hierarchy) -> tuple[torch.Tensor, torch.Tensor]:
        """probs [B, K, T, W] (fp32 at least) and the matching values [B, K, W, m], where W >= N + 1.

        Column n < N is timeline slot n, column N the null slot (key and value 0), and the
        columns after it are hidden padding that makes W a multiple of 8: the bf16 matmuls then
        get 16-byte aligned rows (cuBLAS falls back to much slower kernels otherwise), and no
        slicing or concatenation of the [B, K, T, W] tensors is needed.

        The age bias -slope * (age - 1), age = token_block[t] - slot_block[n], splits into a slot
        term slope * (slot_block[n] - ref) and a row term -slope * (token_block[t] - ref - 1); a
        softmax row is unchanged when the row term moves, with the opposite sign, onto the null
        slot's logit. So the scores take one broadcast add instead of an age tensor (ref = each
        row's first token block keeps both terms as small as the ages).
        """
        q = hierarchy.queries.transpose(1, 2)  # [B, K, T, m]
        N = hierarchy.slot_block.shape[1]
        W = N + 1 + (-(N + 1)) % 8
        keys = F.pad(hierarchy.slot_keys.to(q.dtype), (0, 0, 0, W - N))  # [B, K, W, m]
        values = F.pad(hierarchy.slot_values.to(q.dtype), (0, 0, 0, W - N))
        acc = torch.promote_types(q.dtype, torch.float32)  # softmax in fp32 (float64 stays)
        token_block, slot_block = hierarchy.token_block, hierarchy.slot_block  # [B, T], [B, N]
        ref = token_block[:, :1]
        slope = self.log_age_slope.to(acc).exp().view(1, -1, 1, 1)  # [1, K, 1, 1]
        slot_bias = F.pad(slope * (slot_block - ref).to(acc)[:, None, None, :], (0, W - N))  # [B, K, 1, W]
        scores = torch.matmul(q * self.scale, keys.transpose(-1, -2)) + slot_bias  # [B, K, T, W] in acc
        tb, sb = token_block[:, None, :, None], F.pad(slot_block, (0, W - N))[:, None, None, :]
        valid = F.pad(hierarchy.slot_valid, (0, W - N), value=False)[:, None, None, :]
        hidden = (sb >= tb) | (sb < tb - self.memory_size) | ~valid  # [B, 1, T, W]; column N is set below
        # In place (the sum is saved by no one): eager mode then makes no more full-size copies
        # than a concatenation with the null column would.
        scores.masked_fill_(hidden, float("-inf"))
        null = self.null_logit.to(acc).view(1, -1, 1) + slope[..., 0] * (token_block - ref - 1).to(acc)[:, None, :]
        scores[..., N] = null  # [B, K, T]: the null slot's logit, always visible
        return torch.softmax(scores, dim=-1), values

    def forward(self, hierarchy: Hierarchy) -> torch.Tensor:
        """Returns the slot read [B, T, K, m] for every token and bank."""
        probs, values = self._probabilities(hierarchy)
        read = torch.matmul(probs.to(values.dtype), values)  # the null slot's and the padding's values are 0
        return read.transpose(1, 2)  # [B, T, K, m]


HDSAttention = MultiMemoryAttention
