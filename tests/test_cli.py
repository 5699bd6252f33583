"""The `mmrec` command line: every subcommand's --help, info, eval, generate, plot, and invariant I9
for training input (bad input is refused in one line with exit code 2, nothing is lost)."""

import array
import contextlib
import inspect
import io
import json
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from training.conftest import TINY, read_metrics

from mm_rec import MMRecConfig, MMRecModel
from mm_rec.cli import main
from mm_rec.loading import CHECKPOINTS
from mm_rec.training import checkpoint as ckpt

COMMANDS = ["train", "eval", "generate", "info", "plot", "inspect"]


def run(capsys, *argv):
    """main(argv) in-process: (exit code, stdout, stderr)."""
    try:
        code = main([str(a) for a in argv])
    except SystemExit as exit_:  # argparse: --help, usage errors
        code = exit_.code
    out, err = capsys.readouterr()
    return code, out, err


def train_args(data, out, steps=4, *extra):
    return ["train", "--data", data, "--seed", 0, "--max-steps", steps, "--out", out, *extra, "--set", *TINY,
            "training.save_interval=2"]


def assert_one_line_error(code, err, *needles):
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mmrec "), err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], lines[0]


@pytest.fixture(scope="module")
def pristine_run(tmp_path_factory):
    """One 4-step run (checkpoints at steps 2 and 4), trained once for this module."""
    root = tmp_path_factory.mktemp("cli")
    data = root / "corpus.txt"
    data.write_text(Path(random.__file__).read_text() + Path(inspect.__file__).read_text()[:12000])
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()) as err:
        assert main([str(a) for a in train_args(data, root / "run")]) == 0, err.getvalue()
    return root / "run", data


@pytest.fixture
def text_file(pristine_run):
    return pristine_run[1]


@pytest.fixture
def trained(pristine_run, tmp_path):
    """A copy of the pristine run that a test may damage."""
    return Path(shutil.copytree(pristine_run[0], tmp_path / "run"))


# ---------------------------------------------------------------------- help and plumbing
@pytest.mark.parametrize("command", COMMANDS)
def test_every_subcommand_has_help(capsys, command):
    code, out, _ = run(capsys, command, "--help")
    assert code == 0 and out.startswith("usage: mmrec " + command)


