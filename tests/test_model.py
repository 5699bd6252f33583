"""Model-level invariants (docs/architecture.md, section 5): I3, I4, I5, I7, I9, generation and persistence."""

import json

import pytest
import torch

from mm_rec import MemoryState, MMRecConfig, MMRecModel


def small_model(**overrides) -> MMRecModel:
    # C=4, S=3: a 41-token stream completes 10 blocks, so the ring wraps several times.
    base = dict(vocab_size=37, hidden_dim=16, num_layers=2, num_heads=2, ffn_dim=24, num_memories=2, mem_dim=6,
                memory_size_M=3, chunk_size=4, decay_rank=3)
    return MMRecModel(MMRecConfig(**{**base, **overrides})).double()


def run_segments(model, ids, cuts, state=None):
    bounds = [0, *cuts, ids.shape[1]]
    logits = []
    for a, b in zip(bounds[:-1], bounds[1:]):
        out = model(ids[:, a:b], state=state)
        logits.append(out.logits)
        state = out.state
    return torch.cat(logits, 1), state


def assert_states_close(a: MemoryState, b: MemoryState):
    sa, sb = a.state_dict(), b.state_dict()
    for key in sa:
        torch.testing.assert_close(sa[key], sb[key], rtol=1e-10, atol=1e-12, msg=key)


@pytest.mark.parametrize("gate_input", ["state", "input"])
def test_causality_I3(gate_input):
    model = small_model(gate_input=gate_input)
    ids = torch.randint(0, 37, (2, 30))
    base = model(ids).logits
    for t in [0, 3, 4, 17, 29]:
        changed = ids.clone()
        changed[:, t + 1:] = torch.randint(0, 37, changed[:, t + 1:].shape)
        torch.testing.assert_close(model(changed).logits[:, :t + 1], base[:, :t + 1], rtol=0, atol=1e-12)
        if t < 29:
            assert not torch.allclose(model(changed).logits[:, t + 1:], base[:, t + 1:])


@pytest.mark.parametrize("cuts", [[1], [5, 6], [3, 10, 22, 23, 37], [4, 8, 12]])
def test_segment_invariance_I4(cuts):
    model = small_model()
    ids = torch.randint(0, 37, (2, 41))
    full = model(ids)
    logits, state = run_segments(model, ids, cuts)
    torch.testing.assert_close(logits, full.logits, rtol=1e-10, atol=1e-12)
    assert_states_close(state, full.state)


def test_step_invariance_I5():
    model = small_model()
    ids = torch.randint(0, 37, (3, 29))
    full = model(ids)
    logits, state = run_segments(model, ids, list(range(1, 29)))
    torch.testing.assert_close(logits, full.logits, rtol=1e-10, atol=1e-12)
    assert_states_close(state, full.state)


def test_long_inputs_run_in_segments_with_the_same_result_and_gradients():
    model = small_model()
    chunked = small_model(max_segment_len=7)
    chunked.load_state_dict(model.state_dict())
    ids = torch.randint(0, 37, (2, 33))
    out, out_chunked = model(ids, labels=ids), chunked(ids, labels=ids)
    torch.testing.assert_close(out_chunked.logits, out.logits, rtol=1e-10, atol=1e-12)
    out.loss.backward()
    out_chunked.loss.backward()
    for (name, p), q in zip(model.named_parameters(), chunked.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-8, atol=1e-12, msg=name)


def test_bf16_autocast_on_the_cpu_follows_fp32_with_short_segments():
    """The mixed-precision path GPU training and scoring take, here on the CPU's bf16 autocast: segments of
    1, 5 and 35 tokens with the state carried (the short ones put the delta rule on its factored state
    map, m = 16 > 2T), forward and backward, near the fp32 model's logits and gradients."""
    torch.manual_seed(0)
    model = small_model(mem_dim=16).float()
    ids = torch.randint(0, 37, (2, 41))
    results = []
    for autocast in (False, True):
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            logits, _ = run_segments(model, ids, [1, 6])
        (logits.float().log_softmax(-1)[..., 0].sum()).backward()
        results.append((logits.float(), [p.grad.clone() for p in model.parameters()]))
    (fp32, fp32_grads), (bf16, bf16_grads) = results
    assert (bf16 - fp32).norm() / fp32.norm() < 2e-2
    for a, b in zip(bf16_grads, fp32_grads):
        assert torch.isfinite(a).all() and (a - b).norm() <= 0.1 * b.norm() + 1e-6


def test_every_parameter_gets_a_gradient_I7():
    model = MMRecModel(MMRecConfig.from_preset("tiny", num_layers=2, decay_rank=8, tie_embeddings=False))
    ids = torch.randint(0, 256, (2, 100))  # > 2 blocks of 32: ring slots are read
    model(ids, labels=torch.randint(0, 256, (2, 100))).loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_dropout_acts_in_training_only():
    torch.manual_seed(0)
    plain = small_model()
    torch.manual_seed(0)
    dropped = small_model(dropout=0.3)
    ids = torch.randint(0, 37, (2, 13))
    torch.testing.assert_close(dropped.eval()(ids).logits, plain(ids).logits, rtol=0, atol=0)
    dropped.train()
    assert not torch.allclose(dropped(ids).logits, plain(ids).logits), "dropout changes training forwards"


def test_loss_is_mean_cross_entropy_with_ignore_index():
    model = small_model()
    ids = torch.randint(0, 37, (2, 9))
    labels = torch.randint(0, 37, (2, 9))
    labels[0, :4] = -100
    out = model(ids, labels=labels)
    keep = labels != -100
    expected = torch.nn.functional.cross_entropy(out.logits[keep], labels[keep])
    torch.testing.assert_close(out.loss, expected)
    # the sum (sequence parallelism divides by the count over all processes)
    total = model(ids, labels=labels, loss_reduction="sum").loss
    expected_sum = torch.nn.functional.cross_entropy(out.logits[keep], labels[keep], reduction="sum")
    torch.testing.assert_close(total, expected_sum)
    with pytest.raises(ValueError, match="loss_reduction"):
        model(ids, labels=labels, loss_reduction="none")


