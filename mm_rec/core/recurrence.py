"""The exact MM-Rec core recurrence, per head:

    h_t = z_t * sigmoid(h_{t-1} W_g + b_g) + exp(log_gamma_t) * h_{t-1}

with h_{t-1} W_g a row vector times a [d, d] matrix (W_g is [H, d, d], block diagonal over
heads). The gate depends on h_{t-1}, so the recurrence is nonlinear and runs step by step.

Backends: "torch" (a loop of batched matmuls whose backward is a hand-written reverse loop, so
memory is O(B*T*H*d) rather than a T-step autograd graph), "triton" (the fused kernel in
`mm_rec.ops.recurrence_triton`), "sequential" (float64 loop through autograd: the oracle), and
"auto" (Triton on CUDA, torch elsewhere).
"""

from __future__ import annotations

import torch

from mm_rec.core.associative_scan import compute_dtype

BACKENDS = ("auto", "torch", "triton", "sequential")


class MMRecRecurrence(torch.autograd.Function):
    """Torch backend. Tensors are head-major for the loop: z, log_gamma [T, H, B, d];
    W_g [H, d, d]; b_g [H, 1, d]; h0 [H, B, d]. Returns all states [T, H, B, d].

    Backward recomputes the gate pre-activations for all t at once from the stored states
    (one large matmul), then runs the reverse loop
        g_{t-1} = dh_{t-1} + gamma_t g_t + (g_t z_t s_t (1 - s_t)) W_g^T,
    and forms dW_g, db_g with single reductions over (t, b).
    Extra memory: the states h (T*H*B*d in the compute dtype).
    """

    @staticmethod
    def forward(ctx, z, log_gamma, W_g, b_g, h0):
        gamma = torch.exp(log_gamma)
        states = torch.empty_like(z)
        h = h0
        for t in range(z.shape[0]):
            gate = torch.sigmoid(torch.baddbmm(b_g, h, W_g))
            h = torch.addcmul(gamma[t] * h, z[t], gate)
            states[t] = h
        ctx.save_for_backward(z, log_gamma, W_g, b_g, h0, states)
        return states

    @staticmethod
    def backward(ctx, d_states):
        z, log_gamma, W_g, b_g, h0, states = ctx.saved_tensors
        T, H, B, d = z.shape
        gamma = torch.exp(log_gamma)
        h_prev = torch.cat([h0.unsqueeze(0), states[:-1]], dim=0)  # [T, H, B, d]
        pre = torch.matmul(h_prev, W_g.unsqueeze(0)) + b_g.unsqueeze(0)
        s = torch.sigmoid(pre)
        dp_coef = z * s * (1 - s)
        W_t = W_g.transpose(1, 2)
        g_all = torch.empty_like(z)
        carry = torch.zeros_like(h0)
        for t in range(T - 1, -1, -1):
            g = d_states[t] + carry
            g_all[t] = g
            carry = torch.baddbmm(gamma[t] * g, g * dp_coef[t], W_t)
        dp = g_all * dp_coef
        d_z = g_all * s
        d_log_gamma = g_all * gamma * h_prev
        d_W = torch.einsum("thbd,thbe->hde", h_prev, dp)
        d_b = dp.sum(dim=(0, 2)).unsqueeze(1)
        return d_z, d_log_gamma, d_W, d_b, carry


def _recurrence_sequential(z, log_gamma, W_g, b_g, h0):
    """float64 loop in the natural [B, T, H, d] layout, differentiated by autograd."""
    z, gamma, W_g, b_g = z.double(), torch.exp(log_gamma.double()), W_g.double(), b_g.double()
    h = h0.double()
    out = []
    for t in range(z.shape[1]):
        gate = torch.sigmoid(torch.einsum("bhd,hde->bhe", h, W_g) + b_g)
        h = z[:, t] * gate + gamma[:, t] * h
        out.append(h)
    return torch.stack(out, dim=1)


def mmrec_recurrence(
    z: torch.Tensor,
    log_gamma: torch.Tensor,
    W_g: torch.Tensor,
    b_g: torch.Tensor | None = None,
    initial_state: torch.Tensor | None = None,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the core recurrence.

    Args:
        z: [B, T, H, d] recurrence input.
        log_gamma: [B, T, H, d] log decay (<= 0; the caller clamps it).
        W_g: [H, d, d] gate weights (row vector times matrix); b_g: [H, d] or None.
        initial_state: [B, H, d] h_0, or None for zeros.

    Returns:
        h: [B, T, H, d] all states, in z's dtype.
        h_last: [B, H, d] the final state in the accumulation dtype (fp32 or float64).
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if z.dim() != 4 or z.shape[1] == 0:
        raise ValueError(f"z must be [B, T, H, d] with T >= 1, got {tuple(z.shape)}")
    B, T, H, d = z.shape
    if log_gamma.shape != z.shape:
        raise ValueError(f"log_gamma {tuple(log_gamma.shape)} must match z {tuple(z.shape)}")
    if W_g.shape != (H, d, d):
        raise ValueError(f"W_g {tuple(W_g.shape)} must be {(H, d, d)}")
    if b_g is not None and b_g.shape != (H, d):
        raise ValueError(f"b_g {tuple(b_g.shape)} must be {(H, d)}")
    if initial_state is not None and initial_state.shape != (B, H, d):
        raise ValueError(f"initial_state {tuple(initial_state.shape)} must be {(B, H, d)}")
    acc = compute_dtype(z, log_gamma, W_g, initial_state)
    if b_g is None:
        b_g = torch.zeros(H, d, device=z.device, dtype=acc)
    if initial_state is None:
        initial_state = torch.zeros(B, H, d, device=z.device, dtype=acc)
    if backend == "auto":
        from mm_rec.ops import triton_available

        backend = "triton" if z.is_cuda and triton_available() else "torch"

    if backend == "triton":
        from mm_rec.ops.recurrence_triton import recurrence_triton

        return recurrence_triton(z, log_gamma, W_g, b_g, initial_state)
    if backend == "sequential":
        h = _recurrence_sequential(z, log_gamma, W_g, b_g, initial_state)
        return h.to(z.dtype), h[:, -1].to(acc)

    to_loop = lambda x: x.to(acc).permute(1, 2, 0, 3).contiguous()  # [B,T,H,d] -> [T,H,B,d]
    states = MMRecRecurrence.apply(
        to_loop(z), to_loop(log_gamma), W_g.to(acc), b_g.to(acc).unsqueeze(1),
        initial_state.to(acc).transpose(0, 1).contiguous(),
    )
    h = states.permute(2, 0, 1, 3)  # [T,H,B,d] -> [B,T,H,d]
    return h.to(z.dtype), h[:, -1]
