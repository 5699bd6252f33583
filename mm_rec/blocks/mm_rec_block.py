"""The MM-Rec block: x = x + Mixer(RMSNorm(x), state); x = x + FFN(RMSNorm(x)).

The mixer runs the seven steps of docs/architecture.md:
  1. one fused input projection -> z_t (recurrence input), a_t (decay modulation), gate logits,
     and the memory's q/k/v inputs (through a short causal convolution) and delta-rule gates;
  2. MDI decay: log gamma_t = clamp(logsigmoid(beta + a_t)) in fp32;
  3. core recurrence per head: h_t = z_t * sigmoid(h_{t-1} W_g + b_g) + gamma_t * h_{t-1};
  4. HDS build: the window (level 0), block slots (1), the delta-rule memory (2), the ring (3);
  5. multi-memory attention: one softmax over the window, the visible slots and a null slot;
  6. MDI integration: o_t = g_t * memory_t + (1 - g_t) * h_hat_t, then the output projection;
  7. the new layer state, built in one place (LayerState).

`step` runs the same seven steps for one token per row on a state in the decode layout
(mm_rec/core/hds.py), updating it in place in O(1) per token (docs/architecture.md, "Decoding one token").
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mm_rec.blocks.attention import MultiMemoryAttention
from mm_rec.blocks.layers import RMSNorm, ShortConvolution, SwiGLU
from mm_rec.config import MMRecConfig
from mm_rec.core.associative_scan import associative_scan_exponential, associative_scan_step
from mm_rec.core.hds import HDSHierarchy
from mm_rec.core.mdi import LearnableDecay, MemoryIntegration
from mm_rec.core.memory_state import LayerState
from mm_rec.core.recurrence import mmrec_recurrence, mmrec_recurrence_step
from mm_rec.ops import triton_available
from mm_rec.ops.delta_rule import CHUNK_LEN, delta_rule_flops
from mm_rec.ops.memory_step import MEMORY_STEP_BACKENDS


class MMRecMixer(nn.Module):
    """Steps 1-7 on a normalised input x [B, T, D] with the layer's carried `LayerState`."""

    def __init__(self, config: MMRecConfig):
        super().__init__()
        D, H, d = config.hidden_dim, config.num_heads, config.head_dim
        K, m = config.num_memories, config.mem_dim
        self.num_heads, self.head_dim, self.num_memories, self.mem_dim = H, d, K, m
        self.gate_input = config.gate_input
        self.memory_input = config.memory_input
        # One fused input projection: z, decay modulation, gate logits, then (when used) the
        # memory's q/k/v from the input and the delta rule's decay and write logits.
        self.split_sizes = {"z": D, "modulation": config.decay_modulation_dim, "gate": D}
        if config.memory_input in ("input", "both"):
            self.split_sizes["memory"] = 3 * K * m
        if config.level2 == "delta":
            self.split_sizes["delta_gates"] = 2 * K
        self.in_proj = nn.Linear(D, sum(self.split_sizes.values()), bias=False)
        self.decay = LearnableDecay(config)
        self.W_g = nn.Parameter(torch.empty(H, d, d))
        self.b_g = nn.Parameter(torch.zeros(H, d))
        self.state_norm = RMSNorm(D, config.norm_eps)
        self.memory_conv = None
        if config.conv_size:
            # "shift": the convolution starts as an induction head's inputs: queries and values see
            # the current token, keys the previous one, so a query matches the token that followed
            # an earlier occurrence of the current one from the first step (docs/design-notes.md)
            delays = [0] * K * m + [1] * K * m + [0] * K * m if config.conv_init == "shift" else None
            self.memory_conv = ShortConvolution(3 * K * m, config.conv_size, delays)
        self.hds = HDSHierarchy(config)
        self.attention = MultiMemoryAttention(config)
        self.integration = MemoryIntegration(config)
        self.out_proj = nn.Linear(D, D, bias=False)
        self.recurrence_backend = "auto"
        self.memory_step_backend = "auto"  # the decoding step's memory: mm_rec/ops/memory_step (MEMORY_STEP_BACKENDS)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The mixer's own parameters beyond its linear layers (which the model initialises):
        W_g ~ N(0, 1/d^2), so gate pre-activations start O(0.1-1) even though h accumulates
        ~1/(1-gamma) inputs, and dh_t/dh_{t-1} stays close to diag(gamma); b_g = 0 (gates at 1/2);
        then each memory module's own initialisation."""
        nn.init.normal_(self.W_g, 0.0, 1.0 / self.head_dim)
        nn.init.zeros_(self.b_g)
        for module in (self.decay, self.state_norm, self.memory_conv, self.hds, self.attention, self.integration):
            if module is not None:
                module.reset_parameters()

    def forward(self, x: torch.Tensor, state: LayerState, position: torch.Tensor) -> tuple[torch.Tensor, LayerState]:
        B, T, D = x.shape
        parts, z, log_gamma = self._project(x)  # z, log_gamma [B, T, H, d]
        if self.gate_input == "state":
            h, h_last = mmrec_recurrence(z, log_gamma, self.W_g, self.b_g, state.h, backend=self.recurrence_backend)
        else:  # ablation: sigma(z_t W_g + b_g) does not depend on h, so the recurrence is linear
            h, h_last = associative_scan_exponential(log_gamma, z * self._input_gate(z), state.h)
        h_hat = self.state_norm(h.reshape(B, T, D))
        q, k, v, conv_tail = self._memory_qkv(parts, h_hat, state.conv_tail)  # each [B, T, K, m]
        hierarchy = self.hds.build_hierarchy(q, k, v, state, position, parts.get("delta_gates"))
        read = self.attention(hierarchy)
        mixed = self.integration(read, hierarchy.level2, h_hat, parts["gate"])
        new_state = LayerState(h=h_last, conv_tail=conv_tail, **hierarchy.carried)
        return self.out_proj(mixed), new_state

    def step(self, x: torch.Tensor, state: LayerState, position: torch.Tensor,
             close_blocks: bool = True) -> torch.Tensor:
        """One token per row: x [B, D] at stream positions `position` [B] -> the mixer's output [B, D].
        `state` (decode layout, mm_rec/core/hds.py) is updated in place: the same seven steps as
        `forward` on T = 1, with the recurrence, the memory and the attention in their O(1) form.
        `close_blocks=False` leaves out the block-closing writes (`HDSHierarchy.step_close_block`), which
        change nothing unless a row's token closes its block: the caller may pass it only then."""
        B, D = x.shape
        parts, z, log_gamma = self._project(x[:, None])  # T = 1: the projections are the forward's
        z, log_gamma = z[:, 0], log_gamma[:, 0]  # [B, H, d]
        if self.gate_input == "state":
            h = mmrec_recurrence_step(z, log_gamma, self.W_g, self.b_g, state.h)
        else:
            h = associative_scan_step(log_gamma, z * self._input_gate(z), state.h)
        state.h.copy_(h)
        h_hat = self.state_norm(h.to(z.dtype).reshape(B, 1, D))
        q, k, v, conv_tail = self._memory_qkv(parts, h_hat, state.conv_tail)  # each [B, 1, K, m]
        if conv_tail is not None:
            state.conv_tail.copy_(conv_tail)
        delta_gates = parts.get("delta_gates")
        # The memory in the state's dtype (fp32), autocast or not: its matmuls read the ring, the window
        # and the delta memory once, with no low-precision copies, and the state is written as computed.
        with torch.autocast(x.device.type, enabled=False):
            gates = None if delta_gates is None else delta_gates[:, 0]
            if self._fused_memory_step(x):
                read, level2 = self._memory_step_triton(q[:, 0], k[:, 0], v[:, 0], state, position, gates)
            else:
                view = self.hds.step_token(q[:, 0], k[:, 0], v[:, 0], state, position, gates)
                read, level2 = self.attention.step(view), view.level2
            if close_blocks:  # after the read: a token never sees its own block
                self.hds.step_close_block(state, position)
        mixed = self.integration(read[:, None], level2[:, None], h_hat, parts["gate"])
        return self.out_proj(mixed[:, 0])

    def _fused_memory_step(self, x: torch.Tensor) -> bool:
        backend = self.memory_step_backend
        if backend not in MEMORY_STEP_BACKENDS:
            raise ValueError(f"memory_step_backend must be one of {MEMORY_STEP_BACKENDS}, got {backend!r}")
        return backend == "triton" or (backend == "auto" and x.is_cuda and triton_available())

    def _memory_step_triton(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, state: LayerState,
                            position: torch.Tensor, delta_gates: torch.Tensor | None):
        """Steps 4 and 5 for one token per row through the fused kernel (mm_rec/ops/memory_step): what
        `hds.step_token` then `attention.step` do, the state updated in place as they update it.
        q, k, v [B, K, m] -> (read, level2) [B, K, m]."""
        from mm_rec.ops.memory_step.triton_kernels import combine_partials  # registers the operator

        hds, attention = self.hds, self.attention
        acc = state.block_key_sum.dtype  # the state's dtype (the window's and ring's entries may be narrower)
        log_alpha = beta = None
        if hds.level2_kind == "delta":
            log_alpha, beta = hds._delta_gates(delta_gates, acc)
        else:  # the decayed mean: one element-wise step, left to torch
            level2 = hds._level2_step(q, k, v, state, None)
        age_slope, window_slope = attention._slopes(acc)
        delta_read, *partials = torch.ops.mm_rec.memory_step(
            q, k, v, log_alpha, beta, hds._pooling_weights(k), position, age_slope, window_slope,
            state.delta_memory, state.window_keys, state.window_values, state.slot_keys, state.slot_values,
            state.slot_importance, state.slot_ids, state.block_key_sum, state.block_value_sum,
            state.block_weight_sum, attention.scale, -1 if attention.age_cap is None else attention.age_cap,
            hds.chunk_size)
        if log_alpha is not None:
            level2 = delta_read.to(v.dtype)
        return combine_partials(*partials, attention.null_logit).to(q.dtype), level2

    def _project(self, x: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
        """Step 1 and 2 on x [B, T, D]: the fused projection's parts by name, z and log gamma [B, T, H, d]."""
        parts = dict(zip(self.split_sizes, self.in_proj(x).split(list(self.split_sizes.values()), dim=-1)))
        shape = (self.num_heads, self.head_dim)
        return parts, parts["z"].unflatten(-1, shape), self.decay(parts["modulation"]).unflatten(-1, shape)

    def _input_gate(self, z: torch.Tensor) -> torch.Tensor:
        """gate_input=input: sigma(z W_g + b_g) for z [..., H, d], in z's dtype."""
        gate = torch.sigmoid(torch.einsum("...hd,hde->...he", z.to(self.W_g.dtype), self.W_g) + self.b_g)
        return gate.to(z.dtype)

    def _memory_qkv(self, parts: dict[str, torch.Tensor], h_hat: torch.Tensor, conv_tail: torch.Tensor | None):
        """The memory's q, k, v [B, T, K, m] and the convolution's new tail: from the input, from
        RMSNorm(h) [B, T, D], or both; then the short convolution."""
        B, T = h_hat.shape[:2]
        memory_in = parts.get("memory")
        if self.memory_input in ("state", "both"):
            from_state = self.hds.qkv(h_hat)
            memory_in = from_state if memory_in is None else memory_in + from_state
        if self.memory_conv is not None:
            memory_in, conv_tail = self.memory_conv(memory_in, conv_tail)
            memory_in = F.silu(memory_in)
        else:
            conv_tail = None
        q, k, v = memory_in.view(B, T, 3, self.num_memories, self.mem_dim).unbind(2)
        return q, k, v, conv_tail


class MMRecBlock(nn.Module):
    """Pre-norm residual block: the MM-Rec mixer, then a SwiGLU FFN."""

    def __init__(self, config: MMRecConfig):
        super().__init__()
        self.mixer_norm = RMSNorm(config.hidden_dim, config.norm_eps)
        self.mixer = MMRecMixer(config)
        self.ffn_norm = RMSNorm(config.hidden_dim, config.norm_eps)
        self.ffn = SwiGLU(config.hidden_dim, config.ffn_dim)
        self.dropout = nn.Dropout(config.dropout)

    def reset_parameters(self) -> None:
        """The block's parameters beyond its linear layers and norms (the mixer's own)."""
        self.mixer.reset_parameters()

    def forward(self, x: torch.Tensor, state: LayerState, position: torch.Tensor) -> tuple[torch.Tensor, LayerState]:
        """x [B, T, D] at stream positions position[b] + t -> (x [B, T, D], the layer's new state)."""
        mixed, new_state = self.mixer(self.mixer_norm(x), state, position)
        x = x + self.dropout(mixed)
        x = x + self.dropout(self.ffn(self.ffn_norm(x)))
        return x, new_state

    def step(self, x: torch.Tensor, state: LayerState, position: torch.Tensor,
             close_blocks: bool = True) -> torch.Tensor:
        """One token per row: x [B, D] at stream positions `position` [B] -> x [B, D]; `state` (decode
        layout) updated in place (`close_blocks`: `MMRecMixer.step`)."""
        x = x + self.dropout(self.mixer.step(self.mixer_norm(x), state, position, close_blocks))
        return x + self.dropout(self.ffn(self.ffn_norm(x)))


def layer_flops_per_token(config: MMRecConfig) -> dict[str, int]:
    """Forward FLOPs of one MM-Rec block per token (2 per multiply-add), by part. None depends on
    the sequence length: the memory reads cost O((W + S) * m) per bank and the delta rule O(m^2)."""
    D, H, d, K, m = config.hidden_dim, config.num_heads, config.head_dim, config.num_memories, config.mem_dim
    in_cols = 2 * D + config.decay_modulation_dim
    in_cols += 3 * K * m if config.memory_input in ("input", "both") else 0
    in_cols += 2 * K if config.level2 == "delta" else 0
    projections = 2 * D * in_cols + 2 * D * D + 2 * K * m * D
    projections += 2 * D * 3 * K * m if config.memory_input in ("state", "both") else 0
    projections += 2 * config.decay_rank * D if config.decay_rank else 0
    cost = {"projections": projections, "FFN": 6 * D * config.ffn_dim, "recurrence": 2 * H * d * d,
            "short convolution": 2 * 3 * K * m * config.conv_size,
            "window read": 4 * config.window_size * m * K, "slot read": 4 * config.memory_size_M * m * K}
    if config.level2 == "delta":
        cost["delta rule"] = delta_rule_flops(1, CHUNK_LEN, K, m, m) // CHUNK_LEN  # at 4K-token segments
    else:
        cost["level-2 mean"] = 3 * K * m
    return cost
