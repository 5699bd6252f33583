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
    ("use_log_sum_exp", False, "must be True"),
    ("memory_input", "tokens", "one of"),
    ("level2", "sum", "one of"),
    ("slot_write", "max", "one of"),
    ("retention", "lru", "one of"),
    ("slots_per_block", 5, "divide chunk_size"),
    ("conv_size", -1, "non-negative"),
    ("conv_init", "zeros", "one of"),
    ("window_size", -2, "non-negative"),
    ("recent_slots", 33, "<= memory_size_M"),
    ("config_version", 3, "newer one needs a newer mm_rec"),
    ("kept_age_bias", "log", "one of"),
    ("undecayed_banks", 3, "num_memories"),
    ("undecayed_banks", -1, "num_memories"),
    ("delta_decay_scale", 1.5, r"\[0, 1\]"),
])
def test_invalid_values_name_field_and_rule(field, value, rule):
    with pytest.raises(ValueError, match=rule) as err:
        MMRecConfig.from_dict({field: value})
    assert field in str(err.value)


def test_derived_sizes_follow_the_fields_they_depend_on():
    cfg = MMRecConfig(chunk_size=16, memory_size_M=24, slots_per_block=4)
    assert cfg.window_size == 32 and cfg.recent_slots == 12 and cfg.kept_slots == 12
    assert MMRecConfig(retention="age").recent_slots == 32 and MMRecConfig(retention="age").kept_slots == 0
    changed = cfg.replace(chunk_size=8, memory_size_M=8)
    assert changed.window_size == 16 and changed.recent_slots == 4
    assert cfg.replace(window_size=5).window_size == 5


def test_old_keys_and_versions_are_read_as_they_were_meant():
    with pytest.warns(FutureWarning, match="max_segment_len"):
        cfg = MMRecConfig.from_dict({"max_chunk_len": 64, "num_hds_levels": 3, "use_log_sum_exp": True})
    assert cfg.max_segment_len == 64 and cfg.num_hds_levels == 3 and cfg.use_log_sum_exp
    # a config.json without config_version predates the token-level memory: version 1, its memory
    old = MMRecConfig.from_saved({"hidden_dim": 64, "num_heads": 2})
    assert old.config_version == 1 and (old.memory_input, old.window_size, old.level2) == ("state", 0, "mean")
    assert MMRecConfig.from_saved(MMRecConfig().to_dict()) == MMRecConfig()  # saved by this version
    # a recipe without config_version gets today's memory
    assert MMRecConfig.from_dict({}).config_version == 2 and MMRecConfig.from_dict({}).level2 == "delta"
    with pytest.raises(ValueError, match="config_version"):
        MMRecConfig(config_version=1)  # version 1 has no token-level memory


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


@pytest.mark.parametrize("field, value", [("undecayed_banks", 1), ("delta_decay_scale", 0.5)])
def test_delta_rule_settings_need_the_delta_rule(field, value):
    MMRecConfig.from_dict({field: value})  # with level 2 the delta rule (the default): accepted
    with pytest.raises(ValueError, match="needs level2=delta"):
        MMRecConfig.from_dict({field: value, "level2": "mean"})
