"""The chunked delta rule with its chunk-to-chunk pass in one Triton kernel
(mm_rec/ops/delta_rule/triton_kernels.py) against the float64 loop and against the torch pass
(`chain_states_torch`) it replaces. On the CPU through Triton's interpreter (TRITON_INTERPRET=1, set by
tests/conftest.py), with tiles shrunk so that every row block and every sub-block of a chunk's tokens is
crossed; half operands as fp16 there (the interpreter's bf16 products are wrong: a bf16 dot of ones
gives garbage), bf16 on the GPU. With a GPU the same tests run there, and one more at the 7b preset's
sizes."""

import pytest
import torch
from delta_helpers import inputs as random_inputs

from mm_rec.ops import triton_available
from mm_rec.ops.delta_rule import gated_delta_rule
from mm_rec.ops.delta_rule.reference import chain_states_torch

pytestmark = pytest.mark.skipif(not triton_available(), reason="needs Triton (GPU or TRITON_INTERPRET=1)")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
HALF = torch.bfloat16 if DEVICE == "cuda" else torch.float16


def small_tiles(monkeypatch) -> None:
    """State tiles of 16 rows and factor tiles of 16 tokens: several row blocks and token sub-blocks."""
    from mm_rec.ops.delta_rule import triton_kernels

    monkeypatch.setattr(triton_kernels, "_STATE_TILE_ELEMENTS", 16 * 16)
    monkeypatch.setattr(triton_kernels, "_FACTOR_TILE_BYTES", 16 * 16)


def inputs(B, T, K, mk, mv, dtype=torch.float64, extreme=True):
    return random_inputs(B, T, K, mk, mv, dtype, extreme, device=DEVICE)


def outputs_and_grads(args, backend, delta_rule=gated_delta_rule):
    """o, S and the gradients of a random function of both."""
    args = [x.detach().clone().requires_grad_() for x in args]
    o, s = delta_rule(*args, backend=backend)
    gen = torch.Generator().manual_seed(1)
    w_o, w_s = (torch.randn(x.shape, generator=gen, dtype=torch.float64).to(x.device) for x in (o, s))
    loss = (o.double().sin() * w_o).sum() + (s.double().cos() * w_s).sum()
    return [o, s, *torch.autograd.grad(loss, args)]


NAMES = ("o", "S", "dq", "dk", "dv", "dlog_alpha", "dbeta", "dS0")


@pytest.mark.parametrize("T, mk, mv", [(1, 3, 3), (67, 5, 4), (130, 33, 17), (65, 40, 24)])
@pytest.mark.parametrize("tiles", ["default", "small"])
def test_float64_equals_the_loop(T, mk, mv, tiles, monkeypatch):
    """float64 inputs (the kernel's products in IEEE float64): outputs, final state and every gradient equal
    the float64 loop's to rounding, at odd sizes, lengths off the chunk edge, T = 1 and extreme decays."""
    if tiles == "small":
        small_tiles(monkeypatch)
    args = inputs(2, T, 2, mk, mv)
    got, want = outputs_and_grads(args, "triton"), outputs_and_grads(args, "sequential")
    for name, a, b in zip(NAMES, got, want):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11, msg=lambda m, name=name: f"{name}: {m}")


