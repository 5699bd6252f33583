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
