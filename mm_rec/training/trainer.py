"""The training loop behind `mmrec train`.

    result = train(RunConfig.load("configs/tiny.yaml"), out_dir="runs/tiny", resume="auto")

One optimizer step (`Trainer.step`): `grad_accum_steps` micro-batches (forward, backward of
loss / accum), then unscale (fp16), clip, a finite check, AdamW, the schedule. With
`distributed.parallel: sp` every process reads the same batch and takes its part in time of each
row (`mm_rec.distributed.sequence_parallel`); the carried state ends on the last process and is
handed to rank 0, which alone holds it (and saves it) between batches. With
`data.carry_state` the memory state runs on from one micro-batch to the next (detached:
truncated backpropagation through time) and rows are reset at document boundaries. A step whose
loss or gradient norm is NaN/Inf is skipped (no update; the carried state is reset) and counted;
`max_nonfinite_steps` of them in a row stop the run with `NonFiniteError`.

Exact resume (invariant I6, docs/architecture.md): a checkpoint holds everything the next step depends on (weights,
AdamW moments, schedule position, every RNG, the data position, the carried state), so N steps,
save, resume in a fresh process, N more steps give the same losses bit for bit on CPU as 2N
steps in one run.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import sys
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mm_rec.config import MMRecConfig
from mm_rec.constants import IGNORE_INDEX
from mm_rec.core.memory_state import MemoryState
from mm_rec.data.batching import ContiguousStreams, RandomWindows
from mm_rec.data.cache import prepare_tokens
from mm_rec.data.corpus import Source, iter_documents, resolve_source
from mm_rec.data.tokenizers import HF_FILE, BPETokenizer, ByteTokenizer, Tokenizer, load_tokenizer
from mm_rec.generation import generate_text
from mm_rec.loading import CHECKPOINTS, build_model, list_checkpoints
from mm_rec.model import write_pretrained_config
from mm_rec.training import checkpoint as ckpt
from mm_rec.training.config import RunConfig, TrainingConfig
from mm_rec.training.evaluate import EvalResult, evaluate, token_bytes_table
from mm_rec.training.metrics import MetricsLogger, WandbOptions, require_wandb
from mm_rec.training.optim import build_optimizer, build_scheduler, clip_gradients, load_scheduler_state
from mm_rec.utils.debugging import NonFiniteDetector, format_gradient_flow, gradient_flow
from mm_rec.utils.device import autocast_for, resolve_device, resolve_precision


class NonFiniteError(RuntimeError):
    """Training stopped after too many non-finite steps in a row."""


@dataclass
class TrainResult:
    run_dir: Path
    step: int
    train_loss: float | None  # loss of the last step
    eval: EvalResult | None  # the last evaluation
    checkpoint: Path | None  # the last checkpoint written
    sample: str | None
    interrupted: bool = False


def train(config: RunConfig, out_dir: str | Path, resume: str | None = None, debug: bool = False,
          log=print) -> TrainResult:
    """Train per `config`, writing metrics.jsonl and checkpoints into `out_dir`.

    resume: None (a fresh run; refused when out_dir already holds checkpoints), "auto" (the
    newest good checkpoint of out_dir, or a fresh run when there is none) or a checkpoint path.
    debug: NaN/Inf hooks that name the first module producing one, gradient-flow reports.
    """
    try:
        return Trainer(config, out_dir, resume, debug, log).fit()
    finally:
        if config.distributed.parallel != "none":
            from mm_rec.distributed import cleanup_distributed

            cleanup_distributed()


# ---------------------------------------------------------------------- building blocks
def build_tokenizer(config: RunConfig, source: Source, vocab_size: int, cache_dir: Path, log=print) -> Tokenizer:
    """data.tokenizer: byte, bpe (trained once on the data and cached) or a tokenizer.json path."""
    spec = config.data.tokenizer
    if spec == "byte":
        return ByteTokenizer()
    if spec == "bpe":
        if source.kind == "bin":
            raise ValueError("data.tokenizer=bpe trains on text; for a .bin give the tokenizer.json it was made with")
        size = config.data.bpe_vocab_size or vocab_size
        path = cache_dir / f"bpe-{source.fingerprint()}-{size}" / HF_FILE
        if path.is_file():
            return BPETokenizer.from_file(path)
        log(f"training a BPE tokenizer (vocabulary {size}) on {source.description} ...")
        docs = iter_documents(source, config.data.document_separator)
        tokenizer = BPETokenizer.train((d.decode("utf-8", errors="replace") for d in docs), size)
        path.parent.mkdir(parents=True, exist_ok=True)
        tokenizer.tokenizer.save(str(path))
        return tokenizer
    if not Path(spec).is_file():
        raise FileNotFoundError(f"data.tokenizer={spec!r}: use byte, bpe or the path of a tokenizer.json")
    return BPETokenizer.from_file(spec)


def rng_state() -> dict[str, Any]:
    """Every RNG the process has (torch CPU and CUDA, Python, NumPy when installed)."""
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    try:
        import numpy as np
    except ImportError:
        return state
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state["numpy"] = [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)]
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if "numpy" in state:
        try:
            import numpy as np
        except ImportError:
            return
        kind, keys, pos, has_gauss, cached = state["numpy"]
        np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    random.seed(seed)
    try:
        import numpy as np
    except ImportError:
        return
    np.random.seed(seed % 2**32)


def check_resume(config: RunConfig, checkpoint: ckpt.Checkpoint, model_config: dict, world_size: int) -> None:
    """Refuse a checkpoint that does not fit this run: another model or vocabulary, other batching.
    world_size: the processes of this run."""
    # in today's terms: renamed keys migrated, a config without config_version read as version 1
    saved = MMRecConfig.from_saved({k: v for k, v in checkpoint.model_config.items() if k != "model_type"}).to_dict()
    diff = sorted(k for k in set(saved) | set(model_config) if saved.get(k) != model_config.get(k))
    if diff:
        details = ", ".join(f"{k}: checkpoint {saved.get(k)!r}, recipe {model_config.get(k)!r}" for k in diff[:6])
        what = "vocabulary" if "vocab_size" in diff else "model configuration"
        raise ckpt.CheckpointError(f"checkpoint {checkpoint.path} does not match this run's {what} ({details})")
    recipe = checkpoint.recipe
    fixed = [("model_type", recipe.get("model_type"), config.model_type)]
    # the data itself is compared by the digest of its tokens, once tokenized
    for section, keys in (("data", ("tokenizer", "carry_state", "val_fraction", "document_separator")),
                          ("training", ("seq_len",))):
        for key in keys:
            fixed.append((f"{section}.{key}", recipe.get(section, {}).get(key), getattr(getattr(config, section), key)))
    changed = [f"{name}: checkpoint {old!r}, now {new!r}" for name, old, new in fixed if old != new]
    if changed:
        raise ckpt.CheckpointError(f"cannot resume {checkpoint.path}: the data or batching changed ("
                                   + "; ".join(changed) + "); start a new run with another --out")
    saved_processes = checkpoint.trainer_state.get("world_size", 1)
    sequence_parallel = "sp" in (recipe.get("distributed", {}).get("parallel"), config.distributed.parallel)
    if sequence_parallel and saved_processes != world_size:
        # each process holds its part in time of every row: parts cut for N processes do not regroup
        raise ckpt.CheckpointError(f"cannot resume {checkpoint.path}: a sequence-parallel run resumes on the same "
                                   f"number of processes ({saved_processes}), not {world_size}")
    if sequence_parallel:  # every process reads the same batch: the global batch is one process's
        return
    # another number of processes may continue the run with the same global batch (its rows are regrouped)
    saved_world, saved_batch = saved_processes, recipe["training"]["batch_size"]
    if saved_world * saved_batch != world_size * config.training.batch_size:
        hint = (f"; with {world_size} process(es) set training.batch_size={saved_world * saved_batch // world_size}"
                if saved_world * saved_batch % world_size == 0 else "")
        raise ckpt.CheckpointError(f"cannot resume {checkpoint.path}: the global batch changed (checkpoint "
                                   f"{saved_world} process(es) x training.batch_size {saved_batch}, now {world_size} x "
                                   f"{config.training.batch_size}){hint}")


# what the optimizer and the schedule read from the recipe; a resumed run may change them
SCHEDULE_KEYS = ("lr", "min_lr", "warmup_steps", "decay_steps", "weight_decay", "beta1", "beta2")


def changed_schedule(saved: dict[str, Any], now: TrainingConfig) -> list[str]:
    """'training.KEY: OLD -> NEW' for every optimizer or schedule setting of the checkpoint's recipe
    (`saved`, its training section) that differs from this run's. decay_steps is the cosine's
    length: lr_decay_steps, or max_steps when that is null."""
    changes = []
    for key in SCHEDULE_KEYS:
        if key == "decay_steps":
            old = saved.get("lr_decay_steps") or saved.get("max_steps")
            name = "training.lr_decay_steps (null: max_steps)"
        else:
            old, name = saved.get(key), f"training.{key}"
        new = getattr(now, key)
        if old is not None and old != new:
            changes.append(f"{name}: {old} -> {new}")
    return changes


def apply_schedule(optimizer: torch.optim.Optimizer, scheduler, config: TrainingConfig) -> None:
    """Put this run's lr, betas and weight decay into a restored optimizer (loading its state brought
    the checkpoint's back) and rebase the schedule on them; the schedule's shape (warmup, cosine,
    min_lr) is already this recipe's and its position the checkpoint's. Groups as build_optimizer
    makes them: decayed first."""
    decays = [config.weight_decay, 0.0]
    for group, decay in zip(optimizer.param_groups, decays):
        group.update(weight_decay=decay, betas=(config.beta1, config.beta2), initial_lr=config.lr)
    scheduler.base_lrs = [config.lr] * len(optimizer.param_groups)
    rates = [base * fn(scheduler.last_epoch) for base, fn in zip(scheduler.base_lrs, scheduler.lr_lambdas)]
    for group, rate in zip(optimizer.param_groups, rates):
        group["lr"] = rate
    scheduler._last_lr = rates


# ---------------------------------------------------------------------- the trainer
class Trainer:
    """Builds everything a run needs (in `__init__`), then `fit()` runs the loop."""

    def __init__(self, config: RunConfig, out_dir: str | Path, resume: str | None = None, debug: bool = False,
                 log=print):
        self.config, self.debug = config, debug
        tc, dc = config.training, config.data
        self.run_dir = Path(out_dir)
        if tc.wandb:
            require_wandb()  # a missing package is said at once, not after the data is prepared
        self._init_distributed()
        self.log = log if self.is_main else (lambda *_: None)

        # resume point: read before anything is written into the run folder
        if resume is None and list_checkpoints(self.run_dir):
            raise ckpt.CheckpointError(f"{self.run_dir} already holds checkpoints; pass --resume auto to continue "
                                       "that run, or choose another --out")
        checkpoint = (ckpt.resolve_resume(self.run_dir, resume, self.rank, warn=self.log, world_size=self.world_size)
                      if resume else None)
        if resume == "auto" and checkpoint is None:
            self.log(f"--resume auto: no checkpoint in {self.run_dir / CHECKPOINTS}; starting a new run")
        if checkpoint is not None and "config_version" not in checkpoint.model_config:
            # a run started before config versions: continue it with the memory it was trained with
            config.model = {**config.model, "config_version": 1}

        # model: initialised from the seed (a checkpoint overwrites the weights below)
        seed_everything(tc.seed)
        self.raw = self._build_model()
        model_config = self.raw.config.to_dict()
        if checkpoint is not None:
            check_resume(config, checkpoint, model_config, self.world_size)
        self.vocab_size = model_config["vocab_size"]

        self._prepare_data(checkpoint)

        # parallelism, then the optimizer over the (possibly sharded) parameters
        self.model = self._parallelize()
        self.optimizer = build_optimizer(self.model, tc, self.device)
        self.scheduler = build_scheduler(self.optimizer, tc)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.precision == "fp16")
        self.carry = dc.carry_state and hasattr(self.raw, "init_state")
        self.state: MemoryState | None = self._fresh_state()
        self.step_count, self.tokens_seen, self.elapsed_before = 0, 0, 0.0
        if checkpoint is not None:
            self._restore(checkpoint)
        self.tokens_per_step = tc.batch_size * tc.seq_len * tc.grad_accum_steps * self.data_parallel_size
        self.resumed_from = checkpoint.path if checkpoint is not None else None

    # ---- setup
    def _init_distributed(self) -> None:
        self.rank, self.world_size = 0, 1
        parallel = self.config.distributed.parallel
        if parallel == "none":
            if int(os.environ.get("WORLD_SIZE", "1")) > 1:
                raise ValueError("started by torchrun with several processes but distributed.parallel is none; "
                                 "add --parallel ddp, fsdp or sp")
            self.device = resolve_device(self.config.training.device)
            return
        from mm_rec.distributed import init_distributed

        device_type = None if self.config.training.device == "auto" else torch.device(self.config.training.device).type
        info = init_distributed(device_type)
        self.rank, self.world_size, self.device = info.rank, info.world_size, info.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.config.distributed.parallel != "none"

    @property
    def sequence_parallel(self) -> bool:
        return self.config.distributed.parallel == "sp"

    @property
    def data_parallel_size(self) -> int:
        """Processes that read batches of their own (sequence parallelism: all read the same one)."""
        return 1 if self.sequence_parallel else self.world_size

    def barrier(self) -> None:
        if self.distributed and torch.distributed.is_initialized():
            torch.distributed.barrier()

    @property
    def precision(self) -> str:
        return resolve_precision(self.config.training.precision, self.device)

    def _build_model(self) -> nn.Module:
        if self.sequence_parallel and self.config.model_type != "mmrec":
            raise ValueError(f"--parallel sp cuts sequences where MM-Rec's recurrent state is handed on; the "
                             f"{self.config.model_type} model has no such state (use ddp or fsdp)")
        if self.distributed and self.device.type == "cuda":  # a 7B model never exists in CPU memory
            from mm_rec.distributed import init_model_on_device

            return init_model_on_device(lambda: build_model(self.config.model_config(), self.config.model_type),
                                        self.device)
        return build_model(self.config.model_config(), self.config.model_type).to(self.device)

    def _prepare_data(self, checkpoint: ckpt.Checkpoint | None) -> None:
        tc, dc = self.config.training, self.config.data
        cache_dir = Path(dc.cache_dir) if dc.cache_dir else self.run_dir / "data"
        source = resolve_source(dc.path, dc.text_field)
        if checkpoint is not None:
            self.tokenizer = load_tokenizer(checkpoint.path) or ByteTokenizer()
        else:  # a BPE tokenizer is trained once, by the main process; the others load it from the cache
            self.tokenizer = self._main_first(
                lambda: build_tokenizer(self.config, source, self.vocab_size, cache_dir, self.log))
        # a byte-level model may have fewer than 256 ids (ASCII text): the data's largest id is checked below
        if self.tokenizer.kind != "byte" and self.tokenizer.vocab_size > self.vocab_size:
            raise ValueError(f"the {self.tokenizer.kind} tokenizer has {self.tokenizer.vocab_size} tokens but the "
                             f"model's vocab_size is {self.vocab_size}; set model.vocab_size >= "
                             f"{self.tokenizer.vocab_size}")
        self.data = self._main_first(
            lambda: prepare_tokens(source, self.tokenizer, cache_dir, dc.document_separator, dc.bin_dtype, self.log))
        self.data.check_vocab(self.vocab_size)
        if checkpoint is not None and checkpoint.trainer_state.get("data_digest") != self.data.digest:
            raise ckpt.CheckpointError(f"the data changed since checkpoint {checkpoint.path} was written; "
                                       "start a new run with another --out")
        self.split = self.data.split_point(dc.val_fraction)
        data_rank = 0 if self.sequence_parallel else self.rank  # sequence parallelism: one batch for all
        if dc.carry_state:
            self.batcher = ContiguousStreams(self.data, 0, self.split, tc.batch_size, tc.seq_len,
                                             rows=tc.batch_size * self.data_parallel_size,
                                             first_row=data_rank * tc.batch_size, seed=tc.seed)
        else:
            self.batcher = RandomWindows(self.data, 0, self.split, tc.batch_size, tc.seq_len, seed=tc.seed,
                                         rows=tc.batch_size * self.data_parallel_size,
                                         first_row=data_rank * tc.batch_size)
        self.token_bytes = token_bytes_table(self.tokenizer, self.vocab_size)

    def _main_first(self, fn):
        """fn() on the main process, then on the others (which find its cached result)."""
        if self.is_main:
            result = fn()
        self.barrier()
        if not self.is_main:
            result = fn()
        return result

    def _parallelize(self) -> nn.Module:
        """Activation checkpointing, then DDP/FSDP (mm_rec.distributed, torchtitan's order)."""
        tc, dist_cfg = self.config.training, self.config.distributed
        if not self.distributed:
            if hasattr(self.raw, "gradient_checkpointing"):
                self.raw.gradient_checkpointing = tc.activation_checkpointing
            return self.raw
        from mm_rec.distributed import ParallelConfig, apply_parallelism

        if self.precision == "fp16":
            raise ValueError("multi-GPU runs support precision bf16 or fp32, not fp16")
        parallel = ParallelConfig(mode=dist_cfg.parallel, activation_checkpointing=tc.activation_checkpointing,
                                  ac_policy=dist_cfg.ac_policy, compile=dist_cfg.compile,
                                  mixed_precision="bf16" if self.precision == "bf16" else "fp32",
                                  reshard_after_forward=dist_cfg.reshard_after_forward)
        return apply_parallelism(self.raw, parallel)

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.distributed:  # apply_parallelism already runs the forward in the compute dtype
            return contextlib.nullcontext()
        return autocast_for(self.precision, self.device)

    def _fresh_state(self) -> MemoryState | None:
        """The carried state of a fresh stream (sequence parallelism: rank 0 alone holds it)."""
        holds = self.carry and (self.rank == 0 or not self.sequence_parallel)
        return self.raw.init_state(self.config.training.batch_size, device=self.device) if holds else None

    # ---- checkpoints
    def _restore(self, checkpoint: ckpt.Checkpoint) -> None:
        if checkpoint.sharded:  # whatever this run's checkpoint_format: resume reads either
            ckpt.load_sharded(checkpoint, self.model, self.optimizer)
        else:
            ckpt.load_weights(self.model, self.raw, checkpoint.path / ckpt.WEIGHTS, self.distributed)
            ckpt.load_optimizer_state(self.model, self.optimizer, checkpoint.optimizer, self.distributed)
        ts = checkpoint.trainer_state
        load_scheduler_state(self.scheduler, ts["scheduler"])  # after the optimizer state
        if ts.get("scaler"):
            self.scaler.load_state_dict(ts["scaler"])
        self.step_count, self.tokens_seen = int(ts["step"]), int(ts["tokens_seen"])
        self.elapsed_before = float(ts.get("elapsed_s", 0.0))
        local = ckpt.local_state(checkpoint, self.rank, self.world_size)  # regrouped for another world size
        try:
            self.batcher.load_state_dict(local["data"])
        except (KeyError, ValueError) as err:
            raise ckpt.CheckpointError(f"checkpoint {checkpoint.path}: the data position does not fit: {err}") from None
        if self.carry and local.get("memory_state"):
            self.state = MemoryState.from_state_dict(local["memory_state"]).to(self.device)
        set_rng_state(local["rng"])
        changed = changed_schedule(checkpoint.recipe.get("training", {}), self.config.training)
        if changed:
            apply_schedule(self.optimizer, self.scheduler, self.config.training)
            self.log(f"resuming with a changed optimizer or schedule ({'; '.join(changed)}): the new values apply "
                     f"from step {self.step_count + 1}")

    def save(self) -> Path:
        """Write a checkpoint of the current step (every process calls this). Format full: the
        weights and the optimizer state gathered into one file each; sharded: every process writes
        its own shards, so nothing is gathered (less memory and time for a large FSDP run)."""
        sharded = self.config.training.checkpoint_format == "sharded"
        weights = None if sharded else ckpt.model_state(self.model, self.raw, self.distributed)
        optimizer = None if sharded else ckpt.optimizer_state(self.model, self.optimizer, self.distributed)
        trainer_state = dict(step=self.step_count, tokens_seen=self.tokens_seen, scheduler=self.scheduler.state_dict(),
                             scaler=self.scaler.state_dict() if self.scaler.is_enabled() else None,
                             elapsed_s=self.elapsed, world_size=self.world_size, data_digest=self.data.digest)

        def write_shared(folder: Path) -> None:
            if not sharded:
                ckpt.save_weights(weights, folder / ckpt.WEIGHTS)
                torch.save(optimizer, folder / ckpt.OPTIMIZER)
            write_pretrained_config(self.raw, folder)  # config.json as save_pretrained writes it
            torch.save(trainer_state, folder / ckpt.TRAINER_STATE)
            (folder / ckpt.RECIPE).write_text(json.dumps(self.config.to_dict(), indent=2) + "\n")
            self.tokenizer.save(folder)

        def write_local(folder: Path) -> None:
            if sharded:
                ckpt.save_sharded(folder, self.model, self.optimizer)
            memory = None if self.state is None else {k: v.cpu() for k, v in self.state.state_dict().items()}
            local = dict(rng=rng_state(), data=self.batcher.state_dict(), memory_state=memory)
            torch.save(local, folder / ckpt.rank_file(self.rank))

        return ckpt.save_checkpoint(self.run_dir, self.step_count, write_shared, write_local,
                                    self.config.training.keep_last, self.rank, self.barrier)

    # ---- one step, one evaluation
    def step(self) -> tuple[float, float, bool]:
        """One optimizer step; returns (loss, gradient norm, applied)."""
        tc = self.config.training
        loss_sum = torch.zeros((), device=self.device)
        for micro in range(tc.grad_accum_steps):
            batch = self.batcher.next_batch()
            ids, labels = batch.input_ids.to(self.device), batch.labels.to(self.device)
            if self.state is not None:
                self.state.reset(batch.reset.to(self.device))
            if self.sequence_parallel:
                loss, state = self._sequence_parallel_step(ids, labels)
            else:
                share = self._token_share(labels)
                with _grad_sync(self.model, micro == tc.grad_accum_steps - 1), self._autocast():
                    out = self.model(ids, state=self.state, labels=labels, return_logits=False)
                self.scaler.scale(out.loss * share / tc.grad_accum_steps).backward()
                loss, state = out.loss.detach().float() * share, out.state
            loss_sum += loss
            if self.carry:
                self.state = None if state is None else state.detach()
        loss = loss_sum / tc.grad_accum_steps
        if self.sequence_parallel:  # the loss is already global; each process holds its part's gradients
            from mm_rec.distributed import all_reduce_gradients

            all_reduce_gradients(self.model)
        elif self.distributed and torch.distributed.is_initialized():
            torch.distributed.all_reduce(loss, op=torch.distributed.ReduceOp.AVG)
        self.scaler.unscale_(self.optimizer)
        grad_norm = clip_gradients(self.model, tc.grad_clip)
        # fp16: a non-finite gradient means the loss scale was too high, and the scaler skips the step itself
        applied = bool(torch.isfinite(loss)) and (self.scaler.is_enabled() or bool(torch.isfinite(grad_norm)))
        if applied:
            self.scaler.step(self.optimizer)
        elif self.carry:
            self.state = self._fresh_state()  # do not carry NaN into the next batch
        self.scaler.update()
        if self.debug and self.is_main and (self.step_count == 0 or (self.step_count + 1) % tc.eval_interval == 0):
            self.log(format_gradient_flow(gradient_flow(self.raw), f"gradient flow at step {self.step_count + 1}"))
        self.optimizer.zero_grad(set_to_none=True)
        with warnings.catch_warnings():
            # the position is the step count, so the schedule also advances past a skipped update,
            # which LambdaLR warns about when it is the first step
            warnings.filterwarnings("ignore", "Detected call of `lr_scheduler.step", UserWarning)
            self.scheduler.step()
        self.step_count += 1
        self.tokens_seen += self.tokens_per_step
        return float(loss), float(grad_norm), applied

    def _sequence_parallel_step(self, ids: torch.Tensor,
                                labels: torch.Tensor) -> tuple[torch.Tensor, MemoryState | None]:
        """Forward and backward of one micro-batch cut in time over the processes: this process runs
        its part of every row. Returns the global mean loss and, on rank 0 with carry_state, the
        state after the whole rows (handed over by the last process)."""
        from mm_rec.distributed import local_part, sequence_parallel_step

        tc = self.config.training
        out = sequence_parallel_step(self.model, local_part(ids, self.rank, self.world_size),
                                     local_part(labels, self.rank, self.world_size), state=self.state,
                                     num_microbatches=self.config.distributed.sp_microbatches or tc.batch_size,
                                     loss_scale=1.0 / tc.grad_accum_steps, hand_over_state=self.carry)
        return out.loss.float(), out.state

    def _token_share(self, labels: torch.Tensor) -> torch.Tensor | float:
        """data_parallel_size * this process's labelled tokens / all processes' labelled tokens (1 alone).

        Each process's loss is the mean over its own labelled tokens, and DDP and FSDP average the
        gradients over the processes. Padding at document ends (label -100) leaves the processes
        different numbers of labelled tokens, so that average of means is not the mean over the
        global batch; scaled by this share it is, as with one process holding the whole batch."""
        if not (self.distributed and torch.distributed.is_initialized()):
            return 1.0
        count = (labels != IGNORE_INDEX).sum().float()
        total = count.clone()
        torch.distributed.all_reduce(total)
        return count * self.data_parallel_size / total.clamp_min(1)

    def evaluate(self) -> EvalResult:
        tc = self.config.training
        end = min(len(self.data), self.split + tc.eval_tokens)
        return evaluate(self.model, self.data, self.split, end, tc.batch_size, tc.seq_len,
                        self.raw.init_state if self.carry else None, self.token_bytes, self.device, self._autocast(),
                        self.rank, self.world_size)

    @property
    def elapsed(self) -> float:
        return self.elapsed_before + time.perf_counter() - self.start_time

    # ---- the loop
    def fit(self) -> TrainResult:
        tc = self.config.training
        if self.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "recipe.json").write_text(json.dumps(self.config.to_dict(), indent=2) + "\n")
        wandb = WandbOptions(tc.wandb_project, self.config.to_dict()) if tc.wandb else None
        logger = (MetricsLogger(self.run_dir, tc.tensorboard, self.step_count if self.resumed_from else None, wandb)
                  if self.is_main else None)
        self._describe()
        detector = NonFiniteDetector(self.raw) if self.debug else None
        if detector is not None:
            detector.attach()
        interrupted = threading.Event()
        previous_handlers = _on_stop_signals(interrupted, self.log)
        bar = _progress(tc.max_steps, self.step_count) if self.is_main else None
        last_loss, last_eval, last_checkpoint, nonfinite_run = None, None, None, 0
        self.start_time = time.perf_counter()
        try:
            self.model.train()
            while self.step_count < tc.max_steps and not interrupted.is_set():
                t0 = time.perf_counter()
                if detector is not None:
                    detector.reset()
                lr = self.scheduler.get_last_lr()[0]
                last_loss, grad_norm, applied = self.step()
                step = self.step_count
                row = dict(step=step, loss=last_loss, lr=lr, grad_norm=grad_norm, tokens=self.tokens_seen,
                           tokens_per_s=self.tokens_per_step / (time.perf_counter() - t0), elapsed_s=self.elapsed)
                nonfinite_run = 0 if applied else nonfinite_run + 1
                if not applied:
                    row["skipped"] = True
                    where = detector.report() if detector is not None else "run with --debug to find the first module"
                    _write(bar, f"step {step}: non-finite loss or gradient, update skipped "
                                f"({nonfinite_run} in a row); {where}", self.log)
                if logger is not None:
                    logger.log(row)
                _progress_update(bar, row, tc.log_interval, tc.max_steps, self.log)
                if nonfinite_run >= tc.max_nonfinite_steps:
                    raise NonFiniteError(
                        f"training stopped at step {step}: {nonfinite_run} non-finite steps in a row "
                        f"(loss {last_loss}). Lower training.lr, lengthen warmup, use precision bf16 or fp32, or run "
                        "with --debug to find the first module producing NaN/Inf. The last good checkpoint stays in "
                        f"{self.run_dir / CHECKPOINTS}")
                if step % tc.eval_interval == 0 or step == tc.max_steps:
                    last_eval = self.evaluate()
                    if logger is not None:
                        logger.log(dict(step=step, **last_eval.as_row()))
                    _write(bar, f"step {step}: val loss {last_eval.loss:.4f} | ppl {last_eval.perplexity:.2f} | "
                                f"{last_eval.bits_per_byte:.4f} bits/byte", self.log)
                if step % tc.save_interval == 0 or step == tc.max_steps or interrupted.is_set():
                    last_checkpoint = self.save()
        finally:
            for closer in (bar, logger):
                if closer is not None:
                    closer.close()
            if detector is not None:
                detector.detach()
            for signum, handler in previous_handlers.items():
                signal.signal(signum, handler)
        if interrupted.is_set():
            self.log(f"stopped at step {self.step_count}; checkpoint {last_checkpoint}; continue with --resume auto")
        sample = None
        # FSDP forwards are collective: every process samples (the same tokens), the main one prints
        sampling = self.is_main or self.config.distributed.parallel == "fsdp"
        if (sampling and tc.sample_tokens > 0 and not interrupted.is_set() and self.step_count > 0
                and hasattr(self.raw, "generate_stream")):
            self.log(f"sample ({tc.sample_tokens} tokens, temperature {tc.sample_temperature}, "
                     f"top-k {tc.sample_top_k}):")
            sample = generate_text(self.raw, self.tokenizer, tc.sample_prompt, tc.sample_tokens, tc.sample_temperature,
                                   tc.sample_top_k, tc.seed, self.device, self._autocast(), echo=self.is_main)
            if self.is_main:
                (self.run_dir / "sample.txt").write_text(sample)
        return TrainResult(self.run_dir, self.step_count, last_loss, last_eval, last_checkpoint, sample,
                           interrupted.is_set())

    def _describe(self) -> None:
        tc, dc = self.config.training, self.config.data
        n = sum(p.numel() for p in self.raw.parameters())
        self.log(f"model: {type(self.raw).__name__}, {n / 1e6:.2f}M parameters | device {self.device} | "
                 f"precision {self.precision} | processes {self.world_size}"
                 + (" (sequence parallel: every row cut into as many parts)" if self.sequence_parallel else ""))
        self.log(f"data: {self.data.description}: {len(self.data):,} {self.tokenizer.kind} tokens "
                 f"({self.split:,} train, {len(self.data) - self.split:,} validation) | "
                 f"{'contiguous streams, state carried' if dc.carry_state else 'random windows'} | "
                 f"{self.tokens_per_step:,} tokens per step")
        if self.resumed_from is not None:
            self.log(f"resumed from {self.resumed_from} at step {self.step_count} ({self.tokens_seen:,} tokens seen)")
        if self.step_count >= tc.max_steps:
            self.log(f"already at step {self.step_count} >= max_steps {tc.max_steps}: nothing to train")


