"""Small building blocks: RMSNorm, the SwiGLU feed-forward network and the short causal convolution."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    """RMSNorm computed in fp32 (or float64), returned in the input dtype."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.to(torch.promote_types(x.dtype, torch.float32))
        out = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (out * self.weight.to(out.dtype)).to(x.dtype)


class SwiGLU(nn.Module):
    """FFN(x) = W_down(silu(W_gate x) * W_up x), with W_gate and W_up fused in one matmul."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.gate_up = nn.Linear(dim, 2 * hidden, bias=False)
        self.down = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(F.silu(gate) * up)


class ShortConvolution(nn.Module):
    """Causal depthwise convolution over time with a carried tail (as in fla's ShortConvolution):

        y_t[c] = sum_{i < k} weight[c, i] * x_{t - k + 1 + i}[c]

    where inputs before the segment come from `tail` (the last k - 1 inputs of the stream, zeros
    at its start), so a stream cut anywhere gives the same outputs.
    """

    def __init__(self, channels: int, kernel_size: int, delays: Sequence[int] | None = None):
        """`delays` (channels ints, < kernel_size): start channel c as a pure delay of delays[c]
        tokens (y_t[c] = x_{t - delays[c]}[c], plus N(0, 0.02) noise); None: nn.Conv1d's uniform init."""
        super().__init__()
        self.kernel_size = kernel_size
        self.weight = nn.Parameter(torch.empty(channels, kernel_size))
        # a plain tuple, not a buffer: a model built on the meta device re-initialises from it
        self.delays = None if delays is None else tuple(int(d) for d in delays)
        if self.delays is not None and len(self.delays) != channels:
            raise ValueError(f"delays has {len(self.delays)} entries for {channels} channels")
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if self.delays is None:
            bound = 1.0 / self.kernel_size ** 0.5  # nn.Conv1d's default for a depthwise kernel
            nn.init.uniform_(self.weight, -bound, bound)
            return
        with torch.no_grad():
            self.weight.normal_(0.0, 0.02)
            # weight[:, k - 1] multiplies x_t: channel c's tap delays[c] steps back, all channels in one op
            # (a loop over the 7b preset's 12,288 channels a layer took 20 s to build the model on the meta device)
            taps = torch.tensor([max(self.kernel_size - 1 - delay, 0) for delay in self.delays])
            self.weight[torch.arange(len(self.delays)).to(self.weight.device), taps.to(self.weight.device)] += 1.0

    def forward(self, x: torch.Tensor, tail: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """x [B, T, channels], tail [B, k - 1, channels] (None for k = 1) -> (y [B, T, channels], new tail)."""
        k = self.kernel_size
        weight = self.weight.to(x.dtype)
        if k == 1:
            return x * weight[:, 0], None
        full = torch.cat([tail.to(x.dtype), x], dim=1)  # [B, k - 1 + T, channels]
        y = _DepthwiseConvCPU.apply(full, weight) if x.device.type == "cpu" else _shifted_sums(full, weight)
        return y, full[:, -(k - 1):].to(tail.dtype)


def _shifted_sums(full: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The causal convolution of full [B, k - 1 + T, C] with weight [C, k] -> [B, T, C] as k shifted
    multiply-adds: elementwise work that fuses into one kernel under compile (GPU), where a depthwise
    conv1d's backward (cuDNN, long sequences) is slow."""
    k = weight.shape[1]
    T = full.shape[1] - k + 1
    y = full[:, :T] * weight[:, 0]
    for i in range(1, k):
        y = torch.addcmul(y, full[:, i:i + T], weight[:, i])
    return y


class _DepthwiseConvCPU(torch.autograd.Function):
    """`_shifted_sums` on the CPU as one depthwise convolution (oneDNN) and its backward.

    full [B, L, C] seen as [B, C, 1, L] is already a channels-last image (C innermost): the
    convolution reads it in place and writes y in the same [B, T, C] layout, no transposing copy
    either way; k shifted multiply-adds would pass over the data k times. About 2x faster forward
    and backward at the tiny preset's [8, 256, 192], k = 4 (docs/benchmarks.md)."""

    @staticmethod
    def forward(ctx, full, weight):
        ctx.save_for_backward(full, weight)
        C = weight.shape[0]
        image = full.transpose(1, 2)[:, :, None, :]  # [B, C, 1, L], channels-last strides
        with torch.autocast("cpu", enabled=False):  # in full's dtype, as the backward computes
            return F.conv2d(image, weight[:, None, None, :], groups=C)[:, :, 0].transpose(1, 2)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        full, weight = ctx.saved_tensors
        C = weight.shape[0]
        image = full.transpose(1, 2)[:, :, None, :]
        grad_image = grad.contiguous().transpose(1, 2)[:, :, None, :]  # channels-last, as the input
        d_image, d_weight, _ = torch.ops.aten.convolution_backward(
            grad_image, image, weight[:, None, None, :], None, (1, 1), (0, 0), (1, 1), False, (0, 0), C,
            (ctx.needs_input_grad[0], ctx.needs_input_grad[1], False))
        d_full = None if d_image is None else d_image[:, :, 0].transpose(1, 2)
        return d_full, None if d_weight is None else d_weight[:, 0, 0]
