"""Training throughput of a model preset on N GPUs: tokens/s, MFU and peak memory per GPU, for
MM-Rec and the Llama-style Transformer baseline of the same sizes, in the same run.

    torchrun --standalone --nproc_per_node N benchmarks/bench_train.py --preset 7b
        --seq-len 2048 --batch-size 2 --parallel fsdp --ac selective [--compile] [--steps 10]
        [--json out.json]

Each model in turn is built directly on the GPU (meta-device construction, same seed on every
process), its forward FLOPs on one GPU's batch are counted (FlopCounterMode, bf16), then
activation checkpointing, torch.compile and FSDP2/DDP are applied per block
(`mm_rec.distributed.apply_parallelism`) and it trains on random tokens with AdamW and gradient
clipping: `--warmup` untimed steps, then `--steps` timed ones. Every process draws its own
batch of `--batch-size` sequences of `--seq-len` tokens; MM-Rec starts every batch from a fresh
state and runs sequences longer than `max_segment_len` (`--max-segment-len`) segment by segment
with the state carried and each segment recomputed in backward.

Reported per model (rank 0 prints; times and memory are the maxima over processes):
  step time (median), tokens/s (all GPUs and per GPU), model TFLOP/s per GPU and MFU
  (3 x forward FLOPs / step time / peak, see mm_rec/utils/profiling.py), peak memory allocated
  and reserved per GPU, final loss. `--profile-blocks` adds per-block forward/backward times.

Runs without torchrun too (one process; `--parallel none` or a group of one is made for you)
and on CPU (`--device cpu`, gloo) for smoke tests with small presets. Under several processes
an out-of-memory error ends the run (torchrun stops the other processes); alone, it is reported
and the next model runs.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import math
import os
import socket
import sys
import time

import torch

from mm_rec import MMRecConfig
from mm_rec.config import PRESETS
from mm_rec.distributed import (
    ParallelConfig,
    all_reduce_max,
    all_reduce_mean,
    apply_parallelism,
    barrier,
    cleanup_distributed,
    get_rank,
    get_world_size,
    init_distributed,
    init_model_on_device,
)
from mm_rec.loading import build_model
from mm_rec.utils.profiling import (
    BlockTimer,
    count_flops,
    measure_matmul_flops,
    mfu,
    peak_flops_per_second,
    peak_memory,
    reset_peak_memory,
    time_fn,
    training_step_flops,
)

MODELS = {"mmrec": "MM-Rec", "transformer": "Transformer"}  # model_type -> label


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="mmrec,transformer", help="comma-separated subset of mmrec,transformer")
    p.add_argument("--preset", default="7b", choices=sorted(PRESETS))
    p.add_argument("--override", nargs="*", default=[], metavar="KEY=VALUE",
                   help="config overrides, e.g. num_layers=4 (values parsed as JSON, else kept as strings)")
    p.add_argument("--seq-len", type=int, default=2048, help="tokens per sequence")
    p.add_argument("--batch-size", type=int, default=1, help="sequences per GPU per step")
    p.add_argument("--steps", type=int, default=10, help="timed steps (median step time reported)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (compilation happens here)")
    p.add_argument("--parallel", choices=["fsdp", "ddp", "none"], default="fsdp")
    p.add_argument("--ac", choices=["none", "full", "selective"], default="selective",
                   help="activation checkpointing per block")
    p.add_argument("--compile", action="store_true", help="torch.compile each block")
    p.add_argument("--mixed-precision", choices=["bf16", "fp32"], default="bf16")
    p.add_argument("--max-segment-len", type=int, help="MM-Rec forward segment length (default: the preset's)")
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--peak-tflops", type=float, help="peak bf16 TFLOP/s per GPU for MFU (default: by device name)")
    p.add_argument("--measure-peak", action="store_true",
                   help="also report MFU against a measured 8192^3 bf16 matmul rate")
    p.add_argument("--profile-blocks", action="store_true", help="time each block's forward and backward once")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="rank 0 writes the results to this file")
    args = p.parse_args()
    for name in args.models.split(","):
        if name not in MODELS:
            p.error(f"--models: unknown model {name!r}; choose from {sorted(MODELS)}")
    if args.profile_blocks and args.compile:
        p.error("--profile-blocks hooks eager blocks; run it without --compile")
    return args


def parse_overrides(items: list[str]) -> dict:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--override: {item!r} is not KEY=VALUE")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def ensure_process_group(args: argparse.Namespace) -> None:
    """Outside torchrun, FSDP and DDP still need a group: make one of a single process."""
    if args.parallel == "none" or "RANK" in os.environ:
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))


def random_batch(generator: torch.Generator, args: argparse.Namespace, vocab: int, device: torch.device):
    ids = torch.randint(0, vocab, (args.batch_size, args.seq_len + 1), generator=generator, device=device)
    return ids[:, :-1], ids[:, 1:]  # inputs, labels (already shifted)


def run_model(name: str, config: MMRecConfig, args: argparse.Namespace, device: torch.device) -> dict:
    cuda = device.type == "cuda"
    amp_dtype = torch.bfloat16 if args.mixed_precision == "bf16" else torch.float32
    torch.manual_seed(args.seed)  # identical weights on every process
    model = init_model_on_device(lambda: build_model(config, name), device)
    num_params = sum(p.numel() for p in model.parameters())
    generator = torch.Generator(device=device).manual_seed(args.seed + 1000 * get_rank())  # own data per process
    x, y = random_batch(generator, args, config.vocab_size, device)
    with torch.no_grad(), torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype != torch.float32):
        _, forward_flops = count_flops(model, x, labels=y, return_logits=False)
    step_flops = training_step_flops(forward_flops)

    parallel = ParallelConfig(mode=args.parallel, activation_checkpointing=args.ac != "none",
                              ac_policy=args.ac if args.ac != "none" else "selective", compile=args.compile,
                              mixed_precision=args.mixed_precision)
    model = apply_parallelism(model, parallel)
    blocks = (model.module if hasattr(model, "module") else model).blocks
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    reset_peak_memory(device)
    last_loss = torch.zeros((), device=device)

    def step() -> None:
        nonlocal last_loss
        x, y = random_batch(generator, args, config.vocab_size, device)
        out = model(x, labels=y, return_logits=False)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        last_loss = out.loss.detach()

    timing = time_fn(step, warmup=args.warmup, iters=args.steps, cuda=cuda)
    step_s = all_reduce_max(timing.median_ms) / 1e3
    loss = all_reduce_mean(last_loss).item()
    memory = peak_memory(device)
    result = {
        "model": name, "params": num_params, "preset": args.preset, "gpus": get_world_size(),
        "parallel": args.parallel, "ac": args.ac, "compile": args.compile, "mixed_precision": args.mixed_precision,
        "seq_len": args.seq_len, "batch_per_gpu": args.batch_size,
        "step_s": step_s, "step_s_all": [t / 1e3 for t in timing.times_ms],
        "tokens_per_s": get_world_size() * args.batch_size * args.seq_len / step_s,
        "tokens_per_s_per_gpu": args.batch_size * args.seq_len / step_s,
        "forward_flops_per_gpu": forward_flops, "step_flops_per_gpu": step_flops,
        "tflops_per_gpu": step_flops / step_s / 1e12,
        "peak_allocated_gib": all_reduce_max(memory.allocated_gib),
        "peak_reserved_gib": all_reduce_max(memory.reserved_gib),
        "loss": loss, "finite": math.isfinite(loss),
    }
    if args.profile_blocks:
        with BlockTimer(blocks, cuda=cuda) as timer:
            step()
        times = timer.summary()
        result["block_forward_ms"] = [t.forward_ms for t in times]
        result["block_backward_ms"] = [t.backward_ms for t in times]
    return result


def run_model_guarded(name: str, config: MMRecConfig, args: argparse.Namespace, device: torch.device) -> dict:
    """`run_model`, then free its memory. Alone on a GPU an out-of-memory error is reported
    instead of raised (under several processes the others could be waiting in a collective)."""
    alone_on_gpu = get_world_size() == 1 and device.type == "cuda"
    try:
        result = run_model(name, config, args, device)
    except torch.cuda.OutOfMemoryError:
        if not alone_on_gpu:
            raise
        result = {"model": name, "preset": args.preset, "gpus": 1, "seq_len": args.seq_len,
                  "batch_per_gpu": args.batch_size, "error": "OOM"}
    gc.collect()  # the failed attempt's tensors are garbage once the except block has ended
    if device.type == "cuda":
        torch.cuda.empty_cache()
    barrier()
    return result


def markdown(results: list[dict], peaks: dict[str, float]) -> str:
    """One row per model; one MFU column per peak (none known: a column of n/a)."""
    mfu_headers = [f"MFU ({k})" for k in peaks] or ["MFU"]
    lines = ["| model | params (M) | GPUs | parallel | AC | seq | batch/GPU | step s | tokens/s | tokens/s/GPU "
             "| TFLOP/s/GPU | " + " | ".join(mfu_headers) + " | peak alloc GiB | peak reserved GiB | loss |",
             "| --- | ---: | ---: | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | "
             + " | ".join("---:" for _ in mfu_headers) + " | ---: | ---: | ---: |"]
    for r in results:
        label = MODELS[r["model"]]
        if "error" in r:
            lines.append(f"| {label} | | {r['gpus']} | | | {r['seq_len']} | {r['batch_per_gpu']} | {r['error']} |")
            continue
        mfus = " | ".join(f"{100 * mfu(r['step_flops_per_gpu'], r['step_s'], peak):.1f}%"
                          for peak in peaks.values()) or "n/a"
        lines.append(
            f"| {label} | {r['params'] / 1e6:.1f} | {r['gpus']} | {r['parallel']} | {r['ac']} | {r['seq_len']} | "
            f"{r['batch_per_gpu']} | {r['step_s']:.3f} | {r['tokens_per_s']:.0f} | {r['tokens_per_s_per_gpu']:.0f} | "
            f"{r['tflops_per_gpu']:.1f} | {mfus} | {r['peak_allocated_gib']:.1f} | {r['peak_reserved_gib']:.1f} | "
            f"{r['loss']:.3f} |")
    for r in results:
        if "block_forward_ms" in r:
            n = len(r["block_forward_ms"])
            lines.append(f"\n{MODELS[r['model']]} blocks (one step, mean of {n}): forward "
                         f"{sum(r['block_forward_ms']) / n:.2f} ms, backward {sum(r['block_backward_ms']) / n:.2f} ms")
    return "\n".join(lines)


def main() -> None:
    start = time.time()
    args = parse_args()
    ensure_process_group(args)
    info = init_distributed(args.device)
    config = MMRecConfig.from_preset(args.preset, **parse_overrides(args.override))
    if args.max_segment_len:
        config = config.replace(max_segment_len=args.max_segment_len)
    peaks: dict[str, float] = {}
    if args.peak_tflops:
        peaks["peak"] = args.peak_tflops * 1e12
    elif (table_peak := peak_flops_per_second(info.device)) is not None:
        peaks["data sheet"] = table_peak
    if args.measure_peak and info.device.type == "cuda":
        peaks["measured matmul"] = all_reduce_max(measure_matmul_flops(device=info.device))
    results = []
    for name in args.models.split(","):
        result = run_model_guarded(name, config, args, info.device)
        results.append(result)
        if info.is_main:
            print(json.dumps({k: v for k, v in result.items() if k != "step_s_all"}), flush=True)
    if info.is_main:
        device_name = torch.cuda.get_device_name(info.device) if info.device.type == "cuda" else "CPU"
        facts = [f"Device: {get_world_size()} x {device_name}, torch {torch.__version__}, "
                 f"{datetime.datetime.now():%Y-%m-%d %H:%M}",
                 f"preset {args.preset} (D={config.hidden_dim}, L={config.num_layers}, "
                 f"max_segment_len={config.max_segment_len})",
                 f"{args.mixed_precision}, compile={args.compile}",
                 *(f"{k} peak {v / 1e12:.0f} TFLOP/s" for k, v in peaks.items())]
        header = "; ".join(facts) + f"\nCommand: {' '.join(sys.argv)}\n"
        print("\n" + header)
        print(markdown(results, peaks))
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"header": header, "peaks": peaks, "results": results}, f, indent=2)
        print(f"\n(total {time.time() - start:.0f} s)")
    cleanup_distributed()


if __name__ == "__main__":
    main()
