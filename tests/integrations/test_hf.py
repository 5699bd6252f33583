"""The transformers integration: AutoModelForCausalLM / AutoTokenizer load MM-Rec folders, and
generate (the recurrent state as its cache) gives what MMRecModel.generate gives, row by row."""

import json
import os
import subprocess
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers")

from mm_rec import MMRecModel  # noqa: E402
from mm_rec.data.tokenizers import BPETokenizer, ByteTokenizer  # noqa: E402
from mm_rec.integrations.hf import MMRecCache, MMRecForCausalLM, MMRecHFConfig  # noqa: E402
from mm_rec.loading import checkpoint_dir  # noqa: E402

from .conftest import CONFIG  # noqa: E402


def test_auto_classes_load_a_save_pretrained_folder(saved):
    model, folder = saved
    assert json.loads((folder / "config.json").read_text())["model_type"] == "mmrec"
    config = transformers.AutoConfig.from_pretrained(folder)
    assert isinstance(config, MMRecHFConfig) and config.to_mmrec_config() == CONFIG
    assert (config.hidden_size, config.num_hidden_layers) == (CONFIG.hidden_dim, CONFIG.num_layers)
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder)
    assert type(hf) is MMRecForCausalLM and not hf.training
    assert hf.model.state_dict().keys() == model.state_dict().keys()
    assert all(torch.equal(a, b) for a, b in zip(hf.model.state_dict().values(), model.state_dict().values()))
    ids = torch.randint(0, 256, (2, 30))
    with torch.no_grad():
        out = hf(ids, labels=ids)
        ref = model(ids[:, :-1], labels=ids[:, 1:])
    torch.testing.assert_close(out.logits, model(ids).logits)
    torch.testing.assert_close(out.loss, ref.loss)  # transformers' labels: unshifted, the model shifts


def test_greedy_generation_equals_the_models_own(saved):
    model, folder = saved
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder)
    ids = torch.randint(0, 256, (3, 21))
    expected = model.generate(ids, max_new_tokens=16, temperature=0)
    assert torch.equal(hf.generate(ids, max_new_tokens=16, do_sample=False), expected)
    # the state is the cache: each step feeds the new token only, and the cache is returned
    out = hf.generate(ids, max_new_tokens=16, do_sample=False, return_dict_in_generate=True)
    assert torch.equal(out.sequences, expected)
    cache = out.cache if hasattr(out, "cache") else out.past_key_values
    assert isinstance(cache, MMRecCache) and cache.get_seq_length() in (36, 37)  # the last token may stay unfed
    assert torch.equal(cache.state.position, torch.full((3,), cache.get_seq_length()))


def test_sampling_equals_the_models_own_with_the_same_seed(saved):
    model, folder = saved
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder)
    ids = torch.randint(0, 256, (2, 13))
    torch.manual_seed(7)
    expected = model.generate(ids, max_new_tokens=20, temperature=0.8, top_k=30)
    torch.manual_seed(7)
    sampled = hf.generate(ids, max_new_tokens=20, do_sample=True, temperature=0.8, top_k=30, top_p=1.0)
    assert torch.equal(sampled, expected)
    assert not torch.equal(sampled, model.generate(ids, max_new_tokens=20, temperature=0))  # it did sample


def test_left_padded_batch_equals_each_row_alone(saved):
    """Padding never enters the state: each row's logits at every step equal that row's alone."""
    _, folder = saved
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder)
    lengths = [17, 5, 11, 17]
    prompts = [torch.randint(0, 256, (n,)) for n in lengths]
    T = max(lengths)
    ids = torch.stack([torch.cat([torch.full((T - len(p),), 32), p]) for p in prompts])  # pad with spaces
    mask = torch.stack([torch.cat([torch.zeros(T - len(p)), torch.ones(len(p))]) for p in prompts]).long()
    batched = hf.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False,
                          return_dict_in_generate=True, output_logits=True)
    for row, prompt in enumerate(prompts):
        alone = hf.generate(prompt[None], max_new_tokens=12, do_sample=False,
                            return_dict_in_generate=True, output_logits=True)
        assert torch.equal(batched.sequences[row, T:], alone.sequences[0, len(prompt):])
        for step_batched, step_alone in zip(batched.logits, alone.logits):
            torch.testing.assert_close(step_batched[row], step_alone[0], rtol=1e-4, atol=1e-5)


