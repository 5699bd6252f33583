"""Small MM-Rec models for the invariance tests, shared by the CPU and GPU test files."""

import torch

from mm_rec import MMRecConfig, MMRecModel

# Parameters that start at constants (zeros, equal importances): tests give them random values so
# that every path (pooling weights, importance ranking, null slot, level weights) is exercised.
CONSTANT_AT_INIT = ("write_query", "importance", "null_logit", "level_logits")

# The GPU tests' model: two layers, two banks, the ring wrapping within a few hundred tokens.
GPU_SMALL = dict(vocab_size=97, hidden_dim=64, num_layers=2, num_heads=2, ffn_dim=96, num_memories=2,
                 mem_dim=32, memory_size_M=6, chunk_size=8, decay_rank=8)


def randomize_constant_parameters(model: MMRecModel, keep_importance: bool = False) -> MMRecModel:
    """Give the parameters of CONSTANT_AT_INIT random values (the importances kept with keep_importance)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if keep_importance and "importance" in name:
                continue
            if any(key in name for key in CONSTANT_AT_INIT):
                p.copy_(torch.randn_like(p))
    return model


def gpu_small_model(**overrides) -> MMRecModel:
    """The GPU tests' model (GPU_SMALL with overrides) on the CPU, seeded, constants randomised."""
    torch.manual_seed(0)
    return randomize_constant_parameters(MMRecModel(MMRecConfig(**{**GPU_SMALL, **overrides})))


# The decode tests' models (tests/test_decode.py, tests/ops/memory_step/). C = 4, S = 6: a 57-token
# stream completes 14 blocks, so the ring wraps and kept slots are evicted.
DECODE_BASE = dict(vocab_size=37, hidden_dim=16, num_layers=2, num_heads=2, ffn_dim=24, num_memories=2, mem_dim=6,
                   memory_size_M=6, chunk_size=4, decay_rank=3)
DECODE_VARIANTS = {  # every switch flipped at least once
    "default": dict(),  # window 8, delta rule, attention pooling, learned retention (R = 3, P = 3)
    "sub-slots": dict(slots_per_block=2, recent_slots=2),  # R < r * blocks, P = 4
    "sub-slots, short window": dict(slots_per_block=2, recent_slots=4, window_size=3),
    "age ring, mean level 2, mean pooling": dict(retention="age", level2="mean", slot_write="mean"),
    "no window": dict(window_size=0),
    "long window": dict(window_size=11, recent_slots=1),
    "state input, no conv": dict(memory_input="state", conv_size=0),
    "both inputs, conv 1": dict(memory_input="both", conv_size=1),
    "input gate": dict(gate_input="input"),
    "no long-term memory": dict(memory_size_M=0),
    "everything off": dict(memory_size_M=0, window_size=0, level2="mean", conv_size=0, gate_input="input"),
    "equal importances": dict(memory_size_M=5, recent_slots=2, keep_init=True),  # as at init: ties decide
    "kept ages capped": dict(memory_size_M=5, recent_slots=2, kept_age_bias="capped"),
    "an undecayed delta bank": dict(undecayed_banks=1),
    "delta decays scaled": dict(delta_decay_scale=0.25),
}


def decode_model(dtype=torch.float64, keep_init=False, **overrides) -> MMRecModel:
    """DECODE_BASE with overrides, in `dtype`, constants randomised (the importances kept with keep_init)."""
    return randomize_constant_parameters(MMRecModel(MMRecConfig(**{**DECODE_BASE, **overrides})).to(dtype), keep_init)
