"""The fused memory step (mm_rec/ops/memory_step, one Triton kernel) against the torch step it replaces
(`HDSHierarchy.step_token` then `MultiMemoryAttention.step`, itself tested against the forward in
tests/test_decode.py): the same logits and the same state, token by token, for every config switch,
over streams that wrap the ring and evict kept slots, with rows at different positions. On the CPU
through Triton's interpreter (TRITON_INTERPRET=1, set by tests/conftest.py); also with tiles of a
few entries, so that every split, tile edge and row block of the kernel is crossed. With a GPU the same
tests run there, and one more at the 1b preset's memory sizes."""

import shutil

import pytest
import torch
from random_models import DECODE_VARIANTS, decode_model

from mm_rec.core.decode_state import DecodeState
from mm_rec.decoding import StepRunner
from mm_rec.ops import triton_available

pytestmark = pytest.mark.skipif(not triton_available(), reason="needs Triton (GPU or TRITON_INTERPRET=1)")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def set_backend(model, backend: str) -> None:
    for block in model.blocks:
        block.mixer.memory_step_backend = backend


def step_both(model, ids, prefix_lengths, steps, close, entry_dtype=None):
    """Prefill rows to `prefix_lengths`, then step both backends over the next `steps` tokens of each row
    (the decode states' window and ring entries in `entry_dtype`), comparing logits and every piece of the
    state after every token."""
    model, ids = model.to(DEVICE), ids.to(DEVICE)
    _, memory = model.prefill(ids, prefix_lengths)
    states = {b: DecodeState.from_memory_state(memory.clone(), model.config, entry_dtype) for b in ("torch", "triton")}
    feed = torch.stack([ids[b, n:n + steps] for b, n in enumerate(prefix_lengths)])
    for t in range(steps):
        logits = {}
        for backend, state in states.items():
            set_backend(model, backend)
            logits[backend] = model.step(feed[:, t], state)
        close(logits["triton"], logits["torch"], f"logits at step {t}")
        want = states["torch"].state_dict()
        for key, value in states["triton"].state_dict().items():
            if value.is_floating_point():
                close(value, want[key], f"{key} at step {t}")
            else:
                assert torch.equal(value, want[key]), (key, t)


def tiny_tiles(monkeypatch) -> None:
    """Tiles of 64 elements: 4 entries (or delta-memory rows) a tile at m <= 16, 2 at m <= 32: many splits."""
    from mm_rec.ops.memory_step import triton_kernels

    monkeypatch.setattr(triton_kernels, "_TILE_ELEMENTS", 64)


FLOAT64_CASES = [(variant, "default tiles") for variant in sorted(DECODE_VARIANTS)] + [
    (variant, "tiny tiles") for variant in ("default", "sub-slots, short window", "kept ages capped")]


@pytest.mark.parametrize("variant, tiles", FLOAT64_CASES)
def test_fused_step_equals_torch_step_float64(variant, tiles, monkeypatch):
    if tiles == "tiny tiles":
        tiny_tiles(monkeypatch)
    torch.manual_seed(0)
    model = decode_model(torch.float64, **DECODE_VARIANTS[variant]).eval()
    ids = torch.randint(0, 37, (2, 34))
    close = lambda a, b, name: torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=name)  # noqa: E731
    with torch.inference_mode():  # the rows cross block edges at different tokens, with kept slots filled
        step_both(model, ids, [9, 22], 9 if tiles == "default tiles" else 5, close)


M5 = dict(mem_dim=5, window_size=3, memory_size_M=7, recent_slots=3)
M17 = dict(mem_dim=17, num_memories=3, chunk_size=3, slots_per_block=3, memory_size_M=9, recent_slots=6)


@pytest.mark.parametrize("overrides, tiles", [(M5, "default tiles"), (M5, "tiny tiles"), (M17, "default tiles")],
                         ids=["m5 W3 S7", "m5 W3 S7, tiny tiles", "m17 K3 r3"])
def test_fused_step_at_awkward_sizes_fp32(overrides, tiles, monkeypatch):
    """Odd feature sizes (partly masked tiles), windows and rings that no tile divides, in fp32."""
    if tiles == "tiny tiles":
        tiny_tiles(monkeypatch)
    torch.manual_seed(1)
    model = decode_model(torch.float32, **overrides).eval()
    ids = torch.randint(0, 37, (2, 30))
    close = lambda a, b, name: torch.testing.assert_close(a, b, rtol=2e-5, atol=2e-6, msg=name)  # noqa: E731
    with torch.inference_mode():
        step_both(model, ids, [7, 7], 6, close)  # equal lengths: one batched prefill (transposed sums)


