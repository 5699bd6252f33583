"""`mmrec train`: train from a recipe, resume a run."""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import time
from pathlib import Path

import yaml

from mm_rec.cli.common import EXIT_FAILED, EXIT_INTERRUPTED, HelpFormatter, add_recipe_arguments, recipe_from_args
from mm_rec.constants import PARALLEL_MODES
from mm_rec.loading import CHECKPOINTS, list_checkpoints
from mm_rec.training.checkpoint import RECIPE, is_checkpoint
from mm_rec.training.trainer import NonFiniteError, train

DESCRIPTION = """\
Train from a recipe. With no arguments: the tiny preset (~1M parameters) on the embedded corpus (the Python
standard library's source files, byte-level), a few minutes on 2 CPU cores, then a sample.

  mmrec train --config configs/tiny.yaml --data FILE --seed 0 --max-steps 200 --out runs/x
  mmrec train --out runs/x --resume auto            # continue where it stopped
  mmrec train --config configs/shakespeare_char.yaml --data tinyshakespeare.txt --set training.lr=1e-3

The run folder gets metrics.jsonl, checkpoints/step_*/ (atomic, the last training.keep_last kept),
recipe.json, sample.txt and tensorboard/ (when tensorboard is installed). See docs/training.md."""


def add_parser(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser("train", help="train a model from a recipe", formatter_class=HelpFormatter,
                            description=DESCRIPTION)
    add_recipe_arguments(p)
    p.add_argument("--data", help="text file, folder of text files or .bin of token ids (data.path); "
                                  "default: the Python standard library")
    p.add_argument("--seed", type=int, help="seed of the model init, data order and sample (training.seed)")
    p.add_argument("--max-steps", type=int, help="total optimizer steps (training.max_steps)")
    p.add_argument("--device", help="auto, cpu, cuda, cuda:N (training.device)")
    p.add_argument("--parallel", choices=PARALLEL_MODES, help="multi-GPU mode under torchrun "
                                                                       "(distributed.parallel)")
    p.add_argument("--out", help="run folder (default: runs/<recipe>-<date>-<time>)")
    p.add_argument("--resume", metavar="auto|PATH", help="auto: continue from the newest good checkpoint in --out "
                                                         "(fresh start when there is none); PATH: that checkpoint")
    p.add_argument("--debug", action="store_true", help="NaN/Inf hooks naming the first module that produces one, "
                                                        "and gradient-flow reports")
    p.add_argument("--print-config", action="store_true", help="print the resolved recipe as YAML and exit")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    out = args.out
    if out is None and args.resume == "auto":
        raise ValueError("--resume auto needs --out RUN_DIR (the run to continue)")
    if out is None and args.resume is not None:  # the run folder of the checkpoint
        path = Path(args.resume)
        out = path.parent.parent if path.parent.name == CHECKPOINTS else path
    if out is None:
        name = Path(args.config).stem if args.config else "tiny"
        out = Path("runs") / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"
    if args.resume is not None and args.config is None:  # continue with the recipe the run was started with
        args.config = _run_recipe(Path(out), args.resume)
    config = recipe_from_args(args, {"data.path": args.data, "training.seed": args.seed,
                                     "training.max_steps": args.max_steps, "training.device": args.device,
                                     "distributed.parallel": args.parallel})
    if args.print_config:
        print(yaml.safe_dump(config.to_dict(), sort_keys=False), end="")
        return 0
    main_process = os.environ.get("RANK", "0") == "0"  # under torchrun only rank 0 reports
    say = print if main_process else (lambda *_: None)
    say(f"run folder: {out}")
    start = time.perf_counter()
    try:
        result = train(config, out, resume=args.resume, debug=args.debug, log=say)
    except NonFiniteError as err:
        print(f"mmrec train: {err}", file=sys.stderr)
        return EXIT_FAILED
    if not main_process:
        return EXIT_INTERRUPTED if result.interrupted else 0
    summary = f"done: step {result.step} in {time.perf_counter() - start:.0f} s"
    if result.train_loss is not None:
        summary += f" | train loss {result.train_loss:.4f}"
    if result.eval is not None:
        summary += (f" | val loss {result.eval.loss:.4f} | ppl {result.eval.perplexity:.2f} | "
                    f"{result.eval.bits_per_byte:.4f} bits/byte")
    print(summary)
    if result.checkpoint is not None:
        print(f"checkpoint: {result.checkpoint}")
        prompt = shlex.quote(config.training.sample_prompt.strip() or "def ")
        print(f"next: mmrec generate --checkpoint {out} --prompt {prompt}   |   mmrec plot {out}")
    return EXIT_INTERRUPTED if result.interrupted else 0


def _run_recipe(run_dir: Path, resume: str) -> str | None:
    """recipe.json of the checkpoint to resume (newest first for auto), else of the run folder."""
    path = Path(resume)
    folders = [path] if resume != "auto" and is_checkpoint(path) else list_checkpoints(run_dir)[::-1]
    for folder in [*folders, run_dir]:
        if (folder / RECIPE).is_file():
            return str(folder / RECIPE)
    return None
