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

Decoding runs one token at a time on the same state in the *decode layout* (`to_decode_layout`),
where nothing moves: the window is a ring in which the token at position p sits at index p mod W,
the age part of the ring holds sub-slot id s at index P + s mod R, and the kept part is unordered.
`step_token` writes the token into the window, the level-2 memory and the open block's pooling
sums (in place) and returns what the attention reads; `step_close_block` then, when the token
closes its block, writes the block's sub-slots over the ones they push out of the age part, which
enter the kept part if they outrank its least important slot (the tie rule of `_priority_order`).
Every choice is a tensor op on static shapes (no host sync), so the step can be captured in a
CUDA graph; its cost does not depend on the position.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from mm_rec.config import MMRecConfig
from mm_rec.core.associative_scan import associative_scan_exponential, associative_scan_step
from mm_rec.core.memory_state import EMPTY_SLOT, LayerState
from mm_rec.ops.delta_rule import delta_rule_step, gated_delta_rule

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


@dataclass
class StepView:
    """What `HDSHierarchy.step_token` returns for one token per row (decode layout; k1 = K when the
    kept part differs per bank, else 1): what `MultiMemoryAttention.step` reads.

    queries         [B, K, m]      the token's queries
    level2          [B, K, m]      its level-2 read
    position        [B]            its stream position
    window_keys     [B, K, W, m]   the ring of the last W tokens, the token itself included
    window_values   [B, K, W, m]     (None when window_size = 0)
    window_distance [B, W]         how many tokens back each window entry lies (0: this token);
                                   entries with distance > position lie before the stream's start
    slot_keys       [B, K, S, m]   the ring as the token's block found it (its own block not in it)
    slot_values     [B, K, S, m]
    slot_block      [B, k1, S]     absolute block of every ring slot (-1: empty)
    slot_importance [B, K, S]      learned importance (None with retention=age)
    """

    queries: torch.Tensor
    level2: torch.Tensor
    position: torch.Tensor
    window_keys: torch.Tensor | None
    window_values: torch.Tensor | None
    window_distance: torch.Tensor | None
    slot_keys: torch.Tensor
    slot_values: torch.Tensor
    slot_block: torch.Tensor
    slot_importance: torch.Tensor | None


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
            self.undecayed_banks = config.undecayed_banks  # the last ones keep alpha = 1 exactly
            self.delta_decay_scale = float(config.delta_decay_scale)  # alpha^s (evaluation at long contexts)
            self.delta_backend = "auto"  # gated_delta_rule's backend (DELTA_BACKENDS): Triton pass on CUDA
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
            log_lam, one_minus_lam = self._aggregate_decay(acc)
            aggregate, carried["aggregate"] = associative_scan_exponential(
                log_lam.expand(B, T, K, m), one_minus_lam * v.to(acc), state.aggregate)
            return aggregate, None
        acc = state.delta_memory.dtype
        log_alpha, beta = self._delta_gates(delta_gates, acc)
        read, carried["delta_memory"] = gated_delta_rule(_unit(q), _unit(k), v, log_alpha, beta,
                                                         state.delta_memory, backend=self.delta_backend)
        return read, (log_alpha.exp(), beta)

    def _aggregate_decay(self, acc: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """level2=mean: (log lambda, 1 - lambda) [K, 1] per bank."""
        log_lam = F.logsigmoid(self.aggregate_logit.to(acc))[:, None]
        return log_lam, -torch.expm1(log_lam)

    def _delta_gates(self, delta_gates: torch.Tensor, acc: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """The delta rule's (log alpha, beta) [..., K] from the mixer's logits [..., 2K] and the per-bank biases."""
        decay_logits, write_logits = delta_gates.to(acc).unflatten(-1, (2, self.num_memories)).unbind(-2)
        log_alpha = F.logsigmoid(decay_logits + self.delta_decay_bias.to(acc)).clamp(min=self.log_clamp_min)
        if self.delta_decay_scale != 1.0:
            log_alpha = log_alpha * self.delta_decay_scale
        if self.undecayed_banks:
            decayed = self.num_memories - self.undecayed_banks
            log_alpha = torch.cat([log_alpha[..., :decayed], torch.zeros_like(log_alpha[..., decayed:])], dim=-1)
        return log_alpha, torch.sigmoid(write_logits + self.delta_write_bias.to(acc))

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
        """Keys [..., K, m] -> [..., K] soft-capped attention-pooling weights, or None for the plain mean."""
        if self.slot_write == "mean":
            return None
        score = (k * self.write_query.to(k.dtype)).sum(-1) / self.mem_dim ** 0.5
        return torch.exp(POOLING_CAP * torch.tanh(score / POOLING_CAP))

    def _pool(self, key_sum: torch.Tensor, value_sum: torch.Tensor,
              weight_sum: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Sub-slot keys and values from their pooling sums [..., m] (weights [...]; None: the plain mean
        of C / r tokens). A sub-slot not yet written has weight 0 and reads as zeros."""
        if weight_sum is None:
            sub_len = self.chunk_size // self.slots_per_block
            return key_sum / sub_len, value_sum / sub_len
        norm = weight_sum.clamp_min(torch.finfo(weight_sum.dtype).tiny)[..., None]
        return key_sum / norm, value_sum / norm

    def _importance(self, keys: torch.Tensor) -> torch.Tensor:
        """Slot keys [..., K, m] -> learned importance [..., K] (fixed when the slot is written)."""
        acc = keys.dtype
        return (keys * self.importance_query.to(acc)).sum(-1) / self.mem_dim ** 0.5 + self.importance_bias.to(acc)

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
        weight_sum = None
        if weights is not None:
            weight_sum = torch.zeros(B, num_sub, K, device=device, dtype=acc)
            weight_sum = weight_sum.scatter_add(1, index[..., 0], weights.to(acc))
            weight_sum = weight_sum + F.pad(state.block_weight_sum.transpose(1, 2), (0, 0, 0, num_sub - r))
            carried["block_weight_sum"] = weight_sum.gather(1, open_index[..., 0]).transpose(1, 2)  # [B, K, r]
        new_keys, new_values = self._pool(key_sum, value_sum, weight_sum)  # [B, num_sub, K, m]
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
            imp_new = self._importance(new_keys)  # [B, num_sub, K]
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


    # ------------------------------------------------------------------ one token (decoding)
    def step_token(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, state: LayerState,
                   position: torch.Tensor, delta_gates: torch.Tensor | None = None) -> StepView:
        """q, k, v [B, K, m] of one token per row at stream positions `position` [B]; delta_gates [B, 2K]
        (level2=delta). `state` is in the decode layout and is updated in place: the level-2 memory, the
        window (the token written at index position % W) and the open block's pooling sums. The ring is
        left as it is until `step_close_block`, which the caller runs after the attention read."""
        B, K, m = k.shape
        C, W, r = self.chunk_size, self.window_size, self.slots_per_block
        acc = state.block_key_sum.dtype  # the state's dtype (the window's and ring's entries may be narrower)
        level2 = self._level2_step(q, k, v, state, delta_gates)
        distance = None
        if W:
            at = (position % W)[:, None, None, None].expand(B, K, 1, m)
            state.window_keys.scatter_(2, at, k.to(state.window_keys.dtype)[:, :, None])
            state.window_values.scatter_(2, at, v.to(state.window_values.dtype)[:, :, None])
            distance = (position[:, None] - torch.arange(W, device=k.device)) % W  # [B, W]
        weights = self._pooling_weights(k)  # [B, K] or None
        wk, wv = (k, v) if weights is None else (k * weights[..., None], v * weights[..., None])
        sub = ((position % C) // (C // r))[:, None, None, None].expand(B, K, 1, m)  # the open sub-slot
        state.block_key_sum.scatter_add_(2, sub, wk.to(acc)[:, :, None])
        state.block_value_sum.scatter_add_(2, sub, wv.to(acc)[:, :, None])
        if weights is not None:
            state.block_weight_sum.scatter_add_(2, sub[..., 0], weights.to(acc)[:, :, None])
        return StepView(queries=q, level2=level2, position=position, window_keys=state.window_keys,
                        window_values=state.window_values, window_distance=distance, slot_keys=state.slot_keys,
                        slot_values=state.slot_values, slot_block=self._ring_blocks(state, position),
                        slot_importance=state.slot_importance)

    def step_close_block(self, state: LayerState, position: torch.Tensor) -> None:
        """After the token at `position` [B] was read: in the rows where it closes its block, the block's r
        sub-slots enter the age part of the ring (decode layout, in place), each over the sub-slot it
        pushes out, which enters the kept part when it outranks the kept part's least important slot;
        then the open block's sums restart. Masked writes: no branch on tensor values."""
        C, S, r, P = self.chunk_size, self.memory_size, self.slots_per_block, self.kept_slots
        R = S - P
        B, K, _, m = state.block_key_sum.shape
        closes = (position + 1) % C == 0  # [B]
        if S:
            keys, values = self._pool(state.block_key_sum, state.block_value_sum, state.block_weight_sum)  # [B,K,r,m]
            ids = (position // C)[:, None] * r + torch.arange(r, device=position.device)  # [B, r] the block's sub-slots
            at = (P + ids % R)[:, None, :].expand(B, K, r)  # their ring slots, where the ones they push out sit
            at_vectors = at[..., None].expand(B, K, r, m)
            if P:
                leaving = (state.slot_keys.gather(2, at_vectors), state.slot_values.gather(2, at_vectors),
                           state.slot_importance.gather(2, at))
                for i in range(r):  # one at a time: each insertion keeps the top P, so all of them do
                    self._keep(state, leaving[0][:, :, i], leaving[1][:, :, i], leaving[2][:, :, i],
                               ids[:, i] - R, closes & (ids[:, i] >= R))
                importance = self._importance(keys.transpose(1, 2)).transpose(1, 2)  # [B, K, r]
                _masked_write(state.slot_importance, at, importance, closes[:, None, None])
            _masked_write(state.slot_keys, at_vectors, keys, closes[:, None, None, None])
            _masked_write(state.slot_values, at_vectors, values, closes[:, None, None, None])
        state.block_key_sum.masked_fill_(closes[:, None, None, None], 0.0)
        state.block_value_sum.masked_fill_(closes[:, None, None, None], 0.0)
        if state.block_weight_sum is not None:
            state.block_weight_sum.masked_fill_(closes[:, None, None], 0.0)

    def _keep(self, state: LayerState, key: torch.Tensor, value: torch.Tensor, importance: torch.Tensor,
              slot_id: torch.Tensor, enters: torch.Tensor) -> None:
        """Offer one sub-slot (key, value [B, K, m], importance [B, K], id [B]; rows where `enters` [B]) to
        the kept part: it replaces the kept slot of lowest priority (an empty one first, then the lowest
        importance, then the oldest) unless that one outranks it. It is newer than every kept slot, so
        it wins a tie in importance (the order of `_priority_order`)."""
        B, K, m = key.shape
        P = self.kept_slots
        ids, kept_importance = state.slot_ids, state.slot_importance[:, :, :P]  # [B, K, P]
        filled = ids >= 0
        priority = torch.where(filled, kept_importance, float("-inf"))
        lowest = priority.amin(-1, keepdim=True)
        evict = torch.where(priority == lowest, ids, torch.iinfo(ids.dtype).max).argmin(-1, keepdim=True)  # [B, K, 1]
        wins = ~filled.gather(2, evict) | (importance[..., None] >= kept_importance.gather(2, evict))
        wins = wins & enters[:, None, None]
        _masked_write(state.slot_ids, evict, slot_id[:, None, None].expand(B, K, 1), wins)
        _masked_write(state.slot_importance, evict, importance[..., None], wins)
        at = evict[..., None].expand(B, K, 1, m)
        _masked_write(state.slot_keys, at, key[:, :, None], wins[..., None])
        _masked_write(state.slot_values, at, value[:, :, None], wins[..., None])

    def _level2_step(self, q, k, v, state: LayerState, delta_gates) -> torch.Tensor:
        """One token of level 2 (in place on the state): the read [B, K, m]."""
        if self.level2_kind == "mean":
            acc = state.aggregate.dtype
            log_lam, one_minus_lam = self._aggregate_decay(acc)  # [K, 1]
            aggregate = associative_scan_step(log_lam, one_minus_lam * v.to(acc), state.aggregate)
            state.aggregate.copy_(aggregate)
            return aggregate
        acc = state.delta_memory.dtype
        log_alpha, beta = self._delta_gates(delta_gates, acc)  # [B, K]
        read, memory = delta_rule_step(_unit(q).to(acc), _unit(k).to(acc), v.to(acc),
                                       log_alpha, beta, state.delta_memory)
        state.delta_memory.copy_(memory)
        return read.to(v.dtype)

    def _ring_blocks(self, state: LayerState, position: torch.Tensor) -> torch.Tensor:
        """[B, k1, S] absolute block of every ring slot (decode layout) before the block of `position`
        closes; -1 for an empty slot."""
        ids = age_ring_ids(position, self.chunk_size, self.slots_per_block, self.memory_size - self.kept_slots)
        ids = ids[:, None]  # [B, 1, R]
        if self.kept_slots:
            ids = torch.cat([state.slot_ids, ids.expand(-1, state.slot_ids.shape[1], -1)], dim=2)
        return torch.where(ids >= 0, ids.div(self.slots_per_block, rounding_mode="floor"), EMPTY_SLOT)


def _unit(x: torch.Tensor) -> torch.Tensor:
    """x / max(|x|, 1e-12) over the last dim (F.normalize's result) as one product: its backward is
    multiplications, not F.normalize's divisions (slow on CPUs)."""
    return x * torch.rsqrt(x.square().sum(-1, keepdim=True).clamp_min(1e-24))


def _masked_write(buffer: torch.Tensor, index: torch.Tensor, values: torch.Tensor, mask: torch.Tensor) -> None:
    """buffer[index] = values where `mask` (broadcast against values), along dim 2, in place: a write of a
    few entries that leaves the others (and the masked-out rows) as they are."""
    buffer.scatter_(2, index, torch.where(mask, values.to(buffer.dtype), buffer.gather(2, index)))


# ---------------------------------------------------------------------- decode layout
def age_ring_ids(position: torch.Tensor, chunk_size: int, slots_per_block: int, recent: int) -> torch.Tensor:
    """[B, R] id (block * r + sub-slot) of the sub-slot in each index of the ring's age part (decode
    layout: id s at index s mod R) at stream positions `position` [B]: the R newest completed sub-slots,
    negative where fewer have been completed."""
    if not recent:
        return position.new_zeros(position.shape[0], 0)
    first = (position // chunk_size * slots_per_block - recent)[:, None]  # the oldest id of the age part
    return first + (torch.arange(recent, device=position.device) - first) % recent


def _layout_index(position: torch.Tensor, config: MMRecConfig) -> tuple[torch.Tensor | None, torch.Tensor]:
    """For each index i of the documented layout, the decode layout's index: window [B, W] (entry i of
    the window, oldest first, is the token at position - W + i, at index (position + i) mod W) and age
    part [B, R] (entry i is sub-slot completed_blocks * r - R + i, at index (completed_blocks * r + i) mod R)."""
    W, R = config.window_size, config.memory_size_M - config.kept_slots
    window = (position[:, None] + torch.arange(W, device=position.device)) % W if W else None
    completed = position // config.chunk_size * config.slots_per_block
    age = (completed[:, None] + torch.arange(R, device=position.device)) % R if R else position.new_zeros(
        position.shape[0], 0)
    return window, age


def _permute(x: torch.Tensor, index: torch.Tensor, to_decode: bool) -> torch.Tensor:
    """Reorder dim 2 of x [B, K, n, ...] by the permutation `index` [B, n] (documented index -> decode index)."""
    index = index[:, None].expand(x.shape[:3])
    index = index.reshape(*index.shape, *([1] * (x.dim() - 3))).expand(x.shape)
    return torch.empty_like(x).scatter_(2, index, x) if to_decode else x.gather(2, index)


def to_decode_layout(state: LayerState, position: torch.Tensor, config: MMRecConfig) -> LayerState:
    """A copy of one layer's state (the documented layout, oldest first) in the decode layout at stream
    positions `position` [B] (module docstring). `from_decode_layout` is its inverse."""
    return _convert(state, position, config, to_decode=True)


def from_decode_layout(state: LayerState, position: torch.Tensor, config: MMRecConfig) -> LayerState:
    """A copy of one layer's state in the decode layout in the documented one: the window and the age part
    oldest first, the kept part by priority (importance, then the newer first; empty slots last), as the
    segment path leaves them."""
    return _convert(state, position, config, to_decode=False)


def _convert(state: LayerState, position: torch.Tensor, config: MMRecConfig, to_decode: bool) -> LayerState:
    window_index, age_index = _layout_index(position, config)
    # no autograd history; contiguous (the forward's carried sums are transposed views), which the fused
    # decoding kernel (mm_rec/ops/memory_step) relies on
    values = {name: tensor.detach().clone(memory_format=torch.contiguous_format)
              for name, tensor in state.tensors().items()}
    if window_index is not None:
        for name in ("window_keys", "window_values"):
            values[name] = _permute(values[name], window_index, to_decode)
    P = config.kept_slots
    for name in ("slot_keys", "slot_values", "slot_importance"):
        tensor = values.get(name)
        if tensor is not None:
            values[name] = torch.cat([tensor[:, :, :P], _permute(tensor[:, :, P:], age_index, to_decode)], dim=2)
    if P and not to_decode:
        ids = values["slot_ids"]
        order = _priority_order(ids, values["slot_importance"][:, :, :P], ids >= 0)  # [B, K, P]
        values["slot_ids"] = ids.gather(2, order)
        for name in ("slot_keys", "slot_values", "slot_importance"):
            tensor = values[name]
            index = order.reshape(*order.shape, *([1] * (tensor.dim() - 3))).expand(*order.shape, *tensor.shape[3:])
            values[name] = torch.cat([tensor[:, :, :P].gather(2, index), tensor[:, :, P:]], dim=2)
    return LayerState(**values)


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
