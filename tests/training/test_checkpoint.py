"""Checkpoint folders: atomic writes, pruning, damage detection."""

import json

import pytest
import torch

from mm_rec.loading import CHECKPOINTS
from mm_rec.training import checkpoint as ckpt


def write(run_dir, step, keep_last=2, fail=False):
    def shared(folder):
        ckpt.save_weights({"w": torch.ones(3)}, folder / ckpt.WEIGHTS)
        (folder / ckpt.MODEL_CONFIG).write_text("{}")
        (folder / ckpt.RECIPE).write_text("{}")
        torch.save({}, folder / ckpt.OPTIMIZER)
        if fail:
            raise OSError("disk full")
        torch.save({"step": step, "tokens_seen": 0}, folder / ckpt.TRAINER_STATE)

    def local(folder):
        torch.save({"rng": {}}, folder / ckpt.rank_file(0))

    return ckpt.save_checkpoint(run_dir, step, shared, local, keep_last)


def test_save_keeps_the_newest(tmp_path):
    for step in (1, 2, 3):
        path = write(tmp_path, step)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step_00000002", "step_00000003"]
    manifest = json.loads((path / ckpt.MANIFEST).read_text())
    assert manifest["step"] == 3 and set(manifest["files"]) == {p.name for p in path.iterdir()} - {ckpt.MANIFEST}
    assert ckpt.load_checkpoint(path).step == 3
    assert [p.name for p in (tmp_path / CHECKPOINTS).iterdir() if p.name.startswith(".")] == []


def test_a_failed_save_changes_nothing(tmp_path):
    write(tmp_path, 1)
    with pytest.raises(OSError):
        write(tmp_path, 2, fail=True)
    assert [p.name for p in (tmp_path / CHECKPOINTS).iterdir()] == ["step_00000001"]  # no leftovers
    assert ckpt.resolve_resume(tmp_path, "auto").step == 1


def test_damage_is_detected(tmp_path):
    good, bad = write(tmp_path, 1), write(tmp_path, 2)
    (bad / ckpt.TRAINER_STATE).write_bytes(b"garbage of another size")
    with pytest.raises(ckpt.CheckpointError, match="trainer_state.pt is 23 bytes, the manifest says"):
        ckpt.load_checkpoint(bad)
    warnings = []
    assert ckpt.resolve_resume(tmp_path, "auto", warn=warnings.append).path == good
    assert "skipping checkpoint" in warnings[0]
    (good / ckpt.MANIFEST).unlink()
    with pytest.raises(ckpt.CheckpointError, match="no readable manifest.json"):
        ckpt.load_checkpoint(good)
    assert ckpt.resolve_resume(tmp_path, "auto", warn=warnings.append) is None
    with pytest.raises(ckpt.CheckpointError, match="checkpoint not found"):
        ckpt.resolve_resume(tmp_path, str(tmp_path / "nope"))


def test_rank_files_regroup_for_another_number_of_processes(tmp_path):
    """local_state: the batch rows of every rank file (stream positions, carried memory state),
    joined in rank order and cut for the reading run; the rest is rank 0's."""
    def rank_file(rank):
        rows = torch.arange(2) + 2 * rank
        data = {key: rows.clone() for key in ("offset", "fresh", "row_start", "row_end", "passes")}
        memory = {"position": rows * 10, "banks.0.h": rows[:, None, None].float().expand(2, 3, 4).clone()}
        return {"rng": {"torch": torch.tensor([rank])}, "data": data, "memory_state": memory}

    files = [rank_file(0), rank_file(1)]
    checkpoint = ckpt.Checkpoint(tmp_path, 4, {}, {}, {"world_size": 2}, None, None, rank_files=files)
    one = ckpt.local_state(checkpoint, 0, 1)
    assert torch.equal(one["data"]["offset"], torch.arange(4)) and torch.equal(one["rng"]["torch"], torch.tensor([0]))
    assert torch.equal(one["memory_state"]["position"], torch.arange(4) * 10)
    assert torch.equal(one["memory_state"]["banks.0.h"][:, 0, 0], torch.arange(4).float())
    fourth = ckpt.local_state(checkpoint, 3, 4)
    assert torch.equal(fourth["data"]["row_end"], torch.tensor([3])) and fourth["memory_state"]["position"] == 30
    with pytest.raises(ckpt.CheckpointError, match="does not fit 3 process"):
        ckpt.local_state(checkpoint, 0, 3)
