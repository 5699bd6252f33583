"""The fused Triton core recurrence against the float64 loop (I2), forward and every gradient.

Without a GPU the kernels run in Triton's interpreter on CPU tensors (tests/conftest.py sets
TRITON_INTERPRET=1), at small shapes; the `gpu` tests run the compiled kernels at full size.
"""

import pytest
import torch
from recurrence_helpers import GRAD_NAMES, rel_err
from recurrence_helpers import outputs_and_grads as fn_outputs_and_grads
from recurrence_helpers import random_inputs as cpu_random_inputs

from mm_rec.core.recurrence import mmrec_recurrence
from mm_rec.ops.recurrence.triton_kernels import recurrence_triton

# The interpreter trips a NumPy deprecation warning on every scalar index.
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

# Small-shape tests run the compiled kernels where there is a GPU, the interpreter elsewhere.
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def random_inputs(B, T, H, d, extreme=False, device=DEVICE):
    return cpu_random_inputs(B, T, H, d, extreme, device)


def outputs_and_grads(inputs, backend, dtypes):
    """[h, h_last, dz, dlog_gamma, dW_g, db_g, dh0] of `mmrec_recurrence(backend=backend)`, inputs cast to `dtypes`."""
    return fn_outputs_and_grads(lambda *x: mmrec_recurrence(*x, backend=backend), inputs, dtypes)


# d = 64 and 128 split W_g's rows over 2 and 4 warps; d = 5 pads to 16.
SMALL_SHAPES = [
    (3, 37, 2, 16), (1, 1, 2, 32), (3, 37, 1, 32), (2, 11, 3, 16), (2, 9, 1, 5), (3, 6, 1, 64), (1, 4, 2, 128),
]


@pytest.mark.parametrize("B,T,H,d", SMALL_SHAPES)
@pytest.mark.parametrize("extreme", [False, True])
def test_matches_float64_loop(B, T, H, d, extreme):
    inputs = random_inputs(B, T, H, d, extreme)
    got = outputs_and_grads(inputs, "triton", [torch.float32] * 5)
    ref = outputs_and_grads(inputs, "sequential", [torch.float64] * 5)
    for name, x, r in zip(GRAD_NAMES, got, ref):
        assert x.dtype == torch.float32, name
        assert torch.isfinite(x).all(), name
        assert rel_err(x, r) < 1e-4, name


def test_bf16_input_keeps_fp32_state_and_input_dtypes():
    inputs = random_inputs(3, 21, 2, 16)
    dtypes = [torch.bfloat16, torch.float32, torch.float32, torch.float32, torch.float32]
    got = outputs_and_grads(inputs, "triton", dtypes)
    # The oracle sees the same bf16-rounded z.
    ref = outputs_and_grads([inputs[0].bfloat16()] + list(inputs[1:]), "sequential", [torch.float64] * 5)
    assert got[0].dtype == torch.bfloat16 and got[1].dtype == torch.float32
    assert got[2].dtype == torch.bfloat16 and got[3].dtype == torch.float32
    for name, x, r in zip(GRAD_NAMES, got, ref):
        assert rel_err(x, r) < 1e-2, name


def test_gradcheck_float64():
    inputs = [t.double().requires_grad_() for t in random_inputs(2, 3, 1, 2)]
    assert torch.autograd.gradcheck(lambda *x: mmrec_recurrence(*x, backend="triton"), inputs)


def test_only_h_last_used():
    # Gradient flows from h_last alone (h unused: its incoming gradient is None).
    inputs = random_inputs(2, 6, 1, 16)
    grads = {}
    for backend, dtype in [("triton", torch.float32), ("sequential", torch.float64)]:
        leaves = [t.detach().to(dtype).clone().requires_grad_() for t in inputs]
        mmrec_recurrence(*leaves, backend=backend)[1].sum().backward()
        grads[backend] = [leaf.grad for leaf in leaves]
    for name, x, r in zip(GRAD_NAMES[2:], grads["triton"], grads["sequential"]):
        assert rel_err(x, r) < 1e-4, name


def test_operator_registration():
    # Schema, fake (meta) implementations and autograd registration, as torch.compile uses them.
    z, log_gamma, W_g, b_g, h0 = (t.requires_grad_() for t in random_inputs(2, 5, 2, 16))
    torch.library.opcheck(torch.ops.mm_rec.recurrence_fwd.default, (z, log_gamma, W_g, b_g, h0))


def test_traces_under_torch_compile():
    inputs = random_inputs(2, 5, 2, 16)
    compiled = torch.compile(recurrence_triton, backend="aot_eager", fullgraph=True)
    h, h_last = compiled(*inputs)
    h_ref, last_ref = recurrence_triton(*inputs)
    assert torch.equal(h, h_ref) and torch.equal(h_last, last_ref)


# --- full size on a GPU: the compiled kernels against the torch backend in float64 ------------


@pytest.mark.gpu
@pytest.mark.parametrize("extreme", [False, True])
def test_gpu_full_size_fp32(extreme):
    inputs = random_inputs(8, 2048, 32, 128, extreme, device="cuda")
    got = outputs_and_grads(inputs, "triton", [torch.float32] * 5)
    ref = outputs_and_grads(inputs, "torch", [torch.float64] * 5)
    for name, x, r in zip(GRAD_NAMES, got, ref):
        assert rel_err(x, r) < 1e-4, name


@pytest.mark.gpu
def test_gpu_full_size_bf16():
    inputs = random_inputs(8, 2048, 32, 128, device="cuda")
    dtypes = [torch.bfloat16, torch.float32, torch.float32, torch.float32, torch.float32]
    got = outputs_and_grads(inputs, "triton", dtypes)
    ref = outputs_and_grads([inputs[0].bfloat16()] + list(inputs[1:]), "torch", [torch.float64] * 5)
    for name, x, r in zip(GRAD_NAMES, got, ref):
        assert rel_err(x, r) < 1e-2, name


@pytest.mark.gpu
def test_gpu_long_sequence_bf16():
    inputs = random_inputs(1, 8192, 4, 128, extreme=True, device="cuda")
    dtypes = [torch.bfloat16, torch.bfloat16, torch.float32, torch.float32, torch.float32]
    got = outputs_and_grads(inputs, "triton", dtypes)
    rounded = [inputs[0].bfloat16(), inputs[1].bfloat16()] + list(inputs[2:])
    ref = outputs_and_grads(rounded, "torch", [torch.float64] * 5)
    for name, x, r in zip(GRAD_NAMES, got, ref):
        assert rel_err(x, r) < 1e-2, name
