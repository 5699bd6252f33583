"""The recurrent state that MM-Rec carries across segments, batches and generated tokens.

Layout (B batch rows, H heads, d head dim, K banks, m mem_dim, S memory_size_M, C chunk_size):

    MemoryState
      position            [B] int64    absolute stream position of each row (tokens consumed)
      banks[l]            MemoryBank of layer l:
        h                 [B, H, d]    level 0: recurrence state h_T (short-term memory)
        aggregate         [B, K, m]    level 2: running decayed mean G_T of the values
        block_key_sum     [B, K, m]    sums of k / v over the tokens of the unfinished block
        block_value_sum   [B, K, m]      (it holds position % C tokens)
        slot_keys         [B, K, S, m] level 3, long-term memory M: the S most recent completed
        slot_values       [B, K, S, m]   block slots (mean k, mean v), oldest first

Blocks sit at absolute stream positions (block j covers positions [j*C, (j+1)*C)), so with
n = position // C completed blocks, slot s of the ring holds block n - S + s; slots of blocks
with a negative index are empty (zeros) and never read. The ring is kept in chronological
order, which is the ring-with-write-pointer of the seeds with the pointer always at the end:
nothing depends on where a segment starts, so any split of a stream gives the same state.

Floating-point state is fp32 (float64 for a float64 model); every row is independent, so rows
may sit at different positions and `reset(mask)` returns some of them to a fresh stream.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch

BANK_FIELDS = ("h", "aggregate", "block_key_sum", "block_value_sum", "slot_keys", "slot_values")


@dataclass
class MemoryBank:
    """State of one MM-Rec layer: all K memory banks plus the recurrence state."""

    h: torch.Tensor
    aggregate: torch.Tensor
    block_key_sum: torch.Tensor
    block_value_sum: torch.Tensor
    slot_keys: torch.Tensor
    slot_values: torch.Tensor

    @classmethod
    def zeros(cls, batch_size: int, num_heads: int, head_dim: int, num_memories: int, mem_dim: int,
              memory_size: int, device=None, dtype=torch.float32) -> MemoryBank:
        def z(*shape):
            return torch.zeros(*shape, device=device, dtype=dtype)

        B, K, m = batch_size, num_memories, mem_dim
        return cls(h=z(B, num_heads, head_dim), aggregate=z(B, K, m), block_key_sum=z(B, K, m),
                   block_value_sum=z(B, K, m), slot_keys=z(B, K, memory_size, m),
                   slot_values=z(B, K, memory_size, m))

    def map(self, fn) -> MemoryBank:
        return MemoryBank(**{f: fn(getattr(self, f)) for f in BANK_FIELDS})


class MemoryState:
    """Per-layer `MemoryBank`s plus the stream position of every batch row."""

    def __init__(self, banks: list[MemoryBank], position: torch.Tensor):
        self.banks = list(banks)
        self.position = position

    # ------------------------------------------------------------------ construction
    @classmethod
    def zeros(cls, config, batch_size: int, device=None, dtype=torch.float32) -> MemoryState:
        banks = [
            MemoryBank.zeros(batch_size, config.num_heads, config.head_dim, config.num_memories,
                             config.mem_dim, config.memory_size_M, device=device, dtype=dtype)
            for _ in range(config.num_layers)
        ]
        return cls(banks, torch.zeros(batch_size, dtype=torch.long, device=device))

    @property
    def batch_size(self) -> int:
        return self.position.shape[0]

    @property
    def num_layers(self) -> int:
        return len(self.banks)

    # ------------------------------------------------------------------ transforms
    def map(self, fn) -> MemoryState:
        """A new state with `fn` applied to every floating-point tensor."""
        return MemoryState([bank.map(fn) for bank in self.banks], self.position)

    def detach(self) -> MemoryState:
        """Cut the autograd history (truncated backpropagation through time)."""
        return MemoryState([bank.map(torch.Tensor.detach) for bank in self.banks], self.position.detach())

    def clone(self) -> MemoryState:
        return MemoryState([bank.map(torch.Tensor.clone) for bank in self.banks], self.position.clone())

    def to(self, device=None, dtype=None) -> MemoryState:
        banks = [bank.map(lambda t: t.to(device=device, dtype=dtype)) for bank in self.banks]
        return MemoryState(banks, self.position.to(device=device))

    def reset(self, mask: torch.Tensor) -> MemoryState:
        """Return the rows where `mask` [B] is True to a fresh stream (zeros, position 0).

        Used at document boundaries. Works in place on this object (its tensors are replaced,
        not written into, so autograd graphs that hold the old tensors stay valid) and returns it.
        """
        mask = torch.as_tensor(mask, device=self.position.device)
        if mask.dtype != torch.bool or mask.shape != (self.batch_size,):
            raise ValueError(f"reset mask must be a bool tensor of shape [{self.batch_size}], "
                             f"got {mask.dtype} {tuple(mask.shape)}")

        def zero_rows(t: torch.Tensor) -> torch.Tensor:
            keep = ~mask.view(-1, *([1] * (t.dim() - 1)))
            return torch.where(keep, t, torch.zeros((), dtype=t.dtype, device=t.device))

        self.banks = [bank.map(zero_rows) for bank in self.banks]
        self.position = zero_rows(self.position)
        return self

    # ------------------------------------------------------------------ serialisation
    def state_dict(self) -> dict[str, torch.Tensor]:
        """Flat name -> tensor mapping (safetensors-compatible); bit-exact round trip."""
        out = {"position": self.position}
        for i, bank in enumerate(self.banks):
            for f in fields(bank):
                out[f"banks.{i}.{f.name}"] = getattr(bank, f.name)
        return out

    @classmethod
    def from_state_dict(cls, state_dict: dict[str, torch.Tensor]) -> MemoryState:
        if "position" not in state_dict:
            raise ValueError("memory state dict has no 'position' entry")
        num_layers = 1 + max((int(k.split(".")[1]) for k in state_dict if k.startswith("banks.")), default=-1)
        banks = []
        for i in range(num_layers):
            try:
                banks.append(MemoryBank(**{f: state_dict[f"banks.{i}.{f}"] for f in BANK_FIELDS}))
            except KeyError as err:
                raise ValueError(f"memory state dict is missing {err.args[0]!r}") from None
        return cls(banks, state_dict["position"])

    def __repr__(self) -> str:
        bank = self.banks[0] if self.banks else None
        shape = {f: tuple(getattr(bank, f).shape) for f in BANK_FIELDS} if bank is not None else {}
        return f"MemoryState(layers={self.num_layers}, position={self.position.tolist()}, bank_shapes={shape})"
