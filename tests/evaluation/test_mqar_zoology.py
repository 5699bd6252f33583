"""MQAR under Zoology's protocol: the data is Zoology's `multiquery_ar` as described in
mm_rec/evaluation/mqar_zoology.py, the epoch loop stops and records as documented, the command
line refuses bad options in one line."""

import argparse
import json
import re
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mm_rec import MMRecConfig
from mm_rec.baselines.transformer import TransformerModel
from mm_rec.cli import main
from mm_rec.cli.tasks import add_eval_task_arguments, run_eval_task, state_size
from mm_rec.constants import IGNORE_INDEX
from mm_rec.evaluation import mqar_zoology
from mm_rec.evaluation.mqar_zoology import (
    LengthGroup,
    MQARCell,
    ZoologyConfig,
    epoch_batches,
    evaluate,
    gap_weights,
    multiquery_ar,
    parse_cells,
    train_zoology,
    zoology_batch_size,
)
from mm_rec.loading import build_model

TINY = dict(vocab_size=64, hidden_dim=16, num_layers=1, num_heads=2, ffn_dim=32, num_memories=2, mem_dim=4,
            memory_size_M=2, chunk_size=8)


def queries(inputs: torch.Tensor, labels: torch.Tensor, P: int) -> list[list[tuple[int, int, int]]]:
    """Per row, (position, input, label) of every labelled position."""
    rows = []
    for ids, lab in zip(inputs.tolist(), labels.tolist()):
        rows.append([(t, ids[t], lab[t]) for t in range(len(ids)) if lab[t] != IGNORE_INDEX])
    return rows


