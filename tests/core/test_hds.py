"""HDS levels and the multi-memory attention against a slow per-token float64 reference.

The reference walks a stream one token at a time with explicit data structures: the last W
tokens for the window, per-sub-slot pooling sums, a ring of the R newest sub-slots by age and a
kept set from which, whenever it holds more than P slots, the one of lowest importance (then the
oldest) is evicted; the level-2 memory as the plain delta-rule (or decayed-mean) loop. The module
under test sees the stream in random segments with the state carried, so these tests also check
the timeline bookkeeping (partial blocks, wrap-around, the top-P selection, per-row positions).
"""

import math
from collections import deque

import pytest
import torch

from mm_rec.blocks.attention import MultiMemoryAttention
from mm_rec.config import MMRecConfig
from mm_rec.core.hds import POOLING_CAP, HDSHierarchy
from mm_rec.core.memory_state import LayerState

BASE = dict(hidden_dim=12, num_heads=2, num_memories=2, mem_dim=5, memory_size_M=3, chunk_size=4,
            num_layers=1, ffn_dim=8)
VARIANTS = {
    "default": dict(),  # window, delta rule, attention pooling, learned retention
    "sub-slots": dict(slots_per_block=2, memory_size_M=6, recent_slots=2, window_size=3),
    "age ring": dict(retention="age", level2="mean", slot_write="mean", window_size=0),
    "long window": dict(window_size=11, memory_size_M=4, recent_slots=1),
    "no long-term memory": dict(memory_size_M=0),
    "equal importances": dict(memory_size_M=5, recent_slots=2, init=True),  # as at init: ties decide
    "kept age capped": dict(memory_size_M=5, recent_slots=2, kept_age_bias="capped"),
    "undecayed delta banks": dict(undecayed_banks=2),
    "delta decays scaled": dict(delta_decay_scale=0.3),
}


def make(init=False, **overrides):
    cfg = MMRecConfig(**{**BASE, **overrides})
    hds, attn = HDSHierarchy(cfg).double(), MultiMemoryAttention(cfg).double()
    with torch.no_grad():  # non-trivial values for every parameter that starts at a constant
        for name, p in [*hds.named_parameters(), *attn.named_parameters()]:
            if not (init and name.startswith("importance")):
                p.copy_(torch.randn_like(p))
    return cfg, hds, attn


def memory_inputs(cfg, B, T):
    K, m = cfg.num_memories, cfg.mem_dim
    q, k, v = (torch.randn(B, T, K, m, dtype=torch.float64) for _ in range(3))
    return q, k, v, torch.randn(B, T, 2 * K, dtype=torch.float64)


