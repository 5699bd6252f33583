"""`mmrec generate`: stream a sampled continuation of a prompt."""

from __future__ import annotations

import argparse

from mm_rec.cli.common import HelpFormatter
from mm_rec.generation import generate_text
from mm_rec.loading import load_model_and_tokenizer
from mm_rec.model import check_sampling
from mm_rec.training.config import PRECISIONS
from mm_rec.utils.device import autocast_for, resolve_device


def add_parser(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser("generate", help="stream a sampled continuation of a prompt", formatter_class=HelpFormatter,
                            description="  mmrec generate --checkpoint runs/x --prompt 'def ' --max-new-tokens 200 "
                                        "--seed 0")
    p.add_argument("--checkpoint", required=True, help="run folder (its newest checkpoint) or checkpoint folder")
    p.add_argument("--prompt", default="", help="text to continue (empty: a newline)")
    p.add_argument("--max-new-tokens", type=int, default=200, help="tokens to generate")
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=40, help="sample among the k most likely tokens")
    p.add_argument("--top-p", type=float, help="nucleus sampling threshold")
    p.add_argument("--seed", type=int, default=0, help="seed of the sampling")
    p.add_argument("--precision", default="auto", choices=PRECISIONS,
                   help="autocast dtype; auto: bf16 on CUDA, fp32 on CPU")
    p.add_argument("--device", help="auto, cpu, cuda, cuda:N")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    # before the model loads and the prompt is echoed: a bad flag is the only output
    if args.max_new_tokens < 0:
        raise ValueError("--max-new-tokens must be >= 0")
    check_sampling(args.max_new_tokens, args.temperature, args.top_k, args.top_p)
    device = resolve_device(args.device or "auto")
    model, tokenizer, _ = load_model_and_tokenizer(args.checkpoint, device)
    generate_text(model, tokenizer, args.prompt, args.max_new_tokens, args.temperature, args.top_k, args.seed,
                  device, autocast_for(args.precision, device), top_p=args.top_p, echo=True)
    return 0
