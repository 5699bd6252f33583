"""`mmrec inspect`: decay spectra and slot-age attention of a checkpoint on a text, printed per
layer and written as a PNG with the numbers beside it as JSON (mm_rec.evaluation.inspect)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from mm_rec.cli.common import EXIT_FAILED, HelpFormatter
from mm_rec.evaluation.inspect import decay_spectra, plot_memory, slot_age_attention
from mm_rec.loading import load_model
from mm_rec.utils.device import resolve_device


def add_parser(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser("inspect", help="decay spectra and slot-age attention of a checkpoint, as a PNG",
                            formatter_class=HelpFormatter)
    add_inspect_arguments(p)
    p.set_defaults(func=run_inspect)


def add_inspect_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `mmrec inspect`."""
    parser.add_argument("--checkpoint", required=True,
                        help="MM-Rec model folder (save_pretrained, or a run folder: its newest checkpoint)")
    parser.add_argument("--text", required=True, help="text file whose bytes the model reads (byte-level models)")
    parser.add_argument("--max-tokens", type=int, default=8192, help="read at most this many bytes of the text")
    parser.add_argument("--out", default="memory.png", help="PNG to write; the numbers go beside it as .json")
    parser.add_argument("--device", help="cuda or cpu (default: cuda when available)")


def run_inspect(args: argparse.Namespace) -> int:
    """Decay spectra and slot-age attention of a checkpoint on a text: prints a summary per layer,
    writes the numbers as JSON and the figure as PNG (exit code 1 when matplotlib is missing)."""
    device = resolve_device(args.device or "auto")
    model = load_model(args.checkpoint, device)
    spectra = decay_spectra(model)  # refuses models other than MM-Rec
    if model.config.vocab_size < 256:
        raise ValueError(f"mmrec inspect feeds the text's bytes, the model's vocab_size is {model.config.vocab_size}")
    data = Path(args.text).read_bytes()[:args.max_tokens]
    if not data:
        raise ValueError(f"{args.text} is empty")
    mass = slot_age_attention(model, torch.tensor(list(data))[None])
    S = model.config.memory_size_M
    ages = torch.arange(1, S + 1, dtype=torch.float64)
    summary = []
    for layer, (decay, m) in enumerate(zip(spectra, mass)):
        print(f"layer {layer}: median core decay time constant {decay.time_constants.median():.3g} tokens")
        mean_age = (m[:, :S] * ages).sum(-1) / m[:, :S].sum(-1).clamp_min(1e-12)
        for k, (tau, slope, null, age) in enumerate(zip(decay.aggregate_time_constants.tolist(),
                                                        decay.age_slope.tolist(), m[:, S].tolist(), mean_age.tolist())):
            print(f"  bank {k}: level-2 time constant {tau:.3g} tokens, age slope {slope:.3g}, "
                  f"null-slot mass {null:.3f}, mean slot age {age:.3g} blocks")
        summary.append(dict(gamma=decay.gamma.tolist(), aggregate_lambda=decay.aggregate_lambda.tolist(),
                            age_slope=decay.age_slope.tolist(), slot_age_mass=m.tolist()))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(dict(checkpoint=str(args.checkpoint), text=str(args.text),
                                                        tokens=len(data), layers=summary)) + "\n")
    try:
        plot_memory(spectra, mass, out, title=f"{args.checkpoint} on {Path(args.text).name} ({len(data)} tokens)")
    except ImportError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_FAILED
    print(f"wrote {out} and {out.with_suffix('.json')}")
    return 0
