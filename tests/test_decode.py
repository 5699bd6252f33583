"""The one-token step path (MMRecModel.step on a DecodeState) against the segment path (invariant I5,
docs/architecture.md): the same logits and the same state, for every config switch, over streams that
cross block edges, wrap the ring and evict kept slots; the decode layout's conversions; the step's
work independent of the position and free of host syncs; prompts of different lengths in one batch."""

import shutil

import pytest
import torch
from random_models import DECODE_BASE as BASE
from random_models import DECODE_VARIANTS as VARIANTS
from random_models import decode_model as small_model
from torch.utils._python_dispatch import TorchDispatchMode

from mm_rec.core.decode_state import DecodeState
from mm_rec.decoding import StepRunner, closes_a_block


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def step_through(model, ids, decode, start):
    """Step `decode` over ids[:, start:]; logits [B, T - start, V]."""
    return torch.stack([model.step(ids[:, t], decode) for t in range(start, ids.shape[1])], dim=1)


def assert_states_equal(decode: DecodeState, expected, check):
    got, want = decode.state_dict(), expected.state_dict()
    assert got.keys() == want.keys()
    for key, value in want.items():
        if value.is_floating_point():
            check(got[key], value, key)
        else:
            assert torch.equal(got[key], value), key


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("prefix", [0, 7])
def test_step_equals_forward_float64(variant, prefix):
    """From a fresh stream or after a 7-token forward (mid-block), one token at a time = one forward,
    the logits and every piece of the state, at a block edge, mid-block and at the end."""
    model = small_model(**VARIANTS[variant])
    ids = torch.randint(0, 37, (3, 57))
    state = model(ids[:, :prefix]).state if prefix else model.init_state(3)
    decode = DecodeState.from_memory_state(state, model.config)

    def close(a, b, name):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=name)

    start = prefix
    for stop in (24, 43, 57):  # positions 24 (a block edge), 43 (mid-block) and the end
        logits = step_through(model, ids[:, :stop], decode, start)
        full = model(ids[:, :stop])
        close(logits, full.logits[:, start:], "logits")
        assert_states_equal(decode, full.state, close)
        start = stop


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_step_equals_forward_fp32(variant):
    """In fp32: relative error below 1e-5 for the logits and every piece of the state."""
    model = small_model(torch.float32, **VARIANTS[variant])
    ids = torch.randint(0, 37, (2, 61))
    decode = DecodeState.from_memory_state(model(ids[:, :10]).state, model.config)
    logits = step_through(model, ids, decode, 10)
    full = model(ids)
    assert rel(logits, full.logits[:, 10:]) < 1e-5

    def close(a, b, name):
        assert rel(a, b) < 1e-5 or b.abs().max() == 0 and a.abs().max() == 0, name

    assert_states_equal(decode, full.state, close)


@pytest.mark.parametrize("variant", ["default", "sub-slots", "long window"])
def test_step_with_narrow_entries_tracks_the_forward(variant):
    """A float64 model stepping with its window's and ring's entries held in fp32 (as a bf16 model holds
    them in bf16): the logits and the state within fp32 rounding of the forward's, the entries given back
    in the state's dtype, and a forward continues from that state as from the forward's own."""
    model = small_model(**VARIANTS[variant])
    ids = torch.randint(0, 37, (2, 61))
    decode = DecodeState.from_memory_state(model(ids[:, :10]).state, model.config, torch.float32)
    assert decode.entry_dtype == torch.float32 and decode.layers[0].block_key_sum.dtype == torch.float64
    logits = step_through(model, ids[:, :50], decode, 10)
    full = model(ids[:, :50])
    assert 0 < rel(logits, full.logits[:, 10:]) < 1e-6  # rounded (not equal), and only rounded

    def close(a, b, name):
        assert a.dtype == b.dtype == torch.float64, name
        assert rel(a, b) < 1e-6 or b.abs().max() == 0 and a.abs().max() == 0, name

    assert_states_equal(decode, full.state, close)
    after = model(ids[:, 50:], state=decode.to_memory_state()).logits
    assert rel(after, model(ids).logits[:, 50:]) < 1e-6


