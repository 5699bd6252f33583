"""Passkey: the key sits where the generator says, depth is honoured, seeds decide everything, and
the scorer gives 1.0 to an oracle, chance to a constant, and the same accuracy in both modes."""

import argparse
import json
import random

import pytest
import torch
from safetensors.torch import load_file

from mm_rec import MMRecConfig, MMRecModel
from mm_rec.baselines.transformer import TransformerModel
from mm_rec.cli.tasks import add_eval_task_arguments, run_eval_task
from mm_rec.evaluation.passkey import (
    FILLER_SENTENCES,
    INTRO,
    NEEDLE,
    QUESTION,
    make_passkey_batch,
    min_length,
    passkey_grid,
    score_passkey,
)
from mm_rec.evaluation.scoring import logits_at

NEEDLE_TAIL = NEEDLE[NEEDLE.index("{key}") + len("{key}"):]  # text between the key and the rest of the filler
LONGEST_SENTENCE = max(len(s) for s in FILLER_SENTENCES) + 1


def tiny_model() -> MMRecModel:
    return MMRecModel(MMRecConfig(vocab_size=256, hidden_dim=32, num_layers=2, num_heads=2, ffn_dim=64,
                                  num_memories=2, mem_dim=8, memory_size_M=8, chunk_size=16))


def text(row: torch.Tensor) -> str:
    return bytes(row.tolist()).decode("utf-8")


@pytest.mark.parametrize("length,depth,digits", [(min_length(5), 0.5, 5), (300, 0.0, 5), (1000, 0.37, 3),
                                                 (4096, 1.0, 7), (777, None, 5)])
def test_key_is_where_the_generator_says(length, depth, digits):
    batch = make_passkey_batch(length, 6, seed=2, depth=depth, num_digits=digits)
    assert batch.input_ids.shape == batch.labels.shape == (6, length + digits)
    assert batch.prompt_length == length
    assert torch.equal(batch.answer_positions[0], torch.arange(length - 1, length + digits - 1))
    for i, key in enumerate(batch.keys):
        row = batch.input_ids[i]
        prompt = text(row[:length])
        assert len(key) == digits and key[0] != "0" and key.isdigit()
        assert prompt.startswith(INTRO) and prompt.endswith(QUESTION)
        assert [c for c in prompt if c.isdigit()] == list(key)  # the key is the only number, once
        needle = batch.needle_positions[i].item()
        assert text(row[needle:needle + digits]) == key
        assert text(row[length:]) == key  # the answer follows the prompt
    assert torch.equal(batch.answers, batch.input_ids[:, length:])
    label_mask = batch.labels != -100
    assert label_mask.sum() == 6 * digits
    assert torch.equal(batch.labels[label_mask].view(6, digits), batch.input_ids[:, length:])


def test_depth_places_the_needle():
    length, digits = 3000, 5
    head = len(INTRO) + len(" The pass key is ")
    positions = []
    for depth in (0.0, 0.25, 0.5, 0.75, 1.0):
        batch = make_passkey_batch(length, 1, seed=9, depth=depth, num_digits=digits)
        needle = batch.needle_positions[0].item()
        filler = length - min_length(digits)
        placed = (needle - head) / filler  # fraction of the filler before the needle
        assert abs(placed - depth) <= LONGEST_SENTENCE / filler
        positions.append(needle)
    assert positions == sorted(positions) and len(set(positions)) == 5
    assert positions[0] - head < LONGEST_SENTENCE  # depth 0: at most one sentence after the intro
    question_start = length - len(QUESTION)
    assert positions[-1] + digits + len(NEEDLE_TAIL) == question_start  # depth 1: right before the question


def test_deterministic_by_seed():
    a, b = make_passkey_batch(500, 4, seed=1), make_passkey_batch(500, 4, seed=1)
    assert torch.equal(a.input_ids, b.input_ids) and a.keys == b.keys and a.depths == b.depths
    assert not torch.equal(a.input_ids, make_passkey_batch(500, 4, seed=2).input_ids)
    stream = random.Random(1)
    first, second = make_passkey_batch(500, 4, stream), make_passkey_batch(500, 4, stream)
    assert torch.equal(first.input_ids, a.input_ids) and not torch.equal(second.input_ids, a.input_ids)


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="too short"):
        make_passkey_batch(min_length(5) - 1, 1, seed=0)
    with pytest.raises(ValueError, match="depth"):
        make_passkey_batch(500, 1, seed=0, depth=1.5)
    with pytest.raises(ValueError, match="method"):
        score_passkey(torch.zeros(1, 505, 256), make_passkey_batch(500, 1, seed=0), method="beam")


