"""Evaluation: long-context recall tasks, memory inspection, and their command line entries.

    mm_rec.evaluation.mqar        multi-query associative recall: generator and scorer
    mm_rec.evaluation.passkey     a number hidden at a chosen depth in filler text: generator and scorer
    mm_rec.evaluation.inspect     decay spectra and attention over slot ages, as a PNG
    mm_rec.evaluation.scoring     argmax predictions at chosen positions (what the scorers share)
    mm_rec.evaluation.train_task  a small training loop on synthetic task batches

This module holds the entries that the CLI wires in:

    add_eval_task_arguments(parser); run_eval_task(args)   # mmrec eval --task mqar|passkey
    add_inspect_arguments(parser);   run_inspect(args)     # mmrec inspect

The MQAR and passkey modules import from this one, so it imports them inside its functions.

A task recipe (`configs/mqar_*.yaml`) is a YAML file with a `model:` section (MMRecConfig fields,
or the Transformer baseline's fields when the top level says `model_type: transformer`) and one
section per task:

    mqar:    vocab_size, seq_len, num_pairs, num_queries, alpha   (MQARConfig; seq_len = training length)
             lengths: [...]  samples: N                            (evaluation: lengths, rows per length)
             train: {steps, batch_size, lr, ...}                   (TaskTrainConfig)
    passkey: train_length, train_lengths: [...] (optional curriculum: one drawn per batch),
             num_digits, lengths: [...], depths: [...], samples: N (prompts per cell)
             train: {...}
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mm_rec.config import MMRecConfig, load_mapping
from mm_rec.evaluation.inspect import decay_spectra, plot_memory, slot_age_attention
from mm_rec.evaluation.train_task import TaskTrainConfig, train_on_task
from mm_rec.loading import build_model, load_model
from mm_rec.utils.device import autocast_for, resolve_device

TOKENS_PER_FORWARD = 65536  # evaluation rows per forward = this // sequence length (at least 1)
VALIDATION_ROWS = 256  # held-out rows (MQAR) or prompts (passkey) scored during training


# ---------------------------------------------------------------------- command line: mmrec eval --task mqar|passkey
def _length(text: str) -> int:
    """'512' -> 512, '32k' or '32K' -> 32768."""
    return int(text[:-1]) * 1024 if text[-1:] in ("k", "K") else int(text)


def _lengths(text: str) -> list[int]:
    return [_length(v) for v in text.split(",")]


def _floats(text: str) -> list[float]:
    return [float(v) for v in text.split(",")]


def _add_shared(parser: argparse.ArgumentParser, *flags: str, **kwargs: Any) -> None:
    """Add an option unless the CLI's own parser defines it already (--task, --checkpoint, ...)."""
    try:
        parser.add_argument(*flags, **kwargs)
    except argparse.ArgumentError:
        pass