@pytest.mark.parametrize("N, T, P, V, random", [
    (300, 32, 4, 64, True),
    (300, 32, 4, 64, False),
    (200, 16, 4, 16, True),  # T = 4P: every slot of the query region is a query
    (100, 28, 7, 16, True),  # P = V/2 - 1: every key of [1, V/2) in every row
])
def test_rows_follow_zoologys_description(N, T, P, V, random):
    inputs, labels = multiquery_ar(N, T, P, V, seed=3, random_non_queries=random)
    assert inputs.shape == labels.shape == (N, T) and inputs.dtype == labels.dtype == torch.int64
    keys, values = inputs[:, 0:2 * P:2], inputs[:, 1:2 * P:2]
    assert ((keys >= 1) & (keys < V // 2)).all() and ((values >= V // 2) & (values < V)).all()
    assert all(len(set(row)) == P for row in keys.tolist()) and all(len(set(row)) == P for row in values.tolist())
    assert (labels[:, :2 * P] == IGNORE_INDEX).all()  # nothing is asked inside the context

    is_query = labels != IGNORE_INDEX
    for row, asked in enumerate(queries(inputs, labels, P)):
        pairs = dict(zip(keys[row].tolist(), values[row].tolist()))
        assert len(asked) == P
        assert sorted(key for _, key, _ in asked) == sorted(pairs)  # every key asked exactly once
        for position, key, label in asked:
            assert position >= 2 * P and (position - 2 * P) % 2 == 0  # an even offset after the context
            assert label == pairs[key]  # the label is the asked key's value
    region = inputs[:, 2 * P:][~is_query[:, 2 * P:]]  # the query region but its queries
    if random:
        assert ((region >= 0) & (region < V)).all()
        if region.numel() > 1000:  # uniform over [0, V): both halves, mean near (V - 1) / 2
            assert (region < V // 2).any() and (region >= V // 2).any() and (region == 0).float().mean() < 0.1
            assert abs(region.double().mean().item() - (V - 1) / 2) < 0.05 * V
    else:
        assert (region == 0).all()
    if T == 4 * P:
        assert torch.equal(is_query[:, 2 * P::2], torch.ones(N, P, dtype=torch.bool))


def test_deterministic_by_seed():
    a, b = multiquery_ar(50, 64, 8, 128, seed=7), multiquery_ar(50, 64, 8, 128, seed=7)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], multiquery_ar(50, 64, 8, 128, seed=8)[0])
    stream = torch.Generator().manual_seed(7)
    first, second = multiquery_ar(50, 64, 8, 128, stream), multiquery_ar(50, 64, 8, 128, stream)
    assert torch.equal(first[0], a[0]) and not torch.equal(second[0], first[0])  # a generator advances


def gaps_of_key(inputs: torch.Tensor, labels: torch.Tensor, P: int, i: int) -> torch.Tensor:
    """[N] the gap at which context key i is asked."""
    asked = (inputs == inputs[:, 2 * i:2 * i + 1]) & (labels != IGNORE_INDEX)
    return (asked.float().argmax(dim=1) - 2 * P) // 2


def chi_square(counts: torch.Tensor, probs: torch.Tensor) -> float:
    expected = counts.sum() * probs
    return (((counts - expected) ** 2) / expected).sum().item()


def test_gaps_follow_the_power_law_drawn_without_replacement():
    N, T, P = 20000, 64, 4
    space = (T - 2 * P) // 2
    inputs, labels = multiquery_ar(N, T, P, 128, seed=11)
    p = gap_weights(space, 0.01)
    # key 0 is asked at the first draw: p exactly; key 1 at the second: sum_i p_i p_j / (1 - p_i), i != j
    second = (p[:, None] * p[None, :] / (1 - p[:, None])).fill_diagonal_(0).sum(0)
    uniform = torch.full_like(p, 1 / space)
    for i, law in ((0, p), (1, second)):
        counts = torch.bincount(gaps_of_key(inputs, labels, P, i), minlength=space).double()
        assert chi_square(counts, law) < 2 * space  # ~ space - 1 on average
        assert chi_square(counts, uniform) > 20 * space  # the test can tell the laws apart
    all_gaps = torch.bincount(((labels != IGNORE_INDEX).nonzero()[:, 1] - 2 * P) // 2, minlength=space)
    assert all_gaps[0] > 5 * all_gaps[-1] and all_gaps[:3].sum() > all_gaps[-10:].sum()  # small gaps far more often
    assert abs(second.sum().item() - 1) < 1e-12


@pytest.mark.parametrize("T, P, V, match", [(63, 4, 64, "even"), (64, 17, 64, "4 \\* num_pairs"),
                                            (64, 8, 16, "distinct keys"), (0, 4, 64, "positive")])
def test_impossible_cells_are_refused(T, P, V, match):
    with pytest.raises(ValueError, match=match):
        multiquery_ar(4, T, P, V)


def test_parse_cells():
    cells = parse_cells("64:4:1000, 512:64", 3000, 8192, "--test-sets")
    assert cells == (MQARCell(64, 4, 1000), MQARCell(512, 64, 3000)) and cells[1].name == "512:64"
    for text, match in (("512", "not T:P"), ("a:b", "not T:P"), ("64:4:0", "at least 1"), ("63:4", "even"),
                        ("64:4,64:4:10", "twice")):
        with pytest.raises(ValueError, match=f"--test-sets: .*{match}"):
            parse_cells(text, 3000, 8192, "--test-sets")


def test_batch_size_rule():
    assert [zoology_batch_size(T) for T in (64, 128, 256, 512, 1024)] == [512, 512, 256, 128, 64]


def test_an_epoch_sees_every_row_once_in_single_length_batches():
    groups = [LengthGroup(torch.arange(12)[:, None].expand(12, 4), torch.zeros(12, 4), 4),
              LengthGroup(100 + torch.arange(10)[:, None].expand(10, 8), torch.zeros(10, 8), 3)]
    device_gen, order_gen = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    epochs = [epoch_batches(groups, device_gen, order_gen) for _ in range(2)]
    for batches in epochs:
        assert len(batches) == 12 // 4 + 10 // 3  # the partial batch of the second group is left out
        rows = {0: [], 1: []}
        for group, index in batches:
            assert index.numel() == group.batch_size
            rows[groups.index(group)] += index.tolist()
        assert sorted(rows[0]) == list(range(12))
        assert len(set(rows[1])) == 9 and set(rows[1]) <= set(range(10))
    orders = [[(groups.index(g), i.tolist()) for g, i in batches] for batches in epochs]
    assert orders[0] != orders[1]  # reshuffled every epoch


class Oracle(nn.Module):
    """Answers every query: the token after the first earlier occurrence of the input token (a
    query's key occurs first in the context, where its value follows it). `wrong` shifts it off."""

    def __init__(self, vocab_size: int, wrong: bool = False):
        super().__init__()
        self.vocab_size, self.wrong = vocab_size, wrong
        self.scale = nn.Parameter(torch.tensor(5.0))

    def forward(self, input_ids, labels=None, return_logits=True):
        T = input_ids.shape[1]
        earlier = (input_ids[:, :, None] == input_ids[:, None, :]) & torch.ones(T, T, dtype=torch.bool).tril(-1)
        source = earlier.float().argmax(dim=2) + 1 + int(self.wrong)
        answer = input_ids.gather(1, source.clamp(max=T - 1))
        logits = F.one_hot(answer, self.vocab_size).float() * self.scale
        loss = None if labels is None else F.cross_entropy(logits.flatten(0, 1), labels.flatten(),
                                                           ignore_index=IGNORE_INDEX)
        return SimpleNamespace(logits=logits, loss=loss)


def small_config(**overrides) -> ZoologyConfig:
    values = dict(vocab_size=64, train_sets=(MQARCell(32, 4, 96), MQARCell(64, 8, 64)),
                  test_sets=(MQARCell(64, 8, 40), MQARCell(32, 4, 40)), batch_size=32, lr=3e-3, max_epochs=2)
    return ZoologyConfig(**{**values, **overrides})


def test_accuracy_is_exact_for_an_oracle_and_zero_for_a_wrong_one():
    config = small_config()
    tests = mqar_zoology.build_test_sets(config, torch.device("cpu"))
    assert evaluate(Oracle(64), tests, torch.device("cpu")) == {"64:8": 1.0, "32:4": 1.0}
    assert evaluate(Oracle(64, wrong=True), tests, torch.device("cpu")) == {"64:8": 0.0, "32:4": 0.0}


def test_an_oracle_stops_after_the_first_epoch():
    config = small_config()
    cpu = torch.device("cpu")
    seen = []
    result = train_zoology(Oracle(64), mqar_zoology.build_train_groups(config, cpu),
                           mqar_zoology.build_test_sets(config, cpu), config, log=None,
                           on_epoch=lambda r: seen.append(len(r.curve)))
    assert result.stopped == "target" and seen == [1] and len(result.curve) == 1
    assert result.first_above("64:8", 0.99) is result.curve[0] and result.best_accuracy == {"64:8": 1.0, "32:4": 1.0}
    # rows of one length share batches: (96 // 32) + (64 // 32) steps per epoch
    assert result.batch_sizes == {32: 32, 64: 32} and result.steps_per_epoch == 5 and result.curve[0].step == 5


def test_the_loop_runs_every_epoch_and_the_schedule_ends_at_zero(monkeypatch):
    config = small_config(max_epochs=2)
    cpu = torch.device("cpu")
    schedulers = []
    build = mqar_zoology.build_scheduler
    monkeypatch.setattr(mqar_zoology, "build_scheduler", lambda *a: schedulers.append(build(*a)) or schedulers[-1])
    torch.manual_seed(0)
    model = build_model(MMRecConfig(**TINY))
    before = [p.detach().clone() for p in model.parameters()]
    result = train_zoology(model, mqar_zoology.build_train_groups(config, cpu),
                           mqar_zoology.build_test_sets(config, cpu), config, log=None)
    assert [p.epoch for p in result.curve] == [1, 2] and [p.step for p in result.curve] == [5, 10]
    assert result.stopped == "max_epochs" and result.first_above("64:8", 0.99) is None
    assert result.warmup_steps == 1 and result.planned_steps == 10
    assert schedulers[0].get_last_lr()[0] == pytest.approx(0.0, abs=1e-12)
    assert all(0 < p.train_loss < 10 and set(p.accuracy) == {"64:8", "32:4"} for p in result.curve)
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))

    budget = small_config(max_epochs=3, time_budget_s=1e-9)  # crossed during the first epoch
    result = train_zoology(Oracle(64, wrong=True), mqar_zoology.build_train_groups(budget, cpu),
                           mqar_zoology.build_test_sets(budget, cpu), budget, log=None)
    assert result.stopped == "time_budget" and len(result.curve) == 1


