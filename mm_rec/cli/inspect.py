"""`mmrec inspect`: what the memory of a checkpoint does on a text (time scales, where tokens read:
window, slots by age, null; write pooling, the delta rule's gates, the slots kept by importance),
printed per layer and written as a PNG with the numbers beside it as JSON (mm_rec.evaluation.inspect)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from mm_rec.cli.common import EXIT_FAILED, HelpFormatter
from mm_rec.evaluation.inspect import decay_spectra, memory_usage, plot_memory
from mm_rec.loading import load_model
from mm_rec.utils.device import resolve_device


def add_parser(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser("inspect", help="what the memory reads, writes and keeps on a text, as a PNG",
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
    usage = memory_usage(model, torch.tensor(list(data))[None])
    summary = []
    for layer, (decay, use) in enumerate(zip(spectra, usage)):
        print(f"layer {layer}: median core decay time constant {decay.time_constants.median():.3g} tokens")
        for k in range(model.config.num_memories):
            window, slots, null = use.read_mass[k].tolist()
            ages = torch.arange(1, use.slot_age_mass.shape[1] + 1, dtype=torch.float64)
            mean_age = (use.slot_age_mass[k] * ages).sum() / use.slot_age_mass[k].sum().clamp_min(1e-12)
            line = (f"  bank {k}: reads window {window:.2f} / slots {slots:.2f} (mean age {mean_age:.3g} blocks) / "
                    f"null {null:.2f}; level weights {decay.level_weights[k, 0]:.2f} attention, "
                    f"{decay.level_weights[k, 1]:.2f} level 2 (tau {decay.level2_time_constants[k]:.3g} tokens)")
            if use.level2_beta is not None:
                line += f"; delta rule: mean write {use.level2_beta[k]:.2f}, mean decay {use.level2_alpha[k]:.4f}"
            if model.config.slot_write == "attention":
                line += f"; write peak share {use.write_peak[k]:.2f}"
            if use.kept_age.numel():
                kept = use.kept_age[k][use.kept_age[k] >= 0]
                if kept.numel():
                    line += f"; {kept.numel()} kept slots, oldest {int(kept.max())} blocks"
            print(line)
        summary.append(dict(gamma=decay.gamma.tolist(), level2_lambda=decay.level2_lambda.tolist(),
                            age_slope=decay.age_slope.tolist(), level_weights=decay.level_weights.tolist(),
                            **use.as_dict()))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(dict(checkpoint=str(args.checkpoint), text=str(args.text),
                                                        tokens=len(data), layers=summary)) + "\n")
    try:
        plot_memory(spectra, usage, out, model.config.chunk_size,
                    title=f"{args.checkpoint} on {Path(args.text).name} ({len(data)} tokens)")
    except ImportError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_FAILED
    print(f"wrote {out} and {out.with_suffix('.json')}")
    return 0
