"""Tokenize once into a memory-mapped token file, cached by the identity of the data and tokenizer.

Cache layout (one folder per data + tokenizer fingerprint, under `data.cache_dir`, default OUT/data):

    tokens-<key>/tokens.bin    token ids, uint8 (vocab <= 256), uint16 (<= 65536) or int32
    tokens-<key>/docs.bin      int64 start offset of every document (the first is 0)
    tokens-<key>/meta.json     counts, dtype, largest id, digest of the tokens; written last

The folder is built under a temporary name and renamed into place, so a cache folder that
exists is complete. A `.bin` source is memory-mapped directly (one document).
"""

from __future__ import annotations

import array
import hashlib
import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from mm_rec.data.corpus import Source, iter_documents
from mm_rec.data.tokenizers import BPETokenizer, ByteTokenizer, Tokenizer
from mm_rec.utils.atomic import commit_directory

DTYPES = {"uint8": torch.uint8, "uint16": torch.uint16, "int32": torch.int32, "uint32": torch.uint32}
ITEMSIZE = {"uint8": 1, "uint16": 2, "int32": 4, "uint32": 4}
ARRAY_CODES = {"uint8": "B", "uint16": "H", "int32": "i"}
MAX_SCAN = 1 << 24  # elements per chunk when scanning a token file


@dataclass
class TokenData:
    """A 1-D token stream (memory-mapped or in memory) cut into documents."""

    tokens: torch.Tensor  # [N], any integer dtype; read windows with `window`
    doc_starts: torch.Tensor  # [D] int64, sorted, doc_starts[0] == 0
    max_id: int
    digest: str  # identity of the token stream (compared when a run resumes)
    description: str

    def __len__(self) -> int:
        return self.tokens.shape[0]

    def window(self, start: int, end: int) -> torch.Tensor:
        """tokens[start:end] as int64."""
        return self.tokens[start:end].to(torch.int64)

    def split_point(self, val_fraction: float) -> int:
        """Index where the validation split starts: the last `val_fraction` of the tokens."""
        n = len(self)
        return n - max(2, int(n * val_fraction))

    def check_vocab(self, vocab_size: int) -> None:
        if self.max_id >= vocab_size:
            raise ValueError(f"{self.description} holds token id {self.max_id}, outside the model's vocabulary "
                             f"[0, {vocab_size}); use a model with vocab_size > {self.max_id} or the matching "
                             "tokenizer")


def token_dtype(vocab_size: int) -> str:
    return "uint8" if vocab_size <= 256 else "uint16" if vocab_size <= 65536 else "int32"


