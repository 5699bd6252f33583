"""The chunk-to-chunk pass of the chunked delta rule as one Triton kernel (reference: `chain_states_torch`
in reference.py, which tests/ops/delta_rule/ compares this against).

The pass applies, chunk after chunk, the factored affine map of `_ChunkedDeltaRule`

    S <- d_c S - (S left_c^T) right_c + add_c          (c = 0 .. n-1, or n-1 .. 0 with reverse)

to a state S [m_v, m_k] per row: the forward's S M + R (left = W, right = K_end, add = R) and the
backward's dS' M^T + dO^T Q_s (left = K_end, right = W, add = dO^T Q_s, in reverse). In torch that is
three or four kernels per chunk, each reading and writing the whole [N, m_v, m_k] state (32 MB per
chunk at the 7b preset, 4 x 2K tokens), then a stack of every chunk's state and a cast of it. Here
each program keeps BLOCK_V rows of S in registers for the whole pass (rows of S are independent: the
map multiplies S from the right), so per chunk it reads its rows of add_c once and writes the state
entering the chunk once, in the dtype the caller keeps it in (the operands' half type: what the
products after the pass take), and optionally its Frobenius product with another tensor (the
backward's d e^{g_L}).

Grid: (N, ceil(m_v / BLOCK_V)). The products S left_c^T [BLOCK_V, L] and (.) right_c run on tensor
cores in the operands' dtype (fp32 accumulation; fp32 operands multiply in IEEE fp32, not TF32), over
sub-blocks of the chunk's L tokens so that left_c and right_c tiles fit in shared memory.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

MAX_KEY_DIM = 512  # a program holds BLOCK_V x next_pow2(m_k) of fp32 state in registers
_STATE_TILE_ELEMENTS = 8192  # BLOCK_V x BLOCK_K of state a program (BLOCK_V >= 16: tensor-core rows)
_FACTOR_TILE_BYTES = 32768  # one [BLOCK_L, BLOCK_K] tile of left_c or right_c (tests shrink it)


@triton.jit
def _chain_kernel(
    start_ptr, add_ptr, decay_ptr, left_ptr, right_ptr, entering_ptr, final_ptr, dot_with_ptr, dots_ptr,
    n, L, MV, MK, LEFT_STRIDE, RIGHT_STRIDE,
    REVERSE: tl.constexpr, HAS_DOT: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_L: tl.constexpr,
):
    row = tl.program_id(0)
    vb = tl.program_id(1)
    n_vb = tl.num_programs(1)
    rows = vb * BLOCK_V + tl.arange(0, BLOCK_V)
    cols = tl.arange(0, BLOCK_K)
    tokens = tl.arange(0, BLOCK_L)
    tile_ok = (rows < MV)[:, None] & (cols < MK)[None, :]
    tile_at = rows[:, None] * MK + cols[None, :]  # within one [MV, MK] matrix
    state = tl.load(start_ptr + row * MV * MK + tile_at, mask=tile_ok, other=0.0)  # the state's dtype
    for step in range(n):
        c = step
        if REVERSE:
            c = n - 1 - step
        matrix = (row * n + c).to(tl.int64) * MV * MK  # this chunk's [MV, MK] matrix in add, entering, ...
        tl.store(entering_ptr + matrix + tile_at, state.to(entering_ptr.dtype.element_ty), mask=tile_ok)
        if HAS_DOT:
            other = tl.load(dot_with_ptr + matrix + tile_at, mask=tile_ok, other=0.0).to(state.dtype)
            tl.store(dots_ptr + (row * n_vb + vb) * n + c, tl.sum(tl.sum(other * state, axis=1), axis=0))
        low = state.to(left_ptr.dtype.element_ty)
        update = tl.load(decay_ptr + row * n + c) * state + tl.load(add_ptr + matrix + tile_at, mask=tile_ok,
                                                                    other=0.0).to(state.dtype)
        chunk = (row * n + c).to(tl.int64) * L  # this chunk's [L, MK] factors: their first token
        for l0 in range(0, L, BLOCK_L):
            at = (chunk + l0 + tokens)[:, None]  # token rows; each factor has its own token stride
            ok = ((l0 + tokens) < L)[:, None] & (cols < MK)[None, :]
            left = tl.load(left_ptr + at * LEFT_STRIDE + cols[None, :], mask=ok, other=0.0)  # [BLOCK_L, BLOCK_K]
            right = tl.load(right_ptr + at * RIGHT_STRIDE + cols[None, :], mask=ok, other=0.0)
            if IEEE:
                through = tl.dot(low, tl.trans(left), input_precision="ieee", out_dtype=state.dtype)
                update -= tl.dot(through.to(right.dtype), right, input_precision="ieee", out_dtype=state.dtype)
            else:
                through = tl.dot(low, tl.trans(left))  # [BLOCK_V, BLOCK_L], fp32 accumulation
                update -= tl.dot(through.to(right.dtype), right)
        state = update
    tl.store(final_ptr + row * MV * MK + tile_at, state, mask=tile_ok)


def _token_rows(x: torch.Tensor) -> torch.Tensor:
    """x [N, n, L, m] as the kernel reads it: unit stride along m and tokens evenly spaced across the chunk
    and row axes (a slice of the last axis, such as W in the chunk's [W | U_v], is read in place), else a
    contiguous copy."""
    N, n, L, _ = x.shape
    token = x.stride(-2)
    if x.stride(-1) == 1 and x.stride(-3) == L * token and x.stride(-4) == n * L * token:
        return x
    return x.contiguous()


def chain_states_triton(start: torch.Tensor, add: torch.Tensor, decay: torch.Tensor, left: torch.Tensor,
                        right: torch.Tensor, reverse: bool = False, entering_dtype: torch.dtype | None = None,
                        dot_with: torch.Tensor | None = None):
    """The same contract as `chain_states_torch` (reference.py), on one Triton launch."""
    N, n, L, mk = left.shape
    mv = start.shape[-2]
    if mk > MAX_KEY_DIM:
        raise ValueError(f"the Triton chain holds rows of the state in registers: m_k <= {MAX_KEY_DIM}, got {mk}")
    dtype = start.dtype
    start, add, decay = start.contiguous(), add.contiguous(), decay.to(dtype).contiguous()
    left, right = _token_rows(left), _token_rows(right)
    entering = torch.empty(N, n, mv, mk, dtype=entering_dtype or dtype, device=start.device)
    final = torch.empty_like(start)
    block_k = max(16, triton.next_power_of_2(mk))
    block_v = max(16, min(64, triton.next_power_of_2(mv), _STATE_TILE_ELEMENTS // block_k))
    block_l = max(16, min(triton.next_power_of_2(L), _FACTOR_TILE_BYTES // (block_k * left.element_size())))
    n_vb = -(-mv // block_v)
    dots = torch.empty(N, n_vb, n, dtype=dtype, device=start.device) if dot_with is not None else None
    _chain_kernel[(N, n_vb)](
        start, add, decay, left, right, entering, final,
        dot_with.contiguous() if dot_with is not None else entering, dots if dots is not None else decay,
        n, L, mv, mk, left.stride(-2), right.stride(-2),
        REVERSE=reverse, HAS_DOT=dot_with is not None, IEEE=left.dtype == dtype,
        BLOCK_V=block_v, BLOCK_K=block_k, BLOCK_L=block_l, num_warps=4, num_stages=1,
    )
    return entering, final, dots.sum(1) if dots is not None else None
