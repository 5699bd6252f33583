"""HDS levels and the multi-memory attention against slow per-token references.

The reference recomputes, for every token of a whole stream, the block means of the S blocks
before its own from the full history, and the level-2 aggregate by a plain loop. The module
under test sees the stream in random segments with the state carried, so these tests also
check the ring bookkeeping (partial blocks, wrap-around, per-row positions).
"""

import math

import pytest
import torch

from mm_rec.blocks.attention import MultiMemoryAttention
from mm_rec.config import MMRecConfig
from mm_rec.core.hds import HDSHierarchy
from mm_rec.core.memory_state import MemoryBank


def make(C=4, S=3, K=2, m=5, D=12):
    cfg = MMRecConfig(hidden_dim=D, num_heads=2, num_memories=K, mem_dim=m, memory_size_M=S, chunk_size=C,
                      num_layers=1, ffn_dim=8)
    hds, attn = HDSHierarchy(cfg).double(), MultiMemoryAttention(cfg).double()
    with torch.no_grad():  # non-trivial slopes and null logits
        attn.log_age_slope.copy_(torch.randn(K))
        attn.null_logit.copy_(torch.randn(K))
    return cfg, hds, attn


def reference(cfg, hds, attn, h_hat, start_position):
    """Per-token float64 loop over one stream row: (slot reads [T, K, m], aggregates [T, K, m])."""
    C, S, K, m = cfg.chunk_size, cfg.memory_size_M, cfg.num_memories, cfg.mem_dim
    T = h_hat.shape[0]
    q, k, v = hds.qkv(h_hat).view(T, 3, K, m).unbind(1)
    lam = torch.sigmoid(hds.aggregate_logit)
    slopes = attn.log_age_slope.exp()
    reads, aggs = [], []
    G = torch.zeros(K, m, dtype=torch.float64)
    for t in range(T):
        G = lam[:, None] * G + (1 - lam[:, None]) * v[t]
        aggs.append(G)
        p = start_position + t
        j = p // C
        read = torch.zeros(K, m, dtype=torch.float64)
        for bank in range(K):
            logits, values = [attn.null_logit[bank]], [torch.zeros(m, dtype=torch.float64)]
            for blk in range(max(0, j - S), j):
                # tokens of block blk that belong to this stream (positions >= start_position)
                idx = [i - start_position for i in range(blk * C, (blk + 1) * C)]
                assert min(idx) >= 0, "reference streams start at a block boundary"
                key, val = k[idx, bank].mean(0), v[idx, bank].mean(0)
                age = j - blk
                logits.append(q[t, bank] @ key / math.sqrt(m) - slopes[bank] * (age - 1))
                values.append(val)
            w = torch.softmax(torch.stack(logits), 0)
            read[bank] = (w[:, None] * torch.stack(values)).sum(0)
        reads.append(read)
    return torch.stack(reads), torch.stack(aggs)


def run_segments(cfg, hds, attn, h_hat, cuts):
    """Feed h_hat [B, T, D] through build_hierarchy + attention in segments split at `cuts`."""
    B = h_hat.shape[0]
    bank = MemoryBank.zeros(B, 1, 1, cfg.num_memories, cfg.mem_dim, cfg.memory_size_M, dtype=torch.float64)
    position = torch.zeros(B, dtype=torch.long)
    reads, aggs = [], []
    bounds = [0, *cuts, h_hat.shape[1]]
    for a, b in zip(bounds[:-1], bounds[1:]):
        hier = hds.build_hierarchy(h_hat[:, a:b], bank, position)
        reads.append(attn(hier))
        aggs.append(hier.aggregate)
        bank, position = hier.new_bank, position + (b - a)
    return torch.cat(reads, 1), torch.cat(aggs, 1), bank


