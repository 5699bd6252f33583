"""`mmrec info`: parameter count per component, on the meta device (any size, no memory)."""

from __future__ import annotations

import argparse

import torch

from mm_rec.blocks.mm_rec_block import layer_flops_per_token
from mm_rec.cli.common import HelpFormatter, add_recipe_arguments, recipe_from_args
from mm_rec.core.decode_state import ENTRIES
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
    fields = cfg.to_dict()
    if hasattr(cfg, "num_hds_levels"):  # the seeds' names, fixed values (properties, not fields)
        fields.update(num_hds_levels=cfg.num_hds_levels, use_log_sum_exp=cfg.use_log_sum_exp)
    print(", ".join(f"{k}={v}" for k, v in fields.items()))
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
        entries = sum(t.numel() for layer in state.layers for name, t in layer.tensors().items() if name in ENTRIES)
        print(f"recurrent state per sequence: {floats:,} values ({floats * 4 / 2**20:.1f} MiB in fp32; "
              f"{(floats * 4 - entries * 2) / 2**20:.1f} MiB decoding with bf16 weights, the window's and ring's "
              "keys and values in bf16), independent of the sequence length; per layer:")
        for piece, tensor in state.layers[0].tensors().items():
            print(f"  {piece:<18} {str(list(tensor.shape[1:])):<22} {tensor.numel():>12,}")
        cost = layer_flops_per_token(cfg)
        total_cost = sum(cost.values())
        print(f"forward cost per token and layer: {total_cost / 1e6:,.2f} MFLOP, independent of the sequence length: "
              + ", ".join(f"{k} {v / 1e6:,.3g}" for k, v in cost.items()))
    return 0
