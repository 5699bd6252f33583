"""The CUDA C++ scan (mm_rec/cuda/scan_kernel.cu) against the float64 loop (I1), forward and every
gradient; on the CPU, the build wrapper's fallback.

The kernel clamps log_a itself and reads it through its strides, so the inputs here include
decays beyond both clamps (their gradient must be zero, as torch.clamp's) and decays broadcast
over channels (stride 0), which must give what the materialised tensor gives. The `gpu` tests
skip with the reason when the extension cannot be built on the machine.
"""

import logging

import pytest
import torch
from scan_helpers import check, outputs_and_grads, past_the_clamps, random_inputs

import mm_rec.cuda as mm_cuda
from mm_rec.core.associative_scan import associative_scan_exponential


def cuda_scan(log_a, b, h0):
    return associative_scan_exponential(log_a, b, h0, backend="cuda")


def sequential(log_a, b, h0):
    return associative_scan_exponential(log_a, b, h0, backend="sequential")


@pytest.fixture
def fresh_loader(monkeypatch):
    """The build wrapper as on a first call (nothing built, nothing refused yet)."""
    monkeypatch.setattr(mm_cuda, "_EXTENSION", None)
    monkeypatch.setattr(mm_cuda, "_FAILURE", None)


def test_fallback_without_kernels_matches_float64_loop(fresh_loader, monkeypatch, caplog):
    # No CUDA kernels here (CPU, or disabled): backend "cuda" says why once and runs the torch backend.
    monkeypatch.setenv("MMREC_DISABLE_CUDA_KERNELS", "1")
    inputs = random_inputs((2, 37, 5), device="cpu")
    with caplog.at_level(logging.WARNING, logger="mm_rec.cuda"):
        got = outputs_and_grads(cuda_scan, inputs, [torch.float32] * 3)
        outputs_and_grads(cuda_scan, inputs, [torch.float32] * 3)
    notices = [r.getMessage() for r in caplog.records if r.name == "mm_rec.cuda"]
    assert len(notices) == 1 and "MMREC_DISABLE_CUDA_KERNELS=1" in notices[0]
    ref = outputs_and_grads(sequential, inputs, [torch.float64] * 3)
    check(got, ref, 1e-5)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the reason given on a machine without a GPU")
def test_unavailable_reason_on_cpu(fresh_loader):
    assert mm_cuda.unavailable_reason() in ("this PyTorch is not a CUDA build", "no CUDA GPU visible")
    assert mm_cuda.load_extension() is None


# --- on a GPU: the compiled kernel ---------------------------------------------------------------


def needs_kernels():
    if not torch.cuda.is_available() or mm_cuda.load_extension() is None:
        pytest.skip(f"CUDA kernels unavailable: {mm_cuda.unavailable_reason() or 'build failed'}")


def gpu_inputs(shape, with_h0=True, scale=2.0, clamps=True):
    """random_inputs on the GPU, with decays beyond both clamps as well (-80 and +0.3)."""
    log_a, b, h0 = random_inputs(shape, with_h0, clamps=clamps, scale=scale, device="cuda")
    return (past_the_clamps(log_a) if clamps else log_a), b, h0


# T: 1, under one block (64 steps), off block edges, many blocks (look-back across chunks);
# D: 1, odd, not a multiple of 4 (element-wise path), a tile and a bit, multiples of 4.
@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(2, 1, 33), (2, 67, 1), (3, 67, 33), (1, 300, 130), (2, 1000, 256),
                                   (1, 5003, 8), (2, 9, 3, 5)])
@pytest.mark.parametrize("with_h0", [True, False])
def test_gpu_fp32_matches_float64_loop(shape, with_h0):
    needs_kernels()
    inputs = gpu_inputs(shape, with_h0)
    got = outputs_and_grads(cuda_scan, inputs, [torch.float32] * 3)
    ref = outputs_and_grads(sequential, inputs, [torch.float64] * 3)
    assert got[0].dtype == torch.float32 and got[1].dtype == torch.float32
    check(got, ref, 1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(1, 20000, 64), (3, 4099, 132)])
