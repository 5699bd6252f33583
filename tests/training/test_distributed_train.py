"""`mmrec train --parallel fsdp` under torchrun: two CPU processes (gloo), a save, a resume in a
new launch, and a checkpoint that one process can evaluate, with the weights stored unsharded
(checkpoint_format full) or as each process's shards (sharded). Two processes of batch_size B
train like one process of batch_size 2B, and a run moves between the two at a checkpoint.
`--parallel sp` (sequence parallelism) gives the losses of one process, and resumes."""

import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from mm_rec.cli import main

from .conftest import TINY, read_metrics

REPO = Path(__file__).resolve().parents[2]


def torchrun_train(data, out, steps, *extra, parallel="fsdp",
                   settings=("training.save_interval=2", "training.sample_tokens=8")):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "mm_rec",
           "train", "--parallel", parallel, "--data", str(data), "--max-steps", str(steps), "--out", str(out), *extra,
           "--set", *TINY, "model.num_layers=2", *settings]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    return done.stdout


@pytest.mark.slow
def test_fsdp_training_resumes_and_saves_full_weights(text_file, tmp_path, capsys):
    out = torchrun_train(text_file, tmp_path / "run", 2)
    assert out.count("run folder:") == 1  # only rank 0 reports
    out = torchrun_train(text_file, tmp_path / "run", 4, "--resume", "auto")
    assert "resumed from" in out and "step_00000002" in out
    assert [r["step"] for r in read_metrics(tmp_path / "run") if "loss" in r] == [1, 2, 3, 4]
    assert main(["eval", "--checkpoint", str(tmp_path / "run"), "--max-tokens", "500"]) == 0
    assert "bits per byte" in capsys.readouterr().out


