"""The gated delta rule, per bank (DeltaNet with a decay; Yang et al. 2024, "Gated Delta Networks"):

    S_t = alpha_t S_{t-1} (I - beta_t k_t k_t^T) + beta_t v_t k_t^T,      o_t = S_t q_t

with S_t a [m_v, m_k] matrix memory, alpha_t = exp(log_alpha_t) in (0, 1], beta_t in [0, 1] the
write strength. Written as S_t = alpha_t S_{t-1} + u_t k_t^T with the correction
u_t = beta_t (v_t - alpha_t S_{t-1} k_t), it stores v_t under k_t after erasing what S held there.

Two implementations of the same function, and its one-token step:

* `delta_rule_sequential`: the obviously correct float64 loop, the test oracle;
* `delta_rule_chunked`: the chunkwise-parallel form (the WY / UT representation) in plain PyTorch,
  with a hand-derived backward (`_ChunkedDeltaRule`). Within a chunk of L tokens, with g_t the
  chunk-local cumulative sum of log_alpha (so every factor exp(g_t - g_i), i <= t, has an exponent <= 0):

      (I + A) U = diag(beta) (V - diag(e^g) K S_0^T),   A[t, i] = beta_t e^{g_t - g_i} k_t.k_i  (i < t)
      O = diag(e^g) Q S_0^T + (M o Q K^T) U,            M[t, i] = e^{g_t - g_i}                (i <= t)
      S_L = e^{g_L} S_0 + U^T diag(e^{g_L - g}) K

  so each chunk costs a unit lower-triangular inverse and a few [L, m] matmuls, all chunks at once;
  only the state passes sequentially from chunk to chunk, by one affine map S_L = S_0 M + R
  (`_ChunkedDeltaRule`);
* `delta_rule_step`: one token in the correction form (decoding), O(m_v m_k).

Shapes: q, k [N, T, m_k]; v [N, T, m_v]; log_alpha, beta [N, T]; S_0 [N, m_v, m_k] (N = batch rows
times banks). Returns o [N, T, m_v] and S_T [N, m_v, m_k] in the state's dtype (that of log_alpha; q, k, v may be
half, the products' operands: then `delta_rule_chunked`'s o is half too).
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

CHUNK_LEN = 64  # tokens per chunk of delta_rule_chunked for sequences up to 4K


CPU_CHUNK_LEN = 32  # on CPUs: the [L, L] work per token halves, and the loop is not launch-bound


def chunk_len_for(seq_len: int, device_type: str = "cuda") -> int:
    """Chunk length: on GPUs 64 up to 4K tokens, then longer chunks, so that long sequences pass the
    state through fewer sequential steps (launch-bound there); on CPUs 32 at every length."""
    if device_type == "cpu":
        return CPU_CHUNK_LEN
    return CHUNK_LEN if seq_len <= 4096 else 128 if seq_len <= 16384 else 256


def delta_rule_sequential(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, log_alpha: torch.Tensor,
                          beta: torch.Tensor, initial_state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 loop over t (differentiable through autograd)."""
    q, k, v, log_alpha, beta = (x.double() for x in (q, k, v, log_alpha, beta))
    S = initial_state.double()
    eye = torch.eye(k.shape[-1], dtype=torch.float64, device=k.device)
    out = []
    for t in range(q.shape[1]):
        kt = k[:, t]
        erase = eye - beta[:, t, None, None] * kt[:, :, None] * kt[:, None, :]  # I - beta k k^T
        write = beta[:, t, None, None] * v[:, t, :, None] * kt[:, None, :]  # beta v k^T
        S = torch.exp(log_alpha[:, t])[:, None, None] * (S @ erase) + write
        out.append((S @ q[:, t, :, None]).squeeze(-1))
    return torch.stack(out, dim=1), S


