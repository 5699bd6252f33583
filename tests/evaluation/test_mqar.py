"""MQAR: answers where the generator says, power-law gaps, determinism, scorer bounds, recipes, CLI."""

import argparse
import json
import math
from pathlib import Path

import pytest
import torch

from mm_rec import MMRecConfig, MMRecModel
from mm_rec.cli.tasks import add_eval_task_arguments, run_eval_task
from mm_rec.config import load_mapping
from mm_rec.evaluation.mqar import MQARConfig, chance_accuracy, gap_probabilities, generate_mqar, score_mqar
from mm_rec.evaluation.train_task import TaskTrainConfig, train_on_task

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def tiny_model(vocab_size: int = 64) -> MMRecModel:
    return MMRecModel(MMRecConfig(vocab_size=vocab_size, hidden_dim=32, num_layers=2, num_heads=2, ffn_dim=64,
                                  num_memories=2, mem_dim=8, memory_size_M=4, chunk_size=8))


@pytest.mark.parametrize("config", [
    MQARConfig(vocab_size=64, seq_len=101, num_pairs=8),  # odd length: one trailing noise token
    MQARConfig(vocab_size=40, seq_len=64, num_pairs=20, num_queries=6, alpha=2.0),
    MQARConfig(vocab_size=64, seq_len=32, num_pairs=8),  # every query-region slot is a query
])
def test_answers_are_where_the_generator_says(config):
    B, P, Q, half = 64, config.num_pairs, config.queries, config.vocab_size // 2
    batch = generate_mqar(config, B, seed=3)
    ids, labels = batch.input_ids, batch.labels
    assert ids.shape == labels.shape == (B, config.seq_len) and ids.dtype == torch.int64
    assert batch.query_positions.shape == batch.key_positions.shape == batch.values.shape == (B, Q)

    context_keys, context_values = ids[:, 0:2 * P:2], ids[:, 1:2 * P:2]
    assert ((context_keys >= 0) & (context_keys < half)).all()
    assert all(len(set(row.tolist())) == P for row in context_keys)  # distinct keys
    assert ((context_values >= half) & (context_values < config.vocab_size)).all()
    is_key = ids < half
    is_key[:, 0:2 * P:2] = False
    is_key.scatter_(1, batch.query_positions, False)
    assert not is_key.any()  # key tokens appear only as context keys and queries

    q, k = batch.query_positions, batch.key_positions
    assert (q % 2 == 0).all() and (q >= 2 * P).all() and (q + 1 < config.seq_len).all()
    assert (q[:, 1:] > q[:, :-1]).all()  # ascending, distinct
    assert (k % 2 == 0).all() and (k < 2 * P).all()
    assert all(len(set(row.tolist())) == Q for row in k)  # distinct keys asked
    assert torch.equal(ids.gather(1, q), ids.gather(1, k))  # the query repeats the key
    assert torch.equal(ids.gather(1, k + 1), batch.values)  # ... whose value followed it in the context
    assert torch.equal(ids.gather(1, q + 1), batch.values)  # ... and follows the query
    assert torch.equal(labels.gather(1, q), batch.values)  # labels are shifted: at the query key
    assert ((labels != -100).sum(1) == Q).all()
    assert torch.equal(batch.distances, q - k)
    assert torch.equal(batch.gaps, q // 2 - P + 1)


def test_deterministic_by_seed():
    config = MQARConfig(vocab_size=64, seq_len=128, num_pairs=8)
    a, b = generate_mqar(config, 16, seed=7), generate_mqar(config, 16, seed=7)
    assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.labels, b.labels)
    assert torch.equal(a.query_positions, b.query_positions) and torch.equal(a.key_positions, b.key_positions)
    assert not torch.equal(a.input_ids, generate_mqar(config, 16, seed=8).input_ids)
    stream = torch.Generator().manual_seed(7)
    first, second = generate_mqar(config, 16, stream), generate_mqar(config, 16, stream)
    assert torch.equal(first.input_ids, a.input_ids)  # a generator in the same state gives the same batch
    assert not torch.equal(second.input_ids, first.input_ids)  # and it advances


def test_gap_probabilities():
    config = MQARConfig(vocab_size=64, seq_len=256, num_pairs=8, alpha=1.0)
    pi = gap_probabilities(config)
    assert pi.shape == (config.query_region,)
    assert math.isclose(pi.sum().item(), config.queries, rel_tol=1e-12)
    assert (pi <= 1).all() and (pi[1:] <= pi[:-1]).all()
    assert pi[0] == 1.0  # the head of this law is capped at one query per slot
    free = pi < 1
    g = torch.arange(1, config.query_region + 1, dtype=torch.float64)[free]
    torch.testing.assert_close(pi[free] * g, (pi[free] * g)[:1].expand(g.shape))  # pi_g = c / g
    uniform = gap_probabilities(MQARConfig(vocab_size=64, seq_len=256, num_pairs=8, alpha=0.0))
    torch.testing.assert_close(uniform, torch.full_like(uniform, 8 / 120))


