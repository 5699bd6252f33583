"""What several commands share: exit codes, the help formatter, reading a recipe from the
options --config, --preset, --model and --set, and the weight quantization of eval and generate
(--quantize, --group-size)."""

from __future__ import annotations

import argparse
import json

import torch

from mm_rec.config import load_mapping
from mm_rec.loading import MODEL_TYPES
from mm_rec.model import LanguageModel
from mm_rec.quantization import DEFAULT_GROUP_SIZE, MODES, Quantization, quantize_model
from mm_rec.training.config import RunConfig, apply_overrides
from mm_rec.utils.device import resolve_precision

EXIT_BAD_INPUT = 2  # a missing file, an unknown config key, a damaged checkpoint...: one line on stderr
EXIT_FAILED = 1  # the run itself failed (repeated non-finite steps, a missing optional package)
EXIT_INTERRUPTED = 130  # Ctrl-C, after the checkpoint was saved


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Examples kept as written; defaults shown where there is one."""

    def _get_help_string(self, action: argparse.Action) -> str:
        default = action.default
        if default is None or default is False or default is argparse.SUPPRESS or default in ("", []):
            return action.help or ""
        return super()._get_help_string(action)


def add_recipe_arguments(parser: argparse.ArgumentParser) -> None:
    """--config, --preset, --model and --set, read by `recipe_from_args`."""
    parser.add_argument("--config", metavar="FILE",
                        help="recipe YAML/JSON (configs/*.yaml); default: the tiny quick start")
    parser.add_argument("--preset", help="model preset (tiny, small, 1b, 7b): shorthand for --set model.preset=NAME")
    parser.add_argument("--model", choices=MODEL_TYPES,
                        help="model type (shorthand for --set model_type=...)")
    parser.add_argument("--set", dest="overrides", metavar="KEY=VALUE", nargs="+", action="extend", default=[],
                        help="override any recipe key: section.key=value (values are YAML), e.g. "
                             "--set training.lr=1e-3 model.num_layers=2 data.carry_state=false")


def recipe_from_args(args: argparse.Namespace, shorthands: dict[str, object] | None = None,
                     model_only: bool = False) -> RunConfig:
    """The recipe of --config with --preset, --model and `shorthands` ({"section.key": value},
    None: not given), then --set, applied. `model_only` reads just model_type and model (any
    recipe with a model section, e.g. the task recipes)."""
    given = {"model.preset": args.preset, "model_type": args.model, **(shorthands or {})}
    overrides = [f"{key}={_yaml_value(value)}" for key, value in given.items() if value is not None] + args.overrides
    values = load_mapping(args.config) if args.config else {}
    if model_only:
        values = {k: v for k, v in values.items() if k in ("model_type", "model")}
    return RunConfig.from_dict(apply_overrides(values, overrides), source=args.config or "recipe")


def _yaml_value(value: object) -> str:
    """A shorthand's value for --set; strings quoted, so that a path such as `1e3` or `true` stays a string."""
    return json.dumps(value) if isinstance(value, str) else str(value)


# ---------------------------------------------------------------------- --quantize
PRECISION_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def add_quantize_arguments(parser: argparse.ArgumentParser) -> None:
    """--quantize and --group-size, read by `quantize_for_inference`."""
    parser.add_argument("--quantize", choices=MODES,
                        help="weight-only quantization of the linear layers (torchao: pip install 'mm-rec[quant]'); "
                             "int8 on any device, int4 on the CPU or on CUDA in bf16")
    parser.add_argument("--group-size", type=int,
                        help=f"int4: input channels per scale and zero, 32/64/128 (CUDA also 256); "
                             f"default {DEFAULT_GROUP_SIZE}")


def quantize_for_inference(model: LanguageModel, args: argparse.Namespace,
                           device: torch.device) -> Quantization | None:
    """What --quantize and --precision make of a loaded model; returns how its weights are quantized (None:
    not at all). A quantized model runs without autocast: its weights are cast to --precision's dtype
    (auto: bf16 on CUDA, fp32 on the CPU) before they are quantized, and a model loaded quantized runs
    in the dtype it was quantized in (auto) or refuses another. ValueError (one line) for flags that
    cannot be honoured: a mode the device cannot run, a missing torchao, a different quantization than
    the loaded one."""
    if args.group_size is not None and args.quantize != "int4":
        raise ValueError("--group-size applies to --quantize int4 only")
    loaded = model.quantization
    if loaded is not None:  # a folder saved quantized
        if args.quantize is not None and (args.quantize, args.group_size or loaded.group_size) != (
                loaded.mode, loaded.group_size):
            raise ValueError(f"the checkpoint is quantized already ({loaded.describe()}); quantize its "
                             f"unquantized weights instead")
        if args.precision != "auto" and PRECISION_DTYPES[resolve_precision(args.precision, device)] != getattr(
                torch, loaded.dtype):
            raise ValueError(f"--precision {args.precision}: the checkpoint's quantized weights are {loaded.dtype}")
        return loaded
    if args.quantize is None:
        return None
    model.to(PRECISION_DTYPES[resolve_precision(args.precision, device)])
    return quantize_model(model, args.quantize, args.group_size)