def delta_rule_step(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, log_alpha: torch.Tensor,
                    beta: torch.Tensor, S: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One token: q, k [..., m_k], v [..., m_v], log_alpha and beta [...], S [..., m_v, m_k] (one dtype)
    -> (o [..., m_v], S_t): S_t = alpha S + u k^T with u = beta (v - alpha S k), and o = S_t q, computed
    as alpha S q + u (k . q): S k and S q come from one product, so S is read once (decoding is
    bound by reading the state and the weights)."""
    alpha = torch.exp(log_alpha)[..., None]
    S_k, S_q = (S @ torch.stack([k, q], dim=-1)).unbind(-1)  # [..., m_v] each
    correction = beta[..., None] * (v - alpha * S_k)  # u [..., m_v]
    S = alpha[..., None] * S + correction[..., :, None] * k[..., None, :]
    return alpha * S_q + correction * (k * q).sum(-1, keepdim=True), S


def delta_rule_chunked(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, log_alpha: torch.Tensor,
                       beta: torch.Tensor, initial_state: torch.Tensor, chunk_len: int | None = None,
                       matmul_dtype: torch.dtype | None = None,
                       chain: str = "torch") -> tuple[torch.Tensor, torch.Tensor]:
    """Chunkwise-parallel form (see the module docstring) with a hand-derived backward (`_ChunkedDeltaRule`).

    log_alpha, beta and initial_state give the state's dtype; q, k, v may come in `matmul_dtype` (a half
    type: then no copy of theirs is made for the products, and the element-wise math widens them as it
    reads them). The decays and the triangular solve are computed in the state's dtype; every product
    (the chunk's K K^T, Q K^T, (I + A)^{-1} [e^g K | V], P [W | U_v], [W | U_v]^T K_end, the outputs'
    Q_s S^T, and their backward) multiplies in `matmul_dtype` (default: the state's dtype), each operand
    cast once, with results in the state's dtype (on CUDA straight from the fp32 accumulator), as are the
    state S and its recursion's sums: with bf16 inputs that is fp32 S, bf16 operands. Where the state
    map is applied in factors (m > 2L), its correction (S W^T) K_end and the backward's products with
    the states (dO^T Q_s, dO S, K_end dS'^T, ...) multiply in `matmul_dtype` too, as fla's chunked
    kernels multiply their fp32 state cast to the inputs' type: with fp32 operands these GEMMs took a
    fifth of a 7b layer's time on an H100 (docs/benchmarks.md). Everything else in the backward runs in
    the state's dtype.

    Returns o in the products' dtype (`matmul_dtype`, default the state's: with half inputs o is rounded once
    from its fp32 sum, as the caller wants it, and its gradient comes back in that dtype) and S_T in the
    state's dtype. Tensors that are only ever product operands ((I + A)^{-1}, P, [e^g K | V], K_end and, with
    the map factored, Q_s; in the backward U, [-dQ_s | dO] and d[W | U_v]) are written once, in the operands'
    dtype, by the element-wise op that makes them. `chain` names what runs the chunk-to-chunk pass: "torch"
    (`chain_states_torch`, the default) or "triton" (`chain_states_triton`, same contract; with it the state
    map is always applied in factors); either runs as one operator, `mm_rec::delta_chain`."""
    N, T, mk = k.shape
    mv = v.shape[-1]
    L = min(chunk_len or chunk_len_for(T, k.device.type), T)
    n = -(-T // L)
    pad = n * L - T
    if pad:  # identity tokens: alpha = 1, beta = 0, k = v = 0 leave S unchanged
        q, k, v = (F.pad(x, (0, 0, 0, pad)) for x in (q, k, v))
        log_alpha, beta = (F.pad(x, (0, pad)) for x in (log_alpha, beta))
    g = _cumsum_last(log_alpha.view(N, n, L))  # chunk-local: never a difference of long sums
    acc = g.dtype  # the state's
    o, S = _apply_chunked(q.view(N, n, L, mk), k.view(N, n, L, mk), v.view(N, n, L, mv), g, beta.view(N, n, L),
                          initial_state.to(acc), matmul_dtype or acc, chain)
    return o.reshape(N, n * L, mv)[:, :T], S


@torch.compiler.disable  # torch 2.11's inductor fails on some cumsum tilings ("Unexpected tiling") on CUDA
def _cumsum_last(x: torch.Tensor) -> torch.Tensor:
    return x.cumsum(-1)


def _apply_chunked(q, k, v, g, beta, S0, low, chain):
    if TRACE_UNDER_COMPILE and _factored(k.shape[2], k.shape[-1], chain):
        # every loop is inside the chain's operator: torch.compile traces the rest, forward and backward
        return _ChunkedDeltaRule.apply(q, k, v, g, beta, S0, low, chain)
    return _apply_chunked_eagerly(q, k, v, g, beta, S0, low, chain)


@torch.compiler.disable  # the formed map's loop in torch: compiling it unrolls n steps (minutes at 32K tokens)
def _apply_chunked_eagerly(q, k, v, g, beta, S0, low, chain):
    return _ChunkedDeltaRule.apply(q, k, v, g, beta, S0, low, chain)


# Under torch.compile the chunked form runs eagerly unless this is set (MMREC_TRACE_DELTA_RULE=1): then, where
# the state map is factored (the pass one operator, `mm_rec::delta_chain`), the compiler traces its forward
# and backward and fuses their element-wise work and casts (docs/benchmarks.md: being measured).
TRACE_UNDER_COMPILE = os.environ.get("MMREC_TRACE_DELTA_RULE", "0") == "1"


def _factored(chunk_len: int, key_dim: int, chain: str) -> bool:
    """Whether the state map is applied in factors (see `_ChunkedDeltaRule`): m_k > 2 L, or the Triton pass."""
    return 2 * chunk_len < key_dim or chain != "torch"


def _product(a: torch.Tensor, b: torch.Tensor, operands: torch.dtype,
             result: torch.dtype | None = None) -> torch.Tensor:
    """a @ b with both operands in `operands` (a half type multiplies on tensor cores, accumulating in
    fp32), the result in `result` (default: `operands`). With the operands' own dtype, a plain product.
    Half operands with an fp32 result on CUDA: the result straight from the fp32 accumulator (bmm's
    out_dtype), not rounded to the half type first; elsewhere (CPU autocast) rounded, then cast."""
    a, b = a.to(operands), b.to(operands)
    if (result == torch.float32 and operands != result and a.is_cuda and a.shape[:-2] == b.shape[:-2]
            and _bmm_out_dtype()):
        return torch.bmm(a.flatten(0, -3), b.flatten(0, -3), out_dtype=result).unflatten(0, a.shape[:-2])
    out = a @ b
    return out if result is None else out.to(result)


def _like(x: torch.Tensor, dtype: torch.dtype, last: int | None = None) -> torch.Tensor:
    """An empty contiguous tensor of x's shape (its last dimension `last` if given) in `dtype`: the
    destination of an element-wise op that writes its result in the dtype its consumers take."""
    return x.new_empty(*x.shape[:-1], x.shape[-1] if last is None else last, dtype=dtype)


def _concat_last(dtype: torch.dtype, *parts) -> torch.Tensor:
    """torch.cat([op(*args) for op, *args in parts], dim=-1) in `dtype`, written once: eagerly, each op (an
    element-wise op taking out=) writes its slice of the result in that dtype; under torch.compile (which
    refuses a strided out=) as a concatenation the compiler fuses into one kernel."""
    if torch.compiler.is_compiling():
        return torch.cat([op(*args).to(dtype) for op, *args in parts], dim=-1)
    shapes = [torch.broadcast_shapes(*(a.shape for a in args if isinstance(a, torch.Tensor))) for _, *args in parts]
    first = next(a for a in parts[0][1:] if isinstance(a, torch.Tensor))
    out = first.new_empty(*shapes[0][:-1], sum(shape[-1] for shape in shapes), dtype=dtype)
    start = 0
    for (op, *args), shape in zip(parts, shapes):
        op(*args, out=out[..., start:start + shape[-1]])
        start += shape[-1]
    return out


_BMM_OUT_DTYPE: bool | None = None


@torch.compiler.assume_constant_result  # traced (MMREC_TRACE_DELTA_RULE): probed eagerly, a constant to the graph
def _bmm_out_dtype() -> bool:
    """Whether this torch's CUDA bmm takes out_dtype (half operands, fp32 result); probed once."""
    global _BMM_OUT_DTYPE
    if _BMM_OUT_DTYPE is None:
        try:
            x = torch.ones(1, 16, 16, dtype=torch.bfloat16, device="cuda")
            _BMM_OUT_DTYPE = torch.bmm(x, x, out_dtype=torch.float32).dtype == torch.float32
        except (RuntimeError, TypeError):
            _BMM_OUT_DTYPE = False
    return _BMM_OUT_DTYPE


