"""Training recipes: typed sections, YAML loading and command-line overrides.

A recipe is a YAML (or JSON) file with these top-level keys, every one optional:

    model_type: mmrec          # or transformer (the baseline in mm_rec.baselines.transformer)
    model:       {preset: tiny, num_layers: 2, ...}   # MMRecConfig fields, optionally from a preset
    training:    {...}         # TrainingConfig
    data:        {...}         # DataConfig
    distributed: {...}         # DistributedConfig

Unknown keys are refused with the list of valid ones. With no recipe at all the defaults below
are the `tiny` quick-start run (configs/tiny.yaml spells them out).

Overrides use one scheme, `section.key=value` (`--set training.lr=1e-3 model.num_layers=2` on the
command line); the value is read as YAML (`true`, `null`, `[1, 2]`) and converted to the field's
type, so `1e-3` is a float for a float field.
"""

from __future__ import annotations

import copy
import dataclasses
import types
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from mm_rec.config import MMRecConfig, load_mapping
from mm_rec.constants import PARALLEL_MODES
from mm_rec.loading import MODEL_TYPES

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
CHECKPOINT_FORMATS = ("full", "sharded")


@dataclass
class TrainingConfig:
    """Optimisation, schedule, evaluation, logging and checkpoint settings."""

    max_steps: int = 700  # optimizer steps in total (a resumed run stops here too)
    batch_size: int = 16  # rows per micro-batch on each process
    seq_len: int = 256  # tokens per row per micro-batch (the TBPTT window with data.carry_state)
    grad_accum_steps: int = 1  # micro-batches per optimizer step
    lr: float = 2e-3  # peak learning rate
    min_lr: float = 2e-4  # learning rate at the end of the cosine
    warmup_steps: int = 50  # linear warmup from lr / warmup_steps to lr
    lr_decay_steps: int | None = None  # cosine length in steps; null = max_steps
    weight_decay: float = 0.1  # on matrices and embeddings only
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # max global gradient norm; 0 = no clipping
    precision: str = "auto"  # auto (bf16 on CUDA, fp32 on CPU) | fp32 | bf16 | fp16 (with a GradScaler)
    activation_checkpointing: bool = False  # recompute activations in backward
    eval_interval: int = 250  # steps between evaluations (and after the last step)
    eval_tokens: int = 65536  # validation tokens per evaluation (the first ones of the split)
    log_interval: int = 10  # steps between progress lines (the bar and metrics.jsonl get every step)
    save_interval: int = 500  # steps between checkpoints (and after the last step)
    keep_last: int = 3  # checkpoints kept in OUT/checkpoints
    checkpoint_format: str = "full"  # full (weights and optimizer state gathered) | sharded (DCP, per process)
    max_nonfinite_steps: int = 5  # stop after this many non-finite steps in a row
    seed: int = 0  # model init, data order, sampling
    device: str = "auto"  # auto (cuda when available) | cpu | cuda | cuda:N
    tensorboard: bool = True  # also write OUT/tensorboard when the tensorboard package is installed
    wandb: bool = False  # also log to Weights & Biases (pip install 'mm-rec[wandb]'); the run is named after OUT
    wandb_project: str = "mm-rec"  # the W&B project
    sample_tokens: int = 300  # tokens generated after training (0 = no sample)
    sample_prompt: str = "\n"
    sample_temperature: float = 0.8
    sample_top_k: int | None = 40

    def validate(self) -> None:
        positive = ("max_steps", "batch_size", "seq_len", "grad_accum_steps", "eval_interval", "eval_tokens",
                    "log_interval", "save_interval", "keep_last", "max_nonfinite_steps")
        for name in positive:
            _need(self, name, getattr(self, name) > 0, "must be a positive integer")
        for name in ("warmup_steps", "sample_tokens", "seed"):
            _need(self, name, getattr(self, name) >= 0, "must be a non-negative integer")
        _need(self, "lr", self.lr > 0, "must be > 0")
        _need(self, "min_lr", 0 <= self.min_lr <= self.lr, f"must lie in [0, lr={self.lr}]")
        _need(self, "lr_decay_steps", self.lr_decay_steps is None or self.lr_decay_steps > 0,
              "must be a positive integer or null")
        _need(self, "weight_decay", self.weight_decay >= 0, "must be >= 0")
        _need(self, "beta1", 0 <= self.beta1 < 1, "must lie in [0, 1)")
        _need(self, "beta2", 0 <= self.beta2 < 1, "must lie in [0, 1)")
        _need(self, "grad_clip", self.grad_clip >= 0, "must be >= 0 (0 = no clipping)")
        _need(self, "precision", self.precision in PRECISIONS, f"must be one of {PRECISIONS}")
        _need(self, "checkpoint_format", self.checkpoint_format in CHECKPOINT_FORMATS,
              f"must be one of {CHECKPOINT_FORMATS}")
        _need(self, "wandb_project", bool(self.wandb_project.strip()), "must be a project name")
        _need(self, "sample_temperature", self.sample_temperature >= 0, "must be >= 0")
        _need(self, "sample_top_k", self.sample_top_k is None or self.sample_top_k > 0, "must be positive or null")

    @property
    def decay_steps(self) -> int:
        return self.lr_decay_steps or self.max_steps


