"""How the scan kernels (Triton and CUDA) read log_a: through its strides, so that a decay
broadcast over channels (an `expand`, stride 0) is never materialised before the kernel."""

from __future__ import annotations

import torch


def kernel_view(log_a: torch.Tensor, B: int, T: int) -> torch.Tensor:
    """log_a [B, T, ...] as the kernels read it: [B, T, D] when its feature dims flatten without a
    copy (any strides), else [B, T, K, M] (two feature dims, e.g. a decay expanded over M: channel
    d is (d // M, d % M)), else a copy with the leading feature dims merged."""
    if log_a.dim() == 3:
        return log_a
    try:
        return log_a.view(B, T, -1)
    except RuntimeError:
        pass
    if log_a.dim() == 4:
        return log_a
    return log_a.reshape(B, T, -1, log_a.shape[-1])
