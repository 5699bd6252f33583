"""Debugging aids: find the first module producing NaN/Inf, and report gradient flow.

    with NonFiniteDetector(model) as detector:       # `mmrec train --debug` keeps one attached
        loss = model(ids, labels=labels).loss
        loss.backward()
    print(detector.report())                          # "forward: first non-finite output in blocks.1.mixer.hds"

    stats = gradient_flow(model)                      # after backward
    print(format_gradient_flow(stats))                # grad norms per component and layer, flags

Parameter names are grouped into components by `component_name` ("blocks.3.mixer.in_proj.weight"
-> layer 3, "mixer.in_proj"), which `mmrec info` also uses for its parameter count.
"""

from __future__ import annotations

import dataclasses
import math
import re
import warnings
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

WRAPPER_PREFIXES = ("_checkpoint_wrapped_module", "_orig_mod", "_fsdp_wrapped_module", "module")
_LAYER = re.compile(r"^(?:.*\.)?(?:blocks|layers|h)\.(\d+)\.")

# Friendly names of MM-Rec's components (the rest keep their module path).
COMPONENTS = {
    "embed": "embeddings",
    "lm_head": "lm_head (untied)",
    "mixer.in_proj": "mixer: in_proj (z, decay modulation, gate, memory q/k/v, delta gates)",
    "mixer.decay": "mixer: MDI decay (beta, low-rank up)",
    "mixer.W_g": "mixer: W_g (+ b_g)",
    "mixer.b_g": "mixer: W_g (+ b_g)",
    "mixer.memory_conv": "mixer: short convolution of the memory's q/k/v",
    "mixer.hds": "mixer: HDS (write/importance queries, level-2 biases, state q/k/v)",
    "mixer.attention": "mixer: multi-memory attention (window/age slopes, null slot)",
    "mixer.integration": "mixer: memory integration (level weights, memory_proj)",
    "mixer.out_proj": "mixer: out_proj",
    "ffn": "FFN (SwiGLU)",
    "mixer_norm": "norms",
    "ffn_norm": "norms",
    "mixer.state_norm": "norms",
    "final_norm": "norms",
}


def component_name(param_name: str) -> tuple[int | None, str]:
    """'blocks.3.mixer.in_proj.weight' -> (3, 'mixer.in_proj'); 'embed.weight' -> (None, 'embed')."""
    match = _LAYER.match(param_name)
    layer = int(match.group(1)) if match else None
    rest = param_name[match.end():] if match else param_name
    parts = [p for p in rest.split(".") if p not in WRAPPER_PREFIXES]
    if len(parts) > 1 and parts[-1] in ("weight", "bias"):
        parts = parts[:-1]
    key = ".".join(parts[:2]) if parts[0] == "mixer" else parts[0]
    return layer, key


def component_label(key: str) -> str:
    return COMPONENTS.get(key, key)


def _tensors(obj, depth: int = 0) -> Iterator[torch.Tensor]:
    """Tensors inside a module output: tensors, sequences, mappings, dataclasses, state objects."""
    if isinstance(obj, torch.Tensor):
        yield obj
    elif depth > 4 or obj is None:
        return
    elif isinstance(obj, (list, tuple)):
        for item in obj:
            yield from _tensors(item, depth + 1)
    elif isinstance(obj, dict):
        for item in obj.values():
            yield from _tensors(item, depth + 1)
    elif dataclasses.is_dataclass(obj):
        for f in dataclasses.fields(obj):
            yield from _tensors(getattr(obj, f.name), depth + 1)
    elif type(obj).__module__.startswith("mm_rec") and hasattr(obj, "__dict__"):
        yield from _tensors(vars(obj), depth + 1)


def _finite(obj) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in _tensors(obj) if t.is_floating_point())


