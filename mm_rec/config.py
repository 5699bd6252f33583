"""Typed model configuration, presets and YAML/JSON loading.

`MMRecConfig` holds every architecture field of the seeds' 7B specification plus what the
design needs. Construction validates every field and raises `ValueError` naming the field
and the rule it breaks, so a bad recipe fails before any tensor is allocated.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

GATE_INPUTS = ("state", "input")


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
    num_memories: int = 2  # K banks
    mem_dim: int = 32  # m
    memory_size_M: int = 32  # S slots per bank in the long-term ring (0 disables it)
    num_hds_levels: int = 3  # block slots, sequence aggregate, long-term ring
    chunk_size: int = 32  # C: HDS block length in tokens
    max_seq_len: int = 32768  # longest sequence the recipes train on (documentation + checks)
    max_chunk_len: int = 8192  # forward passes longer than this run segment by segment
    decay_init: float = 0.9  # sigma(beta) at init
    decay_rank: int = 0  # rank of the decay modulation a_t; 0 = full rank (D)
    use_log_sum_exp: bool = True  # log-space products; the only supported mode
    log_clamp_min: float = -50.0
    log_clamp_max: float = 0.0
    gate_input: str = "state"  # "state": sigma(h_{t-1} W_g); "input": sigma(z_t W_g) ablation
    dropout: float = 0.0  # residual dropout on each branch's output (training only; small-data recipes)
    tie_embeddings: bool = True
    norm_eps: float = 1e-5
    init_std: float = 0.02

    def __post_init__(self) -> None:
        self.validate()

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        def need(ok: bool, name: str, rule: str) -> None:
            if not ok:
                raise ValueError(f"MMRecConfig.{name}={getattr(self, name)!r}: {rule}")

        for name in ("vocab_size", "hidden_dim", "num_layers", "num_heads", "ffn_dim",
                     "num_memories", "mem_dim", "chunk_size", "max_seq_len", "max_chunk_len"):
            value = getattr(self, name)
            need(isinstance(value, int) and not isinstance(value, bool) and value > 0, name,
                 "must be a positive integer")
        for name in ("memory_size_M", "decay_rank"):
            value = getattr(self, name)
            need(isinstance(value, int) and not isinstance(value, bool) and value >= 0, name,
                 "must be a non-negative integer")
        need(self.hidden_dim % self.num_heads == 0, "hidden_dim",
             f"must be divisible by num_heads={self.num_heads}")
        need(self.decay_rank <= self.hidden_dim, "decay_rank", "must be <= hidden_dim")
        need(self.num_hds_levels == 3, "num_hds_levels",
             "must be 3 (block slots, sequence aggregate, long-term ring); use memory_size_M=0 "
             "to switch the long-term memory off")
        need(isinstance(self.decay_init, (int, float)) and 0.0 < self.decay_init < 1.0,
             "decay_init", "must lie strictly between 0 and 1")
        need(self.use_log_sum_exp is True, "use_log_sum_exp",
             "must be true: decay products are always computed in log space")
        need(isinstance(self.log_clamp_max, (int, float)) and self.log_clamp_max <= 0.0,
             "log_clamp_max", "must be <= 0 (a decay above 1 would make the scan explode)")
        need(isinstance(self.log_clamp_min, (int, float)) and self.log_clamp_min < self.log_clamp_max,
             "log_clamp_min", f"must be < log_clamp_max={self.log_clamp_max}")
        need(math.log(self.decay_init) >= self.log_clamp_min, "decay_init",
             f"log(decay_init) must be >= log_clamp_min={self.log_clamp_min}")
        need(0.0 <= self.dropout < 1.0, "dropout", "must be in [0, 1)")
        need(self.gate_input in GATE_INPUTS, "gate_input", f"must be one of {GATE_INPUTS}")
        need(isinstance(self.tie_embeddings, bool), "tie_embeddings", "must be true or false")
        need(isinstance(self.norm_eps, (int, float)) and self.norm_eps > 0, "norm_eps", "must be > 0")
        need(isinstance(self.init_std, (int, float)) and self.init_std > 0, "init_std", "must be > 0")

    # ------------------------------------------------------------------ derived sizes
    @property
    def head_dim(self) -> int:
        return self.hidden_dim // self.num_heads

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
        return dataclass_from_dict(cls, values, "config")

    @classmethod
    def from_file(cls, path: str | Path) -> MMRecConfig:
        """Load a YAML or JSON file. A recipe with a `model:` section uses that section."""
        values = load_mapping(path)
        if "model" in values and isinstance(values["model"], dict):
            values = values["model"]
        if "preset" in values:
            values = dict(values)
            return cls.from_preset(values.pop("preset"), **values)
        return cls.from_dict(values)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def replace(self, **changes: Any) -> MMRecConfig:
        return dataclasses.replace(self, **changes)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")


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
                 num_memories=2, mem_dim=32, memory_size_M=32, chunk_size=32, decay_init=0.9,
                 max_seq_len=4096, max_chunk_len=2048),
    # ~125M parameters (GPT-2 small sized).
    "small": dict(vocab_size=50304, hidden_dim=768, num_layers=12, num_heads=12, ffn_dim=2048,
                  num_memories=4, mem_dim=128, memory_size_M=256, chunk_size=64, decay_init=0.95,
                  decay_rank=64, max_seq_len=8192, max_chunk_len=8192),
    # ~1B parameters.
    "1b": dict(vocab_size=32000, hidden_dim=2048, num_layers=16, num_heads=16, ffn_dim=5632,
               num_memories=8, mem_dim=256, memory_size_M=512, chunk_size=128, decay_init=0.99,
               decay_rank=128, max_seq_len=32768, max_chunk_len=8192),
    # The seeds' REQUIRED 7B specification.
    "7b": dict(vocab_size=32000, hidden_dim=4096, num_layers=24, num_heads=32, ffn_dim=11008,
               num_memories=8, mem_dim=512, memory_size_M=1024, num_hds_levels=3, chunk_size=128,
               max_seq_len=32768, max_chunk_len=8192, decay_init=0.99, decay_rank=256,
               use_log_sum_exp=True, log_clamp_min=-50.0, log_clamp_max=0.0),
}
