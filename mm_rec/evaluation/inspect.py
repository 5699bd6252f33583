"""What the memory does: its time scales, where each token reads, what it writes and what it keeps.

    spectra = decay_spectra(model)               # learned parameters, no input needed
    usage = memory_usage(model, input_ids)       # one forward over a text, per layer and bank
    plot_memory(spectra, usage, "memory.png")    # needs matplotlib (pip install 'mm-rec[plot]')

Time constants are in tokens (tau = 1 / (1 - gamma): a decay gamma forgets a fraction 1/e of its
memory in about tau steps); slot ages are in blocks of `chunk_size` tokens.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch

from mm_rec.core.memory_state import MemoryState
from mm_rec.model import MMRecModel


@dataclass
class LayerDecay:
    """The learned time scales and preferences of one layer (float64, CPU).

    gamma           [D]  sigma(beta): the core recurrence's per-channel decay without context
                         modulation (a_t = 0; the modulation moves it token by token)
    level2_lambda   [K]  per bank, the level-2 decay at rest: lambda of the decayed mean, or the
                         delta rule's alpha with zero decay logits
    age_slope       [K]  exp(log_age_slope): attention penalty per block of slot age
    window_slope    [K]  exp(log_window_slope): attention penalty per token of window distance (None: no window)
    level_weights   [K, 2]  softmax weights of the attention read and the level-2 read
    """

    gamma: torch.Tensor
    level2_lambda: torch.Tensor
    age_slope: torch.Tensor
    window_slope: torch.Tensor | None
    level_weights: torch.Tensor

    @property
    def time_constants(self) -> torch.Tensor:
        """[D] 1 / (1 - gamma), in tokens."""
        return 1.0 / (1.0 - self.gamma)

    @property
    def level2_time_constants(self) -> torch.Tensor:
        """[K] 1 / (1 - lambda), in tokens."""
        return 1.0 / (1.0 - self.level2_lambda)


@dataclass
class LayerUsage:
    """How one layer used its memory on a text (float64, CPU; means over all tokens).

    read_mass         [K, 3]  attention mass on the window, on slots, on the null slot
    slot_age_mass     [K, A]  attention mass on slots of age a = 1..A blocks
    window_mass       [K, W]  attention mass on the window key d = 0..W-1 tokens back (W = 0: none)
    write_peak        [K]     mean over sub-slots (written inside one segment) of the largest
                              pooling-weight share (1 / tokens per sub-slot: a plain mean; 1: one
                              token written)
    level2_alpha      [K]     mean delta-rule decay alpha_t (None with level2=mean)
    level2_beta       [K]     mean delta-rule write strength beta_t (None with level2=mean)
    kept_age          [K, P]  at the end of the text, the age in blocks of each slot kept by
                              importance (-1: empty); P = 0 with retention=age
    kept_importance   [K, P]  and its importance
    """

    read_mass: torch.Tensor
    slot_age_mass: torch.Tensor
    window_mass: torch.Tensor
    write_peak: torch.Tensor
    level2_alpha: torch.Tensor | None
    level2_beta: torch.Tensor | None
    kept_age: torch.Tensor
    kept_importance: torch.Tensor

    def as_dict(self) -> dict:
        return {k: (v.tolist() if isinstance(v, torch.Tensor) else v) for k, v in self.__dict__.items()}


def _require_mmrec(model) -> MMRecModel:
    if not isinstance(model, MMRecModel):
        raise ValueError(f"memory inspection needs an MMRecModel, got {type(model).__name__}")
    return model


@torch.no_grad()
def decay_spectra(model: MMRecModel) -> list[LayerDecay]:
    """Per layer, the learned time-scale parameters (see `LayerDecay`)."""
    spectra = []
    for block in _require_mmrec(model).blocks:
        mixer, hds, attention = block.mixer, block.mixer.hds, block.mixer.attention
        rest = hds.aggregate_logit if hds.level2_kind == "mean" else hds.delta_decay_bias
        level2 = torch.sigmoid(rest.double()).cpu()
        if hds.level2_kind == "delta" and hds.undecayed_banks:  # alpha = 1 there, whatever the bias
            level2[len(level2) - hds.undecayed_banks:] = 1.0
        window = getattr(attention, "log_window_slope", None)
        spectra.append(LayerDecay(
            gamma=torch.sigmoid(mixer.decay.beta.double()).cpu(),
            level2_lambda=level2,
            age_slope=attention.log_age_slope.double().exp().cpu(),
            window_slope=window.double().exp().cpu() if window is not None else None,
            level_weights=torch.softmax(mixer.integration.level_logits.double(), dim=-1).cpu(),
        ))
    return spectra


@torch.inference_mode()
def memory_usage(model: MMRecModel, input_ids: torch.Tensor, state: MemoryState | None = None) -> list[LayerUsage]:
    """Per layer, how the memory was read, written and kept on input_ids [B, T] (see `LayerUsage`).

    A forward hook on every `MultiMemoryAttention` recomputes the probabilities from the module's
    input with its public `read_probabilities`, so the numbers are those the forward used; the
    kept slots are read from the state the forward returns.
    """
    model = _require_mmrec(model)
    cfg = model.config
    K, W, C, r = cfg.num_memories, cfg.window_size, cfg.chunk_size, cfg.slots_per_block
    L = cfg.num_layers
    max_age = input_ids.shape[1] // C + 2 + (int(state.position.max()) // C if state is not None else 0)
    sums = dict(read=torch.zeros(L, K, 3, dtype=torch.float64), age=torch.zeros(L, K, max_age + 1, dtype=torch.float64),
                window=torch.zeros(L, K, max(W, 1), dtype=torch.float64), alpha=torch.zeros(L, K, dtype=torch.float64),
                beta=torch.zeros(L, K, dtype=torch.float64), peak=torch.zeros(L, K, dtype=torch.float64),
                peaks=torch.zeros(L, dtype=torch.float64))
    tokens = [0] * L

    def make_hook(layer: int):
        def hook(module, inputs, output):
            hier = inputs[0]
            probs = module.read_probabilities(hier)
            slots, null = probs["slots"].double(), probs["null"].double()  # [B, K, T, N], [B, K, T]
            B, _, T, N = slots.shape
            window = probs["window"].double() if probs["window"] is not None else None
            window_total = window.sum(-1) if window is not None else torch.zeros_like(null)
            sums["read"][layer] += torch.stack([window_total, slots.sum(-1), null], -1).sum(dim=(0, 2)).cpu()
            age = probs["slot_age"].clamp(0, max_age).expand(B, K, T, N)
            per_age = torch.zeros(K, max_age + 1, dtype=torch.float64, device=slots.device)
            per_age.scatter_add_(1, age.transpose(0, 1).reshape(K, -1), slots.transpose(0, 1).reshape(K, -1))
            sums["age"][layer] += per_age.cpu()
            if window is not None:
                distance = probs["window_distance"]  # [T, L + W]
                inside = (distance >= 0) & (distance < W)
                column = distance.clamp(0, W - 1).expand(B, K, T, -1)
                per_distance = torch.zeros(K, W, dtype=torch.float64, device=slots.device)
                masked = torch.where(inside, window, 0.0)
                per_distance.scatter_add_(1, column.transpose(0, 1).reshape(K, -1),
                                          masked.transpose(0, 1).reshape(K, -1))
                sums["window"][layer] += per_distance.cpu()
            if hier.level2_gates is not None:
                alpha, beta = hier.level2_gates
                sums["alpha"][layer] += alpha.double().sum(dim=(0, 1)).cpu()
                sums["beta"][layer] += beta.double().sum(dim=(0, 1)).cpu()
            if hier.write_weights is not None:  # the largest share of each sub-slot's pooling weight
                sub_len = C // r
                sub = ((hier.position[:, None] + torch.arange(T, device=slots.device)) // sub_len)
                sub = (sub - sub[:, :1])[:, :, None].expand(B, T, K)  # [B, T, K], from 0
                weights = hier.write_weights.double()
                groups = int(sub.max()) + 1
                total = torch.zeros(B, groups, K, dtype=torch.float64, device=slots.device).scatter_add(1, sub, weights)
                peak = torch.zeros_like(total).scatter_reduce(1, sub, weights, "amax", include_self=False)
                count = torch.zeros_like(total).scatter_add(1, sub, torch.ones_like(weights))
                whole = count == sub_len  # sub-slots written inside this segment
                sums["peak"][layer] += torch.where(whole, peak / total.clamp_min(1e-300), 0.0).sum(dim=(0, 1)).cpu()
                sums["peaks"][layer] += whole[..., 0].sum().item()
            tokens[layer] += B * T
        return hook

    handles = [block.mixer.attention.register_forward_hook(make_hook(i)) for i, block in enumerate(model.blocks)]
    try:
        out = model(input_ids.to(next(model.parameters()).device), state=state, return_logits=False)
    finally:
        for handle in handles:
            handle.remove()
    usage = []
    final_block = out.state.position // C  # [B]: the open block of every row
    for layer in range(L):
        n = torch.tensor(float(tokens[layer]), dtype=torch.float64)
        layer_state = out.state.layers[layer]
        if layer_state.slot_ids is not None:
            ids = layer_state.slot_ids[0].cpu()  # first row
            kept_age = torch.where(ids >= 0, final_block[0].cpu() - ids.div(r, rounding_mode="floor"), -1)
            kept_importance = layer_state.slot_importance[0, :, : ids.shape[1]].double().cpu()
        else:
            kept_age = kept_importance = torch.zeros(K, 0)
        has_delta = cfg.level2 == "delta"
        usage.append(LayerUsage(
            read_mass=sums["read"][layer] / n,
            slot_age_mass=sums["age"][layer, :, 1:] / n,
            window_mass=sums["window"][layer, :, :W] / n,
            write_peak=sums["peak"][layer] / sums["peaks"][layer].clamp_min(1),
            level2_alpha=sums["alpha"][layer] / n if has_delta else None,
            level2_beta=sums["beta"][layer] / n if has_delta else None,
            kept_age=kept_age, kept_importance=kept_importance))
    return usage


def plot_memory(spectra: list[LayerDecay], usage: list[LayerUsage], path: str | Path, chunk_size: int,
                title: str | None = None) -> Path:
    """Write a PNG with one row per layer: the core decay time constants (histogram) with each bank's
    level-2 time constant; where tokens read (mass over window distance and over slot age, on one
    axis in tokens); and what the ring keeps at the end (age against importance of the kept slots)."""
    try:
        from matplotlib.figure import Figure
    except ImportError as err:
        raise ImportError("plotting the memory needs matplotlib: pip install 'mm-rec[plot]' "
                          "(or pip install matplotlib)") from err
    import numpy as np  # a dependency of matplotlib

    num_layers = len(spectra)
    fig = Figure(figsize=(15, 2.8 * num_layers), layout="constrained")
    axes = fig.subplots(num_layers, 3, squeeze=False)
    K = spectra[0].age_slope.numel()
    colors = [f"C{k}" for k in range(K)]
    for layer, (decay, use) in enumerate(zip(spectra, usage)):
        left, middle, right = axes[layer]
        tau = decay.time_constants.numpy()
        left.hist(tau, bins=np.geomspace(1.0, max(2.0, float(tau.max()) * 1.1), 40), color="0.6")
        for k, tau_k in enumerate(decay.level2_time_constants.tolist()):
            if math.isfinite(tau_k):  # an undecayed bank has no time constant to draw
                left.axvline(tau_k, color=colors[k], linestyle="--", label=f"bank {k} level-2 tau {tau_k:.3g}")
        left.set_xscale("log")
        left.set_ylabel(f"layer {layer}\nchannels")
        left.set_title("core decay time constants 1/(1-sigmoid(beta)) [tokens]", fontsize=9)
        left.legend(fontsize=7)
        for k in range(K):
            window, null = use.read_mass[k, 0].item(), use.read_mass[k, 2].item()
            label = f"bank {k}: window {window:.2f}, slots {use.read_mass[k, 1].item():.2f}, null {null:.2f}"
            if use.window_mass.shape[1]:
                middle.plot(np.arange(1, use.window_mass.shape[1] + 1), use.window_mass[k].numpy(),
                            color=colors[k], label=label)
                label = None
            ages = np.arange(1, use.slot_age_mass.shape[1] + 1) * chunk_size
            middle.plot(ages, use.slot_age_mass[k].numpy(), color=colors[k], linestyle=":", label=label)
        middle.set_xscale("log")
        middle.legend(fontsize=7)
        middle.set_title("attention mass: window by distance (solid), slots by age (dotted) [tokens]", fontsize=9)
        if use.kept_age.numel():
            for k in range(K):
                kept = use.kept_age[k] >= 0
                right.scatter(use.kept_age[k][kept].numpy() * chunk_size, use.kept_importance[k][kept].numpy(),
                              s=8, color=colors[k], label=f"bank {k}: {int(kept.sum())} kept")
            right.set_xscale("symlog")
            right.legend(fontsize=7)
            right.set_title("kept slots at the end: age [tokens] vs importance", fontsize=9)
        else:
            right.text(0.5, 0.5, "retention by age only: no kept slots", ha="center", va="center",
                       transform=right.transAxes)
    if title:
        fig.suptitle(title)
    path = Path(path)
    fig.savefig(path, dpi=110)
    return path


__all__ = ["LayerDecay", "LayerUsage", "decay_spectra", "memory_usage", "plot_memory"]
