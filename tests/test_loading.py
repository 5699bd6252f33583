"""mm_rec.loading: one build_model and one load_model for both model types, the three kinds of
folder, and one-line errors (FileNotFoundError for what is missing, ValueError for what is
damaged or foreign)."""

import json

import pytest
import torch

from mm_rec import MMRecConfig, MMRecModel
from mm_rec.baselines.transformer import TransformerModel
from mm_rec.data.tokenizers import ByteTokenizer
from mm_rec.loading import build_model, checkpoint_dir, find_model_dir, load_model, load_model_and_tokenizer

CONFIG = MMRecConfig(vocab_size=256, hidden_dim=16, num_layers=1, num_heads=2, ffn_dim=24, num_memories=2, mem_dim=4,
                     memory_size_M=3, chunk_size=4)


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    return a.state_dict().keys() == b.state_dict().keys() and all(
        torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def one_line_error(error: pytest.ExceptionInfo, *needles: str) -> None:
    message = str(error.value)
    assert "\n" not in message
    for needle in needles:
        assert needle in message, message


@pytest.mark.parametrize("model_type, cls", [("mmrec", MMRecModel), ("transformer", TransformerModel)])
def test_build_save_load_round_trip(tmp_path, model_type, cls):
    torch.manual_seed(0)
    model = build_model(CONFIG, model_type)
    assert type(model) is cls and model.config == CONFIG
    model.save_pretrained(tmp_path / "model")
    loaded = load_model(tmp_path / "model")
    assert type(loaded) is cls and not loaded.training  # ready for inference
    assert same_weights(model, loaded)
    ids = torch.randint(0, 256, (2, 12))
    with torch.no_grad():
        assert torch.equal(model.eval()(ids).logits, loaded(ids).logits)
    assert same_weights(loaded, cls.from_pretrained(tmp_path / "model"))  # the class method reads the same folder


def test_a_run_folder_loads_its_newest_checkpoint_with_its_tokenizer(tmp_path):
    run = tmp_path / "run"
    models = {}
    for step in (3, 12, 7):
        torch.manual_seed(step)
        models[step] = build_model(CONFIG, "transformer" if step == 12 else "mmrec")
        models[step].save_pretrained(checkpoint_dir(run, step))
        ByteTokenizer().save(checkpoint_dir(run, step))
    assert find_model_dir(run) == checkpoint_dir(run, 12)  # by step number, not by name order or age
    model, tokenizer, folder = load_model_and_tokenizer(run)
    assert folder == checkpoint_dir(run, 12) and tokenizer.kind == "byte"
    assert type(model) is TransformerModel and same_weights(model, models[12])
    assert same_weights(load_model(checkpoint_dir(run, 7)), models[7])


def test_missing_folders_and_files_raise_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError) as error:
        load_model(tmp_path / "nowhere")
    one_line_error(error, "not found", "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError) as error:
        load_model(tmp_path / "empty")
    one_line_error(error, "neither a model", "checkpoints/")
    build_model(CONFIG).save_pretrained(tmp_path / "model")
    (tmp_path / "model" / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError) as error:
        load_model(tmp_path / "model")
    one_line_error(error, "model.safetensors not found")


def test_a_folder_written_before_the_mmrec_marker_loads_as_mmrec(tmp_path):
    folder = tmp_path / "model"
    build_model(CONFIG).save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    assert config.pop("model_type") == "mmrec"  # the marker transformers' AutoConfig reads
    (folder / "config.json").write_text(json.dumps(config))
    assert type(load_model(folder)) is MMRecModel and type(MMRecModel.from_pretrained(folder)) is MMRecModel


def test_damaged_or_foreign_folders_raise_value_error(tmp_path):
    folder = tmp_path / "model"
    build_model(CONFIG).save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())

    (folder / "config.json").write_text('{"vocab_size": 256,')
    with pytest.raises(ValueError) as error:
        load_model(folder)
    one_line_error(error, "config.json is not valid JSON")

    (folder / "config.json").write_text(json.dumps({**config, "hidden_dim": 32}))  # weights of another shape
    with pytest.raises(ValueError) as error:
        load_model(folder)
    one_line_error(error, "could not load weights from", "model.safetensors")

    (folder / "config.json").write_text(json.dumps({**config, "model_type": "rnn"}))
    with pytest.raises(ValueError) as error:
        load_model(folder)
    one_line_error(error, "unknown model_type 'rnn'")

    (folder / "config.json").write_text(json.dumps({**config, "model_type": "transformer"}))
    with pytest.raises(ValueError) as error:
        MMRecModel.from_pretrained(folder)
    one_line_error(error, "holds a 'transformer' model, not a 'mmrec' one")

    with pytest.raises(ValueError) as error:
        build_model(CONFIG, "rnn")
    one_line_error(error, "unknown model_type 'rnn'", "mmrec", "transformer")


def test_a_tokenizer_larger_than_the_vocabulary_is_refused(tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    folder = tmp_path / "model"
    build_model(CONFIG.replace(vocab_size=128)).save_pretrained(folder)
    vocab = {chr(ord("a") + i % 26) * (1 + i // 26): i for i in range(200)}
    bpe = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="a"))
    bpe.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"type": "bpe"}))
    assert isinstance(load_model(folder), MMRecModel)  # the model alone does not need the tokenizer
    with pytest.raises(ValueError) as error:
        load_model_and_tokenizer(folder)
    one_line_error(error, "the tokenizer has 200 tokens, the model only 128")


def test_a_sharded_checkpoint_that_does_not_fit_is_a_value_error(tmp_path):
    from mm_rec.distributed import save_sharded_state

    folder = tmp_path / "step_00000001"
    build_model(CONFIG).save_pretrained(folder)
    save_sharded_state(folder / "sharded", build_model(CONFIG.replace(hidden_dim=32)))
    (folder / "model.safetensors").unlink()
    with pytest.raises(ValueError) as error:
        load_model(folder)
    one_line_error(error, "could not load the sharded weights in", "sharded")
