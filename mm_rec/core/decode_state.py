"""The carried state of a stream being decoded one token at a time: `MemoryState`'s tensors in the
decode layout, updated in place by `MMRecModel.step`.

    decode = DecodeState.from_memory_state(model(prompt).state, model.config)   # copies
    logits = model.step(next_ids, decode)                                        # [B] -> [B, V], in place
    decode.to_memory_state()   # the documented layout again (a copy): forward(..., state=...) continues
    decode.state_dict()        # = decode.to_memory_state().state_dict()

Same tensors and shapes as the documented layout (docs/architecture.md, section 3), with
three pieces ordered so that a step writes only what changes (mm_rec/core/hds.py, "decode layout"):
the window is a ring (the token at position p at index p mod W), the ring's age part holds sub-slot
id s at index P + s mod R, and the kept part is in no particular order. Both orders follow from the
position, so the conversions need nothing else; they cost O(state) and run once per prompt, not
per token.

Dtypes: the documented layout's, but for the window's and the ring's keys and values (the *entries*),
which `entry_dtype` may narrow, e.g. to bf16 for bf16 weights (`MMRecModel.decode_entry_dtype`): the
segment forward reads them in the weights' dtype anyway (its attention casts them to the queries'),
and they are most of the bytes a step reads (at the 7b preset 42 of 58 MB a layer in fp32). The
recurrence, the delta memory and the pooling sums, which accumulate, stay in the state's dtype.
"""

from __future__ import annotations

import dataclasses

import torch

from mm_rec.config import MMRecConfig
from mm_rec.core.hds import from_decode_layout, to_decode_layout
from mm_rec.core.memory_state import LayerState, LayerStates, MemoryState


class DecodeState(LayerStates):
    """Per-layer `LayerState`s in the decode layout plus the stream position of every row [B] (int64).

    `MMRecModel.step` updates every tensor in place (their storage never changes), so a CUDA graph
    captured on one step replays on the next."""

    def __init__(self, layers: list[LayerState], position: torch.Tensor, config: MMRecConfig):
        super().__init__(layers, position)
        self.config = config

    @classmethod
    def from_memory_state(cls, state: MemoryState, config: MMRecConfig,
                          entry_dtype: torch.dtype | None = None) -> DecodeState:
        """A copy of `state` (documented layout) in the decode layout, the window's and the ring's keys and
        values in `entry_dtype` (None: the state's own dtype; module docstring)."""
        position = state.position.clone()
        layers = [_with_entries(to_decode_layout(layer, position, config), entry_dtype) for layer in state.layers]
        return cls(layers, position, config)

    @property
    def entry_dtype(self) -> torch.dtype:
        """The dtype of the window's and the ring's keys and values."""
        return self.layers[0].slot_keys.dtype

    def to_memory_state(self) -> MemoryState:
        """A copy in the documented layout (what `forward(..., state=...)` reads), every floating-point
        piece in the state's dtype (narrower entries widened)."""
        layers = [from_decode_layout(layer, self.position, self.config) for layer in self.layers]
        layers = [_with_entries(layer, layer.block_key_sum.dtype) for layer in layers]
        return MemoryState(layers, self.position.clone())

    def load_(self, state: MemoryState) -> DecodeState:
        """Overwrite this state's tensors (in place: captured graphs stay valid) with `state` (documented
        layout, same batch size and config). Returns self."""
        if state.batch_size != self.batch_size or state.num_layers != len(self.layers):
            raise ValueError(f"state is for batch {state.batch_size} x {state.num_layers} layers, this decode "
                             f"state for batch {self.batch_size} x {len(self.layers)}")
        for mine, theirs in zip(self.layers, state.layers):
            converted = to_decode_layout(theirs, state.position, self.config).tensors()
            for name, tensor in mine.tensors().items():
                tensor.copy_(converted[name])
        self.position.copy_(state.position)
        return self

    def state_dict(self) -> dict[str, torch.Tensor]:
        """`MemoryState.state_dict` of the documented layout (a copy)."""
        return self.to_memory_state().state_dict()

    def __repr__(self) -> str:
        return f"DecodeState(layers={self.num_layers}, position={self.position.tolist()})"


ENTRIES = ("window_keys", "window_values", "slot_keys", "slot_values")  # the pieces `entry_dtype` applies to


def _with_entries(layer: LayerState, dtype: torch.dtype | None) -> LayerState:
    """`layer` with its entries (ENTRIES) in `dtype` (None: as they are)."""
    if dtype is None:
        return layer
    return dataclasses.replace(layer, **{name: getattr(layer, name).to(dtype) for name in ENTRIES
                                         if getattr(layer, name) is not None})
