"""Torch references of the log-space scan h_t = exp(log_a_t) * h_{t-1} + b_t over dim 1.

* `AssociativeScanExponential`: the "torch" backend, vectorised and chunked (CPU path and
  fallback), with its reverse-scan backward;
* `scan_sequential`: the "sequential" backend, the obviously correct float64 loop (the oracle).

Both take [B, T, F] tensors with log_a already clamped to <= 0 (the dispatcher
`mm_rec.core.associative_scan` clamps, casts and flattens) and h0 [B, F] or None for zeros.
"""

from __future__ import annotations

import torch

_CHUNK = 64  # tokens per chunk of the torch backend (log2 = 6 doubling passes)


def scan_chunked(log_a: torch.Tensor, b: torch.Tensor, h0: torch.Tensor | None) -> torch.Tensor:
    """Vectorised forward scan of [B, T, F] tensors (already in the compute dtype); returns h.

    Within chunks of `_CHUNK` tokens a Hillis-Steele doubling scan combines pairs (no cumsum is
    ever subtracted); the chunk totals form a shorter scan of the same kind, solved recursively,
    which supplies each chunk's incoming state.
    """
    B, T, F = b.shape
    L = min(_CHUNK, T)
    n = -(-T // L)
    pad = n * L - T
    if pad:  # identity elements: a = 1 (log 0), b = 0
        log_a = torch.nn.functional.pad(log_a, (0, 0, 0, pad))
        b = torch.nn.functional.pad(b, (0, 0, 0, pad))
    la = log_a.reshape(B, n, L, F).clone()
    hb = b.reshape(B, n, L, F).clone()
    step = 1
    while step < L:  # after the pass at `step`, position i combines (i - 2*step, i]
        hb[:, :, step:] = torch.exp(la[:, :, step:]) * hb[:, :, :-step] + hb[:, :, step:]
        la[:, :, step:] = la[:, :, step:] + la[:, :, :-step]
        step *= 2
    # la[:, j, i]: log prod of a over chunk j up to i; hb: the state there if the chunk started at 0.
    if n == 1:
        carry_in = h0.unsqueeze(1) if h0 is not None else None
    else:
        chunk_ends = scan_chunked(la[:, :, -1], hb[:, :, -1], h0)  # [B, n, F]
        first = h0 if h0 is not None else torch.zeros_like(chunk_ends[:, 0])
        carry_in = torch.cat([first.unsqueeze(1), chunk_ends[:, :-1]], dim=1)
    if carry_in is not None:
        hb = hb + torch.exp(la) * carry_in.unsqueeze(2)
    return hb.reshape(B, n * L, F)[:, :T]


class AssociativeScanExponential(torch.autograd.Function):
    """Autograd function of the torch backend on [B, T, F] tensors.

    forward(log_a, b, h0) -> h, with log_a already clamped; h0 may be None. The output is in
    the compute dtype. Backward is the reverse scan with shifted gates:
        g_t = dh_t + a_{t+1} g_{t+1},  db_t = g_t,  d log_a_t = g_t a_t h_{t-1},  dh0 = a_1 g_1.
    """

    @staticmethod
    def forward(ctx, log_a: torch.Tensor, b: torch.Tensor, h0: torch.Tensor | None) -> torch.Tensor:
        h = scan_chunked(log_a, b, h0)
        ctx.has_h0 = h0 is not None
        ctx.save_for_backward(log_a, h, h0 if h0 is not None else torch.zeros_like(h[:, 0]))
        return h

    @staticmethod
    def backward(ctx, dh: torch.Tensor):
        log_a, h, h0 = ctx.saved_tensors
        # Gate into step t+1, seen from step t; nothing follows the last step.
        next_log_a = torch.nn.functional.pad(log_a[:, 1:], (0, 0, 0, 1))
        g = scan_chunked(next_log_a.flip(1), dh.flip(1), None).flip(1)
        h_prev = torch.cat([h0.unsqueeze(1), h[:, :-1]], dim=1)
        d_log_a = g * torch.exp(log_a) * h_prev
        d_h0 = torch.exp(log_a[:, 0]) * g[:, 0] if ctx.has_h0 else None
        return d_log_a, g, d_h0


def scan_sequential(log_a: torch.Tensor, b: torch.Tensor, h0: torch.Tensor | None) -> torch.Tensor:
    """The obviously correct float64 loop (differentiable through autograd); returns h in float64."""
    a = torch.exp(log_a.double())
    b = b.double()
    h = h0.double() if h0 is not None else torch.zeros_like(b[:, 0])
    out = []
    for t in range(b.shape[1]):
        h = a[:, t] * h + b[:, t]
        out.append(h)
    return torch.stack(out, dim=1)
