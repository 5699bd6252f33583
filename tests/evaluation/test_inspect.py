"""Memory inspection: decay spectra are the parameters, slot-age attention matches a hand
computation, and the PNG is written (or a clear error says matplotlib is missing)."""

import argparse
import json
import math
import sys

import pytest
import torch
from torch import nn

from mm_rec import MMRecConfig, MMRecModel
from mm_rec.cli.inspect import add_inspect_arguments, run_inspect
from mm_rec.evaluation.inspect import decay_spectra, plot_memory, slot_age_attention


def tiny_model(**overrides) -> MMRecModel:
    base = dict(vocab_size=256, hidden_dim=16, num_layers=2, num_heads=2, ffn_dim=24, num_memories=3, mem_dim=4,
                memory_size_M=3, chunk_size=4)
    return MMRecModel(MMRecConfig(**{**base, **overrides})).double()


def test_decay_spectra_are_the_parameters():
    model = tiny_model()
    beta, logits = torch.linspace(-2, 5, 16, dtype=torch.float64), torch.tensor([0.0, 1.0, 3.0], dtype=torch.float64)
    with torch.no_grad():
        model.blocks[1].mixer.decay.beta.copy_(beta)
        model.blocks[1].mixer.hds.aggregate_logit.copy_(logits)
        model.blocks[1].mixer.attention.log_age_slope.copy_(torch.tensor([-1.0, 0.0, 2.0]))
    spectra = decay_spectra(model)
    assert len(spectra) == 2
    layer = spectra[1]
    torch.testing.assert_close(layer.gamma, torch.sigmoid(beta))
    torch.testing.assert_close(layer.aggregate_lambda, torch.sigmoid(logits))
    torch.testing.assert_close(layer.age_slope, torch.tensor([math.exp(-1), 1.0, math.exp(2)], dtype=torch.float64))
    torch.testing.assert_close(layer.time_constants, 1 + beta.exp())  # 1 / (1 - sigmoid(beta))
    torch.testing.assert_close(layer.aggregate_time_constants, 1 + logits.exp())
    torch.testing.assert_close(spectra[0].gamma, torch.full((16,), 0.9, dtype=torch.float64))  # decay_init


def expected_age_mass(T: int, C: int, S: int, slope: float, null_logit: float) -> torch.Tensor:
    """With zero queries and keys the scores are the age bias alone: token t in block j = t // C sees
    ages 1..min(j, S) with weights exp(-slope * (age - 1)) beside the null slot's exp(null_logit)."""
    mass = torch.zeros(S + 1, dtype=torch.float64)
    for t in range(T):
        visible = min(t // C, S)
        weights = [math.exp(-slope * (age - 1)) for age in range(1, visible + 1)] + [math.exp(null_logit)]
        total = sum(weights)
        mass[:visible] += torch.tensor(weights[:-1], dtype=torch.float64) / total
        mass[S] += weights[-1] / total
    return mass / T


def test_slot_age_attention_matches_a_hand_computation():
    """Zero q/k projections leave the age bias alone in the scores. max_chunk_len=7 makes the model
    run the 50 tokens as 8 segments, so the hooks accumulate across calls and the ring wraps."""
    model = tiny_model(max_chunk_len=7)
    slopes, nulls = [0.0, 0.7, 3.0], [0.0, -1.0, 2.0]
    with torch.no_grad():
        for block in model.blocks:
            block.mixer.hds.qkv.weight.zero_()
            block.mixer.attention.log_age_slope.copy_(torch.tensor(slopes, dtype=torch.float64).clamp_min(1e-300).log())
            block.mixer.attention.null_logit.copy_(torch.tensor(nulls, dtype=torch.float64))
    ids = torch.randint(0, 256, (2, 50))
    mass = slot_age_attention(model, ids)
    assert mass.shape == (2, 3, 4)
    for layer in range(2):
        for k in range(3):
            expected = expected_age_mass(50, 4, 3, slopes[k], nulls[k])
            torch.testing.assert_close(mass[layer, k], expected, rtol=1e-12, atol=1e-12)
    assert not any(block.mixer.attention._forward_hooks for block in model.blocks)  # hooks removed


def test_slot_age_attention_rows_are_distributions():
    model = tiny_model(memory_size_M=5)
    mass = slot_age_attention(model, torch.randint(0, 256, (3, 90)))
    torch.testing.assert_close(mass.sum(-1), torch.ones(2, 3, dtype=torch.float64))
    assert (mass >= 0).all() and (mass[..., :5] > 0).all()
    no_ring = slot_age_attention(tiny_model(memory_size_M=0), torch.randint(0, 256, (1, 40)))
    assert torch.equal(no_ring, torch.ones(2, 3, 1, dtype=torch.float64))  # only the null slot


def test_non_mmrec_models_are_refused():
    with pytest.raises(ValueError, match="MMRecModel"):
        decay_spectra(nn.Linear(2, 2))


def test_plot_memory_writes_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    model = tiny_model()
    path = plot_memory(decay_spectra(model), slot_age_attention(model, torch.randint(0, 256, (1, 40))),
                       tmp_path / "memory.png", title="tiny")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_memory_without_matplotlib_says_how_to_install(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # makes the import fail
    model = tiny_model()
    with pytest.raises(ImportError, match="pip install"):
        plot_memory(decay_spectra(model), torch.zeros(2, 3, 4), tmp_path / "memory.png")


def inspect_args(tmp_path) -> argparse.Namespace:
    tiny_model().float().save_pretrained(tmp_path / "model")
    (tmp_path / "text.txt").write_text("The river winds slowly past the old mill. " * 10)
    parser = argparse.ArgumentParser()
    add_inspect_arguments(parser)
    return parser.parse_args(["--checkpoint", str(tmp_path / "model"), "--text", str(tmp_path / "text.txt"),
                              "--max-tokens", "300", "--out", str(tmp_path / "out" / "memory.png")])


def test_cli_inspect(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    assert run_inspect(inspect_args(tmp_path)) == 0
    assert (tmp_path / "out" / "memory.png").is_file()
    summary = json.loads((tmp_path / "out" / "memory.json").read_text())
    assert summary["tokens"] == 300 and len(summary["layers"]) == 2
    assert len(summary["layers"][0]["slot_age_mass"]) == 3 and len(summary["layers"][0]["gamma"]) == 16
    assert "layer 1" in capsys.readouterr().out


def test_cli_inspect_without_matplotlib(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    assert run_inspect(inspect_args(tmp_path)) == 1
    assert (tmp_path / "out" / "memory.json").is_file()
    assert "pip install" in capsys.readouterr().err


def test_load_model_takes_a_run_folder(tmp_path):
    """A training run folder loads its newest checkpoint, as `mmrec generate` does."""
    from mm_rec.loading import load_model

    config = MMRecConfig(vocab_size=256, hidden_dim=16, num_layers=1, num_heads=2, ffn_dim=24, num_memories=2,
                         mem_dim=4, memory_size_M=3, chunk_size=4)
    for step in (5, 12):
        torch.manual_seed(step)
        MMRecModel(config).save_pretrained(tmp_path / "run" / "checkpoints" / f"step_{step:08d}")
    newest = MMRecModel.from_pretrained(tmp_path / "run" / "checkpoints" / "step_00000012")
    loaded = load_model(tmp_path / "run")
    for (name, a), b in zip(newest.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), name
    with pytest.raises(FileNotFoundError, match="neither a model"):
        load_model(tmp_path)
