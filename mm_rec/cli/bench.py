"""`mmrec bench`: the CPU benchmark, benchmarks/bench_cpu.py of a checkout of the repository,
run with the arguments that follow `bench` (its own options and --help)."""

from __future__ import annotations

import argparse
import runpy
import sys
from pathlib import Path

SCRIPT = Path("benchmarks") / "bench_cpu.py"
REPOSITORY = Path(__file__).resolve().parents[2]  # mm_rec/cli/bench.py -> the checkout


def add_parser(commands: argparse._SubParsersAction) -> None:
    """Listed for `mmrec --help` only: `main` hands `mmrec bench ...` to `run` before parsing."""
    commands.add_parser("bench", help="CPU benchmark (benchmarks/bench_cpu.py; options are passed through)")


def run(bench_args: list[str]) -> int:
    """Run the script (found from the working folder, else beside this package) with `bench_args`."""
    candidates = [Path.cwd() / SCRIPT, REPOSITORY / SCRIPT]
    script = next((c for c in candidates if c.is_file()), None)
    if script is None:
        raise FileNotFoundError(f"{SCRIPT} not found: run mmrec bench from a checkout of the repository")
    argv = sys.argv
    sys.argv = [str(script), *bench_args]
    try:
        runpy.run_path(str(script), run_name="__main__")
    finally:
        sys.argv = argv
    return 0
