"""The CUDA C++ core recurrence (mm_rec/cuda/recurrence_kernel.cu) against the float64 loop (I2),
forward and every gradient, at each cluster size; on the CPU, the Python side around it.

CPU tests: backend "cuda" on CPU tensors falls back to the torch backend; the operators, their
autograd formula, fake implementations and torch.compile run against `EmulatedKernels`, a torch
stand-in for the extension's two functions with the binding's contract (the kernel's math, its
shifted dp and per-(b, head) sums), so everything but the CUDA code itself is exercised here.
The `gpu` tests skip with the reason when the extension cannot be built on the machine.
"""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from recurrence_helpers import GRAD_NAMES, outputs_and_grads, random_inputs, rel_err

import mm_rec.cuda as mm_cuda
from mm_rec.core.recurrence import mmrec_recurrence
from mm_rec.ops.recurrence import cuda_ops
from mm_rec.ops.recurrence.cuda_ops import recurrence_cuda

FP32 = [torch.float32] * 5
FP64 = [torch.float64] * 5


def sequential(*inputs):
    return mmrec_recurrence(*inputs, backend="sequential")


def check(got, ref, tol, dtypes=None):
    for name, x, r in zip(GRAD_NAMES, got, ref):
        assert x is not None and torch.isfinite(x).all(), name
        assert rel_err(x, r) < tol, (name, rel_err(x, r))
    if dtypes is not None:  # h in z's dtype, h_last fp32, each gradient in its input's dtype
        assert got[0].dtype == dtypes[0] and got[1].dtype == torch.float32
        for x, dt in zip(got[2:], dtypes):
            assert x.dtype == dt


# --- on the CPU: fallback, and the Python side against an emulation of the kernels ---------------


def test_cuda_backend_on_cpu_tensors_falls_back_to_the_float64_loop_result():
    inputs = random_inputs(2, 23, 3, 32)
    got = outputs_and_grads(lambda *x: mmrec_recurrence(*x, backend="cuda"), inputs, FP32)
    ref = outputs_and_grads(sequential, inputs, FP64)
    check(got, ref, 1e-5, FP32)


def test_covers():
    z, lg, W, b, h0 = random_inputs(1, 3, 2, 32)
    assert not cuda_ops.covers(z, lg, W, b, h0)  # CPU tensors
    meta = [t.to("meta") for t in (z, lg, W, b, h0)]
    assert not cuda_ops.covers(*meta)
    if torch.cuda.is_available():
        cuda = [t.cuda() for t in (z, lg, W, b, h0)]
        assert cuda_ops.covers(*cuda)
        assert not cuda_ops.covers(cuda[0].double(), *cuda[1:])  # float64: Triton's float64 path
        assert not cuda_ops.covers(*cuda[:2], cuda[2].double(), *cuda[3:])
        z48, lg48, W48, b48, h48 = (t.cuda() for t in random_inputs(1, 3, 2, 48))
        assert not cuda_ops.covers(z48, lg48, W48, b48, h48)


