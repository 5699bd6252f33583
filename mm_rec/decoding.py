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

The first `warmup` calls run eagerly on a side stream (they are real steps: the state advances),
the next call captures the graph and replays it, every later call copies the tokens into the
graph's input and replays. The logits returned on CUDA are the graph's output buffer: the next
call overwrites them. On the CPU, under autocast (whose weight casts a graph would capture by
address), or with `cuda_graph=False`, every call is a plain eager step: the same math.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from mm_rec.core.decode_state import DecodeState

StepFunction = Callable[[torch.Tensor, DecodeState], torch.Tensor]


class StepRunner:
    """Runs `model._step(tokens, state)` (see the module docstring). `compile=True` also passes the step
    through torch.compile (kernel fusion; the first calls compile) before the graph captures it."""

    def __init__(self, model: torch.nn.Module, state: DecodeState, cuda_graph: bool | None = None,
                 compile: bool = False, warmup: int = 2):
        self.state = state
        device = state.position.device
        autocast = torch.is_autocast_enabled(device.type)
        self.cuda_graph = (device.type == "cuda" and not autocast) if cuda_graph is None else cuda_graph
        if self.cuda_graph and device.type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA device, the state is on {device}")
        self.step_fn: StepFunction = torch.compile(model._step, dynamic=False) if compile else model._step
        self.warmup = warmup
        self.calls = 0
        self.graph: torch.cuda.CUDAGraph | None = None
        self._tokens: torch.Tensor | None = None  # the graph's input [B] and output [B, V]
        self._logits: torch.Tensor | None = None

    @torch.inference_mode()
    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [B] (the token at each row's position) -> logits [B, V] of the next; the state
        advances by one token."""
        self.calls += 1
        if not self.cuda_graph:
            return self.step_fn(tokens, self.state)
        if self._tokens is None:
            # one static input for the warm-up steps and the capture alike: a compiled step is guarded on
            # its input's strides (a column of a [B, T] prompt is strided), and a recompilation inside
            # the capture would fail
            self._tokens = torch.empty(tokens.shape, dtype=tokens.dtype, device=tokens.device)
        self._tokens.copy_(tokens)
        if self.graph is None:
            if self.calls <= self.warmup:
                return self._side_stream_step()
            self._capture()
        self.graph.replay()
        return self._logits

    def _side_stream_step(self) -> torch.Tensor:
        """An eager step on a side stream (as before a capture: lazy initialisations, compilation)."""
        main = torch.cuda.current_stream()
        side = torch.cuda.Stream(device=main.device)
        side.wait_stream(main)
        with torch.cuda.stream(side):
            logits = self.step_fn(self._tokens, self.state)
        main.wait_stream(side)
        return logits

    def _capture(self) -> None:
        """Record one step on the static input and output buffers; capturing runs nothing."""
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self._logits = self.step_fn(self._tokens, self.state)
        self.graph = graph