@dataclass
class DataConfig:
    """Where the tokens come from and how they are batched."""

    path: str | None = None  # text/.jsonl/.parquet/.gz file, folder of them, datasets folder or .bin; null = stdlib
    text_field: str = "text"  # the text of .jsonl / .parquet records and of a datasets folder
    tokenizer: str = "byte"  # byte | bpe (trained on the training data) | path to a tokenizer.json
    bpe_vocab_size: int | None = None  # vocabulary of a trained BPE tokenizer; null = model vocab_size
    bin_dtype: str = "uint16"  # element type of a .bin file (nanoGPT writes uint16)
    document_separator: str | None = None  # split text files into documents at this string too
    val_fraction: float = 0.05  # the last fraction of the tokens is the validation split
    carry_state: bool = True  # contiguous streams per row, memory carried across batches
    cache_dir: str | None = None  # tokenized-data cache; null = OUT/data

    def validate(self) -> None:
        _need(self, "tokenizer", bool(self.tokenizer), "must be byte, bpe or a path to a tokenizer.json")
        _need(self, "text_field", isinstance(self.text_field, str) and bool(self.text_field), "must be a field name")
        _need(self, "bpe_vocab_size", self.bpe_vocab_size is None or self.bpe_vocab_size > 0,
              "must be a positive integer or null")
        _need(self, "bin_dtype", self.bin_dtype in ("uint8", "uint16", "int32", "uint32"),
              "must be uint8, uint16, int32 or uint32")
        _need(self, "val_fraction", 0 < self.val_fraction < 1, "must lie strictly between 0 and 1")
        _need(self, "document_separator", self.document_separator is None or len(self.document_separator) > 0,
              "must be a non-empty string or null")


@dataclass
class DistributedConfig:
    """Multi-GPU settings (launch with torchrun), turned into a `mm_rec.distributed.ParallelConfig`;
    mixed precision and activation checkpointing come from the training section."""

    parallel: str = "none"  # none | ddp | fsdp | sp (sequence parallelism: each sequence cut in time)
    sp_microbatches: int = 0  # sp: micro-batches (groups of rows) pipelined through the processes; 0: one per row
    reshard_after_forward: bool = True  # FSDP: free each block's gathered parameters after its forward
    ac_policy: str = "full"  # activation checkpointing per block: full | selective (keeps matmul outputs)
    compile: bool = False  # torch.compile each block (multi-GPU runs)

    def validate(self) -> None:
        _need(self, "parallel", self.parallel in PARALLEL_MODES, f"must be one of {PARALLEL_MODES}")
        _need(self, "ac_policy", self.ac_policy in ("full", "selective"), "must be full or selective")
        _need(self, "sp_microbatches", isinstance(self.sp_microbatches, int) and self.sp_microbatches >= 0,
              "must be a non-negative integer (0: one micro-batch per row)")


SECTIONS: dict[str, type] = {"training": TrainingConfig, "data": DataConfig, "distributed": DistributedConfig}


