"""scripts/quality_studies.py: the recipes it compares are fair, and its report reads the runs right."""

import importlib.util
import json
import random
import sys
from pathlib import Path

import pytest
import torch

from mm_rec import MMRecConfig, MMRecModel
from mm_rec.baselines.transformer import TransformerModel
from mm_rec.loading import build_model
from mm_rec.training.config import RunConfig

ROOT = Path(__file__).resolve().parents[2]
spec = importlib.util.spec_from_file_location("quality_studies", ROOT / "scripts" / "quality_studies.py")
studies = importlib.util.module_from_spec(spec)
sys.modules["quality_studies"] = studies  # dataclasses look their module up
spec.loader.exec_module(studies)


def count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("dataset", list(studies.LM_DATASETS))
def test_lm_pairs_match_in_size_tokens_and_schedule(dataset):
    recipe, _ = studies.LM_DATASETS[dataset]
    mmrec = RunConfig.load(studies.CONFIGS / recipe)
    transformer = RunConfig.load(studies.CONFIGS / recipe.replace(".yaml", "_transformer.yaml"))
    assert (mmrec.model_type, transformer.model_type) == ("mmrec", "transformer")
    assert mmrec.training == transformer.training and mmrec.data == transformer.data
    with torch.device("meta"):
        n_mmrec = count(build_model(mmrec.model_config(), mmrec.model_type))
        n_transformer = count(build_model(transformer.model_config(), transformer.model_type))
    assert abs(n_transformer - n_mmrec) / n_mmrec < 0.02, (n_mmrec, n_transformer)
    for _, overrides in studies.LM_VARIANTS.values():  # every ablation override is a valid recipe
        RunConfig.load(studies.CONFIGS / recipe, overrides)


@pytest.mark.parametrize("width", studies.MQAR_WIDTHS)
def test_mqar_models_match_in_size(width):
    with torch.device("meta"):
        n_mmrec = count(MMRecModel(MMRecConfig(**studies.mqar_model(width, "mmrec"))))
        n_transformer = count(TransformerModel(MMRecConfig(**studies.mqar_model(width, "transformer"))))
    assert abs(n_transformer - n_mmrec) / n_mmrec < 0.02, (n_mmrec, n_transformer)
    for length, pairs in studies.MQAR_TASKS:  # the ring spans every row; every task fits the vocabulary
        config = studies.mqar_model(width, "mmrec")
        assert config["memory_size_M"] * config["chunk_size"] >= length and 2 * pairs <= studies.MQAR_VOCAB


@pytest.mark.parametrize("width", studies.ZOOLOGY_WIDTHS)
def test_zoology_models_match_in_size_and_fit_the_task(width):
    with torch.device("meta"):
        n_mmrec = count(MMRecModel(MMRecConfig(**studies.mqar_model(width, "mmrec", studies.ZOOLOGY_VOCAB))))
        transformer = studies.mqar_model(width, "transformer", studies.ZOOLOGY_VOCAB)
        n_transformer = count(TransformerModel(MMRecConfig(**transformer)))
    assert abs(n_transformer - n_mmrec) / n_mmrec < 0.02, (n_mmrec, n_transformer)
    assert transformer["vocab_size"] == studies.ZOOLOGY_VOCAB and transformer["max_seq_len"] >= 512


def test_commands_are_listed(capsys, tmp_path):
    for study, expected in (("lm", 8), ("mqar", 30 + 3 * len(studies.ABLATIONS)),
                            ("mqar-zoology", 4 * (6 + len(studies.ABLATIONS))), ("passkey", 3)):
        assert studies.main([study, "--dry-run", "--out", str(tmp_path)]) == 0
        lines = capsys.readouterr().out.strip().splitlines()
        assert len(lines) == expected and all(line.startswith("mmrec ") for line in lines)


