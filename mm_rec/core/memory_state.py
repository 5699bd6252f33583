"""The recurrent state that MM-Rec carries across segments, batches and generated tokens.

Layout (B batch rows, H heads, d head dim, K banks, m mem_dim, S memory_size_M, C chunk_size,
r slots_per_block, W window_size, k = conv_size, P = kept slots; docs/architecture.md):

    MemoryState
      position              [B] int64     absolute stream position of each row (tokens consumed)
      layers[l]             LayerState of layer l:
        h                   [B, H, d]     level 0: the exact recurrence state h_T
        conv_tail           [B, k-1, 3Km] the last k-1 inputs of the short convolution (k > 1)
        window_keys         [B, K, W, m]  level 0: keys / values of the last W tokens, oldest
        window_values       [B, K, W, m]    first (entries before the stream's start are unused)
        block_key_sum       [B, K, r, m]  level 1: the open block's pooling sums per sub-slot:
        block_value_sum     [B, K, r, m]    sum_t w_t k_t, sum_t w_t v_t and (slot_write=attention)
        block_weight_sum    [B, K, r]       sum_t w_t over the tokens of the block consumed so far;
                                            with slot_write=mean w_t = 1 and the count follows from
                                            the position
        slot_keys           [B, K, S, m]  level 3, the long-term memory M: completed sub-slots;
        slot_values         [B, K, S, m]    [0, P) kept by importance, [P, S) the newest by age
        slot_ids            [B, K, P]     int64 id (block * r + sub-slot) of each kept slot, -1 empty
        slot_importance     [B, K, S]     learned importance of every ring slot
        aggregate           [B, K, m]     level 2 with level2=mean: decayed mean of the values
        delta_memory        [B, K, m, m]  level 2 with level2=delta: the matrix memory S_T

Pieces that a config switches off are None and absent from the state dict. Blocks sit at absolute
stream positions (block j covers positions [j*C, (j+1)*C)); the newest-by-age part of the ring
holds, in chronological order, the sub-slots of the (S - P) / r most recent completed blocks, so
its block indices follow from the position and nothing depends on where a segment starts: any
split of a stream gives the same state.

Floating-point state is fp32 (float64 for a float64 model); every row is independent, so rows
may sit at different positions and `reset(mask)` returns some of them to a fresh stream.
"""

from __future__ import annotations

from dataclasses import MISSING, dataclass, fields

import torch

LAYER_FIELDS = ("h", "conv_tail", "window_keys", "window_values", "block_key_sum", "block_value_sum",
                "block_weight_sum", "slot_keys", "slot_values", "slot_ids", "slot_importance", "aggregate",
                "delta_memory")
EMPTY_SLOT = -1  # slot_ids of a kept slot that holds nothing yet