def test_gpu_long_memory_across_many_blocks(shape):
    # Decays near 1: each state depends on hundreds of blocks before it through the look-back.
    # Each state is then an fp32 sum of ~1/(1 - a) ~ 10^3 terms (rounding ~ sqrt(10^3) * 6e-8 per
    # sum, and it compounds along the look-back): at T = 20000 the H100 gave 1.0e-5 (2026-12-07).
    needs_kernels()
    inputs = gpu_inputs(shape, scale=0.002, clamps=False)
    got = outputs_and_grads(cuda_scan, inputs, [torch.float32] * 3)
    ref = outputs_and_grads(sequential, inputs, [torch.float64] * 3)
    check(got, ref, 3e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("log_a_dtype,b_dtype", [(torch.float32, torch.bfloat16), (torch.bfloat16, torch.bfloat16),
                                                 (torch.float32, torch.float16), (torch.float16, torch.float16),
                                                 (torch.bfloat16, torch.float16)])
@pytest.mark.parametrize("D", [33, 256])
def test_gpu_half_inputs_match_float64_loop(log_a_dtype, b_dtype, D):
    needs_kernels()
    inputs = gpu_inputs((2, 201, D))
    dtypes = [log_a_dtype, b_dtype, torch.float32]
    got = outputs_and_grads(cuda_scan, inputs, dtypes)
    rounded = [t.to(dt) for t, dt in zip(inputs, dtypes)]  # the oracle sees the same rounded inputs
    ref = outputs_and_grads(sequential, rounded, [torch.float64] * 3)
    assert got[0].dtype == b_dtype and got[1].dtype == torch.float32
    assert got[2].dtype == log_a_dtype and got[3].dtype == b_dtype
    check(got, ref, 1e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("M", [1, 4, 7])
def test_gpu_broadcast_decay_read_in_place(M):
    # log_a [B, T, K, 1] expanded over M (stride 0), as the memory's level-2 aggregate passes it:
    # the same outputs and gradients as the materialised tensor, the gradient summed over M.
    needs_kernels()
    B, T, K = 2, 150, 6
    base = -torch.rand(B, T, K, 1, device="cuda") * 3
    base[:, ::5] = -70.0
    b, h0 = torch.randn(B, T, K, M, device="cuda"), torch.randn(B, K, M, device="cuda")
    got = outputs_and_grads(lambda la, x, s: cuda_scan(la.expand(B, T, K, M), x, s), (base, b, h0),
                            [torch.float32] * 3)
    ref = outputs_and_grads(lambda la, x, s: sequential(la.expand(B, T, K, M).contiguous(), x, s),
                            (base, b, h0), [torch.float64] * 3)
    check(got, ref, 1e-5)


@pytest.mark.gpu
def test_gpu_gradient_from_final_state_alone():
    needs_kernels()
    inputs = gpu_inputs((2, 137, 12))
    got = outputs_and_grads(cuda_scan, inputs, [torch.float32] * 3, use_h=False)
    ref = outputs_and_grads(sequential, inputs, [torch.float64] * 3, use_h=False)
    check(got, ref, 1e-5)


@pytest.mark.gpu
def test_gpu_operator_registration_and_compile():
    # Schema, fake implementations and autograd formula (what torch.compile uses), then a compiled
    # function around the operator equal to eager.
    needs_kernels()
    from mm_rec.ops.scan import cuda_ops  # noqa: F401  (registers the operators)

    log_a, b, h0 = (t.requires_grad_() for t in gpu_inputs((2, 70, 12)))
    torch.library.opcheck(torch.ops.mm_rec.cuda_scan_fwd.default, (log_a, b, h0, -50.0, 0.0))
    torch.library.opcheck(torch.ops.mm_rec.cuda_scan_fwd.default, (log_a, b, None, -50.0, 0.0))

    def f(la, x, s):
        h, final = cuda_scan(torch.nn.functional.logsigmoid(la), x, s)
        return h.square().sum() + final.sum()

    compiled = torch.compile(f, fullgraph=True)
    inputs = [t.detach().clone().requires_grad_() for t in (log_a, b, h0)]
    loss = compiled(*inputs)
    loss.backward()
    eager_inputs = [t.detach().clone().requires_grad_() for t in (log_a, b, h0)]
    f(*eager_inputs).backward()
    assert torch.allclose(loss, f(*(t.detach() for t in eager_inputs)), rtol=1e-5)
    for got, want in zip(inputs, eager_inputs):
        torch.testing.assert_close(got.grad, want.grad, rtol=1e-5, atol=1e-6)


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(8, 2048, 4096), (1, 32768, 4096)])
@pytest.mark.parametrize("b_dtype", [torch.float32, torch.bfloat16])
def test_gpu_full_size(shape, b_dtype):
    # The benchmark shapes against the torch backend in float64 (itself tested against the loop).
    needs_kernels()
    inputs = gpu_inputs(shape)
    got = outputs_and_grads(cuda_scan, inputs, [torch.float32, b_dtype, torch.float32])
    rounded = [inputs[0], inputs[1].to(b_dtype), inputs[2]]
    ref = outputs_and_grads(lambda *x: associative_scan_exponential(*x, backend="torch"), rounded,
                            [torch.float64] * 3)
    check(got, ref, 1e-5 if b_dtype == torch.float32 else 1e-2)
