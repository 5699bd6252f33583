"""Long documents: does the carried memory lower the loss far into a document?

The documents are the long files of the embedded corpus (the Python standard library's own
sources, `mm_rec.data.corpus`), read as bytes, each cut to its first N bytes: one row of a
[F, N] batch per file. Byte p (1 <= p < N) is predicted from the bytes before it (byte 0 has no
context and is not scored), and its negative log-likelihood is computed in one of three ways:

    carried   the state runs from the file's start over segments of `segment_len` tokens
    reset     the state is reset every `reset_every` tokens: each window of that length is read
              from a fresh state, as if it were a document of its own
    sliding   for a model without a state (the Transformer baseline): windows of `window` tokens
              moved by window // 2, each byte scored once, with at least window // 2 bytes of
              context (the first window: all bytes before it)

A Transformer cannot carry anything past one forward, so "carried" is impossible for it; its
"reset" is blocked context (each window one forward, reset_every <= its context) and "sliding"
is the most context its window allows at every position.

`bucket_stats` averages the per-byte losses per file within position buckets
[edges[i], edges[i+1]) (0-2K, 2-8K, 8-32K by default) and then over files: mean nats per byte
(= per token: the model is byte-level) and its standard error over files. Every file has the
same bytes in every bucket, so the mean over files is also the mean over all bytes, and
differences (reset minus carried, or one model minus another on the same files) are paired per
file.

Held out: `mmrec train` validates on the last `data.val_fraction` of the corpus's token stream
(files in sorted path order). `select_documents(val_fraction=...)` keeps only files that lie
entirely in that split, so a model trained on the embedded corpus with that fraction never saw
them; the corpus digest it returns is the trainer's `data_digest`, to check that the corpus is
the one the model was trained on.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from mm_rec.data.cache import tokenize_in_memory
from mm_rec.data.corpus import Source, resolve_source
from mm_rec.data.tokenizers import ByteTokenizer

DEFAULT_MAX_BYTES = 32768  # N: bytes scored per file (and the smallest file selected)
DEFAULT_SEGMENT_LEN = 2048
DEFAULT_RESET_EVERY = 2048
DEFAULT_EDGES = (0, 2048, 8192, 32768)
TOKENS_PER_FORWARD = 65536  # rows per forward = this // tokens per forward of one row


@dataclass(frozen=True)
class Document:
    name: str  # path relative to the corpus root
    path: Path
    size: int  # bytes
    start: int  # offset of its first byte in the corpus token stream (the trainer's)


@dataclass(frozen=True)
class Selection:
    documents: list[Document]  # in corpus order (sorted relative paths)
    digest: str  # of the corpus's whole byte stream: the trainer's data_digest for this corpus
    split: int | None  # first token of the validation split the documents lie in (None: any file)
    description: str  # the corpus


def select_documents(min_bytes: int = DEFAULT_MAX_BYTES, val_fraction: float | None = None,
                     source: Source | None = None) -> Selection:
    """The files of `source` (default: the embedded corpus) of at least `min_bytes` bytes, in
    the corpus's order. With `val_fraction`, only files entirely inside the validation split
    that `mmrec train` makes with that `data.val_fraction` (the last fraction of the tokens)."""
    if min_bytes < 2:
        raise ValueError(f"min_bytes must be >= 2 (one byte of context, one to score), got {min_bytes}")
    source = source or resolve_source(None)
    # the trainer's own token stream (byte level, whole files), so the split is the trainer's
    data = tokenize_in_memory(source, ByteTokenizer())
    files = [f for f in source.files if f.stat().st_size > 0]  # empty files make no document
    if len(files) != data.doc_starts.shape[0]:
        raise ValueError(f"{source.description} changed while it was read; run again")
    split = data.split_point(val_fraction) if val_fraction is not None else None
    starts = data.doc_starts.tolist()
    ends = starts[1:] + [len(data)]
    root = source.root if source.kind in ("stdlib", "dir") else None
    documents = [Document(f.relative_to(root).as_posix() if root else f.name, f, end - start, start)
                 for f, start, end in zip(files, starts, ends)
                 if end - start >= min_bytes and (split is None or start >= split)]
    return Selection(documents, data.digest, split, source.description)


def read_documents(documents: Sequence[Document], num_bytes: int) -> torch.Tensor:
    """The first `num_bytes` bytes of every document: [F, num_bytes] int64 (byte = token id)."""
    short = [d.name for d in documents if d.size < num_bytes]
    if short:
        raise ValueError(f"documents shorter than {num_bytes} bytes: {short[:5]}")
    rows = [torch.frombuffer(bytearray(d.path.read_bytes()[:num_bytes]), dtype=torch.uint8) for d in documents]
    return torch.stack(rows).long()


def _piece_nll(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, state, device: torch.device):
    """One forward of inputs [B, T] from `state`: NLL [B, T] float64 on the CPU, and the state after."""
    out = model(inputs.to(device), state=state)
    logits = out.logits.to(torch.promote_types(out.logits.dtype, torch.float32))  # bf16 autocast -> fp32
    nll = F.cross_entropy(logits.transpose(1, 2), targets.to(device), reduction="none")
    return nll.double().cpu(), out.state


def _check_ids(ids: torch.Tensor) -> None:
    if ids.dim() != 2 or ids.shape[1] < 2:
        raise ValueError(f"ids must be [F, N] with N >= 2 (a byte of context, a byte to score), got {tuple(ids.shape)}")


def _rows(ids: torch.Tensor, tokens_per_row: int, rows_per_forward: int | None) -> list[torch.Tensor]:
    return list(ids.split(rows_per_forward or max(1, TOKENS_PER_FORWARD // tokens_per_row)))


@torch.inference_mode()
def token_nll(model: nn.Module, ids: torch.Tensor, segment_len: int = DEFAULT_SEGMENT_LEN,
              reset_every: int | None = None, rows_per_forward: int | None = None) -> torch.Tensor:
    """Per-byte NLL [F, N-1] (float64, CPU) of ids [F, N]: column p-1 is byte p given bytes < p.

    reset_every None ("carried"): one stream per row, the state carried from byte 0 across
    segments of `segment_len`. Otherwise ("reset") the state is fresh at every multiple of
    `reset_every`. A model without a state (no `init_state`) runs each window of `reset_every`
    as one forward (`segment_len` does not apply) and cannot run "carried".
    """
    _check_ids(ids)
    stateful = hasattr(model, "init_state")
    if reset_every is None and not stateful:
        raise ValueError(f"{type(model).__name__} keeps no state: it cannot carry one across a document; "
                         "score it with reset_every (blocked windows) or sliding_nll")
    if segment_len < 1 or (reset_every is not None and reset_every < 1):
        raise ValueError(f"segment_len and reset_every must be positive, got {segment_len}, {reset_every}")
    device = next(model.parameters()).device
    length = ids.shape[1] - 1
    step = segment_len if stateful else reset_every
    window = reset_every or length
    # pieces end at every segment end and every reset; none crosses a reset
    cuts = sorted({*range(0, length, step), *range(0, length, window), length})
    nll = torch.empty(ids.shape[0], length, dtype=torch.float64)
    row = 0
    for rows in _rows(ids, min(step, length), rows_per_forward):
        inputs, targets = rows[:, :-1], rows[:, 1:]
        state = None
        for start, end in zip(cuts[:-1], cuts[1:]):
            if start % window == 0:
                state = None  # a fresh stream: the file's start, or a reset
            piece, state = _piece_nll(model, inputs[:, start:end], targets[:, start:end], state, device)
            nll[row:row + rows.shape[0], start:end] = piece
        row += rows.shape[0]
    return nll


@torch.inference_mode()
def sliding_nll(model: nn.Module, ids: torch.Tensor, window: int,
                rows_per_forward: int | None = None) -> torch.Tensor:
    """Per-byte NLL [F, N-1] like `token_nll`, for a model without a state: windows of `window`
    tokens moved by window // 2, every forward from scratch; each byte is scored once, in the
    first window that holds it with window - window // 2 bytes of context or more."""
    _check_ids(ids)
    if window < 2:
        raise ValueError(f"a sliding window needs at least 2 tokens, got {window}")
    device = next(model.parameters()).device
    length, hop = ids.shape[1] - 1, window // 2
    nll = torch.empty(ids.shape[0], length, dtype=torch.float64)
    row = 0
    for rows in _rows(ids, min(window, length), rows_per_forward):
        inputs, targets = rows[:, :-1], rows[:, 1:]
        start, scored = 0, 0  # the window [start, start + window); bytes before `scored` are done
        while scored < length:
            end = min(start + window, length)
            piece, _ = _piece_nll(model, inputs[:, start:end], targets[:, start:end], None, device)
            nll[row:row + rows.shape[0], scored:end] = piece[:, scored - start:]
            scored, start = end, end - (window - hop)
        row += rows.shape[0]
    return nll