def test_decode_entries_follow_half_weights():
    """bf16 weights: generation's decode state holds the entries in bf16 (the forward reads them in bf16)
    and the rest of the state in fp32; its tokens are the bf16 forward's, greedy, within the precision."""
    model = small_model(torch.bfloat16)
    assert model.decode_entry_dtype() == torch.bfloat16 and small_model().decode_entry_dtype() is None
    ids = torch.randint(0, 37, (2, 30))
    state = model(ids[:, :20]).state
    decode = DecodeState.from_memory_state(state, model.config, model.decode_entry_dtype())
    assert decode.layers[0].window_keys.dtype == torch.bfloat16 and decode.layers[0].h.dtype == torch.float32
    logits = step_through(model, ids, decode, 20)
    full = model(ids).logits[:, 20:]
    assert rel(logits, full) < 2e-2


def test_kept_slots_outlive_the_age_ring_in_the_step_path():
    """After 20 blocks through a ring of S = 3 slots (R = 1 by age, P = 2 by importance), the step path's
    kept part holds blocks older than any age ring of S slots would, and the same ones as the forward."""
    model = small_model(memory_size_M=3, recent_slots=1)
    ids = torch.randint(0, 37, (2, 80))
    decode = DecodeState.from_memory_state(model.init_state(2), model.config)
    step_through(model, ids, decode, 0)
    expected = model(ids).state.state_dict()
    for layer in range(2):
        kept = decode.state_dict()[f"banks.{layer}.slot_ids"]  # [B, K, P]
        assert torch.equal(kept, expected[f"banks.{layer}.slot_ids"])
        assert (kept >= 0).all() and (kept < 20 - 3).any(dim=-1).all(), kept  # full, and older than S blocks


@pytest.mark.parametrize("variant", ["default", "sub-slots", "long window"])
def test_rows_at_different_positions_step_together(variant):
    """Rows whose prompts have different lengths (positions) step as one batch, each as if alone."""
    model = small_model(**VARIANTS[variant])
    lengths = [1, 13, 8, 22]
    ids = torch.randint(0, 37, (4, 40))
    _, memory = model.prefill(ids, lengths)
    decode = DecodeState.from_memory_state(memory, model.config)
    steps = 15
    feed = torch.stack([ids[b, n:n + steps] for b, n in enumerate(lengths)])  # each row's next tokens
    logits = torch.stack([model.step(feed[:, t], decode) for t in range(steps)], dim=1)
    for b, n in enumerate(lengths):
        alone = model(ids[b:b + 1, :n + steps])
        torch.testing.assert_close(logits[b], alone.logits[0, n:], rtol=1e-10, atol=1e-12)
        for key, value in alone.state.state_dict().items():
            torch.testing.assert_close(decode.state_dict()[key][b:b + 1], value, rtol=1e-10, atol=1e-12, msg=key)


@pytest.mark.parametrize("variant", ["default", "sub-slots", "age ring, mean level 2, mean pooling", "long window"])
def test_decode_layout_round_trip_is_exact(variant):
    """documented -> decode -> documented is the identity at any position, kept slots in priority order;
    load_ writes the same tensors in place."""
    model = small_model(**VARIANTS[variant])
    lengths = [1, 5, 14, 31, 48]
    ids = torch.randint(0, 37, (5, 48))
    _, memory = model.prefill(ids, lengths)
    decode = DecodeState.from_memory_state(memory, model.config)
    for key, value in memory.state_dict().items():
        assert torch.equal(decode.state_dict()[key], value), key
    other = DecodeState.from_memory_state(model.init_state(5), model.config)
    storage = [t.data_ptr() for layer in other.layers for t in layer.tensors().values()]
    other.load_(memory)
    assert storage == [t.data_ptr() for layer in other.layers for t in layer.tensors().values()]
    for key, value in memory.state_dict().items():
        assert torch.equal(other.state_dict()[key], value), key