def test_oracle_scores_one_and_constant_scores_chance():
    batch = make_passkey_batch(min_length(5), 2000, seed=4)
    oracle = torch.zeros(*batch.input_ids.shape, 256)
    oracle.scatter_(2, batch.labels.clamp_min(0)[..., None], 1.0)
    score = score_passkey(oracle, batch)
    assert score.accuracy == 1.0 and score.digit_accuracy == 1.0 and score.num_samples == 2000

    constant = torch.zeros(*batch.input_ids.shape, 256)
    constant[..., ord("7")] = 1.0
    score = score_passkey(constant, batch)
    expected = (1 / 9 + 4 / 10) / 5  # the first digit is never 0
    assert abs(score.digit_accuracy - expected) < 0.015
    assert score.accuracy <= 0.002


def test_greedy_and_teacher_forced_agree():
    """Replace each key by the model's own greedy continuation: both modes then score 1.0; change
    one digit after the first and both score that row as wrong."""
    torch.manual_seed(0)
    model = tiny_model().double()
    batch = make_passkey_batch(180, 4, seed=3, num_digits=4)
    L = batch.prompt_length
    continuation = model.generate(batch.input_ids[:, :L], 4, temperature=0.0)[:, L:]
    batch.input_ids[:, L:] = continuation
    batch.labels.scatter_(1, batch.answer_positions, continuation)
    for method in ("teacher_forced", "greedy"):
        assert score_passkey(model, batch, method, batch_size=3).accuracy == 1.0
    batch.input_ids[0, L + 2] = (batch.input_ids[0, L + 2] + 1) % 256
    batch.labels[0, L + 1] = batch.input_ids[0, L + 2]
    for method in ("teacher_forced", "greedy"):
        assert score_passkey(model, batch, method, batch_size=3).accuracy == 0.75


def test_grid_cells_are_independent_and_deterministic():
    model = tiny_model()
    small = passkey_grid(model, [180], [0.0, 1.0], num_samples=2, seed=5)
    both = passkey_grid(model, [180, 240], [0.0, 1.0], num_samples=2, seed=5)
    assert [(r["length"], r["depth"]) for r in both] == [(180, 0.0), (180, 1.0), (240, 0.0), (240, 1.0)]
    assert both[:2] == small
    assert all(0.0 <= r["accuracy"] <= r["digit_accuracy"] <= 1.0 and r["num_samples"] == 2 for r in both)


def test_cli_evaluates_a_checkpoint_and_trains(tmp_path, capsys):
    torch.manual_seed(0)
    tiny_model().save_pretrained(tmp_path / "model")
    parser = argparse.ArgumentParser()
    add_eval_task_arguments(parser)
    args = parser.parse_args(["--task", "passkey", "--checkpoint", str(tmp_path / "model"), "--lengths", "180,200",
                              "--depths", "0,1", "--samples", "2", "--out", str(tmp_path / "eval")])
    assert run_eval_task(args) == 0
    report = json.loads((tmp_path / "eval" / "passkey_results.json").read_text())
    assert [(r["length"], r["depth"]) for r in report["results"]] == [(180, 0.0), (180, 1.0), (200, 0.0), (200, 1.0)]
    assert report["curve"] is None and report["decode"] == "teacher_forced"

    args = parser.parse_args(["--task", "passkey", "--checkpoint", str(tmp_path / "model"), "--train", "--steps", "2",
                              "--train-length", "180", "--lengths", "180", "--depths", "0.5", "--samples", "2",
                              "--decode", "greedy", "--out", str(tmp_path / "trained")])
    assert run_eval_task(args) == 0
    report = json.loads((tmp_path / "trained" / "passkey_results.json").read_text())
    assert [p["step"] for p in report["curve"]] == [2] and report["train_length"] == 180
    assert (tmp_path / "trained" / "model.safetensors").is_file()
    assert "length" in capsys.readouterr().out

    # cut by its time budget after step 1, then --resume: the weights of the uninterrupted run above
    train = ["--task", "passkey", "--checkpoint", str(tmp_path / "model"), "--train", "--steps", "2", "--train-length",
             "180", "--lengths", "180", "--depths", "0.5", "--samples", "2", "--out", str(tmp_path / "cut")]
    assert run_eval_task(parser.parse_args(train + ["--time-budget", "1e-9"])) == 0
    assert [p["step"] for p in json.loads((tmp_path / "cut" / "passkey_results.json").read_text())["curve"]] == [1]
    assert run_eval_task(parser.parse_args(train + ["--resume"])) == 0
    assert [p["step"] for p in json.loads((tmp_path / "cut" / "passkey_results.json").read_text())["curve"]] == [1, 2]
    whole, resumed = (load_file(tmp_path / run / "model.safetensors") for run in ("trained", "cut"))
    assert whole.keys() == resumed.keys() and all(torch.equal(whole[k], resumed[k]) for k in whole)