class NonFiniteDetector:
    """Hooks that name the first module whose output (forward) or input gradient (backward)
    holds NaN or Inf. Forward hooks fire when a module finishes, children before parents, so
    the first one to see a non-finite output is the innermost module that produced it. In
    backward, the origin is the first leaf module whose incoming gradient was finite and whose
    outgoing one is not. Costs one device sync per module: for debugging only."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.handles: list = []
        self.forward_origin: str | None = None
        self.backward_origin: str | None = None
        self.backward_first: str | None = None

    def __enter__(self) -> NonFiniteDetector:
        self.attach()
        return self

    def __exit__(self, *exc) -> None:
        self.detach()

    def attach(self) -> None:
        # leaf modules that take non-tensor inputs (the HDS hierarchy) still report their output
        # gradients; PyTorch warns about that on every backward
        warnings.filterwarnings("ignore", message="Full backward hook is firing when gradients are computed")
        for name, module in self.model.named_modules():
            name = name or type(module).__name__
            self.handles.append(module.register_forward_hook(self._forward_hook(name)))
            if not any(True for _ in module.children()) and not isinstance(module, nn.Embedding):
                # leaf modules return plain tensors; an embedding's input (ids) has no gradient
                self.handles.append(module.register_full_backward_hook(self._backward_hook(name)))

    def detach(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []

    def reset(self) -> None:
        self.forward_origin = self.backward_origin = self.backward_first = None

    @property
    def found(self) -> bool:
        return bool(self.forward_origin or self.backward_origin or self.backward_first)

    def report(self) -> str:
        if self.forward_origin:
            return f"forward: first non-finite output in {self.forward_origin}"
        if self.backward_origin or self.backward_first:
            return f"backward: first non-finite gradient from {self.backward_origin or self.backward_first}"
        return "no non-finite value seen by the module hooks (check the loss and the optimizer state)"

    def _forward_hook(self, name: str):
        def hook(module, args, output):
            if self.forward_origin is None and not _finite(output):
                self.forward_origin = f"{name} ({type(module).__name__})"
        return hook

    def _backward_hook(self, name: str):
        def hook(module, grad_input, grad_output):
            if self.backward_origin is not None or _finite(grad_input):
                return
            label = f"{name} ({type(module).__name__})"
            self.backward_first = self.backward_first or label
            if _finite(grad_output):
                self.backward_origin = label
        return hook


def nonfinite_gradients(model: nn.Module) -> list[str]:
    """Names of parameters whose gradient holds NaN or Inf."""
    return [n for n, p in model.named_parameters() if p.grad is not None and not bool(torch.isfinite(p.grad).all())]


@dataclass
class GradStat:
    name: str
    layer: int | None
    component: str
    numel: int
    grad_norm: float | None  # None: no gradient
    weight_norm: float
    zero_fraction: float  # share of exactly-zero gradient entries


@torch.no_grad()
def gradient_flow(model: nn.Module) -> list[GradStat]:
    """Per-parameter gradient statistics (call after backward, before zero_grad)."""
    stats = []
    for name, p in model.named_parameters():
        layer, component = component_name(name)
        g = p.grad
        if g is not None and hasattr(g, "full_tensor"):  # a sharded DTensor
            g = g.full_tensor()
        weight = p.full_tensor() if hasattr(p, "full_tensor") else p
        stats.append(GradStat(
            name, layer, component, p.numel(),
            None if g is None else float(g.float().norm()),
            float(weight.float().norm()),
            0.0 if g is None else float((g == 0).float().mean())))
    return stats


def format_gradient_flow(stats: list[GradStat], title: str = "gradient flow") -> str:
    """A table per component: gradient norm per layer, |grad|/|weight|, and flags for parameters
    that got no gradient, an all-zero gradient, or a non-finite one."""
    total = math.sqrt(sum(s.grad_norm ** 2 for s in stats if s.grad_norm is not None and math.isfinite(s.grad_norm)))
    layers = sorted({s.layer for s in stats if s.layer is not None})
    by_component: dict[str, list[GradStat]] = {}
    for s in stats:
        by_component.setdefault(s.component, []).append(s)
    lines = [f"{title}: global grad norm {total:.4g}",
             f"  {'component':<22} {'params':>10}  {'|grad| per layer' if layers else '|grad|':<40} {'|grad|/|w|':>10}"]
    for component, group in by_component.items():
        norms: dict[int, float] = {}  # layer (-1: not in a block) -> gradient norm
        for s in group:
            if s.grad_norm is not None:
                key = -1 if s.layer is None else s.layer
                norms[key] = math.hypot(norms.get(key, 0.0), s.grad_norm)
        grad = math.sqrt(sum(v * v for v in norms.values()))
        weight = math.sqrt(sum(s.weight_norm ** 2 for s in group))
        per_layer = " ".join(f"{norms[key]:.2e}" for key in sorted(norms)) or "-"
        lines.append(f"  {component:<22} {sum(s.numel for s in group):>10}  {per_layer:<40} "
                     f"{grad / weight if weight else float('nan'):>10.2e}")
    flagged = [(s.name, "no gradient") for s in stats if s.grad_norm is None]
    flagged += [(s.name, "non-finite gradient") for s in stats
                if s.grad_norm is not None and not math.isfinite(s.grad_norm)]
    flagged += [(s.name, "zero gradient") for s in stats if s.grad_norm == 0.0]
    for name, why in flagged:
        lines.append(f"  ! {name}: {why}")
    return "\n".join(lines)
