"""Weight-only INT8 / INT4 quantization (mm_rec/quantization.py) on the CPU: each quantized weight
within half a quantization step of the float weight, logits close to the float model's, the step
path equal to the forward on the same quantized weights, the save/load round trip, the command
line's --quantize, and one-line errors. Skipped without torchao, except the error it gives then."""

import copy
import importlib.util
import json
import sys

import pytest
import torch
from test_cli import assert_one_line_error, run
from torch import nn

from mm_rec import MMRecConfig, MMRecModel
from mm_rec.baselines.transformer import TransformerModel
from mm_rec.core.decode_state import DecodeState
from mm_rec.loading import load_model
from mm_rec.model import WEIGHTS_NAME
from mm_rec.quantization import (
    QUANTIZATION_NAME,
    QUANTIZED_WEIGHTS_NAME,
    dequantize_model,
    load_quantized,
    parameter_bytes,
    quantize_model,
)

needs_torchao = pytest.mark.skipif(importlib.util.find_spec("torchao") is None,
                                   reason="torchao is not installed (pip install 'mm-rec[quant]')")

# Sizes chosen so that int4 (groups of 32) quantizes some layers and must skip others: the FFN, the output
# projection and an untied LM head fit the CPU kernel; the fused input projection (148 outputs, not a multiple of
# 16) and the memory's projection (16 inputs, fewer than a group) do not.
CONFIG = MMRecConfig(vocab_size=256, hidden_dim=32, num_layers=2, num_heads=2, ffn_dim=64, num_memories=2, mem_dim=8,
                     memory_size_M=4, chunk_size=4, tie_embeddings=False)
MODES = [("int8", None), ("int4", 32)]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def half_step(weight: torch.Tensor, mode: str, group_size: int | None) -> torch.Tensor:
    """Half the quantization step of every entry of `weight` [out, in]: int8 is symmetric per row, 256 levels
    over [-amax, amax]; int4 is asymmetric per group of `group_size` inputs, 16 levels over [min, max]."""
    if mode == "int8":
        return (weight.abs().amax(dim=1, keepdim=True) / 127.5 / 2).expand_as(weight)
    groups = weight.unflatten(1, (-1, group_size))
    step = (groups.amax(-1, keepdim=True) - groups.amin(-1, keepdim=True)) / 15
    return (step / 2).expand_as(groups).flatten(1)


def quantized_copy(model, mode, group_size):
    copied = copy.deepcopy(model)
    info = quantize_model(copied, mode, group_size)
    return copied, info


@needs_torchao
@pytest.mark.parametrize("mode, group_size", MODES)
def test_each_weight_lies_within_half_a_step_of_the_float_weight(mode, group_size):
    """Round to nearest: every quantized entry is within half its step of the float one (and not all equal to
    it); the layers left out, the embedding, W_g and the other parameters are untouched."""
    model = MMRecModel(CONFIG).eval()
    quantized, info = quantized_copy(model, mode, group_size)
    floats, dequantized = dict(model.named_modules()), dequantize_model(quantized)
    assert info.modules and (mode == "int8" or info.skipped)
    if mode == "int4":
        assert all("in_proj" in name or "memory_proj" in name for name in info.skipped), info.skipped
    for name, module in quantized.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        original = floats[name].weight.detach()
        if name in info.skipped:
            assert type(module.weight) is nn.Parameter and torch.equal(module.weight, original), name
            continue
        assert type(module.weight) is not nn.Parameter, name  # a torchao tensor
        error = (dequantized.get_submodule(name).weight - original).abs()
        assert bool((error <= half_step(original, mode, group_size) * (1 + 1e-4) + 1e-7).all()), name
        assert error.max() > 0, name
    float_state = model.state_dict()
    for key, value in quantized.state_dict().items():
        if key.removesuffix(".weight") not in info.modules:
            assert torch.equal(value, float_state[key]), key


@needs_torchao
@pytest.mark.parametrize("mode, group_size", MODES)
def test_logits_are_close_to_the_float_model_and_equal_to_its_dequantized_weights(mode, group_size):
    """On random tokens. Equal (to fp32 rounding) to the float model holding the dequantized weights: the
    quantized kernels compute the same products. Close to the float model: relative logit error below 5% for
    int8 and 30% for int4. Why those bounds: the per-entry rounding error above is at most half a step, i.e.
    about 1/255 of a row's range (int8) or 1/30 of a group's (int4); on these random Gaussian weights that is
    ~0.7% and ~9% relative error per matrix product, and a logit passes through a dozen of them (measured:
    ~1.5% and ~10%). A broken scale, zero point or layout gives errors of order 100%."""
    model = MMRecModel(CONFIG).eval()
    quantized, info = quantized_copy(model, mode, group_size)
    dequantized = dequantize_model(quantized)
    assert dequantized.quantization is None and all(type(p) is nn.Parameter for p in dequantized.parameters())
    ids = torch.randint(0, CONFIG.vocab_size, (3, 40))
    with torch.no_grad():
        reference, got, same_weights = model(ids).logits, quantized(ids).logits, dequantized(ids).logits
    assert rel(got, same_weights) < 1e-5
    assert 0 < rel(got, reference) < (0.05 if mode == "int8" else 0.3)
    assert "lm_head" in info.modules  # untied: the LM head is quantized too
    assert parameter_bytes(quantized) < parameter_bytes(model)