def test_zoology_sweep(capsys, tmp_path):
    assert studies.main(["mqar-zoology", "--dry-run", "--out", str(tmp_path), "--only", "mmrec_w128_",
                         "--zoology-time-budget", "300", "--compile"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 4 * (1 + len(studies.ABLATIONS))  # every learning rate of each variant
    assert all("--protocol zoology" in line and "--time-budget 300" in line and "--compile" in line
               for line in lines)
    assert {line.split("--lr ")[1].split()[0] for line in lines} == {f"{lr:g}" for lr in studies.ZOOLOGY_LRS}
    recipes = tmp_path / "mqar-zoology" / "recipes"
    for name, overrides in studies.ABLATIONS.items():  # each ablation is its recipe's model section
        recipe = RunConfig.load(recipes / f"mmrec_w{studies.ZOOLOGY_ABLATION_WIDTH}_{name}.yaml")
        assert all(getattr(recipe.model_config(), key) == value for key, value in overrides.items())
        assert recipe.model_config().vocab_size == studies.ZOOLOGY_VOCAB


def test_report_reads_the_runs(tmp_path, capsys):
    rng = random.Random(7)
    best = {}
    for variant in studies.LM_VARIANTS:  # random validation curves; the report must find each minimum
        run = tmp_path / "lm" / f"shakespeare_{variant}"
        run.mkdir(parents=True)
        rows = [{"step": s, "val_loss": rng.uniform(1, 3), "val_bpb": rng.uniform(1, 3)} for s in (10, 20, 30)]
        best[variant] = min(rows, key=lambda r: r["val_loss"])
        lines = [json.dumps(r) + "\n" for r in [{"step": 1, "loss": 9.0}, *rows]]
        run.joinpath("metrics.jsonl").write_text("".join(lines))
    accuracy = rng.random()
    run = tmp_path / "mqar" / "transformer_w128_T512_P64"
    run.mkdir(parents=True)
    run.joinpath("mqar_results.json").write_text(json.dumps(
        {"results": [{"seq_len": 512, "accuracy": accuracy}], "curve": [{"step": 5}, {"step": 17}]}))
    ablated = {64: rng.random(), 256: rng.random()}  # an ablation run, scored past its training length
    run = tmp_path / "mqar" / "mmrec_w128_level2_mean_T64_P4"
    run.mkdir(parents=True)
    run.joinpath("mqar_results.json").write_text(json.dumps(
        {"results": [{"seq_len": n, "accuracy": a} for n, a in ablated.items()], "curve": [{"step": 3}]}))
    # per variant and lr: the best accuracy at the main cell, the step where 0.99 was passed
    for variant, results in (("transformer_w64", ((1e-4, 0.5, None), (2.2e-3, 0.995, 900))),
                             ("mmrec_w128_no_window", ((1e-4, 0.25, None), (1e-2, 0.125, None)))):
        for lr, best_main, step in results:
            run = tmp_path / "mqar-zoology" / f"{variant}_lr{lr:.1e}"
            run.mkdir(parents=True)
            run.joinpath("mqar_results.json").write_text(json.dumps(
                {"settings": {"main_cell": "512:64", "lr": lr}, "best_accuracy": {"512:64": best_main, "64:4": 1.0},
                 "target_reached": step and {"epoch": 3, "step": step}, "parameters": 1000, "state_size": 77,
                 "epochs": 4}))
    run = tmp_path / "passkey" / "mmrec"
    run.mkdir(parents=True)
    cells = [{"length": n, "depth": d, "accuracy": rng.random()} for n in (1024, 2048) for d in (0.0, 1.0)]
    run.joinpath("passkey_results.json").write_text(json.dumps({"results": cells, "curve": [{"step": 9}]}))

    assert studies.main(["report", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    best_row = next(line for line in out.splitlines() if line.startswith("| best (step)"))
    for variant in studies.LM_VARIANTS:
        assert f"**{best[variant]['val_loss']:.3f}** ({best[variant]['step']})" in best_row
    assert f"{accuracy:.3f} (17)" in out
    assert f"| level2_mean | {ablated[64]:.3f} | {ablated[256]:.3f} | 3 |" in out
    lines = out.splitlines()
    transformer = next(line for line in lines if line.startswith("| transformer_w64 |"))
    assert transformer == "| transformer_w64 | 1,000 | 77 | 0.500 | 0.995 (900) |  | **0.995** | 900 |"
    ablation = next(line for line in lines if line.startswith("| mmrec_w128_no_window |"))
    assert ablation == "| mmrec_w128_no_window | 1,000 | 77 | 0.250 |  | 0.125 | **0.250** | — |"
    assert "| transformer_w64 | 2.2e-03 | 4 | 0.995 | 1.000 |" in lines
    mean_1k = (cells[0]["accuracy"] + cells[1]["accuracy"]) / 2
    mean_2k = (cells[2]["accuracy"] + cells[3]["accuracy"]) / 2
    assert f"| mmrec (9 steps) | {mean_1k:.3f} | {mean_2k:.3f} |" in out


def test_longdoc_recipes_match_and_hold_the_study_files_out():
    from mm_rec.evaluation.long_documents import select_documents

    mmrec = RunConfig.load(studies.CONFIGS / "longdoc_mmrec.yaml")
    transformer = RunConfig.load(studies.CONFIGS / "longdoc_transformer.yaml")
    assert (mmrec.model_type, transformer.model_type) == ("mmrec", "transformer")
    assert mmrec.training == transformer.training and mmrec.data == transformer.data
    assert mmrec.data.path is None and mmrec.data.tokenizer == "byte" and mmrec.data.carry_state
    with torch.device("meta"):
        n_mmrec = count(build_model(mmrec.model_config(), mmrec.model_type))
        n_transformer = count(build_model(transformer.model_config(), transformer.model_type))
    assert 10e6 < n_mmrec < 15e6 and abs(n_transformer - n_mmrec) / n_mmrec < 0.02, (n_mmrec, n_transformer)
    assert transformer.model_config().max_seq_len == transformer.training.seq_len  # its sliding window
    for _, overrides in studies.LONGDOC_MODELS.values():
        RunConfig.load(studies.CONFIGS / "longdoc_mmrec.yaml", overrides)
    # enough long files lie in the validation split to give standard errors over files
    assert len(select_documents(32768, mmrec.data.val_fraction).documents) >= 10


def test_longdoc_commands_train_then_evaluate(capsys, tmp_path):
    assert studies.main(["longdoc", "--dry-run", "--out", str(tmp_path), "--longdoc-steps", "50"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert [line.split()[1] for line in lines] == ["train"] * 3 + ["eval"] * 3
    assert all("training.max_steps=50" in line for line in lines[:3]) and "model.memory_size_M=0" in lines[1]
    assert all(f"--checkpoint {tmp_path / 'longdoc' / name} " in line
               for name, line in zip(studies.LONGDOC_MODELS, lines[3:]))


def test_longdoc_report(tmp_path, capsys):
    rng = random.Random(3)
    files = [{"name": f"f{i}.py", "bytes": 40000} for i in range(4)]
    per_file = {}
    for name in ("mmrec", "mmrec_no_memory"):
        per_file[name] = [[rng.uniform(1, 2) for _ in files] for _ in range(2)]
        buckets = [{"range": r, "lo": lo, "hi": hi, "per_file": v, "mean": sum(v) / len(v), "se": 0.01}
                   for r, lo, hi, v in zip(["0-2K", "2K-8K"], [0, 2048], [2048, 8192], per_file[name])]
        run = tmp_path / "longdoc" / f"{name}_eval"
        run.mkdir(parents=True)
        run.joinpath("longdoc_results.json").write_text(json.dumps(
            {"files": files, "max_bytes": 8192, "reset_every": 2048, "step": 30, "notes": [],
             "modes": {"carried": buckets, "reset": buckets}, "differences": {"reset - carried": buckets}}))
    assert studies.main(["report", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "| mmrec (30) | carried | " in out and "| mmrec_no_memory (30) | reset - carried | " in out
    row = next(line for line in out.splitlines() if line.startswith("| S = 0 minus S > 0"))
    diffs = [b - a for a, b in zip(per_file["mmrec"][1], per_file["mmrec_no_memory"][1])]
    assert f"{sum(diffs) / 4:.3f} ± " in row.split("|")[4]


def test_passkey_recipes_score_the_long_grid():
    from mm_rec.config import load_mapping

    sections, counts = [], []
    for name in ("passkey_mmrec.yaml", "passkey_transformer.yaml"):
        recipe = load_mapping(studies.CONFIGS / name)
        config = MMRecConfig.from_dict(recipe["model"])
        with torch.device("meta"):
            counts.append(count(build_model(config, recipe.get("model_type", "mmrec"))))
        section = recipe["passkey"]
        assert section["lengths"] == [2048, 8192, 32768, 65536, 131072] and section["samples"] == 5
        assert section["depths"] == [round(0.1 * i, 1) for i in range(11)]
        assert max(section["train_lengths"]) <= section["train_length"] == 2048
        if recipe.get("model_type") == "transformer":  # its max_seq_len lets it read the longest prompt and answer
            assert config.max_seq_len >= max(section["lengths"]) + section["num_digits"] - 1
        sections.append(section)
    assert sections[0] == sections[1] and all(4e6 < n < 5e6 for n in counts)
    assert abs(counts[1] - counts[0]) / counts[0] < 0.05, counts


def test_passkey_report_marks_cells_not_run(tmp_path, capsys):
    run = tmp_path / "passkey" / "transformer"
    run.mkdir(parents=True)
    cells = [{"length": 2048, "depth": 0.0, "accuracy": 0.5}, {"length": 131072, "depth": 0.0, "accuracy": None}]
    run.joinpath("passkey_results.json").write_text(json.dumps({"results": cells, "curve": [{"step": 4}]}))
    assert studies.main(["report", "--out", str(tmp_path)]) == 0
    assert "| transformer (4 steps) | 0.500 | not run |" in capsys.readouterr().out