def test_a_resumed_run_is_the_uninterrupted_run(tmp_path):
    """Stopped by its time budget after epoch 1, then resumed in a fresh model and optimizer from the state
    written after that epoch: the same weights (bit for bit), the same curve, as three epochs in one run;
    a changed setting, a finished run and a missing state are refused."""
    cpu = torch.device("cpu")

    def run(config, state_path=None, resume=False):
        torch.manual_seed(0)  # the model's init (a resumed run overwrites it)
        model = build_model(MMRecConfig(**TINY, dropout=0.1))  # dropout: the global generator is restored too
        result = train_zoology(model, mqar_zoology.build_train_groups(config, cpu),
                               mqar_zoology.build_test_sets(config, cpu), config, log=None,
                               state_path=state_path, resume=resume)
        return model, result

    whole_model, whole = run(small_config(max_epochs=3))
    state = tmp_path / "training_state.pt"
    _, first = run(small_config(max_epochs=3, time_budget_s=1e-9), state)
    assert first.stopped == "time_budget" and len(first.curve) == 1 and state.exists()
    resumed_model, resumed = run(small_config(max_epochs=3), state, resume=True)
    assert resumed.stopped == "max_epochs" and [p.epoch for p in resumed.curve] == [1, 2, 3]
    assert [(p.step, p.train_loss, p.accuracy) for p in resumed.curve] == \
        [(p.step, p.train_loss, p.accuracy) for p in whole.curve]
    assert resumed.curve[0].seconds == first.curve[0].seconds  # the saved epoch's record, kept
    for a, b in zip(resumed_model.state_dict().values(), whole_model.state_dict().values()):
        assert torch.equal(a, b)

    with pytest.raises(ValueError, match="ended \\(max_epochs\\) after epoch 3"):
        run(small_config(max_epochs=3), state, resume=True)
    _, _ = run(small_config(max_epochs=3, time_budget_s=1e-9), state)
    with pytest.raises(ValueError, match="settings differ in lr"):
        run(small_config(max_epochs=3, lr=1e-2), state, resume=True)
    with pytest.raises(ValueError, match="nothing to resume: no training state"):
        run(small_config(max_epochs=3), tmp_path / "missing.pt", resume=True)


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_eval_task_arguments(parser)
    return parser.parse_args(argv)