def _size(n: int) -> str:
    return f"{n // 1024}K" if n and n % 1024 == 0 else str(n)


def bucket_stats(nll: torch.Tensor, edges: Sequence[int] = DEFAULT_EDGES) -> list[dict]:
    """Mean NLL per position bucket: nll [F, N-1] as `token_nll` returns it (column p-1 = byte p).

    One record per bucket [lo, hi) of byte positions that holds a scored byte (hi is cut to N):
    range ("2K-8K"), lo, hi, tokens (bytes per file), per_file (each file's mean), mean (over
    files) and se (their standard deviation / sqrt(F); None for one file)."""
    edges = list(edges)
    if len(edges) < 2 or edges[0] != 0 or any(b <= a for a, b in zip(edges, edges[1:])):
        raise ValueError(f"bucket edges must start at 0 and increase, got {edges}")
    num_files, n = nll.shape[0], nll.shape[1] + 1
    records = []
    for lo, hi in zip(edges[:-1], edges[1:]):
        first, end = max(lo, 1), min(hi, n)  # byte 0 is never scored
        if first >= end:
            continue
        per_file = nll[:, first - 1:end - 1].mean(dim=1)
        se = per_file.std().item() / math.sqrt(num_files) if num_files > 1 else None
        records.append(dict(range=f"{_size(lo)}-{_size(end)}", lo=lo, hi=end, tokens=end - first,
                            per_file=per_file.tolist(), mean=per_file.mean().item(), se=se))
    return records


