"""`mmrec plot`: the loss curves of a run as a PNG (needs matplotlib)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mm_rec.cli.common import EXIT_FAILED, HelpFormatter
from mm_rec.training.metrics import plot_run


def add_parser(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser("plot", help="loss curves of a run as a PNG (needs matplotlib)",
                            formatter_class=HelpFormatter)
    p.add_argument("run_dir", metavar="RUN_DIR", help="run folder holding metrics.jsonl")
    p.add_argument("--out", help="PNG path (default: RUN_DIR/loss.png)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    try:
        out = plot_run(Path(args.run_dir), Path(args.out) if args.out else None)
    except ImportError as err:
        print(f"mmrec plot: error: {err}", file=sys.stderr)
        return EXIT_FAILED
    print(f"wrote {out}")
    return 0