class EmulatedKernels:
    """The extension's `recurrence_fwd` / `recurrence_bwd` in torch, with the binding's checks and
    output contract (see mm_rec/cuda/binding.cpp and recurrence_kernel.h)."""

    def __init__(self):
        self.cluster_sizes = []

    @staticmethod
    def _check(name, t, shape, fp32_only):
        assert t.is_contiguous() and tuple(t.shape) == tuple(shape), (name, t.shape, shape)
        assert t.dtype == torch.float32 if fp32_only else t.dtype in (torch.float32, torch.bfloat16,
                                                                      torch.float16), (name, t.dtype)

    def recurrence_fwd(self, z, log_gamma, W_g, b_g, h0, cluster_size):
        B, T, H, d = z.shape
        for name, t, shape, fp32 in [("z", z, z.shape, False), ("log_gamma", log_gamma, z.shape, False),
                                     ("W_g", W_g, (H, d, d), True), ("b_g", b_g, (H, d), True),
                                     ("h0", h0, (B, H, d), True)]:
            self._check(name, t, shape, fp32)
        assert cluster_size in (0, 1, 2, 4)
        self.cluster_sizes.append(cluster_size)
        zf, gamma = z.float(), log_gamma.float().exp()
        gate = torch.empty(B, T, H, d)
        states = torch.empty(B, T, H, d)
        h = h0
        for t in range(T):
            s = torch.sigmoid(torch.einsum("bhd,hde->bhe", h, W_g) + b_g)
            h = zf[:, t] * s + gamma[:, t] * h
            gate[:, t], states[:, t] = s, h
        kept = states if z.dtype != torch.float32 else torch.empty(0)
        return [states.to(z.dtype), h.clone(), gate, kept]

    def recurrence_bwd(self, dh, dh_last, z, log_gamma, W_g, h0, gate, states, cluster_size):
        B, T, H, d = z.shape
        for name, t, shape, fp32 in [("dh", dh, z.shape, False), ("dh_last", dh_last, (B, H, d), True),
                                     ("z", z, z.shape, False), ("log_gamma", log_gamma, z.shape, False),
                                     ("W_g", W_g, (H, d, d), True), ("h0", h0, (B, H, d), True),
                                     ("gate", gate, z.shape, True), ("states", states, z.shape, True)]:
            self._check(name, t, shape, fp32)
        zf, gamma, dhf = z.float(), log_gamma.float().exp(), dh.float()
        dz, dlg = torch.empty(B, T, H, d), torch.empty(B, T, H, d)
        dp = torch.empty(B, T, H, d)
        dp[:, T - 1] = 0.0
        dp0, db = torch.empty(B, H, d), torch.zeros(B, H, d)
        gg, q = dh_last, torch.zeros(B, H, d)  # gamma_{t+1} g_{t+1}, dp_{t+1} W^T
        for t in range(T - 1, -1, -1):
            s = gate[:, t]
            h_prev = states[:, t - 1] if t > 0 else h0
            g = dhf[:, t] + (gg + q)
            dp_t = g * (zf[:, t] * s * (1 - s))
            dz[:, t], dlg[:, t] = g * s, g * gamma[:, t] * h_prev
            if t > 0:
                dp[:, t - 1] = dp_t
            else:
                dp0 = dp_t
            db += dp_t
            gg = gamma[:, t] * g
            q = torch.einsum("bhe,hde->bhd", dp_t, W_g)
        return [dz.to(z.dtype), dlg.to(log_gamma.dtype), dp, dp0, db, gg + q]


@pytest.fixture
def emulated(monkeypatch):
    kernels = EmulatedKernels()
    monkeypatch.setattr(cuda_ops, "_ext", lambda: kernels)
    return kernels


@pytest.mark.parametrize("B,T,H,d", [(2, 1, 3, 8), (3, 17, 2, 8), (1, 40, 1, 16)])
@pytest.mark.parametrize("extreme", [False, True])
def test_operators_around_emulated_kernels_match_float64_loop(emulated, B, T, H, d, extreme):
    inputs = random_inputs(B, T, H, d, extreme)
    ref = outputs_and_grads(sequential, inputs, FP64)
    for cs in (0, 2):
        got = outputs_and_grads(lambda *x, cs=cs: recurrence_cuda(*x, cluster_size=cs), inputs, FP32)
        check(got, ref, 1e-5, FP32)
    assert emulated.cluster_sizes == [0, 2]


@pytest.mark.parametrize("z_dtype,lg_dtype", [(torch.bfloat16, torch.float32), (torch.float16, torch.float16),
                                              (torch.float32, torch.bfloat16)])
def test_half_inputs_around_emulated_kernels(emulated, z_dtype, lg_dtype):
    inputs = random_inputs(2, 21, 2, 8)
    dtypes = [z_dtype, lg_dtype] + FP32[2:]
    got = outputs_and_grads(recurrence_cuda, inputs, dtypes)
    rounded = [t.to(dt) for t, dt in zip(inputs, dtypes)]  # the oracle sees the same rounded inputs
    ref = outputs_and_grads(sequential, rounded, FP64)
    check(got, ref, 1e-2, dtypes)


def test_only_h_last_used_around_emulated_kernels(emulated):
    inputs = random_inputs(2, 9, 2, 8)
    got = outputs_and_grads(recurrence_cuda, inputs, FP32, use_h=False)
    ref = outputs_and_grads(sequential, inputs, FP64, use_h=False)
    check(got[1:], ref[1:], 1e-5)


def test_weights_in_other_dtypes_get_gradients_in_theirs(emulated):
    # W_g, b_g, h0 are cast to fp32 for the kernels; autograd casts their gradients back.
    inputs = random_inputs(2, 7, 2, 8)
    dtypes = [torch.bfloat16, torch.float32, torch.bfloat16, torch.bfloat16, torch.float16]
    got = outputs_and_grads(recurrence_cuda, inputs, dtypes)
    assert [g.dtype for g in got[2:]] == dtypes


