"""The decoding step on a CUDA GPU (GPU only): graph-replayed steps (StepRunner, the capture path of
`generate`) equal eager steps and the forward, compiled or not; bf16 weights generate the same tokens
with and without the graph; rows of different lengths generate as each alone."""

import pytest
import torch
from random_models import gpu_small_model

from mm_rec import MMRecModel
from mm_rec.core.decode_state import DecodeState
from mm_rec.decoding import StepRunner

pytestmark = pytest.mark.gpu


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def small_model(**overrides) -> MMRecModel:
    return gpu_small_model(**overrides).cuda().eval()


@pytest.mark.parametrize("compile", [False, True])
@pytest.mark.parametrize("overrides", [dict(), dict(slots_per_block=2, memory_size_M=8, recent_slots=4)])
def test_graph_replayed_steps_equal_eager_steps_and_the_forward(compile, overrides):
    model = small_model(**overrides)
    ids = torch.randint(0, 97, (3, 120), device="cuda")  # 15 blocks of 8: the ring wraps, kept slots evicted
    prefix = 21
    with torch.no_grad():
        memory = model(ids[:, :prefix]).state
        full = model(ids)
    eager = DecodeState.from_memory_state(memory, model.config)
    runner = StepRunner(model, DecodeState.from_memory_state(memory, model.config), cuda_graph=True, compile=compile)
    logits = []
    for t in range(prefix, ids.shape[1]):
        expected = model.step(ids[:, t], eager)
        got = runner.step(ids[:, t]).clone()  # the graph's output buffer: the next replay overwrites it
        assert rel(got, expected) < (1e-5 if compile else 1e-6), t
        logits.append(got)
    assert set(runner.graphs) == {True, False}  # the block-closing step and the other, both replayed
    assert rel(torch.stack(logits, 1), full.logits[:, prefix:]) < 1e-4
    state, eager_state = runner.state.state_dict(), full.state.state_dict()
    for key, value in eager_state.items():
        if value.is_floating_point():
            assert rel(state[key], value) < 1e-4 or value.abs().max() == 0, key
        else:
            assert torch.equal(state[key], value), key


def test_bf16_generation_replays_the_eager_steps_exactly():
    model = small_model().to(torch.bfloat16)  # the weights cast, the state fp32 (entries bf16): the CLI's CUDA path
    ids = torch.randint(0, 97, (4, 40), device="cuda")
    lengths = [40, 3, 17, 25]
    graphed = model.generate(ids, 30, temperature=0, lengths=lengths)
    eager = model.generate_stream(ids, 30, temperature=0, lengths=lengths, cuda_graph=False)
    assert torch.equal(graphed[:, 40:], torch.stack(list(eager), dim=1))  # the same kernels, replayed


def test_rows_of_different_lengths_generate_as_each_alone_on_the_gpu():
    model = small_model()  # fp32 (no TF32): batching does not flip a greedy choice
    ids = torch.randint(0, 97, (4, 40), device="cuda")
    lengths = [40, 3, 17, 25]
    batched = model.generate(ids, 30, temperature=0, lengths=lengths)
    for b, n in enumerate(lengths):
        assert torch.equal(batched[b, 40:], model.generate(ids[b:b + 1, :n], 30, temperature=0)[0, n:]), b
