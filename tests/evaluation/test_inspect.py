"""Memory inspection: spectra are the parameters, read masses match a hand computation (window,
slot ages, null), and the PNG is written (or a clear error says matplotlib is missing)."""

import argparse
import json
import math
import sys

import pytest
import torch
from torch import nn

from mm_rec import MMRecConfig, MMRecModel
from mm_rec.cli.inspect import add_inspect_arguments, run_inspect
from mm_rec.evaluation.inspect import decay_spectra, memory_usage, plot_memory

LEGACY = dict(config_version=1, memory_input="state", conv_size=0, window_size=0, level2="mean",
              slot_write="mean", retention="age")


def tiny_model(**overrides) -> MMRecModel:
    base = dict(vocab_size=256, hidden_dim=16, num_layers=2, num_heads=2, ffn_dim=24, num_memories=3, mem_dim=4,
                memory_size_M=3, chunk_size=4)
    return MMRecModel(MMRecConfig(**{**base, **overrides})).double()


@pytest.mark.parametrize("legacy", [True, False])
def test_decay_spectra_are_the_parameters(legacy):
    model = tiny_model(**(LEGACY if legacy else {}))
    beta, logits = torch.linspace(-2, 5, 16, dtype=torch.float64), torch.tensor([0.0, 1.0, 3.0], dtype=torch.float64)
    mixer = model.blocks[1].mixer
    with torch.no_grad():
        mixer.decay.beta.copy_(beta)
        (mixer.hds.aggregate_logit if legacy else mixer.hds.delta_decay_bias).copy_(logits)
        mixer.attention.log_age_slope.copy_(torch.tensor([-1.0, 0.0, 2.0]))
        mixer.integration.level_logits.copy_(torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 2.0]]))
    spectra = decay_spectra(model)
    assert len(spectra) == 2
    layer = spectra[1]
    torch.testing.assert_close(layer.gamma, torch.sigmoid(beta))
    torch.testing.assert_close(layer.level2_lambda, torch.sigmoid(logits))
    torch.testing.assert_close(layer.age_slope, torch.tensor([math.exp(-1), 1.0, math.exp(2)], dtype=torch.float64))
    torch.testing.assert_close(layer.time_constants, 1 + beta.exp())  # 1 / (1 - sigmoid(beta))
    torch.testing.assert_close(layer.level2_time_constants, 1 + logits.exp())
    torch.testing.assert_close(layer.level_weights[1], torch.softmax(torch.tensor([1.0, 0.0], dtype=torch.float64), 0))
    torch.testing.assert_close(spectra[0].gamma, torch.full((16,), model.config.decay_init, dtype=torch.float64))
    assert (layer.window_slope is None) == legacy


def test_undecayed_banks_show_no_level2_decay():
    model = tiny_model(undecayed_banks=1)
    layer = decay_spectra(model)[0]
    assert (layer.level2_lambda[:2] < 1).all() and layer.level2_lambda[2] == 1.0
    assert torch.isinf(layer.level2_time_constants[2])


