"""What several commands share: exit codes, the help formatter, and reading a recipe from the
options --config, --preset, --model and --set."""

from __future__ import annotations

import argparse
import json

from mm_rec.config import load_mapping
from mm_rec.loading import MODEL_TYPES
from mm_rec.training.config import RunConfig, apply_overrides

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
