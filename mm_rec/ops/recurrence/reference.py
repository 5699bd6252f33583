"""Torch references of the exact core recurrence, per head:

    h_t = z_t * sigmoid(h_{t-1} W_g + b_g) + exp(log_gamma_t) * h_{t-1}

* `MMRecRecurrence`: the "torch" backend, a loop of batched matmuls whose backward is a
  hand-written reverse loop, so memory is O(B*T*H*d) rather than a T-step autograd graph;
* `recurrence_sequential`: the "sequential" backend, a float64 loop through autograd (the oracle);
* `recurrence_step`: one step of the torch backend's loop (also the decoding step).

Argument checks and defaults (zero bias and state) live in the dispatcher `mm_rec.core.recurrence`.
"""

from __future__ import annotations

import torch


def recurrence_step(h: torch.Tensor, z: torch.Tensor, gamma: torch.Tensor, W_g: torch.Tensor,
                    b_g: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """One step, head-major: h, z, gamma [H, B, d]; W_g [H, d, d]; b_g [H, 1, d] (one dtype) -> h_t [H, B, d],
    written into `out` when given (no autograd through it)."""
    gate = torch.sigmoid(torch.baddbmm(b_g, h, W_g))
    return torch.addcmul(gamma * h, z, gate, out=out)


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
        for t in range(z.shape[0]):  # each state written in place into `states`: no copy per step
            h = recurrence_step(h, z[t], gamma[t], W_g, b_g, out=states[t])
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
            g = torch.add(d_states[t], carry, out=g_all[t])
            carry = torch.baddbmm(gamma[t] * g, g * dp_coef[t], W_t)
        dp = g_all * dp_coef
        d_z = g_all * s
        d_log_gamma = g_all * gamma * h_prev
        d_W = torch.einsum("thbd,thbe->hde", h_prev, dp)
        d_b = dp.sum(dim=(0, 2)).unsqueeze(1)
        return d_z, d_log_gamma, d_W, d_b, carry


def recurrence_sequential(z, log_gamma, W_g, b_g, h0):
    """float64 loop in the natural layout (z, log_gamma [B, T, H, d]; W_g [H, d, d]; b_g [H, d];
    h0 [B, H, d]), differentiated by autograd. Returns all states [B, T, H, d] in float64."""
    z, gamma, W_g, b_g = z.double(), torch.exp(log_gamma.double()), W_g.double(), b_g.double()
    h = h0.double()
    out = []
    for t in range(z.shape[1]):
        gate = torch.sigmoid(torch.einsum("bhd,hde->bhe", h, W_g) + b_g)
        h = z[:, t] * gate + gamma[:, t] * h
        out.append(h)
    return torch.stack(out, dim=1)
