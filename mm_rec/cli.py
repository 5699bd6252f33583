"""The `mmrec` command line (also `python -m mm_rec`).

    mmrec train      train from a recipe (no arguments: the tiny preset on Python's standard library)
    mmrec eval       loss, perplexity and bits per byte of a checkpoint on a text; or --task mqar|passkey
    mmrec generate   stream a sampled continuation of a prompt
    mmrec info       parameter count per component (on the meta device: any size, no memory)
    mmrec plot       loss curves of a run as a PNG
    mmrec inspect    decay spectra and slot-age attention of a checkpoint
    mmrec bench      the CPU benchmark (benchmarks/bench_cpu.py)

Bad input (a missing file, an unknown config key, token ids outside the vocabulary, a damaged
checkpoint) is reported in one line on stderr with exit code 2; a run stopped by repeated
non-finite steps exits with 1, an interrupted one (checkpoint saved) with 130.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import time
from pathlib import Path

EXIT_BAD_INPUT = 2
EXIT_FAILED = 1
EXIT_INTERRUPTED = 130


class _Formatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Examples kept as written; defaults shown where there is one."""

    def _get_help_string(self, action: argparse.Action) -> str:
        default = action.default
        if default is None or default is False or default is argparse.SUPPRESS or default in ("", []):
            return action.help or ""
        return super()._get_help_string(action)


# ---------------------------------------------------------------------- train
def _add_recipe_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="FILE", help="recipe YAML/JSON (configs/*.yaml); default: the tiny quick start")
    p.add_argument("--preset", help="model preset (tiny, small, 1b, 7b): shorthand for --set model.preset=NAME")
    p.add_argument("--model", choices=["mmrec", "transformer"], help="model type (shorthand for --set model_type=...)")
    p.add_argument("--set", dest="overrides", metavar="KEY=VALUE", nargs="+", action="extend", default=[],
                   help="override any recipe key: section.key=value (values are YAML), e.g. "
                        "--set training.lr=1e-3 model.num_layers=2 data.carry_state=false")


def _recipe(args: argparse.Namespace, extra: dict[str, object] | None = None, model_only: bool = False):
    """The recipe of --config with the shorthand flags, then --set, applied. `model_only` reads
    just model_type and model (any recipe with a model section, e.g. the task recipes)."""
    from mm_rec.config import load_mapping
    from mm_rec.training.config import RunConfig, apply_overrides

    shorthand = {"model.preset": args.preset, "model_type": args.model, **(extra or {})}
    overrides = [f"{k}={_yaml_value(v)}" for k, v in shorthand.items() if v is not None] + args.overrides
    values = load_mapping(args.config) if args.config else {}
    if model_only:
        values = {k: v for k, v in values.items() if k in ("model_type", "model")}
    return RunConfig.from_dict(apply_overrides(values, overrides), source=args.config or "recipe")


def _yaml_value(value: object) -> str:
    import json

    return json.dumps(value) if isinstance(value, str) else str(value)


def cmd_train(args: argparse.Namespace) -> int:
    from mm_rec.training.trainer import NonFiniteError, train

    out = args.out
    if out is None and args.resume == "auto":
        raise ValueError("--resume auto needs --out RUN_DIR (the run to continue)")
    if out is None and args.resume is not None:  # the run folder of the checkpoint
        path = Path(args.resume)
        out = path.parent.parent if path.parent.name == "checkpoints" else path
    if out is None:
        name = Path(args.config).stem if args.config else "tiny"
        out = Path("runs") / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"
    if args.resume is not None and args.config is None:  # continue with the recipe the run was started with
        args.config = _run_recipe(Path(out), args.resume)
    config = _recipe(args, {"data.path": args.data, "training.seed": args.seed, "training.max_steps": args.max_steps,
                            "training.device": args.device, "distributed.parallel": args.parallel})
    if args.print_config:
        import yaml

        print(yaml.safe_dump(config.to_dict(), sort_keys=False), end="")
        return 0
    main_process = os.environ.get("RANK", "0") == "0"  # under torchrun only rank 0 reports
    say = print if main_process else (lambda *_: None)
    say(f"run folder: {out}")
    start = time.perf_counter()
    try:
        result = train(config, out, resume=args.resume, debug=args.debug, log=say)
    except NonFiniteError as err:
        print(f"mmrec train: {err}", file=sys.stderr)
        return EXIT_FAILED
    if not main_process:
        return EXIT_INTERRUPTED if result.interrupted else 0
    summary = f"done: step {result.step} in {time.perf_counter() - start:.0f} s"
    if result.train_loss is not None:
        summary += f" | train loss {result.train_loss:.4f}"
    if result.eval is not None:
        summary += (f" | val loss {result.eval.loss:.4f} | ppl {result.eval.perplexity:.2f} | "
                    f"{result.eval.bits_per_byte:.4f} bits/byte")
    print(summary)
    if result.checkpoint is not None:
        print(f"checkpoint: {result.checkpoint}")
        prompt = shlex.quote(config.training.sample_prompt.strip() or "def ")
        print(f"next: mmrec generate --checkpoint {out} --prompt {prompt}   |   mmrec plot {out}")
    return EXIT_INTERRUPTED if result.interrupted else 0


