"""The training loop in-process: metrics, checkpoints, exact resume, the NaN/Inf guard, precisions."""

import json
import math

import pytest
import torch

from mm_rec import MMRecModel
from mm_rec.generation import generate_text
from mm_rec.loading import load_model, load_model_and_tokenizer
from mm_rec.training import NonFiniteError, RunConfig, train
from mm_rec.training import checkpoint as ckpt
from mm_rec.training import trainer as trainer_module

from .conftest import TINY, read_metrics

QUIET = dict(log=lambda *_: None)


def recipe(data, *extra):
    return RunConfig.load(None, [f"data.path={data}", *TINY, *extra])


def strip_timing(rows, every=None):
    """Rows without wall-clock fields; with `every`, evaluations only at multiples of it (a run
    that stops at step N also evaluates at N)."""
    rows = [r for r in rows if "loss" in r or every is None or r["step"] % every == 0]
    return [{k: v for k, v in r.items() if k not in ("tokens_per_s", "elapsed_s")} for r in rows]


def test_metrics_checkpoints_and_sample(text_file, tmp_path, capsys):
    result = train(recipe(text_file, "training.max_steps=6", "training.save_interval=4", "training.keep_last=1",
                          "training.sample_tokens=20"), tmp_path / "run", **QUIET)
    rows = read_metrics(tmp_path / "run")
    train_rows = [r for r in rows if "loss" in r]
    assert [r["step"] for r in train_rows] == list(range(1, 7))
    assert all({"step", "loss", "lr", "tokens_per_s", "grad_norm", "tokens"} <= set(r) for r in train_rows)
    evals = [r for r in rows if "val_loss" in r]
    assert [r["step"] for r in evals] == [5, 6]
    assert all(r["val_bpb"] == pytest.approx(r["val_loss"] / math.log(2)) for r in evals)  # byte tokens: 1 byte each
    assert train_rows[-1]["loss"] < train_rows[0]["loss"]
    # keep_last=1: only the final checkpoint is left; it is a from_pretrained folder too
    assert [p.name for p in ckpt.list_checkpoints(tmp_path / "run")] == ["step_00000006"]
    model = MMRecModel.from_pretrained(result.checkpoint)
    assert model.config.num_layers == 1
    assert result.sample is not None and (tmp_path / "run" / "sample.txt").read_text() == result.sample
    assert result.sample in capsys.readouterr().out


def test_resume_with_gradient_accumulation_is_exact(text_file, tmp_path):
    config = recipe(text_file, "training.save_interval=100", "training.grad_accum_steps=2")
    config.training.max_steps = 6
    train(config, tmp_path / "a", **QUIET)
    config.training.max_steps = 3
    train(config, tmp_path / "b", **QUIET)
    config.training.max_steps = 6
    train(config, tmp_path / "b", resume="auto", **QUIET)
    assert strip_timing(read_metrics(tmp_path / "a"), 5) == strip_timing(read_metrics(tmp_path / "b"), 5)


@pytest.mark.parametrize("first, then", [("sharded", "sharded"), ("sharded", "full"), ("full", "sharded")])
def test_sharded_checkpoints_resume_exactly_and_load_in_one_process(text_file, tmp_path, first, then):
    """training.checkpoint_format=sharded writes DCP shards instead of model.safetensors and
    optimizer.pt; resuming reads either format exactly, and load_model reads the shards."""
    def config(fmt, steps):
        config = recipe(text_file, "training.save_interval=2", f"training.checkpoint_format={fmt}")
        config.training.max_steps = steps
        return config

    train(config("full", 4), tmp_path / "one", **QUIET)
    train(config(first, 2), tmp_path / "two", **QUIET)
    saved = ckpt.list_checkpoints(tmp_path / "two")[-1]
    assert (saved / "sharded" / ".metadata").is_file() == (first == "sharded")
    assert (saved / ckpt.WEIGHTS).is_file() == (saved / ckpt.OPTIMIZER).is_file() == (first == "full")
    train(config(then, 4), tmp_path / "two", resume="auto", **QUIET)
    assert strip_timing(read_metrics(tmp_path / "one"), 4) == strip_timing(read_metrics(tmp_path / "two"), 4)
    one, two = load_model(tmp_path / "one"), load_model(tmp_path / "two")
    for (name, a), b in zip(one.state_dict().items(), two.state_dict().values()):
        assert torch.equal(a, b), name
    if first == "sharded":  # the manifest covers the shards too
        shard = next((saved / "sharded").glob("*.distcp"))
        shard.write_bytes(shard.read_bytes()[:-10])
        with pytest.raises(ckpt.CheckpointError, match="damaged"):
            ckpt.load_checkpoint(saved)


