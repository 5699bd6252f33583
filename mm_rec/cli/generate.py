"""`mmrec generate`: stream a sampled continuation of a prompt, or continue every line of a file in batches."""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import torch

from mm_rec.cli.common import HelpFormatter, add_quantize_arguments, quantize_for_inference
from mm_rec.generation import Completion, encode_prompts, generate_text, generate_texts
from mm_rec.loading import load_model_and_tokenizer
from mm_rec.model import check_sampling
from mm_rec.training.config import PRECISIONS
from mm_rec.utils.device import autocast_for, resolve_device, resolve_precision

ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "\\": "\\"}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}

EXAMPLES = """examples:
  mmrec generate --checkpoint runs/x --prompt 'def ' --max-new-tokens 200 --seed 0
  mmrec generate --checkpoint runs/x --prompt 'ROMEO:' --stop '\\n\\n' --temperature 0
  mmrec generate --checkpoint runs/x --prompts-file prompts.txt --batch-size 16 --stop '\\n' --temperature 0
  mmrec generate --checkpoint runs/x --prompt 'def ' --quantize int4 --group-size 64

With --prompt the continuation streams to stdout as it is generated. With --prompts-file (one prompt
per line; an empty line is the empty prompt) the prompts are generated --batch-size at a time (rows of
different lengths together: no padding enters a row's state) and each prompt's result is printed, in
the file's order, as one JSON line {"prompt": ..., "completion": ..., "finish": "stop" | "length"}.
A row ends at its first --stop string (cut before it) or after --max-new-tokens. On a CUDA device the
model runs in --precision's dtype and each token is one replay of a captured CUDA graph. --quantize
stores the linear layers' weights in 8 or 4 bits (torchao, weight-only: mm_rec/quantization.py); a
checkpoint saved quantized loads quantized without it."""


def add_parser(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser("generate", help="sample continuations of a prompt or of a file of prompts",
                            formatter_class=HelpFormatter, description=EXAMPLES)
    p.add_argument("--checkpoint", required=True, help="run folder (its newest checkpoint) or checkpoint folder")
    p.add_argument("--prompt", help="text to continue (empty: a newline); default: a newline")
    p.add_argument("--prompts-file", metavar="FILE", help="continue every line of this UTF-8 file instead")
    p.add_argument("--batch-size", type=int, default=8, help="prompts of --prompts-file generated together")
    p.add_argument("--stop", action="append", default=[], metavar="STRING",
                   help="end a continuation at this string, which is left out (repeatable; \\n, \\t, \\r and "
                        "\\\\ are read as escapes)")
    p.add_argument("--max-new-tokens", type=int, default=200, help="tokens to generate per prompt")
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=40, help="sample among the k most likely tokens")
    p.add_argument("--top-p", type=float, help="nucleus sampling threshold")
    p.add_argument("--seed", type=int, default=0, help="seed of the sampling")
    p.add_argument("--precision", default="auto", choices=PRECISIONS,
                   help="dtype; auto: bf16 on CUDA (the weights cast, no autocast), fp32 on CPU")
    p.add_argument("--device", help="auto, cpu, cuda, cuda:N")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the one-token step before it is captured: the first tokens wait for the "
                        "compilation (one block's step, twice: seconds to a minute), then each token is ~2.8x "
                        "faster (1b preset, H100, docs/benchmarks.md); worth it for long generations")
    add_quantize_arguments(p)
    p.set_defaults(func=run)


def unescape(text: str) -> str:
    """\\n, \\t, \\r and \\\\ as the characters they name; any other backslash stays as it is."""
    return re.sub(r"\\(.)", lambda m: ESCAPES.get(m.group(1), m.group(0)), text)


def read_prompts(path: str) -> list[str]:
    """The lines of a UTF-8 file (CRLF or LF; the newline after the last line ends it, it adds no prompt)."""
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"--prompts-file not found: {path}")
    try:
        text = file.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"--prompts-file {path} is not UTF-8 text: {err}") from None
    if not text:
        raise ValueError(f"--prompts-file {path} is empty")
    lines = text.split("\n")
    if lines[-1] == "":
        lines.pop()
    return [line.removesuffix("\r") for line in lines]


def check_arguments(args: argparse.Namespace) -> None:
    """Every flag that needs no model, refused in one line before anything is loaded or printed."""
    if args.prompt is not None and args.prompts_file is not None:
        raise ValueError("give either --prompt or --prompts-file, not both")
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    if any(not s for s in args.stop):
        raise ValueError("--stop must not be empty")
    check_sampling(args.max_new_tokens, args.temperature, args.top_k, args.top_p,
                   name=lambda argument: "--" + argument.replace("_", "-"))


def run(args: argparse.Namespace) -> int:
    check_arguments(args)
    stop = [unescape(s) for s in args.stop]
    prompts = read_prompts(args.prompts_file) if args.prompts_file is not None else None
    device = resolve_device(args.device or "auto")
    model, tokenizer, _ = load_model_and_tokenizer(args.checkpoint, device)
    encode_prompts(tokenizer, prompts or [args.prompt or ""], model.config.vocab_size)  # before any output
    precision = resolve_precision(args.precision, device)
    autocast = None
    quantization = quantize_for_inference(model, args, device)  # weights cast to --precision's dtype, then quantized
    if quantization:
        print(f"weights: {quantization.describe()}", file=sys.stderr)
    elif device.type == "cuda" and precision in DTYPES:
        model.to(DTYPES[precision])  # CUDA graphs replay fixed kernels: the weights cast once, not per step
    else:
        autocast = autocast_for(precision, device)
    sampling = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                    seed=args.seed, device=device, top_p=args.top_p, autocast=autocast, compile_step=args.compile)
    if prompts is None:
        generate_text(model, tokenizer, args.prompt or "", echo=True, stop=stop, **sampling)
        return 0

    def show(_: int, c: Completion) -> None:  # in the file's order, batch by batch as each one ends
        print(json.dumps({"prompt": c.prompt, "completion": c.text, "finish": c.finish}, ensure_ascii=False))
        sys.stdout.flush()

    generate_texts(model, tokenizer, prompts, batch_size=args.batch_size, stop=stop, on_completion=show, **sampling)
    return 0