def test_cli_trains_writes_the_results_and_rescoring_agrees(tmp_path, capsys):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(json.dumps({"model": TINY}))
    out = tmp_path / "run"
    argv = ["--task", "mqar", "--protocol", "zoology", "--vocab", "64", "--test-sets", "64:8:32,32:4:32"]
    assert run_eval_task(parse(argv + ["--train", "--config", str(recipe), "--train-sets", "32:4:96,64:8",
                                       "--train-rows", "64", "--max-epochs", "2", "--train-batch-size", "32",
                                       "--lr", "3e-3", "--out", str(out)])) == 0
    report = json.loads((out / "mqar_results.json").read_text())
    assert report["protocol"] == "zoology" and report["model"] == "MMRecModel"
    assert [p["epoch"] for p in report["curve"]] == [1, 2] and report["steps"] == 10 and report["epochs"] == 2
    assert set(report["curve"][0]) == {"epoch", "step", "train_loss", "accuracy", "seconds"}
    assert report["stopped"] == "max_epochs" and report["target_reached"] is None
    assert report["settings"]["train_sets"][1] == {"seq_len": 64, "num_pairs": 8, "rows": 64}
    assert report["settings"]["lr"] == 3e-3 and report["settings"]["main_cell"] == "64:8"
    assert report["recipe"] == {"model": TINY} and report["parameters"] > 0
    model = build_model(MMRecConfig(**TINY))
    assert report["state_size"] == sum(t.numel() for k, t in model.init_state(1).state_dict().items()
                                       if k != "position")
    assert report["best_accuracy"]["32:4"] == max(p["accuracy"]["32:4"] for p in report["curve"])
    assert capsys.readouterr().out.count("epoch ") >= 2  # one line per epoch

    # the same run cut by its time budget after epoch 1, then resumed: the same curve
    cut = tmp_path / "cut"
    train = ["--train", "--config", str(recipe), "--train-sets", "32:4:96,64:8", "--train-rows", "64", "--max-epochs",
             "2", "--train-batch-size", "32", "--lr", "3e-3", "--out", str(cut)]
    assert run_eval_task(parse(argv + train + ["--time-budget", "1e-9"])) == 0
    assert json.loads((cut / "mqar_results.json").read_text())["stopped"] == "time_budget"
    assert run_eval_task(parse(argv + train + ["--resume"])) == 0
    resumed = json.loads((cut / "mqar_results.json").read_text())
    assert resumed["stopped"] == "max_epochs" and resumed["steps"] == 10
    assert [(p["train_loss"], p["accuracy"]) for p in resumed["curve"]] == \
        [(p["train_loss"], p["accuracy"]) for p in report["curve"]]

    again = tmp_path / "again"
    assert run_eval_task(parse(argv + ["--checkpoint", str(out), "--out", str(again)])) == 0
    rescored = json.loads((again / "mqar_results.json").read_text())["results"]
    assert [r["accuracy"] for r in rescored] == [r["accuracy"] for r in report["results"]]
    assert [r["accuracy"] for r in rescored] == list(report["curve"][-1]["accuracy"].values())


