"""Multi-memory attention: each token reads, per bank, its window, the visible slots and a null slot.

One softmax per token and bank spans three kinds of entries (so the attention itself decides
where an answer lies):

* level 0, the window: the keys of the last W tokens, the token itself included, with a learnable
  per-bank bias -window_slope_k * distance (in tokens);
* levels 1 and 3, the slots the `Hierarchy` marks visible (never the token's own block), with a
  learnable per-bank bias on slot age, -slope_k * (age - 1) (age in blocks), plus the slot's
  learned importance when the ring keeps slots by importance;
* an always-present null slot whose value is zero, so a token with nothing to read reads zeros.

Cost per token: O((W + S) * m) per bank, independent of the sequence length. The window runs
blockwise (queries in blocks of L = min(W, T) tokens against the L + W keys that can reach them),
so memory is O(T * (L + W)), never O(T^2). `step` reads for one token per row in the decode
layout (decoding): the same logits, biases and softmax over W + S + 1 entries, with no timeline.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from mm_rec.config import MMRecConfig
from mm_rec.core.hds import Hierarchy, StepView


class MultiMemoryAttention(nn.Module):
    """The joint read of levels 0, 1 and 3 (see the module docstring)."""

    def __init__(self, config: MMRecConfig):
        super().__init__()
        K = config.num_memories
        self.memory_size = config.memory_size_M
        self.window_size = config.window_size
        self.chunk_size = config.chunk_size
        # Slot ages above the newest-by-age part's span (in blocks) count as that span: a slot kept
        # by importance competes on content and importance, with the bias of the ring's oldest slot.
        self.age_cap = (config.memory_size_M - config.kept_slots) // config.slots_per_block \
            if config.kept_slots and config.kept_age_bias == "capped" else None
        self.scale = 1.0 / math.sqrt(config.mem_dim)
        # ALiBi-like geometric spread of slopes: bank 0 favours recent blocks, bank K-1 is flat-ish.
        self.log_age_slope = nn.Parameter(torch.empty(K))
        self.null_logit = nn.Parameter(torch.zeros(K))
        if self.window_size:
            self.log_window_slope = nn.Parameter(torch.empty(K))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        K = self.log_age_slope.numel()
        with torch.no_grad():
            self.log_age_slope.copy_(-(torch.arange(K, dtype=torch.float32) + 1) * (8.0 / K) * math.log(2))
            self.null_logit.zero_()
            if self.window_size:  # the same spread per token: a block's slope over its C tokens
                self.log_window_slope.copy_(self.log_age_slope - math.log(self.chunk_size))

    def _slopes(self, acc: torch.dtype) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Per-bank [K] slopes of the age bias (per block) and of the window's distance bias (per token)."""
        window = self.log_window_slope.to(acc).exp() if self.window_size else None
        return self.log_age_slope.to(acc).exp(), window

    # ------------------------------------------------------------------ probabilities
    def read_probabilities(self, hierarchy: Hierarchy) -> dict[str, torch.Tensor]:
        """Attention of every token (fp32), for inspection:

        slots [B, K, T, N]: over the timeline slots; null [B, K, T]: the null slot;
        window [B, K, T, L + W] over the blocked window keys (None without a window) and
        window_distance [T, L + W]: each such key's distance in tokens (>= W where unused);
        slot_age [B, 1 or K, T, N]: slot ages in blocks (token block minus slot block).
        """
        probs, _, window_width = self._probabilities(hierarchy)
        B, K, nb, L, E = probs.shape
        T = hierarchy.queries.shape[1]
        N = hierarchy.slot_block.shape[-1]
        probs = probs.reshape(B, K, nb * L, E)[:, :, :T]
        age = hierarchy.token_block[:, None, :, None] - hierarchy.slot_block[:, :, None, :]
        slots = probs[..., window_width:]
        out = dict(slots=slots[..., :N], null=slots[..., N], slot_age=age, window=None)
        if window_width:
            out["window"] = probs[..., :window_width]
            t = torch.arange(T, device=probs.device)[:, None] % L
            out["window_distance"] = self.window_size + t - torch.arange(window_width, device=probs.device)
        return out

    def _probabilities(self, hierarchy: Hierarchy):
        """(probs [B, K, nb, L, E], values [B, K, nb, E, m], E_w): one softmax per token and bank over
        E = E_w + Wp entries, fp32 at least, with the tokens in nb blocks of L (the last one padded).

        The first E_w = L + W entries are the window (none without one): block i's queries against
        its L + W window keys, i L .. i L + L + W - 1 of [carried W | segment T] (masked outside the
        window and before the stream's start). Then the Wp slot entries, the same for every block:
        slot n < N is timeline slot n, entry N the null slot (key and value 0), and the entries after
        it are hidden padding that makes Wp a multiple of 8 (16-byte aligned bf16 rows for cuBLAS).
        Window and slot keys are concatenated per block, so the logits are one matmul, the softmax
        one tensor and the read one matmul: no concatenation or split of score-sized tensors.

        The age bias -slope * (age - 1), age = token_block[t] - slot_block[n], splits into a slot
        term slope * (slot_block[n] - ref) and a row term -slope * (token_block[t] - ref - 1); a
        softmax row is unchanged when the row term moves, with the opposite sign, onto the null
        slot's logit and the window's. So the slots take one broadcast bias instead of an age
        tensor (ref = each row's first token block keeps both terms as small as the ages).
        """
        q = hierarchy.queries.transpose(1, 2) * self.scale  # [B, K, T, m]
        B, K, T, m = q.shape
        W = self.window_size
        L = min(W, T) if W else T
        nb = -(-T // L)
        N = hierarchy.slot_block.shape[-1]
        Wp = N + 1 + (-(N + 1)) % 8
        acc = torch.promote_types(q.dtype, torch.float32)  # softmax in fp32 (float64 stays)
        pad_slots = lambda x: F.pad(x.to(q.dtype), (0, 0, 0, Wp - N))[:, :, None].expand(B, K, nb, Wp, m)
        keys, values = pad_slots(hierarchy.slot_keys), pad_slots(hierarchy.slot_values)  # [B, K, nb, Wp, m]
        if W:
            keys = _blocks(hierarchy.window_keys.to(q.dtype), nb, L, W, keys)  # [B, K, nb, L + W + Wp, m]
            values = _blocks(hierarchy.window_values.to(q.dtype), nb, L, W, values)
        q_blocks = _pad_tokens(q, nb * L).view(B, K, nb, L, m)
        scores = torch.matmul(q_blocks, keys.transpose(-1, -2)).to(acc)  # [B, K, nb, L, E]

        token_block, slot_block = hierarchy.token_block, hierarchy.slot_block  # [B, T], [B, k1, N]
        ref = token_block[:, :1]
        age_slope, window_slope = self._slopes(acc)
        slope = age_slope.view(1, -1, 1, 1)  # [1, K, 1, 1]
        slot_bias = slope * (slot_block - ref[:, :, None]).to(acc)[:, :, None, :]  # [B, K, 1, N]
        if self.age_cap is not None:  # + slope * (age - cap) where the age passes the cap: [B, K, T, N]
            age = token_block[:, None, :, None] - slot_block[:, :, None, :]
            slot_bias = slot_bias + slope * (age - self.age_cap).clamp_min(0).to(acc)
        if hierarchy.slot_importance is not None:
            slot_bias = slot_bias + hierarchy.slot_importance.to(acc)[:, :, None, :]
        group = hierarchy.token_group[:, None, :, None]  # [B, 1, T, 1]
        visible = hierarchy.slot_visible
        visible = visible.gather(2, group.expand(B, visible.shape[1], T, N))  # [B, k1, T, N]
        row_shift = slope[..., 0] * (token_block - ref - 1).to(acc)[:, None, :]  # [B, K, T]

        def blocked(x: torch.Tensor, value: float | bool = 0) -> torch.Tensor:
            """[B, k, T or 1, n] -> [B, k, nb or 1, L or 1, n], padded rows filled with `value`."""
            if x.shape[2] == 1:
                return x[:, :, None]
            return F.pad(x, (0, 0, 0, nb * L - T), value=value).unflatten(2, (nb, L))

        slot_bias = blocked(F.pad(slot_bias, (0, Wp - N)))
        hidden = ~blocked(F.pad(visible, (0, Wp - N), value=False), False)  # padded rows see only the null slot
        null_logit = blocked((self.null_logit.to(acc).view(1, -1, 1) + row_shift)[..., None])[..., 0]  # [B, K, nb, L]
        if W:
            j = torch.arange(L + W, device=q.device)
            distance = W + torch.arange(L, device=q.device)[:, None] - j  # [L, L + W]: tokens back
            outside = (distance < 0) | (distance >= W)
            # Only block 0 reaches before the stream's start: block i >= 1 starts at key i L >= W >= window_start
            before_start = j < hierarchy.window_start.view(B, 1, 1, 1)  # [B, 1, 1, L + W]
            window = (window_slope, distance.to(acc), outside, before_start, blocked(row_shift[..., None]))
        else:
            window = (None,) * 5
        scores = _ReadLogits.apply(scores, slot_bias, hidden, null_logit, N, *window)
        return torch.softmax(scores, dim=-1), values, (L + W if W else 0)

    # ------------------------------------------------------------------ read
    def forward(self, hierarchy: Hierarchy) -> torch.Tensor:
        """Returns the read [B, T, K, m] of every token and bank."""
        probs, values, _ = self._probabilities(hierarchy)
        B, K, nb, L, _ = probs.shape
        T = hierarchy.queries.shape[1]
        read = torch.matmul(probs.to(values.dtype), values)  # [B, K, nb, L, m]; null and padding values are 0
        return read.view(B, K, nb * L, -1)[:, :, :T].transpose(1, 2)  # [B, T, K, m]

    def step(self, view: StepView) -> torch.Tensor:
        """The read [B, K, m] of one token per row (`HDSHierarchy.step_token`): one softmax over the
        window ring (bias -window_slope * distance), the ring's slots of earlier blocks (bias
        -slope * (age - 1) plus importance) and the null slot. Scores and reads in fp32 (float64 for a
        float64 model; the mixer runs it with autocast off), whatever dtype the entries are held in: the
        ring is read once, never copied to a lower precision."""
        acc = torch.promote_types(torch.promote_types(view.slot_keys.dtype, view.queries.dtype), torch.float32)
        q = (view.queries.to(acc) * self.scale)[:, :, None, :]  # [B, K, 1, m]
        B, K = q.shape[:2]
        age_slope, window_slope = self._slopes(acc)
        age = (view.position // self.chunk_size)[:, None, None] - view.slot_block  # [B, k1, S]
        if self.age_cap is not None:
            age = age.clamp_max(self.age_cap)
        slot_bias = -age_slope[:, None] * (age - 1).to(acc)  # [B, K, S]
        if view.slot_importance is not None:
            slot_bias = slot_bias + view.slot_importance.to(acc)
        slot_scores = torch.matmul(q, view.slot_keys.to(acc).transpose(-1, -2))[:, :, 0] + slot_bias
        slot_scores = slot_scores.masked_fill(view.slot_block < 0, float("-inf"))  # empty slots
        scores = [slot_scores, self.null_logit.to(acc)[None, :, None].expand(B, K, 1)]
        if self.window_size:
            distance = view.window_distance  # [B, W]
            window_scores = torch.matmul(q, view.window_keys.to(acc).transpose(-1, -2))[:, :, 0]
            window_scores = window_scores - window_slope[:, None] * distance[:, None].to(acc)
            before_start = (distance > view.position[:, None])[:, None]  # [B, 1, W]
            scores.insert(0, window_scores.masked_fill(before_start, float("-inf")))
        probs = torch.softmax(torch.cat(scores, dim=-1), dim=-1)[:, :, None]  # [B, K, 1, W + S + 1]
        W, S = self.window_size, view.slot_keys.shape[2]
        read = torch.matmul(probs[..., W:W + S], view.slot_values.to(acc))  # the null slot's value is 0
        if W:
            read = read + torch.matmul(probs[..., :W], view.window_values.to(acc))
        return read[:, :, 0].to(view.queries.dtype)


HDSAttention = MultiMemoryAttention


def _pad_tokens(x: torch.Tensor, length: int) -> torch.Tensor:
    """x [B, K, n, m] zero-padded along dim 2 to `length` (x itself when it is that long already)."""
    return x if x.shape[2] == length else F.pad(x, (0, 0, 0, length - x.shape[2]))


def _blocks(x: torch.Tensor, nb: int, L: int, W: int, after: torch.Tensor) -> torch.Tensor:
    """Window keys or values x [B, K, W + T, m] -> [B, K, nb, L + W + n, m]: block i holds entries
    i L .. i L + L + W - 1 (zeros past the end), then after[:, :, i] ([B, K, nb, n, m]). With one block
    that is all of x; with more, L = W, so block i is chunks i and i + 1 of length L: one concatenation
    of views, whose backward is slices (an unfold's backward is a slow scatter-add on CPU)."""
    B, K, _, m = x.shape
    x = _pad_tokens(x, nb * L + W)
    if nb == 1:
        return torch.cat([x[:, :, None], after], dim=3)
    chunks = x.view(B, K, nb + 1, L, m)
    return torch.cat([chunks[:, :, :-1], chunks[:, :, 1:], after], dim=3)


class _ReadLogits(torch.autograd.Function):
    """The logits of the read, in place on the scores [B, K, nb, L, E] (E = E_w window entries, then
    Wp slot entries; E_w = 0 without a window):

    * slot entries: + slot_bias [B, K, nb or 1, L or 1, Wp], -inf where hidden [B, 1 or K, nb, L, Wp],
      then entry `null` replaced by null_logit [B, K, nb, L] (the null slot, always visible);
    * window entries: - slope [K] * distance [L, E_w] + shift [B, K, nb, L, 1], then -inf where
      `outside` [L, E_w] (beyond the window) and, in block 0, where `before_start` [B, 1, 1, E_w].

    The logits feed a softmax in which the hidden entries have probability 0, so their incoming
    gradient is exactly 0 and the backward needs no mask; the null entry's score is replaced, and
    its key is 0, so the gradient passed to the scores there reaches nothing. Autograd of the same
    expressions would write several score-sized tensors and reduce full-size gradients over the
    broadcast dimensions; here the slope's gradient is one reduction and a [K, L, E_w] product."""

    @staticmethod
    def forward(ctx, scores, slot_bias, hidden, null_logit, null, slope, distance, outside, before_start, shift):
        window_width = 0 if distance is None else distance.shape[-1]
        ctx.window_width, ctx.null, ctx.slot_bias_shape = window_width, null, slot_bias.shape
        ctx.save_for_backward(distance)
        ctx.mark_dirty(scores)
        slots = scores[..., window_width:]
        slots.add_(slot_bias).masked_fill_(hidden, float("-inf"))
        slots[..., null] = null_logit
        if window_width:
            window = scores[..., :window_width]
            bias = (slope.view(-1, 1, 1) * -distance).masked_fill_(outside, float("-inf"))  # [K, L, E_w]
            window.add_(bias[:, None]).add_(shift)
            window[:, :, 0].masked_fill_(before_start, float("-inf"))
        return scores

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        (distance,) = ctx.saved_tensors
        window_width = ctx.window_width
        slots = grad[..., window_width:]
        d_null_logit = slots[..., ctx.null]
        reduce = [d for d, (g, b) in enumerate(zip(slots.shape, ctx.slot_bias_shape)) if b == 1 and g != 1]
        d_slot_bias = slots.sum(reduce, keepdim=True) if reduce else slots
        d_slope = d_shift = None
        if window_width:
            window = grad[..., :window_width]
            d_slope = -(window.sum((0, 2)) * distance).sum((-1, -2))  # [K]
            d_shift = window.sum(-1, keepdim=True)
        return grad, d_slot_bias, None, d_null_logit, None, d_slope, None, None, None, d_shift
