"""Measuring training: wall time (CUDA events), per-block times, FLOPs, MFU and peak memory.

MFU, model FLOPs utilisation, as the benchmarks report it:

    MFU = F_step / (t_step * P_peak)        per GPU, equal to the global ratio

* F_step: the FLOPs one training step needs by the model's math on this GPU's batch, forward
  plus backward, taken as 3 x F_fwd (the backward of a matmul is two matmuls of the forward's
  size). F_fwd is counted by `torch.utils.flop_counter.FlopCounterMode` over one forward of
  that batch: matmuls, attention (the whole T x T score matrix, as FlopCounterMode counts
  SDPA: causal masking is not discounted, the usual convention) and this package's recurrence
  kernel (2 B T H d^2: `mm_rec.ops.recurrence.forward_flops`, registered below). Activation
  recomputation is not counted: with checkpointing the GPU executes more than F_step (that
  ratio would be the hardware FLOPs utilisation). For a Transformer this gives the familiar
  6 N + 12 L T D FLOPs per token.
* t_step: wall time of one whole step (forward, backward, communication, optimizer).
* P_peak: the GPU's dense bf16 tensor-core peak (`PEAK_BF16_TFLOPS`: H100 SXM and H200 989
  TFLOP/s), or a measured matmul rate (`measure_matmul_flops`) for an achievable ceiling.
"""

from __future__ import annotations

import functools
import json
import resource
import statistics
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import (
    FlopCounterMode,
    flop_registry,
    register_flop_formula,
    sdpa_backward_flop_count,
    sdpa_flop_count,
)

# Dense bf16 tensor-core peak per GPU in TFLOP/s (vendor data sheets, without sparsity), matched
# in order against the device name.
PEAK_BF16_TFLOPS: tuple[tuple[str, float], ...] = (
    ("H100 PCIe", 756.0),
    ("H100", 989.0),  # SXM
    ("H200", 989.0),
    ("A100", 312.0),
)


def peak_flops_per_second(device: torch.device | str | None = None) -> float | None:
    """Dense bf16 peak FLOP/s of a CUDA device from `PEAK_BF16_TFLOPS`; None if unknown or CPU."""
    device = torch.device(device) if device is not None else None
    if not torch.cuda.is_available() or (device is not None and device.type != "cuda"):
        return None
    name = torch.cuda.get_device_name(device)
    for key, tflops in PEAK_BF16_TFLOPS:
        if key in name:
            return tflops * 1e12
    return None


def measure_matmul_flops(n: int = 8192, dtype: torch.dtype = torch.bfloat16, device: torch.device | str = "cuda",
                         iters: int = 20) -> float:
    """Achieved FLOP/s of an n x n x n matmul on random data (a reachable peak for MFU)."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    ms = time_fn(lambda: a @ b, warmup=3, iters=iters).median_ms
    return 2 * n**3 / (ms * 1e-3)


def mfu(step_flops: float, step_seconds: float, peak_flops: float) -> float:
    """Model FLOPs utilisation: step_flops / step_seconds / peak_flops (all per GPU)."""
    return step_flops / step_seconds / peak_flops


def training_step_flops(forward_flops: float) -> float:
    """FLOPs of forward + backward from the forward's count (backward = 2 x forward)."""
    return 3 * forward_flops


