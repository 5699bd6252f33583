"""The Triton associative scan against the float64 loop (I1), forward and every gradient.

Without a GPU the kernels run in Triton's interpreter on CPU tensors (tests/conftest.py sets
TRITON_INTERPRET=1), at small awkward shapes; the `gpu` tests run the compiled kernels at full
size against the torch backend in float64 (itself tested against the loop).
"""

import pytest
import torch
from scan_helpers import DEVICE, check, outputs_and_grads, past_the_clamps, random_inputs

from mm_rec.core.associative_scan import associative_scan_exponential
from mm_rec.ops.scan import triton_kernels as st

# The interpreter trips a NumPy deprecation warning on every scalar index.
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

def triton_scan(log_a, b, h0):
    return associative_scan_exponential(log_a, b, h0, backend="triton")


def sequential(log_a, b, h0):
    return associative_scan_exponential(log_a, b, h0, backend="sequential")


@pytest.mark.parametrize("shape", [(2, 1, 33), (2, 67, 1), (3, 67, 33), (1, 300, 16), (2, 9, 3, 5)])
@pytest.mark.parametrize("with_h0", [True, False])
def test_fp32_matches_float64_loop(shape, with_h0):
    inputs = random_inputs(shape, with_h0)
    got = outputs_and_grads(triton_scan, inputs, [torch.float32] * 3)
    ref = outputs_and_grads(sequential, inputs, [torch.float64] * 3)
    assert got[0].dtype == torch.float32 and got[1].dtype == torch.float32
    check(got, ref, 1e-5)