@dataclass
class RunConfig:
    """A whole recipe. `model` stays a mapping (MMRecConfig fields, optionally `preset`) until
    `model_config()` builds the typed model configuration, so that presets and overrides merge."""

    model_type: str = "mmrec"
    model: dict[str, Any] = field(default_factory=lambda: {"preset": "tiny"})
    training: TrainingConfig = field(default_factory=TrainingConfig)
    data: DataConfig = field(default_factory=DataConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)

    @classmethod
    def from_dict(cls, values: dict[str, Any], source: str = "recipe") -> RunConfig:
        valid = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - valid)
        if unknown:
            raise ValueError(f"{source}: unknown section(s) {unknown}; valid top-level keys: {sorted(valid)}")
        model_type = values.get("model_type", "mmrec")
        if model_type not in MODEL_TYPES:
            raise ValueError(f"{source}: model_type={model_type!r}: must be one of {MODEL_TYPES}")
        model = values.get("model") or {"preset": "tiny"}
        if not isinstance(model, dict):
            raise ValueError(f"{source}: the model section must be a mapping, got {type(model).__name__}")
        sections = {name: _build_section(kind, values.get(name), f"{source}: {name}")
                    for name, kind in SECTIONS.items()}
        config = cls(model_type=model_type, model=dict(model), **sections)
        config.model_config()  # validate the model section now, before any data is read
        return config

    @classmethod
    def load(cls, path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
        """The recipe at `path` (the defaults when None) with `section.key=value` overrides applied."""
        values = load_mapping(path) if path is not None else {}
        values = apply_overrides(values, overrides or [])
        return cls.from_dict(values, source=str(path) if path is not None else "recipe")

    def model_config(self) -> MMRecConfig:
        """The typed model configuration (the Transformer baseline reads the same fields)."""
        values = dict(self.model)
        preset = values.pop("preset", None)
        hints = typing.get_type_hints(MMRecConfig)
        values = {k: _coerce(v, hints[k], f"model.{k}") if k in hints else v for k, v in values.items()}
        return MMRecConfig.from_preset(preset, **values) if preset is not None else MMRecConfig.from_dict(values)

    def to_dict(self) -> dict[str, Any]:
        return dict(model_type=self.model_type, model=dict(self.model),
                    **{name: dataclasses.asdict(getattr(self, name)) for name in SECTIONS})


def _need(section: Any, name: str, ok: bool, rule: str) -> None:
    if not ok:
        raise ValueError(f"{type(section).__name__}.{name}={getattr(section, name)!r}: {rule}")


def _build_section(kind: type, values: Any, source: str):
    if values is None:
        values = {}
    if not isinstance(values, dict):
        raise ValueError(f"{source} must be a mapping of keys to values, got {type(values).__name__}")
    hints = typing.get_type_hints(kind)
    unknown = sorted(set(values) - set(hints))
    if unknown:
        raise ValueError(f"{source}: unknown key(s) {unknown}; valid keys: {sorted(hints)}")
    section = kind(**{k: _coerce(v, hints[k], f"{kind.__name__}.{k}") for k, v in values.items()})
    section.validate()
    return section


def _coerce(value: Any, hint: Any, name: str) -> Any:
    """Convert a YAML/CLI value to the field's type (int -> float, '1e-3' -> 1e-3), or raise."""
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        hint = next(a for a in args if a is not type(None))
    if hint is Any or typing.get_origin(hint) is dict:
        return value
    if hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
    elif hint is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
    raise ValueError(f"{name}={value!r}: expected {getattr(hint, '__name__', hint)}")


def apply_overrides(values: dict[str, Any], assignments: list[str]) -> dict[str, Any]:
    """Apply `section.key=value` (or top-level `key=value`) assignments to a recipe mapping."""
    values = copy.deepcopy(values)
    for assignment in assignments:
        key, sep, text = assignment.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ValueError(f"override {assignment!r} must look like section.key=value, e.g. training.lr=1e-3")
        try:
            value = yaml.safe_load(text) if text.strip() else ""
        except yaml.YAMLError:
            value = text
        section, dot, name = key.partition(".")
        if not dot:
            values[key] = value
            continue
        if "." in name or not name:
            raise ValueError(f"override {assignment!r}: keys have the form section.key (one dot)")
        target = values.setdefault(section, {})
        if not isinstance(target, dict):
            raise ValueError(f"override {assignment!r}: {section} is not a section")
        target[name] = value
    return values
