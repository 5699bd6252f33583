"""A user's first week of mistakes and accidents: signals stop a run like Ctrl-C does, bad flags and
unwritable folders are one line with exit code 2, resume says what it found and what changed,
eval and generate fall back to the previous good checkpoint, and `mmrec bench` runs anywhere."""

import json
import math
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch
from test_cli import assert_one_line_error, run
from training.conftest import TINY, read_metrics

from mm_rec import MMRecConfig, MMRecModel
from mm_rec.data.tokenizers import ByteTokenizer
from mm_rec.loading import checkpoint_dir, list_checkpoints

SMALL = MMRecConfig(vocab_size=256, hidden_dim=16, num_layers=1, num_heads=2, ffn_dim=24, mem_dim=4, memory_size_M=4,
                    chunk_size=4)


def corpus(folder: Path) -> Path:
    path = folder / "corpus.txt"
    path.write_text(Path(random.__file__).read_text())
    return path


def mmrec(*argv, cwd=None, user=None, **kwargs) -> subprocess.Popen:
    """`python -m mm_rec ARGV` in a subprocess (as `user`, a uid, via setpriv: root ignores permissions)."""
    prefix = ["setpriv", f"--reuid={user}", f"--regid={user}", "--clear-groups"] if user is not None else []
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MPLCONFIGDIR": tempfile.gettempdir()}
    return subprocess.Popen(prefix + [sys.executable, "-m", "mm_rec", *map(str, argv)], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGUSR1])
def test_a_stop_signal_saves_a_checkpoint_and_exits_like_ctrl_c(tmp_path, signum):
    data = corpus(tmp_path)
    process = mmrec("train", "--data", data, "--max-steps", 100000, "--out", tmp_path / "run", "--set", *TINY,
                    "training.save_interval=100000", "training.eval_interval=100000")
    deadline = time.time() + 120
    while time.time() < deadline and not ((tmp_path / "run" / "metrics.jsonl").is_file()
                                          and len(read_metrics(tmp_path / "run")) >= 2):
        time.sleep(0.2)
    process.send_signal(signum)
    out, err = process.communicate(timeout=120)
    assert process.returncode == 130, err
    assert f"interrupted ({signum.name})" in out and "continue with --resume auto" in out
    (saved,) = list_checkpoints(tmp_path / "run")
    assert int(saved.name.split("_")[1]) == read_metrics(tmp_path / "run")[-1]["step"]  # the step it stopped at


@pytest.fixture
def model_folder(tmp_path):
    torch.manual_seed(0)
    MMRecModel(SMALL).save_pretrained(tmp_path / "model")
    ByteTokenizer().save(tmp_path / "model")
    return tmp_path / "model"


def test_bad_flags_are_one_line_before_anything_else(capsys, tmp_path, model_folder):
    data = corpus(tmp_path)
    code, _, err = run(capsys, "train", "--data", data, "--device", "gpu", "--out", tmp_path / "r", "--set", *TINY)
    assert_one_line_error(code, err, "unknown device 'gpu'")
    for flag, value, needle in (("--temperature", "nan", "temperature must be a finite number"),
                                ("--temperature", "inf", "temperature must be a finite number"),
                                ("--top-k", "0", "--top-k must be >= 1"), ("--top-p", "1.5", "--top-p must lie in"),
                                ("--max-new-tokens", "-1", "--max-new-tokens must be >= 0")):
        code, out, err = run(capsys, "generate", "--checkpoint", model_folder, "--prompt", "PROMPT", flag, value)
        assert_one_line_error(code, err, needle)
        assert out == ""  # checked before the prompt is echoed
    for flag, value in (("--seq-len", 0), ("--batch-size", 0), ("--max-tokens", -1)):
        code, _, err = run(capsys, "eval", "--checkpoint", model_folder, "--data", data, flag, value)
        assert_one_line_error(code, err, f"{flag} must be >=")
    (tmp_path / "list").mkdir()
    (tmp_path / "list" / "config.json").write_text("[1, 2]")
    for command in (["generate"], ["eval", "--data", data]):
        code, _, err = run(capsys, *command, "--checkpoint", tmp_path / "list")
        assert_one_line_error(code, err, "config.json must hold a JSON object")