def test_a_checkpoint_with_the_old_schedule_state_resumes_exactly(text_file, tmp_path):
    """Checkpoints written before the schedule was a LambdaLR hold {"step_count": N}; it converts on load."""
    config = recipe(text_file, "training.save_interval=3")
    config.training.max_steps = 6
    train(config, tmp_path / "a", **QUIET)
    config.training.max_steps = 3
    train(config, tmp_path / "b", **QUIET)
    saved = ckpt.list_checkpoints(tmp_path / "b")[-1]
    state = torch.load(saved / ckpt.TRAINER_STATE, weights_only=True)
    state["scheduler"] = {"step_count": 3}
    torch.save(state, saved / ckpt.TRAINER_STATE)
    manifest = json.loads((saved / ckpt.MANIFEST).read_text())
    manifest["files"][ckpt.TRAINER_STATE] = (saved / ckpt.TRAINER_STATE).stat().st_size
    (saved / ckpt.MANIFEST).write_text(json.dumps(manifest))
    config.training.max_steps = 6
    train(config, tmp_path / "b", resume="auto", **QUIET)
    assert strip_timing(read_metrics(tmp_path / "a"), 5) == strip_timing(read_metrics(tmp_path / "b"), 5)


def test_memory_state_is_checkpointed(text_file, tmp_path):
    result = train(recipe(text_file, "training.max_steps=3"), tmp_path / "run", **QUIET)
    local = torch.load(result.checkpoint / ckpt.rank_file(0), weights_only=True)
    assert local["memory_state"]["position"].tolist() == [96] * 4  # 3 windows of 32 tokens per row
    assert int(local["data"]["offset"][0]) == 96


def test_existing_run_needs_resume(text_file, tmp_path):
    config = recipe(text_file, "training.max_steps=2")
    train(config, tmp_path / "run", **QUIET)
    with pytest.raises(ckpt.CheckpointError, match="--resume auto"):
        train(config, tmp_path / "run", **QUIET)
    assert train(config, tmp_path / "run", resume="auto", **QUIET).step == 2  # nothing left to do


def test_activation_checkpointing_changes_nothing(text_file, tmp_path):
    train(recipe(text_file, "training.max_steps=3"), tmp_path / "a", **QUIET)
    train(recipe(text_file, "training.max_steps=3", "training.activation_checkpointing=true"), tmp_path / "b", **QUIET)
    assert strip_timing(read_metrics(tmp_path / "a")) == strip_timing(read_metrics(tmp_path / "b"))


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_reduced_precision_runs(text_file, tmp_path, precision):
    config = recipe(text_file, "training.max_steps=3", f"training.precision={precision}")
    result = train(config, tmp_path / "r", **QUIET)
    assert result.step == 3 and result.eval is not None
    rows = [r for r in read_metrics(tmp_path / "r") if "loss" in r]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in rows)


def test_nonfinite_steps_stop_the_run_and_name_the_module(text_file, tmp_path, monkeypatch):
    build = trainer_module.build_model

    def poisoned(*args):
        model = build(*args)
        model.blocks[0].ffn.down.register_forward_hook(lambda m, args, out: out * float("nan"))
        return model

    monkeypatch.setattr(trainer_module, "build_model", poisoned)
    lines = []
    with pytest.raises(NonFiniteError, match="3 non-finite steps in a row"):
        train(recipe(text_file, "training.max_steps=10", "training.max_nonfinite_steps=3"), tmp_path / "run",
              debug=True, log=lines.append)
    rows = read_metrics(tmp_path / "run")
    assert [r.get("skipped") for r in rows] == [True] * 3
    assert any("first non-finite output in blocks.0.ffn.down" in line for line in lines)
    assert any(line.startswith("gradient flow at step 1") for line in lines)
    assert not ckpt.list_checkpoints(tmp_path / "run")  # nothing saved from a broken model


def test_transformer_baseline(text_file, tmp_path):
    pytest.importorskip("mm_rec.baselines.transformer")
    config = recipe(text_file, "training.max_steps=2", "model_type=transformer")
    result = train(config, tmp_path / "t", **QUIET)
    assert json.loads((result.checkpoint / ckpt.MODEL_CONFIG).read_text())["model_type"] == "transformer"
    model, _, _ = load_model_and_tokenizer(tmp_path / "t", torch.device("cpu"))
    assert type(model).__name__ == "TransformerModel"
    config.training.max_steps = 3
    assert train(config, tmp_path / "t", resume="auto", **QUIET).step == 3


def test_bpe_tokenizer_run(text_file, tmp_path):
    pytest.importorskip("tokenizers")
    config = recipe(text_file, "training.max_steps=2", "data.tokenizer=bpe", "model.vocab_size=320")
    result = train(config, tmp_path / "bpe", **QUIET)
    model, tokenizer, _ = load_model_and_tokenizer(tmp_path / "bpe", torch.device("cpu"))
    assert tokenizer.kind == "bpe" and tokenizer.vocab_size == 320 == model.config.vocab_size
    assert result.eval.bytes > result.eval.tokens  # BPE tokens stand for more than one byte on average
    text = generate_text(model, tokenizer, "def ", 10, 1.0, None, 0, torch.device("cpu"))
    assert text.startswith("def ")


def test_tensorboard_logs(text_file, tmp_path):
    pytest.importorskip("tensorboard")
    train(recipe(text_file, "training.max_steps=2", "training.tensorboard=true"), tmp_path / "tb", **QUIET)
    assert list((tmp_path / "tb" / "tensorboard").glob("events.out.tfevents.*"))


def test_sequence_parallelism_is_refused_for_the_transformer(text_file, tmp_path):
    config = recipe(text_file, "model_type=transformer", "distributed.parallel=sp")
    with pytest.raises(ValueError, match="parallel sp"):
        train(config, tmp_path / "run", **QUIET)
