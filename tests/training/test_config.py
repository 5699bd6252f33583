"""Recipes: shipped configs load, defaults = configs/tiny.yaml, overrides, unknown keys refused."""

import dataclasses
from pathlib import Path

import pytest

from mm_rec.training.config import RunConfig, apply_overrides

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
RECIPES = ["tiny.yaml", "shakespeare_char.yaml", "small.yaml", "mmrec_7b.yaml"]


@pytest.mark.parametrize("name", RECIPES)
def test_shipped_recipes_load(name):
    config = RunConfig.load(CONFIGS / name)
    assert config.model_config().vocab_size > 0
    assert config.training.decay_steps == config.training.max_steps  # explicit, fixed schedule length


def test_defaults_are_the_tiny_recipe():
    default, tiny = RunConfig.load(None), RunConfig.load(CONFIGS / "tiny.yaml")
    # tiny.yaml pins lr_decay_steps (exact resume with another --max-steps); the default follows max_steps
    assert tiny.training.lr_decay_steps == default.training.max_steps and default.training.lr_decay_steps is None
    tiny.training = dataclasses.replace(tiny.training, lr_decay_steps=None)
    assert tiny == default
    assert default.model_config().to_dict() == RunConfig(model={"preset": "tiny"}).model_config().to_dict()


def test_seven_b_recipe_matches_the_seed_specification():
    config = RunConfig.load(CONFIGS / "mmrec_7b.yaml")
    model = config.model_config()
    assert (model.hidden_dim, model.num_layers, model.memory_size_M) == (4096, 24, 1024)
    assert model.max_seq_len >= 32768 and model.use_log_sum_exp
    assert (model.log_clamp_min, model.log_clamp_max) == (-50, 0)
    assert config.distributed.parallel == "fsdp" and config.training.precision == "bf16"


def test_overrides_are_typed():
    config = RunConfig.load(CONFIGS / "tiny.yaml", ["training.lr=1e-3", "model.num_layers=2", "data.carry_state=false",
                                                    "training.lr_decay_steps=null", "training.sample_prompt=def f(",
                                                    "model_type=mmrec"])
    assert config.training.lr == 1e-3 and isinstance(config.training.lr, float)
    assert config.model_config().num_layers == 2 and config.model["preset"] == "tiny"
    assert config.data.carry_state is False and config.training.lr_decay_steps is None
    assert config.training.sample_prompt == "def f("


@pytest.mark.parametrize("overrides, message", [
    (["training.learning_rate=1"], "unknown key"),
    (["model.hidden=3"], "unknown config key"),
    (["optimizer.lr=1"], "unknown section"),
    (["training.lr=fast"], "expected float"),
    (["training.batch_size=0"], "positive integer"),
    (["training.precision=fp8"], "must be one of"),
    (["model.hidden_dim=100", "model.num_heads=3"], "divisible"),
    (["model.preset=huge"], "unknown preset"),
    (["model_type=rnn"], "must be one of"),
    (["lr"], "section.key=value"),
])
def test_bad_recipes_are_refused(overrides, message):
    with pytest.raises(ValueError, match=message):
        RunConfig.load(None, overrides)


def test_unknown_key_in_a_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("training:\n  max_step: 10\n")
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['max_step'\]"):
        RunConfig.load(path)


def test_apply_overrides_does_not_touch_its_input():
    values = {"training": {"lr": 1.0}}
    assert apply_overrides(values, ["training.lr=2"]) == {"training": {"lr": 2}}
    assert values == {"training": {"lr": 1.0}}