def gap_counts(config: MQARConfig, rows: int) -> torch.Tensor:
    gaps = generate_mqar(config, rows, seed=11).gaps.flatten()
    return torch.bincount(gaps - 1, minlength=config.query_region).double()


def chi_square(counts: torch.Tensor, pi: torch.Tensor, rows: int) -> tuple[float, int]:
    """Sum over gaps of (observed - expected)^2 / variance; a count at gap g is a sum of `rows`
    independent Bernoulli(pi_g), so every term has mean 1."""
    free = pi < 1
    expected, variance = rows * pi[free], rows * pi[free] * (1 - pi[free])
    return (((counts[free] - expected) ** 2) / variance).sum().item(), int(free.sum())


def test_gaps_follow_the_power_law():
    rows = 20000
    config = MQARConfig(vocab_size=64, seq_len=256, num_pairs=8, alpha=1.0)
    counts = gap_counts(config, rows)
    pi = gap_probabilities(config)
    assert counts.sum() == rows * config.queries
    assert torch.equal(counts[pi == 1], torch.full_like(counts[pi == 1], rows))  # capped gaps: always a query
    statistic, dof = chi_square(counts, pi, rows)
    assert statistic < 2 * dof, (statistic, dof)
    # The same test rejects neighbouring laws, so it can fail.
    for alpha in (0.8, 1.2):
        wrong = gap_probabilities(MQARConfig(vocab_size=64, seq_len=256, num_pairs=8, alpha=alpha))
        assert chi_square(counts, wrong, rows)[0] > 4 * dof
    # Log-log slope of the uncapped part of the histogram is -alpha.
    g = torch.arange(1, config.query_region + 1, dtype=torch.float64)
    free = pi < 1
    x, y = g[free].log(), counts[free].log()
    slope = ((x - x.mean()) * (y - y.mean())).sum() / ((x - x.mean()) ** 2).sum()
    assert abs(slope.item() + 1.0) < 0.05


def test_invalid_configs_are_refused():
    with pytest.raises(ValueError, match="seq_len"):
        MQARConfig(vocab_size=64, seq_len=40, num_pairs=16)
    with pytest.raises(ValueError, match="num_pairs"):
        MQARConfig(vocab_size=16, seq_len=128, num_pairs=9)
    with pytest.raises(ValueError, match="num_queries"):
        MQARConfig(vocab_size=64, seq_len=128, num_pairs=8, num_queries=9)
    with pytest.raises(ValueError, match="unknown MQAR key"):
        MQARConfig.from_dict({"pairs": 3})


def test_oracle_scores_one_and_constant_scores_chance():
    config = MQARConfig(vocab_size=64, seq_len=64, num_pairs=8)
    batch = generate_mqar(config, 4000, seed=5)
    oracle = torch.zeros(*batch.input_ids.shape, config.vocab_size)
    oracle.scatter_(2, batch.labels.clamp_min(0)[..., None], 1.0)
    score = score_mqar(oracle, batch)
    assert score.accuracy == 1.0 and score.num_queries == 4000 * 8
    assert all(acc == 1.0 for acc, _ in score.by_distance.values())
    assert sum(n for _, n in score.by_distance.values()) == score.num_queries

    constant = torch.zeros(*batch.input_ids.shape, config.vocab_size)
    constant[..., 40] = 1.0  # always the same value token
    accuracy, p = score_mqar(constant, batch).accuracy, chance_accuracy(config)
    assert abs(accuracy - p) < 5 * math.sqrt(p * (1 - p) / score.num_queries)
    constant[..., 40], constant[..., 3] = 0.0, 1.0  # always a key token: never right
    assert score_mqar(constant, batch).accuracy == 0.0


def test_distance_buckets():
    config = MQARConfig(vocab_size=64, seq_len=128, num_pairs=8)
    batch = generate_mqar(config, 200, seed=1)
    logits = torch.zeros(*batch.input_ids.shape, config.vocab_size)
    logits.scatter_(2, batch.labels.clamp_min(0)[..., None], 1.0)
    far = batch.distances >= 32  # make every query at distance >= 32 wrong
    rows = torch.arange(200)[:, None].expand_as(far)
    logits[rows[far], batch.query_positions[far]] = 0.0
    buckets = score_mqar(logits, batch).by_distance
    for name, (accuracy, count) in buckets.items():
        lo, hi = (int(v) for v in name.split("-"))
        in_bucket = (batch.distances >= lo) & (batch.distances <= hi)
        assert count == int(in_bucket.sum()) > 0
        assert accuracy == (1.0 if hi < 32 else 0.0)


def test_model_and_logits_score_alike():
    config = MQARConfig(vocab_size=64, seq_len=48, num_pairs=6)
    batch = generate_mqar(config, 5, seed=0)
    model = tiny_model()
    with torch.no_grad():
        logits = model(batch.input_ids).logits
    assert score_mqar(model, batch, batch_size=2) == score_mqar(logits, batch)