@needs_torchao
@pytest.mark.parametrize("mode, group_size", MODES)
def test_step_equals_forward_on_the_quantized_weights(mode, group_size):
    """Invariant I5 with quantized weights: both paths multiply by the same quantized weights, so they agree
    to fp32 rounding (the bound of the fp32 step tests), whatever the quantization error."""
    model, _ = quantized_copy(MMRecModel(CONFIG).eval(), mode, group_size)
    ids = torch.randint(0, CONFIG.vocab_size, (2, 30))
    logits, memory = model.prefill(ids[:, :9])
    decode = DecodeState.from_memory_state(memory, CONFIG)
    steps = [logits] + [model.step(ids[:, t], decode) for t in range(9, 29)]
    with torch.no_grad():
        full = model(ids[:, :29]).logits[:, 8:]
    assert rel(torch.stack(steps, dim=1), full) < 1e-5
    generated = model.generate(ids[:, :5], 8, temperature=0)  # the step loop generate runs
    with torch.no_grad():
        for t in range(5, 13):  # greedy: each token the argmax of the forward over what precedes it
            assert torch.equal(generated[:, t], model(generated[:, :t]).logits[:, -1].argmax(-1))


@needs_torchao
@pytest.mark.parametrize("model_class", [MMRecModel, TransformerModel])
@pytest.mark.parametrize("mode, group_size", MODES)
def test_save_and_load_give_the_same_logits(tmp_path, model_class, mode, group_size):
    """save_pretrained of a quantized model writes quantization.json and model.pt (no safetensors); load_model
    rebuilds it: identical logits, the same quantization, tied weights still tied. An unquantized save into the
    same folder replaces the quantized files."""
    config = CONFIG.replace(tie_embeddings=True)
    model, info = quantized_copy(model_class(config).eval(), mode, group_size)
    model.save_pretrained(tmp_path / "q")
    files = {p.name for p in (tmp_path / "q").iterdir()}
    assert files == {"config.json", QUANTIZATION_NAME, QUANTIZED_WEIGHTS_NAME}
    loaded = load_model(tmp_path / "q")
    assert type(loaded) is model_class and loaded.quantization == info and not loaded.training
    assert loaded.lm_head.weight is loaded.embed.weight
    ids = torch.randint(0, config.vocab_size, (2, 24))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)
    assert model_class.from_pretrained(tmp_path / "q").quantization == info
    model_class(config).save_pretrained(tmp_path / "q")
    assert {p.name for p in (tmp_path / "q").iterdir()} == {"config.json", WEIGHTS_NAME}
    assert load_model(tmp_path / "q").quantization is None


@needs_torchao
def test_refusals(tmp_path):
    model = MMRecModel(CONFIG)
    for mode, group_size, needle in (("int2", None, "unknown quantization mode"), ("int8", 32, "int4 only"),
                                     ("int4", 48, "group_size 32 / 64 / 128")):
        with pytest.raises(ValueError, match=needle):
            quantize_model(model, mode, group_size)
    assert model.quantization is None and type(model.blocks[0].ffn.down.weight) is nn.Parameter  # untouched
    quantize_model(model, "int4", 32)
    with pytest.raises(ValueError, match="quantized already"):
        quantize_model(model, "int8")
    with pytest.raises(ValueError, match="cannot quantize blocks.0.mixer.in_proj: the CPU int4 kernel"):
        quantize_model(MMRecModel(CONFIG), "int4", 32, modules=["blocks.0.mixer.in_proj"])
    model.save_pretrained(tmp_path / "q")
    with pytest.raises(ValueError, match="packed for the cpu kernel; load it on cpu"):
        load_quantized(MMRecModel(CONFIG), tmp_path / "q", "cuda")  # refused before anything touches CUDA
    (tmp_path / "q" / QUANTIZATION_NAME).write_text(json.dumps({"format": 99}))
    with pytest.raises(ValueError, match="quantization.json is damaged: unknown format"):
        load_model(tmp_path / "q")
    (tmp_path / "q" / QUANTIZATION_NAME).write_text("{")
    with pytest.raises(ValueError, match="is damaged"):
        load_model(tmp_path / "q")


