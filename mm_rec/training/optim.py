"""AdamW with decoupled weight decay on matrices only, and the warmup + cosine schedule."""

from __future__ import annotations

import inspect
import math

import torch
from torch import nn

from mm_rec.training.config import TrainingConfig


def build_optimizer(model: nn.Module, config: TrainingConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW; weight decay on parameters with 2+ dimensions (matrices, embeddings, W_g), none on
    norms, biases and per-channel scalars. Fused where this PyTorch supports it on `device`."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [dict(params=[p for p in params if p.dim() >= 2], weight_decay=config.weight_decay),
              dict(params=[p for p in params if p.dim() < 2], weight_decay=0.0)]
    kwargs = dict(lr=config.lr, betas=(config.beta1, config.beta2))
    if "fused" in inspect.signature(torch.optim.AdamW).parameters and device.type in ("cuda", "cpu"):
        try:
            return torch.optim.AdamW(groups, fused=True, **kwargs)
        except (RuntimeError, ValueError):  # fused unsupported for this device or dtype
            pass
    return torch.optim.AdamW(groups, **kwargs)


class WarmupCosine:
    """Sets the learning rate of every parameter group from the step count alone:
    linear warmup to `lr` over `warmup_steps`, then a cosine from `lr` to `min_lr` over the next
    `decay_steps - warmup_steps` steps, then `min_lr`. Its state is the step count."""

    def __init__(self, optimizer: torch.optim.Optimizer, config: TrainingConfig):
        self.optimizer = optimizer
        self.lr, self.min_lr = config.lr, config.min_lr
        self.warmup_steps, self.decay_steps = config.warmup_steps, config.decay_steps
        self.step_count = 0
        self._apply()

    def lr_at(self, step: int) -> float:
        """Learning rate of optimizer step `step` (0-based)."""
        if step < self.warmup_steps:
            return self.lr * (step + 1) / self.warmup_steps
        progress = min(1.0, (step - self.warmup_steps) / max(1, self.decay_steps - self.warmup_steps))
        return self.min_lr + 0.5 * (self.lr - self.min_lr) * (1.0 + math.cos(math.pi * progress))

    def current_lr(self) -> float:
        return self.lr_at(self.step_count)

    def step(self) -> None:
        self.step_count += 1
        self._apply()

    def _apply(self) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = self.current_lr()

    def state_dict(self) -> dict:
        return {"step_count": self.step_count}

    def load_state_dict(self, state: dict) -> None:
        self.step_count = int(state["step_count"])
        self._apply()