def test_cli_changes_a_parameterless_setting_of_a_checkpoint(tmp_path, monkeypatch):
    # --set model.kept_age_bias=capped scores the same weights with the capped age bias; a setting
    # that changes the parameters, or a non-model key, is refused with one line.
    torch.manual_seed(0)
    tiny_model().save_pretrained(tmp_path / "model")
    seen = []
    monkeypatch.setattr("mm_rec.cli.tasks.passkey.passkey_grid", lambda model, *a, **k: seen.append(model) or [])
    parser = argparse.ArgumentParser()
    add_eval_task_arguments(parser)
    base = ["--task", "passkey", "--checkpoint", str(tmp_path / "model"), "--lengths", "180", "--set"]
    assert run_eval_task(parser.parse_args(base + ["model.kept_age_bias=capped"])) == 0
    model = seen[-1]
    assert model.config.kept_age_bias == "capped" and model.config.memory_size_M == tiny_model().config.memory_size_M
    saved = MMRecModel.from_pretrained(tmp_path / "model")
    for (name, p), q in zip(model.state_dict().items(), saved.state_dict().values()):
        assert torch.equal(p, q), name
    with pytest.raises(ValueError, match="changes the checkpoint's parameters"):
        run_eval_task(parser.parse_args(base + ["model.num_memories=4"]))
    with pytest.raises(ValueError, match="only model"):
        run_eval_task(parser.parse_args(base + ["passkey.samples=3"]))


def test_training_lengths_curriculum(tmp_path, monkeypatch):
    """passkey.train_lengths: one length drawn per batch, none beyond train_length."""
    import mm_rec.evaluation.passkey as passkey_module

    torch.manual_seed(0)
    tiny_model().save_pretrained(tmp_path / "model")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("passkey:\n  train_length: 200\n  train_lengths: [160, 180, 200]\n")
    drawn = []
    make = passkey_module.make_passkey_batch

    def recording(length, *args, **kwargs):
        drawn.append(length)
        return make(length, *args, **kwargs)

    monkeypatch.setattr(passkey_module, "make_passkey_batch", recording)
    parser = argparse.ArgumentParser()
    add_eval_task_arguments(parser)
    args = parser.parse_args(["--task", "passkey", "--checkpoint", str(tmp_path / "model"), "--config", str(recipe),
                              "--train", "--steps", "12", "--lengths", "200", "--depths", "0.5", "--samples", "1",
                              "--out", str(tmp_path / "trained")])
    assert run_eval_task(args) == 0
    training = drawn[1:13]  # drawn[0] is the held-out batch at train_length; the grid comes after training
    assert drawn[0] == 200 and set(training) <= {160, 180, 200} and len(set(training)) >= 2, drawn
    assert json.loads((tmp_path / "trained" / "passkey_results.json").read_text())["train_lengths"] == [160, 180, 200]

    recipe.write_text("passkey:\n  train_length: 200\n  train_lengths: [160, 400]\n")
    with pytest.raises(ValueError, match="beyond train_length"):
        run_eval_task(args)


def test_trained_model_is_written_before_scoring(tmp_path, monkeypatch):
    """A scoring that fails after training leaves the trained weights in --out (to score with --checkpoint)."""
    import mm_rec.evaluation.passkey as passkey_module

    torch.manual_seed(0)
    tiny_model().save_pretrained(tmp_path / "model")

    def failing_grid(*args, **kwargs):
        raise RuntimeError("scoring failed")

    monkeypatch.setattr(passkey_module, "passkey_grid", failing_grid)
    parser = argparse.ArgumentParser()
    add_eval_task_arguments(parser)
    args = parser.parse_args(["--task", "passkey", "--checkpoint", str(tmp_path / "model"), "--train", "--steps", "1",
                              "--train-length", "200", "--lengths", "200", "--out", str(tmp_path / "trained")])
    with pytest.raises(RuntimeError, match="scoring failed"):
        run_eval_task(args)
    trained = MMRecModel.from_pretrained(tmp_path / "trained")
    before = MMRecModel.from_pretrained(tmp_path / "model")
    assert any(not torch.equal(a, b) for a, b in zip(trained.state_dict().values(), before.state_dict().values()))