@torch.no_grad()
def reference(cfg, hds, attn, q, k, v, gates):
    """One stream row from position 0: (attention reads [T, K, m], level-2 reads [T, K, m])."""
    C, S, r, P, W = cfg.chunk_size, cfg.memory_size_M, cfg.slots_per_block, cfg.kept_slots, cfg.window_size
    R, K, m, T = S - P, cfg.num_memories, cfg.mem_dim, q.shape[0]
    sub_len = C // r
    slopes, window_slopes = attn.log_age_slope.exp(), (attn.log_window_slope.exp() if W else None)
    reads, level2 = torch.zeros(T, K, m, dtype=torch.float64), torch.zeros(T, K, m, dtype=torch.float64)
    for bank in range(K):
        recent, kept = deque(), []  # entries (id, key, value, importance)
        sums = [[torch.zeros(m, dtype=torch.float64), torch.zeros(m, dtype=torch.float64), 0.0] for _ in range(r)]
        memory = torch.zeros(m, m, dtype=torch.float64)
        for t in range(T):
            qt, kt, vt = q[t, bank], k[t, bank], v[t, bank]
            # level 2
            if cfg.level2 == "delta":
                alpha = torch.sigmoid(gates[t, bank] + hds.delta_decay_bias[bank]).clamp(min=math.exp(-50))
                alpha = alpha ** cfg.delta_decay_scale
                if bank >= K - cfg.undecayed_banks:  # the undecayed banks: a pure delta rule
                    alpha = 1.0
                beta = torch.sigmoid(gates[t, K + bank] + hds.delta_write_bias[bank])
                kn, qn = kt / kt.norm().clamp_min(1e-12), qt / qt.norm().clamp_min(1e-12)
                memory = alpha * memory @ (torch.eye(m, dtype=torch.float64) - beta * torch.outer(kn, kn)) \
                    + beta * torch.outer(vt, kn)
                level2[t, bank] = memory @ qn
            else:
                lam = torch.sigmoid(hds.aggregate_logit[bank])
                memory[0] = lam * memory[0] + (1 - lam) * vt
                level2[t, bank] = memory[0]
            # attention: window, visible slots, null
            j = t // C
            logits, values = [attn.null_logit[bank]], [torch.zeros(m, dtype=torch.float64)]
            for s in range(max(0, t - W + 1), t + 1) if W else []:
                logits.append(qt @ k[s, bank] / math.sqrt(m) - window_slopes[bank] * (t - s))
                values.append(v[s, bank])
            for slot_id, key, value, importance in [*recent, *kept]:
                assert slot_id // r < j
                bias = importance if P else 0.0
                age = j - slot_id // r
                if P and cfg.kept_age_bias == "capped":  # kept slots: the age part's oldest age at most
                    age = min(age, R // r)
                logits.append(qt @ key / math.sqrt(m) - slopes[bank] * (age - 1) + bias)
                values.append(value)
            w = torch.softmax(torch.stack(logits), 0)
            reads[t, bank] = (w[:, None] * torch.stack(values)).sum(0)
            # write: pooled sums of the open sub-slot; a completed block enters the ring
            sub = (t % C) // sub_len
            weight = torch.exp(POOLING_CAP * torch.tanh(kt @ hds.write_query[bank] / math.sqrt(m) / POOLING_CAP)) \
                if cfg.slot_write == "attention" else 1.0
            sums[sub][0] = sums[sub][0] + weight * kt
            sums[sub][1] = sums[sub][1] + weight * vt
            sums[sub][2] = sums[sub][2] + weight
            if (t + 1) % C == 0 and S:
                for i in range(r):
                    key, value = sums[i][0] / sums[i][2], sums[i][1] / sums[i][2]
                    importance = 0.0 if not P else \
                        float(key @ hds.importance_query[bank] / math.sqrt(m) + hds.importance_bias[bank])
                    recent.append((j * r + i, key, value, importance))
                while len(recent) > R:
                    kept.append(recent.popleft())
                while len(kept) > P:  # evict the lowest importance, then the oldest
                    kept.remove(min(kept, key=lambda e: (float(e[3]), e[0])))
                sums = [[torch.zeros(m, dtype=torch.float64), torch.zeros(m, dtype=torch.float64), 0.0]
                        for _ in range(r)]
    return reads, level2


def run_segments(cfg, hds, attn, inputs, cuts, state=None, position=None):
    """Feed (q, k, v, gates) [B, T, ...] through build_hierarchy + attention in segments split at `cuts`."""
    q, k, v, gates = inputs
    B, T = q.shape[:2]
    state = state if state is not None else LayerState.zeros(cfg, B, dtype=torch.float64)
    position = position if position is not None else torch.zeros(B, dtype=torch.long)
    reads, level2 = [], []
    bounds = [0, *cuts, T]
    for a, b in zip(bounds[:-1], bounds[1:]):
        hier = hds.build_hierarchy(q[:, a:b], k[:, a:b], v[:, a:b], state, position, gates[:, a:b])
        reads.append(attn(hier))
        level2.append(hier.level2)
        state, position = LayerState(h=state.h, **hier.carried), position + (b - a)
    return torch.cat(reads, 1), torch.cat(level2, 1), state


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("cuts", [[], [1], [5, 6, 7], [3, 10, 22, 23, 40], list(range(1, 45))])
def test_reads_match_reference_for_any_split(variant, cuts):
    cfg, hds, attn = make(**VARIANTS[variant])
    inputs = memory_inputs(cfg, 2, 45)  # 11 blocks of 4: the ring wraps, slots are evicted
    reads, level2, _ = run_segments(cfg, hds, attn, inputs, cuts)
    for row in range(2):
        ref_reads, ref_level2 = reference(cfg, hds, attn, *(x[row] for x in inputs))
        torch.testing.assert_close(reads[row], ref_reads, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(level2[row], ref_level2, rtol=1e-10, atol=1e-12)


def test_kept_slots_outlive_the_age_ring():
    """With a high importance on one block, its slot survives long after S blocks have passed."""
    cfg, hds, attn = make(memory_size_M=3, recent_slots=1)
    with torch.no_grad():
        hds.importance_query.zero_()
        hds.importance_query[:, 0] = 1.0  # importance = key[0] / sqrt(m)
    q, k, v, gates = memory_inputs(cfg, 1, 4 * 20)
    k[:, :, :, 0] = -1.0
    k[:, 8:12, :, 0] = 10.0  # block 2 is the important one
    _, _, state = run_segments(cfg, hds, attn, (q, k, v, gates), [13, 50])
    ids = state.slot_ids[0]  # [K, P]
    assert (ids == 2).any(dim=1).all(), f"block 2 should be kept by every bank, got {ids.tolist()}"


@pytest.mark.parametrize("T", [1, 7, 30])
def test_probabilities_are_aligned_and_padding_reads_nothing(T):
    # The [.., Wp] tensors feed bf16 matmuls: Wp must be a multiple of 8; columns past the null
    # slot (index N) are padding with probability 0, and each row sums to 1 with the window.
    cfg, hds, attn = make()
    state = LayerState.zeros(cfg, 2, dtype=torch.float64)
    q, k, v, gates = memory_inputs(cfg, 2, T)
    hier = hds.build_hierarchy(q, k, v, state, torch.tensor([0, 9]), gates)
    probs, values, window_width = attn._probabilities(hier)  # [B, K, nb, L, E], [B, K, nb, E, m]
    N = hier.slot_block.shape[-1]
    slots, slot_values = probs[..., window_width:], values[..., window_width:, :]
    assert slots.shape[-1] % 8 == 0 and slots.shape[-1] > N and values.shape[3] == probs.shape[-1]
    assert (slots[..., N + 1:] == 0).all() and (slot_values[..., N:, :] == 0).all()
    torch.testing.assert_close(probs.sum(-1), torch.ones_like(probs[..., 0]))  # padded rows too
    public = attn.read_probabilities(hier)
    B, K, nb, L, _ = probs.shape
    torch.testing.assert_close(public["slots"], slots.reshape(B, K, nb * L, -1)[:, :, :T, :N])
    distance = public["window_distance"]
    assert (public["window"][..., (distance < 0) | (distance >= cfg.window_size)] == 0).all()


def test_first_block_without_window_reads_zero_through_the_null_slot():
    cfg, hds, attn = make(window_size=0, chunk_size=8)
    reads, _, _ = run_segments(cfg, hds, attn, memory_inputs(cfg, 1, 8), [])
    assert torch.isfinite(reads).all()
    assert reads.abs().max() == 0


def test_ring_holds_the_newest_block_means_in_order():
    cfg, hds, attn = make(retention="age", slot_write="mean", chunk_size=4, memory_size_M=3)
    T = 4 * 7 + 2  # 7 completed blocks, 2 tokens of the open one
    inputs = memory_inputs(cfg, 1, T)
    _, _, state = run_segments(cfg, hds, attn, inputs, [3, 9, 17])
    k, v = inputs[1][0], inputs[2][0]
    for s, blk in enumerate([4, 5, 6]):
        torch.testing.assert_close(state.slot_keys[0, :, s], k[blk * 4:(blk + 1) * 4].mean(0))
        torch.testing.assert_close(state.slot_values[0, :, s], v[blk * 4:(blk + 1) * 4].mean(0))
    torch.testing.assert_close(state.block_key_sum[0, :, 0], k[28:30].sum(0))
    torch.testing.assert_close(state.block_value_sum[0, :, 0], v[28:30].sum(0))


@pytest.mark.parametrize("variant", ["default", "sub-slots"])
def test_rows_at_different_positions_are_independent(variant):
    """A row that starts mid-block (position not a multiple of C) reads what its own stream says."""
    cfg, hds, attn = make(**VARIANTS[variant])
    inputs = memory_inputs(cfg, 1, 26)
    # Row A: the whole stream. Row B: the same stream whose first 6 tokens came in an earlier call.
    full_reads, full_level2, _ = run_segments(cfg, hds, attn, inputs, [])
    _, _, first = run_segments(cfg, hds, attn, tuple(x[:, :6] for x in inputs), [])
    fresh = LayerState.zeros(cfg, 1, dtype=torch.float64)
    batched = LayerState(**{f: torch.cat([t, fresh.tensors()[f]]) for f, t in first.tensors().items()})
    rows = tuple(torch.cat([x[:, 6:], x[:, :20]]) for x in inputs)
    reads, level2, _ = run_segments(cfg, hds, attn, rows, [], batched, torch.tensor([6, 0]))
    torch.testing.assert_close(reads[0], full_reads[0, 6:])
    torch.testing.assert_close(reads[1], full_reads[0, :20])
    torch.testing.assert_close(level2[0], full_level2[0, 6:])


def test_memory_size_zero_switches_the_long_term_memory_off():
    cfg, hds, attn = make(memory_size_M=0, window_size=0)
    reads, level2, state = run_segments(cfg, hds, attn, memory_inputs(cfg, 1, 20), [7])
    assert reads.abs().max() == 0 and state.slot_keys.shape[2] == 0
    assert level2.abs().max() > 0


def test_gradcheck_of_the_memory_read():
    cfg, hds, attn = make(memory_size_M=2, recent_slots=1, chunk_size=3, window_size=4)
    inputs = [x.requires_grad_() for x in memory_inputs(cfg, 1, 11)]
    state = LayerState.zeros(cfg, 1, dtype=torch.float64)

    def f(q, k, v, gates):
        hier = hds.build_hierarchy(q, k, v, state, torch.tensor([2]), gates)
        return attn(hier), hier.level2, hier.carried["delta_memory"], hier.carried["slot_keys"]

    assert torch.autograd.gradcheck(f, tuple(inputs))


@pytest.mark.parametrize("T, position, overrides", [
    (11, 0, {}), (11, 2, {}), (8, 9, {}), (3, 1, {}),
    (13, 4, dict(memory_size_M=3, kept_age_bias="capped")),  # a per-token slot bias
    (9, 3, dict(window_size=0)),
])
def test_gradcheck_of_the_read_through_the_attention_parameters(T, position, overrides):
    """The window's slope, the age slope and the null logit, whose gradients the logits node
    computes by hand: T off and on the window's blocks (W = 4), the stream's start inside the
    first block (position < W) or not, the capped age bias, no window."""
    cfg, hds, attn = make(**{**dict(memory_size_M=2, recent_slots=1, chunk_size=3, window_size=4), **overrides})
    q, k, v, gates = memory_inputs(cfg, 2, T)
    state = LayerState.zeros(cfg, 2, dtype=torch.float64)
    hier = hds.build_hierarchy(q, k, v, state, torch.tensor([position, position + 1]), gates)
    names = ["log_window_slope", "log_age_slope", "null_logit"][0 if cfg.window_size else 1:]
    params = tuple(getattr(attn, n).detach().clone().requires_grad_() for n in names)

    def f(*values):
        return torch.func.functional_call(attn, dict(zip(names, values)), (hier,))

    assert torch.autograd.gradcheck(f, params)


def test_undecayed_banks_keep_alpha_one_and_leave_the_others_alone():
    K = 3
    gates = torch.randn(2, 7, 2 * K, dtype=torch.float64)
    cfg = dict(num_memories=K, hidden_dim=12, num_heads=2)
    plain = HDSHierarchy(MMRecConfig(**{**BASE, **cfg})).double()
    undecayed = HDSHierarchy(MMRecConfig(**{**BASE, **cfg, "undecayed_banks": 2})).double()
    undecayed.load_state_dict(plain.state_dict())
    (log_alpha, beta), (log_alpha_u, beta_u) = plain._delta_gates(gates, torch.float64), \
        undecayed._delta_gates(gates, torch.float64)
    assert (log_alpha < 0).all()
    assert (log_alpha_u[..., 1:] == 0).all() and torch.equal(log_alpha_u[..., :1], log_alpha[..., :1])
    assert torch.equal(beta_u, beta)
