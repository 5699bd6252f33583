"""Perplexity of a trained checkpoint with float, int8 and int4 weights (docs/quality.md, "Quantized weights").

    python scripts/quantization_quality.py --checkpoint runs/wt2_tiny --data ../shared/data/wikitext2_valid.tokens

Every row scores the same tokens the way `mmrec eval` does (state carried across windows of the
training seq_len). A quantized row runs the model `dequantize_model` returns: the weights the
quantized kernels multiply by, on plain float matmuls; so the row's loss is the kernel's to float
rounding, at float speed (torchao's int4 CPU kernel scores ~1.6k tokens/s on the tiny preset, against
~20k in fp32). `mmrec eval --quantize` runs the kernels themselves. Also printed: the share of the
linear layers' weights that a mode quantizes (the rest stays in float, with the reason).
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn

from mm_rec.cli.eval import _saved_recipe
from mm_rec.data.cache import tokenize_in_memory
from mm_rec.data.corpus import resolve_source
from mm_rec.loading import load_model_and_tokenizer
from mm_rec.quantization import dequantize_model, quantize_model
from mm_rec.training.evaluate import evaluate, token_bytes_table

MODES = (("int8", None), ("int4", 128), ("int4", 64), ("int4", 32))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="run folder or checkpoint")
    parser.add_argument("--data", required=True, help="text file to score")
    parser.add_argument("--max-tokens", type=int, help="score at most this many tokens")
    args = parser.parse_args()
    device = torch.device("cpu")
    model, tokenizer, model_dir = load_model_and_tokenizer(args.checkpoint, device)
    model.eval()
    recipe = _saved_recipe(model_dir)
    seq_len, batch_size = recipe["training"]["seq_len"], recipe["training"]["batch_size"]
    data = tokenize_in_memory(resolve_source(args.data, "text"), tokenizer, None, "uint16", args.max_tokens)
    token_bytes = token_bytes_table(tokenizer, model.config.vocab_size)
    linear_weights = {name: m.weight.numel() for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    total = sum(linear_weights.values())

    def score(scored: nn.Module) -> float:
        started = time.perf_counter()
        result = evaluate(scored, data, 0, len(data), batch_size, seq_len, scored.init_state, token_bytes, device)
        return result.loss, time.perf_counter() - started

    base, seconds = score(model)
    print(f"{model_dir} on {args.data}: {len(data):,} tokens, windows of {seq_len}, state carried")
    print("| weights | linear weights quantized | loss | perplexity | change |")
    print("|---|---:|---:|---:|---:|")
    print(f"| fp32 | 0% | {base:.4f} | {torch.tensor(base).exp():.3f} | |")
    for mode, group_size in MODES:
        quantized = load_model_and_tokenizer(args.checkpoint, device)[0].eval()
        info = quantize_model(quantized, mode, group_size)
        share = sum(linear_weights[name] for name in info.modules) / total
        loss, _ = score(dequantize_model(quantized))
        label = mode if group_size is None else f"{mode}, groups of {group_size}"
        change = (torch.tensor(loss - base).exp() - 1) * 100
        print(f"| {label} | {share:.0%} | {loss:.4f} | {torch.tensor(loss).exp():.3f} | {change:+.2f}% |")
        for name, reason in info.skipped.items():
            print(f"    left in float: {name}: {reason}")


if __name__ == "__main__":
    main()
