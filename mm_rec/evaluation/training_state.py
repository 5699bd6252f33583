"""The state of a task training run on disk, so that a run stopped by its time budget (or interrupted) can go
on where it stopped: `mmrec eval --task ... --train --out DIR --resume`.

One file, `training_state.pt`, rewritten after every evaluation point (written aside, then renamed: a reader
sees the previous state or the new one, whole): the weights, the optimizer, the schedule, the process's random
generators (dropout; as `mmrec train` saves them), the caller's own generators and progress, and the settings
the run was started with.
A resumed run must have the same settings but those a caller lets change (its time budget): what it then
computes is what the uninterrupted run would have computed (tested bit for bit on the CPU).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from mm_rec.training.trainer import rng_state, set_rng_state  # mmrec train's: every generator of the process
from mm_rec.utils.atomic import replace_file

STATE_FILE = "training_state.pt"


def save_training_state(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any,
                        settings: dict, progress: dict) -> None:
    """Write the run's state to `path`: `settings` (what a resumed run must match) and `progress` (the
    caller's: steps, curve, its generators' states, ...) beside the weights, optimizer, schedule and the
    global random generators."""
    state = dict(format=1, settings=settings, progress=progress, model=model.state_dict(),
                 optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict(), rng=rng_state())
    replace_file(path, lambda staging: torch.save(state, staging))


def load_training_state(path: Path | None, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any,
                        settings: dict) -> dict:
    """Restore the weights, optimizer, schedule and global generators from `path` and return the saved
    progress. ValueError (one line) when there is no state there or its settings differ from `settings`."""
    if path is None or not Path(path).exists():
        raise ValueError(f"nothing to resume: no training state at {path} (a run with --out writes it as it "
                         "trains)")
    state = torch.load(path, map_location="cpu", weights_only=False)
    saved = state["settings"]
    differ = sorted(name for name in set(settings) | set(saved) if saved.get(name) != settings.get(name))
    if differ:
        raise ValueError(f"cannot resume {path}: its settings differ in {', '.join(differ)}")
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    set_rng_state(state["rng"])
    return state["progress"]