@pytest.mark.parametrize("cuts", [[], [1], [5, 6, 7], [3, 10, 22, 23], list(range(1, 30))])
def test_reads_match_reference_for_any_split(cuts):
    cfg, hds, attn = make()
    h_hat = torch.randn(2, 30, cfg.hidden_dim, dtype=torch.float64)
    reads, aggs, _ = run_segments(cfg, hds, attn, h_hat, cuts)
    for row in range(2):
        ref_reads, ref_aggs = reference(cfg, hds, attn, h_hat[row], 0)
        torch.testing.assert_close(reads[row], ref_reads, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(aggs[row], ref_aggs, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("T", [1, 7, 30])
def test_probabilities_are_aligned_and_padding_reads_nothing(T):
    # The [.., W] tensors feed bf16 matmuls: W must be a multiple of 8; columns past the null
    # slot (index N) are padding with probability 0, and each row sums to 1 with the null slot.
    cfg, hds, attn = make()
    bank = MemoryBank.zeros(2, 1, 1, cfg.num_memories, cfg.mem_dim, cfg.memory_size_M, dtype=torch.float64)
    hier = hds.build_hierarchy(torch.randn(2, T, cfg.hidden_dim, dtype=torch.float64), bank,
                               torch.tensor([0, 9]))
    probs, values = attn._probabilities(hier)
    N = hier.slot_block.shape[1]
    assert probs.shape[-1] % 8 == 0 and probs.shape[-1] > N and values.shape[2] == probs.shape[-1]
    assert (probs[..., N + 1:] == 0).all() and (values[:, :, N:] == 0).all()
    torch.testing.assert_close(probs.sum(-1), torch.ones_like(probs[..., 0]))
    public, _ = attn.slot_probabilities(hier)
    torch.testing.assert_close(public, probs[..., : N + 1])


def test_first_block_reads_zero_through_the_null_slot():
    cfg, hds, attn = make(C=8)
    reads, _, _ = run_segments(cfg, hds, attn, torch.randn(1, 8, cfg.hidden_dim, dtype=torch.float64), [])
    assert torch.isfinite(reads).all()
    assert reads.abs().max() == 0


def test_ring_holds_the_last_S_block_means_in_order():
    cfg, hds, attn = make(C=4, S=3)
    T = 4 * 7 + 2  # 7 completed blocks, 2 tokens of the open one
    h_hat = torch.randn(1, T, cfg.hidden_dim, dtype=torch.float64)
    _, _, bank = run_segments(cfg, hds, attn, h_hat, [3, 9, 17])
    K, m = cfg.num_memories, cfg.mem_dim
    _, k, v = hds.qkv(h_hat[0]).view(T, 3, K, m).unbind(1)
    for s, blk in enumerate([4, 5, 6]):
        torch.testing.assert_close(bank.slot_keys[0, :, s], k[blk * 4:(blk + 1) * 4].mean(0))
        torch.testing.assert_close(bank.slot_values[0, :, s], v[blk * 4:(blk + 1) * 4].mean(0))
    torch.testing.assert_close(bank.block_key_sum[0], k[28:30].sum(0))
    torch.testing.assert_close(bank.block_value_sum[0], v[28:30].sum(0))


def test_rows_at_different_positions_are_independent():
    """A row that starts mid-block (position not a multiple of C) reads what its own stream says."""
    cfg, hds, attn = make(C=4, S=2)
    h_long = torch.randn(1, 26, cfg.hidden_dim, dtype=torch.float64)
    # Row A: the whole stream. Row B: the same stream whose first 6 tokens came in an earlier call.
    full_reads, _, _ = run_segments(cfg, hds, attn, h_long, [])
    bank = MemoryBank.zeros(1, 1, 1, cfg.num_memories, cfg.mem_dim, cfg.memory_size_M, dtype=torch.float64)
    first = hds.build_hierarchy(h_long[:, :6], bank, torch.zeros(1, dtype=torch.long))
    fresh = MemoryBank.zeros(1, 1, 1, cfg.num_memories, cfg.mem_dim, cfg.memory_size_M, dtype=torch.float64)
    # Batch the continuation of the stream (position 6) with a fresh stream (position 0).
    batched = MemoryBank(*(torch.cat([getattr(first.new_bank, f), getattr(fresh, f)]) for f in
                           ("h", "aggregate", "block_key_sum", "block_value_sum", "slot_keys", "slot_values")))
    x = torch.cat([h_long[:, 6:], h_long[:, :20]])
    hier = hds.build_hierarchy(x, batched, torch.tensor([6, 0]))
    reads = attn(hier)
    torch.testing.assert_close(reads[0], full_reads[0, 6:])
    torch.testing.assert_close(reads[1], full_reads[0, :20])


def test_memory_size_zero_switches_the_long_term_memory_off():
    cfg, hds, attn = make(S=0)
    reads, aggs, bank = run_segments(cfg, hds, attn, torch.randn(1, 20, cfg.hidden_dim, dtype=torch.float64), [7])
    assert reads.abs().max() == 0 and bank.slot_keys.shape[2] == 0
    assert aggs.abs().max() > 0
