"""Tokenizers: bytes (the default, vocabulary 256) and byte-level BPE (Hugging Face `tokenizers`).

Both expose the same small interface:

    tok.vocab_size                   ids lie in [0, vocab_size)
    tok.encode(data: bytes) -> list[int]
    tok.decode(ids) -> str           invalid UTF-8 becomes U+FFFD
    tok.token_bytes() -> list[int]   bytes of text per token id (bits per byte needs them)
    tok.stream_decoder()             .push(id) -> str, for streaming generation
    tok.save(directory); load_tokenizer(directory)

A checkpoint holds `tokenizer_config.json` ({"type": "byte"} or {"type": "bpe"}) and the Hugging
Face `tokenizer.json` beside it: for BPE the tokenizer itself, for bytes an equivalent byte-level
tokenizer (id = byte value), which mm_rec does not read. The config also names the transformers
class that reads tokenizer.json, so `transformers.AutoTokenizer.from_pretrained(checkpoint)` gives
the same ids as mm_rec's tokenizer.
"""

from __future__ import annotations

import codecs
import json
from collections.abc import Iterable, Iterator
from functools import cache
from pathlib import Path

CONFIG_FILE = "tokenizer_config.json"
HF_FILE = "tokenizer.json"
# what transformers' AutoTokenizer reads in tokenizer_config.json (mm_rec reads only "type"):
# tokenizer.json as it is, decoded without English-specific space clean-up, padded on the left
# (MM-Rec's models read padding only there: mm_rec.integrations.common)
TRANSFORMERS_FIELDS = {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False,
                       "padding_side": "left"}


class ByteTokenizer:
    """Token id = byte value. Text is never decoded on the way in, so any file works."""

    kind = "byte"
    vocab_size = 256

    def encode(self, data: bytes) -> list[int]:
        return list(data)

    def decode(self, ids: Iterable[int]) -> str:
        return bytes(ids).decode("utf-8", errors="replace")

    def token_bytes(self) -> list[int]:
        return [1] * 256

    def stream_decoder(self) -> StreamDecoder:
        return StreamDecoder(lambda i: bytes((i,)))

    def fingerprint(self) -> str:
        return "byte"

    def save(self, directory: str | Path) -> None:
        _write_config(directory, "byte", 256)
        Path(directory, HF_FILE).write_text(json.dumps(byte_level_tokenizer_json()) + "\n")


class BPETokenizer:
    """A Hugging Face `tokenizers.Tokenizer`, normally byte-level BPE trained on the corpus."""

    kind = "bpe"

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
        self._bytes = _token_byte_strings(tokenizer)

    @classmethod
    def train(cls, texts: Iterator[str], vocab_size: int) -> BPETokenizer:
        tokenizers = _import_tokenizers()
        tok = tokenizers.Tokenizer(tokenizers.models.BPE())
        tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = tokenizers.decoders.ByteLevel()
        trainer = tokenizers.trainers.BpeTrainer(
            vocab_size=vocab_size, initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False)
        tok.train_from_iterator(texts, trainer=trainer)
        return cls(tok)

    @classmethod
    def from_file(cls, path: str | Path) -> BPETokenizer:
        tokenizers = _import_tokenizers()
        try:
            return cls(tokenizers.Tokenizer.from_file(str(path)))
        except Exception as err:  # the Rust side raises plain Exceptions
            raise ValueError(f"could not load tokenizer {path}: {err}") from err

    def encode(self, data: bytes) -> list[int]:
        return self.tokenizer.encode(data.decode("utf-8", errors="replace"), add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.tokenizer.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=False)

    def token_bytes(self) -> list[int]:
        return [len(b) for b in self._bytes]

    def stream_decoder(self) -> StreamDecoder:
        return StreamDecoder(self._bytes.__getitem__)

    def fingerprint(self) -> str:
        import hashlib

        return "bpe-" + hashlib.sha1(self.tokenizer.to_str().encode()).hexdigest()[:16]

    def save(self, directory: str | Path) -> None:
        self.tokenizer.save(str(Path(directory, HF_FILE)))
        _write_config(directory, "bpe", self.vocab_size)


Tokenizer = ByteTokenizer | BPETokenizer


class StreamDecoder:
    """Turns token ids into text as they arrive; a character split over tokens waits for its end."""

    def __init__(self, to_bytes):
        self.to_bytes = to_bytes
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id: int) -> str:
        return self.decoder.decode(self.to_bytes(int(token_id)))

    def flush(self) -> str:
        return self.decoder.decode(b"", final=True)


def load_tokenizer(directory: str | Path) -> Tokenizer | None:
    """The tokenizer saved in a checkpoint directory, or None when it holds none."""
    directory = Path(directory)
    config_path = directory / CONFIG_FILE
    if not config_path.is_file():
        return BPETokenizer.from_file(directory / HF_FILE) if (directory / HF_FILE).is_file() else None
    try:
        kind = json.loads(config_path.read_text())["type"]
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise ValueError(f"{config_path} is damaged: {err}") from err
    if kind == "byte":
        return ByteTokenizer()
    if kind == "bpe":
        return BPETokenizer.from_file(directory / HF_FILE)
    raise ValueError(f"{config_path}: unknown tokenizer type {kind!r}")


def _write_config(directory: str | Path, kind: str, vocab_size: int) -> None:
    values = {"type": kind, "vocab_size": vocab_size, **TRANSFORMERS_FIELDS}
    Path(directory, CONFIG_FILE).write_text(json.dumps(values) + "\n")


def byte_level_tokenizer_json() -> dict:
    """A Hugging Face `tokenizers` file (format 1.0) equal to ByteTokenizer: byte-level
    pre-tokenization (GPT-2's printable alphabet, no regex split) and a BPE model without merges
    whose vocabulary maps each byte's character to the byte's value. Written as plain JSON, so
    saving needs no `tokenizers` package."""
    vocab = dict(sorted(_byte_level_alphabet().items(), key=lambda item: item[1]))
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}
    return {"version": "1.0", "truncation": None, "padding": None, "added_tokens": [], "normalizer": None,
            "pre_tokenizer": byte_level, "post_processor": None, "decoder": byte_level,
            "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                      "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
                      "ignore_merges": False, "vocab": vocab, "merges": []}}


def _import_tokenizers():
    try:
        import tokenizers
        import tokenizers.decoders
        import tokenizers.models
        import tokenizers.pre_tokenizers
        import tokenizers.trainers
    except ImportError:
        raise ValueError("the BPE tokenizer needs the `tokenizers` package: pip install 'mm-rec[bpe]'") from None
    return tokenizers


@cache
def _byte_level_alphabet() -> dict[str, int]:
    """GPT-2's byte-to-printable-character map, inverted: character -> byte."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(printable, chars)}


def _token_byte_strings(tokenizer) -> list[bytes]:
    """The bytes each id stands for. Byte-level vocabularies map exactly through GPT-2's alphabet;
    other tokenizers fall back to decoding the id alone."""
    alphabet = _byte_level_alphabet()
    out = []
    for i in range(tokenizer.get_vocab_size(with_added_tokens=True)):
        token = tokenizer.id_to_token(i) or ""
        if token and all(c in alphabet for c in token):
            out.append(bytes(alphabet[c] for c in token))
        else:
            out.append(tokenizer.decode([i], skip_special_tokens=False).encode("utf-8"))
    return out