def _run_recipe(run_dir: Path, resume: str) -> str | None:
    """recipe.json of the checkpoint to resume (newest first for auto), else of the run folder."""
    from mm_rec.training.checkpoint import RECIPE, is_checkpoint, list_checkpoints

    path = Path(resume)
    folders = [path] if resume != "auto" and is_checkpoint(path) else list_checkpoints(run_dir)[::-1]
    for folder in [*folders, run_dir]:
        if (folder / RECIPE).is_file():
            return str(folder / RECIPE)
    return None


# ---------------------------------------------------------------------- eval
def cmd_eval(args: argparse.Namespace) -> int:
    if args.task:
        from mm_rec.evaluation import run_eval_task

        return run_eval_task(args)
    if not args.checkpoint:
        raise ValueError("mmrec eval needs --checkpoint DIR (and --data PATH), or --task mqar|passkey")

    from mm_rec.data.cache import tokenize_in_memory
    from mm_rec.data.corpus import resolve_source
    from mm_rec.loading import load_model_and_tokenizer
    from mm_rec.training.evaluate import evaluate, token_bytes_table
    from mm_rec.utils.device import autocast_for, resolve_device

    device = resolve_device(args.device or "auto")
    model, tokenizer, model_dir = load_model_and_tokenizer(args.checkpoint, device)
    vocab_size = model.config.vocab_size
    recipe = _saved_recipe(model_dir)
    data_cfg = recipe.get("data", {})
    separator = data_cfg.get("document_separator")
    if args.data is not None:
        data = tokenize_in_memory(resolve_source(args.data), tokenizer, separator, args.bin_dtype, args.max_tokens)
        start, end, what = 0, len(data), args.data
    else:  # the validation split of the data the checkpoint was trained on
        if "data" not in recipe:
            raise ValueError(f"{model_dir} holds no recipe.json; give --data PATH")
        data = tokenize_in_memory(resolve_source(data_cfg.get("path")), tokenizer, separator,
                                  data_cfg.get("bin_dtype", "uint16"))
        start = data.split_point(data_cfg.get("val_fraction", 0.05))
        end = len(data) if args.max_tokens is None else min(len(data), start + args.max_tokens)
        what = f"the validation split of {data.description}"
    data.check_vocab(vocab_size)
    if end - start < 2:
        raise ValueError(f"{what} holds {end - start} token(s); evaluation needs at least 2")
    train_cfg = recipe.get("training", {})
    seq_len = args.seq_len or train_cfg.get("seq_len", 256)
    batch_size = args.batch_size or train_cfg.get("batch_size", 8)
    carry = args.carry_state if args.carry_state is not None else data_cfg.get("carry_state", True)
    autocast = autocast_for(args.precision, device)
    token_bytes = token_bytes_table(tokenizer, vocab_size)
    init_state = model.init_state if carry and hasattr(model, "init_state") else None
    result = evaluate(model, data, start, end, batch_size, seq_len, init_state, token_bytes, device, autocast)
    print(f"{model_dir} on {what}: {result.tokens:,} tokens ({result.bytes:,} bytes), "
          f"{'state carried' if init_state else 'fresh state per window'} (windows of {seq_len})")
    print(f"loss {result.loss:.4f} | perplexity {result.perplexity:.3f} | bits per byte {result.bits_per_byte:.4f}")
    return 0


def _saved_recipe(model_dir: Path) -> dict:
    import json

    path = model_dir / "recipe.json"
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is damaged: {err}") from None


# ---------------------------------------------------------------------- generate
def cmd_generate(args: argparse.Namespace) -> int:
    from mm_rec.generation import generate_text
    from mm_rec.loading import load_model_and_tokenizer
    from mm_rec.utils.device import autocast_for, resolve_device

    if args.max_new_tokens < 0:
        raise ValueError("--max-new-tokens must be >= 0")
    device = resolve_device(args.device or "auto")
    model, tokenizer, _ = load_model_and_tokenizer(args.checkpoint, device)
    if not hasattr(model, "generate_stream"):
        raise ValueError(f"{type(model).__name__} cannot generate (no generate_stream)")
    autocast = autocast_for(args.precision, device)
    generate_text(model, tokenizer, args.prompt, args.max_new_tokens, args.temperature, args.top_k, args.seed,
                  device, autocast, top_p=args.top_p, echo=True)
    return 0


