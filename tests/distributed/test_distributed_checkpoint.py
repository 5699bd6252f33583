"""Distributed checkpoints in one process: round trip, atomic replacement, refusal of a partial save.
(Resuming on another number of processes is tested in test_parallel.py.)"""

import pytest
import torch

from mm_rec import MMRecConfig, MMRecModel
from mm_rec.distributed import load_distributed_checkpoint, save_distributed_checkpoint

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")  # no group: one process, on purpose


def trained_model(seed: int):
    torch.manual_seed(seed)
    model = MMRecModel(MMRecConfig.from_preset("tiny", num_layers=1))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ids = torch.randint(0, 256, (2, 16))
    model(ids, labels=ids).loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    return model, optimizer


def test_round_trip_restores_model_optimizer_and_extra(tmp_path):
    model, optimizer = trained_model(0)
    rng = torch.get_rng_state()
    save_distributed_checkpoint(tmp_path / "ckpt", model, optimizer, extra={"step": 7, "rng": rng})
    fresh, fresh_optimizer = trained_model(1)
    extra = load_distributed_checkpoint(tmp_path / "ckpt", fresh, fresh_optimizer)
    assert extra["step"] == 7 and torch.equal(extra["rng"], rng)
    for (name, p), q in zip(model.state_dict().items(), fresh.state_dict().values()):
        assert torch.equal(p, q), name
    saved, loaded = optimizer.state_dict()["state"], fresh_optimizer.state_dict()["state"]
    for key in saved:
        for field in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(saved[key][field], loaded[key][field])


def test_save_replaces_an_existing_checkpoint_and_leaves_no_partial(tmp_path):
    first, _ = trained_model(0)
    second, _ = trained_model(1)
    save_distributed_checkpoint(tmp_path / "ckpt", first)
    save_distributed_checkpoint(tmp_path / "ckpt", second)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
    loaded, _ = trained_model(2)
    load_distributed_checkpoint(tmp_path / "ckpt", loaded)
    assert torch.equal(loaded.embed.weight, second.embed.weight)


def test_an_incomplete_checkpoint_is_refused(tmp_path):
    (tmp_path / "ckpt.partial").mkdir()
    model, _ = trained_model(0)
    with pytest.raises(FileNotFoundError, match="not a complete distributed checkpoint"):
        load_distributed_checkpoint(tmp_path / "ckpt.partial", model)


def test_a_checkpoint_of_another_model_is_a_value_error(tmp_path):
    model, _ = trained_model(0)
    save_distributed_checkpoint(tmp_path / "ckpt", model)
    other = MMRecModel(MMRecConfig.from_preset("tiny", num_layers=1, hidden_dim=64, num_heads=2))
    with pytest.raises(ValueError, match="does not fit the model .*Size mismatch"):
        load_distributed_checkpoint(tmp_path / "ckpt", other)
