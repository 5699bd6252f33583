"""One MM-Rec layer against one Llama-style Transformer layer, forward and forward+backward.

docs/architecture.md, section 6: at D = 4096 an MM-Rec layer must be no slower than a Transformer layer with
FlashAttention at T = 2K (B = 4) and at least 2x faster at T = 32K (B = 1). Both layers are
built from the same preset (hidden_dim, num_heads, ffn_dim; MM-Rec adds its memory), with bf16
parameters and activations (as under FSDP's bf16 mixed precision), the MM-Rec recurrent state
in fp32 and its recurrence on the fused Triton kernel; the Transformer attends through
F.scaled_dot_product_attention(is_causal=True). Measured in the same run, on the same input:

  * forward (with autograd recording, as in training) and forward+backward, median ms;
  * FLOPs of forward+backward (FlopCounterMode; attention counts the whole T x T matrix) and
    the rate they were executed at;
  * peak memory of one forward+backward above the layer's parameters and input.

    python benchmarks/bench_layer.py [--preset 7b] [--shapes 4x2048,1x8192,1x32768]
                                     [--iters 10] [--warmup 3] [--compile] [--sdpa auto]
                                     [--profile 25] [--profile-copies 15] [--json results.json]

The MM-Rec layer runs in steady state: every piece of its carried state is filled (window,
ring, kept slots, delta memory; the stream position is 2 S blocks), as in every segment of a long
stream after its first 2 S blocks. `--profile N`
also prints, per layer and shape, the N GPU kernels that took the most time in one
forward+backward (torch.profiler), to see where the time goes; `--profile-copies N` with it, the N call
sites (Python stacks and shapes) of the eager copies and casts with the most time.

Prints a Markdown table (and the MM-Rec / Transformer time ratio per shape) at the end. A shape
that does not fit in memory is reported as OOM and the run goes on.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import json
import sys
import traceback

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from mm_rec import MMRecConfig
from mm_rec.baselines.transformer import rope_tables
from mm_rec.core.memory_state import MemoryState
from mm_rec.distributed import init_model_on_device
from mm_rec.loading import build_model
from mm_rec.utils.profiling import (
    count_flops,
    kernel_profile,
    peak_memory,
    print_report,
    reset_peak_memory,
    time_fn,
)

LAYERS = {"mmrec": "MM-Rec layer", "mmrec-torch-delta": "MM-Rec layer, delta rule's pass in torch",
          "mmrec-traced-delta": "MM-Rec layer, delta rule traced by the compiler",
          "transformer": "Transformer layer"}  # --layers name -> label
SDPA_BACKENDS = {
    "flash": [SDPBackend.FLASH_ATTENTION],
    "cudnn": [SDPBackend.CUDNN_ATTENTION],
    "efficient": [SDPBackend.EFFICIENT_ATTENTION],
}


def parse_shapes(text: str) -> list[tuple[int, int]]:
    shapes = []
    for item in text.split(","):
        try:
            batch, seq = (int(v) for v in item.lower().split("x"))
        except ValueError:
            raise SystemExit(f"--shapes: {item!r} is not BxT (e.g. 4x2048)") from None
        shapes.append((batch, seq))
    return shapes


def build_layer(kind: str, config: MMRecConfig, device: str) -> torch.nn.Module:
    """Block 0 of a one-layer model, initialised as in training, with bf16 parameters."""
    model_type = "transformer" if kind == "transformer" else "mmrec"
    model = init_model_on_device(lambda: build_model(config.replace(num_layers=1), model_type), device)
    block = model.blocks[0].to(torch.bfloat16)
    if kind == "mmrec-torch-delta":  # the same-run reference for the delta rule's Triton pass
        block.mixer.hds.delta_backend = "torch"
    return block


def layer_inputs(kind: str, config: MMRecConfig, batch: int, seq: int, device: str) -> tuple:
    """The positional arguments of the layer's forward; the first, x [B, T, D] bf16, needs grad."""
    x = torch.randn(batch, seq, config.hidden_dim, device=device, dtype=torch.bfloat16, requires_grad=True)
    if kind != "transformer":
        return (x, *steady_state(config, batch, device))
    cos, sin = rope_tables(seq, config.head_dim, x.device)
    return x, cos, sin


