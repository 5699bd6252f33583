"""Atomic training checkpoints: OUT/checkpoints/step_XXXXXXXX/.

    config.json, model.safetensors    the model (a save_pretrained directory: from_pretrained reads it)
    optimizer.pt                      AdamW state
    sharded/                          instead of the two above with training.checkpoint_format sharded:
                                      model and AdamW state as DCP shards, one file per process
    trainer_state.pt                  step, tokens seen, scheduler, grad scaler, counters
    rank_00000.pt                     per process: RNG states, data position, carried memory state (of
                                      its batch rows; `local_state` regroups them for another number
                                      of processes)
    recipe.json                       the full run configuration
    tokenizer_config.json, tokenizer.json  the tokenizer (mm_rec.data.tokenizers; transformers reads them too)
    manifest.json                     format version, step and the size of every file; written last

A checkpoint is written under a temporary name, every file fsync'ed, and renamed into place
(`mm_rec.utils.atomic`), so a folder named step_XXXXXXXX is complete; a damaged one (truncated
file, size mismatch, unreadable content) is detected on load and `--resume auto` falls back to
the previous one. Only the newest `keep_last` checkpoints are kept, and a run resumed from an
older checkpoint drops the newer ones of the abandoned attempt when it writes its first one.
The folder names and their lookup (`list_checkpoints`) are `mm_rec.loading`'s.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mm_rec.data.batching import ROW_STATE_KEYS, regroup_rows
from mm_rec.loading import SHARDED, checkpoint_dir, checkpoint_step, list_checkpoints
from mm_rec.model import CONFIG_NAME, WEIGHTS_NAME
from mm_rec.utils.atomic import commit_directory

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
MODEL_CONFIG, WEIGHTS = CONFIG_NAME, WEIGHTS_NAME  # the save_pretrained files
OPTIMIZER = "optimizer.pt"
TRAINER_STATE = "trainer_state.pt"
RECIPE = "recipe.json"


class CheckpointError(ValueError):
    """A checkpoint is missing, damaged, or does not fit the run."""


def rank_file(rank: int) -> str:
    return f"rank_{rank:05d}.pt"


def is_checkpoint(path: Path) -> bool:
    return (path / MANIFEST).is_file() or (path / TRAINER_STATE).is_file()


def save_checkpoint(run_dir: str | Path, step: int, write_shared: Callable[[Path], None],
                    write_local: Callable[[Path], None], keep_last: int, rank: int = 0,
                    barrier: Callable[[], None] = lambda: None) -> Path:
    """Write checkpoint `step` atomically; every process calls this.

    `write_shared(folder)` (main process) writes the model, optimizer and trainer files;
    `write_local(folder)` (every process, at the same time) writes its own files: its rank file,
    and its shards with the sharded format.
    """
    final = checkpoint_dir(run_dir, step)
    root = final.parent
    tmp = root / f".tmp-{final.name}"
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    try:
        barrier()
        write_local(tmp)
        barrier()
        if rank == 0:
            write_shared(tmp)
            _commit(tmp, final, step)
            found = list_checkpoints(run_dir)
            abandoned = [p for p in found if checkpoint_step(p) > step]  # a run resumed from an older checkpoint
            for stale in abandoned + [p for p in found if checkpoint_step(p) <= step][:-keep_last]:
                shutil.rmtree(stale, ignore_errors=True)
    except BaseException:
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)  # the previous checkpoints stay as they were
        raise
    barrier()
    return final


def _commit(tmp: Path, final: Path, step: int) -> None:
    """The manifest (the size of every file, by its path inside the folder), then the atomic
    rename; a folder already at `final` (a damaged one from an earlier attempt) is replaced."""
    files = {f.relative_to(tmp).as_posix(): f.stat().st_size for f in sorted(tmp.rglob("*")) if f.is_file()}
    (tmp / MANIFEST).write_text(json.dumps(dict(format=FORMAT_VERSION, step=step, files=files), indent=2) + "\n")
    commit_directory(tmp, final)


@dataclass
class Checkpoint:
    """A checkpoint read into memory (all but the weights, which are verified and read on apply)."""

    path: Path
    step: int
    recipe: dict[str, Any]
    model_config: dict[str, Any]
    trainer_state: dict[str, Any]
    optimizer: dict[str, Any] | None  # None for a sharded checkpoint: its state is in sharded/
    local: dict[str, Any] | None  # this process's rank file; None when read for another number of processes
    sharded: bool = False  # weights and optimizer state as DCP shards (training.checkpoint_format sharded)
    rank_files: list[dict[str, Any]] | None = None  # every process's rank file, when `local` is None


def load_checkpoint(path: str | Path, rank: int = 0, world_size: int | None = None) -> Checkpoint:
    """Read and check a checkpoint folder; raises CheckpointError naming what is wrong.

    world_size: of the run that reads it. When it differs from the writer's, every rank file is
    read (`rank_files`, for `local_state`) instead of this process's own."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        manifest = json.loads((path / MANIFEST).read_text())
        expected = manifest["files"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as err:
        raise CheckpointError(f"checkpoint {path} has no readable {MANIFEST} (incomplete or damaged): {err}") from None
    if manifest.get("format") != FORMAT_VERSION:
        raise CheckpointError(f"checkpoint {path} has format {manifest.get('format')}, "
                              f"this mm_rec reads {FORMAT_VERSION}")
    for name, size in expected.items():
        f = path / name
        if not f.is_file():
            raise CheckpointError(f"checkpoint {path} is damaged: {name} is missing")
        if f.stat().st_size != size:
            raise CheckpointError(f"checkpoint {path} is damaged: {name} is {f.stat().st_size} bytes, "
                                  f"the manifest says {size}")
    sharded = (path / SHARDED).is_dir()  # its shards are read on apply (the sizes were checked above)
    try:
        from safetensors import safe_open

        if not sharded:
            with safe_open(str(path / WEIGHTS), framework="pt"):  # parses the header, checks the length
                pass
        recipe = json.loads((path / RECIPE).read_text())
        model_config = json.loads((path / MODEL_CONFIG).read_text())
        trainer_state = torch.load(path / TRAINER_STATE, map_location="cpu", weights_only=True)
        optimizer = None if sharded else torch.load(path / OPTIMIZER, map_location="cpu", weights_only=True)
        writers = trainer_state.get("world_size", 1)
        own = world_size in (None, writers)  # else every rank file, to be regrouped
        ranks = [rank] if own else range(writers)
        files = []
        for r in ranks:
            local_path = path / rank_file(r)
            if not local_path.is_file():
                raise CheckpointError(f"checkpoint {path} has no {local_path.name}: it was written by "
                                      f"{writers} process(es)")
            files.append(torch.load(local_path, map_location="cpu", weights_only=True))
    except CheckpointError:
        raise
    except Exception as err:  # unpickling / JSON / safetensors errors: the content is damaged
        raise CheckpointError(f"checkpoint {path} is damaged: {type(err).__name__}: {err}") from None
    local, rank_files = (files[0], None) if own else (None, files)
    return Checkpoint(path, int(trainer_state["step"]), recipe, model_config, trainer_state, optimizer, local, sharded,
                      rank_files)


def local_state(checkpoint: Checkpoint, rank: int, world_size: int) -> dict[str, Any]:
    """What process `rank` of `world_size` resumes from: its own rank file, or, for a run on
    another number of processes with the same global batch, the rank file it would have written.

    A process holds a contiguous piece of the global batch rows (mm_rec.data.batching), so the
    per-row entries (the stream positions, and the carried memory state, whose tensors all have
    the batch rows first) are joined in rank order and cut anew. The rest is the same on every
    process and comes from rank 0: the random-window generator and the RNG states (which differ
    between processes only where dropout draws from them: such a run continues with rank 0's)."""
    if checkpoint.local is not None:
        return checkpoint.local
    files = checkpoint.rank_files
    try:
        data = dict(files[0]["data"])
        for key in ROW_STATE_KEYS:
            if key in data:
                data[key] = regroup_rows([f["data"][key] for f in files], rank, world_size)
        memory = files[0].get("memory_state")
        if memory is not None:
            memory = {k: regroup_rows([f["memory_state"][k] for f in files], rank, world_size) for k in memory}
    except (KeyError, ValueError) as err:
        raise CheckpointError(f"checkpoint {checkpoint.path}: the data position does not fit "
                              f"{world_size} process(es): {err}") from None
    return dict(files[0], data=data, memory_state=memory)


def resolve_resume(run_dir: str | Path, resume: str, rank: int = 0, warn: Callable[[str], None] = print,
                   world_size: int | None = None) -> Checkpoint | None:
    """`--resume auto`: the newest readable checkpoint of the run (None when there is none),
    skipping damaged ones with a warning. `--resume PATH`: that checkpoint, or the newest of the
    run folder PATH; any damage is an error. world_size: as for `load_checkpoint`."""
    if resume != "auto":
        path = Path(resume)
        if path.is_dir() and not is_checkpoint(path):
            found = list_checkpoints(path)
            if not found:
                raise CheckpointError(f"no checkpoint in {path}")
            path = found[-1]
        return load_checkpoint(path, rank, world_size)
    for path in reversed(list_checkpoints(run_dir)):
        try:
            return load_checkpoint(path, rank, world_size)
        except CheckpointError as err:
            warn(f"warning: skipping {err}")
    return None


# ---------------------------------------------------------------------- model and optimizer state
def _aliases(model: nn.Module) -> dict[str, str]:
    """Tied parameters: alias name -> the name first holding the same tensor (lm_head -> embed)."""
    first: dict[int, str] = {}
    aliases = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in first:
            aliases[name] = first[id(p)]
        else:
            first[id(p)] = name
    return aliases


def model_state(model: nn.Module, raw: nn.Module, distributed: bool) -> dict[str, torch.Tensor]:
    """Full weights (tied parameters once), gathered on every process when distributed."""
    if distributed:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    else:
        state = raw.state_dict()
    aliases = _aliases(raw)
    return {k: v.detach().contiguous() for k, v in state.items() if k not in aliases}


def save_weights(state: dict[str, torch.Tensor], path: Path) -> None:
    from safetensors.torch import save_file

    save_file(state, str(path), metadata={"format": "pt"})


def load_weights(model: nn.Module, raw: nn.Module, path: Path, distributed: bool) -> None:
    from safetensors.torch import load_file

    try:
        state = load_file(str(path))
    except Exception as err:
        raise CheckpointError(f"could not read {path}: {err}") from None
    for alias, name in _aliases(raw).items():  # tied weights are stored once, under either name
        if name in state or alias in state:
            state[alias] = state[name] = state.get(name, state.get(alias))
    if distributed:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True))
        return
    expected = raw.state_dict()
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        raise CheckpointError(f"{path} does not fit the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    for name, tensor in state.items():
        if tensor.shape != expected[name].shape:
            raise CheckpointError(f"{path} does not fit the model: {name} is {tuple(tensor.shape)}, "
                                  f"the model has {tuple(expected[name].shape)}")
    raw.load_state_dict(state, strict=True)


def optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, distributed: bool) -> dict:
    if distributed:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        return get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True,
                                                                                   cpu_offload=True))
    return optimizer.state_dict()


def load_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict, distributed: bool) -> None:
    if distributed:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))
        return
    try:
        optimizer.load_state_dict(state)
    except (ValueError, KeyError, RuntimeError) as err:
        raise CheckpointError(f"the optimizer state does not fit the model: {err}") from None


def save_sharded(folder: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Model and optimizer state as DCP shards in folder/sharded/ (collective: every process
    writes its own shards, so nothing is gathered)."""
    from mm_rec.distributed.checkpoint import save_sharded_state  # slow to import; only this format needs it

    save_sharded_state(folder / SHARDED, model, optimizer)


def load_sharded(checkpoint: Checkpoint, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """The state `save_sharded` wrote, into the (possibly wrapped) model and its optimizer."""
    from mm_rec.distributed.checkpoint import load_sharded_state  # slow to import; only this format needs it

    try:
        load_sharded_state(checkpoint.path / SHARDED, model, optimizer)
    except ValueError as err:  # a missing or misshapen tensor
        raise CheckpointError(f"checkpoint {checkpoint.path}: could not read {SHARDED}/: {err}") from None
