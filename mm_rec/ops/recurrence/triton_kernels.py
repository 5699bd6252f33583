"""Fused Triton kernels for the exact MM-Rec core recurrence, per head:

    h_t = z_t * sigmoid(h_{t-1} W_g + b_g) + exp(log_gamma_t) * h_{t-1}

Reference: `mm_rec.ops.recurrence.reference` (torch backend and the float64 `sequential` oracle);
public entry point: `mm_rec.core.recurrence.mmrec_recurrence`.

Layout of the work. One program per (batch row, head) runs the whole sequence with W_g[head]
(or its transpose, for the backward) in registers and the state in the accumulation dtype (fp32;
float64 for float64 inputs). The step is latency-bound (a [d] x [d, d] product whose input is
the previous step's output), so:

* the product is a broadcast-reduce on the CUDA cores in fp32, exact (tensor-core `tl.dot` on
  batch tiles would round the state to tf32/bf16 operands, and its mma chain over d is no
  shorter than these FMA chains; not pursued). W_g is split by rows over the warps and by
  columns over the lanes (`_load_matrix`): each thread holds d/num_warps rows x d/32 columns
  (128 registers at d = 128; head dims above 128 spill: correct but slow) and reads only
  d/num_warps entries of the new state from shared memory per step, where a whole column per
  thread would make every thread read all d entries.
* the time loop is unrolled `unroll` steps and the loads of step t + unroll are issued right
  after step t uses its slot, so memory latency hides behind `unroll` steps of compute; the
  backward can add L2 prefetches further ahead;
* stores are fire-and-forget and off the dependency chain.

The backward kernel runs the reverse loop for the state gradient
    g_t = dh_t + gamma_{t+1} g_{t+1} + (g_{t+1} z_{t+1} s_{t+1} (1 - s_{t+1})) W_g^T
and writes dz, d log_gamma, dp_t = g_t z_t s_t (1 - s_t) and a per-program sum of dp (for db)
on the way; dW_g = sum_{b,t} h_{t-1}^T dp_t is then one batched matmul over (b, t), so no
atomics are needed.

Memory (N = B*T*H*d elements):
* forward saves the gate s (N in the accumulation dtype) and, when z is not in the accumulation
  dtype, the states h in that dtype (N); with fp32 z the returned h is the state and is saved
  instead. bf16 z: 8 bytes per element saved beyond the inputs; fp32 z: 4.
* backward allocates dz, d log_gamma (the inputs' dtypes) and dp (N in the accumulation dtype),
  the last freed on return.

Measurements (times against the PyTorch backend and the layer's matmuls, the launch-configuration
sweep behind the tuning below, per-step profile, memory): docs/benchmarks.md, "Core recurrence
(Triton)".
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from mm_rec.ops import compute_dtype

# Steps per unrolled loop body (= how many steps ahead the per-step inputs are loaded) and L2
# prefetch distance, per direction; the best of the `benchmarks/bench_recurrence.py --variants`
# sweep on an H100.
_FWD_TUNING = {"unroll": 8, "prefetch": 0}
_BWD_TUNING = {"unroll": 2, "prefetch": 8}


@triton.jit
def _matvec(v, M, C: tl.constexpr, L: tl.constexpr, G: tl.constexpr):
    """v [C, L] (the vector v[c * L + l]) times M [G, C, I, L] (see `_load_matrix`) -> [C, L]."""
    vb = tl.reshape(v, [G, (C * L) // G])  # vb[g, i] = v[g * I + i]
    return tl.sum(tl.sum(vb[:, None, :, None] * M, axis=2), axis=0)


@triton.jit
def _load_matrix(ptr, D, C: tl.constexpr, L: tl.constexpr, G: tl.constexpr, ACC: tl.constexpr):
    """The [D, D] row-major matrix at ptr as M[g, c, i, l] = W[g * I + i, c * L + l], zero-padded
    to C * L = G * I rows and columns. With G = num_warps and L = 32, Triton puts the row groups
    g on warps and the columns l on lanes: each thread holds I rows x C columns, needs only I
    entries of the broadcast vector, and reduces its C columns over I rows in registers."""
    I: tl.constexpr = (C * L) // G
    g = tl.arange(0, G)[:, None, None, None]
    c = tl.arange(0, C)[None, :, None, None]
    i = tl.arange(0, I)[None, None, :, None]
    l = tl.arange(0, L)[None, None, None, :]
    row = g * I + i
    col = c * L + l
    return tl.load(ptr + row * D + col, mask=(row < D) & (col < D), other=0.0).to(ACC)


# Inlined by Triton like every @triton.jit helper: the same machine code as written out in each kernel.
@triton.jit
def _program_head(H, D, C: tl.constexpr, L: tl.constexpr):
    """(pid = b * H + head, batch row b, head, cols, cols < D) of this program; cols [C, L] are
    the indices of a [d] vector in the layout the kernels keep vectors in (cols[c, l] = c * L + l)."""
    pid = tl.program_id(0)
    cols = tl.arange(0, C)[:, None] * L + tl.arange(0, L)[None, :]
    return pid, pid // H, pid % H, cols, cols < D


@triton.jit
def _prefetch_l2(ptrs):
    """Ask for the lines at ptrs to be brought into L2 (a hint; no register waits on it)."""
    tl.inline_asm_elementwise("prefetch.global.L2 [$1];\n\tmov.u32 $0, 0;", "=r,l", [ptrs],
                              dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def _recurrence_fwd_kernel(
    z_ptr, lg_ptr, w_ptr, bias_ptr, h0_ptr,  # inputs
    h_ptr, state_ptr, gate_ptr, hlast_ptr,  # outputs
    T, H, D,
    C: tl.constexpr, L: tl.constexpr, G: tl.constexpr, U: tl.constexpr, PF: tl.constexpr,
    STORE_STATE: tl.constexpr, ACC: tl.constexpr,
):
    pid, b, head, cols, cmask = _program_head(H, D, C, L)
    W = _load_matrix(w_ptr + head * D * D, D, C, L, G, ACC)
    bias = tl.load(bias_ptr + head * D + cols, mask=cmask, other=0.0).to(ACC)
    h = tl.load(h0_ptr + pid * D + cols, mask=cmask, other=0.0).to(ACC)
    row0 = b.to(tl.int64) * T * H + head  # row of [B*T*H, D] holding (b, t=0, head)

    # Slot u holds the inputs of step t0 + u (padding rows beyond T load as z = 0, gamma = 1).
    zs = ()
    lgs = ()
    for u in tl.static_range(U):
        m = cmask & (u < T)
        zs = zs + (tl.load(z_ptr + (row0 + u * H) * D + cols, mask=m, other=0.0),)
        lgs = lgs + (tl.load(lg_ptr + (row0 + u * H) * D + cols, mask=m, other=0.0),)

    for t0 in range(0, T, U):
        for u in tl.static_range(U):
            t = t0 + u
            z = zs[u].to(ACC)
            gamma = tl.exp(lgs[u].to(ACC))
            nxt = t + U  # refill the slot now: the load has U steps to arrive
            m = cmask & (nxt < T)
            zs = zs[:u] + (tl.load(z_ptr + (row0 + nxt * H) * D + cols, mask=m, other=0.0),) + zs[u + 1:]
            lgs = lgs[:u] + (tl.load(lg_ptr + (row0 + nxt * H) * D + cols, mask=m, other=0.0),) + lgs[u + 1:]
            if PF > 0:
                pf = (row0 + tl.minimum(t + PF, T - 1) * H) * D + cols
                _prefetch_l2(z_ptr + pf)
                _prefetch_l2(lg_ptr + pf)

            s = tl.sigmoid(_matvec(h, W, C, L, G) + bias)
            h_new = z * s + gamma * h
            valid = t < T
            h = tl.where(valid, h_new, h)
            off = (row0 + t * H) * D + cols
            m = cmask & valid
            tl.store(h_ptr + off, h.to(h_ptr.dtype.element_ty), mask=m)
            tl.store(gate_ptr + off, s, mask=m)
            if STORE_STATE:
                tl.store(state_ptr + off, h, mask=m)
    tl.store(hlast_ptr + pid * D + cols, h, mask=cmask)


@triton.jit
def _recurrence_bwd_kernel(
    dh_ptr, dhlast_ptr, z_ptr, lg_ptr, gate_ptr, state_ptr, h0_ptr, wt_ptr,  # inputs
    dz_ptr, dlg_ptr, dp_ptr, dp0_ptr, db_ptr, dh0_ptr,  # outputs
    T, H, D,
    C: tl.constexpr, L: tl.constexpr, G: tl.constexpr, U: tl.constexpr, PF: tl.constexpr, ACC: tl.constexpr,
):
    pid, b, head, cols, cmask = _program_head(H, D, C, L)
    WT = _load_matrix(wt_ptr + head * D * D, D, C, L, G, ACC)
    carry = tl.load(dhlast_ptr + pid * D + cols, mask=cmask, other=0.0).to(ACC)
    db = tl.zeros([C, L], ACC)
    row0 = b.to(tl.int64) * T * H + head
    h0_row = pid.to(tl.int64)
    # dp is stored shifted by one step (row t holds dp_{t+1}) so that dW = states^T dp needs no
    # shifted copy of the states; the last row has no successor.
    tl.store(dp_ptr + (row0 + (T - 1) * H) * D + cols, tl.zeros([C, L], ACC), mask=cmask)

    # Slot u holds the inputs of reverse step i0 + u, i.e. time T - 1 - (i0 + u); h_{t-1} comes
    # from the saved states, or from h0 at t = 0.
    dhs = ()
    zs = ()
    ss = ()
    lgs = ()
    hps = ()
    for u in tl.static_range(U):
        t = T - 1 - u
        m = cmask & (t >= 0)
        off = (row0 + t * H) * D + cols
        dhs = dhs + (tl.load(dh_ptr + off, mask=m, other=0.0),)
        zs = zs + (tl.load(z_ptr + off, mask=m, other=0.0),)
        ss = ss + (tl.load(gate_ptr + off, mask=m, other=0.0),)
        lgs = lgs + (tl.load(lg_ptr + off, mask=m, other=0.0),)
        prev = tl.where(t > 0, (row0 + (t - 1) * H) * D, h0_row * D)
        hps = hps + (tl.load(state_ptr + prev + cols, mask=m & (t > 0), other=0.0)
                     + tl.load(h0_ptr + prev + cols, mask=m & (t == 0), other=0.0),)

    for i0 in range(0, T, U):
        for u in tl.static_range(U):
            t = T - 1 - (i0 + u)
            dh = dhs[u].to(ACC)
            z = zs[u].to(ACC)
            s = ss[u].to(ACC)
            gamma = tl.exp(lgs[u].to(ACC))
            h_prev = hps[u].to(ACC)
            nt = t - U  # refill the slot with the step U further back
            m = cmask & (nt >= 0)
            off = (row0 + nt * H) * D + cols
            dhs = dhs[:u] + (tl.load(dh_ptr + off, mask=m, other=0.0),) + dhs[u + 1:]
            zs = zs[:u] + (tl.load(z_ptr + off, mask=m, other=0.0),) + zs[u + 1:]
            ss = ss[:u] + (tl.load(gate_ptr + off, mask=m, other=0.0),) + ss[u + 1:]
            lgs = lgs[:u] + (tl.load(lg_ptr + off, mask=m, other=0.0),) + lgs[u + 1:]
            prev = tl.where(nt > 0, (row0 + (nt - 1) * H) * D, h0_row * D)
            hp_next = (tl.load(state_ptr + prev + cols, mask=m & (nt > 0), other=0.0)
                       + tl.load(h0_ptr + prev + cols, mask=m & (nt == 0), other=0.0))
            hps = hps[:u] + (hp_next,) + hps[u + 1:]
            if PF > 0:
                pt = tl.maximum(t - PF, 1)
                pf = (row0 + pt * H) * D + cols
                _prefetch_l2(dh_ptr + pf)
                _prefetch_l2(z_ptr + pf)
                _prefetch_l2(gate_ptr + pf)
                _prefetch_l2(lg_ptr + pf)
                _prefetch_l2(state_ptr + pf - H * D)

            valid = t >= 0
            g = dh + carry
            dp = g * (z * s * (1.0 - s))
            carry = tl.where(valid, gamma * g + _matvec(dp, WT, C, L, G), carry)
            db += tl.where(valid, dp, 0.0)
            off = (row0 + t * H) * D + cols
            m = cmask & valid
            tl.store(dz_ptr + off, (g * s).to(dz_ptr.dtype.element_ty), mask=m)
            tl.store(dlg_ptr + off, (g * gamma * h_prev).to(dlg_ptr.dtype.element_ty), mask=m)
            tl.store(dp_ptr + off - H * D, dp, mask=m & (t > 0))
            tl.store(dp0_ptr + h0_row * D + cols, dp, mask=m & (t == 0))
    tl.store(db_ptr + pid * D + cols, db, mask=cmask)
    tl.store(dh0_ptr + pid * D + cols, carry, mask=cmask)


_TL_DTYPE = {torch.float32: tl.float32, torch.float64: tl.float64}


def launch_config(d: int, unroll: int, prefetch: int = 0, num_warps: int | None = None,
                  row_groups: int | None = None) -> dict:
    """Kernel meta-parameters for head dim d: d // 32 warps (at least one), each holding one group
    of rows of W_g, lanes over columns. `prefetch` > 0 adds L2 prefetches that many steps ahead
    (GPU only: the interpreter cannot run inline PTX)."""
    block_d = max(16, triton.next_power_of_2(d))
    lanes = min(32, block_d)
    warps = num_warps or max(1, block_d // 32)
    return {
        "C": block_d // lanes,
        "L": lanes,
        "G": row_groups or warps,
        "U": unroll,
        "PF": 0 if os.environ.get("TRITON_INTERPRET") == "1" else prefetch,
        "num_warps": warps,
    }


def launch_fwd(
    z: torch.Tensor, log_gamma: torch.Tensor, W_g: torch.Tensor, b_g: torch.Tensor, h0: torch.Tensor,
    config: dict | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Run the forward kernel (no autograd). Returns (h [B,T,H,d] in z's dtype, h_last [B,H,d],
    gate s [B,T,H,d], states [B,T,H,d]); the last three in the accumulation dtype. `states` is
    empty ([0]) when z is already in the accumulation dtype: h is then the state."""
    B, T, H, d = z.shape
    acc = compute_dtype(z, log_gamma, W_g, b_g, h0)
    z, log_gamma = z.contiguous(), log_gamma.contiguous()
    W_g, b_g, h0 = W_g.to(acc).contiguous(), b_g.to(acc).contiguous(), h0.to(acc).contiguous()
    h = torch.empty_like(z)
    h_last = torch.empty(B, H, d, device=z.device, dtype=acc)
    gate = torch.empty(B, T, H, d, device=z.device, dtype=acc)
    store_state = z.dtype != acc
    states = torch.empty((B, T, H, d) if store_state else (0,), device=z.device, dtype=acc)
    _recurrence_fwd_kernel[(B * H,)](
        z, log_gamma, W_g, b_g, h0, h, states if store_state else h, gate, h_last, T, H, d,
        STORE_STATE=store_state, ACC=_TL_DTYPE[acc], **(config or launch_config(d, **_FWD_TUNING)),
    )
    return h, h_last, gate, states