def test_operator_registration_with_emulated_kernels(emulated):
    z, lg, W, b, h0 = (t.requires_grad_() for t in random_inputs(2, 5, 2, 8))
    torch.library.opcheck(torch.ops.mm_rec.cuda_recurrence_fwd.default, (z, lg, W, b, h0, 0))
    zb = z.detach().bfloat16().requires_grad_()
    torch.library.opcheck(torch.ops.mm_rec.cuda_recurrence_fwd.default, (zb, lg, W, b, h0, 2))


def test_fake_implementations_on_meta_tensors():
    B, T, H, d = 2, 5, 3, 32
    z = torch.empty(B, T, H, d, device="meta", dtype=torch.bfloat16)
    lg = torch.empty(B, T, H, d, device="meta")
    W, b, h0 = (torch.empty(s, device="meta") for s in [(H, d, d), (H, d), (B, H, d)])
    h, h_last, gate, states = torch.ops.mm_rec.cuda_recurrence_fwd(z, lg, W, b, h0, 0)
    assert h.shape == z.shape and h.dtype == torch.bfloat16
    assert h_last.shape == (B, H, d) and gate.shape == z.shape and states.shape == z.shape
    assert torch.ops.mm_rec.cuda_recurrence_fwd(z.float(), lg, W, b, h0, 0)[3].shape == (0,)
    dz, dlg, dW, db, dh0 = torch.ops.mm_rec.cuda_recurrence_bwd(h, h_last, z, lg, W, h0, gate, states, 0)
    assert dz.dtype == torch.bfloat16 and dlg.dtype == torch.float32
    assert dW.shape == (H, d, d) and db.shape == (H, d) and dh0.shape == (B, H, d)


def test_compiled_around_emulated_kernels_equals_eager(emulated):
    def f(z, lg, W, b, h0):
        h, h_last = recurrence_cuda(z, torch.nn.functional.logsigmoid(lg), W, b, h0)
        return h.square().sum() + h_last.sum()

    inputs = random_inputs(2, 6, 2, 8)
    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    leaves = [t.clone().requires_grad_() for t in inputs]
    loss = compiled(*leaves)
    loss.backward()
    eager = [t.clone().requires_grad_() for t in inputs]
    f(*eager).backward()
    torch.testing.assert_close(loss, f(*(t.detach() for t in eager)))
    for got, want in zip(leaves, eager):
        torch.testing.assert_close(got.grad, want.grad)


def test_invalid_cluster_size():
    with pytest.raises(ValueError, match="cluster_size"):
        recurrence_cuda(*random_inputs(1, 2, 1, 32), cluster_size=3)


# --- on a GPU: the compiled kernels ---------------------------------------------------------------


def needs_kernels():
    if not torch.cuda.is_available() or mm_cuda.load_extension() is None:
        pytest.skip(f"CUDA kernels unavailable: {mm_cuda.unavailable_reason() or 'build failed'}")


def cuda_fn(cs):
    return lambda *x: recurrence_cuda(*x, cluster_size=cs)


def built(cs, d):
    """Whether (cluster size, head dim) is built; the binding refuses the others
    (test_gpu_binding_rejects_bad_arguments)."""
    return cs == 1 or d // cs >= 32


CLUSTERS = [1, 2, 4]


# T: one step, odd lengths off the unrolled bodies (8 forward, 4 backward), long; d: every head dim
# built; B*H small (clusters on separate multiprocessors).
@pytest.mark.gpu
@pytest.mark.parametrize("cs", CLUSTERS)
@pytest.mark.parametrize("d", [32, 64, 128])
@pytest.mark.parametrize("B,T,H", [(2, 1, 3), (2, 67, 3), (1, 300, 2), (1, 1000, 2)])
def test_gpu_fp32_matches_float64_loop(cs, d, B, T, H):
    if not built(cs, d):
        pytest.skip("not built: d / cluster_size < 32")
    needs_kernels()
    inputs = random_inputs(B, T, H, d, device="cuda")
    got = outputs_and_grads(cuda_fn(cs), inputs, FP32)
    ref = outputs_and_grads(sequential, inputs, FP64)
    check(got, ref, 1e-4, FP32)