@pytest.mark.parametrize("log_a_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("b_dtype", [torch.bfloat16, torch.float16])
def test_half_inputs_match_float64_loop(log_a_dtype, b_dtype):
    inputs = random_inputs((2, 67, 33))
    dtypes = [log_a_dtype, b_dtype, torch.float32]
    got = outputs_and_grads(lambda *x: st.scan_triton(*x), inputs, dtypes)
    # The oracle sees the same rounded inputs.
    rounded = [t.to(dt) for t, dt in zip(inputs, dtypes)]
    ref = outputs_and_grads(sequential, rounded, [torch.float64] * 3)
    assert got[0].dtype == b_dtype and got[1].dtype == torch.float32
    assert got[2].dtype == log_a_dtype and got[3].dtype == b_dtype and got[4].dtype == torch.float32
    check(got, ref, 1e-2)


@pytest.mark.parametrize("T,n_chunks,clamps", [(67, 3, True), (300, 4, False), (5, 5, True)])
def test_chunked_passes_match_float64_loop(T, n_chunks, clamps):
    # The chunked path (aggregates, carry scan, rerun) that long B = 1 sequences take on a GPU,
    # with decays past both clamps, which the kernels clamp.
    log_a, b, h0 = random_inputs((2, T, 16), clamps=clamps, scale=2.0 if clamps else 0.02)
    if clamps:
        past_the_clamps(log_a)
    bounds = {"clamp_min": -50.0, "clamp_max": 0.0}
    h, final = st.launch_fwd(log_a, b, h0, n_chunks=n_chunks, **bounds)
    dh, d_final = torch.randn_like(b), torch.randn_like(h0)
    grads = st.launch_bwd(dh, d_final, log_a, h, h0, n_chunks=n_chunks, **bounds)
    leaves = [t.double().requires_grad_() for t in (log_a, b, h0)]
    h_ref, final_ref = sequential(*leaves)
    torch.autograd.backward([h_ref, final_ref], [dh.double(), d_final.double()])
    check([h, final, *grads], [h_ref, final_ref] + [leaf.grad for leaf in leaves], 1e-5)


@pytest.mark.parametrize("shape", [(2, 67, 33), (1, 5, 3, 4)])
@pytest.mark.parametrize("bounds", [(-50.0, 0.0), (-3.0, 0.0), (-50.0, -0.05)])
def test_clamped_inside_the_kernels(shape, bounds):
    # Decays past the bounds, clamped by the kernels (bounds that enclose 0) or by the dispatcher
    # before them (bounds that do not): outputs and gradients (zero where clamped) as the loop's.
    log_a, b, h0 = random_inputs(shape)
    past_the_clamps(log_a)
    lo, hi = bounds

    def scan(backend):
        return lambda *x: associative_scan_exponential(*x, backend=backend, log_clamp_min=lo, log_clamp_max=hi)

    got = outputs_and_grads(scan("triton"), (log_a, b, h0), [torch.float32] * 3)
    ref = outputs_and_grads(scan("sequential"), (log_a, b, h0), [torch.float64] * 3)
    check(got, ref, 1e-5)
    clamped = (log_a < lo) | (log_a > hi)
    assert clamped.any() and (got[2][clamped] == 0).all()


@pytest.mark.parametrize("M", [1, 4, 7])
@pytest.mark.parametrize("log_a_dtype", [torch.float32, torch.bfloat16])
def test_broadcast_decay_read_in_place(M, log_a_dtype):
    # log_a [B, T, K, 1] expanded over M (stride 0), as the memory's level-2 aggregate passes it:
    # the same outputs and gradients as the materialised tensor, the gradient summed over M.
    B, T, K = 2, 45, 3
    base = -torch.rand(B, T, K, 1, device=DEVICE) * 3
    base[:, ::5] = -70.0
    b, h0 = torch.randn(B, T, K, M, device=DEVICE), torch.randn(B, K, M, device=DEVICE)
    dtypes = [log_a_dtype, torch.float32, torch.float32]
    got = outputs_and_grads(lambda la, x, s: triton_scan(la.expand(B, T, K, M), x, s), (base, b, h0), dtypes)
    rounded = [base.to(log_a_dtype), b, h0]
    ref = outputs_and_grads(lambda la, x, s: sequential(la.expand(B, T, K, M).contiguous(), x, s), rounded,
                            [torch.float64] * 3)
    check(got, ref, 1e-5 if log_a_dtype == torch.float32 else 1e-2)


def test_chunking_plan():
    device = torch.device("cpu")  # planned for an H100's 132 multiprocessors
    assert st.num_chunks(8, 2048, 4096, device) == 1
    assert st.num_chunks(1, 32768, 4096, device) == 16
    assert st.num_chunks(4, 8192, 2048, device) == 8
    assert st.num_chunks(1, 100, 4096, device) == 1  # too short to cut
    assert st.num_chunks(1, 2**20, 1, device) == st._MAX_CHUNKS


def test_gradient_from_final_state_alone():
    inputs = random_inputs((2, 37, 8))
    got = outputs_and_grads(triton_scan, inputs, [torch.float32] * 3, use_h=False)
    ref = outputs_and_grads(sequential, inputs, [torch.float64] * 3, use_h=False)
    check(got, ref, 1e-5)


def test_operator_matches_float64_loop():
    # The registered operators (what torch.compile calls) through their own autograd formula.
    inputs = random_inputs((2, 37, 5))
    got = outputs_and_grads(lambda *x: torch.ops.mm_rec.scan_fwd(*x, -50.0, 0.0), inputs, [torch.float32] * 3)
    ref = outputs_and_grads(sequential, inputs, [torch.float64] * 3)
    check(got, ref, 1e-5)


def test_gradcheck_float64():
    inputs = [t.double().requires_grad_() for t in random_inputs((1, 4, 2), clamps=False)]
    assert torch.autograd.gradcheck(lambda *x: st.scan_triton(*x), inputs)


def test_operator_registration():
    # Schema, fake (meta) implementations and autograd registration, as torch.compile uses them.
    log_a, b, h0 = (t.requires_grad_() for t in random_inputs((2, 5, 3)))
    torch.library.opcheck(torch.ops.mm_rec.scan_fwd.default, (log_a, b, h0, -50.0, 0.0))
    torch.library.opcheck(torch.ops.mm_rec.scan_fwd.default, (log_a, b, None, -50.0, 0.0))


class _Decayed(torch.nn.Module):
    """A toy layer around the scan, as the model uses it: decays from a projection in fp32."""

    def __init__(self, d: int):
        super().__init__()
        self.proj = torch.nn.Linear(d, 2 * d)

    def forward(self, x, h0):
        a, u = self.proj(x).chunk(2, dim=-1)
        h, final = st.scan_triton(torch.nn.functional.logsigmoid(a.float()), u, h0, -50.0, 0.0)
        return h.sum() + final.sum()


def test_traces_under_torch_compile():
    torch.manual_seed(0)
    module = _Decayed(8).to(DEVICE)
    x, h0 = torch.randn(2, 11, 8, device=DEVICE), torch.randn(2, 8, device=DEVICE)
    backend = "inductor" if DEVICE == "cuda" else "aot_eager"  # no C++ build needed on CPU
    compiled = torch.compile(module, backend=backend, fullgraph=True)
    loss = compiled(x, h0)
    loss.backward()
    grads = [p.grad.clone() for p in module.parameters()]
    module.zero_grad()
    loss_ref = module(x, h0)
    loss_ref.backward()
    assert torch.allclose(loss, loss_ref, rtol=1e-5)
    for g, p in zip(grads, module.parameters()):
        assert torch.allclose(g, p.grad, rtol=1e-4, atol=1e-5)


# --- full size on a GPU: the compiled kernels against the torch backend in float64 ------------


def torch_float64(log_a, b, h0):
    return associative_scan_exponential(log_a, b, h0, backend="torch")


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(8, 2048, 4096), (1, 32768, 4096)])
@pytest.mark.parametrize("b_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("memory", ["short", "long"])
def test_gpu_full_size(shape, b_dtype, memory):
    # "long": decays near 1, so states carry across the chunks that B = 1 takes.
    inputs = random_inputs(shape, clamps=memory == "short", scale=2.0 if memory == "short" else 0.01, device="cuda")
    # log_a in fp32 as the model hands it over; h0 fp32.
    got = outputs_and_grads(triton_scan, inputs, [torch.float32, b_dtype, torch.float32])
    rounded = [inputs[0], inputs[1].to(b_dtype), inputs[2]]
    ref = outputs_and_grads(torch_float64, rounded, [torch.float64] * 3)
    check(got, ref, 1e-5 if b_dtype == torch.float32 else 1e-2)


@pytest.mark.gpu
def test_gpu_no_recompilation_when_T_changes():
    def compiled() -> int:
        return sum(len(cache[0]) for kernel in (st._scan_fwd_kernel, st._scan_bwd_kernel)
                   for cache in kernel.device_caches.values())

    for T in (1000, 1001, 777, 600):  # one chunk each, various divisibilities
        outputs_and_grads(triton_scan, random_inputs((4, T, 1024), device="cuda"), [torch.float32] * 3)
        if T == 1000:
            before = compiled()
    assert compiled() == before
