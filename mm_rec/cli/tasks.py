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

`--task mqar --protocol zoology` is Zoology's protocol instead (mm_rec.evaluation.mqar_zoology):
their data, a fixed training set trained for epochs, test cells scored after every epoch; it
reads only the model from the recipe, its settings from the options.
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
from mm_rec.evaluation import mqar, mqar_zoology, passkey
from mm_rec.evaluation.train_task import BatchStream, TaskTrainConfig, train_on_task
from mm_rec.evaluation.training_state import STATE_FILE
from mm_rec.loading import build_model, load_model
from mm_rec.training.config import apply_overrides
from mm_rec.utils.atomic import replace_file
from mm_rec.utils.device import autocast_for, resolve_device, resolve_precision

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
    _add_shared(parser, "--set", dest="overrides", metavar="KEY=VALUE", nargs="+", action="extend", default=[],
                help="with --train: override recipe keys, e.g. --set model.window_size=0 model.level2=mean; with "
                     "--checkpoint: model settings without parameters of their own, e.g. model.kept_age_bias=capped or "
                     "model.delta_decay_scale=0.25 (the ablations of docs/quality.md)")
    group = parser.add_argument_group("mqar and passkey")
    group.add_argument("--train", action="store_true", help="train on the task first (recipe: <task>.train)")
    group.add_argument("--steps", type=int, help="training steps (overrides the recipe)")
    group.add_argument("--time-budget", type=float, help="stop training after this many seconds")
    group.add_argument("--resume", action="store_true",
                       help=f"with --train: continue the run in --out from its {STATE_FILE} (written at every "
                            "evaluation; zoology: every epoch) as the uninterrupted run would have gone on; the "
                            "same options but --time-budget (and --compile)")
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
    group.add_argument("--lr", type=float, help="peak learning rate (overrides the recipe; zoology: "
                       f"default {ZOOLOGY_LR})")
    add_zoology_arguments(parser)
    longdoc.add_arguments(parser)


def _train_config(section: dict, args: argparse.Namespace) -> TaskTrainConfig:
    overrides = {"steps": args.steps, "time_budget_s": args.time_budget, "lr": args.lr}
    return TaskTrainConfig.from_dict({**section, **{k: v for k, v in overrides.items() if v is not None}})


def _prepare_model(args: argparse.Namespace, recipe: dict) -> tuple[nn.Module, torch.device]:
    device = resolve_device(args.device or "auto")
    torch.manual_seed(args.seed)
    if args.checkpoint:
        model = load_model(args.checkpoint)
        changes = getattr(args, "model_changes", None)
        if changes:  # settings without parameters of their own (e.g. kept_age_bias): same weights
            rebuilt = type(model)(model.config.replace(**changes))
            weights, shapes = model.state_dict(), {k: v.shape for k, v in rebuilt.state_dict().items()}
            differ = sorted(set(shapes) ^ set(weights)
                            | {k for k in weights if k in shapes and shapes[k] != weights[k].shape})
            if differ:
                raise ValueError(f"--set model.{', model.'.join(changes)} changes the checkpoint's parameters "
                                 f"({', '.join(differ[:3])}, ...): only settings without parameters of their own "
                                 "can change at evaluation")
            rebuilt.load_state_dict(weights)
            model = rebuilt
    elif args.train and args.config:
        model = build_model(MMRecConfig.from_recipe(recipe), recipe.get("model_type", "mmrec"))
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
        curve = train_on_task(model, BatchStream(next_batch, stream.get_state, stream.set_state),
                              lambda m: mqar.score_mqar(m, held_out, rows).accuracy, train_config,
                              **_state_options(args))
        save_trained(args, model)

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
        curve = train_on_task(model, BatchStream(next_batch, stream.getstate, stream.setstate),
                              lambda m: passkey.score_passkey(m, held_out, batch_size=rows).accuracy, train_config,
                              **_state_options(args))
        save_trained(args, model)

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


def _state_options(args: argparse.Namespace) -> dict:
    """train_on_task's state_path (with --out: the run's state, written as it trains) and resume."""
    return dict(state_path=Path(args.out) / STATE_FILE if args.out else None, resume=getattr(args, "resume", False))


