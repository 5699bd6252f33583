"""`mmrec eval`: loss, perplexity and bits per byte of a checkpoint on a text (the recall tasks,
`--task mqar|passkey`, are mm_rec.cli.tasks)."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from mm_rec.cli import tasks
from mm_rec.cli.common import HelpFormatter, add_quantize_arguments, quantize_for_inference
from mm_rec.data.cache import DTYPES, tokenize_in_memory
from mm_rec.data.corpus import resolve_source
from mm_rec.loading import load_model_and_tokenizer
from mm_rec.training.checkpoint import RECIPE
from mm_rec.training.config import PRECISIONS
from mm_rec.training.evaluate import evaluate, token_bytes_table
from mm_rec.utils.device import autocast_for, resolve_device

DESCRIPTION = """\
  mmrec eval --checkpoint runs/x --data held_out.txt
  mmrec eval --checkpoint runs/x            # the validation split of its training data
  mmrec eval --checkpoint runs/x --data held_out.txt --quantize int8   # with int8 weights (also int4)
  mmrec eval --task mqar --checkpoint DIR   # long-context recall tasks
  mmrec eval --task longdoc --checkpoint DIR --out DIR   # loss by position far into long files"""


def add_parser(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser("eval", help="loss, perplexity and bits per byte of a checkpoint "
                                         "(or --task mqar|passkey|longdoc)",
                            formatter_class=HelpFormatter, description=DESCRIPTION)
    p.add_argument("--checkpoint", help="run folder (its newest checkpoint) or checkpoint / save_pretrained folder")
    p.add_argument("--data", help="text file, folder or .bin to score (default: the validation split of the "
                                  "checkpoint's training data)")
    p.add_argument("--max-tokens", type=int, help="score at most this many tokens")
    p.add_argument("--seq-len", type=int, help="window length (default: the training seq_len)")
    p.add_argument("--batch-size", type=int, help="rows scored in parallel (default: the training batch size)")
    p.add_argument("--carry-state", action=argparse.BooleanOptionalAction, default=None,
                   help="carry the memory state across windows (default: as in training)")
    p.add_argument("--bin-dtype", default="uint16", choices=list(DTYPES),
                   help="element type of a .bin file")
    p.add_argument("--precision", default="auto", choices=PRECISIONS,
                   help="autocast dtype; auto: bf16 on CUDA, fp32 on CPU (with --quantize: the weights' dtype)")
    p.add_argument("--device", help="auto, cpu, cuda, cuda:N")
    add_quantize_arguments(p)
    tasks.add_eval_task_arguments(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.task:
        if args.quantize or args.group_size is not None:
            raise ValueError("--quantize applies to the loss on a text, not to --task")
        return tasks.run_eval_task(args)
    if not args.checkpoint:
        raise ValueError("mmrec eval needs --checkpoint DIR (and --data PATH), or --task mqar|passkey")
    for flag, value, low in (("--seq-len", args.seq_len, 1), ("--batch-size", args.batch_size, 1),
                             ("--max-tokens", args.max_tokens, 0)):
        if value is not None and value < low:
            raise ValueError(f"{flag} must be >= {low}, got {value}")
    device = resolve_device(args.device or "auto")
    model, tokenizer, model_dir = load_model_and_tokenizer(args.checkpoint, device)
    quantization = quantize_for_inference(model, args, device)
    vocab_size = model.config.vocab_size
    recipe = _saved_recipe(model_dir)
    data_cfg = recipe.get("data", {})
    separator = data_cfg.get("document_separator")
    text_field = data_cfg.get("text_field", "text")  # of .jsonl / .parquet / datasets data
    if args.data is not None:
        source = resolve_source(args.data, text_field)
        data = tokenize_in_memory(source, tokenizer, separator, args.bin_dtype, args.max_tokens)
        start, end, what = 0, len(data), args.data
    else:  # the validation split of the data the checkpoint was trained on
        if "data" not in recipe:
            raise ValueError(f"{model_dir} holds no {RECIPE}; give --data PATH")
        data = tokenize_in_memory(resolve_source(data_cfg.get("path"), text_field), tokenizer, separator,
                                  data_cfg.get("bin_dtype", "uint16"))
        start = data.split_point(data_cfg.get("val_fraction", 0.05))
        end = len(data) if args.max_tokens is None else min(len(data), start + args.max_tokens)
        what = f"the validation split of {data.description}"
    data.check_vocab(vocab_size)
    if end - start < 2:
        raise ValueError(f"{what} holds {end - start} token(s); evaluation needs at least 2")
    train_cfg = recipe.get("training", {})
    seq_len = args.seq_len if args.seq_len is not None else train_cfg.get("seq_len", 256)
    batch_size = args.batch_size if args.batch_size is not None else train_cfg.get("batch_size", 8)
    carry = args.carry_state if args.carry_state is not None else data_cfg.get("carry_state", True)
    autocast = None if quantization else autocast_for(args.precision, device)  # quantized: weights in their dtype
    token_bytes = token_bytes_table(tokenizer, vocab_size)
    init_state = model.init_state if carry and hasattr(model, "init_state") else None
    started = time.perf_counter()
    result = evaluate(model, data, start, end, batch_size, seq_len, init_state, token_bytes, device, autocast)
    seconds = time.perf_counter() - started
    print(f"{model_dir} on {what}: {result.tokens:,} tokens ({result.bytes:,} bytes), "
          f"{'state carried' if init_state else 'fresh state per window'} (windows of {seq_len})")
    if quantization:
        print(f"weights: {quantization.describe()}")
    print(f"loss {result.loss:.4f} | perplexity {result.perplexity:.3f} | bits per byte {result.bits_per_byte:.4f} | "
          f"{result.tokens / seconds:,.0f} tokens/s")
    return 0


def _saved_recipe(model_dir: Path) -> dict:
    """The recipe saved with a checkpoint ({} for a save_pretrained folder without one)."""
    path = model_dir / RECIPE
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is damaged: {err}") from None