# ---------------------------------------------------------------------- info
def cmd_info(args: argparse.Namespace) -> int:
    import torch

    from mm_rec.loading import build_model
    from mm_rec.utils.debugging import COMPONENTS, component_label, component_name

    config = _recipe(args, model_only=True)
    with torch.device("meta"):
        model = build_model(config.model_config(), config.model_type)
    cfg = model.config
    per_component: dict[str, int] = {}
    layers: set[int] = set()
    for name, p in model.named_parameters():
        layer, key = component_name(name)
        if layer is not None:
            layers.add(layer)
        label = component_label(key)
        per_component[label] = per_component.get(label, 0) + p.numel()
    total = sum(p.numel() for p in model.parameters())
    n_layers = max(1, len(layers))
    title = f"{type(model).__name__}" + (f" (preset {config.model['preset']})" if "preset" in config.model else "")
    print(f"{title}: {total:,} parameters ({total / 1e9:.3f} B)")
    print(", ".join(f"{k}={v}" for k, v in cfg.to_dict().items()) if hasattr(cfg, "to_dict") else cfg)
    order = list(dict.fromkeys(COMPONENTS.values()))
    print(f"\n{'component':<58} {'per layer':>15} {'total':>15} {'share':>7}")
    for label, count in sorted(per_component.items(), key=lambda kv: order.index(kv[0]) if kv[0] in order else 99):
        per_layer = f"{count // n_layers:,}" if label not in ("embeddings", "lm_head (untied)") else ""
        print(f"{label:<58} {per_layer:>15} {count:>15,} {count / total:>7.1%}")
    print(f"{'total':<58} {'':>15} {total:>15,} {1:>7.1%}")
    print(f"\nweights: {total * 2 / 2**30:.2f} GiB in bf16, {total * 4 / 2**30:.2f} GiB in fp32"
          f"; AdamW training state (fp32 weights, grads, 2 moments): {total * 16 / 2**30:.2f} GiB")
    if hasattr(model, "init_state"):
        state = model.init_state(1, device="meta")
        floats = sum(t.numel() for k, t in state.state_dict().items() if k != "position")
        print(f"recurrent state per sequence: {floats:,} fp32 values ({floats * 4 / 2**20:.1f} MiB), "
              "independent of the sequence length")
    return 0


# ---------------------------------------------------------------------- plot, bench, inspect
def cmd_plot(args: argparse.Namespace) -> int:
    from mm_rec.training.metrics import plot_run

    try:
        out = plot_run(Path(args.run_dir), Path(args.out) if args.out else None)
    except ImportError as err:
        print(f"mmrec plot: error: {err}", file=sys.stderr)
        return EXIT_FAILED
    print(f"wrote {out}")
    return 0


def cmd_bench(bench_args: list[str]) -> int:
    """Run benchmarks/bench_cpu.py with `bench_args` (its own options and --help)."""
    import runpy

    relative = Path("benchmarks") / "bench_cpu.py"
    candidates = [Path.cwd() / relative, Path(__file__).resolve().parents[1] / relative]
    script = next((c for c in candidates if c.is_file()), None)
    if script is None:
        raise FileNotFoundError("benchmarks/bench_cpu.py not found: run mmrec bench from a checkout of the repository")
    argv = sys.argv
    sys.argv = [str(script), *bench_args]
    try:
        runpy.run_path(str(script), run_name="__main__")
    finally:
        sys.argv = argv
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from mm_rec.evaluation import run_inspect

    return run_inspect(args)


