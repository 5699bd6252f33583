"""MemoryState: round trip, detach, per-row reset, row selection, validation."""

import pytest
import torch
from safetensors.torch import load_file, save_file

from mm_rec.config import MMRecConfig
from mm_rec.core.memory_state import MemoryState


def random_state(B=3):
    cfg = MMRecConfig.from_preset("tiny", num_layers=2)
    state = MemoryState.zeros(cfg, B).map(lambda t: torch.randn_like(t))
    state.position = torch.randint(0, 1000, (B,))
    return cfg, state


def assert_equal(a: MemoryState, b: MemoryState):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


def test_state_dict_round_trip_is_bit_exact_also_through_safetensors(tmp_path):
    _, state = random_state()
    assert_equal(MemoryState.from_state_dict(state.state_dict()), state)
    save_file({k: v.contiguous() for k, v in state.state_dict().items()}, tmp_path / "s.safetensors")
    assert_equal(MemoryState.from_state_dict(load_file(tmp_path / "s.safetensors")), state)


def test_rows_select_and_join_back_bit_exactly():
    _, state = random_state(B=5)
    parts = [state.select_rows(slice(0, 2)), state.select_rows(slice(2, 3)), state.select_rows(slice(3, 5))]
    assert [p.batch_size for p in parts] == [2, 1, 2]
    assert torch.equal(parts[1].layers[1].h, state.layers[1].h[2:3])
    assert_equal(MemoryState.cat_rows(parts), state)


def test_reset_returns_only_masked_rows_to_a_fresh_stream():
    cfg, state = random_state()
    for layer in state.layers:  # kept-slot ids as a run would leave them
        layer.slot_ids = torch.randint(0, 50, layer.slot_ids.shape)
    before = state.clone()
    fresh = MemoryState.zeros(cfg, 3).state_dict()
    state.reset(torch.tensor([False, True, False]))
    for key, value in state.state_dict().items():
        old = before.state_dict()[key]
        assert torch.equal(value[[0, 2]], old[[0, 2]]), key
        assert torch.equal(value[1], fresh[key][1]), key  # zeros; kept-slot ids back to empty (-1)


def test_every_piece_of_the_layout_is_present_by_default_and_absent_when_switched_off():
    cfg, state = random_state()
    names = set(state.layers[0].tensors())
    assert names == {"h", "conv_tail", "window_keys", "window_values", "block_key_sum", "block_value_sum",
                     "block_weight_sum", "slot_keys", "slot_values", "slot_ids", "slot_importance", "delta_memory"}
    legacy = MemoryState.zeros(MMRecConfig.from_dict({"config_version": 1}), 1).layers[0]
    assert set(legacy.tensors()) == {"h", "block_key_sum", "block_value_sum", "slot_keys", "slot_values", "aggregate"}


def test_first_layout_state_dicts_load():
    """States saved before sub-slots (block sums [B, K, m]) load as one sub-slot."""
    cfg = MMRecConfig.from_dict({"config_version": 1})
    state = MemoryState.zeros(cfg, 2).map(lambda t: torch.randn_like(t))
    old = {k: (v.squeeze(2) if "block_" in k else v) for k, v in state.state_dict().items()}
    assert_equal(MemoryState.from_state_dict(old), state)


def test_reset_rejects_bad_masks():
    _, state = random_state()
    with pytest.raises(ValueError, match="bool"):
        state.reset(torch.tensor([1, 0, 1]))
    with pytest.raises(ValueError, match="shape"):
        state.reset(torch.tensor([True]))


def test_detach_cuts_history():
    _, state = random_state()
    x = torch.ones((), requires_grad=True)
    grown = state.map(lambda t: t * x)
    assert grown.banks[0].h.requires_grad
    assert not grown.detach().banks[0].h.requires_grad


def test_missing_entries_are_named():
    _, state = random_state()
    sd = state.state_dict()
    del sd["banks.1.slot_keys"]
    with pytest.raises(ValueError, match="banks.1.slot_keys"):
        MemoryState.from_state_dict(sd)