def load_bin(path: Path, dtype: str) -> TokenData:
    """A pre-tokenized file of raw little-endian ids (nanoGPT's train.bin is uint16)."""
    size = path.stat().st_size
    if size == 0:
        raise ValueError(f"{path} is empty")
    if size % ITEMSIZE[dtype]:
        raise ValueError(f"{path} is {size} bytes, not a whole number of {dtype} token ids (set data.bin_dtype)")
    tokens = torch.from_file(str(path), shared=False, size=size // ITEMSIZE[dtype], dtype=DTYPES[dtype])
    st = path.stat()
    digest = hashlib.sha1(f"{path.resolve()}\0{st.st_size}\0{st.st_mtime_ns}".encode()).hexdigest()[:16]
    return TokenData(tokens, torch.zeros(1, dtype=torch.int64), _max_id(tokens), digest, str(path))


def prepare_tokens(source: Source, tokenizer: Tokenizer, cache_dir: Path, separator: str | None = None,
                   bin_dtype: str = "uint16", log: Callable[[str], None] = print) -> TokenData:
    """Memory-mapped tokens of `source`, tokenizing into `cache_dir` on first use."""
    if source.kind == "bin":
        return load_bin(source.root, bin_dtype)
    key = hashlib.sha1(f"{source.fingerprint()}|{tokenizer.fingerprint()}|{separator!r}".encode()).hexdigest()[:16]
    folder = Path(cache_dir) / f"tokens-{key}"
    if not (folder / "meta.json").is_file():
        log(f"tokenizing {source.description} ...")
        _write_cache(source, tokenizer, separator, folder)
    return _open_cache(folder, source.description)


def tokenize_in_memory(source: Source, tokenizer: Tokenizer, separator: str | None = None,
                       bin_dtype: str = "uint16", max_tokens: int | None = None) -> TokenData:
    """Tokens of `source` in memory (evaluation of a data file; no cache is written)."""
    if source.kind == "bin":
        data = load_bin(source.root, bin_dtype)
        if max_tokens is not None:
            data.tokens = data.tokens[:max_tokens]
        return data
    byte_level = isinstance(tokenizer, ByteTokenizer)
    ids = array.array("B" if byte_level else "q")
    starts: list[int] = []
    docs = iter_documents(source, separator) if byte_level else _encoded_documents(source, tokenizer, separator)
    for doc in docs:
        starts.append(len(ids))
        if byte_level:
            ids.frombytes(doc)
        else:
            ids.extend(doc)
        if max_tokens is not None and len(ids) >= max_tokens:
            del ids[max_tokens:]
            break
    if not ids:
        raise ValueError(f"{source.description} holds no text")
    digest = hashlib.sha1(ids.tobytes()).hexdigest()[:16]
    tokens = torch.frombuffer(ids, dtype=torch.uint8 if byte_level else torch.int64).clone()
    return TokenData(tokens, torch.tensor(starts, dtype=torch.int64), max(ids), digest, source.description)


def _encoded_documents(source: Source, tokenizer: Tokenizer, separator: str | None):
    """Token ids per document; BPE encodes documents in batches (its Rust side is parallel)."""
    if not isinstance(tokenizer, BPETokenizer):
        for doc in iter_documents(source, separator):
            yield tokenizer.encode(doc)
        return
    batch: list[str] = []
    for doc in iter_documents(source, separator):
        batch.append(doc.decode("utf-8", errors="replace"))
        if len(batch) == 256:
            yield from tokenizer.encode_batch(batch)
            batch = []
    if batch:
        yield from tokenizer.encode_batch(batch)


def _write_cache(source: Source, tokenizer: Tokenizer, separator: str | None, folder: Path) -> None:
    dtype = token_dtype(tokenizer.vocab_size)
    tmp = folder.with_name(f".{folder.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    n, max_id, starts = 0, 0, array.array("q")
    h = hashlib.sha1()
    with (tmp / "tokens.bin").open("wb") as fh:
        byte_level = isinstance(tokenizer, ByteTokenizer)  # byte tokens are the documents' own bytes
        docs = iter_documents(source, separator) if byte_level else _encoded_documents(source, tokenizer, separator)
        for doc in docs:
            if not doc:
                continue
            raw = doc if byte_level else array.array(ARRAY_CODES[dtype], doc).tobytes()
            starts.append(n)
            fh.write(raw)
            h.update(raw)
            n += len(doc)
            max_id = max(max_id, max(doc))
    if n == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        raise ValueError(f"{source.description} holds no text (0 tokens)")
    (tmp / "docs.bin").write_bytes(starts.tobytes())
    meta = dict(num_tokens=n, num_documents=len(starts), dtype=dtype, max_id=max_id, digest=h.hexdigest()[:16],
                tokenizer=tokenizer.fingerprint(), source=source.description)
    (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    commit_directory(tmp, folder)  # replaces a folder without meta.json: an interrupted build


def _open_cache(folder: Path, description: str) -> TokenData:
    try:
        meta = json.loads((folder / "meta.json").read_text())
        n, dtype = int(meta["num_tokens"]), meta["dtype"]
        if (folder / "tokens.bin").stat().st_size != n * ITEMSIZE[dtype]:
            raise ValueError("tokens.bin has the wrong size")
        tokens = torch.from_file(str(folder / "tokens.bin"), shared=False, size=n, dtype=DTYPES[dtype])
        num_docs = int(meta["num_documents"])
        doc_starts = torch.from_file(str(folder / "docs.bin"), shared=False, size=num_docs, dtype=torch.int64).clone()
    except (OSError, KeyError, ValueError, RuntimeError) as err:
        raise ValueError(f"token cache {folder} is damaged ({err}); delete it to tokenize again") from err
    return TokenData(tokens, doc_starts, int(meta["max_id"]), meta["digest"], description)


def _max_id(tokens: torch.Tensor) -> int:
    """Largest id in a token file, scanned in chunks; negative ids are refused."""
    best = 0
    for start in range(0, tokens.shape[0], MAX_SCAN):
        lo, hi = torch.aminmax(tokens[start:start + MAX_SCAN].to(torch.int64))
        if lo < 0:
            raise ValueError(f"token file holds a negative id ({int(lo)}); check data.bin_dtype")
        best = max(best, int(hi))
    return best