def save_trained(args: argparse.Namespace, model: nn.Module) -> None:
    """With --out, the trained model is written as soon as training ends, before the (long) scoring: a
    scoring run that fails or is stopped leaves the weights, to score again with --checkpoint."""
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        model.save_pretrained(args.out)
        print(f"trained model written to {args.out}", flush=True)


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
    _check_protocol_options(args)
    if getattr(args, "resume", False) and not (args.train and args.out):
        raise ValueError("--resume continues a training run written in --out: add --train and --out DIR")
    recipe = load_mapping(args.config) if args.config else {}
    if getattr(args, "overrides", None):
        if args.train:
            recipe = apply_overrides(recipe, args.overrides)
        else:
            changes = apply_overrides({}, args.overrides)
            if set(changes) != {"model"}:
                raise ValueError("without --train, --set changes only model.* settings of the checkpoint "
                                 "(e.g. --set model.kept_age_bias=capped)")
            args.model_changes = changes["model"]
    runner = _run_mqar_zoology if args.protocol == "zoology" else runners[args.task]
    report, model = runner(args, recipe)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        report.update(model=type(model).__name__, parameters=model.num_parameters(), checkpoint=args.checkpoint,
                      overrides=list(getattr(args, "overrides", None) or []),
                      config=args.config, seed=args.seed)
        (out / f"{args.task}_results.json").write_text(json.dumps(report, indent=2) + "\n")
        print(f"results written to {out / f'{args.task}_results.json'}" + (f", model to {out}" if args.train else ""))
    return 0


# ---------------------------------------------------------------------- --task mqar --protocol zoology
PROTOCOLS = ("stream", "zoology")
ZOOLOGY_LR, ZOOLOGY_MAX_EPOCHS, ZOOLOGY_TRAIN_ROWS = 1e-3, 64, 100_000
# options that belong to one protocol only (dest names); the others are shared
ZOOLOGY_OPTIONS = ("train_sets", "test_sets", "train_rows", "test_rows", "max_epochs", "train_batch_size", "power_a",
                   "random_non_queries", "target_accuracy", "compile")
STREAM_OPTIONS = ("steps", "train_length", "lengths", "samples", "pairs", "queries", "alpha")
ZOOLOGY_HELP = f"""\
Zoology's MQAR protocol: their data (keys from [1, V/2), values from [V/2, V), power-law query
gaps, answers at the queries), a fixed training set trained for epochs, test cells scored after
every epoch, early stop above --target-accuracy on the first test cell. Cells are T:P or T:P:ROWS
(T tokens per row, P key-value pairs). Shared with the stream protocol: --train, --config (its
model section), --checkpoint, --vocab (default {mqar_zoology.ZOOLOGY_VOCAB}), --lr, --time-budget (stop after the
epoch that crosses it), --seed, --out (mqar_results.json and the training state, rewritten after every
epoch: a run stopped by its budget or interrupted continues with the same command and --resume).
  mmrec eval --task mqar --protocol zoology --train --config RECIPE --lr 1e-3 --out DIR
  mmrec eval --task mqar --protocol zoology --train --config RECIPE --lr 1e-3 --out DIR --resume
  mmrec eval --task mqar --protocol zoology --checkpoint DIR --test-sets 512:64,1024:128"""


def add_zoology_arguments(parser: argparse.ArgumentParser) -> None:
    """--protocol and the options of `--protocol zoology` (called by add_eval_task_arguments)."""
    group = parser.add_argument_group("mqar --protocol zoology", ZOOLOGY_HELP)
    group.add_argument("--protocol", choices=PROTOCOLS, default="stream",
                       help="mqar: stream (fresh batches from mm_rec.evaluation.mqar for --steps) or zoology")
    group.add_argument("--train-sets", metavar="CELLS",
                       help=f"training cells (default: Zoology's mix {mqar_zoology.ZOOLOGY_TRAIN_SETS})")
    group.add_argument("--test-sets", metavar="CELLS",
                       help="test cells, each scored on its own; the first decides the early stop "
                            f"(default: {mqar_zoology.ZOOLOGY_TEST_SETS})")
    group.add_argument("--train-rows", metavar="N", type=int,
                       help=f"rows of a training cell given as T:P (default: {ZOOLOGY_TRAIN_ROWS})")
    group.add_argument("--test-rows", metavar="N", type=int,
                       help=f"rows of a test cell given as T:P (default: {mqar_zoology.ZOOLOGY_TEST_ROWS})")
    group.add_argument("--max-epochs", metavar="N", type=int,
                       help=f"epochs at most; the cosine ends here (default: {ZOOLOGY_MAX_EPOCHS})")
    group.add_argument("--train-batch-size", metavar="N", type=int,
                       help="rows per step at every length (default: Zoology's rule: 512 at T <= 128, then 64K "
                            "tokens: 256 at T = 256, 128 at 512, 64 at 1024)")
    group.add_argument("--power-a", metavar="A", type=float,
                       help="power-law parameter of the query gaps (default: 0.01)")
    group.add_argument("--random-non-queries", action=argparse.BooleanOptionalAction, default=None,
                       help="fill the query region between the queries with random tokens, or zeros "
                            "(default: random, as Zoology's generator)")
    group.add_argument("--target-accuracy", metavar="A", type=float,
                       help="stop once the first test cell's accuracy exceeds this (default: 0.99)")
    group.add_argument("--compile", action="store_true", help="torch.compile each block (GPU runs)")


