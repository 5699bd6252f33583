"""`mmrec bench` (and benchmarks/bench_cpu.py): the CPU benchmark, part of the package so that it
runs wherever mm_rec is installed. Forward+backward tokens/s of the tiny preset, and where the time goes.

Measures, in one run and on the same inputs:
  * MM-Rec tiny (exact nonlinear recurrence, torch backend),
  * MM-Rec tiny with `gate_input: input` (the linear-recurrence ablation, solved by the scan),
  * MM-Rec tiny with the version-1 memory (config_version 1: q/k/v from the state, block means,
    an age ring, the level-2 mean; what checkpoints from before the token-level memory compute),
  * the Llama-style Transformer baseline of the same sizes (when mm_rec.baselines is present),
and, from one profiled step, the share of time spent in the core recurrence loop (forward and
backward) and in the associative scan.

    mmrec bench [--batch 8] [--seq 256] [--steps 10] [--threads 2] [--config RECIPE]

--config takes a recipe's model section instead of the tiny preset (e.g. configs/mqar_mmrec.yaml,
S = 1024 slots, where the slot attention dominates).
"""

from __future__ import annotations

import argparse
import datetime
import platform
import statistics
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from mm_rec import MMRecConfig, MMRecModel
from mm_rec.config import LEGACY_V1
from mm_rec.loading import build_model


def time_steps(models: list[torch.nn.Module], ids: torch.Tensor, steps: int) -> list[float]:
    """Median seconds of one forward+backward of each model. The models take turns, one step each
    per round (after two warm-up rounds), so a machine whose speed drifts (a shared or throttled
    CPU) slows them alike and their ratios hold."""
    times: list[list[float]] = [[] for _ in models]
    for i in range(steps + 2):
        for model, own in zip(models, times):
            start = time.perf_counter()
            model(ids, labels=ids).loss.backward()
            if i >= 2:
                own.append(time.perf_counter() - start)
            model.zero_grad(set_to_none=True)
    return [statistics.median(own) for own in times]


def profile_shares(model: torch.nn.Module, ids: torch.Tensor) -> dict[str, float]:
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        model(ids, labels=ids).loss.backward()
    events = {e.key: e.cpu_time_total for e in prof.key_averages()}
    total = sum(e.self_cpu_time_total for e in prof.key_averages())
    model.zero_grad(set_to_none=True)

    def share(*names: str) -> float:
        return sum(events.get(n, 0.0) for n in names) / total

    return {
        "recurrence": share("MMRecRecurrence", "MMRecRecurrenceBackward"),
        "scan": share("AssociativeScanExponential", "AssociativeScanExponentialBackward"),
    }


def main(argv: list[str] | None = None) -> None:
    """Run the benchmark with `argv` (default: sys.argv[1:]) and print its table."""
    parser = argparse.ArgumentParser(prog="mmrec bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--steps", type=int, default=10,
                        help="timed steps of each model, taken in turns (median reported)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--config", help="recipe whose model section to use (default: the tiny preset)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    cfg = MMRecConfig.from_file(args.config) if args.config else MMRecConfig.from_preset("tiny")
    label = Path(args.config).stem if args.config else "tiny"
    ids = torch.randint(0, cfg.vocab_size, (args.batch, args.seq))
    variants: list[tuple[str, torch.nn.Module]] = [
        (f"MM-Rec {label} (exact recurrence)", build_model(cfg)),
        (f"MM-Rec {label} (gate_input: input, scan)", build_model(cfg.replace(gate_input="input"))),
        (f"MM-Rec {label}, version-1 memory (config_version 1)",
         build_model(cfg.replace(config_version=1, recent_slots=cfg.memory_size_M, **LEGACY_V1))),
        ("Transformer baseline (same sizes)", build_model(cfg, "transformer")),
    ]

    tokens = args.batch * args.seq
    print(f"# CPU benchmark, {datetime.date.today()}, {platform.processor() or platform.machine()}, "
          f"torch {torch.__version__}, {args.threads} threads, batch {args.batch} x {args.seq} tokens\n")
    print("| model | params | fwd+bwd ms | tokens/s | speed vs exact MM-Rec | recurrence share | scan share |")
    print("|---|---|---|---|---|---|---|")
    all_seconds = time_steps([model for _, model in variants], ids, args.steps)
    reference = all_seconds[0]
    for (name, model), seconds in zip(variants, all_seconds):
        shares = profile_shares(model, ids) if isinstance(model, MMRecModel) else None
        n_params = sum(p.numel() for p in model.parameters())
        rec = f"{shares['recurrence']:.0%}" if shares else "-"
        scan = f"{shares['scan']:.0%}" if shares else "-"
        print(f"| {name} | {n_params / 1e6:.2f}M | {seconds * 1e3:.0f} | {tokens / seconds:,.0f} | "
              f"{reference / seconds:.2f}x | {rec} | {scan} |")



def add_parser(commands: argparse._SubParsersAction) -> None:
    """Listed for `mmrec --help` only: `mmrec.cli.main` hands `mmrec bench ...` to `run` before parsing."""
    commands.add_parser("bench", help="CPU benchmark: tokens/s of the tiny preset and its ablation, the baseline "
                                      "(options: mmrec bench --help)")


def run(bench_args: list[str]) -> int:
    main(bench_args)
    return 0
