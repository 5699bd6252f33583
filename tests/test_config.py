"""Config validation (I9) and loading."""

import json

import pytest

from mm_rec import MMRecConfig
from mm_rec.config import PRESETS


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_validate(name):
    cfg = MMRecConfig.from_preset(name)
    assert cfg.hidden_dim % cfg.num_heads == 0


@pytest.mark.parametrize("field,value,rule", [
    ("hidden_dim", 0, "positive"),
    ("hidden_dim", 10, "divisible"),
    ("num_layers", 2.5, "positive integer"),
    ("decay_init", 1.0, "between 0 and 1"),
    ("log_clamp_max", 0.5, "<= 0"),
    ("log_clamp_min", 0.0, "< log_clamp_max"),
    ("gate_input", "hidden", "one of"),
    ("memory_size_M", -1, "non-negative"),
    ("num_hds_levels", 2, "must be 3"),
    ("use_log_sum_exp", False, "log space"),
])
def test_invalid_values_name_field_and_rule(field, value, rule):
    with pytest.raises(ValueError, match=rule) as err:
        MMRecConfig(**{field: value})
    assert field in str(err.value)


def test_from_file_yaml_json_and_unknown_keys(tmp_path):
    (tmp_path / "a.yaml").write_text("model:\n  preset: tiny\n  num_layers: 2\n")
    assert MMRecConfig.from_file(tmp_path / "a.yaml").num_layers == 2
    (tmp_path / "b.json").write_text(json.dumps({"hidden_dim": 64, "num_heads": 2}))
    assert MMRecConfig.from_file(tmp_path / "b.json").hidden_dim == 64
    (tmp_path / "c.yaml").write_text("hidden_dimm: 64\n")
    with pytest.raises(ValueError, match="unknown config key.*hidden_dimm.*valid keys"):
        MMRecConfig.from_file(tmp_path / "c.yaml")
    with pytest.raises(ValueError, match="not found"):
        MMRecConfig.from_file(tmp_path / "missing.yaml")
    (tmp_path / "d.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ValueError, match="mapping"):
        MMRecConfig.from_file(tmp_path / "d.yaml")


def test_unknown_preset():
    with pytest.raises(ValueError, match="unknown preset"):
        MMRecConfig.from_preset("13b")
