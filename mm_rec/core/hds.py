"""HDS: the hierarchical dual memory (DESIGN.md section 2, step 4).

Level 0 is the recurrence state h (see `mm_rec.core.recurrence`). From h_hat = RMSNorm(h) each
bank k gets a query, key and value per token (dimension m) and three levels are built:

* level 1, block slots: the stream is cut into blocks of C tokens at absolute positions; a
  completed block yields one slot (mean key, mean value);
* level 2, sequence aggregate: G_t = lambda * G_{t-1} + (1 - lambda) * v_t per bank, a linear
  recurrence solved by the associative scan;
* level 3, long-term memory M: the ring of the S most recent block slots, carried in the state.

Levels 1 and 3 are one ring seen at two ages. `build_hierarchy` lays the carried ring and the
blocks completed inside the segment on one chronological "timeline" of slots that the
attention reads with a block-causal mask.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from mm_rec.config import MMRecConfig
from mm_rec.core.associative_scan import associative_scan_exponential
from mm_rec.core.memory_state import MemoryBank


@dataclass
class Hierarchy:
    """What `HDSHierarchy.build_hierarchy` returns for a segment of T tokens.

    queries        [B, T, K, m]  per-token, per-bank queries
    aggregate      [B, T, K, m]  level 2: G_t for every token
    slot_keys      [B, K, N, m]  timeline of slots: the carried ring (S, oldest first), then the
    slot_values    [B, K, N, m]    blocks that start inside the segment (N = S + blocks_upper_bound)
    slot_block     [B, N]        absolute block index of every timeline slot
    slot_valid     [B, N]        slot exists (index >= 0 and the block is complete)
    token_block    [B, T]        absolute block index of every token
    new_bank       MemoryBank    the layer's state after the segment (h left to the caller)
    """

    queries: torch.Tensor
    aggregate: torch.Tensor
    slot_keys: torch.Tensor
    slot_values: torch.Tensor
    slot_block: torch.Tensor
    slot_valid: torch.Tensor
    token_block: torch.Tensor
    new_bank: MemoryBank


class HDSHierarchy(nn.Module):
    """Builds levels 1-3 from the normalised recurrence states of one segment."""

    def __init__(self, config: MMRecConfig):
        super().__init__()
        self.num_memories = K = config.num_memories
        self.mem_dim = config.mem_dim
        self.chunk_size = config.chunk_size
        self.memory_size = config.memory_size_M
        self.qkv = nn.Linear(config.hidden_dim, 3 * K * config.mem_dim, bias=False)
        # lambda_k = sigmoid(aggregate_logit_k); time constants spread over C * 2^k tokens.
        self.aggregate_logit = nn.Parameter(torch.empty(K))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        tau = self.chunk_size * 2.0 ** torch.arange(self.num_memories, dtype=torch.float64)
        lam = 1.0 - 1.0 / (1.0 + tau)
        with torch.no_grad():
            self.aggregate_logit.copy_(torch.log(lam / (1 - lam)))

    def build_hierarchy(self, h_hat: torch.Tensor, bank: MemoryBank, position: torch.Tensor) -> Hierarchy:
        """h_hat [B, T, D] for positions position[b] .. position[b] + T - 1 of each stream."""
        B, T, _ = h_hat.shape
        K, m, C, S = self.num_memories, self.mem_dim, self.chunk_size, self.memory_size
        q, k, v = self.qkv(h_hat).view(B, T, 3, K, m).unbind(2)  # each [B, T, K, m]
        acc = bank.aggregate.dtype

        # Level 2: G_t = lambda G_{t-1} + (1 - lambda) v_t, per bank, in log space.
        log_lam = F.logsigmoid(self.aggregate_logit.to(acc)).view(1, 1, K, 1)
        one_minus_lam = -torch.expm1(log_lam)
        aggregate, aggregate_last = associative_scan_exponential(
            log_lam.expand(B, T, K, m), one_minus_lam * v.to(acc), bank.aggregate)

        # Level 1: block sums by scatter (exact; no differences of running sums).
        ar = torch.arange(T, device=h_hat.device)
        n_start = position // C  # completed blocks before the segment = index of the open block
        offset = position % C  # tokens of the open block already consumed
        rel_block = (offset[:, None] + ar) // C  # [B, T] block index relative to n_start
        num_rel = (T + C - 1) // C + 1  # upper bound on blocks the segment touches
        index = rel_block[:, :, None, None].expand(B, T, K, m)
        key_sum = torch.zeros(B, num_rel, K, m, device=h_hat.device, dtype=acc).scatter_add(1, index, k.to(acc))
        value_sum = torch.zeros_like(key_sum).scatter_add(1, index, v.to(acc))
        # The open block's tokens from earlier segments were summed into the state.
        to_first_block = (0, 0, 0, 0, 0, num_rel - 1)
        key_sum = key_sum + F.pad(bank.block_key_sum[:, None], to_first_block)
        value_sum = value_sum + F.pad(bank.block_value_sum[:, None], to_first_block)
        completed = (offset + T) // C  # [B] blocks that close inside the segment
        open_index = completed[:, None, None, None].expand(B, 1, K, m)
        new_key_sum = key_sum.gather(1, open_index).squeeze(1)
        new_value_sum = value_sum.gather(1, open_index).squeeze(1)

        # Timeline: carried ring (blocks n_start-S .. n_start-1), then blocks n_start .. .
        rel = torch.arange(num_rel, device=h_hat.device)
        slot_keys = torch.cat([bank.slot_keys, (key_sum / C).transpose(1, 2)], dim=2)  # [B, K, N, m]
        slot_values = torch.cat([bank.slot_values, (value_sum / C).transpose(1, 2)], dim=2)
        ring_block = n_start[:, None] - S + torch.arange(S, device=h_hat.device)
        slot_block = torch.cat([ring_block, n_start[:, None] + rel], dim=1)  # [B, N]
        slot_valid = torch.cat([ring_block >= 0, rel[None, :] < completed[:, None]], dim=1)

        # New ring: the S most recent completed slots = timeline[completed : completed + S].
        ring_index = (completed[:, None] + torch.arange(S, device=h_hat.device))[:, None, :, None].expand(B, K, S, m)
        new_bank = MemoryBank(
            h=bank.h,
            aggregate=aggregate_last,
            block_key_sum=new_key_sum,
            block_value_sum=new_value_sum,
            slot_keys=slot_keys.gather(2, ring_index),
            slot_values=slot_values.gather(2, ring_index),
        )
        return Hierarchy(queries=q, aggregate=aggregate, slot_keys=slot_keys, slot_values=slot_values,
                         slot_block=slot_block, slot_valid=slot_valid,
                         token_block=n_start[:, None] + rel_block, new_bank=new_bank)
