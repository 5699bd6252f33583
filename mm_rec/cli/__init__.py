"""The `mmrec` command line (also `python -m mm_rec`).

    mmrec train      train from a recipe (no arguments: the tiny preset on Python's standard library)
    mmrec eval       loss, perplexity and bits per byte of a checkpoint on a text; or --task mqar|passkey
    mmrec generate   stream a sampled continuation of a prompt
    mmrec info       parameter count per component (on the meta device: any size, no memory)
    mmrec plot       loss curves of a run as a PNG
    mmrec inspect    decay spectra and slot-age attention of a checkpoint
    mmrec bench      the CPU benchmark (also benchmarks/bench_cpu.py)

Bad input (a missing file, an unknown config key, token ids outside the vocabulary, a damaged
checkpoint) is reported in one line on stderr with exit code 2; a run stopped by repeated
non-finite steps exits with 1, an interrupted one (checkpoint saved) with 130.
"""

from __future__ import annotations

import argparse
import os
import sys

from mm_rec import __version__
from mm_rec.cli import bench, generate, info, inspect, plot, train
from mm_rec.cli import eval as eval_command
from mm_rec.cli.common import EXIT_BAD_INPUT, EXIT_INTERRUPTED
from mm_rec.distributed.runtime import launched_by_torchrun

# One module per command (litgpt's layout): each adds its subparser, whose `func` runs it;
# mm_rec.cli.tasks (`mmrec eval --task mqar|passkey`) belongs to eval.
COMMANDS = (train, eval_command, generate, info, plot, inspect, bench)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mmrec", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"mmrec {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    for command in COMMANDS:
        command.add_parser(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run `mmrec` with `argv` (default: sys.argv[1:]); returns the exit code."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["bench"]:  # everything after `bench` is the benchmark's own, --help included
        try:
            return bench.run(argv[1:])
        except (ValueError, FileNotFoundError) as err:  # a bad --config
            print(f"mmrec bench: error: {' '.join(str(err).split())}", file=sys.stderr)
            return EXIT_BAD_INPUT
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError) as err:
        if os.environ.get("MMREC_TRACEBACK"):
            raise
        message = " ".join(str(err).split()) or type(err).__name__
        print(f"mmrec {args.command}: error: {message}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print(f"mmrec {args.command}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # output piped into head & co.
        sys.stdout = open(os.devnull, "w")
        return 0


def entry_point() -> None:
    """The `mmrec` script and `python -m mm_rec`: run `main`, then exit with its code.

    Under torchrun the process skips the interpreter's teardown once the work is done (the
    process group is destroyed and every file written by then): gloo's threads can abort there
    ("terminate called without an active exception", SIGABRT) on a loaded CPU machine, which
    torchrun would report as a failed run."""
    code = main()
    if launched_by_torchrun():
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)