def test_state_size_of_the_transformer_is_its_kv_cache():
    with torch.device("meta"):
        transformer = TransformerModel(MMRecConfig(**TINY))
    assert state_size(transformer, 512)[0] == 2 * TINY["num_layers"] * 512 * TINY["hidden_dim"]


@pytest.mark.parametrize("options, message", [
    (["--protocol", "zoology", "--train-sets", "63:4"], "--train-sets: MQAR seq_len=63: must be even"),
    (["--protocol", "zoology", "--test-sets", "64:40"], "--test-sets: MQAR 64:40: seq_len must be >= 4 \\* num_pairs"),
    (["--protocol", "zoology", "--test-sets", "512"], "--test-sets: '512' is not T:P"),
    (["--protocol", "zoology", "--max-epochs", "0"], "--max-epochs 0: must be a positive integer"),
    (["--protocol", "zoology", "--steps", "5"], "--steps: not options of --protocol zoology"),
    (["--train-sets", "64:4"], "--train-sets: options of --protocol zoology"),
    (["--protocol", "zoology", "--no-train", "--max-epochs", "3"], "--max-epochs: training options; add --train"),
    (["--protocol", "zoology", "--vocab", "8192"], "model's vocabulary \\(64\\) is smaller than the task's \\(8192\\)"),
    (["--protocol", "zoology", "--resume"], "--resume continues a training run written in --out: add --train and"),
])
def test_cli_errors_are_one_clear_line(tmp_path, capsys, options, message):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(json.dumps({"model": TINY}))
    train = [] if "--no-train" in options else ["--train"]
    options = [o for o in options if o != "--no-train"]
    code = main(["eval", "--task", "mqar", *train, "--config", str(recipe), "--device", "cpu", *options])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert err.startswith("mmrec eval: error: ") and re.search(message, err), err


def test_the_zoology_protocol_is_only_for_mqar(capsys):
    assert main(["eval", "--task", "passkey", "--protocol", "zoology"]) == 2
    assert "--protocol zoology is a protocol of --task mqar" in capsys.readouterr().err