def test_python_dash_m_is_mmrec():
    done = subprocess.run([sys.executable, "-m", "mm_rec", "--help"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and "mmrec train" in done.stdout


def test_info_counts_parameters_per_component(capsys):
    code, out, _ = run(capsys, "info", "--preset", "7b")
    assert code == 0
    with torch.device("meta"):
        count = MMRecModel(MMRecConfig.from_preset("7b")).num_parameters()
    assert f"{count:,} parameters" in out
    for part in ("embeddings", "in_proj", "MDI decay", "W_g", "HDS", "short convolution", "memory integration",
                 "out_proj", "FFN (SwiGLU)", "norms", "total", "num_hds_levels=3", "delta_memory", "window_keys",
                 "forward cost per token"):
        assert part in out
    code, out, _ = run(capsys, "info", "--config", Path(__file__).parents[1] / "configs" / "tiny.yaml")
    assert code == 0 and f"{MMRecModel(MMRecConfig.from_preset('tiny')).num_parameters():,} parameters" in out


def test_print_config_applies_overrides(capsys):
    code, out, _ = run(capsys, "train", "--print-config", "--max-steps", 7, "--data", "x.txt",
                       "--set", "training.lr=1e-3", "model.num_layers=2")
    assert code == 0
    assert "max_steps: 7" in out and "lr: 0.001" in out and "num_layers: 2" in out and "path: x.txt" in out


# ---------------------------------------------------------------------- eval, generate, plot
def test_eval_prints_loss_perplexity_and_bits_per_byte(trained, text_file, capsys):
    code, out, err = run(capsys, "eval", "--checkpoint", trained, "--data", text_file, "--max-tokens", 3000)
    assert code == 0, err
    assert "loss " in out and "perplexity " in out and "bits per byte " in out
    code, out, err = run(capsys, "eval", "--checkpoint", trained)  # the validation split of its training data
    assert code == 0 and "validation split" in out, err


def test_generate_is_seeded(trained, capsys):
    args = ["generate", "--checkpoint", trained, "--prompt", "def ", "--max-new-tokens", 30, "--seed", 0]
    first, second = run(capsys, *args), run(capsys, *args)
    assert first[0] == 0 and first[1].startswith("def ") and first[1] == second[1]
    assert run(capsys, *args[:-1], 1)[1] != first[1]


def test_generate_a_file_of_prompts_in_batches_with_stop_strings(trained, tmp_path, capsys):
    """--prompts-file: one JSON line per prompt, in order; batched rows of different lengths generate
    what each prompt does alone (greedy); --stop cuts each row at its first stop string."""
    prompts = ["def ", "import os", "", "class A(object):", "x"]
    (tmp_path / "prompts.txt").write_text("\n".join(prompts) + "\n")
    greedy = ["--max-new-tokens", 25, "--temperature", 0]
    alone = []
    for prompt in prompts:
        code, out, err = run(capsys, "generate", "--checkpoint", trained, "--prompt", prompt, *greedy)
        assert code == 0, err
        alone.append(out[len(prompt or ""):-1])  # the prompt echoed first, a newline last
    code, out, err = run(capsys, "generate", "--checkpoint", trained, "--prompts-file", tmp_path / "prompts.txt",
                         "--batch-size", 2, *greedy)
    assert code == 0, err
    rows = [json.loads(line) for line in out.splitlines()]
    assert [r["prompt"] for r in rows] == prompts
    assert [r["completion"] for r in rows] == alone and {r["finish"] for r in rows} == {"length"}
    stop = alone[0][4:6]
    code, out, err = run(capsys, "generate", "--checkpoint", trained, "--prompts-file", tmp_path / "prompts.txt",
                         "--batch-size", 3, "--stop", stop.replace("\n", "\\n"), "--stop", "never!", *greedy)
    assert code == 0, err
    for row, text in zip((json.loads(line) for line in out.splitlines()), alone):
        cut = text.find(stop)
        assert row["completion"] == (text if cut < 0 else text[:cut])
        assert row["finish"] == ("length" if cut < 0 else "stop")
    code, out, err = run(capsys, "generate", "--checkpoint", trained, "--prompt", prompts[0], "--stop", stop, *greedy)
    assert code == 0 and out == prompts[0] + alone[0][:alone[0].find(stop)] + "\n", err


def test_plot(trained, capsys, tmp_path):
    pytest.importorskip("matplotlib")
    code, out, _ = run(capsys, "plot", trained, "--out", tmp_path / "loss.png")
    assert code == 0 and (tmp_path / "loss.png").stat().st_size > 1000


# ---------------------------------------------------------------------- I9: bad input
def test_missing_and_empty_data(tmp_path, capsys):
    assert_one_line_error(*run(capsys, *train_args(tmp_path / "nope.txt", tmp_path / "r"))[::2], "data not found")
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    assert_one_line_error(*run(capsys, *train_args(empty, tmp_path / "r"))[::2], "no text")
    (tmp_path / "emptydir").mkdir()
    assert_one_line_error(*run(capsys, *train_args(tmp_path / "emptydir", tmp_path / "r"))[::2], "no text files")
    small = tmp_path / "small.txt"
    small.write_text("tiny")
    assert_one_line_error(*run(capsys, *train_args(small, tmp_path / "r"))[::2], "seq_len")
    assert not (tmp_path / "r" / "checkpoints").exists()


def test_unknown_config_keys(text_file, tmp_path, capsys):
    assert_one_line_error(*run(capsys, *train_args(text_file, tmp_path / "r"), "training.lrate=1")[::2],
                          "unknown key(s) ['lrate']")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("model:\n  preset: tiny\n  hidden_size: 64\n")
    assert_one_line_error(*run(capsys, "train", "--config", recipe, "--data", text_file)[::2], "hidden_size")
    assert_one_line_error(*run(capsys, "train", "--config", tmp_path / "missing.yaml")[::2], "config file not found")


def test_token_ids_out_of_range(trained, tmp_path, capsys):
    tokens = tmp_path / "tokens.bin"
    tokens.write_bytes(array.array("H", list(range(200)) * 10 + [999]).tobytes())
    assert_one_line_error(*run(capsys, *train_args(tokens, tmp_path / "r"))[::2], "token id 999", "vocab")
    assert_one_line_error(*run(capsys, "eval", "--checkpoint", trained, "--data", tokens)[::2], "token id 999")


def test_checkpoint_that_does_not_match(trained, text_file, capsys):
    for override, needle in (("model.vocab_size=300", "vocabulary"), ("model.hidden_dim=64", "hidden_dim"),
                             ("training.batch_size=2", "batch_size")):
        code, _, err = run(capsys, *train_args(text_file, trained, 6), "--resume", "auto", "--set", override)
        assert_one_line_error(code, err, needle)
    other = trained.parent / "other.txt"
    other.write_text(text_file.read_text()[::-1])
    assert_one_line_error(*run(capsys, *train_args(other, trained, 6), "--resume", "auto")[::2], "data changed")
    assert [p.name for p in ckpt.list_checkpoints(trained)] == ["step_00000002", "step_00000004"]  # untouched
    assert_one_line_error(*run(capsys, *train_args(text_file, trained, 6))[::2], "--resume auto")


def test_truncated_checkpoint_falls_back_to_the_previous_one(trained, text_file, capsys):
    latest = ckpt.list_checkpoints(trained)[-1]
    weights = latest / ckpt.WEIGHTS
    weights.write_bytes(weights.read_bytes()[:-100])
    # an explicit path to the damaged checkpoint: a clear error, nothing written
    code, _, err = run(capsys, *train_args(text_file, trained, 6), "--resume", latest)
    assert_one_line_error(code, err, "damaged", "model.safetensors")
    code, _, err = run(capsys, "eval", "--checkpoint", latest, "--data", text_file)
    assert_one_line_error(code, err, "model.safetensors")
    # --resume auto: warns, resumes from step 2, rewrites step 4 completely, goes on to 6
    code, out, err = run(capsys, *train_args(text_file, trained, 6), "--resume", "auto")
    assert code == 0, err
    assert "skipping checkpoint" in out and "resumed from" in out and "step_00000002" in out
    assert [r["step"] for r in read_metrics(trained) if "loss" in r] == [1, 2, 3, 4, 5, 6]
    for path in ckpt.list_checkpoints(trained):
        ckpt.load_checkpoint(path)  # every checkpoint left is complete


def test_interrupted_save_leaves_no_half_written_checkpoint(trained, text_file, capsys, monkeypatch):
    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(ckpt, "save_weights", crash)
    with pytest.raises(OSError):
        main([str(a) for a in train_args(text_file, trained, 6)] + ["--resume", "auto"])
    capsys.readouterr()
    names = [p.name for p in (trained / CHECKPOINTS).iterdir()]
    assert "step_00000006" not in names and {"step_00000002", "step_00000004"} <= set(names)
    assert ckpt.resolve_resume(trained, "auto").step == 4


def test_generate_bad_input(trained, tmp_path, capsys):
    assert_one_line_error(*run(capsys, "generate", "--checkpoint", tmp_path / "none", "--prompt", "x")[::2],
                          "not found")
    assert_one_line_error(*run(capsys, "generate", "--checkpoint", trained, "--max-new-tokens", -1)[::2],
                          "max-new-tokens")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a\nb\n")
    for extra, needle in ((["--prompt", "x", "--prompts-file", prompts], "not both"),
                          (["--prompts-file", tmp_path / "missing.txt"], "not found"),
                          (["--prompts-file", prompts, "--batch-size", 0], "--batch-size"),
                          (["--stop", ""], "--stop"), (["--top-p", 1.5], "--top-p"), (["--top-k", 0], "--top-k"),
                          (["--temperature", -1], "--temperature")):
        code, out, err = run(capsys, "generate", "--checkpoint", trained, *extra)
        assert_one_line_error(code, err, needle)
        assert out == ""  # refused before any output
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "latin1.txt").write_bytes("grüße\n".encode("latin-1"))
    assert_one_line_error(*run(capsys, "generate", "--checkpoint", trained, "--prompts-file",
                               tmp_path / "empty.txt")[::2], "empty")
    assert_one_line_error(*run(capsys, "generate", "--checkpoint", trained, "--prompts-file",
                               tmp_path / "latin1.txt")[::2], "UTF-8")
    other = tmp_path / "other_config"
    shutil.copytree(ckpt.list_checkpoints(trained)[-1], other)
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "hidden_dim": 64}))
    assert_one_line_error(*run(capsys, "generate", "--checkpoint", other, "--prompt", "x")[::2], "could not load")


