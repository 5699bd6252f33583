"""Scaling table: `bench_train.py` on 1, 2, 4, ... GPUs of one host, per-GPU batch fixed.

    python benchmarks/bench_scaling.py --gpus 1,2,4 [--json scaling.json] -- --preset 1b \\
        --seq-len 2048 --batch-size 4 --parallel fsdp --ac selective --steps 8 --warmup 3

Everything after `--` goes to `benchmarks/bench_train.py` unchanged (MM-Rec and the Transformer
baseline are measured in each run). For each N, one `torchrun --standalone --nproc_per_node N`
process group runs it; then a Markdown table gives, per model and N, tokens/s, tokens/s per GPU,
MFU, peak memory and the scaling efficiency

    efficiency(N) = tokens_per_s(N) / (N * tokens_per_s(1))

(docs/architecture.md, section 6: >= 90% at 2 and 4 GPUs; issue 8: >= 80% at 8). The 1-GPU baseline must
not be memory-squeezed, or the efficiencies say more about it than about scaling: the table
flags a baseline above 85% of the GPU's memory. `--dry-run` prints the commands only.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

BENCH_TRAIN = Path(__file__).with_name("bench_train.py")
SQUEEZED_FRACTION = 0.85  # peak reserved memory of the 1-GPU run above this share of the GPU: flagged


def parse_gpu_counts(text: str) -> list[int]:
    try:
        counts = sorted({int(v) for v in text.split(",")})
    except ValueError:
        raise SystemExit(f"--gpus: {text!r} is not a comma-separated list of integers (e.g. 1,2,4)") from None
    if not counts or counts[0] < 1:
        raise SystemExit("--gpus: counts must be >= 1")
    if counts[0] != 1:
        raise SystemExit("--gpus: include 1, the baseline of the efficiency")
    return counts


def torchrun_command(gpus: int, bench_args: list[str], json_path: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={gpus}",
            str(BENCH_TRAIN), *bench_args, "--json", json_path]


def efficiency_table(runs: dict[int, dict], gpu_memory_gib: float | None = None) -> str:
    """Markdown table from {N: bench_train JSON}; efficiency against each model's N = 1 row."""
    lines = ["| model | GPUs | step s | tokens/s | tokens/s/GPU | MFU (data sheet) | peak alloc GiB | "
             "peak reserved GiB | scaling efficiency |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    notes = []
    models = []
    for run in runs.values():
        for r in run["results"]:
            if r["model"] not in models:
                models.append(r["model"])
    for model in models:
        rows = {n: next((r for r in run["results"] if r["model"] == model), None) for n, run in sorted(runs.items())}
        base = rows.get(1)
        base_tps = base.get("tokens_per_s") if base else None
        for n, r in rows.items():
            if r is None or "error" in r:
                lines.append(f"| {model} | {n} | {(r or {}).get('error', 'missing')} | | | | | | |")
                continue
            peak = runs[n].get("peaks", {}).get("data sheet")
            mfu = r["tflops_per_gpu"] * 1e12 / peak if peak else None
            eff = r["tokens_per_s"] / (n * base_tps) if base_tps else None
            lines.append(
                f"| {model} | {n} | {r['step_s']:.3f} | {r['tokens_per_s']:,.0f} | {r['tokens_per_s_per_gpu']:,.0f} | "
                f"{'' if mfu is None else format(mfu, '.1%')} | {r['peak_allocated_gib']:.1f} | "
                f"{r['peak_reserved_gib']:.1f} | {'' if eff is None else format(eff, '.2f')} |")
        if base and gpu_memory_gib and base.get("peak_reserved_gib", 0) > SQUEEZED_FRACTION * gpu_memory_gib:
            notes.append(f"{model}: the 1-GPU baseline reserved {base['peak_reserved_gib']:.0f} of "
                         f"{gpu_memory_gib:.0f} GiB: memory-squeezed, efficiencies above 1 are likely")
    return "\n".join(lines + [""] + [f"Note: {n}" for n in notes])


def gpu_memory_gib() -> float | None:
    try:
        import torch

        if torch.cuda.is_available():
            return torch.cuda.get_device_properties(0).total_memory / 2**30
    except Exception:
        pass
    return None


def main() -> None:
    argv = sys.argv[1:]
    bench_args = argv[argv.index("--") + 1:] if "--" in argv else []
    own = argv[: argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gpus", default="1,2,4", help="comma-separated GPU counts; must include 1")
    parser.add_argument("--json", help="write all runs and the table to this file")
    parser.add_argument("--dry-run", action="store_true", help="print the torchrun commands and stop")
    args = parser.parse_args(own)
    if "--json" in bench_args:
        parser.error("pass --json before `--` (bench_scaling writes one file per run itself)")
    counts = parse_gpu_counts(args.gpus)
    runs: dict[int, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for n in counts:
            path = os.path.join(tmp, f"gpus{n}.json")
            cmd = torchrun_command(n, bench_args, path)
            print("$ " + " ".join(cmd), flush=True)
            if args.dry_run:
                continue
            done = subprocess.run(cmd)
            if done.returncode != 0 or not os.path.exists(path):
                print(f"bench_train on {n} GPU(s) failed (exit code {done.returncode}); its rows are left out",
                      file=sys.stderr, flush=True)
                continue
            runs[n] = json.loads(Path(path).read_text())
    if args.dry_run:
        return
    if 1 not in runs:
        raise SystemExit("the 1-GPU run failed: no baseline for the efficiency")
    table = efficiency_table(runs, gpu_memory_gib())
    print("\n" + runs[1]["header"].splitlines()[0])
    print("Command: python " + " ".join(sys.argv) + "\n")
    print(table)
    if args.json:
        Path(args.json).write_text(json.dumps({"runs": {str(n): r for n, r in runs.items()}, "table": table}, indent=2))


if __name__ == "__main__":
    main()