def _check_protocol_options(args: argparse.Namespace) -> None:
    """ValueError for options of the other protocol: they would be ignored silently otherwise."""
    def given(names: tuple[str, ...]) -> list[str]:
        return ["--" + name.replace("_", "-") for name in names if getattr(args, name, None) not in (None, False)]

    if args.protocol == "zoology":
        if args.task != "mqar":
            raise ValueError(f"--protocol zoology is a protocol of --task mqar, not of --task {args.task}")
        if given(STREAM_OPTIONS):
            raise ValueError(f"{', '.join(given(STREAM_OPTIONS))}: not options of --protocol zoology "
                             "(it takes --train-sets, --test-sets, --max-epochs, ...; see --help)")
    elif given(ZOOLOGY_OPTIONS):
        raise ValueError(f"{', '.join(given(ZOOLOGY_OPTIONS))}: options of --protocol zoology "
                         "(add --protocol zoology)")


def _zoology_config(args: argparse.Namespace) -> mqar_zoology.ZoologyConfig:
    vocab = args.vocab or mqar_zoology.ZOOLOGY_VOCAB
    for name in ("train_rows", "test_rows", "max_epochs", "train_batch_size"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} {getattr(args, name)}: must be a positive integer")
    if args.lr is not None and not args.lr > 0:
        raise ValueError(f"--lr {args.lr}: must be > 0")
    if args.power_a is not None and not args.power_a > 0:
        raise ValueError(f"--power-a {args.power_a}: must be > 0")
    if args.time_budget is not None and not args.time_budget > 0:
        raise ValueError(f"--time-budget {args.time_budget}: must be > 0 seconds")
    training = ("train_sets", "train_rows", "max_epochs", "train_batch_size", "lr", "time_budget", "target_accuracy",
                "compile")
    given = ["--" + name.replace("_", "-") for name in training if getattr(args, name) not in (None, False)]
    if given and not args.train:
        raise ValueError(f"{', '.join(given)}: training options; add --train (without it the model is only scored)")
    train_sets = mqar_zoology.parse_cells(args.train_sets or mqar_zoology.ZOOLOGY_TRAIN_SETS,
                                          args.train_rows or ZOOLOGY_TRAIN_ROWS, vocab, "--train-sets") \
        if args.train else ()
    test_sets = mqar_zoology.parse_cells(args.test_sets or mqar_zoology.ZOOLOGY_TEST_SETS,
                                         args.test_rows or mqar_zoology.ZOOLOGY_TEST_ROWS, vocab, "--test-sets")
    options = dict(power_a=args.power_a, random_non_queries=args.random_non_queries,
                   target_accuracy=args.target_accuracy, time_budget_s=args.time_budget)
    return mqar_zoology.ZoologyConfig(vocab_size=vocab, train_sets=train_sets, test_sets=test_sets,
                                      lr=args.lr or ZOOLOGY_LR, max_epochs=args.max_epochs or ZOOLOGY_MAX_EPOCHS,
                                      batch_size=args.train_batch_size, compile=args.compile, seed=args.seed,
                                      **{k: v for k, v in options.items() if v is not None})


def state_size(model: nn.Module, seq_len: int) -> tuple[int, str]:
    """(values a model keeps per sequence, what they are): MM-Rec's recurrent state (`mmrec info`'s
    count: every piece of init_state(1) but the position; constant in T), the Transformer's KV
    cache at `seq_len`."""
    if hasattr(model, "init_state"):
        state = model.init_state(1, device="meta")
        return (sum(t.numel() for k, t in state.state_dict().items() if k != "position"),
                "recurrent state (init_state(1)), independent of T")
    config = model.config
    return (mqar_zoology.transformer_cache_size(config.num_layers, config.hidden_dim, seq_len),
            f"KV cache at T = {seq_len} (2 * layers * T * hidden_dim)")


