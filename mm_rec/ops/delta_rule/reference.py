"""The gated delta rule, per bank (DeltaNet with a decay; Yang et al. 2024, "Gated Delta Networks"):

    S_t = alpha_t S_{t-1} (I - beta_t k_t k_t^T) + beta_t v_t k_t^T,      o_t = S_t q_t

with S_t a [m_v, m_k] matrix memory, alpha_t = exp(log_alpha_t) in (0, 1], beta_t in [0, 1] the
write strength. Written as S_t = alpha_t S_{t-1} + u_t k_t^T with the correction
u_t = beta_t (v_t - alpha_t S_{t-1} k_t), it stores v_t under k_t after erasing what S held there.

Two implementations of the same function, and its one-token step:

* `delta_rule_sequential`: the obviously correct float64 loop, the test oracle;
* `delta_rule_chunked`: the chunkwise-parallel form (the WY / UT representation) in plain PyTorch,
  differentiated by autograd. Within a chunk of L tokens, with g_t the chunk-local cumulative sum
  of log_alpha (so every factor exp(g_t - g_i), i <= t, has an exponent <= 0):

      (I + A) U = diag(beta) (V - diag(e^g) K S_0^T),   A[t, i] = beta_t e^{g_t - g_i} k_t.k_i  (i < t)
      O = diag(e^g) Q S_0^T + (M o Q K^T) U,            M[t, i] = e^{g_t - g_i}                (i <= t)
      S_L = e^{g_L} S_0 + U^T diag(e^{g_L - g}) K

  so each chunk costs a unit lower-triangular solve and a few [L, m] matmuls, and only the state
  S passes sequentially from chunk to chunk;
* `delta_rule_step`: one token in the correction form (decoding), O(m_v m_k).

Shapes: q, k [N, T, m_k]; v [N, T, m_v]; log_alpha, beta [N, T]; S_0 [N, m_v, m_k] (N = batch rows
times banks). Returns o [N, T, m_v] and S_T [N, m_v, m_k], in the inputs' (promoted) dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

CHUNK_LEN = 64  # tokens per chunk of delta_rule_chunked for sequences up to 4K


def chunk_len_for(seq_len: int) -> int:
    """Chunk length: 64 up to 4K tokens, then longer chunks, so that long sequences pass the state
    through fewer sequential steps (each a few small matmuls: launch-bound on a GPU)."""
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
    -> (o [..., m_v], S_t): S_t = alpha S + beta (v - alpha S k) k^T, o = S_t q."""
    alpha = torch.exp(log_alpha)[..., None]
    correction = beta[..., None] * (v - alpha * (S @ k[..., None])[..., 0])  # [..., m_v]
    S = alpha[..., None] * S + correction[..., :, None] * k[..., None, :]
    return (S @ q[..., None])[..., 0], S


def delta_rule_chunked(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, log_alpha: torch.Tensor,
                       beta: torch.Tensor, initial_state: torch.Tensor, chunk_len: int | None = None,
                       matmul_dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Chunkwise-parallel form (see the module docstring); autograd gives the backward.

    Everything within a chunk (decays, the triangular solve) is computed in the inputs' dtype; the
    sequential pass through the chunks multiplies in `matmul_dtype` (default: the same), while the
    state S itself stays in the inputs' dtype: with bf16 inputs that is fp32 S, bf16 operands."""
    N, T, mk = k.shape
    mv = v.shape[-1]
    L = min(chunk_len or chunk_len_for(T), T)
    n = -(-T // L)
    pad = n * L - T
    if pad:  # identity tokens: alpha = 1, beta = 0, k = v = 0 leave S unchanged
        q, k, v = (F.pad(x, (0, 0, 0, pad)) for x in (q, k, v))
        log_alpha, beta = (F.pad(x, (0, pad)) for x in (log_alpha, beta))
    q, k, v = q.view(N, n, L, mk), k.view(N, n, L, mk), v.view(N, n, L, mv)
    g = _cumsum_last(log_alpha.view(N, n, L))  # chunk-local: never a difference of long sums
    beta = beta.view(N, n, L)

    causal = torch.ones(L, L, dtype=torch.bool, device=q.device).tril()
    diff = g[..., :, None] - g[..., None, :]  # g_t - g_i
    decay = torch.exp(diff.masked_fill(~causal, float("-inf")))  # e^{g_t - g_i} for i <= t, else 0
    A = (beta[..., :, None] * decay * (k @ k.transpose(-1, -2))).tril(-1)
    eye = torch.eye(L, dtype=q.dtype, device=q.device)
    # [W | U_v] = (I + A)^{-1} diag(beta) [e^g K | V]: one unit lower-triangular solve per chunk,
    # straight onto both right-hand sides (no inverse formed); U = U_v - W S_0^T
    exp_g = torch.exp(g)[..., None]
    rhs = beta[..., None] * torch.cat([exp_g * k, v], dim=-1)  # [N, n, L, mk + mv]
    solved = torch.linalg.solve_triangular(eye + A, rhs, upper=False, unitriangular=True)
    attend = decay * (q @ k.transpose(-1, -2))  # [N, n, L, L] intra-chunk scores
    # the rows that multiply S_0^T: W's (the corrections) above q's (the outputs), one matmul per chunk
    by_state = torch.cat([solved[..., :mk], exp_g * q], dim=2)  # [N, n, 2L, mk]
    k_to_end = torch.exp(g[..., -1:] - g)[..., None] * k  # e^{g_L - g_i} k_i
    chunk_decay = torch.exp(g[..., -1])  # [N, n]

    low = matmul_dtype or q.dtype
    outputs, S = _through_chunks(solved[..., mk:].to(low), by_state.to(low), attend.to(low), k_to_end.to(low),
                                 chunk_decay, initial_state.to(q.dtype))
    o = outputs.reshape(N, n * L, mv)[:, :T]
    return o, S


@torch.compiler.disable  # torch 2.11's inductor fails on some cumsum tilings ("Unexpected tiling") on CUDA
def _cumsum_last(x: torch.Tensor) -> torch.Tensor:
    return x.cumsum(-1)


@torch.compiler.disable  # a loop of small matmuls: compiling it unrolls n steps (minutes at 32K tokens)
def _through_chunks(U_v, by_state, attend, k_to_end, chunk_decay, S):
    """The sequential part: pass the state S [N, mv, mk] through the n chunks; outputs [N, n, L, mv].
    by_state [N, n, 2L, mk] holds W (rows :L) and the decayed queries (rows L:), which both multiply
    S^T. The inputs are split into chunks once (unbind): indexing chunk c of each in the loop would
    make autograd fill a zero tensor of the whole input per chunk in the backward (O(n^2) traffic)."""
    outputs = []
    L = U_v.shape[2]
    chunks = zip(U_v.unbind(1), by_state.unbind(1), attend.unbind(1), k_to_end.unbind(1),
                 chunk_decay[..., None, None].unbind(1))
    for U_v_c, by_state_c, attend_c, k_c, decay_c in chunks:
        W_S, q_S = (by_state_c @ S.transpose(-1, -2).to(U_v.dtype)).split(L, dim=1)  # operands in the matmul dtype
        U = U_v_c - W_S  # [N, L, mv]: the corrections given S
        outputs.append(q_S + attend_c @ U)
        S = decay_c * S + (U.transpose(-1, -2) @ k_c).to(S.dtype)
    return torch.stack(outputs, dim=1).to(S.dtype), S