def add_eval_task_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `mmrec eval --task mqar|passkey`. --task, --checkpoint, --config, --device, --seed
    and --out are added only where the parser does not have them yet, so call this after the CLI
    has added its own (its --task also offering ppl). The task options below are always added."""
    _add_shared(parser, "--task", choices=["mqar", "passkey"], help="evaluation task")
    _add_shared(parser, "--checkpoint", help="model folder (save_pretrained, or a run folder: its newest checkpoint); "
                "with --train: the initial weights")
    _add_shared(parser, "--config", help="task recipe YAML: model section and mqar/passkey sections")
    _add_shared(parser, "--device", help="cuda or cpu (default: cuda when available)")
    _add_shared(parser, "--seed", type=int, default=0, help="seed of the model init and every task batch")
    _add_shared(parser, "--out", help="directory for <task>_results.json (and the model trained with --train)")
    group = parser.add_argument_group("mqar and passkey")
    group.add_argument("--train", action="store_true", help="train on the task first (recipe: <task>.train)")
    group.add_argument("--steps", type=int, help="training steps (overrides the recipe)")
    group.add_argument("--time-budget", type=float, help="stop training after this many seconds")
    group.add_argument("--train-length", type=_length, help="training sequence length (one value; 2k = 2048)")
    group.add_argument("--lengths", type=_lengths, help="evaluation lengths, e.g. 512,2k,32k")
    group.add_argument("--samples", type=int, help="evaluation rows per length (mqar) or prompts per cell (passkey)")
    group.add_argument("--vocab", type=int, help="mqar: vocabulary of the task (keys and values)")
    group.add_argument("--pairs", type=int, help="mqar: key-value pairs per row")
    group.add_argument("--queries", type=int, help="mqar: queries per row (default: one per pair)")
    group.add_argument("--alpha", type=float, help="mqar: power-law exponent of the query gaps")
    group.add_argument("--depths", type=_floats, help="passkey: depths in [0, 1], e.g. 0,0.5,1")
    group.add_argument("--digits", type=int, help="passkey: digits of the key")
    group.add_argument("--decode", choices=["teacher_forced", "greedy"], default="teacher_forced",
                       help="passkey: one teacher-forced forward, or model.generate")


def _train_config(section: dict, args: argparse.Namespace) -> TaskTrainConfig:
    overrides = {"steps": args.steps, "time_budget_s": args.time_budget}
    return TaskTrainConfig.from_dict({**section, **{k: v for k, v in overrides.items() if v is not None}})


def _prepare_model(args: argparse.Namespace, recipe: dict) -> tuple[nn.Module, torch.device]:
    device = resolve_device(args.device or "auto")
    torch.manual_seed(args.seed)
    if args.checkpoint:
        model = load_model(args.checkpoint)
    elif args.train and args.config:
        model = build_model(MMRecConfig.from_file(args.config), recipe.get("model_type", "mmrec"))
    else:
        raise ValueError("give --checkpoint DIR (a saved model), or --train with --config RECIPE")
    return model.to(device), device


def _run_mqar(args: argparse.Namespace, recipe: dict) -> tuple[dict, nn.Module]:
    from mm_rec.evaluation.mqar import MQARConfig, chance_accuracy, generate_mqar, score_mqar

    section = dict(recipe.get("mqar") or {})
    train_config = _train_config(section.pop("train", {}), args)
    lengths, samples = section.pop("lengths", None), section.pop("samples", 256)
    overrides = dict(vocab_size=args.vocab, seq_len=args.train_length,
                     num_pairs=args.pairs, num_queries=args.queries, alpha=args.alpha)
    task = MQARConfig.from_dict({**section, **{k: v for k, v in overrides.items() if v is not None}})
    lengths, samples = args.lengths or lengths or [task.seq_len], args.samples or samples
    model, device = _prepare_model(args, recipe)

    curve = None
    if args.train:
        stream = torch.Generator().manual_seed(args.seed)
        held_out = generate_mqar(task, VALIDATION_ROWS, seed=args.seed + 1_000_000)

        def next_batch() -> tuple[torch.Tensor, torch.Tensor]:
            batch = generate_mqar(task, train_config.batch_size, stream)
            return batch.input_ids, batch.labels

        rows = max(1, TOKENS_PER_FORWARD // task.seq_len)
        curve = train_on_task(model, next_batch, lambda m: score_mqar(m, held_out, rows).accuracy, train_config)

    model.eval()
    print(f"MQAR: {type(model).__name__} ({model.num_parameters() / 1e6:.2f}M parameters), vocab {task.vocab_size}, "
          f"{task.num_pairs} pairs, {task.queries} queries, alpha {task.alpha}, chance {chance_accuracy(task):.4f}")
    print(f"{'seq_len':>8}  {'accuracy':>8}  by key-to-query distance in tokens (accuracy/queries)")
    results = []
    for length in lengths:
        batch = generate_mqar(replace(task, seq_len=length), samples, seed=args.seed + 2_000_000)
        with autocast_for("auto", device):
            score = score_mqar(model, batch, max(1, TOKENS_PER_FORWARD // length))
        buckets = "  ".join(f"{k}: {acc:.2f}/{n}" for k, (acc, n) in score.by_distance.items())
        print(f"{length:>8}  {score.accuracy:8.4f}  {buckets}")
        results.append(dict(seq_len=length, accuracy=score.accuracy, num_queries=score.num_queries,
                            by_distance=score.by_distance))
    report = dict(task="mqar", mqar=asdict(task), chance=chance_accuracy(task), results=results,
                  train=asdict(train_config) if args.train else None,
                  curve=[asdict(p) for p in curve] if curve else None)
    return report, model


def _run_passkey(args: argparse.Namespace, recipe: dict) -> tuple[dict, nn.Module]:
    from mm_rec.evaluation.passkey import make_passkey_batch, passkey_grid, score_passkey

    section = dict(recipe.get("passkey") or {})
    known = {"train", "train_length", "train_lengths", "num_digits", "lengths", "depths", "samples"}
    if set(section) - known:
        raise ValueError(f"unknown passkey key(s) {sorted(set(section) - known)}; valid keys: {sorted(known)}")
    train_config = _train_config(section.get("train", {}), args)
    train_length = args.train_length or section.get("train_length", 2048)
    # shorter prompts in the mix let the copy mechanism form before it must work at full length
    train_lengths = [train_length] if args.train_length else section.get("train_lengths") or [train_length]
    if max(train_lengths) > train_length:
        raise ValueError(f"passkey.train_lengths {train_lengths} go beyond train_length {train_length}")
    digits = args.digits or section.get("num_digits", 5)
    lengths = args.lengths or section.get("lengths") or [train_length]
    depths = args.depths or section.get("depths") or [0.0, 0.25, 0.5, 0.75, 1.0]
    samples = args.samples or section.get("samples", 8)
    model, device = _prepare_model(args, recipe)

    curve = None
    if args.train:
        stream = random.Random(f"passkey-train-{args.seed}")
        held_out = make_passkey_batch(train_length, VALIDATION_ROWS, f"passkey-valid-{args.seed}", None, digits)

        def next_batch() -> tuple[torch.Tensor, torch.Tensor]:
            length = stream.choice(train_lengths)
            batch = make_passkey_batch(length, train_config.batch_size, stream, None, digits)
            return batch.input_ids, batch.labels

        rows = max(1, TOKENS_PER_FORWARD // train_length)
        curve = train_on_task(model, next_batch, lambda m: score_passkey(m, held_out, batch_size=rows).accuracy,
                              train_config)

    model.eval()
    with autocast_for("auto", device):
        records = passkey_grid(model, lengths, depths, samples, args.seed, digits, args.decode, TOKENS_PER_FORWARD)
    print(f"passkey: {type(model).__name__} ({model.num_parameters() / 1e6:.2f}M parameters), {digits} digits, "
          f"{samples} prompts per cell, {args.decode}; accuracy by length (rows) and depth (columns)")
    print(f"{'length':>8}" + "".join(f"{d:>8.2f}" for d in depths) + f"{'mean':>8}")
    for length in lengths:
        row = [r["accuracy"] for r in records if r["length"] == length]
        print(f"{length:>8}" + "".join(f"{a:8.3f}" for a in row) + f"{sum(row) / len(row):8.3f}")
    report = dict(task="passkey", num_digits=digits, train_length=train_length, train_lengths=train_lengths,
                  decode=args.decode, results=records,
                  train=asdict(train_config) if args.train else None,
                  curve=[asdict(p) for p in curve] if curve else None)
    return report, model


def run_eval_task(args: argparse.Namespace) -> int:
    """Run `mmrec eval --task mqar|passkey` from the options of `add_eval_task_arguments`.

    Prints the results; with --out writes <out>/<task>_results.json, and with --train also the
    trained model (save_pretrained). Returns the process exit code.
    """
    runners = {"mqar": _run_mqar, "passkey": _run_passkey}
    if args.task not in runners:
        raise ValueError(f"run_eval_task handles --task mqar or passkey, got {args.task!r}")
    if args.seed is None:  # a --seed defined by the CLI may default to None
        args.seed = 0
    recipe = load_mapping(args.config) if args.config else {}
    report, model = runners[args.task](args, recipe)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        report.update(model=type(model).__name__, parameters=model.num_parameters(), checkpoint=args.checkpoint,
                      config=args.config, seed=args.seed)
        (out / f"{args.task}_results.json").write_text(json.dumps(report, indent=2) + "\n")
        if args.train:
            model.save_pretrained(out)
        print(f"results written to {out / f'{args.task}_results.json'}" + (f", model to {out}" if args.train else ""))
    return 0


# ---------------------------------------------------------------------- command line: mmrec inspect
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
        return 1
    print(f"wrote {out} and {out.with_suffix('.json')}")
    return 0