def test_bad_inputs_are_refused_I9():
    model = small_model()
    with pytest.raises(ValueError, match="vocab_size"):
        model(torch.tensor([[1, 37]]))
    with pytest.raises(ValueError, match="vocab_size"):
        model(torch.tensor([[-1, 2]]))
    with pytest.raises(ValueError, match="empty"):
        model(torch.zeros(1, 0, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\[B, T\]"):
        model(torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="integer"):
        model(torch.zeros(1, 3))
    with pytest.raises(ValueError, match="labels"):
        model(torch.tensor([[1, 2]]), labels=torch.tensor([[1, 99]]))
    with pytest.raises(ValueError, match="state"):
        model(torch.tensor([[1, 2]]), state=model.init_state(3))


def test_greedy_generate_equals_argmax_over_full_forwards():
    model = small_model()
    prompt = torch.randint(0, 37, (2, 6))
    generated = model.generate(prompt, max_new_tokens=12, temperature=0)
    seq = prompt
    for _ in range(12):
        next_token = model(seq).logits[:, -1].argmax(-1, keepdim=True)
        seq = torch.cat([seq, next_token], 1)
    assert torch.equal(generated, seq)


def test_sampling_respects_top_k_and_seed():
    model = small_model()
    prompt = torch.randint(0, 37, (2, 5))
    a = model.generate(prompt, 8, temperature=1.0, top_k=3, generator=torch.Generator().manual_seed(1))
    b = model.generate(prompt, 8, temperature=1.0, top_k=3, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b)
    first_logits = model(prompt).logits[:, -1]
    allowed = first_logits.topk(3, -1).indices
    assert all(a[i, 5] in allowed[i] for i in range(2))
    c = model.generate(prompt, 8, temperature=1.0, top_p=1e-6, generator=torch.Generator().manual_seed(2))
    assert torch.equal(c[:, 5], first_logits.argmax(-1))  # tiny top_p keeps only the best token


def test_reset_returns_a_row_to_a_fresh_stream():
    model = small_model()
    ids = torch.randint(0, 37, (2, 23))
    more = torch.randint(0, 37, (2, 14))
    state = model(ids).state
    state.reset(torch.tensor([True, False]))
    out = model(more, state=state)
    fresh = model(more[:1]).logits
    continued = model(torch.cat([ids[1:], more[1:]], 1)).logits[:, 23:]
    torch.testing.assert_close(out.logits[:1], fresh, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(out.logits[1:], continued, rtol=1e-10, atol=1e-12)


def test_state_round_trip_continues_bit_exactly():
    model = small_model()
    ids = torch.randint(0, 37, (2, 30))
    state = model(ids[:, :17]).state
    restored = MemoryState.from_state_dict({k: v.clone() for k, v in state.state_dict().items()})
    assert torch.equal(model(ids[:, 17:], state=state).logits, model(ids[:, 17:], state=restored).logits)


def test_save_and_load_pretrained(tmp_path):
    model = small_model().float()
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["vocab_size"] == 37
    loaded = MMRecModel.from_pretrained(tmp_path)
    ids = torch.randint(0, 37, (1, 11))
    assert torch.equal(model(ids).logits, loaded(ids).logits)


def test_truncated_checkpoint_gives_a_clear_error(tmp_path):
    small_model().float().save_pretrained(tmp_path)
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:200])
    with pytest.raises(ValueError, match="could not load weights"):
        MMRecModel.from_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError):
        MMRecModel.from_pretrained(tmp_path / "missing")


def test_7b_preset_builds_on_the_meta_device():
    cfg = MMRecConfig.from_preset("7b")
    with torch.device("meta"):
        model = MMRecModel(cfg)
    n = model.num_parameters()
    assert 5.5e9 < n < 7.5e9
    assert cfg.hidden_dim == 4096 and cfg.num_layers == 24 and cfg.max_seq_len >= 32768
    assert cfg.memory_size_M == 1024 and (cfg.log_clamp_min, cfg.log_clamp_max) == (-50.0, 0.0)


def test_checkpoints_saved_before_config_versions_load_as_they_were():
    """tests/fixtures/mmrec_v1 was written by the code before config_version (its config.json has no
    version and the old key max_chunk_len): it loads as version 1 and computes the logits and the
    state that code computed, to float32 rounding (bit for bit on the machine that wrote it; other
    CPUs' matmul kernels round differently, by an ulp; a changed computation differs by far more)."""
    from pathlib import Path

    fixture = Path(__file__).parent / "fixtures" / "mmrec_v1"
    with pytest.warns(FutureWarning, match="max_segment_len"):
        model = MMRecModel.from_pretrained(fixture)
    assert model.config.config_version == 1 and model.config.max_segment_len == 16
    expected = torch.load(fixture / "expected.pt")
    out = model(expected["input_ids"])
    exact = {"rtol": 1e-6, "atol": 1e-6}
    torch.testing.assert_close(out.logits, expected["logits"], **exact)
    old_state = MemoryState.from_state_dict(expected["state"])  # the first state layout
    new_state = out.state.state_dict()
    for key, value in old_state.state_dict().items():
        torch.testing.assert_close(new_state[key], value, **exact, msg=key)
    # and the old state continues the stream as the new one does
    more = torch.randint(0, 37, (2, 9))
    torch.testing.assert_close(model(more, state=old_state).logits, model(more, state=out.state).logits, **exact)