def launch_bwd(
    dh: torch.Tensor, dh_last: torch.Tensor, z: torch.Tensor, log_gamma: torch.Tensor, W_g: torch.Tensor,
    h0: torch.Tensor, gate: torch.Tensor, states: torch.Tensor, config: dict | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Run the backward kernel and the (b, t) reductions (no autograd). `states` are the
    forward's states in the accumulation dtype (h itself when z is in that dtype). Returns
    (dz, d log_gamma, dW_g, db_g, dh0): the first two in z's and log_gamma's dtypes, the rest in
    the accumulation dtype."""
    B, T, H, d = z.shape
    acc = gate.dtype
    z, log_gamma, dh = z.contiguous(), log_gamma.contiguous(), dh.contiguous()
    W_t = W_g.to(acc).transpose(1, 2).contiguous()
    h0 = h0.to(acc).contiguous()
    dz = torch.empty_like(z)
    dlg = torch.empty_like(log_gamma)
    dp = torch.empty_like(gate)  # row t holds dp_{t+1}
    dp0 = torch.empty_like(h0)
    db_part = torch.empty_like(h0)
    dh0 = torch.empty_like(h0)
    _recurrence_bwd_kernel[(B * H,)](
        dh, dh_last.to(acc).contiguous(), z, log_gamma, gate, states, h0, W_t,
        dz, dlg, dp, dp0, db_part, dh0, T, H, d,
        ACC=_TL_DTYPE[acc], **(config or launch_config(d, **_BWD_TUNING)),
    )
    # dW[head] = sum over (b, t) of h_{t-1}^T dp_t: the states against the shifted dp, plus t = 0.
    states_hdn = states.reshape(B * T, H, d).permute(1, 2, 0)  # [H, d, B*T]
    dp_hnd = dp.reshape(B * T, H, d).transpose(0, 1)  # [H, B*T, d]
    dW = torch.baddbmm(torch.einsum("bhd,bhe->hde", h0, dp0), states_hdn, dp_hnd)
    return dz, dlg, dW, db_part.sum(0), dh0


@torch.library.custom_op("mm_rec::recurrence_fwd", mutates_args=())
def recurrence_fwd(
    z: torch.Tensor, log_gamma: torch.Tensor, W_g: torch.Tensor, b_g: torch.Tensor, h0: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """`launch_fwd` as an operator (opaque to torch.compile, differentiable through `_backward`)."""
    return launch_fwd(z, log_gamma, W_g, b_g, h0)


@recurrence_fwd.register_fake
def _recurrence_fwd_fake(z, log_gamma, W_g, b_g, h0):
    B, T, H, d = z.shape
    acc = compute_dtype(z, log_gamma, W_g, b_g, h0)
    states_shape = (B, T, H, d) if z.dtype != acc else (0,)
    return (
        torch.empty_like(z),
        z.new_empty((B, H, d), dtype=acc),
        z.new_empty((B, T, H, d), dtype=acc),
        z.new_empty(states_shape, dtype=acc),
    )


@torch.library.custom_op("mm_rec::recurrence_bwd", mutates_args=())
def recurrence_bwd(
    dh: torch.Tensor, dh_last: torch.Tensor, z: torch.Tensor, log_gamma: torch.Tensor, W_g: torch.Tensor,
    h0: torch.Tensor, gate: torch.Tensor, states: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """`launch_bwd` as an operator."""
    return launch_bwd(dh, dh_last, z, log_gamma, W_g, h0, gate, states)


@recurrence_bwd.register_fake
def _recurrence_bwd_fake(dh, dh_last, z, log_gamma, W_g, h0, gate, states):
    B, T, H, d = z.shape
    acc = gate.dtype
    return (
        torch.empty_like(z),
        torch.empty_like(log_gamma),
        z.new_empty((H, d, d), dtype=acc),
        z.new_empty((H, d), dtype=acc),
        z.new_empty((B, H, d), dtype=acc),
    )


def _setup_context(ctx, inputs, output) -> None:
    z, log_gamma, W_g, b_g, h0 = inputs
    h, _, gate, states = output
    ctx.mark_non_differentiable(gate, states)
    ctx.dtypes = (W_g.dtype, b_g.dtype, h0.dtype)
    ctx.save_for_backward(z, log_gamma, W_g, h0, gate, states if states.numel() else h)


def _backward(ctx, dh, dh_last, _dgate, _dstates):
    z, log_gamma, W_g, h0, gate, states = ctx.saved_tensors
    B, T, H, d = z.shape
    dh = torch.zeros_like(z) if dh is None else dh
    dh_last = z.new_zeros((B, H, d), dtype=gate.dtype) if dh_last is None else dh_last
    dz, dlg, dW, db, dh0 = recurrence_bwd(dh, dh_last, z, log_gamma, W_g, h0, gate, states)
    w_dtype, b_dtype, h0_dtype = ctx.dtypes
    return dz, dlg, dW.to(w_dtype), db.to(b_dtype), dh0.to(h0_dtype)


recurrence_fwd.register_autograd(_backward, setup_context=_setup_context)


def recurrence_triton(
    z: torch.Tensor, log_gamma: torch.Tensor, W_g: torch.Tensor, b_g: torch.Tensor, initial_state: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The core recurrence through the fused kernels, differentiable in every input.

    Args:
        z: [B, T, H, d] input (bf16, fp16, fp32 or float64).
        log_gamma: [B, T, H, d] log decay (fp32 or z's dtype), already clamped to <= 0.
        W_g: [H, d, d] gate weights; b_g: [H, d]; initial_state: [B, H, d] h_0.

    Returns:
        h: [B, T, H, d] all states in z's dtype.
        h_last: [B, H, d] the final state in the accumulation dtype (fp32; float64 if any input is).

    Memory: see the module docstring (8 bytes per element of z saved for bf16 z, 4 for fp32).
    """
    h, h_last, _, _ = torch.ops.mm_rec.recurrence_fwd(z, log_gamma, W_g, b_g, initial_state)
    return h, h_last