@pytest.mark.gpu
@pytest.mark.parametrize("cs", CLUSTERS)
@pytest.mark.parametrize("d", [32, 64, 128])
def test_gpu_extreme_decays(cs, d):
    if not built(cs, d):
        pytest.skip("not built: d / cluster_size < 32")
    needs_kernels()
    inputs = random_inputs(3, 67, 2, d, extreme=True, device="cuda")
    got = outputs_and_grads(cuda_fn(cs), inputs, FP32)
    ref = outputs_and_grads(sequential, inputs, FP64)
    check(got, ref, 1e-4)


@pytest.mark.gpu
@pytest.mark.parametrize("cs", CLUSTERS)
@pytest.mark.parametrize("B,T,H,d", [(8, 41, 32, 128), (5, 33, 40, 64), (16, 9, 20, 32)])
def test_gpu_many_heads(cs, B, T, H, d):
    # More clusters than multiprocessors: several waves, every (b, head) placed right.
    if not built(cs, d):
        pytest.skip("not built: d / cluster_size < 32")
    needs_kernels()
    inputs = random_inputs(B, T, H, d, device="cuda")
    got = outputs_and_grads(cuda_fn(cs), inputs, FP32)
    ref = outputs_and_grads(sequential, inputs, FP64)
    check(got, ref, 1e-4)


@pytest.mark.gpu
@pytest.mark.parametrize("cs", CLUSTERS)
@pytest.mark.parametrize("z_dtype,lg_dtype", [(torch.bfloat16, torch.float32), (torch.bfloat16, torch.bfloat16),
                                              (torch.float16, torch.float16), (torch.float32, torch.bfloat16)])
def test_gpu_half_inputs_match_float64_loop(cs, z_dtype, lg_dtype):
    needs_kernels()
    inputs = random_inputs(2, 201, 3, 128, extreme=True, device="cuda")
    dtypes = [z_dtype, lg_dtype] + FP32[2:]
    got = outputs_and_grads(cuda_fn(cs), inputs, dtypes)
    rounded = [t.to(dt) for t, dt in zip(inputs, dtypes)]  # the oracle sees the same rounded inputs
    ref = outputs_and_grads(sequential, rounded, FP64)
    check(got, ref, 1e-2, dtypes)


@pytest.mark.gpu
@pytest.mark.parametrize("cs", CLUSTERS)
def test_gpu_gradient_from_h_last_alone(cs):
    needs_kernels()
    inputs = random_inputs(2, 37, 2, 128, device="cuda")
    got = outputs_and_grads(cuda_fn(cs), inputs, FP32, use_h=False)
    ref = outputs_and_grads(sequential, inputs, FP64, use_h=False)
    check(got[1:], ref[1:], 1e-4)


@pytest.mark.gpu
def test_gpu_dispatcher_uses_the_kernels_and_falls_back_where_they_do_not_cover():
    needs_kernels()
    inputs = random_inputs(2, 30, 3, 128, device="cuda")
    h, _ = mmrec_recurrence(*(t.clone().requires_grad_() for t in inputs), backend="cuda")
    assert type(h.grad_fn).__name__ == "_CudaRecurrenceFunctionBackward"
    got = outputs_and_grads(lambda *x: mmrec_recurrence(*x, backend="cuda"), inputs, FP32)
    ref = outputs_and_grads(sequential, inputs, FP64)
    check(got, ref, 1e-4)
    # d = 48 is not built and float64 is not taken: Triton's kernels, same results
    inputs48 = random_inputs(2, 30, 3, 48, device="cuda")
    got = outputs_and_grads(lambda *x: mmrec_recurrence(*x, backend="cuda"), inputs48, FP32)
    check(got, outputs_and_grads(sequential, inputs48, FP64), 1e-4)
    got = outputs_and_grads(lambda *x: mmrec_recurrence(*x, backend="cuda"), inputs, FP64)
    check(got, ref, 1e-9)


