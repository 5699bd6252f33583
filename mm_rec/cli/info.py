"""`mmrec info`: parameter count per component, on the meta device (any size, no memory)."""

from __future__ import annotations

import argparse

import torch

from mm_rec.cli.common import HelpFormatter, add_recipe_arguments, recipe_from_args
from mm_rec.loading import build_model
from mm_rec.utils.debugging import COMPONENTS, component_label, component_name


def add_parser(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser("info", help="parameter count per component (meta device: any size)",
                            formatter_class=HelpFormatter,
                            description="  mmrec info --preset 7b\n  mmrec info --config configs/small.yaml")
    add_recipe_arguments(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    config = recipe_from_args(args, model_only=True)
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
    print(", ".join(f"{k}={v}" for k, v in cfg.to_dict().items()))
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
