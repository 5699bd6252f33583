"""What the task scorers share: argmax predictions at chosen positions, from a model or from logits."""

from __future__ import annotations

import torch
from torch import nn


def predict_tokens(model_or_logits: nn.Module | torch.Tensor, input_ids: torch.Tensor, positions: torch.Tensor,
                   batch_size: int = 8) -> torch.Tensor:
    """Argmax predictions [B, P] (CPU) at `positions` [B, P] of every row of input_ids [B, T].

    `model_or_logits` is either logits [B, T, V] for input_ids, or a model with the MM-Rec forward
    contract (`model(input_ids).logits`), run without gradients `batch_size` rows at a time on the
    model's device.
    """
    if isinstance(model_or_logits, torch.Tensor):
        if model_or_logits.shape[:2] != input_ids.shape:
            raise ValueError(f"logits {tuple(model_or_logits.shape)} do not match input_ids {tuple(input_ids.shape)}")
        rows = torch.arange(input_ids.shape[0], device=model_or_logits.device)[:, None]
        return model_or_logits[rows, positions.to(model_or_logits.device)].argmax(dim=-1).cpu()
    device = next(model_or_logits.parameters()).device
    predicted = []
    with torch.inference_mode():
        for ids, pos in zip(input_ids.split(batch_size), positions.split(batch_size)):
            logits = model_or_logits(ids.to(device)).logits
            rows = torch.arange(ids.shape[0], device=device)[:, None]
            predicted.append(logits[rows, pos.to(device)].argmax(dim=-1).cpu())
    return torch.cat(predicted)
