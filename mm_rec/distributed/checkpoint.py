"""Distributed checkpoints (`torch.distributed.checkpoint`, DCP) that resume on any number of
processes.

Each process writes only its own shards; the checkpoint's metadata records the global shape of
every tensor, so a run saved by 4 FSDP processes loads into 2, into 8, into a DDP run or into a
single process without a process group (DCP reshards on load). Model and optimizer state go
through `torch.distributed.checkpoint.state_dict`, which names them by the plain model's
parameter names (no FSDP, DDP, checkpoint-wrapper or compile prefixes), so the wrapping may
differ between save and load too.

Layout of a checkpoint directory:
    .metadata, __*_*.distcp   DCP's files: {"model": ..., "optimizer": ...}
    extra.pt                  `extra`, written by rank 0 with torch.save (step, data position, ...)

Saves are atomic: everything is written to `<dir>.partial`, fsync'ed and renamed into place once
all processes have finished (`mm_rec.utils.atomic`), so an interrupted save never leaves a
truncated `<dir>`.

`save_sharded_state` / `load_sharded_state` are the DCP part alone, without `extra` and without
the atomic commit: the trainer writes them into its own checkpoint folder
(`training.checkpoint_format: sharded`), which it commits atomically itself.
"""

from __future__ import annotations

import contextlib
import shutil
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from mm_rec.distributed.runtime import barrier, is_main_process
from mm_rec.utils.atomic import commit_directory

EXTRA_NAME = "extra.pt"
METADATA_NAME = ".metadata"


def save_sharded_state(directory: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> None:
    """Write model (and optimizer) state into `directory` with DCP, every process its own shards.
    Collective; not atomic by itself (write into a staging folder that is committed afterwards)."""
    with _one_process_on_purpose():
        dcp.save(_state(model, optimizer), checkpoint_id=str(directory))


def load_sharded_state(directory: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> None:
    """Load what `save_sharded_state` wrote into `model` (and `optimizer`), whatever the number of
    processes and the wrapping of either run; the optimizer state may be left out even where it
    was saved. Collective under a process group. Build the optimizer over the wrapped model's
    parameters before calling (for FSDP: after `apply_parallelism`). A checkpoint whose tensors do
    not fit raises ValueError."""
    directory = Path(directory)
    if not (directory / METADATA_NAME).is_file():
        raise FileNotFoundError(f"{directory} is not a complete distributed checkpoint (no {METADATA_NAME}); "
                                "an interrupted save leaves only a '.partial' directory")
    state = _state(model, optimizer)
    try:
        with _one_process_on_purpose():
            dcp.load(state, checkpoint_id=str(directory))  # in place, into the tensors of `state`
    except CheckpointException as err:  # a BaseException holding every rank's error and traceback
        rank, (first, _) = next(iter(err.failures.items()))
        raise ValueError(f"{directory} does not fit the model (rank {rank}): {first}") from None
    set_model_state_dict(model, state["model"])
    if optimizer is not None:
        set_optimizer_state_dict(model, optimizer, state["optimizer"])


def save_distributed_checkpoint(directory: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer | None = None,
                                extra: dict[str, Any] | None = None) -> Path:
    """Save model (and optimizer) state into `directory`, replacing what is there. Collective:
    every process of the group must call it.

    `extra` holds what the caller needs to resume beyond the tensors (step, scheduler state,
    data position, RNG states): tensors, numbers, strings, and lists/tuples/dicts of them
    (loaded back with `torch.load(weights_only=True)`). Rank 0's copy is written, so give it
    the same value on every process, or key per-process values by rank.
    """
    directory = Path(directory)
    partial = directory.with_name(directory.name + ".partial")
    if is_main_process():
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
    barrier()
    save_sharded_state(partial, model, optimizer)
    if is_main_process():
        torch.save(extra or {}, partial / EXTRA_NAME)
        commit_directory(partial, directory)
    barrier()
    return directory


def load_distributed_checkpoint(directory: str | Path, model: nn.Module,
                                optimizer: torch.optim.Optimizer | None = None) -> dict[str, Any]:
    """Load a checkpoint written by `save_distributed_checkpoint` into `model` (and `optimizer`)
    as `load_sharded_state` does; returns its `extra`."""
    load_sharded_state(directory, model, optimizer)
    extra_path = Path(directory) / EXTRA_NAME
    return torch.load(extra_path, weights_only=True) if extra_path.is_file() else {}


def _state(model: nn.Module, optimizer: torch.optim.Optimizer | None) -> dict[str, Any]:
    """What DCP writes and reads: the model's (and optimizer's) state under the plain model's
    parameter names, whatever wraps it."""
    state = {"model": get_model_state_dict(model)}
    if optimizer is not None:
        state["optimizer"] = get_optimizer_state_dict(model, optimizer)
    return state


@contextlib.contextmanager
def _one_process_on_purpose() -> Iterator[None]:
    """DCP warns when no process group is initialised; a single process is a supported case here."""
    with warnings.catch_warnings():
        if not dist.is_initialized():
            warnings.filterwarnings("ignore", "torch.distributed is disabled")
        yield
