"""Random inputs of the gated delta rule for the tests of this folder."""

import torch
import torch.nn.functional as F


def inputs(B=2, T=67, K=3, mk=5, mv=4, dtype=torch.float64, extreme=True, device="cpu"):
    """q, k (unit rows), v [B, T, K, m], log_alpha, beta [B, T, K], S0 [B, K, mv, mk]; with `extreme`,
    both decay clamps (log_alpha -50 and 0) and writes at both ends of [0, 1] (beta 1 and 0)."""
    q = torch.randn(B, T, K, mk, dtype=dtype)
    k = F.normalize(torch.randn(B, T, K, mk, dtype=dtype), dim=-1)
    v = torch.randn(B, T, K, mv, dtype=dtype)
    log_alpha = -torch.rand(B, T, K, dtype=dtype) * 3
    beta = torch.rand(B, T, K, dtype=dtype)
    if extreme:
        log_alpha[:, ::5] = -50.0
        log_alpha[:, 1::7] = 0.0
        beta[:, 2::9] = 1.0
        beta[:, 3::11] = 0.0
    S0 = torch.randn(B, K, mv, mk, dtype=dtype)
    return [x.to(device) for x in (q, k, v, log_alpha, beta, S0)]
