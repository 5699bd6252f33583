"""Typed model configuration, presets and YAML/JSON loading.

`MMRecConfig` holds every architecture field of the seeds' 7B specification plus what the
design needs. Construction validates every field and raises `ValueError` naming the field
and the rule it breaks, so a bad recipe fails before any tensor is allocated.
"""

from __future__ import annotations

import dataclasses
import json
import math
import warnings
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

GATE_INPUTS = ("state", "input")
MEMORY_INPUTS = ("input", "state", "both")
CONV_INITS = ("shift", "random")
LEVEL2_KINDS = ("delta", "mean")
SLOT_WRITES = ("attention", "mean")
RETENTIONS = ("learned", "age")
KEPT_AGE_BIASES = ("linear", "capped")

CONFIG_VERSION = 2
# Version 1 is every config.json written before the memory was written at token level: it has
# no config_version key, and its model is this memory (loaded with these values, it computes
# exactly what it computed then).
LEGACY_V1: dict[str, Any] = dict(memory_input="state", conv_size=0, window_size=0, level2="mean",
                                 slot_write="mean", slots_per_block=1, retention="age")
# Keys of older config files: renamed, or fixed values that are no longer fields.
RENAMED_KEYS = {"max_chunk_len": "max_segment_len"}
FIXED_KEYS = {"num_hds_levels": 3, "use_log_sum_exp": True}