def _sub_product(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor, operands: torch.dtype) -> torch.Tensor:
    """acc - a @ b (acc fresh: updated in place) with the product's operands in `operands`; in acc's own
    dtype one fused baddbmm."""
    if operands == acc.dtype:
        return torch.baddbmm(acc, a.to(operands), b.to(operands), alpha=-1)
    return acc.sub_(_product(a, b, operands, acc.dtype))


def chain_states_torch(start: torch.Tensor, add: torch.Tensor, decay: torch.Tensor, left: torch.Tensor,
                       right: torch.Tensor, reverse: bool = False, entering_dtype: torch.dtype | None = None,
                       dot_with: torch.Tensor | None = None):
    """The chunk-to-chunk pass of the factored state map, from S = start:

        S <- decay_c S - (S left_c^T) right_c + add_c      for c = 0 .. n-1 (reverse: n-1 .. 0)

    start [N, mv, mk] in the state's dtype; add [N, n, mv, mk]; decay [N, n]; left, right [N, n, L, mk]
    in the products' operand dtype (S is cast to it for S left^T, that product's result is in it too).
    Returns (entering [N, n, mv, mk]: S before each chunk's update, in `entering_dtype` (default: the
    state's); the final S; when dot_with [N, n, mv, mk] is given, the Frobenius product of each
    entering matrix, unrounded, with it [N, n], else None). The Triton kernel (triton_kernels.py) has the
    same contract."""
    low = left.dtype

    def update(S: torch.Tensor, c: int) -> torch.Tensor:
        return _sub_product(torch.addcmul(add[:, c].to(S.dtype), S, decay[:, c, None, None]),
                            _product(S, left[:, c].transpose(-1, -2), low), right[:, c], low)

    return _run_chain(start, left.shape[1], update, reverse, entering_dtype, dot_with)


