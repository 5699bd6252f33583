"""Triton kernels for the log-space associative scan h_t = exp(log_a_t) * h_{t-1} + b_t.

Reference: `mm_rec.ops.scan.reference` (torch backend and the float64 `sequential` oracle);
public entry point: `mm_rec.core.associative_scan.associative_scan_exponential`.

Layout of the work. Tensors are [B, T, D] with D contiguous (trailing feature dims flattened,
no transposes). A program owns BLOCK_D channels of one batch row and walks a range of time
steps, the state in registers in the accumulation dtype (fp32; float64 for float64 inputs):

* each step loads one contiguous [BLOCK_D] row segment per tensor (coalesced along D) and
  issues the loads `U` steps ahead of their use from a ring of register slots, so that
  ~U * BLOCK_D * (bytes per element) are in flight per program: the scan is bound by memory
  latency times bytes in flight, not by its one FMA per element (ptxas issues the U refills of
  a group together, so each group's loads overlap the previous group's arithmetic);
* only a = exp(log_a) <= 1 is ever formed, never a difference of cumulative logs, so every
  exponent is <= 0;
* when B * D channels are too few to keep the GPU's memory system busy (B = 1 shapes), T is
  cut into `n_chunks` chunks handled by different programs: a first pass computes each chunk's
  aggregate (decay product P, end state S from a zero start; for a chunk, h_out = P h_in + S),
  a small kernel scans the aggregates over the chunks, and the main pass reruns each chunk from
  its incoming state. That reads the inputs twice (6 of 8 bytes per element again for bf16 b
  with fp32 log_a), so it is used only where it beats a single pass that leaves the GPU idle.

Backward: the reverse scan with shifted gates, walking T backwards with x = a_{t+1} g_{t+1}:
    g_t = dh_t + x,  x <- a_t g_t,  db_t = g_t,  d log_a_t = x * h_{t-1},  dh_0 = x at t = 0,
starting from x = d final_state. It reads dh, log_a and the forward's output h (for h_{t-1}; in
b's dtype) and stores nothing else: no extra tensor is saved for it. The same chunking applies,
with the chunks scanned right to left.

T is a run-time argument the compiler does not specialise on: no recompilation when T changes.
D is a compile-time constant (one compile per model width): the U row offsets u * D become
immediates of the load instructions instead of 64-bit addresses held in registers, which about
halves the registers per thread. Element offsets are 64-bit (T up to 2^20 and beyond); the grid
is (B * D-blocks, chunks), far inside CUDA's limits.

Measurements (bandwidth against a copy, the launch-configuration and chunk-count sweeps behind
the constants below, host time, compile time): docs/benchmarks.md, "Associative scan (Triton)".
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from mm_rec.ops import compute_dtype
from mm_rec.ops.scan.layout import kernel_view

# Launch parameters: elements per thread (EPT), warps per program, steps loaded ahead (U); the
# best of the `benchmarks/bench_scan.py --variants` sweep on an H100.
_FWD_CONFIG = {"EPT": 2, "num_warps": 1, "U": 32}
_BWD_CONFIG = {"EPT": 2, "num_warps": 1, "U": 32}
# Chunking along T (from the H100 chunk-count sweeps): a single pass keeps the memory system busy
# from about 120 channel streams (B * D) per multiprocessor; below that, T is cut into chunks
# until there are about 480 streams (B * D * n_chunks) per multiprocessor, in chunks of at least
# _MIN_CHUNK_LEN steps and at most _MAX_CHUNKS (the carry kernel holds all chunks in registers).
_SINGLE_PASS_STREAMS_PER_SM = 120
_CHUNKED_STREAMS_PER_SM = 480
_MIN_CHUNK_LEN = 512
_MAX_CHUNKS = 64
_CARRY_BLOCK_D = 64
_ASSUMED_SMS = 132  # without a GPU (interpreter): an H100's count

_TL_DTYPE = {torch.float32: tl.float32, torch.float64: tl.float64}


@triton.jit
def _combine(p1, s1, p2, s2):
    """Aggregate (p1, s1) followed by (p2, s2): h -> p2 (p1 h + s1) + s2."""
    return p1 * p2, p2 * s1 + s2


# The kernels' common prologue. Triton inlines @triton.jit helpers, so these compile to the same
# machine code as the lines written out in each kernel.
@triton.jit
def _program_channels(D, BLOCK_D: tl.constexpr):
    """(batch row, channel indices d [BLOCK_D], mask d < D) of this program: grid axis 0
    enumerates (batch row, block of BLOCK_D channels)."""
    n_dblocks = tl.cdiv(D, BLOCK_D)
    bidx = tl.program_id(0) // n_dblocks
    d = (tl.program_id(0) % n_dblocks) * BLOCK_D + tl.arange(0, BLOCK_D)
    return bidx, d, d < D


@triton.jit
def _program_chunk(bidx, T, chunk_len, n_chunks, first_chunk, D):
    """(chunk c = first_chunk + program_id(1), its first step t0, its length, element offset of
    row (bidx, c) of a [B, n_chunks, D] tensor) of this program."""
    c = first_chunk + tl.program_id(1)
    t0 = c * chunk_len
    n_steps = tl.minimum(chunk_len, T - t0)
    return c, t0, n_steps, (bidx.to(tl.int64) * n_chunks + c) * D


@triton.jit
def _log_a_offsets(bidx, t, d, la_sb, la_sk, la_sm, LA_ST: tl.constexpr, LA_M: tl.constexpr):
    """(scalar element offset of log_a[bidx, t], channel offsets [BLOCK_D]) of a log_a read through
    its strides as [B, T, K, LA_M] (channel d = (d // LA_M, d % LA_M)): a decay broadcast over
    trailing channels (stride 0) is read in place, never materialised."""
    return bidx.to(tl.int64) * la_sb + t.to(tl.int64) * LA_ST, (d // LA_M) * la_sk + (d % LA_M) * la_sm


@triton.jit
def _clamp(x, lo, hi):
    return tl.minimum(tl.maximum(x, lo), hi)


@triton.jit
def _load_or_zeros(ptr, offset, d, dmask, LOAD: tl.constexpr, ACC: tl.constexpr):
    """ptr[offset + d] in ACC if LOAD, else zeros (ptr is then None)."""
    if LOAD:
        x = tl.load(ptr + offset + d, mask=dmask, other=0.0).to(ACC)
    else:
        x = tl.zeros(d.shape, ACC)
    return x


@triton.jit(do_not_specialize=["T", "chunk_len", "n_chunks", "first_chunk", "la_sb", "clamp_min", "clamp_max"])
def _scan_fwd_kernel(
    log_a_ptr, b_ptr, init_ptr,  # log_a (strided: _log_a_offsets), b [B, T, D], [B, n_chunks, D] state entering
    h_ptr, last_ptr, prod_ptr,  # outputs, see below
    T, chunk_len, n_chunks, first_chunk, la_sb, la_sk, la_sm, clamp_min, clamp_max,
    D: tl.constexpr, BLOCK_D: tl.constexpr, U: tl.constexpr, LA_ST: tl.constexpr, LA_M: tl.constexpr,
    HAS_INIT: tl.constexpr, AGG: tl.constexpr, ACC: tl.constexpr,
):
    """Scan of chunk `first_chunk + program_id(1)` for BLOCK_D channels of one batch row.

    AGG=False: writes h [B, T, D] (h_ptr's dtype) and, for the last chunk, the final state
    last_ptr [B, D]. AGG=True: writes nothing per step; stores the chunk's end state from a zero
    start in last_ptr [B, n_chunks, D] and its decay product in prod_ptr [B, n_chunks, D].
    """
    bidx, d, dmask = _program_channels(D, BLOCK_D)
    c, t0, n_steps, chunk_off = _program_chunk(bidx, T, chunk_len, n_chunks, first_chunk, D)
    h = _load_or_zeros(init_ptr, chunk_off, d, dmask, HAS_INIT, ACC)
    if AGG:
        p = tl.full([BLOCK_D], 1.0, ACC)  # decay product of the chunk
    row = (bidx.to(tl.int64) * T + t0) * D  # element offset of (bidx, t0, 0)
    la_row, la_d = _log_a_offsets(bidx, t0, d, la_sb, la_sk, la_sm, LA_ST, LA_M)
    pa = log_a_ptr + la_row  # scalar pointers to the current group of U steps
    pb = b_ptr + row
    if not AGG:
        ph = h_ptr + row

    # Slot u holds step s0 + u; steps past the chunk load as the identity (a = 1, b = 0).
    las = ()
    bs = ()
    for u in tl.static_range(U):
        m = dmask & (u < n_steps)
        las = las + (tl.load(pa + u * LA_ST + la_d, mask=m, other=0.0),)
        bs = bs + (tl.load(pb + u * D + d, mask=m, other=0.0),)
    for s0 in range(0, n_steps, U):
        for u in tl.static_range(U):
            a = tl.exp(_clamp(las[u].to(ACC), clamp_min, clamp_max))
            h = a * h + bs[u].to(ACC)
            if AGG:
                p = p * a
            else:
                tl.store(ph + u * D + d, h.to(h_ptr.dtype.element_ty), mask=dmask & (s0 + u < n_steps))
            # Refill the slot with the step U ahead: its load has U steps to arrive.
            m = dmask & (s0 + u + U < n_steps)
            las = las[:u] + (tl.load(pa + (u + U) * LA_ST + la_d, mask=m, other=0.0),) + las[u + 1:]
            bs = bs[:u] + (tl.load(pb + (u + U) * D + d, mask=m, other=0.0),) + bs[u + 1:]
        pa += U * LA_ST
        pb += U * D
        if not AGG:
            ph += U * D

    if AGG:
        tl.store(last_ptr + chunk_off + d, h, mask=dmask)
        tl.store(prod_ptr + chunk_off + d, p, mask=dmask)
    elif c == n_chunks - 1:
        tl.store(last_ptr + bidx.to(tl.int64) * D + d, h, mask=dmask)


@triton.jit(do_not_specialize=["T", "chunk_len", "n_chunks", "first_chunk", "la_sb", "clamp_min", "clamp_max"])
def _scan_bwd_kernel(
    dh_ptr, log_a_ptr, h_ptr, h0_ptr, init_ptr,  # dh, log_a (strided), h, h_0 [B, D], [B, n_chunks, D] x entering
    db_ptr, dla_ptr, first_ptr, prod_ptr,  # outputs, see below
    T, chunk_len, n_chunks, first_chunk, la_sb, la_sk, la_sm, clamp_min, clamp_max,
    D: tl.constexpr, BLOCK_D: tl.constexpr, U: tl.constexpr, LA_ST: tl.constexpr, LA_M: tl.constexpr,
    HAS_INIT: tl.constexpr, HAS_H0: tl.constexpr, AGG: tl.constexpr, ACC: tl.constexpr,
):
    """Reverse scan of chunk `first_chunk + program_id(1)`, x = a_{t+1} g_{t+1} entering from
    the right (init_ptr; zero without it).

    AGG=False: writes db [B, T, D] (b's dtype), d log_a [B, T, D] (log_a's dtype) and, for the
    first chunk, dh_0 = first_ptr [B, D]. AGG=True: loads neither h nor h_0 and writes only the
    x leaving the chunk from a zero start (first_ptr [B, n_chunks, D]) and the chunk's decay
    product (prod_ptr [B, n_chunks, D]).
    """
    bidx, d, dmask = _program_channels(D, BLOCK_D)
    c, t0, n_steps, chunk_off = _program_chunk(bidx, T, chunk_len, n_chunks, first_chunk, D)
    x = _load_or_zeros(init_ptr, chunk_off, d, dmask, HAS_INIT, ACC)
    if AGG:
        p = tl.full([BLOCK_D], 1.0, ACC)  # decay product of the chunk
    h0 = _load_or_zeros(h0_ptr, bidx.to(tl.int64) * D, d, dmask, HAS_H0 and not AGG, ACC)
    last = t0 + n_steps - 1  # the chunk is walked from its last step back to t0
    row = (bidx.to(tl.int64) * T + last) * D
    la_row, la_d = _log_a_offsets(bidx, last, d, la_sb, la_sk, la_sm, LA_ST, LA_M)
    pdh = dh_ptr + row  # scalar pointers to the step of reverse index i0 (time last - i0)
    pla = log_a_ptr + la_row
    if not AGG:
        ph = h_ptr + row - D  # h_{t-1}
        pdb = db_ptr + row
        pdla = dla_ptr + row

    # Slot u holds reverse step i0 + u, i.e. time last - i0 - u.
    dhs = ()
    las = ()
    hps = ()
    for u in tl.static_range(U):
        m = dmask & (u < n_steps)
        dhs = dhs + (tl.load(pdh - u * D + d, mask=m, other=0.0),)
        las = las + (tl.load(pla - u * LA_ST + la_d, mask=m, other=0.0),)
        if not AGG:
            hps = hps + (tl.load(ph - u * D + d, mask=m & (last - u >= 1), other=0.0),)
    for i0 in range(0, n_steps, U):
        for u in tl.static_range(U):
            la = las[u].to(ACC)
            a = tl.exp(_clamp(la, clamp_min, clamp_max))
            g = dhs[u].to(ACC) + x
            x = a * g
            if AGG:
                p = p * a
            else:
                t = last - i0 - u
                h_prev = tl.where(t == 0, h0, hps[u].to(ACC))
                m = dmask & (i0 + u < n_steps)
                tl.store(pdb - u * D + d, g.to(db_ptr.dtype.element_ty), mask=m)
                # zero where the clamp was active (torch.clamp's rule: the bounds themselves pass)
                dla = tl.where((la >= clamp_min) & (la <= clamp_max), x * h_prev, 0.0)
                tl.store(pdla - u * D + d, dla.to(dla_ptr.dtype.element_ty), mask=m)
            m = dmask & (i0 + u + U < n_steps)
            dhs = dhs[:u] + (tl.load(pdh - (u + U) * D + d, mask=m, other=0.0),) + dhs[u + 1:]
            las = las[:u] + (tl.load(pla - (u + U) * LA_ST + la_d, mask=m, other=0.0),) + las[u + 1:]
            if not AGG:
                m = m & (last - i0 - u - U >= 1)
                hps = hps[:u] + (tl.load(ph - (u + U) * D + d, mask=m, other=0.0),) + hps[u + 1:]
        pdh -= U * D
        pla -= U * LA_ST
        if not AGG:
            ph -= U * D
            pdb -= U * D
            pdla -= U * D

    if AGG:
        tl.store(first_ptr + chunk_off + d, x, mask=dmask)
        tl.store(prod_ptr + chunk_off + d, p, mask=dmask)
    elif c == 0:
        tl.store(first_ptr + bidx.to(tl.int64) * D + d, x, mask=dmask)


@triton.jit
def _carry_kernel(
    prod_ptr, state_ptr, init_ptr, carry_ptr,  # [B, n_chunks, D] x2, [B, D], out [B, n_chunks, D]
    D, n_chunks,
    NC: tl.constexpr, BLOCK_D: tl.constexpr, HAS_INIT: tl.constexpr, REVERSE: tl.constexpr,
):
    """State entering every chunk, from the chunks' aggregates: carry[c] = P[c'] carry[c'] + S[c']
    with c' = c - 1 (c' = c + 1 when REVERSE), and init (or zero) entering the first chunk in
    scan order. All chunks of BLOCK_D channels are scanned at once along axis 0 (NC >= n_chunks)."""
    bidx, d, dmask = _program_channels(D, BLOCK_D)
    j = tl.arange(0, NC)[:, None]  # position in scan order
    if REVERSE:
        c = n_chunks - 1 - j
        c_next = c - 1
    else:
        c = j
        c_next = c + 1
    base = bidx.to(tl.int64) * n_chunks * D
    init = _load_or_zeros(init_ptr, bidx.to(tl.int64) * D, d, dmask, HAS_INIT, carry_ptr.dtype.element_ty)
    c_first = n_chunks - 1 if REVERSE else 0
    tl.store(carry_ptr + base + c_first * D + d, init, mask=dmask)
    # The last chunk in scan order feeds no other chunk; masked rows are the identity (1, 0).
    m = (j < n_chunks - 1) & dmask[None, :]
    off = base + c.to(tl.int64) * D + d[None, :]
    p = tl.load(prod_ptr + off, mask=m, other=1.0)
    s = tl.load(state_ptr + off, mask=m, other=0.0)
    s = tl.where(j == 0, s + p * init[None, :], s)
    _, carry = tl.associative_scan((p, s), axis=0, combine_fn=_combine)
    tl.store(carry_ptr + base + c_next.to(tl.int64) * D + d[None, :], carry, mask=m)


def num_chunks(B: int, T: int, D: int, device: torch.device) -> int:
    """Chunks along T: one where B * D channel streams fill the GPU (the single pass reads the
    inputs once), else enough for about `_CHUNKED_STREAMS_PER_SM` streams per multiprocessor."""
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else _ASSUMED_SMS
    if B * D >= sms * _SINGLE_PASS_STREAMS_PER_SM:
        return 1
    wanted = triton.cdiv(sms * _CHUNKED_STREAMS_PER_SM, B * D)
    return max(1, min(wanted, T // _MIN_CHUNK_LEN, _MAX_CHUNKS))


def _launch_plan(
    B: int, T: int, D: int, device: torch.device, n_chunks: int | None, config: dict
) -> tuple[int, int, int, int, dict]:
    """(n_chunks, chunk_len, BLOCK_D, grid rows = B * D-blocks, kernel meta-parameters) of a scan
    pass over [B, T, D] with a config {EPT, num_warps, U}; no chunk is empty."""
    n = n_chunks or num_chunks(B, T, D, device)
    if not 1 <= n <= _MAX_CHUNKS:
        raise ValueError(f"n_chunks must be in [1, {_MAX_CHUNKS}], got {n}")
    chunk_len = triton.cdiv(T, min(n, T))
    block_d = min(config["EPT"] * 32 * config["num_warps"], max(16, triton.next_power_of_2(D)))
    meta = {"U": config["U"], "num_warps": config["num_warps"]}
    return triton.cdiv(T, chunk_len), chunk_len, block_d, B * triton.cdiv(D, block_d), meta


def _carries(prod: torch.Tensor, state: torch.Tensor, init: torch.Tensor | None, reverse: bool) -> torch.Tensor:
    B, n, D = prod.shape
    carry = torch.empty_like(prod)
    grid = (B * triton.cdiv(D, _CARRY_BLOCK_D),)
    _carry_kernel[grid](prod, state, init, carry, D, n, NC=triton.next_power_of_2(n), BLOCK_D=_CARRY_BLOCK_D,
                        HAS_INIT=init is not None, REVERSE=reverse, num_warps=4)
    return carry


def _log_a_layout(log_a: torch.Tensor, B: int, T: int) -> tuple[torch.Tensor, dict, dict]:
    """log_a as the kernels read it ([B, T, D] or [B, T, K, M], any strides: `kernel_view`), its
    run-time stride arguments and its compile-time ones."""
    la = kernel_view(log_a, B, T)
    if la.dim() == 3:  # one channel group of D
        la_sk, la_sm, M = 0, la.stride(2), la.shape[2]
    else:
        la_sk, la_sm, M = la.stride(2), la.stride(3), la.shape[3]
    return la, {"la_sb": la.stride(0), "la_sk": la_sk, "la_sm": la_sm}, {"LA_ST": la.stride(1), "LA_M": M}


def launch_fwd(
    log_a: torch.Tensor, b: torch.Tensor, h0: torch.Tensor | None,
    n_chunks: int | None = None, config: dict | None = None,
    clamp_min: float = -math.inf, clamp_max: float = math.inf,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward scan (no autograd) of b [B, T, D] with log_a of any float dtype and strides ([B, T, D]
    or any shape that `kernel_view` reads in place, e.g. a decay expanded over trailing channels),
    clamped to [clamp_min, clamp_max] inside the kernel (the bounds must enclose 0: steps past a
    chunk's end load log_a = 0 as the identity).

    Returns h [B, T, D] in b's dtype and the final state [B, D] in the accumulation dtype (fp32,
    float64 if an input is float64). `n_chunks` forces the chunking along T (default: `num_chunks`).
    """
    B, T, D = b.shape
    acc = compute_dtype(log_a, b, h0)
    la, la_args, la_meta = _log_a_layout(log_a, B, T)
    b = b.contiguous()
    h0 = h0.to(acc).contiguous() if h0 is not None else None
    n, chunk_len, block_d, rows, meta = _launch_plan(B, T, D, b.device, n_chunks, config or _FWD_CONFIG)
    meta.update(la_meta, ACC=_TL_DTYPE[acc], D=D, BLOCK_D=block_d)
    clamps = {"clamp_min": clamp_min, "clamp_max": clamp_max}
    h = torch.empty_like(b)
    final = torch.empty(B, D, device=b.device, dtype=acc)
    init = h0
    if n > 1:
        state = torch.empty(B, n, D, device=b.device, dtype=acc)
        prod = torch.empty_like(state)
        _scan_fwd_kernel[(rows, n - 1)](la, b, None, None, state, prod, T, chunk_len, n, 0, **la_args, **clamps,
                                        HAS_INIT=False, AGG=True, **meta)
        init = _carries(prod, state, h0, reverse=False)
    _scan_fwd_kernel[(rows, n)](la, b, init, h, final, None, T, chunk_len, n, 0, **la_args, **clamps,
                                HAS_INIT=init is not None, AGG=False, **meta)
    return h, final


def launch_bwd(
    dh: torch.Tensor, d_final: torch.Tensor | None, log_a: torch.Tensor, h: torch.Tensor, h0: torch.Tensor | None,
    n_chunks: int | None = None, config: dict | None = None,
    clamp_min: float = -math.inf, clamp_max: float = math.inf,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Backward of `launch_fwd` (no autograd): from dL/dh [B, T, D] and dL/d final_state [B, D]
    (or None), given log_a (as `launch_fwd` took it), the forward's h and h0. Returns (d log_a
    [B, T, D] dense in log_a's dtype, zero where the clamp was active; db in h's dtype; dh0 [B, D]
    in the accumulation dtype, the zero-input gradient if h0 is None)."""
    B, T, D = h.shape
    acc = compute_dtype(log_a, h, h0)
    la, la_args, la_meta = _log_a_layout(log_a, B, T)
    dh, h = dh.contiguous(), h.contiguous()
    h0 = h0.to(acc).contiguous() if h0 is not None else None
    d_final = d_final.to(acc).contiguous() if d_final is not None else None
    n, chunk_len, block_d, rows, meta = _launch_plan(B, T, D, h.device, n_chunks, config or _BWD_CONFIG)
    meta.update(la_meta, ACC=_TL_DTYPE[acc], D=D, BLOCK_D=block_d)
    clamps = {"clamp_min": clamp_min, "clamp_max": clamp_max}
    d_log_a = torch.empty(B, T, D, device=h.device, dtype=log_a.dtype)
    db = torch.empty_like(h)
    dh0 = torch.empty(B, D, device=h.device, dtype=acc)
    init = d_final
    if n > 1:
        state = torch.empty(B, n, D, device=h.device, dtype=acc)
        prod = torch.empty_like(state)
        _scan_bwd_kernel[(rows, n - 1)](dh, la, None, None, None, None, None, state, prod, T, chunk_len, n, 1,
                                        **la_args, **clamps, HAS_INIT=False, HAS_H0=False, AGG=True, **meta)
        init = _carries(prod, state, d_final, reverse=True)
    _scan_bwd_kernel[(rows, n)](dh, la, h, h0, init, db, d_log_a, dh0, None, T, chunk_len, n, 0, **la_args, **clamps,
                                HAS_INIT=init is not None, HAS_H0=h0 is not None, AGG=False, **meta)
    return d_log_a, db, dh0


@torch.library.custom_op("mm_rec::scan_fwd", mutates_args=())
def scan_fwd(log_a: torch.Tensor, b: torch.Tensor, h0: torch.Tensor | None, clamp_min: float,
             clamp_max: float) -> tuple[torch.Tensor, torch.Tensor]:
    """`launch_fwd` as an operator (opaque to torch.compile, differentiable through `_backward`)."""
    return launch_fwd(log_a, b, h0, clamp_min=clamp_min, clamp_max=clamp_max)


@scan_fwd.register_fake
def _scan_fwd_fake(log_a, b, h0, clamp_min, clamp_max):
    B, _, D = b.shape
    return torch.empty_like(b), b.new_empty((B, D), dtype=compute_dtype(log_a, b, h0))


@torch.library.custom_op("mm_rec::scan_bwd", mutates_args=())
def scan_bwd(
    dh: torch.Tensor, d_final: torch.Tensor, log_a: torch.Tensor, h: torch.Tensor, h0: torch.Tensor | None,
    clamp_min: float, clamp_max: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`launch_bwd` as an operator."""
    return launch_bwd(dh, d_final, log_a, h, h0, clamp_min=clamp_min, clamp_max=clamp_max)


@scan_bwd.register_fake
def _scan_bwd_fake(dh, d_final, log_a, h, h0, clamp_min, clamp_max):
    B, T, D = h.shape
    return (h.new_empty((B, T, D), dtype=log_a.dtype), torch.empty_like(h),
            h.new_empty((B, D), dtype=compute_dtype(log_a, h, h0)))


def _setup_context(ctx, inputs, output) -> None:
    log_a, _, h0, clamp_min, clamp_max = inputs
    h, _ = output
    ctx.clamps = {"clamp_min": clamp_min, "clamp_max": clamp_max}
    ctx.h0_dtype = h0.dtype if h0 is not None else None
    ctx.save_for_backward(log_a, h, h0)


def _grads(ctx, dh, d_final, bwd):
    log_a, h, h0 = ctx.saved_tensors
    d_log_a, db, dh0 = bwd(dh, d_final, log_a, h, h0, **ctx.clamps)
    return d_log_a.view(log_a.shape), db, dh0.to(ctx.h0_dtype) if h0 is not None else None, None, None


def _backward(ctx, dh, d_final):
    return _grads(ctx, dh, d_final, torch.ops.mm_rec.scan_bwd)


scan_fwd.register_autograd(_backward, setup_context=_setup_context)


class _ScanFunction(torch.autograd.Function):
    """The operators' forward and backward without the custom-operator dispatch, for eager mode,
    where host time shows: a forward+backward through autograd takes about as long on the CPU as
    the kernels on the GPU, and the operator dispatch adds to it (docs/benchmarks.md, "Host
    time")."""

    @staticmethod
    def forward(ctx, log_a: torch.Tensor, b: torch.Tensor, h0: torch.Tensor | None, clamp_min: float,
                clamp_max: float):
        h, final = launch_fwd(log_a, b, h0, clamp_min=clamp_min, clamp_max=clamp_max)
        _setup_context(ctx, (log_a, b, h0, clamp_min, clamp_max), (h, final))
        return h, final

    @staticmethod
    def backward(ctx, dh: torch.Tensor, d_final: torch.Tensor):
        return _grads(ctx, dh, d_final, launch_bwd)


def scan_triton(
    log_a: torch.Tensor, b: torch.Tensor, initial_state: torch.Tensor | None = None,
    clamp_min: float = -math.inf, clamp_max: float = math.inf,
) -> tuple[torch.Tensor, torch.Tensor]:
    """h_t = exp(clamp(log_a_t)) * h_{t-1} + b_t over dim 1, differentiable in every input.

    Args:
        log_a: [B, T, ...] log decays of any float dtype and any strides (a decay expanded over
            trailing channels is read in place); clamped inside the kernels to [clamp_min,
            clamp_max], which must enclose 0 (the public dispatcher clamps beforehand otherwise).
        b: [B, T, ...] inputs (bf16, fp16, fp32 or float64), same shape as log_a.
        initial_state: [B, ...] h_0, or None for zeros.

    Returns:
        h: [B, T, ...] all states in b's dtype.
        final_state: [B, ...] h_T in the accumulation dtype (fp32; float64 if an input is).

    b's trailing dims are flattened to D (a view for contiguous inputs); the backward reads the
    saved log_a, h and h_0 only.
    """
    B, T = b.shape[:2]
    features = b.shape[2:]
    flat_h0 = initial_state.reshape(B, -1) if initial_state is not None else None
    args = (log_a, b.reshape(B, T, -1), flat_h0, float(clamp_min), float(clamp_max))
    # torch.compile sees the registered operators (opaque graph nodes); eager mode runs the same
    # kernels through a plain autograd.Function, which costs less host time per call.
    if torch.compiler.is_compiling():
        h, final = torch.ops.mm_rec.scan_fwd(*args)
    else:
        h, final = _ScanFunction.apply(*args)
    return h.reshape(b.shape), final.reshape(B, *features)
