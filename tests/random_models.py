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
