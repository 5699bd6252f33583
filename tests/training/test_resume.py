"""Invariant I6 through the command line: 2N steps in one run = N steps, then `--resume auto` in a
fresh process for N more; the same losses bit for bit on CPU, with carry_state on and off.

The uninterrupted run and the first N steps run in this process (through `mmrec.cli.main`, as
the command would), the resumed half in a fresh `python -m mm_rec` process with the same
number of threads."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mm_rec.cli import main

from .conftest import TINY, read_metrics

REPO = Path(__file__).resolve().parents[2]
N = 4


def train_args(data, out, steps, carry):
    return ["train", "--config", str(REPO / "configs" / "tiny.yaml"), "--data", str(data), "--seed", "0",
            "--max-steps", str(steps), "--out", str(out),
            "--set", *TINY, f"data.carry_state={carry}", "training.eval_interval=2", "training.save_interval=3"]


@pytest.mark.parametrize("carry", ["true", "false"])
def test_resume_in_a_fresh_process_is_bit_exact(text_file, tmp_path, carry, capsys):
    assert main(train_args(text_file, tmp_path / "one", 2 * N, carry)) == 0
    assert main(train_args(text_file, tmp_path / "two", N, carry)) == 0
    capsys.readouterr()
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}
    resumed = subprocess.run([sys.executable, "-m", "mm_rec", *train_args(text_file, tmp_path / "two", 2 * N, carry),
                              "--resume", "auto"], capture_output=True, text=True, cwd=REPO, env=env, timeout=120)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resumed from {tmp_path / 'two' / 'checkpoints' / f'step_{N:08d}'}" in resumed.stdout

    def rows(run):  # training rows, and evaluations at eval_interval (a run ending at N also evaluates there)
        return [{k: v for k, v in r.items() if k not in ("tokens_per_s", "elapsed_s")}
                for r in read_metrics(tmp_path / run) if "loss" in r or r["step"] % 2 == 0]

    one, two = rows("one"), rows("two")
    assert [r["loss"] for r in one if "loss" in r] == [r["loss"] for r in two if "loss" in r]
    assert one == two and len([r for r in one if "loss" in r]) == 2 * N
