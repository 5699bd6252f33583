"""HDS: the hierarchical dual memory (docs/architecture.md, step 4).

Each bank k (K banks, dimension m) gets a query, key and value per token from the mixer (the block
input through a short convolution, or RMSNorm(h) in the state-input ablation). From them this
module lays out what the multi-memory attention reads and what the state carries:

* level 0, the window: keys and values of the last W tokens (carried) followed by the segment's,
  which the attention reads exactly at token granularity (W = window_size; 0 switches it off);
* level 1, block slots: the stream is cut into blocks of C tokens at absolute positions, each
  block into r sub-slots of C / r tokens; a completed sub-slot holds a pooled key and value: the
  plain mean (slot_write=mean) or a learned attention pooling whose weights
  w_t = exp(5 tanh(k_t . u_k / (5 sqrt(m)))) start equal (u_k = 0), so it starts as the mean;
* level 2, the sequence level: a gated delta-rule matrix memory per bank
  S_t = alpha_t S_{t-1} (I - beta_t k_t k_t^T) + beta_t v_t k_t^T read as S_t q_t (unit-norm q, k),
  or the decayed mean G_t = lambda G_{t-1} + (1 - lambda) v_t (level2=mean);
* level 3, the long-term memory M: a ring of S sub-slots carried across segments. With
  retention=age it holds the newest S; with retention=learned the newest R = recent_slots by age
  and, of the older ones, the P = S - R with the highest learned importance
  i = k_slot . u_imp / sqrt(m) + b_imp (ties: the newer first; at init every importance is equal,
  so the ring starts as an age ring). The importance is also added to the slot's attention logit,
  which is what teaches it: slots that get read gain importance and are kept.

Levels 1 and 3 are one ring seen at two ages. `build_hierarchy` lays the carried ring and the
sub-slots completed inside the segment on one "timeline" and says which of them each token sees:
never a block it is still inside (the window covers that), the R newest by age, and the kept
ones. Because importances are fixed at write time, the kept set at block j is the top P of all
sub-slots that left the recent part before j, so it does not depend on where segments start.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from mm_rec.config import MMRecConfig
from mm_rec.core.associative_scan import associative_scan_exponential
from mm_rec.core.memory_state import EMPTY_SLOT, LayerState
from mm_rec.ops.delta_rule import gated_delta_rule

POOLING_CAP = 5.0  # pooling scores are soft-capped to [-5, 5]: exp never overflows, no running max


@dataclass
class Hierarchy:
    """What `HDSHierarchy.build_hierarchy` returns for a segment of T tokens (N timeline slots,
    J = blocks the segment touches, k1 = K when the visibility differs per bank, else 1).

    queries        [B, T, K, m]    per-token, per-bank queries
    level2         [B, T, K, m]    level-2 read of every token (S_t q_t, or G_t)
    window_keys    [B, K, W+T, m]  level 0: the carried window, then the segment's keys / values
    window_values  [B, K, W+T, m]    (None when window_size = 0)
    window_start   [B]             first index of window_keys that lies inside the stream
    slot_keys      [B, K, N, m]    timeline of sub-slots: the carried ring (S: P kept, then the
    slot_values    [B, K, N, m]      newest by age), then the sub-slots of blocks in the segment
    slot_block     [B, k1, N]      absolute block index of every timeline slot (-1: empty)
    slot_importance [B, K, N]      learned importance (None with retention=age)
    slot_visible   [B, k1, J, N]   which slots the tokens of each block see
    token_block    [B, T]          absolute block index of every token
    token_group    [B, T]          index of the token's block among the J
    carried        the LayerState pieces this module owns, after the segment
    position       [B]             stream position of the segment's first token
    write_weights  [B, T, K]       attention-pooling weight of every token (None: the plain mean)
    level2_gates   (alpha, beta)   [B, T, K] each: the delta rule's decay and write strength (or None)
    """

    queries: torch.Tensor
    level2: torch.Tensor
    window_keys: torch.Tensor | None
    window_values: torch.Tensor | None
    window_start: torch.Tensor
    slot_keys: torch.Tensor
    slot_values: torch.Tensor
    slot_block: torch.Tensor
    slot_importance: torch.Tensor | None
    slot_visible: torch.Tensor
    token_block: torch.Tensor
    token_group: torch.Tensor
    carried: dict[str, torch.Tensor]
    position: torch.Tensor | None = None
    write_weights: torch.Tensor | None = None
    level2_gates: tuple[torch.Tensor, torch.Tensor] | None = None


class HDSHierarchy(nn.Module):
    """Builds levels 0-3 of one layer's memory from the segment's per-token queries, keys and values."""

    def __init__(self, config: MMRecConfig):
        super().__init__()
        K, m = config.num_memories, config.mem_dim
        self.num_memories, self.mem_dim = K, m
        self.chunk_size, self.memory_size = config.chunk_size, config.memory_size_M
        self.slots_per_block, self.kept_slots = config.slots_per_block, config.kept_slots
        self.window_size = config.window_size
        self.level2_kind, self.slot_write = config.level2, config.slot_write
        self.log_clamp_min = config.log_clamp_min
        if config.memory_input in ("state", "both"):  # q/k/v from RMSNorm(h)
            self.qkv = nn.Linear(config.hidden_dim, 3 * K * m, bias=False)
        if config.level2 == "mean":
            # lambda_k = sigmoid(aggregate_logit_k); time constants spread over C * 2^k tokens.
            self.aggregate_logit = nn.Parameter(torch.empty(K))
        else:  # delta rule: alpha_t, beta_t from the mixer's gate logits plus these biases
            self.delta_decay_bias = nn.Parameter(torch.empty(K))
            self.delta_write_bias = nn.Parameter(torch.empty(K))
        if config.slot_write == "attention":
            self.write_query = nn.Parameter(torch.empty(K, m))
        if self.kept_slots:
            self.importance_query = nn.Parameter(torch.empty(K, m))
            self.importance_bias = nn.Parameter(torch.empty(K))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Banks start on different time scales; pooling starts as the mean; importances start
        equal (the ring then behaves as an age ring until reads teach it otherwise)."""
        C, K = self.chunk_size, self.num_memories
        with torch.no_grad():
            if self.level2_kind == "mean":
                tau = C * 2.0 ** torch.arange(K, dtype=torch.float64)
                lam = 1.0 - 1.0 / (1.0 + tau)
                self.aggregate_logit.copy_(torch.log(lam / (1 - lam)))
            else:  # alpha_k = 1 - 1 / tau_k with tau_k = C * 4^k tokens; beta starts at 1/2
                tau = C * 4.0 ** torch.arange(K, dtype=torch.float64)
                self.delta_decay_bias.copy_(torch.log(tau - 1.0))  # logit(1 - 1/tau)
                self.delta_write_bias.zero_()
            if self.slot_write == "attention":
                self.write_query.zero_()
            if self.kept_slots:
                self.importance_query.zero_()
                self.importance_bias.zero_()

    # ------------------------------------------------------------------ the segment
    def build_hierarchy(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, state: LayerState,
                        position: torch.Tensor, delta_gates: torch.Tensor | None = None) -> Hierarchy:
        """q, k, v [B, T, K, m] for stream positions position[b] .. position[b] + T - 1; delta_gates
        [B, T, 2K] (decay and write logits, level2=delta). Returns the Hierarchy of the segment."""
        carried: dict[str, torch.Tensor] = {}
        level2, gates = self._level2(q, k, v, state, delta_gates, carried)
        window_keys, window_values, window_start = self._window(k, v, state, position, carried)
        weights = self._pooling_weights(k)
        slots = self._slot_timeline(k, v, weights, state, position, carried)
        return Hierarchy(queries=q, level2=level2, window_keys=window_keys, window_values=window_values,
                         window_start=window_start, carried=carried, position=position, write_weights=weights,
                         level2_gates=gates,
                         **slots)

    def _level2(self, q, k, v, state: LayerState, delta_gates, carried):
        """The level-2 read [B, T, K, m] and, for the delta rule, its (alpha, beta) [B, T, K]."""
        B, T, K, m = v.shape
        if self.level2_kind == "mean":  # G_t = lambda G_{t-1} + (1 - lambda) v_t, in log space
            acc = state.aggregate.dtype
            log_lam = F.logsigmoid(self.aggregate_logit.to(acc)).view(1, 1, K, 1)
            one_minus_lam = -torch.expm1(log_lam)
            aggregate, carried["aggregate"] = associative_scan_exponential(
                log_lam.expand(B, T, K, m), one_minus_lam * v.to(acc), state.aggregate)
            return aggregate, None
        acc = state.delta_memory.dtype
        decay_logits, write_logits = delta_gates.to(acc).view(B, T, 2, K).unbind(2)
        log_alpha = F.logsigmoid(decay_logits + self.delta_decay_bias.to(acc)).clamp(min=self.log_clamp_min)
        beta = torch.sigmoid(write_logits + self.delta_write_bias.to(acc))
        read, carried["delta_memory"] = gated_delta_rule(F.normalize(q, dim=-1), F.normalize(k, dim=-1), v,
                                                         log_alpha, beta, state.delta_memory)
        return read, (log_alpha.exp(), beta)

    def _window(self, k, v, state: LayerState, position, carried):
        """Level 0: the last W tokens' keys and values before the segment, then the segment's."""
        W = self.window_size
        if not W:
            return None, None, position
        keys = torch.cat([state.window_keys, k.transpose(1, 2).to(state.window_keys.dtype)], dim=2)  # [B, K, W+T, m]
        values = torch.cat([state.window_values, v.transpose(1, 2).to(state.window_values.dtype)], dim=2)
        carried["window_keys"], carried["window_values"] = keys[:, :, -W:], values[:, :, -W:]
        return keys, values, (W - position).clamp(min=0)

    def _pooling_weights(self, k: torch.Tensor) -> torch.Tensor | None:
        """[B, T, K] soft-capped attention-pooling weights, or None for the plain mean."""
        if self.slot_write == "mean":
            return None
        score = (k * self.write_query.to(k.dtype)).sum(-1) / self.mem_dim ** 0.5
        return torch.exp(POOLING_CAP * torch.tanh(score / POOLING_CAP))

    def _slot_timeline(self, k, v, weights, state: LayerState, position, carried) -> dict[str, torch.Tensor | None]:
        B, T, K, m = k.shape
        C, S, r, P = self.chunk_size, self.memory_size, self.slots_per_block, self.kept_slots
        R, sub_len = S - P, C // r  # slots kept by age; tokens per sub-slot
        device, acc = k.device, state.slot_keys.dtype
        ar = torch.arange(T, device=device)
        n_start = position // C  # completed blocks before the segment = index of the open block
        offset = position % C  # tokens of the open block already consumed
        num_rel = (T + C - 1) // C + 1  # upper bound on the blocks the segment touches
        num_sub = num_rel * r

        # Level 1: pooled sums per sub-slot by scatter (exact; no differences of running sums).
        wk, wv = (k, v) if weights is None else (k * weights[..., None], v * weights[..., None])
        index = ((offset[:, None] + ar) // sub_len)[:, :, None, None].expand(B, T, K, m)
        key_sum = torch.zeros(B, num_sub, K, m, device=device, dtype=acc).scatter_add(1, index, wk.to(acc))
        value_sum = torch.zeros_like(key_sum).scatter_add(1, index, wv.to(acc))
        # The open block's tokens from earlier segments were summed into the state.
        to_first_block = (0, 0, 0, 0, 0, num_sub - r)
        key_sum = key_sum + F.pad(state.block_key_sum.transpose(1, 2), to_first_block)
        value_sum = value_sum + F.pad(state.block_value_sum.transpose(1, 2), to_first_block)
        completed = (offset + T) // C  # [B] blocks that close inside the segment
        open_index = (completed[:, None] * r + torch.arange(r, device=device))[:, :, None, None].expand(B, r, K, m)
        carried["block_key_sum"] = key_sum.gather(1, open_index).transpose(1, 2)  # [B, K, r, m]
        carried["block_value_sum"] = value_sum.gather(1, open_index).transpose(1, 2)
        if weights is None:
            new_keys, new_values = key_sum / sub_len, value_sum / sub_len
        else:
            weight_sum = torch.zeros(B, num_sub, K, device=device, dtype=acc)
            weight_sum = weight_sum.scatter_add(1, index[..., 0], weights.to(acc))
            weight_sum = weight_sum + F.pad(state.block_weight_sum.transpose(1, 2), (0, 0, 0, num_sub - r))
            carried["block_weight_sum"] = weight_sum.gather(1, open_index[..., 0]).transpose(1, 2)  # [B, K, r]
            norm = weight_sum.clamp_min(torch.finfo(acc).tiny)[..., None]  # open sub-slots may be empty
            new_keys, new_values = key_sum / norm, value_sum / norm
        slot_keys = torch.cat([state.slot_keys, new_keys.transpose(1, 2)], dim=2)  # [B, K, N, m]
        slot_values = torch.cat([state.slot_values, new_values.transpose(1, 2)], dim=2)

        # Slot ids (block * r + sub-slot): kept part from the state, the newest-by-age part and the
        # segment's sub-slots follow from the position. From index P on the ids are consecutive.
        first_recent = (n_start - R // r) * r
        recent_ids = first_recent[:, None] + torch.arange(R, device=device)
        new_ids = n_start[:, None] * r + torch.arange(num_sub, device=device)
        ids = torch.cat([recent_ids, new_ids], dim=1)[:, None]  # [B, 1, R + num_sub]
        new_complete = torch.arange(num_sub, device=device)[None] // r < completed[:, None]
        valid = torch.cat([recent_ids >= 0, new_complete], dim=1)[:, None]
        if P:
            ids = torch.cat([state.slot_ids, ids.expand(B, K, -1)], dim=2)  # [B, K, N]
            valid = torch.cat([state.slot_ids >= 0, valid.expand(B, K, -1)], dim=2)
        slot_block = torch.where(ids >= 0, ids.div(r, rounding_mode="floor"), EMPTY_SLOT)

        # Visibility by block: the R newest sub-slots of earlier blocks, then (P > 0) the kept ones.
        group_block = n_start[:, None] + torch.arange(num_rel, device=device)  # [B, J]
        sb, gb = slot_block[:, :, None, :], group_block[:, None, :, None]  # [B, k1, 1, N], [B, 1, J, 1]
        visible = valid[:, :, None, :] & (sb < gb) & (sb >= gb - R // r)
        ring_start = P + completed * r  # new ring (by age): timeline[P + completed r : P + completed r + R]
        age_index = (ring_start[:, None] + torch.arange(R, device=device))[:, None, :, None].expand(B, K, R, m)
        importance = None
        if P:
            imp_new = (new_keys * self.importance_query.to(acc)).sum(-1) / self.mem_dim ** 0.5 \
                + self.importance_bias.to(acc)  # [B, num_sub, K]
            importance = torch.cat([state.slot_importance, imp_new.transpose(1, 2)], dim=2)  # [B, K, N]
            order = _priority_order(ids, importance, valid)
            eligible = valid[:, :, None, :] & (sb < gb - R // r)  # [B, K, J, N]
            eligible_sorted = eligible.gather(3, order[:, :, None, :].expand_as(eligible))
            kept_sorted = _first_true(eligible_sorted, P)  # the top P eligible
            visible = visible | torch.zeros_like(kept_sorted).scatter(3, order[:, :, None, :].expand_as(eligible),
                                                                      kept_sorted)
            # The kept part after the segment: the top P of the slots older than the new ring.
            end_eligible = (valid & (slot_block < (n_start + completed - R // r)[:, None, None])).gather(2, order)
            first = torch.sort(~end_eligible, dim=2, stable=True).indices[:, :, :P]  # eligible first, in order
            chosen, ok = order.gather(2, first), end_eligible.gather(2, first)  # [B, K, P]
            pick = chosen[..., None].expand(B, K, P, m)
            carried["slot_ids"] = torch.where(ok, ids.gather(2, chosen), EMPTY_SLOT)
            kept_importance = torch.where(ok, importance.gather(2, chosen), 0.0)
            carried["slot_importance"] = torch.cat([kept_importance, importance.gather(2, age_index[..., 0])], dim=2)
            kept_keys = torch.where(ok[..., None], slot_keys.gather(2, pick), 0.0)
            kept_values = torch.where(ok[..., None], slot_values.gather(2, pick), 0.0)
            carried["slot_keys"] = torch.cat([kept_keys, slot_keys.gather(2, age_index)], dim=2)
            carried["slot_values"] = torch.cat([kept_values, slot_values.gather(2, age_index)], dim=2)
        else:
            carried["slot_keys"] = slot_keys.gather(2, age_index)
            carried["slot_values"] = slot_values.gather(2, age_index)
        token_group = (offset[:, None] + ar) // C
        return dict(slot_keys=slot_keys, slot_values=slot_values, slot_block=slot_block, slot_importance=importance,
                    slot_visible=visible, token_block=n_start[:, None] + token_group, token_group=token_group)


@torch.compiler.disable  # torch 2.11's inductor fails on this cumsum's tiling ("Unexpected tiling") on CUDA
def _first_true(mask: torch.Tensor, count: int) -> torch.Tensor:
    """mask with only its first `count` True entries along the last dim kept."""
    return mask & (mask.cumsum(-1) <= count)


def _priority_order(ids: torch.Tensor, importance: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """[B, K, N] timeline indices sorted by importance (highest first), ties by id (newest first),
    invalid slots last: one total order, so the kept set is the same however the stream is split."""
    by_id = torch.sort(ids, dim=2, descending=True, stable=True).indices
    priority = torch.where(valid, importance, float("-inf")).gather(2, by_id)
    return by_id.gather(2, torch.sort(priority, dim=2, descending=True, stable=True).indices)