def test_padding_that_is_not_on_the_left_is_refused(saved):
    _, folder = saved
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder)
    ids = torch.randint(0, 256, (2, 6))
    for mask in ([[1, 1, 1, 1, 0, 0], [1] * 6], [[0, 1, 0, 1, 1, 1], [1] * 6], [[0] * 6, [1] * 6]):
        with pytest.raises(ValueError, match="attention_mask"):
            hf(ids, attention_mask=torch.tensor(mask))


def test_auto_tokenizer_reads_byte_and_bpe_checkpoints(tmp_path, saved):
    _, folder = saved
    text = "héllo wörld\n\tdef f(x):  return x  # 日本 😀 \x00"
    byte = transformers.AutoTokenizer.from_pretrained(folder)
    assert byte(text, add_special_tokens=True)["input_ids"] == ByteTokenizer().encode(text.encode())
    assert byte.decode(ByteTokenizer().encode(text.encode())) == text
    assert byte.padding_side == "left"

    corpus = [text, "the quick brown fox jumps over the lazy dog " * 20, "def main():\n    return 0\n" * 10]
    bpe = BPETokenizer.train(iter(corpus), vocab_size=300)
    bpe_folder = tmp_path / "bpe"
    bpe_folder.mkdir()
    bpe.save(bpe_folder)
    MMRecModel(CONFIG.replace(vocab_size=bpe.vocab_size)).save_pretrained(bpe_folder)
    auto = transformers.AutoTokenizer.from_pretrained(bpe_folder)
    assert auto(text)["input_ids"] == bpe.encode(text.encode()) and auto.decode(bpe.encode(text.encode())) == text


def test_checkpoint_and_run_folders(tmp_path):
    """AutoModelForCausalLM reads a checkpoint folder; MMRecForCausalLM also a run folder (its newest checkpoint)."""
    run = tmp_path / "run"
    models = {}
    for step in (4, 8):
        torch.manual_seed(step)
        models[step] = MMRecModel(CONFIG)
        models[step].save_pretrained(checkpoint_dir(run, step))
        ByteTokenizer().save(checkpoint_dir(run, step))
    ids = torch.randint(0, 256, (1, 10))
    with torch.no_grad():
        expected = models[8].eval()(ids).logits
        auto = transformers.AutoModelForCausalLM.from_pretrained(checkpoint_dir(run, 8))
        torch.testing.assert_close(auto(ids).logits, expected)
        torch.testing.assert_close(MMRecForCausalLM.from_pretrained(run)(ids).logits, expected)
    with pytest.raises(OSError, match="not found"):
        MMRecForCausalLM.from_pretrained(tmp_path / "missing")


def test_save_pretrained_writes_the_mmrec_folder(tmp_path, saved):
    model, folder = saved
    hf = MMRecForCausalLM.from_pretrained(folder)
    hf.save_pretrained(tmp_path / "again")
    reloaded = MMRecModel.from_pretrained(tmp_path / "again")
    assert all(torch.equal(a, b) for a, b in zip(reloaded.state_dict().values(), model.state_dict().values()))
    fresh = transformers.AutoModelForCausalLM.from_config(MMRecHFConfig.from_mmrec_config(CONFIG))
    assert type(fresh) is MMRecForCausalLM and fresh.model.config == CONFIG


def _python(code: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)


def test_import_mm_rec_registers_lazily_in_either_order():
    code = """
import sys
import mm_rec
assert "transformers" not in sys.modules, "import mm_rec must not import transformers"
import transformers
from transformers import AutoConfig
assert type(AutoConfig.for_model("mmrec")).__name__ == "MMRecHFConfig"
"""
    result = _python(code)
    assert result.returncode == 0, result.stderr
    result = _python("import transformers\nimport mm_rec\nfrom transformers import AutoConfig\n"
                     "assert type(AutoConfig.for_model('mmrec')).__name__ == 'MMRecHFConfig'")
    assert result.returncode == 0, result.stderr


def test_import_mm_rec_works_without_transformers():
    result = _python("import sys\nsys.modules['transformers'] = None\nsys.modules['lm_eval'] = None\n"
                     "import mm_rec\nprint(mm_rec.MMRecModel.__name__)")
    assert result.returncode == 0 and result.stdout.strip() == "MMRecModel", result.stderr