class ForwardSpy(torch.nn.Module):
    """A model wrapper that records the tokens and logits of every forward."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model, self.config, self.seen = model, model.config, []
        if hasattr(model, "init_state"):
            self.init_state = model.init_state

    def forward(self, input_ids, state=None, **kwargs):
        out = self.model(input_ids, state=state, **kwargs)
        self.seen.append((input_ids.shape[1], None if out.logits is None else tuple(out.logits.shape)))
        return out

    def generate(self, *args, **kwargs):
        return self.model.generate(*args, **kwargs)


def test_pieces_with_the_state_carried_equal_one_forward():
    """A long prompt is read in pieces (the state carried, only the answer logits kept): the same
    logits as one forward over the whole prompt, and no forward longer than a piece."""
    torch.manual_seed(0)
    model = tiny_model().double().eval()
    batch = make_passkey_batch(200, 3, seed=8, num_digits=5)
    with torch.no_grad():
        full = model(batch.input_ids).logits
    expected = full[torch.arange(3)[:, None], batch.answer_positions]
    spy = ForwardSpy(model)
    chunked = logits_at(spy, batch.input_ids, batch.answer_positions, piece_len=37)
    torch.testing.assert_close(chunked, expected, rtol=1e-10, atol=1e-10)
    assert chunked.shape == (3, 5, 256)
    assert max(t for t, _ in spy.seen) <= 37 and sum(t for t, _ in spy.seen) == 204  # the last digit is not read
    for method in ("teacher_forced", "greedy"):
        pieces, whole = score_passkey(model, batch, method, 2, piece_len=37), score_passkey(model, batch, method, 3)
        assert pieces == whole

    spy.seen.clear()  # greedy: all but the last prompt token in pieces, then `generate` from that state
    score_passkey(spy, make_passkey_batch(200, 1, seed=8, num_digits=5), "greedy", piece_len=64)
    assert [t for t, _ in spy.seen] == [64, 64, 64, 7]


def test_grid_rows_per_forward_follow_the_piece():
    model = ForwardSpy(tiny_model())
    passkey_grid(model, [600], [0.5], num_samples=4, tokens_per_forward=400, piece_len=200)
    assert {t for t, _ in model.seen} == {200, 4} and all(shape[0] == 2 for _, shape in model.seen)


def test_transformer_beyond_its_length_is_not_run(monkeypatch):
    config = MMRecConfig(vocab_size=256, hidden_dim=32, num_layers=1, num_heads=2, ffn_dim=64, max_seq_len=300)
    model = TransformerModel(config).eval()
    records = passkey_grid(model, [200, 296, 297], [0.0, 1.0], num_samples=2)
    run = [(r["length"], r["not_run"] is None, r["accuracy"] is not None) for r in records]
    assert run == [(200, True, True)] * 2 + [(296, True, True)] * 2 + [(297, False, False)] * 2  # 297 + 4 > 300
    assert "max_seq_len 300" in records[-1]["not_run"]

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr("mm_rec.evaluation.passkey.score_passkey", out_of_memory)
    (record,) = passkey_grid(model, [200], [0.5], num_samples=2)
    assert record["accuracy"] is None and "out of GPU memory" in record["not_run"]


def test_cli_marks_cells_not_run(tmp_path, capsys):
    config = MMRecConfig(vocab_size=256, hidden_dim=32, num_layers=1, num_heads=2, ffn_dim=64, max_seq_len=250)
    TransformerModel(config).save_pretrained(tmp_path / "model")
    parser = argparse.ArgumentParser()
    add_eval_task_arguments(parser)
    args = parser.parse_args(["--task", "passkey", "--checkpoint", str(tmp_path / "model"), "--lengths", "180,400",
                              "--depths", "0,1", "--samples", "1", "--out", str(tmp_path / "eval")])
    assert run_eval_task(args) == 0
    out = capsys.readouterr().out
    assert "not run (-): 400: 404 tokens > max_seq_len 250" in out
    report = json.loads((tmp_path / "eval" / "passkey_results.json").read_text())
    assert [r["accuracy"] is None for r in report["results"]] == [False, False, True, True]
