"""The MM-Rec block: gradcheck with every piece of state, the gate_input ablation, the short convolution."""

import pytest
import torch
import torch.nn.functional as F

from mm_rec.blocks.layers import ShortConvolution, _DepthwiseConvCPU, _shifted_sums
from mm_rec.blocks.mm_rec_block import MMRecBlock
from mm_rec.config import MMRecConfig
from mm_rec.core.memory_state import LayerState


def tiny_block(**overrides):
    cfg = MMRecConfig(**{**dict(hidden_dim=8, num_heads=2, num_memories=2, mem_dim=3, memory_size_M=2,
                                chunk_size=3, ffn_dim=6, num_layers=1, decay_rank=2), **overrides})
    return cfg, MMRecBlock(cfg).double()


def fresh_state(cfg, B):
    return LayerState.zeros(cfg, B, dtype=torch.float64)


@pytest.mark.parametrize("overrides", [dict(), dict(config_version=1, **{
    "memory_input": "state", "conv_size": 0, "window_size": 0, "level2": "mean", "slot_write": "mean",
    "retention": "age"})], ids=["v2", "v1"])
def test_gradcheck_one_tiny_block(overrides):
    """Gradients to the input and to every floating-point piece of a carried (non-zero) state."""
    cfg, block = tiny_block(**overrides)
    position = torch.tensor([0, 2])
    carried = block(torch.randn(2, 7, 8, dtype=torch.float64), fresh_state(cfg, 2), position)[1].tensors()
    names = [n for n, t in carried.items() if t.is_floating_point()]
    inputs = [torch.randn(2, 10, 8, dtype=torch.float64, requires_grad=True)]
    # Importances decide which slots are kept: make them distinct, so that the finite differences
    # of gradcheck do not flip the order (the selection itself has no gradient).
    if "slot_importance" in carried:
        carried["slot_importance"] = torch.randn_like(carried["slot_importance"])
    inputs += [carried[n].detach().clone().requires_grad_() for n in names]
    integers = {n: t for n, t in carried.items() if not t.is_floating_point()}

    def f(x, *pieces):
        state = LayerState(**dict(zip(names, pieces)), **integers)
        y, new = block(x, state, position + 7)
        return (y, *(t for t in new.tensors().values() if t.is_floating_point()))

    assert torch.autograd.gradcheck(f, tuple(inputs), fast_mode=True)


def test_gate_input_ablation_is_a_linear_recurrence():
    cfg, block = tiny_block(gate_input="input")
    mixer = block.mixer
    x = torch.randn(1, 7, 8, dtype=torch.float64)
    parts = dict(zip(mixer.split_sizes, mixer.in_proj(x).split(list(mixer.split_sizes.values()), -1)))
    z, modulation = parts["z"].view(1, 7, 2, 4), parts["modulation"]
    gamma = mixer.decay(modulation).exp().view(1, 7, 2, 4)
    h, states = torch.zeros(1, 2, 4, dtype=torch.float64), []
    for t in range(7):  # h_t = z_t * sigmoid(z_t W_g + b_g) + gamma_t * h_{t-1}
        h = z[:, t] * torch.sigmoid(torch.einsum("bhd,hde->bhe", z[:, t], mixer.W_g) + mixer.b_g) + gamma[:, t] * h
        states.append(h)
    _, state = mixer(x, fresh_state(cfg, 1), torch.zeros(1, dtype=torch.long))
    torch.testing.assert_close(state.h, states[-1])


@pytest.mark.parametrize("kernel_size,T,cut", [(4, 9, 3), (3, 1, 0), (2, 5, 4), (1, 6, 2)])
def test_short_convolution_is_causal_and_carries_its_tail(kernel_size, T, cut):
    conv = ShortConvolution(5, kernel_size).double()
    x = torch.randn(2, T, 5, dtype=torch.float64)
    tail = torch.zeros(2, kernel_size - 1, 5, dtype=torch.float64) if kernel_size > 1 else None
    y, _ = conv(x, tail)
    padded = F.pad(x, (0, 0, kernel_size - 1, 0))
    expected = torch.stack([(padded[:, t:t + kernel_size] * conv.weight.T).sum(1) for t in range(T)], 1)
    torch.testing.assert_close(y, expected)
    first, tail = conv(x[:, :cut], tail) if cut else (x[:, :0], tail)
    second, _ = conv(x[:, cut:], tail)
    torch.testing.assert_close(torch.cat([first, second], 1), y)


@pytest.mark.parametrize("kernel_size,T", [(4, 9), (2, 1), (3, 40), (1, 5)])
def test_short_convolution_paths_agree(kernel_size, T):
    """The CPU path (a depthwise convolution on a channels-last view) and the other devices' (autograd
    of k shifted multiply-adds) compute the same outputs and gradients, on a contiguous and on a strided
    incoming gradient; gradcheck of the CPU path."""
    full = torch.randn(3, kernel_size - 1 + T, 6, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(6, kernel_size, dtype=torch.float64, requires_grad=True)
    for grad in (torch.randn(3, T, 6, dtype=torch.float64), torch.randn(6, T, 3, dtype=torch.float64).transpose(0, 2)):
        results = []
        for path in (_DepthwiseConvCPU.apply, _shifted_sums):
            y = path(full, weight)
            results.append((y, *torch.autograd.grad(y, (full, weight), grad)))
        for a, b in zip(*results):
            torch.testing.assert_close(a, b)
    assert torch.autograd.gradcheck(_DepthwiseConvCPU.apply, (full, weight))


def test_shift_init_starts_keys_on_the_previous_token():
    """conv_init=shift: q and v of the memory start as (noisy) copies of the current token's
    projection, k of the previous one's; conv_init=random is nn.Conv1d's uniform init."""
    cfg, block = tiny_block(conv_size=3)
    conv = block.mixer.memory_conv
    Km = cfg.num_memories * cfg.mem_dim
    x = torch.randn(1, 6, 3 * Km, dtype=torch.float64)
    y, _ = conv(x, torch.zeros(1, 2, 3 * Km, dtype=torch.float64))
    close = dict(rtol=0, atol=0.2)  # the N(0, 0.02) noise on the taps
    torch.testing.assert_close(y[:, :, :Km], x[:, :, :Km], **close)
    torch.testing.assert_close(y[:, 1:, Km:2 * Km], x[:, :-1, Km:2 * Km], **close)
    torch.testing.assert_close(y[:, :, 2 * Km:], x[:, :, 2 * Km:], **close)
    assert (conv.weight.detach() - torch.eye(3, dtype=torch.float64)[[2] * Km + [1] * Km + [2] * Km]).abs().max() < 0.2
    _, random_block = tiny_block(conv_size=3, conv_init="random")
    weight = random_block.mixer.memory_conv.weight
    assert weight.abs().max() <= 3 ** -0.5 and weight.std() > 0.1
