"""Where one language model loses to another: per-token validation loss of two checkpoints trained on
the same data, by position in the window and by how far back the target token last occurred
(docs/quality.md, "Where the BPE gap comes from").

    python scripts/token_loss_by_context.py RUN_A RUN_B --data PATH [--val-fraction 0.1] [--window 256]

Both checkpoints must share the tokenizer (one saved beside each model; bytes when none). The
validation split (the last `--val-fraction` of the tokens, as the trainer cuts it) is read as 16
contiguous streams in windows of `--window` tokens: a model with a recurrent state (MM-Rec) carries
it from window to window, as `mmrec train` evaluates a carry_state run; a Transformer reads each
window alone. Every token is scored once by both, so the per-token differences add up to the gap in
mean loss. Prints, for each bucket, its share of the tokens, each model's mean loss (nats), the
difference B − A and the bucket's share of the whole gap:

- position: the token's index in its window (a Transformer's context length);
- previous occurrence: tokens back to the last occurrence of the target in the window so far
  ("none": a token the window has not seen, which no copying can predict).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

from mm_rec.data.cache import prepare_tokens
from mm_rec.data.corpus import resolve_source
from mm_rec.evaluation.long_documents import token_nll
from mm_rec.loading import load_model_and_tokenizer

STREAMS = 16
NEVER = torch.iinfo(torch.int64).max
POSITION_EDGES = (0, 8, 32, 64, 128, 256, 1024, 4096)
DISTANCE_EDGES = (1, 4, 16, 64, 256, 1024, 4096)


def streams_of(ids: torch.Tensor, window: int) -> torch.Tensor:
    """[STREAMS, n * window + 1] rows of consecutive tokens (each row's last token is the next row's
    first): row[:, :-1] are the inputs, row[:, 1:] their targets."""
    n = (len(ids) - 1) // (STREAMS * window)
    if n == 0:
        raise ValueError(f"the validation split has {len(ids)} tokens, fewer than {STREAMS} windows of {window}")
    length = n * window
    return torch.stack([ids[r * length:(r + 1) * length + 1] for r in range(STREAMS)])


def token_losses(model: torch.nn.Module, rows: torch.Tensor, window: int) -> torch.Tensor:
    """Per-token loss [STREAMS, n * window] (float64): a model with a state (MM-Rec) carries it across the
    windows of a row, a model without one reads each window alone."""
    stateful = hasattr(model, "init_state")
    return token_nll(model, rows, segment_len=window, reset_every=None if stateful else window)


def previous_occurrence(inputs: torch.Tensor, targets: torch.Tensor, window: int) -> torch.Tensor:
    """Distance [STREAMS, n * window] from each target token back to its last occurrence among the inputs
    of its window up to and including its own position (1: the current input token); NEVER if none."""
    distance = torch.full(targets.shape, NEVER, dtype=torch.int64)
    for row in range(inputs.shape[0]):
        x, y = inputs[row].tolist(), targets[row].tolist()
        for start in range(0, len(x), window):
            last: dict[int, int] = {}
            for t in range(start, start + window):
                last[x[t]] = t
                seen = last.get(y[t])
                if seen is not None:
                    distance[row, t] = t + 1 - seen
    return distance


def report(title: str, buckets: list[tuple[str, torch.Tensor]], loss_a: torch.Tensor, loss_b: torch.Tensor) -> None:
    gap = (loss_b - loss_a).sum()
    print(f"\n{title:>20} | tokens | {'A':>6} | {'B':>6} |  B − A | share of the gap")
    for label, mask in buckets:
        if not mask.any():
            continue
        diff = loss_b[mask] - loss_a[mask]
        print(f"{label:>20} | {mask.float().mean():6.3f} | {loss_a[mask].mean():6.3f} | {loss_b[mask].mean():6.3f} | "
              f"{diff.mean():+6.3f} | {float(diff.sum() / gap):+.2f}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_a", help="checkpoint or run folder of model A (the reference)")
    parser.add_argument("run_b", help="checkpoint or run folder of model B")
    parser.add_argument("--data", required=True, help="the text both were trained on")
    parser.add_argument("--val-fraction", type=float, default=0.1, help="the runs' data.val_fraction (default 0.1)")
    parser.add_argument("--window", type=int, default=256, help="tokens per window: the runs' seq_len (default 256)")
    parser.add_argument("--cache", default=None, help="token cache folder (default: a temporary one)")
    args = parser.parse_args(argv)
    torch.set_grad_enabled(False)

    losses, ids_seen = [], None
    scratch = tempfile.TemporaryDirectory()
    for run in (args.run_a, args.run_b):
        model, tokenizer, _ = load_model_and_tokenizer(run)
        cache = Path(args.cache or scratch.name)
        data = prepare_tokens(resolve_source(args.data), tokenizer, cache, log=lambda line: None)
        ids = data.window(data.split_point(args.val_fraction), len(data))
        if ids_seen is not None and not torch.equal(ids, ids_seen):
            raise ValueError(f"{args.run_a} and {args.run_b} tokenize the data differently")
        ids_seen = ids
        rows = streams_of(ids, args.window)
        losses.append(token_losses(model, rows, args.window))
        print(f"{run}: {type(model).__name__}, mean loss {losses[-1].mean():.4f} over {losses[-1].numel():,} tokens")
    loss_a, loss_b = losses
    print(f"gap (B − A): {(loss_b - loss_a).mean():+.4f} nats per token")

    inputs, targets = rows[:, :-1], rows[:, 1:]
    position = torch.arange(inputs.shape[1]).expand_as(inputs) % args.window
    edges = [e for e in POSITION_EDGES if e < args.window] + [args.window]
    report("position in window", [(f"{a}-{b}", (position >= a) & (position < b)) for a, b in zip(edges, edges[1:])],
           loss_a, loss_b)
    distance = previous_occurrence(inputs, targets, args.window)
    edges = [e for e in DISTANCE_EDGES if e <= args.window] + [args.window + 1]
    report("previous occurrence", [("none", distance == NEVER)]
           + [(f"{a}-{b - 1}", (distance >= a) & (distance < b)) for a, b in zip(edges, edges[1:])], loss_a, loss_b)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
