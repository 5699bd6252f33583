"""FLOP counting, the MFU formula, timers and the peak table of mm_rec.utils.profiling."""

import pytest
import torch

from mm_rec import MMRecConfig, MMRecModel
from mm_rec.core.recurrence import mmrec_recurrence
from mm_rec.ops import recurrence
from mm_rec.ops.delta_rule.reference import _product
from mm_rec.utils.profiling import (
    PEAK_BF16_TFLOPS,
    BlockTimer,
    count_flops,
    kernel_profile,
    mfu,
    peak_memory,
    time_fn,
    training_step_flops,
)


def test_flop_counter_on_a_known_matmul():
    M, K, N = 64, 48, 80
    a, b = torch.randn(M, K, requires_grad=True), torch.randn(K, N, requires_grad=True)
    out, forward = count_flops(torch.matmul, a, b)
    assert forward == 2 * M * K * N
    _, both = count_flops(lambda: out.sum().backward())
    assert forward + both == training_step_flops(forward)  # backward = two matmuls of the same size


def test_mfu_formula():
    # 3 x 330 TFLOP of forward in 2 s on a 989 TFLOP/s GPU: 990 / 2 / 989 = 50.05 %.
    step = training_step_flops(330e12)
    assert mfu(step, 2.0, 989e12) == pytest.approx(990 / 2 / 989)
    assert dict(PEAK_BF16_TFLOPS)["H100"] == 989.0 and dict(PEAK_BF16_TFLOPS)["H200"] == 989.0


def test_recurrence_flops_are_counted_on_every_backend():
    B, T, H, d = 2, 5, 2, 4
    z, log_gamma = torch.randn(B, T, H, d), -torch.rand(B, T, H, d)
    W_g, b_g = torch.randn(H, d, d), torch.randn(H, d)
    for backend in ("torch", "triton"):  # triton runs through the interpreter on CPU
        _, flops = count_flops(mmrec_recurrence, z, log_gamma, W_g, b_g, backend=backend)
        assert flops == 2 * B * T * H * d * d, backend


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # the interpreter's, on every scalar index
def test_recurrence_backward_operator_counts_its_formula():
    B, T, H, d = 2, 5, 2, 4
    leaves = [t.requires_grad_() for t in (torch.randn(B, T, H, d), -torch.rand(B, T, H, d),
                                           torch.randn(H, d, d), torch.randn(H, d))]
    h, h_last = mmrec_recurrence(*leaves, backend="triton")  # the interpreter on CPU
    _, flops = count_flops(lambda: (h.sum() + h_last.sum()).backward())
    assert flops == recurrence.backward_flops(B, T, H, d) == 4 * B * T * H * d * d


def test_time_fn_and_block_timer():
    timing = time_fn(lambda: torch.randn(64, 64) @ torch.randn(64, 64), warmup=1, iters=4, cuda=False)
    assert len(timing.times_ms) == 4 and timing.median_ms > 0

    model = MMRecModel(MMRecConfig.from_preset("tiny", num_layers=3))
    ids = torch.randint(0, 256, (2, 16))
    with BlockTimer(model.blocks, cuda=False) as timer:
        model(ids, labels=ids).loss.backward()
    times = timer.summary()
    assert len(times) == 3
    assert all(t.forward_calls == 1 and t.forward_ms > 0 and t.backward_ms > 0 for t in times)
    model(ids)  # hooks removed on exit
    assert all(t.forward_calls == 1 for t in timer.summary())


def test_peak_memory_on_cpu_reports_resident_size():
    memory = peak_memory("cpu")
    assert memory.allocated_gib > 0 and memory.reserved_gib == memory.allocated_gib


def test_kernel_profile_names_the_call_sites_of_copies():
    """--profile-copies: the casts inside a package function are listed under that function's frame, and
    those in a backward under its autograd node."""
    a = torch.randn(3, 8, 8, requires_grad=True)
    b = torch.randn(3, 8, 8)

    def fn():
        _product(a, b, torch.float64, torch.float32).sum().backward()

    fn()
    report = kernel_profile(fn, 5, "casts", copies=10)
    sites = report.split("--- copies by call site")[1].splitlines()[1:]
    assert any("delta_rule/reference.py" in line and "_product" in line for line in sites), report
    assert any("Backward" in line for line in sites), report
    assert "--- copies by call site" not in kernel_profile(fn, 5, "no casts asked")
