"""Shared by the kernels' tests (scan, recurrence): outputs and gradients of a function of several
inputs, the way every kernel test compares against its float64 oracle."""

import torch


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    """Relative error ||x - ref|| / ||ref|| in float64."""
    return ((x.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30)).item()


def outputs_and_grads(fn, inputs, dtypes, use_h=True):
    """Run fn(*inputs) -> (h, last) on leaf copies of `inputs` cast to `dtypes` (None stays None),
    backpropagate a fixed random weighting of both outputs (of `last` alone unless use_h) and return
    [h, last, *the inputs' gradients] (None for a None input)."""
    leaves = [t.detach().to(dt).clone().requires_grad_() if t is not None else None for t, dt in zip(inputs, dtypes)]
    h, last = fn(*leaves)
    gen = torch.Generator().manual_seed(1)
    w_h = torch.randn(h.shape, generator=gen).to(h.device, h.dtype)
    w_last = torch.randn(last.shape, generator=gen).to(last.device, last.dtype)
    loss = (last * w_last).sum() + ((h * w_h).sum() if use_h else 0)
    loss.backward()
    return [h.detach(), last.detach()] + [leaf.grad if leaf is not None else None for leaf in leaves]