def steady_state(config: MMRecConfig, batch: int, device: str) -> tuple:
    """(layer state, position) of a stream deep into a document: every piece of the state filled
    (window, ring, kept slots with distinct old ids, delta memory), 2 * S blocks consumed."""
    state = MemoryState.zeros(config.replace(num_layers=1), batch, device=device).layers[0]  # fp32
    for name, tensor in state.tensors().items():
        if tensor.is_floating_point():
            tensor.normal_(0.0, 1.0 / config.mem_dim ** 0.5 if name == "delta_memory" else 1.0)
    blocks = 2 * max(1, config.memory_size_M // config.slots_per_block)
    if state.slot_ids is not None:  # ids of blocks older than the newest-by-age part, distinct
        old = blocks - config.recent_slots // config.slots_per_block
        ids = torch.randperm(old * config.slots_per_block, device=device)[: state.slot_ids.shape[-1]]
        state.slot_ids.copy_(ids.expand_as(state.slot_ids))
    if state.block_weight_sum is not None:
        state.block_weight_sum.fill_(1.0)
    position = torch.full((batch,), blocks * config.chunk_size, dtype=torch.long, device=device)
    return state, position


def measure(kind: str, config: MMRecConfig, batch: int, seq: int, args: argparse.Namespace) -> dict:
    # mmrec-traced-delta: what MMREC_TRACE_DELTA_RULE=1 sets, for this layer's compile and runs only
    with _delta_rule_traced(kind == "mmrec-traced-delta"):
        return _measure(kind, config, batch, seq, args)


@contextlib.contextmanager
def _delta_rule_traced(traced: bool):
    from mm_rec.ops.delta_rule import reference

    before, reference.TRACE_UNDER_COMPILE = reference.TRACE_UNDER_COMPILE, traced or reference.TRACE_UNDER_COMPILE
    try:
        yield
    finally:
        reference.TRACE_UNDER_COMPILE = before


def _measure(kind: str, config: MMRecConfig, batch: int, seq: int, args: argparse.Namespace) -> dict:
    cuda = args.device == "cuda"
    layer = build_layer(kind, config, args.device)
    inputs = layer_inputs(kind, config, batch, seq, args.device)
    x = inputs[0]
    dy = torch.randn_like(x)
    params = list(layer.parameters())

    def forward() -> torch.Tensor:
        out = layer(*inputs)
        return out[0] if isinstance(out, tuple) else out

    def forward_backward() -> None:
        for tensor in [x, *params]:
            tensor.grad = None
        torch.autograd.backward([forward()], [dy])

    _, flops = count_flops(forward_backward)  # before compiling: compiled kernels are not counted
    if args.compile:
        layer.compile(dynamic=False)  # one static graph per shape (see apply_compile)
    fwd = time_fn(forward, warmup=args.warmup, iters=args.iters, cuda=cuda)
    both = time_fn(forward_backward, warmup=args.warmup, iters=args.iters, cuda=cuda)
    if args.profile:
        print(kernel_profile(forward_backward, args.profile, f"{kind} {batch}x{seq} (one forward+backward)",
                             copies=args.profile_copies), flush=True)
    peak_gib = None
    if cuda:
        for tensor in [x, *params]:
            tensor.grad = None
        gc.collect()
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        reset_peak_memory("cuda")
        forward_backward()
        torch.cuda.synchronize()
        peak_gib = peak_memory("cuda").allocated_gib - base / 2**30
    return {
        "layer": kind, "batch": batch, "seq_len": seq,
        "params": sum(p.numel() for p in params),
        "forward_ms": fwd.median_ms, "forward_backward_ms": both.median_ms,
        "flops_forward_backward": flops,
        "tflops_per_s": flops / (both.median_ms * 1e-3) / 1e12,
        "peak_gib": peak_gib,
    }


def run_one(kind: str, config: MMRecConfig, batch: int, seq: int, args: argparse.Namespace) -> dict:
    """`measure`, with a failure (out of memory; a compiler error) recorded as the row instead of raised, so
    the other layers of the run still report; memory freed after."""
    try:
        result = measure(kind, config, batch, seq, args)
    except torch.cuda.OutOfMemoryError:
        result = {"layer": kind, "batch": batch, "seq_len": seq, "error": "OOM"}
    except Exception as err:  # noqa: BLE001 - the row says what failed; the traceback goes to stderr
        traceback.print_exc()
        first_line = (str(err).splitlines() or [""])[0][:120]
        result = {"layer": kind, "batch": batch, "seq_len": seq, "error": f"{type(err).__name__}: {first_line}"}
    gc.collect()  # the failed attempt's tensors are garbage once the except block has ended
    if args.device == "cuda":
        torch.cuda.empty_cache()
    return result


def markdown(results: list[dict]) -> str:
    lines = ["| layer | B x T | params (M) | forward ms | fwd+bwd ms | fwd+bwd TFLOP/s | peak GiB |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: |"]
    for r in results:
        name = LAYERS[r["layer"]]
        shape = f"{r['batch']} x {r['seq_len']}"
        if "error" in r:
            lines.append(f"| {name} | {shape} | | {r['error']} | {r['error']} | | |")
            continue
        lines.append(f"| {name} | {shape} | {r['params'] / 1e6:.1f} | {r['forward_ms']:.2f} | "
                     f"{r['forward_backward_ms']:.2f} | {r['tflops_per_s']:.2f} | "
                     f"{'' if r['peak_gib'] is None else format(r['peak_gib'], '.2f')} |")
    lines += ["", "| B x T | layer | / Transformer forward | / Transformer fwd+bwd |", "| --- | --- | ---: | ---: |"]
    by_shape: dict[tuple[int, int], dict[str, dict]] = {}
    for r in results:
        by_shape.setdefault((r["batch"], r["seq_len"]), {})[r["layer"]] = r
    for (batch, seq), rows in by_shape.items():
        t = rows.get("transformer", {})
        for kind, m in rows.items():
            if kind != "transformer" and "forward_ms" in m and "forward_ms" in t:
                lines.append(f"| {batch} x {seq} | {LAYERS[kind]} | {m['forward_ms'] / t['forward_ms']:.2f} | "
                             f"{m['forward_backward_ms'] / t['forward_backward_ms']:.2f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="7b", help="config preset giving D, H, ffn and the memory sizes")
    parser.add_argument("--shapes", default="4x2048,1x8192,1x32768", help="comma-separated BxT")
    parser.add_argument("--layers", default="mmrec,transformer",
                        help=f"comma-separated subset of {','.join(LAYERS)} (mmrec-torch-delta: the MM-Rec layer "
                             "with the delta rule's chunk-to-chunk pass in torch ops, not the Triton kernel; "
                             "mmrec-traced-delta: with --compile, the delta rule's chunked form traced and "
                             "fused by the compiler, as MMREC_TRACE_DELTA_RULE=1 sets)")
    parser.add_argument("--iters", type=int, default=10, help="timed calls (median reported)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed calls first")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile both layers (FLOPs are counted before compiling)")
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda",
                        help="cpu: a smoke test of this script with a small preset (no memory column)")
    parser.add_argument("--sdpa", choices=["auto", *SDPA_BACKENDS], default="auto",
                        help="restrict the Transformer's attention kernel (auto: PyTorch's choice)")
    parser.add_argument("--profile", type=int, default=0, metavar="N",
                        help="print the N kernels that take the most time per layer and shape")
    parser.add_argument("--profile-copies", type=int, default=0, metavar="N",
                        help="with --profile: also the N call sites of eager copies and casts with the most time")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA GPU visible (use --device cpu --preset tiny for a smoke test)")
    config = MMRecConfig.from_preset(args.preset)
    kinds = args.layers.split(",")
    for kind in kinds:
        if kind not in LAYERS:
            raise SystemExit(f"--layers: unknown layer {kind!r}; choose from {sorted(LAYERS)}")
    torch.manual_seed(0)
    results = []
    attention = sdpa_kernel(SDPA_BACKENDS[args.sdpa]) if args.sdpa != "auto" else contextlib.nullcontext()
    with attention:
        for batch, seq in parse_shapes(args.shapes):
            for kind in kinds:
                result = run_one(kind, config, batch, seq, args)
                results.append(result)
                print(json.dumps(result), flush=True)
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else "CPU"
    header = (f"Device: {device_name}, torch {torch.__version__}, {datetime.date.today()}; "
              f"preset {args.preset} (D={config.hidden_dim}, H={config.num_heads}, ffn={config.ffn_dim}, "
              f"K={config.num_memories}, m={config.mem_dim}, S={config.memory_size_M}, C={config.chunk_size}); "
              f"bf16; sdpa={args.sdpa}; compile={args.compile}\n"
              f"Command: python {' '.join(sys.argv)}\n")
    print_report(header, markdown(results), results, args.json)


if __name__ == "__main__":
    main()