def test_state_carries_across_a_split_off_the_chunk_edge():
    args = inputs(1, 150, 2, 20, 12)
    o_full, s_full = gated_delta_rule(*args, backend="triton")
    o1, s1 = gated_delta_rule(*[x[:, :77] for x in args[:5]], args[5], backend="triton")
    o2, s2 = gated_delta_rule(*[x[:, 77:] for x in args[:5]], s1, backend="triton")
    torch.testing.assert_close(torch.cat([o1, o2], 1), o_full, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(s2, s_full, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("operands", [torch.float32, HALF])
@pytest.mark.parametrize("reverse", [False, True])
def test_the_pass_equals_the_torch_pass(operands, reverse, monkeypatch):
    """The kernel's contract, directly: the entering states (in the state's dtype, and in the operands'
    half type as the chunked form keeps them), the final state and the Frobenius products, forwards and
    in reverse, against `chain_states_torch`; one factor a strided slice (read in place), one contiguous."""
    small_tiles(monkeypatch)
    from mm_rec.ops.delta_rule.triton_kernels import chain_states_triton

    N, n, L, mk, mv = 3, 5, 40, 37, 21
    gen = torch.Generator().manual_seed(0)
    start, add, dot_with = (torch.randn(shape, generator=gen).to(DEVICE)
                            for shape in ((N, mv, mk), (N, n, mv, mk), (N, n, mv, mk)))
    decay = torch.rand(N, n, generator=gen).to(DEVICE)
    left, right = (torch.randn(N, n, L, mk, generator=gen).to(DEVICE, operands) / mk for _ in range(2))
    # left as the chunked form hands W over: the first mk columns of [W | U_v], read in place by the kernel
    left = torch.cat([left, torch.randn(N, n, L, 9, generator=gen).to(DEVICE, operands)], dim=-1)[..., :mk]
    tol = dict(rtol=1e-5, atol=1e-5) if operands == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    for entering_dtype in {None, operands}:
        for with_dots in (False, True):
            extra = dict(entering_dtype=entering_dtype, dot_with=dot_with.to(operands) if with_dots else None)
            want = chain_states_torch(start, add, decay, left, right, reverse, **extra)
            got = chain_states_triton(start, add, decay, left, right, reverse, **extra)
            for name, a, b in zip(("entering", "final", "dots"), got, want):
                if b is None:
                    assert a is None, name
                    continue
                assert a.dtype == b.dtype and a.shape == b.shape, name
                torch.testing.assert_close(a.float(), b.float(), **tol, msg=lambda m, name=name: f"{name}: {m}")


def test_half_inputs_within_half_precision_of_the_loop():
    """Half q, k, v (the kernel's products on half operands, fp32 state) over 4-7 chunks with decays near 1:
    outputs, state and gradients within half precision of the float64 loop, as the torch pass is (bf16:
    the rounding of the inputs alone gives relative errors of 0.024 in d log_alpha and dS0 here)."""
    q, k, v, la, b, S0 = inputs(2, 200, 2, 80, 24, extreme=False)
    la = la / 30
    tol = 3e-2 if HALF == torch.bfloat16 else 2e-2
    want = outputs_and_grads([q, k, v, la, b, S0], "sequential")
    for backend in ("triton", "torch"):
        got = outputs_and_grads([q.to(HALF), k.to(HALF), v.to(HALF), la.float(), b.float(), S0.float()], backend)
        for name, a, w in zip(NAMES, got, want):
            error = ((a.double() - w).norm() / w.norm()).item()
            assert error < tol, f"{backend} {name}: relative error {error:.3g}"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_7b_sizes_on_gpu_match_the_torch_pass():
    """The 7b preset's delta memory (m = 512, 64-token chunks, 4 banks here), bf16 inputs: the Triton pass
    and the torch pass agree within bf16 precision on outputs, state and gradients; and in fp32."""
    for dtype, tol in ((torch.bfloat16, 2e-2), (torch.float32, 1e-4)):
        q, k, v, la, b, S0 = inputs(1, 300, 4, 512, 512, dtype=torch.float32, extreme=False)
        la = la / 30
        args = [q.to(dtype), k.to(dtype), v.to(dtype), la, b, S0]
        got, want = outputs_and_grads(args, "triton"), outputs_and_grads(args, "torch")
        for name, a, w in zip(NAMES, got, want):
            error = ((a.double() - w.double()).norm() / w.double().norm()).item()
            assert error < tol, f"{dtype} {name}: relative error {error:.3g}"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_traced_and_compiled_on_gpu_matches_eager(monkeypatch):
    """MMREC_TRACE_DELTA_RULE on the GPU: the chunked form with the Triton pass traced and compiled by
    inductor (its element-wise work fused, its products on half operands with fp32 results) against the same
    form run eagerly, bf16 inputs at m = 256 under bf16 autocast: within bf16 precision on outputs, state and
    gradients."""
    from mm_rec.ops.delta_rule import reference

    q, k, v, la, b, S0 = inputs(2, 300, 4, 256, 256, dtype=torch.float32, extreme=False)
    args = [q.bfloat16(), k.bfloat16(), v.bfloat16(), la / 30, b, S0]
    monkeypatch.setattr(reference, "TRACE_UNDER_COMPILE", True)
    torch._dynamo.reset()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        want = outputs_and_grads(args, "auto")
        got = outputs_and_grads(args, "auto", torch.compile(gated_delta_rule))
    for name, a, w in zip(NAMES, got, want):
        error = ((a.double() - w.double()).norm() / w.double().norm()).item()
        assert error < 2e-2, f"{name}: relative error {error:.3g}"
