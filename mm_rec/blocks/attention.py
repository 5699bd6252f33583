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
        window_probs, probs, _, _ = self._probabilities(hierarchy)
        N = hierarchy.slot_block.shape[-1]
        T = hierarchy.queries.shape[1]
        age = hierarchy.token_block[:, None, :, None] - hierarchy.slot_block[:, :, None, :]
        out = dict(slots=probs[..., :N], null=probs[..., N], slot_age=age, window=window_probs)
        if window_probs is not None:
            L = window_probs.shape[-1] - self.window_size
            t = torch.arange(T, device=probs.device)[:, None] % L
            out["window_distance"] = self.window_size + t - torch.arange(L + self.window_size, device=probs.device)
        return out

    def _probabilities(self, hierarchy: Hierarchy):
        """(window probs [B, K, T, L + W] or None, slot probs [B, K, T, Wp], slot values [B, K, Wp, m],
        blocked window values [B, K, nb, L + W, m] or None), one softmax over both, fp32 at least.

        Slot column n < N is timeline slot n, column N the null slot (key and value 0), and the
        columns after it are hidden padding that makes Wp a multiple of 8: the bf16 matmuls then
        get 16-byte aligned rows (cuBLAS falls back to much slower kernels otherwise), and no
        slicing or concatenation of the [B, K, T, Wp] tensors is needed.

        The age bias -slope * (age - 1), age = token_block[t] - slot_block[n], splits into a slot
        term slope * (slot_block[n] - ref) and a row term -slope * (token_block[t] - ref - 1); a
        softmax row is unchanged when the row term moves, with the opposite sign, onto the null
        slot's logit and the window's. So the scores take one broadcast add instead of an age
        tensor (ref = each row's first token block keeps both terms as small as the ages).
        """
        q = hierarchy.queries.transpose(1, 2) * self.scale  # [B, K, T, m]
        B, K, T, _ = q.shape
        N = hierarchy.slot_block.shape[-1]
        Wp = N + 1 + (-(N + 1)) % 8
        keys = F.pad(hierarchy.slot_keys.to(q.dtype), (0, 0, 0, Wp - N))  # [B, K, Wp, m]
        values = F.pad(hierarchy.slot_values.to(q.dtype), (0, 0, 0, Wp - N))
        acc = torch.promote_types(q.dtype, torch.float32)  # softmax in fp32 (float64 stays)
        token_block, slot_block = hierarchy.token_block, hierarchy.slot_block  # [B, T], [B, k1, N]
        ref = token_block[:, :1]
        slope = self._slopes(acc)[0].view(1, -1, 1, 1)  # [1, K, 1, 1]
        slot_bias = slope * (slot_block - ref[:, :, None]).to(acc)[:, :, None, :]  # [B, K, 1, N]
        if self.age_cap is not None:  # + slope * (age - cap) where the age passes the cap: [B, K, T, N]
            age = token_block[:, None, :, None] - slot_block[:, :, None, :]
            slot_bias = slot_bias + slope * (age - self.age_cap).clamp_min(0).to(acc)
        if hierarchy.slot_importance is not None:
            slot_bias = slot_bias + hierarchy.slot_importance.to(acc)[:, :, None, :]
        scores = torch.matmul(q, keys.transpose(-1, -2)) + F.pad(slot_bias, (0, Wp - N))  # [B, K, T, Wp] in acc
        group = hierarchy.token_group[:, None, :, None]  # [B, 1, T, 1]
        visible = hierarchy.slot_visible
        visible = visible.gather(2, group.expand(B, visible.shape[1], T, N))  # [B, k1, T, N]
        hidden = ~F.pad(visible, (0, Wp - N), value=False)  # column N is set below
        # In place (the sum is saved by no one): eager mode then makes no more full-size copies
        # than a concatenation with the null column would.
        scores.masked_fill_(hidden, float("-inf"))
        row_shift = slope[..., 0] * (token_block - ref - 1).to(acc)[:, None, :]  # [B, K, T]
        scores[..., N] = self.null_logit.to(acc).view(1, -1, 1) + row_shift  # the null slot, always visible
        if not self.window_size:
            return None, torch.softmax(scores, dim=-1), values, None

        window_scores, window_values = self._window_scores(q, hierarchy, acc, row_shift)
        probs = torch.softmax(torch.cat([window_scores, scores], dim=-1), dim=-1)
        # one split, not two slices: its backward is one concatenation (a slice's is a zero-filled
        # full-size tensor each)
        window_probs, slot_probs = probs.split([window_scores.shape[-1], Wp], dim=-1)
        return window_probs, slot_probs, values, window_values

    def _window_scores(self, q: torch.Tensor, hierarchy: Hierarchy, acc: torch.dtype, row_shift: torch.Tensor):
        """Scores [B, K, T, L + W] of every token against the L + W window keys of its query block
        (masked outside the window and before the stream's start), plus row_shift [B, K, T], and the
        blocked values [B, K, nb, L + W, m]."""
        B, K, T, m = q.shape
        W = self.window_size
        L = min(W, T)
        nb = -(-T // L)
        key_blocks = _blocks(hierarchy.window_keys.to(q.dtype), nb, L, W)  # [B, K, nb, L + W, m]
        value_blocks = _blocks(hierarchy.window_values.to(q.dtype), nb, L, W)
        q_blocks = _pad_tokens(q, nb * L).view(B, K, nb, L, m)
        scores = torch.matmul(q_blocks, key_blocks.transpose(-1, -2)).to(acc)  # [B, K, nb, L, L + W]
        j = torch.arange(L + W, device=q.device)
        distance = W + torch.arange(L, device=q.device)[:, None] - j  # [L, L + W]: tokens back
        outside = (distance < 0) | (distance >= W)
        # Only block 0 reaches before the stream's start: block i >= 1 starts at key i L >= W >= window_start
        before_start = j < hierarchy.window_start.view(B, 1, 1, 1)  # [B, 1, 1, L + W]
        shift = _pad_tokens(row_shift[..., None], nb * L).view(B, K, nb, L, 1)
        scores = _WindowBias.apply(scores, self._slopes(acc)[1], distance.to(acc), shift, outside, before_start)
        return scores.view(B, K, nb * L, L + W)[:, :, :T], value_blocks

    # ------------------------------------------------------------------ read
    def forward(self, hierarchy: Hierarchy) -> torch.Tensor:
        """Returns the read [B, T, K, m] of every token and bank."""
        window_probs, probs, values, window_values = self._probabilities(hierarchy)
        read = torch.matmul(probs.to(values.dtype), values)  # the null slot's and the padding's values are 0
        if window_probs is not None:
            B, K, T, width = window_probs.shape
            nb = window_values.shape[2]
            L = width - self.window_size
            # a view of the probabilities when T fills the blocks (T = nb L): no copy for the matmul
            blocked = _pad_tokens(window_probs.to(values.dtype), nb * L).view(B, K, nb, L, width)
            read = read + torch.matmul(blocked, window_values).view(B, K, nb * L, -1)[:, :, :T]
        return read.transpose(1, 2)  # [B, T, K, m]


    def step(self, view: StepView) -> torch.Tensor:
        """The read [B, K, m] of one token per row (`HDSHierarchy.step_token`): one softmax over the
        window ring (bias -window_slope * distance), the ring's slots of earlier blocks (bias
        -slope * (age - 1) plus importance) and the null slot. Scores and reads in the state's dtype
        (fp32, or float64; the mixer runs it with autocast off): the ring is read once, never copied to
        a lower precision."""
        acc = torch.promote_types(view.slot_keys.dtype, torch.float32)
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


def _blocks(x: torch.Tensor, nb: int, L: int, W: int) -> torch.Tensor:
    """Window keys or values x [B, K, W + T, m] -> [B, K, nb, L + W, m]: block i holds entries
    i L .. i L + L + W - 1 (zeros past the end). With one block that is all of x; with more, L = W,
    so block i is chunks i and i + 1 of length L: a concatenation of two views, whose backward is
    two slices (an unfold's backward is a slow scatter-add on CPU)."""
    B, K, _, m = x.shape
    x = _pad_tokens(x, nb * L + W)
    if nb == 1:
        return x[:, :, None]
    chunks = x.view(B, K, nb + 1, L, m)
    return torch.cat([chunks[:, :, :-1], chunks[:, :, 1:]], dim=3)


class _WindowBias(torch.autograd.Function):
    """The window's logits from its scores, in place: scores [B, K, nb, L, L + W] - slope [K] * distance
    [L, L + W] + shift [B, K, nb, L, 1], then -inf where `outside` [L, L + W] (beyond the window) and,
    in block 0, where `before_start` [B, 1, 1, L + W] (keys before the stream's start).

    The logits feed a softmax in which the hidden entries have probability 0, so their incoming
    gradient is exactly 0 and the backward needs no mask. Autograd of the same expression would
    reduce the full-size gradient over the broadcast dimensions for the slope (slow on CPU) and
    write three full-size tensors; here the slope's gradient is one matrix-vector product."""

    @staticmethod
    def forward(ctx, scores, slope, distance, shift, outside, before_start):
        ctx.save_for_backward(distance)
        bias = (slope.view(-1, 1, 1) * -distance).masked_fill_(outside, float("-inf"))  # [K, L, L + W]
        logits = (scores + bias[:, None]).add_(shift)
        logits[:, :, 0].masked_fill_(before_start, float("-inf"))
        return logits

    @staticmethod
    def backward(ctx, grad):
        (distance,) = ctx.saved_tensors
        B, K = grad.shape[:2]
        per_block = grad.reshape(B, K, -1, distance.numel()) @ distance.reshape(-1)  # [B, K, nb]
        return grad, -per_block.sum((0, 2)), None, grad.sum(-1, keepdim=True), None, None