class OpTrace(TorchDispatchMode):
    """Records (op, shapes of its tensor arguments) of everything dispatched."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        shapes = tuple(tuple(a.shape) for a in torch.utils._pytree.tree_leaves((args, kwargs))
                       if isinstance(a, torch.Tensor))
        self.ops.append((str(func), shapes))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("variant", ["default", "sub-slots", "age ring, mean level 2, mean pooling"])
def test_step_work_does_not_depend_on_the_position_and_never_syncs(variant):
    """The same ops on the same shapes at position 5 and at position 10^12 (O(1) per token), and no op
    that copies a value to the host (no .item(), no data-dependent shapes): capturable in a CUDA graph."""
    model = small_model(torch.float32, **VARIANTS[variant])
    traces = []
    for start in (5, 10**12 + 3):
        memory = model.init_state(2)
        memory.position.fill_(start)
        decode = DecodeState.from_memory_state(memory, model.config)
        with OpTrace() as trace:
            model.step(torch.tensor([3, 4]), decode)
        traces.append(trace.ops)
    assert traces[0] == traces[1]
    syncing = {"aten._local_scalar_dense.default", "aten.nonzero.default", "aten.item.default"}
    assert not [op for op, _ in traces[0] if op in syncing]


def test_prefill_reads_each_prompt_alone_and_ignores_padding():
    model = small_model()
    lengths = [9, 3, 9, 17]
    ids = torch.randint(0, 37, (4, 17))
    logits, memory = model.prefill(ids, lengths)
    padded = ids.clone()
    for b, n in enumerate(lengths):
        padded[b, n:] = 0
        alone = model(ids[b:b + 1, :n])
        torch.testing.assert_close(logits[b], alone.logits[0, -1], rtol=1e-10, atol=1e-12)
        for key, value in alone.state.state_dict().items():
            torch.testing.assert_close(memory.state_dict()[key][b:b + 1], value, rtol=1e-10, atol=1e-12, msg=key)
    other_logits, _ = model.prefill(padded, lengths)
    assert torch.equal(other_logits, logits)


def test_batched_generation_of_prompts_of_different_lengths_equals_each_alone():
    """Greedy, fp32: the batch (left-aligned, per-row lengths) generates what each prompt generates alone."""
    model = small_model(torch.float32, slots_per_block=2, recent_slots=2)
    lengths = [6, 1, 14, 9]
    ids = torch.randint(0, 37, (4, 14))
    batched = model.generate(ids, 20, temperature=0, lengths=torch.tensor(lengths))
    for b, n in enumerate(lengths):
        alone = model.generate(ids[b:b + 1, :n], 20, temperature=0)
        assert torch.equal(batched[b, 14:], alone[0, n:]), b


def test_generation_continues_a_given_state_and_streams():
    model = small_model()
    ids = torch.randint(0, 37, (2, 30))
    state = model(ids[:, :12]).state
    stream = model.generate_stream(ids[:, 12:], 5, temperature=0, state=state)
    first = next(stream)  # the first token comes before the rest are computed
    assert torch.equal(first, model(ids).logits[:, -1].argmax(-1))
    assert len(list(stream)) == 4


def test_bad_step_and_prefill_inputs_are_refused():
    model = small_model()
    decode = DecodeState.from_memory_state(model.init_state(2), model.config)
    with pytest.raises(ValueError, match="input_ids"):
        model.step(torch.tensor([[1, 2]]), decode)
    with pytest.raises(ValueError, match="rows"):
        model.step(torch.tensor([1, 2, 3]), decode)
    with pytest.raises(ValueError, match="lengths"):
        model.prefill(torch.zeros(2, 5, dtype=torch.long), [5, 6])
    with pytest.raises(ValueError, match="lengths"):
        model.generate(torch.zeros(2, 5, dtype=torch.long), 3, lengths=[0, 5])
    with pytest.raises(ValueError, match="vocab_size"):
        model.prefill(torch.tensor([[1, 2, 99]]))
    with pytest.raises(ValueError, match="batch"):
        decode.load_(model.init_state(3))


def test_step_under_bf16_autocast_keeps_the_memory_in_fp32():
    """Under bf16 autocast (the projections in bf16, as in the forward) the step keeps its state in fp32
    and its logits agree with the forward's to bf16 precision."""
    model = small_model(torch.float32)
    ids = torch.randint(0, 37, (2, 30))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        memory = model(ids[:, :29]).state
        decode = DecodeState.from_memory_state(memory, model.config)
        logits = model.step(ids[:, 29], decode)
        full = model(ids)
    assert logits.isfinite().all() and rel(logits.float(), full.logits[:, -1].float()) < 3e-2
    assert all(t.dtype in (torch.float32, torch.int64) for t in decode.state_dict().values())


def test_the_forward_per_token_fallback_generates_the_same_tokens():
    """use_step=False (what generate does when FSDP shards the parameters) = the step path, greedy."""
    model = small_model(torch.float32, slots_per_block=2, recent_slots=2)
    ids = torch.randint(0, 37, (3, 11))
    lengths = [11, 2, 7]
    step = model.generate(ids, 25, temperature=0, lengths=lengths)
    forward = torch.stack(list(model.generate_stream(ids, 25, temperature=0, lengths=lengths, use_step=False)), 1)
    assert torch.equal(step[:, 11:], forward)