@dataclass
class LayerState:
    """Everything one MM-Rec layer carries from one segment to the next (layout: module docstring)."""

    h: torch.Tensor
    block_key_sum: torch.Tensor
    block_value_sum: torch.Tensor
    slot_keys: torch.Tensor
    slot_values: torch.Tensor
    block_weight_sum: torch.Tensor | None = None
    conv_tail: torch.Tensor | None = None
    window_keys: torch.Tensor | None = None
    window_values: torch.Tensor | None = None
    slot_ids: torch.Tensor | None = None
    slot_importance: torch.Tensor | None = None
    aggregate: torch.Tensor | None = None
    delta_memory: torch.Tensor | None = None

    @classmethod
    def zeros(cls, config, batch_size: int, device=None, dtype=torch.float32) -> LayerState:
        """The state of a fresh stream for one layer of `config` (an MMRecConfig)."""
        def z(*shape):
            return torch.zeros(*shape, device=device, dtype=dtype)

        B, K, m, S, r = batch_size, config.num_memories, config.mem_dim, config.memory_size_M, config.slots_per_block
        W, P, k = config.window_size, config.kept_slots, config.conv_size
        return cls(
            h=z(B, config.num_heads, config.head_dim),
            conv_tail=z(B, k - 1, 3 * K * m) if k > 1 else None,
            window_keys=z(B, K, W, m) if W else None,
            window_values=z(B, K, W, m) if W else None,
            block_key_sum=z(B, K, r, m), block_value_sum=z(B, K, r, m),
            block_weight_sum=z(B, K, r) if config.slot_write == "attention" else None,
            slot_keys=z(B, K, S, m), slot_values=z(B, K, S, m),
            slot_ids=torch.full((B, K, P), EMPTY_SLOT, device=device, dtype=torch.long) if P else None,
            slot_importance=z(B, K, S) if P else None,
            aggregate=z(B, K, m) if config.level2 == "mean" else None,
            delta_memory=z(B, K, m, m) if config.level2 == "delta" else None,
        )

    def tensors(self) -> dict[str, torch.Tensor]:
        """The pieces that are present, by name."""
        return {f: getattr(self, f) for f in LAYER_FIELDS if getattr(self, f) is not None}

    def map(self, fn, floating_only: bool = False) -> LayerState:
        """A new LayerState with `fn` applied to every piece (with `floating_only`, to the
        floating-point pieces; integer ones such as slot_ids are kept as they are)."""
        return LayerState(**{f: t if floating_only and not t.is_floating_point() else fn(t)
                             for f, t in self.tensors().items()})


MemoryBank = LayerState  # the seeds' name, kept public: one layer's state (all K banks)


class LayerStates:
    """Per-layer `LayerState`s plus the stream position of every batch row [B] (int64): what the
    documented layout (`MemoryState`) and the decode layout (`DecodeState`) share."""

    def __init__(self, layers: list[LayerState], position: torch.Tensor):
        self.layers = list(layers)
        self.position = position

    @property
    def batch_size(self) -> int:
        return self.position.shape[0]

    @property
    def num_layers(self) -> int:
        return len(self.layers)


