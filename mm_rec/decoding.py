"""The decoding loop's engine: `StepRunner` runs `MMRecModel.step` on a `DecodeState`, on a CUDA
device as one captured CUDA graph per token (the capture path of `generate`).

    runner = StepRunner(model, DecodeState.from_memory_state(prefill_state, model.config))
    logits = runner.step(tokens)      # [B] -> [B, V]; on CUDA a graph replay after the warm-up steps

Why a graph: a step is a few hundred small kernels per token (16 layers of projections, the
recurrence, the window, the ring and the delta rule); launched one by one from Python they cost
~40 ms per token for the 1b preset, while the weights take ~0.5 ms to stream from memory. A
captured graph launches them all at once. The step can be captured because it has static shapes,
no host synchronisation and no Python branch on tensor values, and writes its state in place
(`DecodeState`'s tensors keep their storage).

Two steps, two graphs: a token that closes its block (position + 1 a multiple of C, in some row) writes
the block's slots into the ring; the other C - 1 of every C tokens leave that part out
(`MMRecModel._step(..., close_blocks=False)`): fewer kernels per layer. The runner knows every row's
position on the host (read once when it starts; each step adds one), so choosing costs no sync.

The first `warmup` calls run the block-closing step (correct at any position) eagerly on a side stream
(they are real steps: the state advances), the next `warmup` calls that close no block run the other
step the same way; after its warm-up each step is captured the first time it is needed and replayed
after that (compiled first with `compile=True`, so the compilations happen in the warm-up). Every
replay copies the tokens into the graphs' shared input. The logits returned on CUDA are a graph's
output buffer: a later call of the same kind overwrites them. On the CPU, under autocast (whose weight
casts a graph would capture by address), or with `cuda_graph=False`, every call is a plain eager step
(the smaller one where it applies): the same math.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch

from mm_rec.core.decode_state import DecodeState

StepFunction = Callable[[torch.Tensor, DecodeState, bool], torch.Tensor]  # (tokens, state, close_blocks)


def closes_a_block(positions: list[int], chunk_size: int) -> bool:
    """Whether the token at `positions` (one per row) closes its block of `chunk_size` in any row."""
    return any((p + 1) % chunk_size == 0 for p in positions)


class StepRunner:
    """Runs `model._step(tokens, state, close_blocks)` (see the module docstring). `compile=True` also
    passes the blocks' step through torch.compile before the graphs capture it (kernel fusion within a
    layer): one block's step, compiled once per step kind in the warm-up and run for every layer, so the
    compilation does not grow with the depth (the whole model's step unrolled 16 or 24 layers). The
    runner advances `state`: nothing else may move its position while it runs."""

    def __init__(self, model: torch.nn.Module, state: DecodeState, cuda_graph: bool | None = None,
                 compile: bool = False, warmup: int = 2):
        self.state = state
        device = state.position.device
        autocast = torch.is_autocast_enabled(device.type)
        self.cuda_graph = (device.type == "cuda" and not autocast) if cuda_graph is None else cuda_graph
        if self.cuda_graph and device.type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA device, the state is on {device}")
        self.step_fn: StepFunction = model._step
        if compile:  # one block's step compiled, shared by every layer (identical blocks: one graph per kind)
            block_step = torch.compile(type(model.blocks[0]).step, dynamic=False)
            self.step_fn = functools.partial(model._step, block_step=block_step)
        self.chunk_size = model.config.chunk_size
        self.positions = state.position.tolist()  # every row's position on the host (one sync, here)
        self.warmup = warmup
        self.warm = {True: 0, False: 0}  # eager warm-up steps run, per kind (True: the block-closing step)
        self.graphs: dict[bool, torch.cuda.CUDAGraph] = {}
        self._logits: dict[bool, torch.Tensor] = {}  # each graph's output [B, V]
        self._tokens: torch.Tensor | None = None  # the graphs' input [B]

    @torch.inference_mode()
    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [B] (the token at each row's position) -> logits [B, V] of the next; the state
        advances by one token."""
        closing = closes_a_block(self.positions, self.chunk_size)
        self.positions = [p + 1 for p in self.positions]
        if not self.cuda_graph:
            return self.step_fn(tokens, self.state, closing)
        if self._tokens is None:
            # one static input for the warm-up steps and the captures alike: a compiled step is guarded on
            # its input's strides (a column of a [B, T] prompt is strided), and a recompilation inside
            # a capture would fail
            self._tokens = torch.empty(tokens.shape, dtype=tokens.dtype, device=tokens.device)
        self._tokens.copy_(tokens)
        kind = closing
        if kind not in self.graphs:
            if self.warm[True] < self.warmup:
                kind = True  # the block-closing step is right at any position: it warms up first
            if self.warm[kind] < self.warmup:
                self.warm[kind] += 1
                return self._side_stream_step(kind)
            self._capture(kind)
        self.graphs[kind].replay()
        return self._logits[kind]

    def _side_stream_step(self, close_blocks: bool) -> torch.Tensor:
        """An eager step on a side stream (as before a capture: lazy initialisations, compilation)."""
        main = torch.cuda.current_stream()
        side = torch.cuda.Stream(device=main.device)
        side.wait_stream(main)
        with torch.cuda.stream(side):
            logits = self.step_fn(self._tokens, self.state, close_blocks)
        main.wait_stream(side)
        return logits

    def _capture(self, close_blocks: bool) -> None:
        """Record one step of this kind on the static input and its output buffer; capturing runs nothing.
        Each graph keeps its own memory pool (a one-token step's intermediates are small), so neither
        replay can touch the other's output."""
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self._logits[close_blocks] = self.step_fn(self._tokens, self.state, close_blocks)
        self.graphs[close_blocks] = graph