# ---------------------------------------------------------------------- small helpers
def _grad_sync(model: nn.Module, sync: bool):
    """Skip the gradient all-reduce on all but the last micro-batch (DDP no_sync / FSDP2)."""
    if hasattr(model, "no_sync") and not sync:
        return model.no_sync()
    if hasattr(model, "set_requires_gradient_sync"):
        model.set_requires_gradient_sync(sync)
    return contextlib.nullcontext()


STOP_SIGNALS = ("SIGINT", "SIGTERM", "SIGUSR1")  # Ctrl-C; a scheduler's stop or pre-emption notice


def _on_stop_signals(flag: threading.Event, log) -> dict:
    """Ctrl-C, SIGTERM and SIGUSR1 finish the current step, save a checkpoint and stop (exit code
    130); a second one aborts. Returns the handlers they replaced (none outside the main thread)."""
    if threading.current_thread() is not threading.main_thread():
        return {}

    def handler(signum, frame):
        if flag.is_set():
            raise KeyboardInterrupt
        flag.set()
        log(f"\ninterrupted ({signal.Signals(signum).name}): saving a checkpoint after this step "
            "(a second signal aborts)")

    return {sig: signal.signal(sig, handler) for sig in (getattr(signal, name, None) for name in STOP_SIGNALS)
            if sig is not None}


def _progress(total: int, initial: int):
    """A tqdm bar on an interactive terminal; None elsewhere (log lines instead)."""
    if not sys.stderr.isatty():
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True)


def _progress_update(bar, row: dict, log_interval: int, max_steps: int, log) -> None:
    due = row["step"] % log_interval == 0 or row["step"] == max_steps
    if bar is not None:
        bar.update(1)
        if due:
            bar.set_postfix(loss=f"{row['loss']:.4f}", lr=f"{row['lr']:.2e}", tok_s=f"{row['tokens_per_s']:,.0f}")
    elif due:
        log(f"step {row['step']}/{max_steps} | loss {row['loss']:.4f} | lr {row['lr']:.2e} | "
            f"{row['tokens_per_s']:,.0f} tok/s | {row['elapsed_s']:.0f} s")


def _write(bar, text: str, log) -> None:
    if bar is not None:
        bar.write(text)
    else:
        log(text)