BINDING_REJECTIONS = """
import sys
sys.path[:0] = {paths!r}
import pytest, torch
from recurrence_helpers import random_inputs
import mm_rec.cuda as mm_cuda
ext = mm_cuda.load_extension()
z, lg, W, b, h0 = random_inputs(1, 4, 2, 64, device="cuda")
with pytest.raises(RuntimeError, match="cluster_size"):
    ext.recurrence_fwd(z, lg, W, b, h0, 3)
with pytest.raises(RuntimeError, match="not built"):
    ext.recurrence_fwd(*random_inputs(1, 4, 2, 48, device="cuda"), 1)
with pytest.raises(RuntimeError, match="W_g"):
    ext.recurrence_fwd(z, lg, W.transpose(1, 2), b, h0, 1)  # not contiguous
with pytest.raises(RuntimeError, match="h0"):
    ext.recurrence_fwd(z, lg, W, b, h0.bfloat16(), 1)
for d, cs in [(32, 2), (32, 4), (64, 4)]:  # roles of less than a warp are not built
    with pytest.raises(RuntimeError, match="not built"):
        ext.recurrence_fwd(*random_inputs(1, 4, 2, d, device="cuda"), cs)
print("rejected")
"""


@pytest.mark.gpu
def test_gpu_binding_rejects_bad_arguments():
    needs_kernels()
    for d, cs in [(32, 2), (32, 4), (64, 4)]:
        assert not built(cs, d)
    ext = mm_cuda.load_extension()
    assert ext.recurrence_cluster_size(1, 128) == 1 and ext.recurrence_cluster_size(10**6, 128) == 1
    for cs in CLUSTERS:
        assert ext.recurrence_max_active_clusters(128, cs, True) > 0
    # the binding's argument checks throw from C++; in a child process, so that a crash (one H100 run
    # ended this file with a segmentation fault here) fails this test instead of the whole session
    here = Path(__file__).resolve().parent
    paths = [str(here), str(here.parents[1])]  # recurrence_helpers and the helpers it imports
    done = subprocess.run([sys.executable, "-c", BINDING_REJECTIONS.format(paths=paths)], capture_output=True,
                          text=True, timeout=300, cwd=Path(__file__).resolve().parents[3])
    assert done.returncode == 0 and "rejected" in done.stdout, (done.returncode, done.stderr[-2000:])


@pytest.mark.gpu
def test_gpu_operator_registration_and_compile():
    needs_kernels()
    z, lg, W, b, h0 = (t.requires_grad_() for t in random_inputs(2, 13, 2, 128, device="cuda"))
    for cs in (0, 4):
        torch.library.opcheck(torch.ops.mm_rec.cuda_recurrence_fwd.default, (z, lg, W, b, h0, cs))

    def f(z, lg, W, b, h0):
        h, h_last = recurrence_cuda(z, torch.nn.functional.logsigmoid(lg), W, b, h0, cluster_size=2)
        return h.square().sum() + h_last.sum()

    compiled = torch.compile(f, fullgraph=True)
    leaves = [t.detach().clone().requires_grad_() for t in (z, lg, W, b, h0)]
    loss = compiled(*leaves)
    loss.backward()
    eager = [t.detach().clone().requires_grad_() for t in (z, lg, W, b, h0)]
    f(*eager).backward()
    torch.testing.assert_close(loss, f(*(t.detach() for t in eager)), rtol=1e-5, atol=1e-5)
    for got, want in zip(leaves, eager):
        torch.testing.assert_close(got.grad, want.grad, rtol=1e-5, atol=1e-6)


_LONG_REF = {}


@pytest.mark.gpu
@pytest.mark.parametrize("cs", CLUSTERS)
def test_gpu_acceptance_shape_matches_float64_loop(cs):
    # [1, 32768, 32, 128], the shape, against the float64 loop (computed once).
    needs_kernels()
    inputs = random_inputs(1, 32768, 32, 128, device="cuda")
    if "ref" not in _LONG_REF:
        _LONG_REF["ref"] = outputs_and_grads(sequential, inputs, FP64)
    got = outputs_and_grads(cuda_fn(cs), inputs, FP32)
    check(got, _LONG_REF["ref"], 1e-4)


@pytest.mark.gpu
def test_gpu_full_size_bf16():
    needs_kernels()
    inputs = random_inputs(8, 2048, 32, 128, device="cuda")
    dtypes = [torch.bfloat16] + FP32[1:]
    got = outputs_and_grads(lambda *x: mmrec_recurrence(*x, backend="cuda"), inputs, dtypes)
    rounded = [inputs[0].bfloat16()] + inputs[1:]
    ref = outputs_and_grads(lambda *x: mmrec_recurrence(*x, backend="torch"), rounded, FP64)
    check(got, ref, 1e-2, dtypes)