@pytest.mark.parametrize("variant", ["default", "sub-slots"])
def test_the_smaller_step_equals_the_full_one_where_no_block_closes(variant):
    """`_step(..., close_blocks=False)` (what StepRunner runs for C - 1 of every C tokens) leaves the state
    and the logits exactly as the full step does at every position that closes no block, and differs
    where a row closes its block (so the switch is not a no-op); `closes_a_block` tells the two apart."""
    model = small_model(torch.float64, **VARIANTS[variant]).eval()
    C = model.config.chunk_size
    ids = torch.randint(0, BASE["vocab_size"], (2, 23))
    with torch.inference_mode():
        prefill = model(ids[:, :5]).state
    full = DecodeState.from_memory_state(prefill, model.config)
    seen = set()
    for t in range(5, ids.shape[1]):
        closing = closes_a_block(full.position.tolist(), C)
        seen.add(closing)
        trial = DecodeState.from_memory_state(full.to_memory_state(), model.config)
        with torch.inference_mode():
            small = model._step(ids[:, t], trial, close_blocks=False)
            want = model._step(ids[:, t], full)
        same_state = all(torch.equal(a, b) for a, b in zip(trial.state_dict().values(), full.state_dict().values()))
        assert torch.equal(small, want)  # the read comes before the block closes
        assert same_state != closing, t
    assert seen == {True, False}


def test_graph_schedule_warms_up_and_captures_each_step_kind_once():
    """StepRunner's CUDA-graph schedule, with the graph calls stood in for on the CPU: the block-closing
    step warms up first (it is right at any position), then the smaller one on tokens that close no
    block; each kind is captured once after its warm-up and replayed after that; every token gets the
    kind its position needs once that kind is captured, and the logits of eager steps."""
    model = small_model(torch.float64).eval()
    C = model.config.chunk_size
    ids = torch.randint(0, BASE["vocab_size"], (2, 26))
    with torch.inference_mode():
        prefill = model(ids[:, :5]).state
    eager = DecodeState.from_memory_state(prefill, model.config)
    runner = StepRunner(model, DecodeState.from_memory_state(prefill, model.config), cuda_graph=False)
    runner.cuda_graph = True  # the graph branch, with these stand-ins for the CUDA calls:
    events = []

    class FakeGraph:
        def __init__(self, kind):
            self.kind = kind

        def replay(self):
            events.append(("replay", self.kind))
            runner._logits[self.kind] = runner.step_fn(runner._tokens, runner.state, self.kind)

    def side_stream_step(kind):
        events.append(("eager", kind))
        return runner.step_fn(runner._tokens, runner.state, kind)

    def capture(kind):
        events.append(("capture", kind))
        runner.graphs[kind] = FakeGraph(kind)

    runner._side_stream_step, runner._capture = side_stream_step, capture
    for t in range(5, ids.shape[1]):
        closing = (t + 1) % C == 0
        want = model.step(ids[:, t], eager)
        got = runner.step(ids[:, t])
        torch.testing.assert_close(got, want, rtol=0, atol=0)
        kind = events[-1][1]
        assert kind == closing or (kind and events[-1][0] == "eager"), (t, events[-1])
    assert events[:2] == [("eager", True), ("eager", True)]  # whatever the positions
    for kind in (True, False):
        mine = [e[0] for e in events if e[1] == kind]
        assert mine.count("eager") == 2 and mine.count("capture") == 1, (kind, mine)
        assert mine.index("capture") == 2 and set(mine[3:]) == {"replay"}, (kind, mine)


@pytest.mark.skipif(not (shutil.which("g++") or shutil.which("c++")),
                    reason="torch.compile on the CPU needs a C++ compiler")
def test_the_compiled_step_equals_the_eager_step_and_compiles_once():
    """StepRunner(compile=True) (`mmrec generate --compile`): torch.compile'd steps give the eager step's
    logits and state over a stream that crosses block edges and wraps the ring, from one compilation
    per step kind (the block-closing step and the other) of one block's step, shared by both layers."""
    torch._dynamo.reset()
    model = small_model(torch.float32).eval()
    ids = torch.randint(0, BASE["vocab_size"], (2, 30))
    with torch.inference_mode():
        prefill = model(ids[:, :5]).state
    eager = DecodeState.from_memory_state(prefill, model.config)
    compiled = DecodeState.from_memory_state(prefill, model.config)
    runner = StepRunner(model, compiled, compile=True)
    frames_before = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    for t in range(5, ids.shape[1]):
        want = model.step(ids[:, t], eager)
        got = runner.step(ids[:, t])
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert_states_equal(compiled, eager, lambda a, b, key: torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5,
                                                                                       msg=key))
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] - frames_before == 2