def test_training_loop_learns_the_value_distribution():
    """A tiny model learns at least that answers are value tokens: the loss falls from ln(64)
    towards ln(32), and the curve holds one point per evaluation."""
    torch.manual_seed(0)
    config = MQARConfig(vocab_size=64, seq_len=32, num_pairs=4)
    stream = torch.Generator().manual_seed(0)
    held_out = generate_mqar(config, 32, seed=1)

    def next_batch():
        batch = generate_mqar(config, 16, stream)
        return batch.input_ids, batch.labels

    curve = train_on_task(tiny_model(), next_batch, lambda m: score_mqar(m, held_out).accuracy,
                          TaskTrainConfig(steps=60, lr=3e-3, warmup_steps=5, eval_every=30), log=None)
    assert [p.step for p in curve] == [30, 60]
    assert curve[0].loss < math.log(64) and curve[-1].loss < math.log(32) + 0.25
    assert all(0.0 <= p.accuracy <= 1.0 for p in curve)


def test_recipes_load_and_match_in_size():
    mmrec = MMRecModel(MMRecConfig.from_file(CONFIGS / "mqar_mmrec.yaml"))
    for name in ("mqar_mmrec.yaml", "mqar_transformer.yaml"):
        recipe = load_mapping(CONFIGS / name)
        section = {k: v for k, v in recipe["mqar"].items() if k not in ("lengths", "samples", "train")}
        MQARConfig.from_dict(section)
        TaskTrainConfig.from_dict(recipe["mqar"]["train"])
        TaskTrainConfig.from_dict(recipe["passkey"]["train"])
        assert recipe["mqar"] == load_mapping(CONFIGS / "mqar_mmrec.yaml")["mqar"]  # same tasks for both models
    pytest.importorskip("mm_rec.baselines.transformer")
    from mm_rec.loading import build_model

    recipe = CONFIGS / "mqar_transformer.yaml"
    transformer = build_model(MMRecConfig.from_file(recipe), load_mapping(recipe)["model_type"])
    n_mmrec, n_transformer = mmrec.num_parameters(), sum(p.numel() for p in transformer.parameters())
    assert abs(n_transformer - n_mmrec) / n_mmrec < 0.10, (n_mmrec, n_transformer)


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_eval_task_arguments(parser)
    return parser.parse_args(argv)


def test_cli_trains_saves_and_reevaluates(tmp_path, capsys):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        "model: {vocab_size: 64, hidden_dim: 32, num_layers: 2, num_heads: 2, ffn_dim: 64, num_memories: 2,\n"
        "        mem_dim: 8, memory_size_M: 4, chunk_size: 8}\n"
        "mqar: {vocab_size: 64, seq_len: 32, num_pairs: 4, lengths: [32, 64], samples: 16,\n"
        "       train: {steps: 3, batch_size: 4, eval_every: 2, warmup_steps: 1}}\n")
    out = tmp_path / "run"
    assert run_eval_task(parse(["--task", "mqar", "--train", "--config", str(recipe), "--out", str(out)])) == 0
    report = json.loads((out / "mqar_results.json").read_text())
    assert [p["step"] for p in report["curve"]] == [2, 3]
    assert [r["seq_len"] for r in report["results"]] == [32, 64]
    assert report["chance"] == 1 / 32 and report["model"] == "MMRecModel"

    # The saved model, scored again on the same seed, gives the same numbers.
    again = tmp_path / "again"
    assert run_eval_task(parse(["--task", "mqar", "--checkpoint", str(out), "--vocab", "64", "--train-length", "32",
                                "--pairs", "4", "--lengths", "32,64", "--samples", "16", "--out", str(again)])) == 0
    assert json.loads((again / "mqar_results.json").read_text())["results"] == report["results"]
    assert "seq_len" in capsys.readouterr().out


def test_cli_needs_a_model():
    with pytest.raises(ValueError, match="--checkpoint"):
        run_eval_task(parse(["--task", "mqar"]))


def test_cli_set_overrides_the_model_to_train(tmp_path):
    """--set model.KEY=VALUE with --train builds the ablation (here: no window, level-2 mean)."""
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        "model: {vocab_size: 64, hidden_dim: 32, num_layers: 1, num_heads: 2, ffn_dim: 64, num_memories: 2,\n"
        "        mem_dim: 8, memory_size_M: 4, chunk_size: 8}\n"
        "mqar: {vocab_size: 64, seq_len: 32, num_pairs: 4, samples: 8,\n"
        "       train: {steps: 1, batch_size: 2, eval_every: 1, warmup_steps: 0}}\n")
    out = tmp_path / "run"
    args = parse(["--task", "mqar", "--train", "--config", str(recipe), "--out", str(out),
                  "--set", "model.window_size=0", "model.level2=mean"])
    assert run_eval_task(args) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["window_size"] == 0 and config["level2"] == "mean"
    report = json.loads((out / "mqar_results.json").read_text())
    assert report["overrides"] == ["model.window_size=0", "model.level2=mean"]
    # without --train only settings without parameters of their own may change (the window has a slope)
    with pytest.raises(ValueError, match="changes the checkpoint's parameters"):
        run_eval_task(parse(["--task", "mqar", "--checkpoint", str(out), "--set", "model.window_size=4"]))