@pytest.mark.slow
def test_fsdp_sharded_checkpoints_resume_and_evaluate_in_one_process(text_file, tmp_path, capsys):
    """training.checkpoint_format=sharded: each process writes its own shards (nothing gathered),
    the next launch resumes from them, and one process reshards them to evaluate."""
    sharded = ["--set", "training.checkpoint_format=sharded"]
    torchrun_train(text_file, tmp_path / "run", 2, *sharded)
    first = tmp_path / "run" / "checkpoints" / "step_00000002"
    assert sorted(p.name for p in (first / "sharded").glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    assert not (first / "model.safetensors").exists()
    out = torchrun_train(text_file, tmp_path / "run", 4, "--resume", "auto", *sharded)
    assert "resumed from" in out and "step_00000002" in out
    assert [r["step"] for r in read_metrics(tmp_path / "run") if "loss" in r] == [1, 2, 3, 4]
    assert main(["eval", "--checkpoint", str(tmp_path / "run"), "--max-tokens", "500"]) == 0
    assert "bits per byte" in capsys.readouterr().out


@pytest.mark.slow
@pytest.mark.parametrize("carry_state", [True, False])
def test_sequence_parallel_training_gives_the_losses_of_one_process_and_resumes(text_file, tmp_path, carry_state):
    """Each row of 36 tokens is cut into two parts of 18 (not whole blocks of 8). With carry_state the
    last process hands the state to rank 0 for the next batch, rank 0's checkpoint file carries it and
    a resumed launch continues with it; without, every process draws the same random windows."""
    settings = ["training.seq_len=36", f"data.carry_state={str(carry_state).lower()}", "training.save_interval=2",
                "training.sample_tokens=8"]
    steps = 6 if carry_state else 4
    one = ["train", "--data", str(text_file), "--max-steps", str(steps), "--out", str(tmp_path / "one"),
           "--set", *TINY, "model.num_layers=2", "training.sample_tokens=0", *settings]
    assert main(one) == 0
    torchrun_train(text_file, tmp_path / "sp", 4, parallel="sp", settings=settings)
    if carry_state:
        out = torchrun_train(text_file, tmp_path / "sp", 6, "--resume", "auto", parallel="sp", settings=settings)
        assert "resumed from" in out and "step_00000004" in out

    def losses(run):
        return {r["step"]: r["loss"] for r in read_metrics(tmp_path / run) if "loss" in r}

    reference, parallel = losses("one"), losses("sp")
    assert sorted(parallel) == list(range(1, steps + 1))
    for step, loss in reference.items():
        assert abs(parallel[step] - loss) / loss < 1e-5, (step, parallel[step], loss)
    assert reference[steps] != reference[1]


# ---------------------------------------------------------------------- one global batch, any number of processes
N = 3  # steps before and after the checkpoint
# sharded checkpoints at N; evaluations at N and 2N (the validation rows are split over the processes too)
SETTINGS = ("training.save_interval=3", "training.eval_interval=3", "training.checkpoint_format=sharded")


def whole_batch(batch_size):  # the global batch is 4 rows: one process of 4 or two of 2
    return (*SETTINGS, f"training.batch_size={batch_size}")


def one_process_args(data, out, steps):
    return ["train", "--parallel", "none", "--data", str(data), "--max-steps", str(steps), "--out", str(out),
            "--set", *TINY, "model.num_layers=2", *whole_batch(4)]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """2N steps in one process with the whole batch, saving at N: (data, run folder). The data are
    short documents, so rows reach document ends (padding, label -100) from the first steps on and
    the processes hold different numbers of labelled tokens."""
    root = tmp_path_factory.mktemp("uninterrupted")
    data = root / "docs"
    data.mkdir()
    text = Path(random.__file__).read_text()
    for i in range(40):
        (data / f"{i:02d}.txt").write_text(text[i * 997:i * 997 + 120 + 23 * i])
    assert main(one_process_args(data, root / "run", 2 * N)) == 0
    return data, root / "run"


def assert_same_run(run, reference):
    """Equal metrics rows up to float32 rounding. Two processes differ from one only in the order
    of float32 sums: each process's loss is a mean over its own rows, FSDP adds the processes'
    gradients (reduce-scatter) where one process sums over the whole batch at once. That rounding
    (~1e-7 relative per step, fp32's epsilon being 6e-8) is carried on by AdamW: measured at most
    2e-7 in the losses and 7e-7 in the gradient norms over 8 steps. A different batch, a loss
    normalised per process or a misplaced row of the carried state differ by 1e-4 or more."""
    rows, expected = read_metrics(run), read_metrics(reference)
    assert [sorted(r) for r in rows] == [sorted(r) for r in expected]
    for row, want in zip(rows, expected):
        for key, value in want.items():
            if key in ("tokens_per_s", "elapsed_s"):
                continue
            tolerance = 1e-5 if key == "grad_norm" else 2e-6
            assert row[key] == pytest.approx(value, rel=tolerance, abs=0), (key, row, want)


@pytest.mark.slow
def test_two_processes_train_as_one_and_their_sharded_checkpoint_resumes_in_one(uninterrupted, tmp_path):
    data, reference = uninterrupted
    torchrun_train(data, tmp_path / "run", N, settings=whole_batch(2))
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints" / f"step_{N:08d}" / "sharded").glob("*.distcp")
                  ) == ["__0_0.distcp", "__1_0.distcp"]
    assert main(one_process_args(data, tmp_path / "run", 2 * N) + ["--resume", "auto"]) == 0
    assert_same_run(tmp_path / "run", reference)


@pytest.mark.slow
def test_a_sharded_checkpoint_of_one_process_resumes_in_two(uninterrupted, tmp_path):
    data, reference = uninterrupted
    shutil.copytree(reference, tmp_path / "run")
    torchrun_train(data, tmp_path / "run", 2 * N, "--resume", str(tmp_path / "run" / "checkpoints" / f"step_{N:08d}"),
                   settings=whole_batch(2))
    assert_same_run(tmp_path / "run", reference)