@pytest.mark.parametrize("variant", ["default", "sub-slots, short window", "age ring, mean level 2, mean pooling"])
def test_fused_step_with_narrow_entries_equals_the_torch_step(variant, monkeypatch):
    """Window and ring entries held in fp16 by a float64 model (as bf16 entries by a bf16 model): both
    steps read the stored, rounded entries and the token's own entry rounded as it is stored, so they
    agree to float64 precision (with the own entry unrounded the logits differ by 5e-12 to 1e-11 here:
    the model's tiny weights shrink the change, hence the tight tolerance)."""
    tiny_tiles(monkeypatch)
    torch.manual_seed(5)
    model = decode_model(torch.float64, **DECODE_VARIANTS[variant]).eval()
    ids = torch.randint(0, 37, (2, 34))
    close = lambda a, b, name: torch.testing.assert_close(a, b, rtol=0, atol=1e-13, msg=name)  # noqa: E731
    with torch.inference_mode():
        step_both(model, ids, [9, 22], 6, close, entry_dtype=torch.float16)


def test_fused_step_under_bf16_autocast_matches_the_torch_step():
    """Under bf16 autocast (q, k, v in bf16, the memory in fp32): the same as the torch step to bf16's
    precision; the fp32 state stays fp32."""
    torch.manual_seed(2)
    model = decode_model(torch.float32).eval()
    ids = torch.randint(0, 37, (2, 30))

    def close(a, b, name):
        assert a.dtype == b.dtype, name
        torch.testing.assert_close(a.float(), b.float(), rtol=3e-2, atol=3e-2, msg=name)

    with torch.inference_mode(), torch.autocast(DEVICE, dtype=torch.bfloat16):
        step_both(model, ids, [3, 9], 10, close)


@pytest.mark.skipif(not (shutil.which("g++") or shutil.which("c++")) and DEVICE == "cpu",
                    reason="torch.compile on the CPU needs a C++ compiler")
def test_compiled_step_with_the_fused_kernel_equals_the_eager_torch_step():
    """Under torch.compile (StepRunner(compile=True): the operator's in-place writes through
    functionalization) the fused step gives the eager torch step's logits and state."""
    torch._dynamo.reset()
    torch.manual_seed(4)
    model = decode_model(torch.float32).to(DEVICE).eval()
    ids = torch.randint(0, 37, (2, 22), device=DEVICE)
    with torch.inference_mode():
        prefill = model(ids[:, :5]).state
    eager = DecodeState.from_memory_state(prefill, model.config)
    compiled = DecodeState.from_memory_state(prefill, model.config)
    runner = StepRunner(model, compiled, compile=True)
    for t in range(5, ids.shape[1]):  # crosses 4 block edges: both step kinds
        set_backend(model, "torch")
        want = model.step(ids[:, t], eager)
        set_backend(model, "triton")
        torch.testing.assert_close(runner.step(ids[:, t]), want, rtol=1e-5, atol=1e-5)
    want = eager.state_dict()
    for key, value in compiled.state_dict().items():
        torch.testing.assert_close(value, want[key], rtol=1e-5, atol=1e-5, msg=key)


def test_unknown_memory_step_backend_is_refused():
    model = decode_model(torch.float32)
    set_backend(model, "cuda")
    state = DecodeState.from_memory_state(model.init_state(1), model.config)
    with pytest.raises(ValueError, match="memory_step_backend"):
        model.step(torch.tensor([1]), state)


@pytest.mark.gpu
def test_fused_step_at_the_1b_memory_sizes():
    """m = 256, W = 256, S = 512 (P = 256 kept), C = 128, K = 8 banks, batch 3 (the 1b preset's memory in a
    narrow model), from a random full state at different positions: 8 tokens, fp32, against the torch step."""
    torch.manual_seed(3)
    model = decode_model(torch.float32, hidden_dim=64, num_heads=2, num_memories=8, mem_dim=256, memory_size_M=512,
                         chunk_size=128, decay_rank=8).to(DEVICE).eval()
    memory = model.init_state(3, device=DEVICE)
    for layer in memory.layers:
        for name, tensor in layer.tensors().items():
            if tensor.is_floating_point():
                tensor.normal_(0.0, 0.3)
            elif name == "slot_ids":  # kept blocks among the first 60, some empty
                tensor.copy_(torch.randint(-1, 60, tensor.shape, device=DEVICE))
    memory.position.copy_(torch.tensor([8190, 131071, 300], device=DEVICE))
    states = {b: DecodeState.from_memory_state(memory.clone(), model.config) for b in ("torch", "triton")}
    ids = torch.randint(0, 37, (3, 8), device=DEVICE)
    with torch.inference_mode():
        for t in range(8):
            logits = {}
            for backend, state in states.items():
                set_backend(model, backend)
                logits[backend] = model.step(ids[:, t], state)
            torch.testing.assert_close(logits["triton"], logits["torch"], rtol=1e-4, atol=1e-5)
    want = states["torch"].state_dict()
    for key, value in states["triton"].state_dict().items():
        torch.testing.assert_close(value, want[key], rtol=1e-4, atol=1e-5, msg=key)
