"""A small training loop on synthetic task batches (MQAR, passkey): `mmrec eval --task ... --train`.

The optimisation is `mmrec train`'s (mm_rec.training.optim): AdamW with weight decay on matrices
only, the same warmup + cosine schedule (here down to 10% of the peak rate), the same gradient
clipping, and the same autocast (bf16 on CUDA, fp32 on CPU). What it leaves out is the data
pipeline, checkpoint history (one training state, rewritten at every evaluation, is what a stopped run
resumes from: training_state.py) and the non-finite guard, which needs a host sync every step. The loop
knows nothing of the task: `next_batch()` returns (input_ids, labels) with labels already
shifted, and `evaluate(model)` returns an accuracy, called every `eval_every` steps and after the
last one; the result is that curve.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mm_rec.config import dataclass_from_dict
from mm_rec.evaluation.training_state import load_training_state, save_training_state
from mm_rec.training.config import TrainingConfig
from mm_rec.training.optim import build_optimizer, build_scheduler, clip_gradients
from mm_rec.utils.device import autocast_for

MIN_LR_FRACTION = 0.1  # the schedule ends at 10% of the peak rate


@dataclass(frozen=True)
class TaskTrainConfig:
    steps: int = 1000
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 0.1
    warmup_steps: int = 100
    grad_clip: float = 1.0
    eval_every: int = 100
    time_budget_s: float | None = None  # stop early (then evaluate) once training took this long

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "eval_every"):
            if not (isinstance(getattr(self, name), int) and getattr(self, name) > 0):
                raise ValueError(f"TaskTrainConfig.{name}={getattr(self, name)!r}: must be a positive integer")
        if not (isinstance(self.warmup_steps, int) and self.warmup_steps >= 0):
            raise ValueError(f"TaskTrainConfig.warmup_steps={self.warmup_steps!r}: must be a non-negative integer")
        if not self.lr > 0:
            raise ValueError(f"TaskTrainConfig.lr={self.lr!r}: must be > 0")

    @classmethod
    def from_dict(cls, values: dict) -> TaskTrainConfig:
        return dataclass_from_dict(cls, values, "train")

    def training_config(self) -> TrainingConfig:
        """The optimisation settings in the main trainer's terms: its optimizer, schedule and
        clipping read them from there."""
        return TrainingConfig(max_steps=self.steps, batch_size=self.batch_size, lr=self.lr,
                              min_lr=MIN_LR_FRACTION * self.lr, warmup_steps=self.warmup_steps,
                              weight_decay=self.weight_decay, grad_clip=self.grad_clip)


@dataclass
class CurvePoint:
    step: int
    loss: float  # mean training loss since the previous point
    accuracy: float
    seconds: float  # wall time since the start of training, evaluations included


@dataclass(frozen=True)
class BatchStream:
    """The data of `train_on_task`: the next (input_ids, labels) batch, and the state of the generator behind
    it, to save and restore (a resumed run draws the batches the stopped one would have drawn)."""

    next_batch: Callable[[], tuple[torch.Tensor, torch.Tensor]]
    get_state: Callable[[], Any] | None = None  # None: the run cannot resume
    set_state: Callable[[Any], None] | None = None


def train_on_task(model: nn.Module, data: BatchStream | Callable[[], tuple[torch.Tensor, torch.Tensor]],
                  evaluate: Callable[[nn.Module], float],
                  config: TaskTrainConfig, log: Callable[[str], None] | None = print,
                  state_path: Path | None = None, resume: bool = False) -> list[CurvePoint]:
    """Train `model` in place on its device on the batches of `data` (a BatchStream, or a function returning
    the next batch); return the accuracy curve.

    `state_path`: the training state (mm_rec/evaluation/training_state.py: weights, optimizer, schedule,
    generators, the curve) is written there at every evaluation point. With `resume` training continues
    from it, as the uninterrupted run would have (the time budget counted afresh, `seconds` continuing);
    the settings must be the same but for the time budget."""
    device = next(model.parameters()).device
    optimisation = config.training_config()
    optimizer = build_optimizer(model, optimisation, device)
    scheduler = build_scheduler(optimizer, optimisation)
    settings = {k: v for k, v in asdict(config).items() if k != "time_budget_s"}
    data = data if isinstance(data, BatchStream) else BatchStream(data)
    if (state_path is not None or resume) and data.get_state is None:
        raise ValueError("saving or resuming a task run needs its batch generator's state (a BatchStream)")

    def record(step: int, mean_loss: float) -> CurvePoint:
        model.eval()
        with autocast_for("auto", device):
            accuracy = evaluate(model)
        model.train()
        point = CurvePoint(step, mean_loss, accuracy, time.perf_counter() - start)
        if log is not None:
            log(f"step {point.step:6d}  loss {point.loss:.4f}  accuracy {point.accuracy:.4f}  {point.seconds:7.1f} s")
        return point

    curve: list[CurvePoint] = []
    first, offset = 1, 0.0
    if resume:
        saved = load_training_state(state_path, model, optimizer, scheduler, settings)
        if saved["step"] >= config.steps:
            raise ValueError(f"nothing to resume: the run in {state_path} ended after its {config.steps} steps")
        data.set_state(saved["data"])
        curve = [CurvePoint(**point) for point in saved["curve"]]
        first, offset = saved["step"] + 1, curve[-1].seconds
        if log is not None:
            log(f"resumed from {state_path} after step {saved['step']} ({offset:.1f} s)")
    start = time.perf_counter() - offset
    loss_sum, loss_count = torch.zeros((), device=device), 0  # summed on the device: no sync per step
    model.train()
    for step in range(first, config.steps + 1):
        input_ids, labels = data.next_batch()
        with autocast_for("auto", device):
            loss = model(input_ids.to(device), labels=labels.to(device), return_logits=False).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        clip_gradients(model, config.grad_clip)
        optimizer.step()
        scheduler.step()
        loss_sum, loss_count = loss_sum + loss.detach().float(), loss_count + 1
        out_of_time = (config.time_budget_s is not None
                       and time.perf_counter() - start - offset > config.time_budget_s)
        if step % config.eval_every == 0 or step == config.steps or out_of_time:
            curve.append(record(step, (loss_sum / loss_count).item()))
            loss_sum, loss_count = torch.zeros((), device=device), 0
            if state_path is not None:
                progress = dict(step=step, curve=[asdict(p) for p in curve], data=data.get_state())
                save_training_state(state_path, model, optimizer, scheduler, settings, progress)
        if out_of_time:
            if log is not None:
                log(f"time budget of {config.time_budget_s} s reached after {step} of {config.steps} steps")
            break
    return curve