@dataclass
class MMRecConfig:
    """Architecture of an MM-Rec language model.

    Shapes used in docstrings: D = hidden_dim, H = num_heads, d = D // H, K = num_memories,
    m = mem_dim, S = memory_size_M, C = chunk_size.
    """

    vocab_size: int = 256
    hidden_dim: int = 128  # D
    num_layers: int = 4
    num_heads: int = 4  # H; each head runs its own recurrence with W_g [d, d]
    ffn_dim: int = 384  # SwiGLU inner width
    num_memories: int = 2  # K banks (the memory's heads)
    mem_dim: int = 32  # m
    memory_size_M: int = 32  # S slots per bank in the long-term ring (0 disables it)
    chunk_size: int = 32  # C: HDS block length in tokens
    max_seq_len: int = 32768  # longest sequence the recipes train on (documentation + checks)
    max_segment_len: int = 8192  # forward passes longer than this run segment by segment
    # sigma(beta) at init: 0.5 starts h on the last few tokens; 0.9 (the default before 2026-12-07) blurs
    # each token with ~10 predecessors and trains 3-6% worse on text (docs/quality.md, study 3)
    decay_init: float = 0.5
    decay_rank: int = 0  # rank of the decay modulation a_t; 0 = full rank (D)
    log_clamp_min: float = -50.0
    log_clamp_max: float = 0.0
    gate_input: str = "state"  # "state": sigma(h_{t-1} W_g); "input": sigma(z_t W_g) ablation
    # ---- how the memory is written and read (docs/architecture.md; each switch is an ablation)
    memory_input: str = "input"  # q/k/v from the block input x ("input"), from RMSNorm(h) ("state"), or both
    conv_size: int = 4  # short causal depthwise convolution over the memory's q/k/v inputs (0: none)
    conv_init: str = "shift"  # "shift": q and v start on the current token, k on the previous one; "random"
    window_size: int | None = None  # level 0 exact attention over the last W tokens; None: 2 * chunk_size; 0: off
    level2: str = "delta"  # level-2 memory: "delta" (gated delta-rule matrix) or "mean" (decayed mean of v)
    slot_write: str = "attention"  # block slot = learned attention pooling ("attention") or the plain "mean"
    slots_per_block: int = 1  # r: sub-slots per block, each summarising C / r consecutive tokens
    retention: str = "learned"  # ring kept by a learned importance score and age ("learned") or by age alone
    recent_slots: int | None = None  # slots kept by age alone when retention is learned; None: S // 2
    # age bias of the slots kept by importance: "linear" in their age, or "capped" at the newest-by-age
    # part's span (a kept slot then competes on content and importance, however old)
    kept_age_bias: str = "linear"
    # level2=delta: the last `undecayed_banks` banks keep alpha = 1 (a pure delta rule, which forgets
    # only by overwriting what a new key overlaps), so recall does not fade with distance by decay
    undecayed_banks: int = 0
    # level2=delta: multiplies every log alpha (alpha -> alpha^s). 1 as trained; below 1 at evaluation, the
    # banks forget more slowly, for contexts far longer than the training's (a setting without parameters)
    delta_decay_scale: float = 1.0
    dropout: float = 0.0  # residual dropout on each branch's output (training only; small-data recipes)
    tie_embeddings: bool = True
    norm_eps: float = 1e-5
    init_std: float = 0.02
    config_version: int = CONFIG_VERSION  # 1: the memory before token-level writes (see LEGACY_V1)

    def __post_init__(self) -> None:
        # Sizes left as None follow the others (and are stored resolved, so config.json is explicit).
        if self.window_size is None:
            self.window_size = 2 * self.chunk_size if self.config_version >= 2 else 0
        if self.recent_slots is None:
            S, r = self.memory_size_M, self.slots_per_block
            half = (S // 2) // r * r if isinstance(S, int) and isinstance(r, int) and r > 0 else S
            self.recent_slots = S if self.retention == "age" or not S else max(r, half)
        self.validate()

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        def need(ok: bool, name: str, rule: str) -> None:
            if not ok:
                raise ValueError(f"MMRecConfig.{name}={getattr(self, name)!r}: {rule}")

        def integer(name: str, low: int) -> None:
            value = getattr(self, name)
            need(isinstance(value, int) and not isinstance(value, bool) and value >= low, name,
                 "must be a positive integer" if low > 0 else "must be a non-negative integer")

        need(self.config_version in (1, CONFIG_VERSION), "config_version",
             f"must be 1 or {CONFIG_VERSION}: this mm_rec reads configs up to version {CONFIG_VERSION} "
             "(a newer one needs a newer mm_rec)")
        if self.config_version == 1:
            changed = {k: getattr(self, k) for k, v in LEGACY_V1.items() if getattr(self, k) != v}
            need(not changed, "config_version", f"1 describes the memory before token-level writes, which has "
                 f"none of {changed}; use config_version {CONFIG_VERSION}")
        for name in ("vocab_size", "hidden_dim", "num_layers", "num_heads", "ffn_dim", "num_memories", "mem_dim",
                     "chunk_size", "max_seq_len", "max_segment_len", "slots_per_block"):
            integer(name, 1)
        for name in ("memory_size_M", "decay_rank", "conv_size", "window_size", "recent_slots"):
            integer(name, 0)
        need(self.hidden_dim % self.num_heads == 0, "hidden_dim",
             f"must be divisible by num_heads={self.num_heads}")
        need(self.decay_rank <= self.hidden_dim, "decay_rank", "must be <= hidden_dim")
        need(isinstance(self.decay_init, (int, float)) and 0.0 < self.decay_init < 1.0,
             "decay_init", "must lie strictly between 0 and 1")
        need(isinstance(self.log_clamp_max, (int, float)) and self.log_clamp_max <= 0.0,
             "log_clamp_max", "must be <= 0 (a decay above 1 would make the scan explode)")
        need(isinstance(self.log_clamp_min, (int, float)) and self.log_clamp_min < self.log_clamp_max,
             "log_clamp_min", f"must be < log_clamp_max={self.log_clamp_max}")
        need(math.log(self.decay_init) >= self.log_clamp_min, "decay_init",
             f"log(decay_init) must be >= log_clamp_min={self.log_clamp_min}")
        need(0.0 <= self.dropout < 1.0, "dropout", "must be in [0, 1)")
        need(self.gate_input in GATE_INPUTS, "gate_input", f"must be one of {GATE_INPUTS}")
        need(self.memory_input in MEMORY_INPUTS, "memory_input", f"must be one of {MEMORY_INPUTS}")
        need(self.conv_init in CONV_INITS, "conv_init", f"must be one of {CONV_INITS}")
        need(self.level2 in LEVEL2_KINDS, "level2", f"must be one of {LEVEL2_KINDS}")
        need(self.slot_write in SLOT_WRITES, "slot_write", f"must be one of {SLOT_WRITES}")
        need(self.retention in RETENTIONS, "retention", f"must be one of {RETENTIONS}")
        need(self.kept_age_bias in KEPT_AGE_BIASES, "kept_age_bias", f"must be one of {KEPT_AGE_BIASES}")
        need(isinstance(self.undecayed_banks, int) and 0 <= self.undecayed_banks <= self.num_memories,
             "undecayed_banks", f"must be an integer in [0, num_memories={self.num_memories}]")
        need(self.undecayed_banks == 0 or self.level2 == "delta", "undecayed_banks", "needs level2=delta")
        need(isinstance(self.delta_decay_scale, (int, float)) and not isinstance(self.delta_decay_scale, bool)
             and 0.0 <= self.delta_decay_scale <= 1.0, "delta_decay_scale", "must lie in [0, 1]")
        need(self.delta_decay_scale == 1.0 or self.level2 == "delta", "delta_decay_scale", "needs level2=delta")
        need(self.chunk_size % self.slots_per_block == 0, "slots_per_block",
             f"must divide chunk_size={self.chunk_size} (each sub-slot covers chunk_size / r tokens)")
        need(self.memory_size_M % self.slots_per_block == 0, "memory_size_M",
             f"must be a multiple of slots_per_block={self.slots_per_block} (the ring holds whole blocks)")
        need(self.recent_slots <= self.memory_size_M and self.recent_slots % self.slots_per_block == 0,
             "recent_slots", f"must be a multiple of slots_per_block={self.slots_per_block} and <= memory_size_M")
        need(self.retention == "age" or self.recent_slots > 0 or self.memory_size_M == 0, "recent_slots",
             "must be > 0 with retention=learned (the newest blocks are always kept)")
        need(isinstance(self.tie_embeddings, bool), "tie_embeddings", "must be true or false")
        need(isinstance(self.norm_eps, (int, float)) and self.norm_eps > 0, "norm_eps", "must be > 0")
        need(isinstance(self.init_std, (int, float)) and self.init_std > 0, "init_std", "must be > 0")

    # ------------------------------------------------------------------ derived sizes
    @property
    def head_dim(self) -> int:
        return self.hidden_dim // self.num_heads

    @property
    def num_hds_levels(self) -> int:
        """The seeds' field, fixed: levels 1-3 (block slots, level-2 memory, long-term ring)."""
        return 3

    @property
    def use_log_sum_exp(self) -> bool:
        """The seeds' field, fixed: decay products are always computed in log space."""
        return True

    @property
    def kept_slots(self) -> int:
        """Slots of the ring kept by importance rather than age (0 with retention=age)."""
        return 0 if self.retention == "age" else self.memory_size_M - self.recent_slots

    @property
    def decay_modulation_dim(self) -> int:
        """Width of the decay modulation produced by the fused input projection."""
        return self.decay_rank or self.hidden_dim

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> MMRecConfig:
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
        return cls.from_dict({**PRESETS[name], **overrides})

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> MMRecConfig:
        """A config from a mapping of fields (a recipe's model section, overrides). Keys left out take
        the defaults of the mapping's `config_version` (the current one when it has none); keys of
        older files are migrated (see `migrate`)."""
        values = migrate(values)
        if values.get("config_version", CONFIG_VERSION) == 1:
            values = {**LEGACY_V1, **values}
        return dataclass_from_dict(cls, values, "config")

    @classmethod
    def from_saved(cls, values: dict[str, Any]) -> MMRecConfig:
        """A config read back from a config.json that `save` (or save_pretrained) wrote: one without
        `config_version` predates versioning and is version 1, so old checkpoints load as they were."""
        return cls.from_dict({"config_version": 1, **values})

    @classmethod
    def from_file(cls, path: str | Path) -> MMRecConfig:
        """Load a YAML or JSON file. A recipe with a `model:` section uses that section."""
        return cls.from_recipe(load_mapping(path))

    @classmethod
    def from_recipe(cls, values: dict[str, Any]) -> MMRecConfig:
        """The model of a recipe mapping: its `model:` section if it has one (else the mapping
        itself), optionally starting from a `preset`."""
        if "model" in values and isinstance(values["model"], dict):
            values = values["model"]
        if "preset" in values:
            values = dict(values)
            return cls.from_preset(values.pop("preset"), **values)
        return cls.from_dict(values)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def replace(self, **changes: Any) -> MMRecConfig:
        """A copy with `changes`; sizes derived from a changed field are derived again unless given."""
        derived = {"window_size": ("chunk_size",), "recent_slots": ("memory_size_M", "retention", "slots_per_block")}
        for name, sources in derived.items():
            if name not in changes and any(k in changes for k in sources):
                changes[name] = None
        return dataclasses.replace(self, **changes)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")


def migrate(values: dict[str, Any]) -> dict[str, Any]:
    """Keys of older config files in today's terms: renamed keys (with a FutureWarning naming the new
    one) and the seeds' fixed-value keys (checked, then dropped; they are properties now)."""
    values = dict(values)
    for old, new in RENAMED_KEYS.items():
        if old in values:
            warnings.warn(f"config key {old!r} is now {new!r}; {old!r} is read for now but will go",
                          FutureWarning, stacklevel=3)
            if new in values and values[new] != values[old]:
                raise ValueError(f"config has both {old!r}={values[old]!r} and {new!r}={values[new]!r}")
            values[new] = values.pop(old)
    for key, fixed in FIXED_KEYS.items():
        if key in values:
            if values[key] != fixed:
                raise ValueError(f"MMRecConfig.{key}={values[key]!r}: must be {fixed!r} (the only value MM-Rec "
                                 "has; use memory_size_M=0 to switch the long-term memory off)")
            del values[key]
    return values


def dataclass_from_dict(cls: type, values: dict[str, Any], what: str):
    """cls(**values), refusing unknown keys with a ValueError that lists the valid ones."""
    valid = {f.name for f in fields(cls)}
    unknown = sorted(set(values) - valid)
    if unknown:
        raise ValueError(f"unknown {what} key(s) {unknown}; valid keys: {sorted(valid)}")
    return cls(**values)


def load_mapping(path: str | Path) -> dict[str, Any]:
    """Read a YAML (.yaml/.yml) or JSON file into a dict, with clear errors."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"config file not found: {path}")
    text = path.read_text()
    try:
        if path.suffix.lower() == ".json":
            values = json.loads(text)
        else:
            import yaml

            values = yaml.safe_load(text)
    except Exception as err:  # parser errors carry line numbers; keep them
        raise ValueError(f"could not parse {path}: {err}") from err
    if values is None:
        values = {}
    if not isinstance(values, dict):
        raise ValueError(f"{path} must hold a mapping of keys to values, got {type(values).__name__}")
    return values


PRESETS: dict[str, dict[str, Any]] = {
    # ~1M parameters: CPU tests and the quick-start run on byte-level text.
    "tiny": dict(vocab_size=256, hidden_dim=128, num_layers=4, num_heads=4, ffn_dim=384,
                 num_memories=2, mem_dim=32, memory_size_M=32, chunk_size=32, decay_init=0.5,
                 max_seq_len=4096, max_segment_len=2048),
    # ~125M parameters (GPT-2 small sized).
    "small": dict(vocab_size=50304, hidden_dim=768, num_layers=12, num_heads=12, ffn_dim=2048,
                  num_memories=4, mem_dim=128, memory_size_M=256, chunk_size=64, decay_init=0.95,
                  decay_rank=64, max_seq_len=8192, max_segment_len=8192),
    # ~1B parameters.
    "1b": dict(vocab_size=32000, hidden_dim=2048, num_layers=16, num_heads=16, ffn_dim=5632,
               num_memories=8, mem_dim=256, memory_size_M=512, chunk_size=128, decay_init=0.99,
               decay_rank=128, max_seq_len=32768, max_segment_len=8192),
    # The seeds' REQUIRED 7B specification.
    "7b": dict(vocab_size=32000, hidden_dim=4096, num_layers=24, num_heads=32, ffn_dim=11008,
               num_memories=8, mem_dim=512, memory_size_M=1024, chunk_size=128,
               max_seq_len=32768, max_segment_len=8192, decay_init=0.99, decay_rank=256,
               log_clamp_min=-50.0, log_clamp_max=0.0),  # num_hds_levels=3, use_log_sum_exp=True: fixed
}