@torch.library.custom_op("mm_rec::delta_chain", mutates_args=())
def _chain_operator(start: torch.Tensor, add: torch.Tensor, decay: torch.Tensor, left: torch.Tensor,
                    right: torch.Tensor, reverse: bool, entering_dtype: torch.dtype, dot_with: torch.Tensor | None,
                    kernel: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The factored pass (`chain_states_torch`'s contract) as one operator, so that torch.compile sees neither
    its loop nor its kernel launch; `kernel` "torch" or "triton". Without dot_with the third output is empty."""
    if kernel == "triton":
        from mm_rec.ops.delta_rule.triton_kernels import chain_states_triton as run  # needs Triton
    else:
        run = chain_states_torch
    entering, final, dots = run(start, add, decay, left, right, reverse, entering_dtype, dot_with)
    return entering, final, dots if dots is not None else start.new_empty(0)


@_chain_operator.register_fake
def _(start, add, decay, left, right, reverse, entering_dtype, dot_with, kernel):
    N, n = decay.shape
    dots = start.new_empty(N, n) if dot_with is not None else start.new_empty(0)
    return start.new_empty(N, n, *start.shape[-2:], dtype=entering_dtype), torch.empty_like(start), dots


def _chain(kernel: str, start, add, decay, left, right, reverse=False, entering_dtype=None, dot_with=None):
    """`chain_states_torch`'s contract through the operator."""
    entering, final, dots = torch.ops.mm_rec.delta_chain(start, add, decay, left, right, reverse,
                                                         entering_dtype or start.dtype, dot_with, kernel)
    return entering, final, dots if dot_with is not None else None


def _chain_formed(start: torch.Tensor, add: torch.Tensor, M: torch.Tensor, reverse: bool = False):
    """The same pass with the map formed, S <- S M_c + add_c (M [N, n, mk, mk]): one product per chunk.
    Returns (entering [N, n, mv, mk], the final S)."""
    entering, S, _ = _run_chain(start, M.shape[1], lambda S, c: torch.baddbmm(add[:, c].to(S.dtype), S, M[:, c]),
                                reverse)
    return entering, S


def _run_chain(start, n, update, reverse=False, entering_dtype=None, dot_with=None):
    """S <- update(S, c) over c = 0 .. n-1 (reverse: n-1 .. 0) in the state's dtype, autocast or not;
    returns (the S entering each chunk, stacked [N, n, ...] in entering_dtype, the final S, and each
    entering S's Frobenius product with dot_with[:, c] [N, n] or None)."""
    S = start
    entering, dots = [None] * n, [None] * n
    with torch.autocast(start.device.type, enabled=False):
        for c in range(n - 1, -1, -1) if reverse else range(n):
            entering[c] = S.to(entering_dtype or S.dtype)
            if dot_with is not None:
                dots[c] = (S * dot_with[:, c].to(S.dtype)).sum((-2, -1))
            S = update(S, c)
    return torch.stack(entering, dim=1), S, torch.stack(dots, dim=1) if dot_with is not None else None


class _ChunkedDeltaRule(torch.autograd.Function):
    """The chunked delta rule on chunked inputs: q, k [N, n, L, mk], v [N, n, L, mv], g (chunk-local
    cumulative log decays) and beta [N, n, L], S_0 [N, mv, mk] -> o [N, n, L, mv], S_n [N, mv, mk].

    Per chunk, with D[t, i] = e^{g_t - g_i} (i <= t, else 0), A = diag(beta) (D o K K^T) strictly lower,
    [W | U_v] = (I + A)^{-1} diag(beta) [e^g K | V], P = D o Q K^T, Q_g = e^g Q, K_end = e^{g_L - g} K,
    the chunk's corrections U = U_v - W S^T give O = Q_g S^T + P U and S' = e^{g_L} S + U^T K_end.
    Substituting U, both are affine in the state entering the chunk:

        O = Q_s S^T + P U_v,   S' = S M + R,   with  Q_s = Q_g - P W,  M = e^{g_L} I - W^T K_end,
                                                      R = U_v^T K_end

    and Q_s, P U_v, R (and M) depend on the chunk alone: they are computed for all chunks at once, and
    the sequential pass is one multiply-add per chunk, in the state's dtype (the decay on M's diagonal
    is never rounded to a half type). M is a scaled identity minus a rank-L product, so where the key
    dimension is more than twice the chunk (the 7b preset: m = 512, L = 64) it is never formed: the
    pass applies S M = e^{g_L} S - (S W^T) K_end, 2 L mv mk multiply-adds per chunk instead of
    mv mk^2 (and as many for forming M, and again in the backward). Elsewhere the [mk, mk] matrix
    is cheaper in torch: one product per chunk (`_chain_formed`); the Triton pass (`chain` =
    "triton") is always factored, its products on tensor cores in the operands' dtype.
    The backward runs the same recursion in reverse (dS = dS' M^T + dO^T Q_s), then everything else
    for all chunks at once. The forward saves the per-chunk factors and the states entering each chunk
    ([N, n, mv, mk]), so that nothing is recomputed."""

    @staticmethod
    def forward(ctx, q, k, v, g, beta, S0, low, chain):
        # the backward runs under the forward's autocast state, as autograd's own backward ops would
        device = q.device.type
        ctx.autocast = (device, torch.get_autocast_dtype(device)) if torch.is_autocast_enabled(device) else None
        mk = k.shape[-1]
        L = k.shape[2]
        acc = g.dtype  # the state's; q, k, v may be in the products' dtype already (then never copied)
        causal = torch.ones(L, L, dtype=torch.bool, device=q.device).tril()
        decay = (g[..., :, None] - g[..., None, :]).masked_fill_(~causal, float("-inf")).exp_()  # D
        # the chunk's products take the matmul dtype's operands too (as fla's kernels multiply), with fp32
        # results; the triangular solve and the decays stay in the state's dtype. An operand that several
        # products take is cast once.
        k_low = k.to(low)
        kk = _product(k_low, k_low.transpose(-1, -2), low, acc)
        qk = _product(q, k_low.transpose(-1, -2), low, acc)
        # (I + A)^{-1}, formed once: the forward multiplies by it and the backward by its transpose
        # (a matmul each, cheaper than two triangular solves). solve_triangular(unitriangular=True)
        # reads only the strictly lower triangle, so the diagonal of beta D o K K^T can stay as it is.
        A = kk * decay * beta[..., :, None]
        eye = torch.eye(L, dtype=acc, device=q.device).expand_as(A)
        # (I + A)^{-1} and P are only ever product operands (here and in the backward): kept in that dtype
        inverse = torch.linalg.solve_triangular(A, eye, upper=False, unitriangular=True).to(low)
        attend = torch.mul(decay, qk, out=_like(qk, low))  # P
        exp_g = torch.exp(g)[..., None]
        # diag(beta) [e^g K | V] [N, n, L, mk + mv], written once, as the product takes it (with half inputs
        # the element-wise casts, concatenations and fp32 copies of these tensors were most of the chunked
        # form's memory traffic: docs/benchmarks.md)
        rhs = _concat_last(low, (torch.mul, k, beta[..., None] * exp_g), (torch.mul, v, beta[..., None]))
        solved = _product(inverse, rhs, low, acc)  # [W | U_v]
        solved_low = solved.to(low)
        to_end = torch.exp(g[..., -1:] - g)[..., None]
        chunk_decay = torch.exp(g[..., -1])  # [N, n]
        # S M as e^{g_L} S - (S W^T) K_end (see the class docstring); a kernel's pass is always factored
        ctx.factored = _factored(L, mk, chain)
        # the chunk-local parts of the recursion, all chunks at once (operands in the matmul dtype)
        through = _product(attend, solved_low, low, acc)  # [P W | P U_v]
        # Q_s [N, n, L, mk]: factored, only a product operand (kept in that dtype); formed, the backward's
        # dO^T Q_s multiplies it in the state's dtype
        by_state = torch.sub(exp_g * q, through[..., :mk], out=_like(q, low if ctx.factored else acc))
        k_end = torch.mul(k, to_end, out=_like(k, low))  # K_end, as the products take it
        rows = slice(mk, None) if ctx.factored else slice(None)  # R = U_v^T K_end, or [W^T K_end; R]
        transition = _product(solved_low[..., rows].transpose(-1, -2), k_end, low, acc)
        if ctx.factored:
            R, M = transition, None
        else:
            R, M = transition[..., mk:, :], transition[..., :mk, :].neg()
            M.diagonal(dim1=-2, dim2=-1).add_(chunk_decay[..., None])  # e^{g_L} I - W^T K_end [N, n, mk, mk]
        ctx.low, ctx.chain = low, chain
        # the state entering each chunk [N, n, mv, mk]; factored, kept only in the operands' dtype, in which
        # every product that takes it multiplies (half inputs: half the bytes written, saved and read)
        if M is None:  # S M + R = e^{g_L} S - (S W^T) K_end + R, chunk after chunk
            states, S, _ = _chain(chain, S0, R, chunk_decay, solved_low[..., :mk], k_end, entering_dtype=low)
        else:
            states, S = _chain_formed(S0, R, M)
        # o in the products' dtype, rounded once from its fp32 sum (the caller's dtype with half inputs)
        o = torch.add(_product(by_state, states.transpose(-1, -2), low, acc), through[..., mk:],
                      out=_like(through[..., mk:], low))
        ctx.save_for_backward(q, k, v, beta, decay, kk, qk, inverse, solved, attend, by_state, exp_g, to_end,
                              chunk_decay, states, *([] if M is None else [M]))
        return o, S

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, d_o, d_S):
        if ctx.autocast is None:
            return _ChunkedDeltaRule._backward(ctx, d_o, d_S)
        device, dtype = ctx.autocast
        with torch.autocast(device, dtype=dtype):
            return _ChunkedDeltaRule._backward(ctx, d_o, d_S)

    @staticmethod
    def _backward(ctx, d_o, d_S):
        (q, k, v, beta, decay, kk, qk, inverse, solved, attend, by_state, exp_g, to_end, chunk_decay, states,
         *M) = ctx.saved_tensors
        mk = k.shape[-1]
        acc, low = chunk_decay.dtype, ctx.low  # the state's dtype; the products' operands
        # dO comes in o's dtype (the products'), often a strided view (the caller's transposes, an expanded
        # sum): batched matmuls with it would fall back to a copy and a GEMM per matrix on the CPU
        d_o = d_o.contiguous()
        k_low, q_low, solved_low = k.to(low), q.to(low), solved.to(low)  # operands of several products: cast once
        M_t = M[0].transpose(-1, -2) if M else None
        # the state's recursion, backwards through the chunks: dS_c = dS_{c+1} M_c^T + dO_c^T Q_s,c;
        # factored (m > 2L, or the Triton pass), the states were saved in the operands' dtype and the
        # gradients after each chunk come back in it: every product below takes them so
        d_S = d_S.to(acc)
        if M_t is None:  # dS' M^T + dO^T Q_s = e^{g_L} dS' - (dS' K_end^T) W + dO^T Q_s, and tr dM = <S, dS'>
            d_o = d_o.to(low)
            from_o = _product(d_o.transpose(-1, -2), by_state, low)  # [N, n, mv, mk]
            k_end = torch.mul(k, to_end, out=_like(k, low))
            W = solved_low[..., :mk]
            d_next, d_S, d_chunk_decay = _chain(ctx.chain, d_S, from_o, chunk_decay, k_end, W,
                                                reverse=True, entering_dtype=low, dot_with=states)
            d_by_state = _product(d_o, states, low, acc)  # [N, n, L, mk]
            # with dM = S^T dS' (not formed): -K_end dM^T = -(K_end dS'^T) S, and
            # -W dM + U_v dS' = (U_v - W S^T) dS' (the chunk's corrections U times dS')
            k_d_next = _product(k_end, d_next.transpose(-1, -2), low, acc)  # [N, n, L, mv]
            # U, only a product's operand
            corrections = torch.sub(solved[..., mk:], _product(W, states.transpose(-1, -2), low, acc),
                                    out=_like(k_d_next, low))
            d_k_end = _product(corrections, d_next, low, acc)  # [N, n, L, mk]
        else:  # the state map formed: everything in the state's dtype
            d_o = d_o.to(acc)
            from_o = _product(d_o.transpose(-1, -2), by_state, acc)  # [N, n, mv, mk]
            d_next, d_S = _chain_formed(d_S, from_o, M_t, reverse=True)
            d_by_state = d_o @ states  # [N, n, L, mk]
            d_M = states.transpose(-1, -2) @ d_next  # [N, n, mk, mk]
            d_chunk_decay = d_M.diagonal(dim1=-2, dim2=-1).sum(-1)  # [N, n]
            d_transition = torch.cat([d_M.neg_(), d_next], dim=-2)  # [N, n, mk + mv, mk]
            d_solved = (to_end * k) @ d_transition.transpose(-1, -2)
            d_k_end = solved @ d_transition  # [N, n, L, mk]
        # [-dQ_s | dO] [N, n, L, mk + mv], as the products take it
        d_through = _concat_last(low, (torch.mul, d_by_state, -1), (torch.mul, d_o, 1))
        q_g = exp_g * q
        from_through = _product(attend.transpose(-1, -2), d_through, low, acc)  # P^T [-dQ_s | dO]
        dP = _product(d_through, solved_low.transpose(-1, -2), low, acc)  # [N, n, L, L]
        if M_t is None:  # d[W | U_v] = P^T [-dQ_s | dO] + [-(K_end dS'^T) S | K_end dS'^T], as dR's product takes it
            d_solved = _concat_last(low, (torch.sub, from_through[..., :mk], _product(k_d_next, states, low, acc)),
                                    (torch.add, from_through[..., mk:], k_d_next))
        else:
            d_solved = d_solved + from_through

        # through the triangular solve: [W | U_v] = (I + A)^{-1} R
        dR = _product(inverse.transpose(-1, -2), d_solved, low, acc)
        G = _product(dR, solved_low.transpose(-1, -2), low, acc).mul_(decay).tril_(-1)  # -dA o D, strictly lower
        Gk = G * kk
        d_kk = G.mul_(-beta[..., :, None])
        d_qk = dP.mul_(decay)
        d_qk_low = d_qk.to(low)  # two products' operand
        E = (d_qk * qk).sub_(beta[..., :, None] * Gk)  # dD o D: the gradient of D's exponents
        dR_k, dR_v = dR.split([mk, dR.shape[-1] - mk], dim=-1)
        s_k = (dR_k * k).sum(-1) * exp_g[..., 0]  # [N, n, L]
        d_beta = s_k + (dR_v * v).sum(-1) - Gk.sum(-1)
        d_k_end = d_k_end.mul_(to_end)  # the gradient reaching K, K_end = e^{g_L - g} K
        t_end = (d_k_end * k).sum(-1)
        d_g = beta * s_k + (d_by_state * q_g).sum(-1) - t_end + E.sum(-1) - E.sum(-2)
        d_g[..., -1] += t_end.sum(-1) + chunk_decay * d_chunk_decay
        d_k = (_product(d_kk + d_kk.transpose(-1, -2), k_low, low, acc)
               + _product(d_qk_low.transpose(-1, -2), q_low, low, acc)
               + (beta[..., None] * exp_g) * dR_k + d_k_end)
        d_q = _product(d_qk_low, k_low, low, acc) + exp_g * d_by_state
        d_v = beta[..., None] * dR_v
        return d_q, d_k, d_v, d_g, d_beta, d_S, None, None
