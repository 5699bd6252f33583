"""Text-level generation (mm_rec/generation.py): batches of prompts of different lengths, stop strings
and stop tokens per row, streaming that never shows text a stop string will cut."""

import pytest
import torch

from mm_rec import MMRecConfig, MMRecModel
from mm_rec.baselines.transformer import TransformerModel
from mm_rec.data.tokenizers import ByteTokenizer
from mm_rec.generation import FINISH_LENGTH, FINISH_STOP, _Row, generate_texts

PROMPTS = ["def f(x):", "a", "import os\nimport sys\n", "class Foo(Bar):\n    pass", "x = [1, 2"]


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    cfg = MMRecConfig.from_preset("tiny", num_layers=2, hidden_dim=64, num_heads=2, memory_size_M=6, chunk_size=4,
                                  slots_per_block=2, recent_slots=2, tie_embeddings=False)
    model = MMRecModel(cfg).eval()
    with torch.no_grad():  # a model whose greedy output varies from token to token, in printable ASCII
        for name, p in model.named_parameters():
            if any(key in name for key in ("write_query", "importance", "null_logit", "level_logits")):
                p.copy_(torch.randn_like(p))
        model.embed.weight.normal_(0.0, 1.0)
        model.lm_head.weight.normal_(0.0, 1.0)
        model.lm_head.weight[:32] = 0.0  # logit 0: below the best of the 95 printable bytes
        model.lm_head.weight[127:] = 0.0
    return model


def greedy(model, prompts, **kwargs):
    return generate_texts(model, ByteTokenizer(), prompts, 24, 0.0, None, 0, torch.device("cpu"), **kwargs)


def test_a_batch_of_prompts_of_different_lengths_generates_what_each_does_alone(model):
    batched = greedy(model, PROMPTS, batch_size=3)
    for prompt, completion in zip(PROMPTS, batched):
        alone, = greedy(model, [prompt], batch_size=1)
        assert completion == alone and completion.prompt == prompt and completion.finish == FINISH_LENGTH
    assert len({c.text for c in batched}) > 1


def test_stop_strings_end_rows_independently_and_streaming_shows_only_what_stays(model):
    full = greedy(model, PROMPTS)
    text = full[0].text
    stop = text[5:8]  # ends row 0 at its first occurrence
    streamed = {}
    stopped = greedy(model, PROMPTS, batch_size=5, stop=[stop, "\x00never"],
                     on_text=lambda i, piece: streamed.setdefault(i, []).append(piece))
    for i, (before, after) in enumerate(zip(full, stopped)):
        cut = before.text.find(stop)
        assert after.text == (before.text if cut < 0 else before.text[:cut])
        assert after.finish == (FINISH_LENGTH if cut < 0 else FINISH_STOP)
        assert "".join(streamed.get(i, [])) == after.text
    assert stopped[0].finish == FINISH_STOP and len(streamed[0]) > 1  # several pieces: streamed as it came


def test_stop_tokens_end_a_row_without_entering_its_text(model):
    full = greedy(model, PROMPTS)
    token = ord(full[0].text[3])  # byte tokens: one character each
    stopped = greedy(model, PROMPTS, stop_tokens=[token])
    for before, after in zip(full, stopped):
        cut = before.text.find(chr(token))
        assert after.text == (before.text if cut < 0 else before.text[:cut])
        assert after.finish == (FINISH_LENGTH if cut < 0 else FINISH_STOP)


class CharDecoder:
    def push(self, token):
        return chr(token)

    def flush(self):
        return ""


def row_output(tokens, stop):
    pieces = []
    row = _Row(CharDecoder(), stop, pieces.append)
    for token in tokens:
        row.push(ord(token), ())
        if row.finish:
            break
    row.close()
    return row.text, pieces, row.finish


def test_text_that_may_start_a_stop_string_is_held_back_until_it_cannot():
    assert row_output("aENb", ["END"]) == ("aENb", ["a", "ENb"], FINISH_LENGTH)
    assert row_output("aENDxyz", ["END"]) == ("a", ["a"], FINISH_STOP)
    assert row_output("abab", ["bb", "ba"]) == ("a", ["a"], FINISH_STOP)  # the earliest stop string wins
    assert row_output("xEN", ["END"]) == ("xEN", ["x", "EN"], FINISH_LENGTH)  # released at the end


def test_bad_arguments_are_refused_before_generating(model):
    with pytest.raises(ValueError, match="batch_size"):
        greedy(model, PROMPTS, batch_size=0)
    with pytest.raises(ValueError, match="stop string"):
        greedy(model, PROMPTS, stop=[""])
    small = MMRecModel(MMRecConfig.from_preset("tiny", num_layers=1, vocab_size=128))
    with pytest.raises(ValueError, match=r"prompt 2: token ids must lie in \[0, 128\)"):
        greedy(small, ["fine", "grüße"])


def test_compile_step_reaches_the_step_path_and_is_refused_for_a_transformer(model, monkeypatch):
    """compile_step (`mmrec generate --compile`) is passed to MM-Rec's generate_stream (the compiled step
    itself: tests/test_decode.py); a model without a one-token step refuses it before generating."""
    seen = []
    original = MMRecModel.generate_stream

    def recording(self, *args, **kwargs):
        seen.append(kwargs.get("compile_step", False))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(MMRecModel, "generate_stream", recording)
    assert greedy(model, PROMPTS[:2], compile_step=False) == greedy(model, PROMPTS[:2])
    with monkeypatch.context() as patch:  # the compiled step swapped for the eager one: only the plumbing here
        patch.setattr("mm_rec.decoding.torch.compile", lambda fn, **kwargs: fn)
        assert greedy(model, PROMPTS[:2], compile_step=True) == greedy(model, PROMPTS[:2])
    assert seen == [False, False, True, False]
    with pytest.raises(ValueError, match="needs an MM-Rec model"):
        greedy(TransformerModel(MMRecConfig.from_preset("tiny", num_layers=1)), PROMPTS, compile_step=True)
