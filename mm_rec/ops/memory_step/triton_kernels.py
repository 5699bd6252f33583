"""One fused Triton kernel for the memory's part of a decoding step (one token per row).

The torch step (`HDSHierarchy.step_token`, then `MultiMemoryAttention.step`) is a few dozen small
kernels per layer: window and pooling-sum scatters, the delta rule's S k / S q product and update,
the slot biases, four score and value products, the softmax. A compiled and graph-captured
decoder pays ~2 us per kernel whatever its bytes, so at batch 1 those launches, not the state's
bytes, set the step's time (docs/benchmarks.md, "Where the compiled step's time goes"). Here one
launch does all of it, and a few element-wise torch ops (which inductor fuses) combine the parts.

Grid: (B * K, n_split + n_rows). Per (row b, bank k):

* programs j < n_split read entries [j E_s, (j + 1) E_s) of the E = W + S window and slot entries
  (flash-decoding: an online softmax over tiles of BLOCK_E entries) and write their partial
  (max, sum of exponentials, weighted sum of values). The token's own window entry (index
  position % W) is taken from the new key and value in registers, so no program depends on
  another's write. Program j = 0 also writes the token into the window ring and adds it to the
  open block's pooling sums.
* programs j >= n_split (level2 = delta) each update BLOCK_V rows of the delta memory S [m, m] in
  place and write those rows of the level-2 read: with unit q, k, alpha = exp(log_alpha),
  u = beta (v - alpha S k), S' = alpha S + u k^T and o = S' q = alpha S q + u (k . q). Rows are
  independent, so S is read and written once.

`combine_partials` then adds the null slot (logit null_logit[k], value 0) and normalises.

Entries' biases (the torch step's, to the last detail): window entry w at distance
d = (position - w) mod W: -window_slope[k] d, hidden where d > position (before the stream's start);
ring slot i: its id is slot_ids[b, k, i] in the kept part (i < P) and the age part's
first + ((i - P - first) mod R) (first = completed blocks * r - R) after it; its block id // r (empty:
id < 0, hidden); bias -age_slope[k] (age - 1) with age = position // C - block (capped at age_cap
when given), plus the slot's importance when the ring has one.

Everything is computed in the state's dtype (that of the pooling sums: fp32, or float64 in tests); q, k,
v may be half, and so may the window's and the ring's entries (a `DecodeState` with narrower entries):
they are read into the state's dtype, and the token's own entry is rounded as the ring stores it.
Reference: the torch step, which tests/ops/memory_step/ compares this against (float64, awkward
sizes, every config switch).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# Launch shape (benchmarks/bench_memory_step.py sweeps these; docs/benchmarks.md): tiles of 8192 entries x
# features, one tile per read program (the most programs at batch 1), 4 warps: the fastest or within 4%
# of it at the 1b and 7b presets' sizes, batches 1 and 8, on an H100.
_TILE_ELEMENTS = 8192
_TILES_PER_SPLIT = 1
_NUM_WARPS = 4


@triton.jit
def _pymod(x, n):
    """x mod n with a non-negative result (Python's %, which the torch step uses) for n > 0."""
    r = x % n
    return tl.where(r < 0, r + n, r)


@triton.jit
def _memory_step_kernel(
    q_ptr, k_ptr, v_ptr, log_alpha_ptr, beta_ptr, weight_ptr, pos_ptr, age_slope_ptr, window_slope_ptr,
    delta_ptr, window_keys_ptr, window_values_ptr, slot_keys_ptr, slot_values_ptr, importance_ptr, slot_ids_ptr,
    key_sum_ptr, value_sum_ptr, weight_sum_ptr,
    level2_ptr, part_max_ptr, part_sum_ptr, part_acc_ptr,
    in_stride_b, in_stride_k, scale, age_cap,
    K: tl.constexpr, M: tl.constexpr, W: tl.constexpr, S: tl.constexpr, P: tl.constexpr, C: tl.constexpr,
    R_SUB: tl.constexpr, N_SPLIT: tl.constexpr, TILES: tl.constexpr, BLOCK_E: tl.constexpr,
    BLOCK_V: tl.constexpr, BLOCK_M: tl.constexpr, HAS_DELTA: tl.constexpr, HAS_WEIGHTS: tl.constexpr,
    HAS_IMPORTANCE: tl.constexpr, HAS_AGE_CAP: tl.constexpr, ACC: tl.constexpr,
):
    bk = tl.program_id(0)
    j = tl.program_id(1)
    b = bk // K
    bank = bk % K
    cols = tl.arange(0, BLOCK_M)
    col_ok = cols < M
    vec = b * in_stride_b + bank * in_stride_k + cols  # this (row, bank)'s [m] vectors in q, k, v
    pos = tl.load(pos_ptr + b)
    if j < N_SPLIT:
        q = tl.load(q_ptr + vec, mask=col_ok, other=0.0).to(ACC) * scale
        k_new = tl.load(k_ptr + vec, mask=col_ok, other=0.0).to(ACC)
        v_new = tl.load(v_ptr + vec, mask=col_ok, other=0.0).to(ACC)
        block_now = pos // C
        best = tl.full((), float("-inf"), ACC)
        total = tl.zeros((), ACC)
        acc = tl.zeros((BLOCK_M,), ACC)
        for t in tl.static_range(TILES):
            e = (j * TILES + t) * BLOCK_E + tl.arange(0, BLOCK_E)
            keys = tl.zeros((BLOCK_E, BLOCK_M), ACC)
            values = tl.zeros((BLOCK_E, BLOCK_M), ACC)
            bias = tl.zeros((BLOCK_E,), ACC)
            visible = e < 0  # all False
            if W > 0:
                in_window = e < W
                at = (bk * W + e)[:, None] * M + cols[None, :]
                ok = in_window[:, None] & col_ok[None, :]
                own = (e == pos % W)[:, None]  # the token itself: its new key and value, as the ring will hold them
                k_own = k_new.to(window_keys_ptr.dtype.element_ty).to(ACC)
                v_own = v_new.to(window_values_ptr.dtype.element_ty).to(ACC)
                keys += tl.where(own, k_own[None, :], tl.load(window_keys_ptr + at, mask=ok, other=0.0).to(ACC))
                values += tl.where(own, v_own[None, :], tl.load(window_values_ptr + at, mask=ok, other=0.0).to(ACC))
                distance = _pymod(pos - e, W)
                window_slope = tl.load(window_slope_ptr + bank)
                bias += tl.where(in_window, -window_slope * distance.to(ACC), 0.0)
                visible = visible | (in_window & (distance <= pos))
            if S > 0:
                i = e - W
                in_ring = (i >= 0) & (i < S)
                at = (bk * S + i)[:, None] * M + cols[None, :]
                ok = in_ring[:, None] & col_ok[None, :]
                keys += tl.load(slot_keys_ptr + at, mask=ok, other=0.0).to(ACC)
                values += tl.load(slot_values_ptr + at, mask=ok, other=0.0).to(ACC)
                first = block_now * R_SUB - (S - P)  # the oldest id of the age part
                ids = first + _pymod(i - P - first, S - P)
                if P > 0:
                    kept = in_ring & (i < P)
                    ids = tl.where(kept, tl.load(slot_ids_ptr + bk * P + i, mask=kept, other=-1), ids)
                age = block_now - ids // R_SUB  # ids >= 0 wherever the age is used
                if HAS_AGE_CAP:
                    age = tl.minimum(age, age_cap)
                age_slope = tl.load(age_slope_ptr + bank)
                slot_bias = -age_slope * (age - 1).to(ACC)
                if HAS_IMPORTANCE:
                    slot_bias += tl.load(importance_ptr + bk * S + i, mask=in_ring, other=0.0)
                bias += tl.where(in_ring, slot_bias, 0.0)
                visible = visible | (in_ring & (ids >= 0))
            score = tl.sum(keys * q[None, :], axis=1) + bias
            score = tl.where(visible, score, float("-inf"))
            new_best = tl.maximum(best, tl.max(score, axis=0))
            shift = tl.where(new_best == float("-inf"), 0.0, new_best)  # nothing visible yet: all weights 0
            p = tl.exp(score - shift)
            rescale = tl.exp(best - shift)
            total = total * rescale + tl.sum(p, axis=0)
            acc = acc * rescale + tl.sum(p[:, None] * values, axis=0)
            best = new_best
        part = bk * N_SPLIT + j
        tl.store(part_max_ptr + part, best)
        tl.store(part_sum_ptr + part, total)
        tl.store(part_acc_ptr + part * M + cols, acc, mask=col_ok)
        if j == 0:  # the state's writes: the window ring and the open block's pooling sums
            if W > 0:
                own_at = (bk * W + pos % W) * M + cols
                tl.store(window_keys_ptr + own_at, k_new.to(window_keys_ptr.dtype.element_ty), mask=col_ok)
                tl.store(window_values_ptr + own_at, v_new.to(window_values_ptr.dtype.element_ty), mask=col_ok)
            # the open sub-slot's pooling sums (kept with or without a ring, as the torch step keeps them)
            sub = (pos % C) // (C // R_SUB)  # the open sub-slot
            sum_at = (bk * R_SUB + sub) * M + cols
            weight = tl.full((), 1.0, ACC)
            if HAS_WEIGHTS:
                weight = tl.load(weight_ptr + bk).to(ACC)
            tl.store(key_sum_ptr + sum_at, tl.load(key_sum_ptr + sum_at, mask=col_ok) + weight * k_new, mask=col_ok)
            tl.store(value_sum_ptr + sum_at, tl.load(value_sum_ptr + sum_at, mask=col_ok) + weight * v_new,
                     mask=col_ok)
            if HAS_WEIGHTS:
                tl.store(weight_sum_ptr + bk * R_SUB + sub, tl.load(weight_sum_ptr + bk * R_SUB + sub) + weight)
    else:
        if HAS_DELTA:  # rows (j - n_split) * BLOCK_V ... of the delta memory
            rows = (j - N_SPLIT) * BLOCK_V + tl.arange(0, BLOCK_V)
            row_ok = rows < M
            q = tl.load(q_ptr + vec, mask=col_ok, other=0.0).to(ACC)
            k = tl.load(k_ptr + vec, mask=col_ok, other=0.0).to(ACC)
            q = q * (1.0 / tl.sqrt(tl.maximum(tl.sum(q * q, axis=0), 1e-24)))  # unit vectors
            k = k * (1.0 / tl.sqrt(tl.maximum(tl.sum(k * k, axis=0), 1e-24)))
            v = tl.load(v_ptr + b * in_stride_b + bank * in_stride_k + rows, mask=row_ok, other=0.0).to(ACC)
            alpha = tl.exp(tl.load(log_alpha_ptr + bk))
            beta = tl.load(beta_ptr + bk)
            rows_at = (bk * M + rows)[:, None] * M + cols[None, :]
            rows_ok = row_ok[:, None] & col_ok[None, :]
            state = tl.load(delta_ptr + rows_at, mask=rows_ok, other=0.0)
            s_k = tl.sum(state * k[None, :], axis=1)
            s_q = tl.sum(state * q[None, :], axis=1)
            u = beta * (v - alpha * s_k)
            tl.store(delta_ptr + rows_at, alpha * state + u[:, None] * k[None, :], mask=rows_ok)
            tl.store(level2_ptr + bk * M + rows, alpha * s_q + u * tl.sum(k * q, axis=0), mask=row_ok)


def launch_shape(m: int, entries: int, delta: bool) -> dict[str, int]:
    """Tile sizes and split counts for feature size m and E window + slot entries."""
    block_m = max(16, triton.next_power_of_2(m))
    block_e = max(1, min(64, _TILE_ELEMENTS // block_m))
    tiles = _TILES_PER_SPLIT
    block_v = max(1, min(64, _TILE_ELEMENTS // block_m))
    return dict(BLOCK_M=block_m, BLOCK_E=block_e, TILES=tiles, BLOCK_V=block_v,
                N_SPLIT=max(1, -(-entries // (block_e * tiles))), N_ROWS=-(-m // block_v) if delta else 0)


@torch.library.custom_op("mm_rec::memory_step", mutates_args=("delta_memory", "window_keys", "window_values",
                                                               "key_sum", "value_sum", "weight_sum"))
def memory_step(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, log_alpha: torch.Tensor | None, beta: torch.Tensor | None,
    weights: torch.Tensor | None, position: torch.Tensor, age_slope: torch.Tensor, window_slope: torch.Tensor | None,
    delta_memory: torch.Tensor | None, window_keys: torch.Tensor | None, window_values: torch.Tensor | None,
    slot_keys: torch.Tensor, slot_values: torch.Tensor, slot_importance: torch.Tensor | None,
    slot_ids: torch.Tensor | None, key_sum: torch.Tensor, value_sum: torch.Tensor, weight_sum: torch.Tensor | None,
    scale: float, age_cap: int, chunk_size: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The kernel as an operator (opaque to torch.compile, which knows its in-place writes).

    q, k, v [B, K, m] (any float dtype, one layout, unit stride in m); log_alpha, beta [B, K] (None: no
    delta memory); weights [B, K] pooling weights (None: plain mean); position [B] int64; age_slope,
    window_slope [K]; the state tensors in the decode layout (mm_rec/core/hds.py), contiguous, in the
    state's float dtype (key_sum's) but for the entries, which may be narrower: delta_memory [B, K, m, m],
    window_keys/values [B, K, W, m], slot_keys/values [B, K, S, m] (the entries), slot_importance [B, K, S],
    slot_ids [B, K, P] (None when P = 0), key_sum/value_sum [B, K, r, m], weight_sum [B, K, r]; age_cap < 0:
    none.

    Returns (level2 [B, K, m] (empty without a delta memory), part_max, part_sum [B, K, n_split],
    part_acc [B, K, n_split, m]): `combine_partials` turns the last three into the read."""
    B, K, m = k.shape
    acc = key_sum.dtype
    state = (delta_memory, window_keys, window_values, slot_keys, slot_values, slot_importance, slot_ids, key_sum,
             value_sum, weight_sum)
    if not all(t is None or t.is_contiguous() for t in state):
        raise ValueError("memory_step: the state's tensors must be contiguous (DecodeState's are)")
    W = 0 if window_keys is None else window_keys.shape[2]
    S = slot_keys.shape[2]
    P = 0 if slot_ids is None else slot_ids.shape[2]
    r = key_sum.shape[2]
    shape = launch_shape(m, W + S, delta_memory is not None)
    n_split = shape["N_SPLIT"]
    level2 = k.new_empty((B, K, m) if delta_memory is not None else (0,), dtype=acc)
    part_max = k.new_empty((B, K, n_split), dtype=acc)
    part_sum = k.new_empty((B, K, n_split), dtype=acc)
    part_acc = k.new_empty((B, K, n_split, m), dtype=acc)
    unused = slot_keys  # a placeholder pointer for absent pieces: the kernel never touches it
    if not (q.stride() == k.stride() == v.stride() and q.stride(2) == 1):  # views of one projection have one layout
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    _memory_step_kernel[(B * K, n_split + shape["N_ROWS"])](
        q, k, v, _or(log_alpha, unused), _or(beta, unused), _or(weights, unused), position, age_slope,
        _or(window_slope, age_slope), _or(delta_memory, unused), _or(window_keys, unused),
        _or(window_values, unused), slot_keys, slot_values, _or(slot_importance, unused), _or(slot_ids, position),
        key_sum, value_sum, _or(weight_sum, unused), _or(level2, unused), part_max, part_sum, part_acc,
        q.stride(0), q.stride(1), scale, age_cap,
        K=K, M=m, W=W, S=S, P=P, C=chunk_size, R_SUB=r, N_SPLIT=n_split, TILES=shape["TILES"],
        BLOCK_E=shape["BLOCK_E"], BLOCK_V=shape["BLOCK_V"], BLOCK_M=shape["BLOCK_M"],
        HAS_DELTA=delta_memory is not None, HAS_WEIGHTS=weights is not None,
        HAS_IMPORTANCE=slot_importance is not None, HAS_AGE_CAP=age_cap >= 0,
        ACC=tl.float64 if acc == torch.float64 else tl.float32,
        num_warps=_NUM_WARPS,
    )
    return level2, part_max, part_sum, part_acc


@memory_step.register_fake
def _memory_step_fake(q, k, v, log_alpha, beta, weights, position, age_slope, window_slope, delta_memory,
                      window_keys, window_values, slot_keys, slot_values, slot_importance, slot_ids, key_sum,
                      value_sum, weight_sum, scale, age_cap, chunk_size):
    B, K, m = k.shape
    acc = key_sum.dtype
    W = 0 if window_keys is None else window_keys.shape[2]
    n_split = launch_shape(m, W + slot_keys.shape[2], delta_memory is not None)["N_SPLIT"]
    return (k.new_empty((B, K, m) if delta_memory is not None else (0,), dtype=acc),
            k.new_empty((B, K, n_split), dtype=acc), k.new_empty((B, K, n_split), dtype=acc),
            k.new_empty((B, K, n_split, m), dtype=acc))


def _or(x: torch.Tensor | None, fallback: torch.Tensor) -> torch.Tensor:
    return fallback if x is None else x


def combine_partials(part_max: torch.Tensor, part_sum: torch.Tensor, part_acc: torch.Tensor,
                     null_logit: torch.Tensor) -> torch.Tensor:
    """The read [B, K, m] from the splits' partials and the null slot (logit null_logit [K], value 0):
    sum_j e^{max_j - top} acc_j / (sum_j e^{max_j - top} sum_j + e^{null - top})."""
    null = null_logit.to(part_max.dtype)[None, :]  # [1, K]
    top = torch.maximum(part_max.amax(-1), null)  # finite: the null slot is always visible
    weight = torch.exp(part_max - top[..., None])  # 0 for a split that saw nothing
    total = (weight * part_sum).sum(-1) + torch.exp(null - top)
    return (weight[..., None] * part_acc).sum(-2) / total[..., None]
