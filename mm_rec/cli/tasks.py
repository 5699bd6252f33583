"""`mmrec eval --task mqar|passkey`: train on a long-context recall task (optional), then score
a model on it over lengths (and depths), printing the table and writing <task>_results.json.

A task recipe (`configs/mqar_*.yaml`) is a YAML file with a `model:` section (MMRecConfig fields,
or the Transformer baseline's fields when the top level says `model_type: transformer`) and one
section per task:

    mqar:    vocab_size, seq_len, num_pairs, num_queries, alpha   (MQARConfig; seq_len = training length)
             lengths: [...]  samples: N                            (evaluation: lengths, rows per length)
             train: {steps, batch_size, lr, ...}                   (TaskTrainConfig)
    passkey: train_length, train_lengths: [...] (optional curriculum: one drawn per batch),
             num_digits, lengths: [...], depths: [...], samples: N (prompts per cell)
             train: {...}

The generators and scorers are mm_rec.evaluation.mqar and .passkey, the training loop
mm_rec.evaluation.train_task; this module reads the options and the recipe and wires them up.
"""

from __future__ import annotations

import argparse
import json
import random
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mm_rec.cli import longdoc
from mm_rec.config import MMRecConfig, load_mapping
from mm_rec.evaluation import mqar, passkey
from mm_rec.evaluation.train_task import TaskTrainConfig, train_on_task
from mm_rec.loading import build_model, load_model
from mm_rec.utils.device import autocast_for, resolve_device

TOKENS_PER_FORWARD = 65536  # evaluation rows per forward = this // sequence length (at least 1)
VALIDATION_ROWS = 256  # held-out rows (MQAR) or prompts (passkey) scored during training


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
    and --out are added only where the parser does not have them yet (`mmrec eval` has its own
    --checkpoint and --device), so call this after adding those. The task options are always added."""
    _add_shared(parser, "--task", choices=["mqar", "passkey", "longdoc"], help="evaluation task")
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
    longdoc.add_arguments(parser)


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
    section = dict(recipe.get("mqar") or {})
    train_config = _train_config(section.pop("train", {}), args)
    lengths, samples = section.pop("lengths", None), section.pop("samples", 256)
    overrides = dict(vocab_size=args.vocab, seq_len=args.train_length,
                     num_pairs=args.pairs, num_queries=args.queries, alpha=args.alpha)
    task = mqar.MQARConfig.from_dict({**section, **{k: v for k, v in overrides.items() if v is not None}})
    lengths, samples = args.lengths or lengths or [task.seq_len], args.samples or samples
    model, device = _prepare_model(args, recipe)

    curve = None
    if args.train:
        stream = torch.Generator().manual_seed(args.seed)
        held_out = mqar.generate_mqar(task, VALIDATION_ROWS, seed=args.seed + 1_000_000)

        def next_batch() -> tuple[torch.Tensor, torch.Tensor]:
            batch = mqar.generate_mqar(task, train_config.batch_size, stream)
            return batch.input_ids, batch.labels

        rows = max(1, TOKENS_PER_FORWARD // task.seq_len)
        curve = train_on_task(model, next_batch, lambda m: mqar.score_mqar(m, held_out, rows).accuracy, train_config)

    model.eval()
    chance = mqar.chance_accuracy(task)
    print(f"MQAR: {type(model).__name__} ({model.num_parameters() / 1e6:.2f}M parameters), vocab {task.vocab_size}, "
          f"{task.num_pairs} pairs, {task.queries} queries, alpha {task.alpha}, chance {chance:.4f}")
    print(f"{'seq_len':>8}  {'accuracy':>8}  by key-to-query distance in tokens (accuracy/queries)")
    results = []
    for length in lengths:
        batch = mqar.generate_mqar(replace(task, seq_len=length), samples, seed=args.seed + 2_000_000)
        with autocast_for("auto", device):
            score = mqar.score_mqar(model, batch, max(1, TOKENS_PER_FORWARD // length))
        buckets = "  ".join(f"{k}: {acc:.2f}/{n}" for k, (acc, n) in score.by_distance.items())
        print(f"{length:>8}  {score.accuracy:8.4f}  {buckets}")
        results.append(dict(seq_len=length, accuracy=score.accuracy, num_queries=score.num_queries,
                            by_distance=score.by_distance))
    report = dict(task="mqar", mqar=asdict(task), chance=chance, results=results,
                  train=asdict(train_config) if args.train else None,
                  curve=[asdict(p) for p in curve] if curve else None)
    return report, model


def _run_passkey(args: argparse.Namespace, recipe: dict) -> tuple[dict, nn.Module]:
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
        held_out = passkey.make_passkey_batch(train_length, VALIDATION_ROWS, f"passkey-valid-{args.seed}", None, digits)

        def next_batch() -> tuple[torch.Tensor, torch.Tensor]:
            length = stream.choice(train_lengths)
            batch = passkey.make_passkey_batch(length, train_config.batch_size, stream, None, digits)
            return batch.input_ids, batch.labels

        rows = max(1, TOKENS_PER_FORWARD // train_length)
        curve = train_on_task(model, next_batch, lambda m: passkey.score_passkey(m, held_out, batch_size=rows).accuracy,
                              train_config)

    model.eval()
    with autocast_for("auto", device):
        records = passkey.passkey_grid(model, lengths, depths, samples, args.seed, digits, args.decode,
                                       TOKENS_PER_FORWARD)
    print(f"passkey: {type(model).__name__} ({model.num_parameters() / 1e6:.2f}M parameters), {digits} digits, "
          f"{samples} prompts per cell, {args.decode}; accuracy by length (rows) and depth (columns)")
    print(f"{'length':>8}" + "".join(f"{d:>8.2f}" for d in depths) + f"{'mean':>8}")
    for length in lengths:
        row = [r for r in records if r["length"] == length]
        done = [r["accuracy"] for r in row if r["accuracy"] is not None]
        print(f"{length:>8}" + "".join(f"{r['accuracy']:8.3f}" if r["accuracy"] is not None else f"{'-':>8}"
                                       for r in row) + (f"{sum(done) / len(done):8.3f}" if done else ""))
    for reason in sorted({f"{r['length']}: {r['not_run']}" for r in records if r["not_run"]}):
        print(f"not run (-): {reason}")
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
    if args.task == "longdoc":  # scores a trained checkpoint: mm_rec.cli.longdoc
        return longdoc.run(args)
    runners = {"mqar": _run_mqar, "passkey": _run_passkey}
    if args.task not in runners:
        raise ValueError(f"run_eval_task handles --task mqar or passkey, got {args.task!r}")
    if args.seed is None:  # a --seed of the caller's parser (add_eval_task_arguments keeps it) may default to None
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