def score_long_documents(model: nn.Module, ids: torch.Tensor, segment_len: int = DEFAULT_SEGMENT_LEN,
                         reset_every: int = DEFAULT_RESET_EVERY, edges: Sequence[int] = DEFAULT_EDGES,
                         window: int | None = None, autocast: contextlib.AbstractContextManager | None = None) -> dict:
    """Score ids [F, N] every way the model allows; returns {"modes": {mode: buckets}, "differences":
    {name: buckets}, "notes": [...]} with buckets as `bucket_stats` makes them.

    A model with a state: "carried" and "reset" (every `reset_every`), and their paired
    difference "reset - carried" (> 0: the carried memory helps). A model without one: "reset"
    (blocked windows of `reset_every`) and "sliding" (windows of `window`, default its
    config.max_seq_len); "carried" is absent.
    """
    was_training = model.training
    model.eval()
    notes = []
    try:
        with autocast or contextlib.nullcontext():
            if hasattr(model, "init_state"):
                nll = {"carried": token_nll(model, ids, segment_len),
                       "reset": token_nll(model, ids, segment_len, reset_every)}
                pairs = {"reset - carried": ("reset", "carried")}
            else:
                window = window or model.config.max_seq_len
                if reset_every > model.config.max_seq_len:
                    raise ValueError(f"reset_every {reset_every} is longer than the {type(model).__name__}'s "
                                     f"context (max_seq_len {model.config.max_seq_len})")
                nll = {"reset": token_nll(model, ids, segment_len, reset_every),
                       "sliding": sliding_nll(model, ids, window)}
                pairs = {"reset - sliding": ("reset", "sliding")}
                notes.append(f"{type(model).__name__} keeps no state, so 'carried' is impossible; 'reset' reads "
                             f"blocked windows of {reset_every} tokens, 'sliding' windows of {window} tokens moved "
                             f"by {window // 2} (every byte with at least {window - window // 2} bytes of context)")
    finally:
        model.train(was_training)
    return dict(modes={mode: bucket_stats(values, edges) for mode, values in nll.items()},
                differences={name: bucket_stats(nll[a] - nll[b], edges) for name, (a, b) in pairs.items()},
                notes=notes)


__all__ = ["DEFAULT_EDGES", "DEFAULT_MAX_BYTES", "DEFAULT_RESET_EVERY", "DEFAULT_SEGMENT_LEN", "Document",
           "Selection", "bucket_stats", "read_documents", "score_long_documents", "select_documents",
           "sliding_nll", "token_nll"]
