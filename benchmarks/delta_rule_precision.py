"""How far the chunked delta rule's output and carried state drift from the float64 loop over long sequences
when its products take half operands (as under bf16 autocast), against fp32 operands.

Random unit keys and queries, normal values, near-undecayed gates (log alpha in [-decay, 0], beta in
[0, beta_max]); the chunked form (`delta_rule_chunked`) with its state map formed and factored, each against
`delta_rule_sequential` (float64). The half products are emulated as a GPU computes them: operands rounded
to the half type, products accumulated and returned in fp32 (on a CPU, half matmuls round their results
too). Prints the relative error of the final state and of the outputs by eighth of the sequence: an error
that grows with the position would blur what the memory carries far into a long context.

    python benchmarks/delta_rule_precision.py [--tokens 32768] [--beta-max 0.5] [--decay 1e-4] [--key-dim 64]
"""

from __future__ import annotations

import argparse
from unittest import mock

import torch
import torch.nn.functional as F

from mm_rec.ops.delta_rule import reference

_product = reference._product


def gpu_like_product(a, b, operands, result=None):
    """`reference._product` as CUDA computes it with half operands: rounded operands, fp32 sums and result."""
    if operands in (torch.bfloat16, torch.float16):
        out = a.to(operands).float() @ b.to(operands).float()
        return out if result is None else out.to(result)
    return _product(a, b, operands, result)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=32768, help="sequence length (default 32768)")
    parser.add_argument("--rows", type=int, default=4, help="independent rows (default 4)")
    parser.add_argument("--key-dim", type=int, default=64, help="m_k = m_v (default 64, the passkey recipe's)")
    parser.add_argument("--chunk", type=int, default=128, help="chunk length (default 128: 8K-token segments)")
    parser.add_argument("--beta-max", type=float, default=0.5, help="write strengths uniform in [0, this]")
    parser.add_argument("--decay", type=float, default=1e-4, help="log alpha uniform in [-this, 0]")
    parser.add_argument("--dtype", default="bf16", choices=["bf16", "fp16"], help="the half type of the products")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    N, T, m, L = args.rows, args.tokens, args.key_dim, args.chunk
    q, k = (F.normalize(torch.randn(N, T, m), dim=-1) for _ in range(2))
    v = torch.randn(N, T, m)
    log_alpha, beta = -torch.rand(N, T) * args.decay, torch.rand(N, T) * args.beta_max
    S0 = torch.zeros(N, m, m)
    o64, S64 = reference.delta_rule_sequential(q, k, v, log_alpha, beta, S0)
    half = torch.bfloat16 if args.dtype == "bf16" else torch.float16
    print(f"N={N} T={T} m={m} L={L} beta<={args.beta_max} -log alpha<={args.decay}; relative error against the "
          "float64 loop")
    print("| operands | state map | final state | outputs by eighth of the sequence, first to last |")
    print("| --- | --- | ---: | --- |")
    with mock.patch.object(reference, "_product", gpu_like_product):
        for name, dtype in (("fp32", None), (args.dtype, half)):
            for factored in (False, True):
                rule = (lambda *_: True) if factored else reference._factored
                with mock.patch.object(reference, "_factored", rule):
                    inputs = [x.to(dtype) if dtype else x for x in (q, k, v)]
                    o, S = reference.delta_rule_chunked(*inputs, log_alpha, beta, S0, chunk_len=L, matmul_dtype=dtype)
                state_err = float((S.double() - S64).norm() / S64.norm())
                per_token = (o.double() - o64).norm(dim=-1) / o64.norm(dim=-1)
                eighths = per_token[:, : T // 8 * 8].reshape(N, 8, -1).mean((0, 2))
                print(f"| {name} | {'factored' if factored else 'formed'} | {state_err:.2e} | "
                      + " ".join(f"{float(e):.1e}" for e in eighths) + " |", flush=True)


if __name__ == "__main__":
    main()
