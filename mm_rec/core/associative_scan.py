"""Log-space associative scan of the linear recurrence h_t = exp(log_a_t) * h_{t-1} + b_t.

The pair operator (l1, b1) o (l2, b2) = (l1 + l2, exp(l2) * b1 + b2) is associative; its first
component is the log of the exponential product prod_i a_i. Rules (DESIGN.md section 3):

* log_a is clamped to [log_clamp_min, log_clamp_max] = [-50, 0] before anything else;
* accumulation is fp32 whatever the input dtype (float64 stays float64);
* cumulative sums of log_a are only ever chunk-local and are never subtracted from each other,
  so every exponent is <= 0 and no precision is lost to cancellation;
* gradients flow to `initial_state` and from `final_state`.

Backends: "torch" (vectorised, chunked; CPU reference and fallback), "triton" (GPU kernel in
`mm_rec.ops.scan_triton`), "sequential" (float64 Python loop, the test oracle), and "auto"
(Triton on CUDA tensors, torch otherwise).
"""

from __future__ import annotations

import torch

LOG_CLAMP_MIN = -50.0
LOG_CLAMP_MAX = 0.0
_CHUNK = 64  # tokens per chunk of the torch backend (log2 = 6 doubling passes)
BACKENDS = ("auto", "torch", "triton", "sequential")


def compute_dtype(*tensors: torch.Tensor | None) -> torch.dtype:
    """float64 if any input is float64, else float32 (bf16/fp16 inputs accumulate in fp32)."""
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32


def _scan_chunked(log_a: torch.Tensor, b: torch.Tensor, h0: torch.Tensor | None) -> torch.Tensor:
    """Vectorised forward scan of [B, T, F] tensors (already in the compute dtype).

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
        chunk_ends = _scan_chunked(la[:, :, -1], hb[:, :, -1], h0)  # [B, n, F]
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
        h = _scan_chunked(log_a, b, h0)
        ctx.has_h0 = h0 is not None
        ctx.save_for_backward(log_a, h, h0 if h0 is not None else torch.zeros_like(h[:, 0]))
        return h

    @staticmethod
    def backward(ctx, dh: torch.Tensor):
        log_a, h, h0 = ctx.saved_tensors
        # Gate into step t+1, seen from step t; nothing follows the last step.
        next_log_a = torch.nn.functional.pad(log_a[:, 1:], (0, 0, 0, 1))
        g = _scan_chunked(next_log_a.flip(1), dh.flip(1), None).flip(1)
        h_prev = torch.cat([h0.unsqueeze(1), h[:, :-1]], dim=1)
        d_log_a = g * torch.exp(log_a) * h_prev
        d_h0 = torch.exp(log_a[:, 0]) * g[:, 0] if ctx.has_h0 else None
        return d_log_a, g, d_h0


def _scan_sequential(log_a: torch.Tensor, b: torch.Tensor, h0: torch.Tensor | None) -> torch.Tensor:
    """The obviously correct float64 loop (differentiable through autograd)."""
    a = torch.exp(log_a.double())
    b = b.double()
    h = h0.double() if h0 is not None else torch.zeros_like(b[:, 0])
    out = []
    for t in range(b.shape[1]):
        h = a[:, t] * h + b[:, t]
        out.append(h)
    return torch.stack(out, dim=1)


def associative_scan_exponential(
    log_a: torch.Tensor,
    b: torch.Tensor,
    initial_state: torch.Tensor | None = None,
    backend: str = "auto",
    log_clamp_min: float = LOG_CLAMP_MIN,
    log_clamp_max: float = LOG_CLAMP_MAX,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Solve h_t = exp(log_a_t) * h_{t-1} + b_t over dim 1.

    Args:
        log_a: [B, T, ...] log decays (any float dtype; clamped to [log_clamp_min, log_clamp_max]).
        b: [B, T, ...] inputs, same shape as log_a.
        initial_state: [B, ...] h_0, or None for zeros.
        backend: "auto", "torch", "triton" or "sequential".

    Returns:
        h: [B, T, ...] in b's dtype.
        final_state: [B, ...] h_T in the accumulation dtype (fp32, or float64 for float64 input).
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if log_a.shape != b.shape:
        raise ValueError(f"log_a {tuple(log_a.shape)} and b {tuple(b.shape)} must have the same shape")
    if b.dim() < 2 or b.shape[1] == 0:
        raise ValueError(f"expected [B, T, ...] with T >= 1, got {tuple(b.shape)}")
    if initial_state is not None and initial_state.shape != b.shape[:1] + b.shape[2:]:
        raise ValueError(f"initial_state {tuple(initial_state.shape)} must be {tuple(b.shape[:1] + b.shape[2:])}")
    acc = compute_dtype(log_a, b, initial_state)
    log_a = log_a.to(acc).clamp(log_clamp_min, log_clamp_max)
    if backend == "auto":
        backend = "triton" if b.is_cuda and _triton_usable() else "torch"

    if backend == "triton":
        from mm_rec.ops.scan_triton import scan_triton

        h, final = scan_triton(log_a, b, initial_state)
        return h, final

    B, T = b.shape[:2]
    feature_shape = b.shape[2:]
    flat_log_a = log_a.reshape(B, T, -1)
    flat_b = b.to(acc).reshape(B, T, -1)
    flat_h0 = initial_state.to(acc).reshape(B, -1) if initial_state is not None else None
    if backend == "sequential":
        h = _scan_sequential(flat_log_a, flat_b, flat_h0)
    else:
        h = AssociativeScanExponential.apply(flat_log_a, flat_b, flat_h0)
    final = h[:, -1].reshape(B, *feature_shape).to(acc)
    return h.reshape(b.shape).to(b.dtype), final


def _triton_usable() -> bool:
    from mm_rec.ops import triton_available

    return triton_available()
