"""Language-model evaluation: loss, perplexity and bits per byte over a token range."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from mm_rec.constants import IGNORE_INDEX
from mm_rec.data.batching import ContiguousStreams
from mm_rec.data.cache import TokenData
from mm_rec.data.tokenizers import Tokenizer


@dataclass
class EvalResult:
    loss: float  # mean cross entropy per predicted token, nats
    tokens: int  # predicted tokens
    bytes: int  # bytes of text those tokens stand for

    @property
    def perplexity(self) -> float:
        return math.exp(min(self.loss, 700.0))

    @property
    def bits_per_byte(self) -> float:
        """loss_nats / ln 2 * tokens / bytes (bits per character on ASCII text)."""
        return self.loss / math.log(2) * self.tokens / max(1, self.bytes)

    def as_row(self, prefix: str = "val") -> dict:
        return {f"{prefix}_loss": self.loss, f"{prefix}_ppl": self.perplexity, f"{prefix}_bpb": self.bits_per_byte,
                f"{prefix}_tokens": self.tokens}


def token_bytes_table(tokenizer: Tokenizer, vocab_size: int) -> torch.Tensor:
    """[vocab_size] bytes of text per token id (ids the tokenizer never makes count 1): the
    `token_bytes` that `evaluate` turns losses into bits per byte with."""
    table = tokenizer.token_bytes()[:vocab_size]
    return torch.tensor(table + [1] * (vocab_size - len(table)))


@torch.no_grad()
def evaluate(model: nn.Module, data: TokenData, start: int, end: int, batch_size: int, seq_len: int,
             init_state: Callable[..., Any] | None, token_bytes: torch.Tensor, device: torch.device,
             autocast: contextlib.AbstractContextManager | None = None, rank: int = 0,
             world_size: int = 1) -> EvalResult:
    """Score every token of [start, end) once (the first of each row has no context and no loss).

    The range is cut into `batch_size * world_size` contiguous rows read in windows of `seq_len`.
    With `init_state` (the model's, for carry_state runs) the memory state runs on across windows
    (reset at document boundaries), as in training; with None every window starts from a fresh
    state. Deterministic, uses no RNG.

    world_size > 1 (a process group; every process calls this): process `rank` scores its share
    of the rows and the sums are added up, so the result is what one process with all the rows
    gets, whatever the number of processes. Every process runs as many forwards as the busiest
    one (an FSDP forward is collective), the others on padding.
    """
    total = max(world_size, min(batch_size * world_size, (end - start) // 2))
    first, last = rank * total // world_size, (rank + 1) * total // world_size
    rows = last - first
    streams = ContiguousStreams(data, start, end, rows, seq_len, rows=total, first_row=first, wrap=False)
    carry = init_state is not None
    state = init_state(rows, device=device) if carry else None
    was_training = model.training
    model.eval()
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    count = torch.zeros((), dtype=torch.int64, device=device)
    num_bytes = torch.zeros((), dtype=torch.int64, device=device)
    token_bytes = token_bytes.to(device)
    try:
        while not _all_done(streams.exhausted, world_size, device):
            batch = streams.next_batch()
            ids, labels = batch.input_ids.to(device), batch.labels.to(device)
            if carry:
                state.reset(batch.reset.to(device))
            with autocast or contextlib.nullcontext():
                out = model(ids, state=state, labels=labels, return_logits=False)
            valid = labels != IGNORE_INDEX
            n = valid.sum()
            loss_sum += out.loss.double() * n
            count += n
            num_bytes += token_bytes[labels[valid]].sum()
            if carry:
                state = out.state
    finally:
        model.train(was_training)
    if world_size > 1:
        for value in (loss_sum, count, num_bytes):
            torch.distributed.all_reduce(value)
    n = int(count)
    return EvalResult(loss=float(loss_sum) / max(1, n), tokens=n, bytes=int(num_bytes))


def _all_done(done: bool, world_size: int, device: torch.device) -> bool:
    """Whether every process's rows are done (this process's alone when world_size is 1)."""
    if world_size == 1:
        return done
    busy = torch.tensor(0 if done else 1, device=device)
    torch.distributed.all_reduce(busy, op=torch.distributed.ReduceOp.MAX)
    return not bool(busy)