class MemoryState(LayerStates):
    """Per-layer `LayerState`s plus the stream position of every batch row."""

    # ------------------------------------------------------------------ construction
    @classmethod
    def zeros(cls, config, batch_size: int, device=None, dtype=torch.float32) -> MemoryState:
        layers = [LayerState.zeros(config, batch_size, device=device, dtype=dtype) for _ in range(config.num_layers)]
        return cls(layers, torch.zeros(batch_size, dtype=torch.long, device=device))

    @property
    def banks(self) -> list[LayerState]:
        """The layers' states under their earlier name."""
        return self.layers

    # ------------------------------------------------------------------ transforms
    def map(self, fn) -> MemoryState:
        """A new state with `fn` applied to every floating-point tensor."""
        return MemoryState([layer.map(fn, floating_only=True) for layer in self.layers], self.position)

    def detach(self) -> MemoryState:
        """Cut the autograd history (truncated backpropagation through time)."""
        return MemoryState([layer.map(torch.Tensor.detach) for layer in self.layers], self.position.detach())

    def clone(self) -> MemoryState:
        return MemoryState([layer.map(torch.Tensor.clone) for layer in self.layers], self.position.clone())

    def to(self, device=None, dtype=None) -> MemoryState:
        layers = [layer.map(lambda t: t.to(device=device, dtype=dtype if t.is_floating_point() else None))
                  for layer in self.layers]
        return MemoryState(layers, self.position.to(device=device))

    def select_rows(self, rows: slice | torch.Tensor) -> MemoryState:
        """The state of the batch rows `rows`: a slice (views of this state's tensors) or an int64
        index [n] (copies, in that order)."""
        if isinstance(rows, slice):
            return MemoryState([layer.map(lambda t: t[rows]) for layer in self.layers], self.position[rows])
        return MemoryState([layer.map(lambda t: t.index_select(0, rows)) for layer in self.layers],
                           self.position.index_select(0, rows))

    @classmethod
    def cat_rows(cls, states: list[MemoryState]) -> MemoryState:
        """States of consecutive row groups joined into one (the inverse of `select_rows` over a partition)."""
        parts = [state.state_dict() for state in states]
        return cls.from_state_dict({name: torch.cat([part[name] for part in parts]) for name in parts[0]})

    def with_rows(self, index: torch.Tensor, other: MemoryState) -> MemoryState:
        """A new state: this one with rows `index` [n] replaced by the n rows of `other`."""
        layers = [LayerState(**{f: t.index_copy(0, index, getattr(o, f)) for f, t in layer.tensors().items()})
                  for layer, o in zip(self.layers, other.layers)]
        return MemoryState(layers, self.position.index_copy(0, index, other.position))

    def reset(self, mask: torch.Tensor) -> MemoryState:
        """Return the rows where `mask` [B] is True to a fresh stream (zeros, position 0).

        Used at document boundaries. Works in place on this object (its tensors are replaced,
        not written into, so autograd graphs that hold the old tensors stay valid) and returns it.
        """
        mask = torch.as_tensor(mask, device=self.position.device)
        if mask.dtype != torch.bool or mask.shape != (self.batch_size,):
            raise ValueError(f"reset mask must be a bool tensor of shape [{self.batch_size}], "
                             f"got {mask.dtype} {tuple(mask.shape)}")

        def fresh_rows(t: torch.Tensor, fresh: float | int = 0) -> torch.Tensor:
            keep = ~mask.view(-1, *([1] * (t.dim() - 1)))
            return torch.where(keep, t, torch.full((), fresh, dtype=t.dtype, device=t.device))

        def reset_layer(layer: LayerState) -> LayerState:
            values = {f: fresh_rows(t, EMPTY_SLOT if f == "slot_ids" else 0) for f, t in layer.tensors().items()}
            return LayerState(**values)

        self.layers = [reset_layer(layer) for layer in self.layers]
        self.position = fresh_rows(self.position)
        return self

    # ------------------------------------------------------------------ serialisation
    def state_dict(self) -> dict[str, torch.Tensor]:
        """Flat name -> tensor mapping (safetensors-compatible); bit-exact round trip."""
        out = {"position": self.position}
        for i, layer in enumerate(self.layers):
            for name, tensor in layer.tensors().items():
                out[f"banks.{i}.{name}"] = tensor
        return out

    @classmethod
    def from_state_dict(cls, state_dict: dict[str, torch.Tensor]) -> MemoryState:
        """Inverse of `state_dict`. Also reads the dicts of the first layout (version 1 configs), whose
        partial-block sums [B, K, m] are one sub-slot."""
        if "position" not in state_dict:
            raise ValueError("memory state dict has no 'position' entry")
        num_layers = 1 + max((int(k.split(".")[1]) for k in state_dict if k.startswith("banks.")), default=-1)
        required = {f.name for f in fields(LayerState) if f.default is MISSING}
        layers = []
        for i in range(num_layers):
            values = {f: state_dict[f"banks.{i}.{f}"] for f in LAYER_FIELDS if f"banks.{i}.{f}" in state_dict}
            missing = sorted(required - set(values))
            if missing:
                raise ValueError(f"memory state dict is missing 'banks.{i}.{missing[0]}'")
            if values["block_key_sum"].dim() == 3:  # version 1: one sub-slot, weights implied
                values["block_key_sum"] = values["block_key_sum"].unsqueeze(2)
                values["block_value_sum"] = values["block_value_sum"].unsqueeze(2)
            layers.append(LayerState(**values))
        return cls(layers, state_dict["position"])

    def __repr__(self) -> str:
        layer = self.layers[0] if self.layers else None
        shape = {f: tuple(t.shape) for f, t in layer.tensors().items()} if layer is not None else {}
        return f"MemoryState(layers={self.num_layers}, position={self.position.tolist()}, layer_shapes={shape})"
