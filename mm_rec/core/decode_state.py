"""The carried state of a stream being decoded one token at a time: `MemoryState`'s tensors in the
decode layout, updated in place by `MMRecModel.step`.

    decode = DecodeState.from_memory_state(model(prompt).state, model.config)   # copies
    logits = model.step(next_ids, decode)                                        # [B] -> [B, V], in place
    decode.to_memory_state()   # the documented layout again (a copy): forward(..., state=...) continues
    decode.state_dict()        # = decode.to_memory_state().state_dict()

Same tensors, shapes and dtypes as the documented layout (docs/architecture.md, section 3), with
three pieces ordered so that a step writes only what changes (mm_rec/core/hds.py, "decode layout"):
the window is a ring (the token at position p at index p mod W), the ring's age part holds sub-slot
id s at index P + s mod R, and the kept part is in no particular order. Both orders follow from the
position, so the conversions need nothing else; they cost O(state) and run once per prompt, not
per token.
"""

from __future__ import annotations

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
    def from_memory_state(cls, state: MemoryState, config: MMRecConfig) -> DecodeState:
        """A copy of `state` (documented layout) in the decode layout."""
        position = state.position.clone()
        return cls([to_decode_layout(layer, position, config) for layer in state.layers], position, config)

    def to_memory_state(self) -> MemoryState:
        """A copy in the documented layout (what `forward(..., state=...)` reads)."""
        layers = [from_decode_layout(layer, self.position, self.config) for layer in self.layers]
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
