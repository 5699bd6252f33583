"""The optimisation pieces every training loop shares (`mmrec train` and the task trainer of
`mmrec eval --task ... --train`): AdamW with weight decay on matrices only, the warmup + cosine
schedule as a `torch.optim.lr_scheduler.LambdaLR`, and gradient clipping."""

from __future__ import annotations

import inspect
import math

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

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


def warmup_cosine(step: int, warmup_steps: int, decay_steps: int, min_ratio: float) -> float:
    """Learning-rate multiplier of optimizer step `step` (0-based): linear warmup from
    1 / warmup_steps to 1 over `warmup_steps`, then a cosine from 1 to `min_ratio` over the next
    `decay_steps - warmup_steps` steps, then `min_ratio`."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, decay_steps - warmup_steps))
    return min_ratio + 0.5 * (1.0 - min_ratio) * (1.0 + math.cos(math.pi * progress))


def build_scheduler(optimizer: torch.optim.Optimizer, config: TrainingConfig) -> LambdaLR:
    """The schedule of `config` (lr, min_lr, warmup_steps, decay_steps) over the optimizer's
    groups: step it once per optimizer step, applied or skipped, so that its position is the
    step count. The multiplier is a closure, which LambdaLR does not save: a resumed run takes
    the schedule's shape from its recipe, its position from the checkpoint."""
    min_ratio = config.min_lr / config.lr
    return LambdaLR(optimizer, lambda step: warmup_cosine(step, config.warmup_steps, config.decay_steps, min_ratio))


def load_scheduler_state(scheduler: LambdaLR, state: dict) -> None:
    """Restore `scheduler.state_dict()`, or the {"step_count": N} that checkpoints held before the
    schedule was a LambdaLR: converted to position N with the rates the optimizer state restored
    (load that first)."""
    if "step_count" in state:
        step = int(state["step_count"])
        state = {**scheduler.state_dict(), "last_epoch": step, "_step_count": step + 1,
                 "_last_lr": [group["lr"] for group in scheduler.optimizer.param_groups]}
    scheduler.load_state_dict(state)


def clip_gradients(model: nn.Module, max_norm: float) -> torch.Tensor:
    """Clip the global gradient norm of `model` to `max_norm` (0: no clipping) and return the norm
    before clipping (a tensor: reading it syncs with the device)."""
    params = [p for p in model.parameters() if p.grad is not None]
    return torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else math.inf)