def expected_mass(T: int, C: int, S: int, W: int, slope: float, window_slope: float, null_logit: float):
    """With zero queries and keys the scores are the biases alone: token t in block j = t // C sees
    its window (d = 0 .. min(t, W - 1) tokens back, weights exp(-window_slope * d)), slot ages
    1..min(j, S) (weights exp(-slope * (age - 1))) and the null slot (exp(null_logit)).
    Returns the mean masses (window by distance [W], slots by age [S], null)."""
    window, ages, null = torch.zeros(max(W, 1), dtype=torch.float64), torch.zeros(S, dtype=torch.float64), 0.0
    for t in range(T):
        w_window = [math.exp(-window_slope * d) for d in range(min(t, W - 1) + 1)] if W else []
        w_slots = [math.exp(-slope * (age - 1)) for age in range(1, min(t // C, S) + 1)]
        total = sum(w_window) + sum(w_slots) + math.exp(null_logit)
        window[:len(w_window)] += torch.tensor(w_window, dtype=torch.float64) / total
        ages[:len(w_slots)] += torch.tensor(w_slots, dtype=torch.float64) / total
        null += math.exp(null_logit) / total
    return window[:W] / T, ages / T, null / T


@pytest.mark.parametrize("legacy", [True, False])
def test_memory_usage_matches_a_hand_computation(legacy):
    """Zero memory projections leave only the biases in the scores. max_segment_len=7 makes the
    model run the 50 tokens as 8 segments, so the hooks accumulate across calls and the ring wraps."""
    model = tiny_model(max_segment_len=7, **(LEGACY if legacy else {}))
    slopes, window_slopes, nulls = [0.0, 0.7, 3.0], [0.5, 0.0, 0.1], [0.0, -1.0, 2.0]
    with torch.no_grad():
        for block in model.blocks:
            mixer = block.mixer
            if legacy:
                mixer.hds.qkv.weight.zero_()
            else:  # the memory's columns of the input projection: q = k = v = silu(conv(0)) = 0
                sizes = list(mixer.split_sizes.values())
                start = sum(sizes[:list(mixer.split_sizes).index("memory")])
                mixer.in_proj.weight[start:start + mixer.split_sizes["memory"]].zero_()
                window_slope = torch.tensor(window_slopes, dtype=torch.float64)
                mixer.attention.log_window_slope.copy_(window_slope.clamp_min(1e-300).log())
            mixer.attention.log_age_slope.copy_(torch.tensor(slopes, dtype=torch.float64).clamp_min(1e-300).log())
            mixer.attention.null_logit.copy_(torch.tensor(nulls, dtype=torch.float64))
    usage = memory_usage(model, torch.randint(0, 256, (2, 50)))
    W = model.config.window_size
    for layer in range(2):
        use = usage[layer]
        for k in range(3):
            window, ages, null = expected_mass(50, 4, 3, W, slopes[k], window_slopes[k], nulls[k])
            torch.testing.assert_close(use.slot_age_mass[k, :3], ages, rtol=1e-12, atol=1e-12)
            assert use.slot_age_mass[k, 3:].abs().max() < 1e-15
            torch.testing.assert_close(use.read_mass[k, 2], torch.tensor(null, dtype=torch.float64))
            torch.testing.assert_close(use.window_mass[k], window, rtol=1e-12, atol=1e-12)
        if not legacy:  # equal pooling weights (zero keys): each sub-slot is a plain mean of 4 tokens
            torch.testing.assert_close(use.write_peak, torch.full((3,), 0.25, dtype=torch.float64))
            assert (use.level2_beta > 0).all() and (use.level2_alpha <= 1).all()
            kept = use.kept_age[use.kept_age >= 0]
            assert kept.numel() and (kept > model.config.recent_slots).all()  # older than the recent part
    assert not any(block.mixer.attention._forward_hooks for block in model.blocks)  # hooks removed


def test_read_mass_is_a_distribution():
    model = tiny_model(memory_size_M=5)
    usage = memory_usage(model, torch.randint(0, 256, (3, 90)))
    for use in usage:
        torch.testing.assert_close(use.read_mass.sum(-1), torch.ones(3, dtype=torch.float64))
        torch.testing.assert_close(use.slot_age_mass.sum(-1), use.read_mass[:, 1])
        assert (use.read_mass >= 0).all() and (use.slot_age_mass[:, :5] > 0).all()
    no_ring = memory_usage(tiny_model(memory_size_M=0, window_size=0), torch.randint(0, 256, (1, 40)))
    assert torch.equal(no_ring[0].read_mass[:, 2], torch.ones(3, dtype=torch.float64))  # only the null slot


def test_non_mmrec_models_are_refused():
    with pytest.raises(ValueError, match="MMRecModel"):
        decay_spectra(nn.Linear(2, 2))


def test_plot_memory_writes_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    model = tiny_model()
    usage = memory_usage(model, torch.randint(0, 256, (1, 40)))
    path = plot_memory(decay_spectra(model), usage, tmp_path / "memory.png", 4, title="tiny")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_memory_without_matplotlib_says_how_to_install(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # makes the import fail
    model = tiny_model()
    with pytest.raises(ImportError, match="pip install"):
        plot_memory(decay_spectra(model), memory_usage(model, torch.randint(0, 256, (1, 9))), tmp_path / "m.png", 4)


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
    layer = summary["layers"][0]
    assert len(layer["read_mass"]) == 3 and len(layer["gamma"]) == 16 and len(layer["kept_age"][0]) == 2
    out = capsys.readouterr().out
    assert "layer 1" in out and "reads window" in out and "delta rule" in out


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