def test_without_torchao_quantizing_is_refused_in_one_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "torchao", None)  # import torchao raises ImportError
    with pytest.raises(ValueError, match=r"needs torchao \(pip install 'mm-rec\[quant\]'\)") as error:
        quantize_model(MMRecModel(CONFIG), "int8")
    assert "\n" not in str(error.value)


# ---------------------------------------------------------------------- the command line
@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A save_pretrained folder (byte tokenizer by default) and a text to score."""
    root = tmp_path_factory.mktemp("quant")
    torch.manual_seed(0)
    MMRecModel(CONFIG).save_pretrained(root / "model")
    (root / "text.txt").write_text("the quick brown fox jumps over the lazy dog. " * 40)
    return root / "model", root / "text.txt"


EVAL = ["--seq-len", 32, "--batch-size", 2, "--max-tokens", 600]


@needs_torchao
def test_eval_and_generate_quantize(saved, tmp_path, capsys):
    model_dir, text = saved
    code, out, err = run(capsys, "eval", "--checkpoint", model_dir, "--data", text, *EVAL)
    assert code == 0, err
    float_loss = float(out.split("loss ")[1].split()[0])
    for flags in (["--quantize", "int8"], ["--quantize", "int4", "--group-size", 32]):
        code, out, err = run(capsys, "eval", "--checkpoint", model_dir, "--data", text, *EVAL, *flags)
        assert code == 0, err
        assert f"weights: {flags[1]} weights" in out and "tokens/s" in out
        assert abs(float(out.split("loss ")[1].split()[0]) - float_loss) < 0.05 * float_loss
    # the folder below is quantized on the CPU (int4 packs its weights for one device type): CPU runs
    args = ["generate", "--checkpoint", model_dir, "--prompt", "the ", "--max-new-tokens", 12, "--temperature", 0,
            "--device", "cpu"]
    code, out, err = run(capsys, *args, "--quantize", "int4", "--group-size", 32)
    assert code == 0 and out.startswith("the ") and "int4 weights (groups of 32)" in err, err
    model = load_model(model_dir)
    quantize_model(model, "int4", 32)
    model.save_pretrained(tmp_path / "q")  # a folder saved quantized: loads quantized, generates the same
    assert run(capsys, "generate", *args[1:2], tmp_path / "q", *args[3:]) == (0, out, err)
    code, _, err = run(capsys, "generate", *args[1:2], tmp_path / "q", *args[3:], "--quantize", "int4")
    assert code == 0, err  # the same quantization as saved (group size as saved)
    code, _, err = run(capsys, "generate", *args[1:2], tmp_path / "q", *args[3:], "--quantize", "int8")
    assert_one_line_error(code, err, "quantized already (int4 weights (groups of 32)")
    code, _, err = run(capsys, "eval", "--checkpoint", tmp_path / "q", "--data", text, *EVAL, "--precision", "bf16",
                       "--device", "cpu")
    assert_one_line_error(code, err, "--precision bf16: the checkpoint's quantized weights are float32")
    if torch.cuda.is_available():  # weights packed for the CPU's int4 kernel are refused on CUDA, in one line
        code, _, err = run(capsys, "generate", *args[1:2], tmp_path / "q", *args[3:-1], "cuda")
        assert_one_line_error(code, err, "int4 weights packed for the cpu kernel")


@needs_torchao
def test_command_line_refusals(saved, capsys):
    model_dir, text = saved
    base = ["eval", "--checkpoint", model_dir, "--data", text, *EVAL]
    assert_one_line_error(*run(capsys, *base, "--quantize", "int4", "--group-size", 48)[::2],
                          "group_size 32 / 64 / 128")
    assert_one_line_error(*run(capsys, *base, "--quantize", "int8", "--group-size", 32)[::2],
                          "--group-size applies to --quantize int4 only")
    assert_one_line_error(*run(capsys, *base, "--group-size", 32)[::2], "--group-size applies to --quantize int4")
    assert run(capsys, *base, "--quantize", "int3")[0] == 2  # argparse's choices
    assert_one_line_error(*run(capsys, "eval", "--task", "mqar", "--checkpoint", model_dir, "--quantize", "int8")[::2],
                          "--quantize applies to the loss on a text, not to --task")


def test_command_line_without_torchao(saved, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "torchao", None)
    model_dir, text = saved
    for command in (["eval", "--data", text, *EVAL], ["generate", "--prompt", "a", "--max-new-tokens", 2]):
        code, out, err = run(capsys, command[0], "--checkpoint", model_dir, *command[1:], "--quantize", "int8")
        assert_one_line_error(code, err, "needs torchao (pip install 'mm-rec[quant]')")
        assert out == ""
