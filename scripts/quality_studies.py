"""Run the quality studies of docs/quality.md, then turn their results into its tables and plots.

    python scripts/quality_studies.py lm      --data-dir DIR --out runs/quality   # study 1: 8 training runs
    python scripts/quality_studies.py mqar    --out runs/quality                  # study 2: the MQAR grid
    python scripts/quality_studies.py mqar-zoology --out runs/quality --compile   # study 2b: MQAR, Zoology's protocol
    python scripts/quality_studies.py passkey --out runs/quality                  # study 3: passkey, 3 models
    python scripts/quality_studies.py longdoc --out runs/quality                  # study 4: 3 trainings, 3 evals
    python scripts/quality_studies.py report  --out runs/quality --docs docs      # tables (stdout) and PNGs

Each study is a list of `mmrec` commands (printed before they run, so every number can be
reproduced one command at a time), run `--jobs` at a time; small models leave a GPU mostly idle,
so several share it. `--job-timeout` interrupts a command (SIGINT: the trainer saves and its
metrics so far stay); `--smoke` shrinks every run to a few steps for a check on a CPU.
Every run writes into OUT/<study>/<run>/: metrics.jsonl (lm) or <task>_results.json, and log.txt.
`report` reads every study's runs it finds.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"


@dataclass
class Job:
    name: str  # OUT/<study>/<name>
    argv: list[str]  # after `python -m mm_rec`


# ---------------------------------------------------------------------- study 1: language modelling
# (dataset, recipe, data file); each dataset's four variants share the recipe's data, steps and schedule
LM_DATASETS = {
    "shakespeare": ("shakespeare_char.yaml", "tinyshakespeare.txt"),
    "tinystories": ("tinystories_bpe.yaml", "tinystories_subset.txt"),
}
LM_VARIANTS = {  # name -> (recipe suffix, --set overrides)
    "mmrec": ("", []),
    "transformer": ("_transformer", []),
    "mmrec_no_memory": ("", ["model.memory_size_M=0"]),
    "mmrec_gate_input": ("", ["model.gate_input=input"]),
}


def lm_jobs(args: argparse.Namespace) -> list[Job]:
    jobs = []
    for dataset, (recipe, data_file) in LM_DATASETS.items():
        for variant, (suffix, overrides) in LM_VARIANTS.items():
            config = CONFIGS / recipe.replace(".yaml", f"{suffix}.yaml")
            sets = list(overrides)
            if args.smoke:
                sets += ["training.max_steps=4", "training.eval_interval=2", "training.eval_tokens=4096",
                         "training.batch_size=2", "training.sample_tokens=0", "training.device=cpu"]
            argv = ["train", "--config", str(config), "--data", str(Path(args.data_dir) / data_file),
                    "--seed", "0", "--out", str(Path(args.out) / "lm" / f"{dataset}_{variant}")]
            jobs.append(Job(f"{dataset}_{variant}", argv + (["--set", *sets] if sets else [])))
    return jobs


# ---------------------------------------------------------------------- study 2: MQAR over lengths, pairs and widths
MQAR_TASKS = [(64, 4), (128, 8), (256, 16), (512, 64), (1024, 256)]  # (sequence length, key-value pairs)
MQAR_WIDTHS = [64, 128, 256]
MQAR_ABLATION_WIDTH = 128
MQAR_ABLATION_TASKS = [(64, 4), (256, 16), (512, 64)]  # the CPU cells and the target cell
MQAR_MAX_LENGTH = 1024  # the models' max_seq_len; rows are also scored at 4x and 16x the training length up to it
ABLATIONS = {  # MM-Rec's memory pieces switched off one at a time (docs/architecture.md), as --set overrides
    "no_ring": {"memory_size_M": 0},
    "no_window": {"window_size": 0},
    "level2_mean": {"level2": "mean"},
    "state_input": {"memory_input": "state", "conv_size": 0},
    "no_conv": {"conv_size": 0},
    "conv_random": {"conv_init": "random"},
    "slot_mean": {"slot_write": "mean"},
    "retention_age": {"retention": "age"},
}
MQAR_VOCAB = 1024  # keys and values from disjoint halves: up to 512 pairs


def mqar_model(width: int, model_type: str, vocab_size: int = MQAR_VOCAB) -> dict:
    """Two layers of `width`, as the published MQAR comparisons (Zoology); the memory's ring spans
    S * C = 64 * 16 = 1024 tokens, the longest row."""
    model = dict(vocab_size=vocab_size, hidden_dim=width, num_layers=2, num_heads=max(1, width // 64),
                 ffn_dim=2 * width, max_seq_len=1024, max_segment_len=1024)
    if model_type == "mmrec":
        model.update(num_memories=2, mem_dim=min(64, width), memory_size_M=64, chunk_size=16, decay_rank=32)
    else:
        model["ffn_dim"] = matching_ffn_dim(model)
    return model


def matching_ffn_dim(transformer_model: dict) -> int:
    """The Transformer FFN width (a multiple of 32) whose parameter count is closest to MM-Rec's with
    the same other sizes and the default memory sizes of `mqar_model`."""
    import torch

    from mm_rec import MMRecConfig
    from mm_rec.loading import build_model

    width = transformer_model["hidden_dim"]
    with torch.device("meta"):
        mmrec = mqar_model(width, "mmrec", transformer_model["vocab_size"])
        target = build_model(MMRecConfig(**mmrec)).num_parameters()
        best = None
        for ffn in range(32, 16 * width + 1, 32):
            config = MMRecConfig(**{**transformer_model, "ffn_dim": ffn})
            count = build_model(config, "transformer").num_parameters()
            if best is None or abs(count - target) < abs(best[1] - target):
                best = (ffn, count)
    return best[0]


def mqar_jobs(args: argparse.Namespace) -> list[Job]:
    recipes = Path(args.out) / "mqar" / "recipes"
    recipes.mkdir(parents=True, exist_ok=True)
    jobs = []
    for width in MQAR_WIDTHS:
        for model_type in ("mmrec", "transformer"):
            recipe = recipes / f"{model_type}_w{width}.yaml"
            train = dict(steps=args.mqar_steps, batch_size=64, lr=1e-3, weight_decay=0.1, warmup_steps=100,
                         eval_every=max(1, args.mqar_steps // 8))
            if args.smoke:
                train.update(steps=3, batch_size=4, eval_every=3, warmup_steps=1)
            recipe.write_text(yaml.safe_dump(dict(model_type=model_type, model=mqar_model(width, model_type),
                                                  mqar=dict(vocab_size=MQAR_VOCAB, alpha=1.0, train=train))))
            for length, pairs in MQAR_TASKS:
                ablations = {"": {}}
                if model_type == "mmrec" and width == MQAR_ABLATION_WIDTH and (length, pairs) in MQAR_ABLATION_TASKS:
                    ablations.update({f"_{name}": overrides for name, overrides in ABLATIONS.items()})
                lengths = sorted({min(length * k, MQAR_MAX_LENGTH) for k in (1, 4, 16)})
                for suffix, overrides in ablations.items():
                    name = f"{model_type}_w{width}{suffix}_T{length}_P{pairs}"
                    argv = ["eval", "--task", "mqar", "--train", "--config", str(recipe), "--train-length", str(length),
                            "--pairs", str(pairs), "--lengths", ",".join(map(str, lengths)),
                            "--samples", "8" if args.smoke else "512",
                            "--seed", "0", "--out", str(Path(args.out) / "mqar" / name)]
                    if overrides:
                        argv += ["--set", *(f"model.{key}={value}" for key, value in overrides.items())]
                    if args.mqar_time_budget:
                        argv += ["--time-budget", str(args.mqar_time_budget)]
                    if args.smoke:
                        argv += ["--device", "cpu"]
                    jobs.append(Job(name, argv))
    return jobs


# ---------------------------------------------------------------------- study 2b: MQAR, Zoology's protocol
ZOOLOGY_WIDTHS = [64, 128, 256]
ZOOLOGY_LRS = [1e-4, 4.6e-4, 2.2e-3, 1e-2]  # Zoology's sweep, np.logspace(-4, -2, 4)
ZOOLOGY_VOCAB = 8192
ZOOLOGY_TEST_SETS = "512:64,64:4,128:8,256:16,256:32,256:64"  # the main cell, then the training cells held out
ZOOLOGY_ABLATION_WIDTH = 128


def zoology_jobs(args: argparse.Namespace) -> list[Job]:
    """Transformer and MM-Rec at every width and learning rate on Zoology's mixed training set,
    plus the MM-Rec ablations at one width: one `mmrec eval --task mqar --protocol zoology` each."""
    from mm_rec.evaluation.mqar_zoology import ZOOLOGY_TRAIN_SETS

    recipes = Path(args.out) / "mqar-zoology" / "recipes"
    recipes.mkdir(parents=True, exist_ok=True)
    variants = [(f"{model_type}_w{width}", model_type, mqar_model(width, model_type, ZOOLOGY_VOCAB))
                for model_type in ("transformer", "mmrec") for width in ZOOLOGY_WIDTHS]
    variants += [(f"mmrec_w{ZOOLOGY_ABLATION_WIDTH}_{name}", "mmrec",
                  {**mqar_model(ZOOLOGY_ABLATION_WIDTH, "mmrec", ZOOLOGY_VOCAB), **overrides})
                 for name, overrides in ABLATIONS.items()]
    jobs = []
    for variant, model_type, model in variants:
        recipe = recipes / f"{variant}.yaml"
        recipe.write_text(yaml.safe_dump(dict(model_type=model_type, model=model)))
        for lr in ZOOLOGY_LRS:
            name = f"{variant}_lr{lr:.1e}"
            argv = ["eval", "--task", "mqar", "--protocol", "zoology", "--train", "--config", str(recipe),
                    "--lr", f"{lr:g}", "--vocab", str(ZOOLOGY_VOCAB), "--seed", "0",
                    "--out", str(Path(args.out) / "mqar-zoology" / name)]
            if args.smoke:
                argv += ["--train-sets", "64:4:64", "--test-sets", "64:4:16", "--max-epochs", "1", "--device", "cpu"]
            else:
                argv += ["--train-sets", ZOOLOGY_TRAIN_SETS, "--test-sets", ZOOLOGY_TEST_SETS]
            if args.zoology_max_epochs:
                argv += ["--max-epochs", str(args.zoology_max_epochs)]
            if args.zoology_time_budget:
                argv += ["--time-budget", str(args.zoology_time_budget)]
            if args.compile:
                argv += ["--compile"]
            jobs.append(Job(name, argv))
    return jobs


# ---------------------------------------------------------------------- study 3: passkey
def passkey_jobs(args: argparse.Namespace) -> list[Job]:
    recipes = Path(args.out) / "passkey" / "recipes"
    recipes.mkdir(parents=True, exist_ok=True)
    no_memory = yaml.safe_load((CONFIGS / "passkey_mmrec.yaml").read_text())
    no_memory["model"]["memory_size_M"] = 0
    (recipes / "mmrec_no_memory.yaml").write_text(yaml.safe_dump(no_memory))
    models = {"mmrec": CONFIGS / "passkey_mmrec.yaml", "mmrec_no_memory": recipes / "mmrec_no_memory.yaml",
              "transformer": CONFIGS / "passkey_transformer.yaml"}
    jobs = []
    for name, recipe in models.items():
        argv = ["eval", "--task", "passkey", "--train", "--config", str(recipe), "--seed", "0",
                "--out", str(Path(args.out) / "passkey" / name)]
        if args.passkey_steps:
            argv += ["--steps", str(args.passkey_steps)]
        if args.passkey_time_budget:
            argv += ["--time-budget", str(args.passkey_time_budget)]
        if args.smoke:
            argv += ["--steps", "2", "--train-length", "256", "--lengths", "256,512", "--samples", "1",
                     "--device", "cpu"]
        jobs.append(Job(name, argv))
    return jobs


# ---------------------------------------------------------------------- study 4: long documents
LONGDOC_MODELS = {  # name -> (recipe, --set overrides); S = 0 is a different model, trained on its own
    "mmrec": ("longdoc_mmrec.yaml", []),
    "mmrec_no_memory": ("longdoc_mmrec.yaml", ["model.memory_size_M=0"]),
    "transformer": ("longdoc_transformer.yaml", []),
}


def longdoc_jobs(args: argparse.Namespace) -> tuple[list[Job], list[Job]]:
    """The training runs, and the evaluation of each (run after them: it reads their checkpoints)."""
    study = Path(args.out) / "longdoc"
    trains, evals = [], []
    for name, (recipe, overrides) in LONGDOC_MODELS.items():
        sets = list(overrides)
        if args.longdoc_steps:
            sets += [f"training.max_steps={args.longdoc_steps}", f"training.lr_decay_steps={args.longdoc_steps}"]
        if args.smoke:
            sets += ["training.max_steps=2", "training.eval_interval=2", "training.eval_tokens=4096",
                     "training.batch_size=2", "training.seq_len=256", "training.sample_tokens=0",
                     "training.device=cpu"]
        argv = ["train", "--config", str(CONFIGS / recipe), "--seed", "0", "--out", str(study / name)]
        trains.append(Job(name, argv + (["--set", *sets] if sets else [])))
        argv = ["eval", "--task", "longdoc", "--checkpoint", str(study / name), "--out", str(study / f"{name}_eval")]
        if args.smoke:
            argv += ["--max-bytes", "4096", "--files", "2", "--segment-len", "512", "--reset-every", "1024",
                     "--device", "cpu"]
        evals.append(Job(f"{name}_eval", argv))
    return trains, evals


def run_longdoc(args: argparse.Namespace) -> int:
    """Train the three models (--jobs at a time), then score each one."""
    phases = [[job for job in jobs if not args.only or args.only in job.name] for jobs in longdoc_jobs(args)]
    if args.dry_run:
        for job in phases[0] + phases[1]:
            print(shlex.join(["mmrec", *job.argv]))
        return 0
    failed = sum(run_jobs(jobs, Path(args.out) / "longdoc", args.jobs, args.job_timeout) for jobs in phases)
    return 1 if failed else 0


# ---------------------------------------------------------------------- running
def run_jobs(jobs: list[Job], study_dir: Path, parallel: int, timeout: float | None) -> int:
    """Run the jobs `parallel` at a time, each logging to study_dir/<name>/log.txt; returns the
    number that failed."""
    from tqdm import tqdm

    pending, running, failed = list(jobs), [], 0
    with tqdm(total=len(jobs), desc=study_dir.name, unit="run") as bar:
        while pending or running:
            while pending and len(running) < parallel:
                job = pending.pop(0)
                log_dir = study_dir / job.name
                log_dir.mkdir(parents=True, exist_ok=True)
                command = [sys.executable, "-m", "mm_rec", *job.argv]
                bar.write(f"$ {shlex.join(['mmrec', *job.argv])}")
                log = open(log_dir / "log.txt", "w")
                process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
                running.append((job, process, log, time.monotonic(), False))
            time.sleep(0.5)
            still = []
            for job, process, log, started, interrupted in running:
                if process.poll() is None:
                    if timeout and not interrupted and time.monotonic() - started > timeout:
                        process.send_signal(signal.SIGINT)
                        interrupted = True
                    still.append((job, process, log, started, interrupted))
                    continue
                log.close()
                if process.returncode != 0 and not interrupted:
                    failed += 1
                    bar.write(f"FAILED ({process.returncode}): {job.name}, see {study_dir / job.name / 'log.txt'}")
                bar.update(1)
            running = still
    return failed


# ---------------------------------------------------------------------- report
def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def lm_report(out: Path, docs: Path | None) -> None:
    for dataset in LM_DATASETS:
        curves = {}
        for variant in LM_VARIANTS:
            rows = _read_jsonl(out / "lm" / f"{dataset}_{variant}" / "metrics.jsonl")
            curves[variant] = [(r["step"], r["val_loss"], r.get("val_bpb")) for r in rows if "val_loss" in r]
        if not any(curves.values()):
            continue
        print(f"\n### {dataset}: validation loss (nats/token) by step\n")
        steps = sorted({s for c in curves.values() for s, _, _ in c})
        print("| step | " + " | ".join(LM_VARIANTS) + " |")
        print("| ---: |" + " ---: |" * len(LM_VARIANTS))
        for step in steps:
            cells = [next((f"{v:.3f}" for s, v, _ in curves[n] if s == step), "") for n in LM_VARIANTS]
            print(f"| {step} | " + " | ".join(cells) + " |")
        best = {n: min(c, key=lambda r: r[1]) for n, c in curves.items() if c}
        print("| best (step) | " + " | ".join(f"**{best[n][1]:.3f}** ({best[n][0]})" if n in best else ""
                                              for n in LM_VARIANTS) + " |")
        print("| best bits/byte | " + " | ".join(f"{best[n][2]:.3f}" if n in best and best[n][2] else ""
                                                 for n in LM_VARIANTS) + " |")
        if docs:
            _plot(docs / f"quality_lm_{dataset}.png", f"{dataset}: validation loss",
                  {n: ([s for s, _, _ in c], [v for _, v, _ in c]) for n, c in curves.items() if c},
                  "step", "validation loss (nats/token)")


def mqar_report(out: Path, docs: Path | None) -> None:
    results, ablations = {}, {}
    for path in sorted((out / "mqar").glob("*/mqar_results.json")):
        match = re.fullmatch(r"(mmrec|transformer)_w(\d+)(?:_(.+))?_T(\d+)_P(\d+)", path.parent.name)
        if not match:
            continue
        report = json.loads(path.read_text())
        model_type, width, ablation, length, pairs = match.groups()
        key = (model_type, int(width), int(length), int(pairs))
        steps = report["curve"][-1]["step"] if report.get("curve") else None
        by_length = {r["seq_len"]: r["accuracy"] for r in report["results"]}
        if ablation is None:
            results[key] = (by_length[int(length)], steps)
        if model_type == "mmrec" and int(width) == MQAR_ABLATION_WIDTH or ablation is not None:
            ablations.setdefault(key[2:], {})[ablation or "none (defaults)"] = (by_length, steps)
    if not results and not ablations:
        return
    print("\n### MQAR accuracy (steps done)\n")
    print("| model | width | " + " | ".join(f"T={t}, P={p}" for t, p in MQAR_TASKS) + " |")
    print("| --- | ---: |" + " ---: |" * len(MQAR_TASKS))
    for model_type in ("mmrec", "transformer"):
        for width in MQAR_WIDTHS:
            cells = []
            for length, pairs in MQAR_TASKS:
                acc, steps = results.get((model_type, width, length, pairs), (None, None))
                cells.append("" if acc is None else f"{acc:.3f} ({steps})")
            print(f"| {model_type} | {width} | " + " | ".join(cells) + " |")
    if docs:
        series = {}
        for model_type in ("mmrec", "transformer"):
            for width in MQAR_WIDTHS:
                points = [(t, results[(model_type, width, t, p)][0]) for t, p in MQAR_TASKS
                          if (model_type, width, t, p) in results]
                if points:
                    series[f"{model_type} w{width}"] = ([t for t, _ in points], [a for _, a in points])
        _plot(docs / "quality_mqar.png", "MQAR accuracy (pairs grow with the length: "
              + ", ".join(f"{t}:{p}" for t, p in MQAR_TASKS) + ")", series, "sequence length", "accuracy", logx=True)
    for (length, pairs), runs in sorted(ablations.items()):
        lengths = sorted({n for by_length, _ in runs.values() for n in by_length})
        print(f"\n### MQAR ablations, MM-Rec width {MQAR_ABLATION_WIDTH}, trained at T={length}, P={pairs}: "
              "accuracy by scored length (steps done)\n")
        print("| switched off | " + " | ".join(f"T={n}" for n in lengths) + " | steps |")
        print("| --- |" + " ---: |" * len(lengths) + " ---: |")
        for name, (by_length, steps) in sorted(runs.items(), key=lambda item: item[0] != "none (defaults)"):
            cells = [f"{by_length[n]:.3f}" if n in by_length else "" for n in lengths]
            print(f"| {name} | " + " | ".join(cells) + f" | {steps} |")


def zoology_report(out: Path, docs: Path | None) -> None:
    """Per run (model, width, ablation): the best accuracy on the main test cell at every learning
    rate, the best over them and the fewest steps to pass 0.99; then every test cell at each run's
    best learning rate."""
    runs: dict[str, dict[float, dict]] = {}
    for path in sorted((out / "mqar-zoology").glob("*_lr*/mqar_results.json")):
        report = json.loads(path.read_text())
        variant, lr = path.parent.name.rsplit("_lr", 1)
        runs.setdefault(variant, {})[float(lr)] = report
    if not runs:
        return
    lrs = sorted({lr for by_lr in runs.values() for lr in by_lr})

    def main_accuracy(report: dict) -> float:
        return report["best_accuracy"][report["settings"]["main_cell"]]

    def order(variant: str) -> tuple:
        model_type, width, *ablation = variant.split("_", 2)
        return (ablation != [], model_type != "transformer", int(width[1:]), ablation)

    any_report = next(iter(next(iter(runs.values())).values()))
    main, cells = any_report["settings"]["main_cell"], list(any_report["best_accuracy"])
    print(f"\n### MQAR, Zoology's protocol: best accuracy at {main} per learning rate "
          "(step where 0.99 was passed)\n")
    print("| run | parameters | state (values) | " + " | ".join(f"lr {lr:.1e}" for lr in lrs)
          + " | best | steps to 0.99 |")
    print("| --- | ---: | ---: |" + " ---: |" * (len(lrs) + 2))
    best_runs = {}
    for variant in sorted(runs, key=order):
        by_lr = runs[variant]
        some = next(iter(by_lr.values()))
        row = []
        for lr in lrs:
            report = by_lr.get(lr)
            reached = report and report.get("target_reached")
            row.append("" if report is None else f"{main_accuracy(report):.3f}" + (f" ({reached['step']})"
                                                                                   if reached else ""))
        best_lr = max(by_lr, key=lambda lr: main_accuracy(by_lr[lr]))
        best_runs[variant] = by_lr[best_lr]
        steps = [r["target_reached"]["step"] for r in by_lr.values() if r.get("target_reached")]
        print(f"| {variant} | {some['parameters']:,} | {some['state_size']:,} | " + " | ".join(row)
              + f" | **{main_accuracy(by_lr[best_lr]):.3f}** | {min(steps) if steps else '—'} |")
    print("\n### the same runs at their best learning rate: best accuracy per test cell\n")
    print("| run | lr | epochs | " + " | ".join(cells) + " |")
    print("| --- | ---: | ---: |" + " ---: |" * len(cells))
    for variant, report in best_runs.items():
        print(f"| {variant} | {report['settings']['lr']:.1e} | {report['epochs']} | "
              + " | ".join(f"{report['best_accuracy'].get(c, math.nan):.3f}" for c in cells) + " |")
    if docs:
        series = {}
        for model_type in ("transformer", "mmrec"):
            points = [(int(v.split("_")[1][1:]), main_accuracy(r)) for v, r in best_runs.items()
                      if v.startswith(model_type + "_") and v.count("_") == 1]
            if points:
                series[model_type] = ([w for w, _ in sorted(points)], [a for _, a in sorted(points)])
        if any(len(xs) > 1 for xs, _ in series.values()):  # a curve over widths needs two of them
            _plot(docs / "quality_mqar_zoology.png", f"MQAR, Zoology's protocol: accuracy at {main} (best lr)",
                  series, "model width", "accuracy", logx=True)
        curves = {f"{variant} (lr {report['settings']['lr']:.1e})":
                  ([point["step"] for point in report["curve"]], [point["accuracy"][main] for point in report["curve"]])
                  for variant, report in best_runs.items()}
        _plot(docs / "quality_mqar_zoology_curves.png",
              f"MQAR, Zoology's protocol: accuracy at {main} after each epoch", curves, "training step", "accuracy")


def passkey_report(out: Path, docs: Path | None) -> None:
    series = {}
    for path in sorted((out / "passkey").glob("*/passkey_results.json")):
        report = json.loads(path.read_text())
        lengths = sorted({r["length"] for r in report["results"]})
        done = [[r["accuracy"] for r in report["results"] if r["length"] == n and r["accuracy"] is not None]
                for n in lengths]  # cells not run (too long for the model, out of memory) have accuracy None
        means = [sum(cells) / len(cells) if cells else math.nan for cells in done]
        steps = report["curve"][-1]["step"] if report.get("curve") else None
        series[f"{path.parent.name} ({steps} steps)"] = (lengths, means)
    if not series:
        return
    lengths = sorted({n for xs, _ in series.values() for n in xs})
    print("\n### Passkey accuracy by context length (mean over depths)\n")
    print("| model | " + " | ".join(f"{n // 1024}K" if n >= 1024 else str(n) for n in lengths) + " |")
    print("| --- |" + " ---: |" * len(lengths))
    for name, (xs, ys) in series.items():
        cells = [dict(zip(xs, ys)).get(n, math.nan) for n in lengths]
        print(f"| {name} | " + " | ".join("not run" if math.isnan(c) else f"{c:.3f}" for c in cells) + " |")
    if docs:
        _plot(docs / "quality_passkey.png", "passkey accuracy (trained at 2K)", series, "context length (tokens)",
              "accuracy", logx=True)


def _paired(a: list[float], b: list[float]) -> tuple[float, float | None]:
    """Mean of a - b over files and its standard error."""
    diffs = [x - y for x, y in zip(a, b)]
    mean = sum(diffs) / len(diffs)
    if len(diffs) < 2:
        return mean, None
    return mean, math.sqrt(sum((d - mean) ** 2 for d in diffs) / (len(diffs) - 1) / len(diffs))


def _mean_se(mean: float, se: float | None) -> str:
    return f"{mean:.3f}" + (f" ± {se:.3f}" if se is not None else "")


def longdoc_report(out: Path, docs: Path | None) -> None:
    reports = {}
    for name in LONGDOC_MODELS:
        path = out / "longdoc" / f"{name}_eval" / "longdoc_results.json"
        if path.is_file():
            reports[name] = json.loads(path.read_text())
    if not reports:
        return
    first = next(iter(reports.values()))
    ranges = [b["range"] for b in next(iter(first["modes"].values()))]
    print(f"\n### Long documents: nats per byte by position, mean ± s.e. over {len(first['files'])} held-out files "
          f"(first {first['max_bytes']} bytes each; reset every {first['reset_every']})\n")
    print("| model (steps) | scoring | " + " | ".join(ranges) + " |")
    print("| --- | --- |" + " ---: |" * len(ranges))
    series = {}
    for name, report in reports.items():
        for mode, buckets in {**report["modes"], **report["differences"]}.items():
            cells = [_mean_se(b["mean"], b["se"]) for b in buckets]
            print(f"| {name} ({report['step']}) | {mode} | " + " | ".join(cells) + " |")
            if mode in report["modes"]:
                series[f"{name} {mode}"] = ([(b["lo"] + b["hi"]) / 2 for b in buckets], [b["mean"] for b in buckets])
    if "mmrec" in reports and "mmrec_no_memory" in reports:  # the same files: differences are paired per file
        with_memory, without = reports["mmrec"]["modes"]["carried"], reports["mmrec_no_memory"]["modes"]["carried"]
        if reports["mmrec"]["files"] == reports["mmrec_no_memory"]["files"]:
            cells = [_mean_se(*_paired(b["per_file"], a["per_file"])) for a, b in zip(with_memory, without)]
            print("| S = 0 minus S > 0 | carried | " + " | ".join(cells) + " |")
    for report in reports.values():
        for note in report.get("notes", []):
            print(f"\n{note}")
    if docs:
        _plot(docs / "quality_longdoc.png", "long documents: loss by position", series, "byte position (bucket centre)",
              "nats per byte", logx=True)


def _plot(path: Path, title: str, series: dict, xlabel: str, ylabel: str, logx: bool = False) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for name, (xs, ys) in series.items():
        ax.plot(xs, ys, "o-", markersize=3, label=name)
    if logx:
        ax.set_xscale("log", base=2)
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(f"\n(wrote {path})")


# ---------------------------------------------------------------------- command line
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("study", choices=["lm", "mqar", "mqar-zoology", "passkey", "longdoc", "report"])
    parser.add_argument("--out", default="runs/quality", help="folder of the runs (default: runs/quality)")
    parser.add_argument("--data-dir", default="../shared/data", help="lm: folder with the two text files")
    parser.add_argument("--jobs", type=int, default=4, help="commands run at the same time")
    parser.add_argument("--only", help="run only the jobs whose name contains this string")
    parser.add_argument("--job-timeout", type=float, help="interrupt a command after this many seconds")
    parser.add_argument("--mqar-steps", type=int, default=2000, help="mqar: training steps per run")
    parser.add_argument("--mqar-time-budget", type=float, help="mqar: stop each run's training after this many s")
    parser.add_argument("--zoology-max-epochs", type=int, help="mqar-zoology: epochs at most (default: 64)")
    parser.add_argument("--zoology-time-budget", type=float,
                        help="mqar-zoology: stop each run after the epoch that crosses this many s")
    parser.add_argument("--compile", action="store_true", help="mqar-zoology: torch.compile each block (GPU runs)")
    parser.add_argument("--passkey-steps", type=int, help="passkey: training steps (default: the recipe's)")
    parser.add_argument("--passkey-time-budget", type=float, help="passkey: stop training after this many s")
    parser.add_argument("--longdoc-steps", type=int, help="longdoc: training steps (default: the recipes')")
    parser.add_argument("--docs", help="report: write the PNGs into this folder")
    parser.add_argument("--smoke", action="store_true", help="a few steps per run on the CPU (a check, not a result)")
    parser.add_argument("--dry-run", action="store_true", help="print the commands only")
    args = parser.parse_args(argv)
    out = Path(args.out)
    if args.study == "report":
        docs = Path(args.docs) if args.docs else None
        lm_report(out, docs)
        mqar_report(out, docs)
        zoology_report(out, docs)
        passkey_report(out, docs)
        longdoc_report(out, docs)
        return 0
    if args.study == "longdoc":  # two phases: the evaluations read the trained checkpoints
        return run_longdoc(args)
    jobs = {"lm": lm_jobs, "mqar": mqar_jobs, "mqar-zoology": zoology_jobs, "passkey": passkey_jobs}[args.study](args)
    if args.only:
        jobs = [job for job in jobs if args.only in job.name]
    if args.dry_run:
        for job in jobs:
            print(shlex.join(["mmrec", *job.argv]))
        return 0
    failed = run_jobs(jobs, out / args.study, args.jobs, args.job_timeout)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