def test_nonfinite_run_exits_with_1(text_file, tmp_path, capsys, monkeypatch):
    from mm_rec.training import trainer

    build = trainer.build_model

    def poisoned(*args):
        model = build(*args)
        model.embed.register_forward_hook(lambda m, args, out: out * float("inf"))
        return model

    monkeypatch.setattr(trainer, "build_model", poisoned)
    code, out, err = run(capsys, *train_args(text_file, tmp_path / "r", 10), "training.max_nonfinite_steps=2")
    assert code == 1 and "2 non-finite steps in a row" in err and "--debug" in err


def test_resume_auto_needs_the_run_folder(capsys):
    assert_one_line_error(*run(capsys, "train", "--resume", "auto")[::2], "--resume auto needs --out")


def test_resume_without_config_uses_the_runs_recipe(trained, capsys):
    code, out, err = run(capsys, "train", "--out", trained, "--resume", "auto", "--max-steps", 5)
    assert code == 0, err
    assert "resumed from" in out and [r["step"] for r in read_metrics(trained) if "loss" in r] == [1, 2, 3, 4, 5]
    checkpoint = ckpt.list_checkpoints(trained)[0]
    code, out, err = run(capsys, "train", "--resume", checkpoint, "--max-steps", 3)  # rewind to step 2, out inferred
    assert code == 0 and f"resumed from {checkpoint}" in out, err
    assert [p.name for p in ckpt.list_checkpoints(trained)] == ["step_00000002", "step_00000003"]  # one timeline


def test_small_byte_vocabulary_for_ascii_text(tmp_path, capsys):
    ascii_text = tmp_path / "ascii.txt"
    ascii_text.write_text("the quick brown fox jumps over the lazy dog\n" * 100)
    code, _, err = run(capsys, *train_args(ascii_text, tmp_path / "r", 2), "model.vocab_size=128")
    assert code == 0, err
    code, out, err = run(capsys, "generate", "--checkpoint", tmp_path / "r", "--prompt", "fox", "--max-new-tokens", 5)
    assert code == 0 and out.startswith("fox"), err
    code, out, err = run(capsys, "generate", "--checkpoint", tmp_path / "r", "--prompt", "fuchs ü")
    assert_one_line_error(code, err, "token ids must lie in [0, 128)")
    assert out == ""  # nothing printed before the refusal
    latin = tmp_path / "latin.txt"
    latin.write_text("grüße " * 200)
    assert_one_line_error(*run(capsys, *train_args(latin, tmp_path / "r2", 2), "model.vocab_size=128")[::2],
                          "token id 195")