# ---------------------------------------------------------------------------------- FLOPs
def count_flops(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> tuple[Any, int]:
    """Run fn(*args, **kwargs) under FlopCounterMode; returns (its result, FLOPs counted).

    Only operations with a FLOP formula count (matmuls, convolutions, attention, this
    package's recurrence kernel); element-wise work counts zero.
    """
    _register_extra_formulas()
    counter = FlopCounterMode(display=False)
    with counter:
        result = fn(*args, **kwargs)
    return result, counter.get_total_flops()


@functools.cache
def _register_extra_formulas() -> None:
    """FLOP formulas FlopCounterMode lacks: the fused recurrence operators (when loadable) and
    PyTorch's CPU flash attention."""
    from mm_rec.ops import recurrence, triton_available

    if triton_available():
        import mm_rec.ops.recurrence.triton_kernels  # noqa: F401  (defines torch.ops.mm_rec.*)

        @register_flop_formula(torch.ops.mm_rec.recurrence_fwd)
        def _recurrence_fwd_flop(z_shape, *args, out_shape=None, **kwargs) -> int:
            return recurrence.forward_flops(*z_shape)

        @register_flop_formula(torch.ops.mm_rec.recurrence_bwd)
        def _recurrence_bwd_flop(dh_shape, *args, out_shape=None, **kwargs) -> int:
            return recurrence.backward_flops(*dh_shape)

    aten = torch.ops.aten
    if aten._scaled_dot_product_flash_attention_for_cpu not in flop_registry:
        @register_flop_formula(aten._scaled_dot_product_flash_attention_for_cpu)
        def _sdpa_cpu_flop(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
            return sdpa_flop_count(query_shape, key_shape, value_shape)

    if aten._scaled_dot_product_flash_attention_for_cpu_backward not in flop_registry:
        @register_flop_formula(aten._scaled_dot_product_flash_attention_for_cpu_backward)
        def _sdpa_cpu_backward_flop(grad_out_shape, query_shape, key_shape, value_shape, *args,
                                    out_shape=None, **kwargs) -> int:
            return sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


# ---------------------------------------------------------------------------------- time
@dataclass
class Timing:
    """Milliseconds per call over `times_ms` (one entry per timed call)."""

    times_ms: list[float]

    @property
    def median_ms(self) -> float:
        return statistics.median(self.times_ms)

    @property
    def mean_ms(self) -> float:
        return statistics.fmean(self.times_ms)


class _Stamp:
    """A point in time: a recorded CUDA event on CUDA (no sync), perf_counter on CPU."""

    def __init__(self, cuda: bool):
        if cuda:
            self.event = torch.cuda.Event(enable_timing=True)
            self.event.record()
        else:
            self.event, self.seconds = None, time.perf_counter()

    def ms_until(self, later: _Stamp) -> float:
        if self.event is not None:
            return self.event.elapsed_time(later.event)
        return (later.seconds - self.seconds) * 1e3


def time_fn(fn: Callable[[], Any], warmup: int = 3, iters: int = 10, cuda: bool | None = None) -> Timing:
    """Time `iters` calls of fn() after `warmup` untimed calls. On CUDA each call is bracketed by
    events on the current stream and the device is synchronised once per call, so the time is
    the GPU's time for the work fn launched (CPU launch overhead shows only when it is the
    bottleneck). `cuda` defaults to torch.cuda.is_available()."""
    cuda = torch.cuda.is_available() if cuda is None else cuda
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        start = _Stamp(cuda)
        fn()
        end = _Stamp(cuda)
        if cuda:
            torch.cuda.synchronize()
        times.append(start.ms_until(end))
    return Timing(times)


@dataclass
class BlockTime:
    forward_ms: float
    backward_ms: float
    forward_calls: int


class BlockTimer:
    """Per-block forward and backward time, from CUDA events (or perf_counter on CPU) recorded
    by hooks; nothing synchronises until `summary()`.

        with BlockTimer(model.blocks) as timer:
            model(ids, labels=labels).loss.backward()
        for i, t in enumerate(timer.summary()): print(i, t.forward_ms, t.backward_ms)

    Forward: from the block's call to its return (every call, recomputations in backward
    included). Backward: from the gradient reaching the block's output to the gradient of its
    input being complete (recomputation under activation checkpointing included). The first
    tensor argument and the first tensor output (or the output itself) are taken as the
    block's input and output; times sum over everything recorded since entry.
    """

    def __init__(self, blocks: Iterable[nn.Module], cuda: bool | None = None):
        self.blocks = list(blocks)
        self.cuda = torch.cuda.is_available() if cuda is None else cuda
        n = len(self.blocks)
        self._forward: list[list[tuple[_Stamp, _Stamp]]] = [[] for _ in range(n)]
        self._backward: list[list[tuple[_Stamp, _Stamp]]] = [[] for _ in range(n)]
        self._forward_started: list[list[_Stamp]] = [[] for _ in range(n)]
        self._backward_started: list[list[_Stamp]] = [[] for _ in range(n)]
        self._handles: list[Any] = []

    def __enter__(self) -> BlockTimer:
        for i, block in enumerate(self.blocks):
            self._handles.append(block.register_forward_pre_hook(functools.partial(self._pre_forward, i)))
            self._handles.append(block.register_forward_hook(functools.partial(self._post_forward, i)))
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _pre_forward(self, i: int, module: nn.Module, args: tuple) -> None:
        self._forward_started[i].append(_Stamp(self.cuda))
        x = next((a for a in args if isinstance(a, torch.Tensor)), None)
        if x is not None and x.requires_grad:
            x.register_hook(functools.partial(self._input_grad_ready, i))

    def _post_forward(self, i: int, module: nn.Module, args: tuple, output: Any) -> None:
        self._forward[i].append((self._forward_started[i].pop(), _Stamp(self.cuda)))
        y = output if isinstance(output, torch.Tensor) else next(
            (o for o in output if isinstance(o, torch.Tensor)), None)
        if y is not None and y.requires_grad:
            y.register_hook(functools.partial(self._output_grad_arrived, i))

    def _output_grad_arrived(self, i: int, grad: torch.Tensor) -> None:
        self._backward_started[i].append(_Stamp(self.cuda))

    def _input_grad_ready(self, i: int, grad: torch.Tensor) -> None:
        # Hooks registered on inputs during a recomputation never fire; a real one closes the
        # most recent backward of this block.
        if self._backward_started[i]:
            self._backward[i].append((self._backward_started[i].pop(), _Stamp(self.cuda)))

    def summary(self) -> list[BlockTime]:
        """Totals per block since entry (synchronises the device)."""
        if self.cuda:
            torch.cuda.synchronize()
        out = []
        for fwd, bwd in zip(self._forward, self._backward):
            out.append(BlockTime(
                forward_ms=sum(a.ms_until(b) for a, b in fwd),
                backward_ms=sum(a.ms_until(b) for a, b in bwd),
                forward_calls=len(fwd),
            ))
        return out


# ---------------------------------------------------------------------------------- memory
def reset_peak_memory(device: torch.device | str) -> None:
    """Start a new high-water mark (CUDA; on CPU the process's maximum RSS cannot be reset)."""
    if torch.device(device).type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


@dataclass
class PeakMemory:
    """GiB. On CUDA: tensors allocated and memory reserved by the caching allocator at their
    highest since the last reset. On CPU both are the process's maximum resident set size."""

    allocated_gib: float
    reserved_gib: float


def peak_memory(device: torch.device | str) -> PeakMemory:
    if torch.device(device).type == "cuda":
        return PeakMemory(torch.cuda.max_memory_allocated(device) / 2**30,
                          torch.cuda.max_memory_reserved(device) / 2**30)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
    return PeakMemory(rss, rss)


def kernel_profile(fn: Callable[[], Any], rows: int, title: str, copies: int = 0) -> str:
    """The `rows` kernels (device ops on CUDA, CPU ops elsewhere) with the most self time over one call
    of fn, which the caller has warmed up, as torch.profiler's table under a `--- profile: title` line.
    Kernels replayed from a captured CUDA graph are listed by name like launched ones. With `copies`,
    also the `copies` call sites (Python stacks) of eager copies and casts (`aten::copy_`) with the most
    time: what a profile's copy rows are, which the kernel table cannot say."""
    from torch.profiler import ProfilerActivity, profile

    cuda = torch.cuda.is_available()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities, with_stack=bool(copies), record_shapes=bool(copies)) as prof:
        fn()
        if cuda:
            torch.cuda.synchronize()
    sort_by = "self_cuda_time_total" if cuda else "self_cpu_time_total"
    table = prof.key_averages().table(sort_by=sort_by, row_limit=rows, max_name_column_width=70)
    report = f"--- profile: {title}\n{table}"
    if copies:
        report += "\n" + _copy_sites(prof, copies, cuda)
    return report


def _call_site(event) -> str:
    """The innermost three frames of this package above a profiler event (the Python function events
    among its ancestors), else the autograd node or outermost op it ran under (the backward runs
    without a Python stack)."""
    node, outermost, frames = event, event, []
    while node is not None:
        if "mm_rec/" in node.name or "benchmarks/" in node.name:
            frames.append(node.name.split("/work/")[-1].split("mm_rec/", 1)[-1])
        elif not frames and ("autograd::engine" in node.name or "Backward" in node.name):
            return node.name
        outermost, node = node, node.cpu_parent
    return " < ".join(frames[:3]) if frames else outermost.name


def _copy_sites(prof, rows: int, cuda: bool) -> str:
    """The `rows` (call site, shape) groups of aten::copy_ with the most self time, one line each: ms,
    calls, the input shapes and the innermost frames of this package."""
    sites: dict[tuple[str, str], list[float]] = {}
    for event in prof.events():
        if event.name != "aten::copy_":
            continue
        key = (_call_site(event), str(event.input_shapes[:2]))
        time_us = event.self_device_time_total if cuda else event.self_cpu_time_total
        entry = sites.setdefault(key, [0.0, 0])
        entry[0] += time_us
        entry[1] += 1
    top = sorted(sites.items(), key=lambda item: -item[1][0])[:rows]
    lines = [f"--- copies by call site ({'device' if cuda else 'CPU'} ms, calls, shapes, frames)"]
    lines += [f"{t / 1e3:8.3f} ms {n:4d}x  {shapes}  {frames}" for (frames, shapes), (t, n) in top]
    return "\n".join(lines)


def print_report(header: str, table: str, results: Any, json_path: str | None = None) -> None:
    """A benchmark's report: its header (device, date, command) and markdown table on stdout, and with
    `json_path` the header and the raw results as JSON."""
    print("\n" + header)
    print(table)
    if json_path:
        with open(json_path, "w") as f:
            json.dump({"header": header, "results": results}, f, indent=2)
