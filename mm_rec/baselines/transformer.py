"""A Llama-style Transformer language model built from an `MMRecConfig`: the baseline.

    model = TransformerModel(MMRecConfig.from_preset("7b"))
    out = model(input_ids, labels=labels)     # out.logits [B, T, V], out.loss, out.state (None)

Pre-norm blocks x = x + Attention(RMSNorm(x)); x = x + SwiGLU(RMSNorm(x)), with rotary position
embeddings and causal attention through `F.scaled_dot_product_attention(is_causal=True)`
(FlashAttention on GPUs). It reads the sizes MM-Rec and the baseline share (hidden_dim,
num_layers, num_heads, ffn_dim, vocab_size, tie_embeddings, norm_eps, init_std) and ignores
the memory fields. The forward contract is MM-Rec's: labels are already shifted (labels[b, t]
is the target of position t, -100 ignored) and the loss is the mean fp32 cross entropy; there
is no recurrent state, so `state` must be None and `out.state` is None. Attribute names
(`embed`, `blocks`, `final_norm`, `lm_head`) match MMRecModel's, so `mm_rec.distributed`
parallelises both the same way. `save_pretrained` / `from_pretrained` use MM-Rec's folder layout
(config.json with `"model_type": "transformer"`, model.safetensors); `generate` samples like
MM-Rec's but re-reads the whole context for every new token (no KV cache: a baseline, not a
server).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from mm_rec.blocks.layers import RMSNorm, SwiGLU
from mm_rec.config import MMRecConfig
from mm_rec.constants import IGNORE_INDEX
from mm_rec.model import LanguageModel, check_lengths, check_sampling, sample_next_token

ROPE_THETA = 10000.0
MODEL_TYPE = "transformer"  # the config.json marker that tells loaders which class to build

TransformerConfig = MMRecConfig
"""The baseline's configuration is MM-Rec's: it reads the shared sizes and ignores the memory
fields, so one recipe `model:` section describes either model."""


@dataclass
class TransformerOutput:
    logits: torch.Tensor | None
    loss: torch.Tensor | None
    state: None = None


def rope_tables(seq_len: int, head_dim: int, device: torch.device,
                theta: float = ROPE_THETA) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [T, d/2] in fp32 of the angles t * theta^(-2i/d)."""
    inv_freq = theta ** (-torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim)
    angles = torch.outer(torch.arange(seq_len, device=device, dtype=torch.float32), inv_freq)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [B, T, H, d] by position: pairs (x_i, x_{i+d/2}) turn by angle[t, i]; fp32 inside."""
    x1, x2 = x.float().chunk(2, dim=-1)  # each [B, T, H, d/2]
    cos, sin = cos[:, None, :], sin[:, None, :]  # [T, 1, d/2]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention with RoPE; one fused q/k/v projection."""

    def __init__(self, config: MMRecConfig):
        super().__init__()
        self.num_heads, self.head_dim = config.num_heads, config.head_dim
        self.qkv = nn.Linear(config.hidden_dim, 3 * config.hidden_dim, bias=False)
        self.out_proj = nn.Linear(config.hidden_dim, config.hidden_dim, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        B, T, D = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.num_heads, self.head_dim).unbind(2)  # each [B, T, H, d]
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                           is_causal=True)  # [B, H, T, d]
        return self.out_proj(y.transpose(1, 2).reshape(B, T, D))


class TransformerBlock(nn.Module):
    """Pre-norm residual block: causal self-attention, then a SwiGLU FFN."""

    def __init__(self, config: MMRecConfig):
        super().__init__()
        self.attn_norm = RMSNorm(config.hidden_dim, config.norm_eps)
        self.attn = CausalSelfAttention(config)
        self.ffn_norm = RMSNorm(config.hidden_dim, config.norm_eps)
        self.ffn = SwiGLU(config.hidden_dim, config.ffn_dim)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x [B, T, D]; cos, sin [T, d/2] from `rope_tables` -> [B, T, D]."""
        x = x + self.dropout(self.attn(self.attn_norm(x), cos, sin))
        return x + self.dropout(self.ffn(self.ffn_norm(x)))


class TransformerModel(LanguageModel):
    model_type = MODEL_TYPE

    def __init__(self, config: MMRecConfig):
        super().__init__()
        if config.head_dim % 2:
            raise ValueError(f"rotary embeddings need an even head dim, got hidden_dim/num_heads = {config.head_dim}")
        self._build_stack(config, TransformerBlock)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """MM-Rec's scheme: N(0, init_std) for embeddings and projections, init_std / sqrt(2L)
        for the two projections that write into the residual stream, norms at one."""
        self._init_linear_embedding_norm(residual_writes=("attn.out_proj", "ffn.down"))

    def forward(self, input_ids: torch.Tensor, state: None = None, labels: torch.Tensor | None = None,
                return_logits: bool = True) -> TransformerOutput:
        """input_ids [B, T] -> logits [B, T, V] (None unless return_logits) and the loss over
        `labels` [B, T] (already shifted; -100 ignored)."""
        if state is not None:
            raise ValueError("TransformerModel keeps no recurrent state: pass state=None")
        self._check_token_inputs(input_ids, labels)
        x = self.embed(input_ids.long())
        cos, sin = rope_tables(input_ids.shape[1], self.config.head_dim, input_ids.device)
        for block in self.blocks:
            x = block(x, cos, sin)
        logits = self.lm_head(self.final_norm(x))
        loss = None
        if labels is not None:
            flat = logits.reshape(-1, logits.shape[-1])
            flat = flat.to(torch.promote_types(flat.dtype, torch.float32))  # loss in fp32 at least
            loss_sum = F.cross_entropy(flat, labels.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum")
            loss = loss_sum / (labels != IGNORE_INDEX).sum().clamp_min(1)  # 0, not NaN, when all are ignored
        return TransformerOutput(logits=logits if return_logits else None, loss=loss)

    # ------------------------------------------------------------------ generation
    @torch.inference_mode()
    def generate_stream(self, input_ids: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
                        top_k: int | None = None, top_p: float | None = None, state: None = None,
                        generator: torch.Generator | None = None, *,
                        lengths: Sequence[int] | torch.Tensor | None = None) -> Iterator[torch.Tensor]:
        """Yield the next token [B] for each of `max_new_tokens` steps (MMRecModel's signature;
        `state` must be None). input_ids [B, T] are left-aligned prompts of `lengths` (None: all T).
        Every step runs the whole sequence so far, one forward per group of rows of equal prompt
        length (so no padding is ever attended to)."""
        check_sampling(max_new_tokens, temperature, top_k, top_p)
        lengths = check_lengths(lengths, input_ids)
        groups = {n: torch.tensor([b for b, m in enumerate(lengths) if m == n], device=input_ids.device)
                  for n in sorted(set(lengths))}
        sequences = {n: input_ids[rows, :n].long() for n, rows in groups.items()}
        for _ in range(max_new_tokens):
            logits = None  # [B, V]
            for n, rows in groups.items():
                group_logits = self(sequences[n], state=state).logits[:, -1]
                if logits is None:
                    logits = group_logits.new_empty(input_ids.shape[0], group_logits.shape[-1])
                logits[rows] = group_logits
            token = sample_next_token(logits, temperature, top_k, top_p, generator)
            yield token
            for n, rows in groups.items():
                sequences[n] = torch.cat([sequences[n], token[rows, None]], dim=1)