def _write_json(path: Path, report: dict) -> None:
    """Write `report` so that a reader sees the old file or the new one, never half of one."""
    replace_file(path, lambda staging: staging.write_text(json.dumps(report, indent=2) + "\n"))


def _run_mqar_zoology(args: argparse.Namespace, recipe: dict) -> tuple[dict, nn.Module]:
    config = _zoology_config(args)
    model, device = _prepare_model(args, recipe)
    if model.config.vocab_size < config.vocab_size:
        raise ValueError(f"the model's vocabulary ({model.config.vocab_size}) is smaller than the task's "
                         f"({config.vocab_size}): set model.vocab_size in the recipe, or --vocab")
    main = config.test_sets[0]
    floats, floats_what = state_size(model, main.seq_len)
    def cells(sets: tuple[mqar_zoology.MQARCell, ...]) -> str:
        return ", ".join(f"{c.name} x {c.rows}" for c in sets)

    print(f"MQAR, Zoology's protocol: {type(model).__name__} ({model.num_parameters() / 1e6:.2f}M parameters, "
          f"{floats:,} values of state per sequence: {floats_what}), vocab {config.vocab_size}, "
          f"chance {mqar_zoology.chance_accuracy(config.vocab_size):.5f}")
    print(f"train {cells(config.train_sets)}; test {cells(config.test_sets)}; power_a {config.power_a}, "
          f"random non-queries {config.random_non_queries}")
    tests = mqar_zoology.build_test_sets(config, device)
    settings = dict(asdict(config), main_cell=main.name, device=str(device),
                    precision=resolve_precision("auto", device))
    report = dict(task="mqar", protocol="zoology", recipe=recipe, model_config=model.config.to_dict(),
                  model=type(model).__name__, parameters=model.num_parameters(), state_size=floats,
                  state_size_kind=floats_what, chance=mqar_zoology.chance_accuracy(config.vocab_size),
                  settings=settings, seed=args.seed)
    out = Path(args.out) / "mqar_results.json" if args.out else None

    def fill(result: mqar_zoology.ZoologyResult) -> dict:
        reached = result.first_above(main.name, config.target_accuracy)
        settings.update(batch_sizes=result.batch_sizes, steps_per_epoch=result.steps_per_epoch,
                        warmup_steps=result.warmup_steps, planned_steps=result.planned_steps)
        return dict(report, curve=[asdict(p) for p in result.curve], best_accuracy=result.best_accuracy,
                    target_reached=None if reached is None else dict(epoch=reached.epoch, step=reached.step,
                                                                     seconds=reached.seconds),
                    stopped=result.stopped or "running", epochs=len(result.curve),
                    steps=result.curve[-1].step if result.curve else 0,
                    results=[dict(seq_len=c.seq_len, num_pairs=c.num_pairs, rows=c.rows,
                                  accuracy=result.curve[-1].accuracy[c.name],
                                  best_accuracy=result.best_accuracy[c.name]) for c in config.test_sets])

    if args.train:
        groups = mqar_zoology.build_train_groups(config, device)
        print("rows per step: " + ", ".join(f"{g.batch_size} at T = {g.seq_len}" for g in groups))
        result = mqar_zoology.train_zoology(model, groups, tests, config,
                                            on_epoch=(lambda r: _write_json(out, fill(r))) if out else None,
                                            **_state_options(args))
        save_trained(args, model)
        report = fill(result)
        best = "  ".join(f"{name} {acc:.4f}" for name, acc in result.best_accuracy.items())
        reached = report["target_reached"]
        print(f"best accuracy {best}; {main.name} above {config.target_accuracy}: "
              + (f"epoch {reached['epoch']}, step {reached['step']}" if reached else "not reached"))
    else:  # score a given model once
        accuracy = mqar_zoology.evaluate(model, tests, device)
        report.update(results=[dict(seq_len=c.seq_len, num_pairs=c.num_pairs, rows=c.rows,
                                    accuracy=accuracy[c.name]) for c in config.test_sets])
        print("accuracy " + "  ".join(f"{name} {acc:.4f}" for name, acc in accuracy.items()))
    model.eval()
    return report, model
