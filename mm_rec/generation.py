"""Text in, text out: sample a continuation of a prompt with a model and its tokenizer
(`mmrec generate`, and the sample at the end of `mmrec train`)."""

from __future__ import annotations

import contextlib
import sys

import torch
from torch import nn

from mm_rec.data.tokenizers import Tokenizer


def generate_text(model: nn.Module, tokenizer: Tokenizer, prompt: str, max_new_tokens: int, temperature: float,
                  top_k: int | None, seed: int, device: torch.device,
                  autocast: contextlib.AbstractContextManager | None = None, top_p: float | None = None,
                  echo: bool = False) -> str:
    """Sample a continuation of `prompt` (empty: a newline) with `model.generate_stream`, seeded;
    with `echo` stream it to stdout as it comes. Returns the prompt and the continuation."""
    ids = tokenizer.encode((prompt or "\n").encode("utf-8"))
    if not ids:
        raise ValueError("the prompt encodes to no tokens")
    generator = torch.Generator(device=device).manual_seed(seed)
    decoder = tokenizer.stream_decoder()
    pieces: list[str] = []

    def emit(piece: str) -> None:
        pieces.append(piece)
        if echo and piece:
            sys.stdout.write(piece)
            sys.stdout.flush()

    emit(prompt)
    was_training = model.training
    model.eval()
    try:
        with autocast or contextlib.nullcontext():
            for token in model.generate_stream(torch.tensor([ids], device=device), max_new_tokens, temperature,
                                               top_k, top_p, generator=generator):
                emit(decoder.push(int(token[0])))
        emit(decoder.flush())
    finally:
        model.train(was_training)
    if echo:
        sys.stdout.write("\n")
    return "".join(pieces)
