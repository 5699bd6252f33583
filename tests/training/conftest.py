"""Shared fixtures: a tiny model (through --set overrides) and small text files from the stdlib."""

import inspect
import json
import random
import textwrap
from pathlib import Path

import pytest

# A ~20K-parameter MM-Rec and short windows: a training step takes milliseconds on a CPU.
TINY = ["model.num_layers=1", "model.hidden_dim=32", "model.num_heads=2", "model.ffn_dim=64", "model.mem_dim=8",
        "model.memory_size_M=4", "model.chunk_size=8", "training.seq_len=32", "training.batch_size=4",
        "training.eval_tokens=1024", "training.eval_interval=5", "training.sample_tokens=0",
        "training.tensorboard=false", "training.warmup_steps=2", "training.lr_decay_steps=50"]


def read_metrics(run_dir) -> list[dict]:
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture
def text_file(tmp_path) -> Path:
    """~45 KB of Python source (always present: the random and inspect modules)."""
    path = tmp_path / "corpus.txt"
    path.write_text(Path(random.__file__).read_text() + Path(inspect.__file__).read_text()[:12000])
    return path


@pytest.fixture
def text_folder(tmp_path) -> Path:
    folder = tmp_path / "docs"
    (folder / "sub").mkdir(parents=True)
    (folder / "a.txt").write_text(textwrap.dedent(Path(random.__file__).read_text()[:6000]))
    (folder / "sub" / "b.txt").write_text(Path(inspect.__file__).read_text()[:9000])
    (folder / "c.txt").write_text("x")  # a one-token document: no target, skipped by the batcher
    (folder / ".hidden").write_text("not read")
    return folder
