"""MemoryState: round trip, detach, per-row reset, validation."""

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


def test_reset_zeroes_only_masked_rows():
    _, state = random_state()
    before = state.clone()
    state.reset(torch.tensor([False, True, False]))
    for key, value in state.state_dict().items():
        old = before.state_dict()[key]
        assert torch.equal(value[[0, 2]], old[[0, 2]])
        assert value[1].abs().sum() == 0


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
