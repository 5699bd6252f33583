"""What the task scorers share: logits and argmax predictions at chosen positions, from a model
or from logits, in memory that does not grow with the sequence for a model with a state."""

from __future__ import annotations

import torch
from torch import nn


def _piece_len(model: nn.Module, piece_len: int | None) -> int | None:
    """Tokens per forward for a model with a state (None: a model without one runs whole rows)."""
    if not hasattr(model, "init_state"):
        return None
    return piece_len or model.config.max_segment_len


def logits_at(model: nn.Module, input_ids: torch.Tensor, positions: torch.Tensor,
              piece_len: int | None = None) -> torch.Tensor:
    """Logits [B, P, V] at `positions` [B, P] of input_ids [B, T], without gradients, on the
    model's device.

    A model with a state (MM-Rec) reads the rows in pieces of `piece_len` tokens (default: its
    config.max_segment_len) with the state carried, keeping only the logits at `positions`, so
    no [B, T, V] tensor is made; a model without one (the Transformer) reads them in one forward.
    Either way nothing after the last position is read (it cannot change those logits).
    """
    device = next(model.parameters()).device
    positions = positions.to(device)
    end = int(positions.max()) + 1
    ids = input_ids[:, :end].to(device)
    rows = torch.arange(ids.shape[0], device=device)[:, None]
    step = _piece_len(model, piece_len) or end
    kept, state = None, None
    with torch.inference_mode():
        for start in range(0, end, step):
            out = model(ids[:, start:start + step], state=state)
            state = out.state
            inside = (positions >= start) & (positions < start + step)  # [B, P]
            local = (positions - start).clamp(0, out.logits.shape[1] - 1)
            piece = out.logits[rows, local]  # [B, P, V]
            kept = piece if kept is None else torch.where(inside[..., None], piece, kept)
    return kept


def carried_state(model: nn.Module, input_ids: torch.Tensor, piece_len: int | None = None):
    """The state of a model with one after reading input_ids [B, T] (on the model's device), in
    pieces of `piece_len` (default config.max_segment_len) so that no [B, T, V] logits are kept."""
    device = next(model.parameters()).device
    step = _piece_len(model, piece_len)
    if step is None:
        raise ValueError(f"{type(model).__name__} keeps no state")
    state = None
    with torch.inference_mode():
        for start in range(0, input_ids.shape[1], step):
            state = model(input_ids[:, start:start + step].to(device), state=state, return_logits=False).state
    return state


def predict_tokens(model_or_logits: nn.Module | torch.Tensor, input_ids: torch.Tensor, positions: torch.Tensor,
                   batch_size: int = 8, piece_len: int | None = None) -> torch.Tensor:
    """Argmax predictions [B, P] (CPU) at `positions` [B, P] of every row of input_ids [B, T].

    `model_or_logits` is either logits [B, T, V] for input_ids, or a model with the MM-Rec forward
    contract (`model(input_ids, state=...).logits`), run `batch_size` rows at a time through
    `logits_at` (pieces of `piece_len` tokens with the state carried, for a model with a state).
    """
    if isinstance(model_or_logits, torch.Tensor):
        if model_or_logits.shape[:2] != input_ids.shape:
            raise ValueError(f"logits {tuple(model_or_logits.shape)} do not match input_ids {tuple(input_ids.shape)}")
        rows = torch.arange(input_ids.shape[0], device=model_or_logits.device)[:, None]
        return model_or_logits[rows, positions.to(model_or_logits.device)].argmax(dim=-1).cpu()
    return torch.cat([logits_at(model_or_logits, ids, pos, piece_len).argmax(dim=-1).cpu()
                      for ids, pos in zip(input_ids.split(batch_size), positions.split(batch_size))])