def test_eval_and_generate_fall_back_to_the_previous_good_checkpoint(capsys, tmp_path):
    run_dir, data = tmp_path / "run", corpus(tmp_path)
    for step in (2, 4):
        torch.manual_seed(step)
        MMRecModel(SMALL).save_pretrained(checkpoint_dir(run_dir, step))
        ByteTokenizer().save(checkpoint_dir(run_dir, step))
    weights = checkpoint_dir(run_dir, 4) / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # an interrupted copy
    code, out, err = run(capsys, "eval", "--checkpoint", run_dir, "--data", data, "--max-tokens", 300)
    assert code == 0 and "skipping" in err and "step_00000004" in err
    assert out.startswith(str(checkpoint_dir(run_dir, 2)))
    code, out, err = run(capsys, "generate", "--checkpoint", run_dir, "--max-new-tokens", 5, "--prompt", "x")
    assert code == 0 and "skipping" in err and out.startswith("x")
    code, _, err = run(capsys, "generate", "--checkpoint", checkpoint_dir(run_dir, 4))  # named: no fallback
    assert_one_line_error(code, err, "could not load weights")


def test_resume_says_what_it_found_and_what_changed(capsys, tmp_path):
    data, out_dir = corpus(tmp_path), tmp_path / "run"
    args = ["train", "--data", data, "--out", out_dir, "--resume", "auto"]
    code, out, err = run(capsys, *args, "--max-steps", 2, "--set", *TINY, "training.save_interval=2")
    assert code == 0, err
    assert f"--resume auto: no checkpoint in {out_dir / 'checkpoints'}; starting a new run" in out
    code, out, err = run(capsys, *args, "--max-steps", 4, "--set", *TINY, "training.save_interval=2",
                         "training.lr=5e-3", "training.warmup_steps=1")
    assert code == 0, err
    line = next(line for line in out.splitlines() if "changed" in line)
    assert "training.lr: 0.002 -> 0.005" in line and "training.warmup_steps: 2 -> 1" in line
    assert "apply from step 3" in line
    rows = [r for r in read_metrics(out_dir) if "lr" in r]
    # step 3 runs at the new peak (warmup over): 5e-3 on the cosine of lr_decay_steps 50, min_lr 2e-4
    progress = (2 - 1) / (50 - 1)
    expected = 2e-4 + 0.5 * (5e-3 - 2e-4) * (1 + math.cos(math.pi * progress))
    assert rows[2]["step"] == 3 and rows[2]["lr"] == pytest.approx(expected, rel=1e-9)


@pytest.mark.skipif(shutil.which("setpriv") is None and os.geteuid() == 0, reason="root ignores permissions")
def test_read_only_folders_are_one_line_errors():
    """train --out and plot --out into a folder the user cannot write (run as nobody when we are root)."""
    root = Path(tempfile.mkdtemp())
    try:
        root.chmod(0o755)
        data = corpus(root)
        metrics = root / "run"
        metrics.mkdir()
        (metrics / "metrics.jsonl").write_text(json.dumps(dict(step=1, loss=5.0, lr=1e-3)) + "\n")
        locked = root / "locked"
        locked.mkdir(mode=0o555)
        locked.chmod(0o555)
        user = 65534 if os.geteuid() == 0 else None
        for argv in (["train", "--data", data, "--max-steps", 1, "--out", locked / "run", "--set", *TINY],
                     ["plot", metrics, "--out", locked / "loss.png"]):
            process = mmrec(*argv, cwd=root, user=user)
            out, err = process.communicate(timeout=300)
            if argv[0] == "plot" and "matplotlib" in err and process.returncode == 1:
                continue  # no matplotlib here
            lines = err.strip().splitlines()
            assert process.returncode == 2 and "Traceback" not in err, err
            assert lines[-1].startswith(f"mmrec {argv[0]}: error: ") and "Permission denied" in lines[-1], err
    finally:
        shutil.rmtree(root, ignore_errors=True)


def test_plot_prints_the_path_it_wrote(capsys, tmp_path):
    pytest.importorskip("matplotlib")
    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(dict(step=s, loss=5.0 - s / 10, lr=1e-3))
                                                      for s in range(1, 6)) + "\n")
    code, out, err = run(capsys, "plot", tmp_path, "--out", tmp_path / "curves.png")
    assert code == 0, err
    assert out.strip() == f"wrote {tmp_path / 'curves.png'}" and (tmp_path / "curves.png").is_file()


def test_bench_runs_outside_a_checkout(tmp_path):
    """The benchmark is part of the package: no benchmarks/ folder is needed."""
    process = mmrec("bench", "--steps", 1, "--batch", 1, "--seq", 8, "--threads", 1, cwd=tmp_path)
    out, err = process.communicate(timeout=300)
    assert process.returncode == 0, err
    assert "| MM-Rec tiny (exact recurrence) |" in out and "| Transformer baseline (same sizes) |" in out