# ---------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mmrec", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    from mm_rec import __version__

    parser.add_argument("--version", action="version", version=f"mmrec {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("train", help="train a model from a recipe", formatter_class=_Formatter, description=(
        "Train from a recipe. With no arguments: the tiny preset (~1M parameters) on the embedded corpus (the Python\n"
        "standard library's source files, byte-level), a few minutes on 2 CPU cores, then a sample.\n\n"
        "  mmrec train --config configs/tiny.yaml --data FILE --seed 0 --max-steps 200 --out runs/x\n"
        "  mmrec train --out runs/x --resume auto            # continue where it stopped\n"
        "  mmrec train --config configs/shakespeare_char.yaml --data tinyshakespeare.txt --set training.lr=1e-3\n\n"
        "The run folder gets metrics.jsonl, checkpoints/step_*/ (atomic, the last training.keep_last kept),\n"
        "recipe.json, sample.txt and tensorboard/ (when tensorboard is installed). See docs/training.md."))
    _add_recipe_arguments(p)
    p.add_argument("--data", help="text file, folder of text files or .bin of token ids (data.path); "
                                  "default: the Python standard library")
    p.add_argument("--seed", type=int, help="seed of the model init, data order and sample (training.seed)")
    p.add_argument("--max-steps", type=int, help="total optimizer steps (training.max_steps)")
    p.add_argument("--device", help="auto, cpu, cuda, cuda:N (training.device)")
    p.add_argument("--parallel", choices=["none", "ddp", "fsdp"], help="multi-GPU mode under torchrun "
                                                                       "(distributed.parallel)")
    p.add_argument("--out", help="run folder (default: runs/<recipe>-<date>-<time>)")
    p.add_argument("--resume", metavar="auto|PATH", help="auto: continue from the newest good checkpoint in --out "
                                                         "(fresh start when there is none); PATH: that checkpoint")
    p.add_argument("--debug", action="store_true", help="NaN/Inf hooks naming the first module that produces one, "
                                                        "and gradient-flow reports")
    p.add_argument("--print-config", action="store_true", help="print the resolved recipe as YAML and exit")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="loss, perplexity and bits per byte of a checkpoint (or --task mqar|passkey)",
                       formatter_class=_Formatter, description=(
                           "  mmrec eval --checkpoint runs/x --data held_out.txt\n"
                           "  mmrec eval --checkpoint runs/x            # the validation split of its training data\n"
                           "  mmrec eval --task mqar --checkpoint DIR   # long-context recall tasks"))
    p.add_argument("--checkpoint", help="run folder (its newest checkpoint) or checkpoint / save_pretrained folder")
    p.add_argument("--data", help="text file, folder or .bin to score (default: the validation split of the "
                                  "checkpoint's training data)")
    p.add_argument("--max-tokens", type=int, help="score at most this many tokens")
    p.add_argument("--seq-len", type=int, help="window length (default: the training seq_len)")
    p.add_argument("--batch-size", type=int, help="rows scored in parallel (default: the training batch size)")
    p.add_argument("--carry-state", action=argparse.BooleanOptionalAction, default=None,
                   help="carry the memory state across windows (default: as in training)")
    p.add_argument("--bin-dtype", default="uint16", choices=["uint8", "uint16", "int32", "uint32"],
                   help="element type of a .bin file")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                   help="autocast dtype; auto: bf16 on CUDA, fp32 on CPU")
    p.add_argument("--device", help="auto, cpu, cuda, cuda:N")
    from mm_rec.evaluation import add_eval_task_arguments

    add_eval_task_arguments(p)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("generate", help="stream a sampled continuation of a prompt", formatter_class=_Formatter,
                       description="  mmrec generate --checkpoint runs/x --prompt 'def ' --max-new-tokens 200 --seed 0")
    p.add_argument("--checkpoint", required=True, help="run folder (its newest checkpoint) or checkpoint folder")
    p.add_argument("--prompt", default="", help="text to continue (empty: a newline)")
    p.add_argument("--max-new-tokens", type=int, default=200, help="tokens to generate")
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=40, help="sample among the k most likely tokens")
    p.add_argument("--top-p", type=float, help="nucleus sampling threshold")
    p.add_argument("--seed", type=int, default=0, help="seed of the sampling")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                   help="autocast dtype; auto: bf16 on CUDA, fp32 on CPU")
    p.add_argument("--device", help="auto, cpu, cuda, cuda:N")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("info", help="parameter count per component (meta device: any size)", formatter_class=_Formatter,
                       description="  mmrec info --preset 7b\n  mmrec info --config configs/small.yaml")
    _add_recipe_arguments(p)
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("plot", help="loss curves of a run as a PNG (needs matplotlib)", formatter_class=_Formatter)
    p.add_argument("run_dir", metavar="RUN_DIR", help="run folder holding metrics.jsonl")
    p.add_argument("--out", help="PNG path (default: RUN_DIR/loss.png)")
    p.set_defaults(func=cmd_plot)

    p = sub.add_parser("inspect", help="decay spectra and slot-age attention of a checkpoint, as a PNG",
                       formatter_class=_Formatter)
    from mm_rec.evaluation import add_inspect_arguments

    add_inspect_arguments(p)
    p.set_defaults(func=cmd_inspect)

    # listed here for `mmrec --help`; main() hands `mmrec bench ...` to the script with its arguments
    sub.add_parser("bench", help="CPU benchmark (benchmarks/bench_cpu.py; options are passed through)")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["bench"]:
        try:
            return cmd_bench(argv[1:])
        except FileNotFoundError as err:
            print(f"mmrec bench: error: {err}", file=sys.stderr)
            return EXIT_BAD_INPUT
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError) as err:
        if os.environ.get("MMREC_TRACEBACK"):
            raise
        message = " ".join(str(err).split()) or type(err).__name__
        print(f"mmrec {args.command}: error: {message}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print(f"mmrec {args.command}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # output piped into head & co.
        sys.stdout = open(os.devnull, "w")
        return 0
