"""What the memory does: decay spectra and attention over slot ages, per layer and bank.

    spectra = decay_spectra(model)                 # learned parameters, no input needed
    mass = slot_age_attention(model, input_ids)    # [layers, K, S + 1] on a given text
    plot_memory(spectra, mass, "memory.png")       # needs matplotlib (pip install 'mm-rec[plot]')

Time constants are in tokens for decays (tau = 1 / (1 - gamma): a decay gamma forgets a fraction
1/e of its memory in about tau steps) and in blocks of `chunk_size` tokens for slot ages.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from mm_rec.core.memory_state import MemoryState
from mm_rec.model import MMRecModel


@dataclass
class LayerDecay:
    """The learned time scales of one layer (float64, CPU).

    gamma             [D]  sigma(beta): the core recurrence's per-channel decay without context
                           modulation (a_t = 0; the modulation moves it token by token)
    aggregate_lambda  [K]  sigma(aggregate_logit): decay of the level-2 running mean per bank
    age_slope         [K]  exp(log_age_slope): attention penalty per block of slot age per bank
    """

    gamma: torch.Tensor
    aggregate_lambda: torch.Tensor
    age_slope: torch.Tensor

    @property
    def time_constants(self) -> torch.Tensor:
        """[D] 1 / (1 - gamma), in tokens."""
        return 1.0 / (1.0 - self.gamma)

    @property
    def aggregate_time_constants(self) -> torch.Tensor:
        """[K] 1 / (1 - lambda), in tokens."""
        return 1.0 / (1.0 - self.aggregate_lambda)


def _require_mmrec(model) -> MMRecModel:
    if not isinstance(model, MMRecModel):
        raise ValueError(f"memory inspection needs an MMRecModel, got {type(model).__name__}")
    return model


@torch.no_grad()
def decay_spectra(model: MMRecModel) -> list[LayerDecay]:
    """Per layer, the learned decay parameters (see `LayerDecay`)."""
    spectra = []
    for block in _require_mmrec(model).blocks:
        mixer = block.mixer
        spectra.append(LayerDecay(
            gamma=torch.sigmoid(mixer.decay.beta.double()).cpu(),
            aggregate_lambda=torch.sigmoid(mixer.hds.aggregate_logit.double()).cpu(),
            age_slope=mixer.attention.log_age_slope.double().exp().cpu(),
        ))
    return spectra


@torch.inference_mode()
def slot_age_attention(model: MMRecModel, input_ids: torch.Tensor, state: MemoryState | None = None) -> torch.Tensor:
    """Mean attention mass over slot ages of every layer and bank on input_ids [B, T].

    Returns [num_layers, K, S + 1] float64: column a - 1 holds the mass on the slot of age a blocks
    (a = 1..S), the last column the mass on the null slot; every row sums to 1. The mean runs over
    all B * T tokens, so tokens that see no slot yet (the first block of a fresh stream) put their
    whole mass on the null slot.

    A forward hook on every `MultiMemoryAttention` recomputes the probabilities from the module's
    input with its public `slot_probabilities`, so the numbers are those the forward used.
    """
    model = _require_mmrec(model)
    S = model.config.memory_size_M
    K = model.config.num_memories
    sums = torch.zeros(model.config.num_layers, K, S + 2, dtype=torch.float64)  # ages 1..S, null, invisible
    tokens = [0] * model.config.num_layers

    def make_hook(layer: int):
        def hook(module, inputs, output):
            probs, age = module.slot_probabilities(inputs[0])  # [B, K, T, N + 1], [B, 1, T, N]
            B, _, T, N = age.shape
            # Column of every (token, slot): its age - 1 if visible, else the "invisible" column S + 1
            # (those slots have probability exactly 0 after the softmax).
            column = torch.where((age >= 1) & (age <= S), age - 1, S + 1).expand(B, K, T, N)
            flat = (torch.arange(K, device=age.device).view(1, K, 1, 1) * (S + 2) + column).flatten()
            per_bank = torch.zeros(K * (S + 2), dtype=torch.float64, device=age.device)
            per_bank.scatter_add_(0, flat, probs[..., :-1].double().flatten())
            per_bank = per_bank.view(K, S + 2)
            per_bank[:, S] += probs[..., -1].double().sum(dim=(0, 2))
            sums[layer] += per_bank.cpu()
            tokens[layer] += B * T
        return hook

    handles = [block.mixer.attention.register_forward_hook(make_hook(i)) for i, block in enumerate(model.blocks)]
    try:
        model(input_ids.to(next(model.parameters()).device), state=state, return_logits=False)
    finally:
        for handle in handles:
            handle.remove()
    return sums[:, :, :S + 1] / torch.tensor(tokens, dtype=torch.float64).view(-1, 1, 1)


def plot_memory(spectra: list[LayerDecay], attention: torch.Tensor, path: str | Path,
                title: str | None = None) -> Path:
    """Write a PNG with one row per layer: left, the histogram of the core decay time constants
    with the level-2 time constant of every bank marked; right, the attention mass over slot ages
    per bank (the legend gives each bank's age slope and null-slot mass)."""
    try:
        from matplotlib.figure import Figure
    except ImportError as err:
        raise ImportError("plotting the memory needs matplotlib: pip install 'mm-rec[plot]' "
                          "(or pip install matplotlib)") from err
    import numpy as np  # a dependency of matplotlib

    num_layers = len(spectra)
    fig = Figure(figsize=(12, 2.8 * num_layers), layout="constrained")
    axes = fig.subplots(num_layers, 2, squeeze=False)
    colors = [f"C{k}" for k in range(attention.shape[1])]
    S = attention.shape[2] - 1
    for layer, (decay, mass) in enumerate(zip(spectra, attention)):
        left, right = axes[layer]
        tau = decay.time_constants.numpy()
        left.hist(tau, bins=np.geomspace(1.0, max(2.0, float(tau.max()) * 1.1), 40), color="0.6")
        for k, tau_k in enumerate(decay.aggregate_time_constants.tolist()):
            left.axvline(tau_k, color=colors[k], linestyle="--", label=f"bank {k} level-2 tau {tau_k:.3g}")
        left.set_xscale("log")
        left.set_ylabel(f"layer {layer}\nchannels")
        left.set_title("core decay time constants 1/(1-sigmoid(beta)) [tokens]", fontsize=9)
        left.legend(fontsize=7)
        if S == 0:
            right.text(0.5, 0.5, "no long-term memory (memory_size_M = 0): all mass on the null slot",
                       ha="center", va="center", transform=right.transAxes)
        else:
            for k in range(mass.shape[0]):
                right.plot(np.arange(1, S + 1), mass[k, :S].numpy(), color=colors[k],
                           label=f"bank {k}: slope {decay.age_slope[k].item():.3g}, null {mass[k, S].item():.2f}")
            right.set_xscale("log")
            right.legend(fontsize=7)
        right.set_title("mean attention mass over slot ages [blocks]", fontsize=9)
    if title:
        fig.suptitle(title)
    path = Path(path)
    fig.savefig(path, dpi=110)
    return path


__all__ = ["LayerDecay", "decay_spectra", "plot_memory", "slot_age_attention"]
