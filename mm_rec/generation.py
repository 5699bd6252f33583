"""Text in, text out: sample continuations of prompts with a model and its tokenizer (`mmrec generate`,
and the sample at the end of `mmrec train`).

    completions = generate_texts(model, tokenizer, ["def ", "class A:"], max_new_tokens=100, temperature=0.8,
                                 top_k=40, seed=0, device=device, batch_size=8, stop=["\\n\\n"],
                                 on_text=lambda i, piece: print(i, piece))
    completions[0].text, completions[0].finish      # the continuation, "stop" or "length"

Prompts are generated `batch_size` at a time, left-aligned with per-row lengths (no padding enters a
row's state; `LanguageModel.generate_stream`). Each row ends on its own: at its first stop string
(the text is cut before it), at a stop token (not part of the text), or after max_new_tokens; the
batch ends when all its rows have. `on_text(index, piece)` streams each continuation as it comes,
holding back only text that could still turn out to begin a stop string.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from mm_rec.data.tokenizers import StreamDecoder, Tokenizer

FINISH_STOP = "stop"  # a stop string or a stop token ended the row
FINISH_LENGTH = "length"  # max_new_tokens did


@dataclass
class Completion:
    prompt: str
    text: str  # the continuation, without the stop string or token that ended it
    finish: str  # FINISH_STOP or FINISH_LENGTH


def encode_prompts(tokenizer: Tokenizer, prompts: Sequence[str], vocab_size: int) -> list[list[int]]:
    """Token ids of every prompt (an empty prompt is a newline); ValueError naming the first prompt that
    encodes to nothing or to ids outside [0, vocab_size): checked before anything is generated."""
    encoded = []
    for i, prompt in enumerate(prompts):
        ids = tokenizer.encode((prompt or "\n").encode("utf-8"))
        if not ids:
            raise ValueError(f"prompt {i + 1} encodes to no tokens")
        if max(ids) >= vocab_size:
            raise ValueError(f"prompt {i + 1}: token ids must lie in [0, {vocab_size}) (vocab_size), got {max(ids)}")
        encoded.append(ids)
    return encoded


class _Row:
    """One prompt's continuation as it grows: decoded text, what was streamed, whether it ended."""

    def __init__(self, decoder: StreamDecoder, stop: Sequence[str], emit: Callable[[str], None]):
        self.decoder, self.stop, self.emit = decoder, stop, emit
        self.text, self.streamed, self.finish = "", 0, None

    def push(self, token: int, stop_tokens: Sequence[int]) -> None:
        if token in stop_tokens:
            self._end(self.decoder.flush(), FINISH_STOP)
        else:
            self._add(self.decoder.push(token))

    def close(self) -> None:
        """max_new_tokens reached: the rest of the text (a character split over tokens ends here)."""
        if self.finish is None:
            self._end(self.decoder.flush(), FINISH_LENGTH)

    def _add(self, piece: str, final: bool = False) -> None:
        start = max(0, len(self.text) - max((len(s) for s in self.stop), default=0))
        self.text += piece
        found = [i for i in (self.text.find(s, start) for s in self.stop) if i >= 0]
        if found:  # cut before the earliest stop string
            self.text = self.text[:min(found)]
            self._stream(len(self.text))
            self.finish = FINISH_STOP
            return
        held = 0 if final else max((k for s in self.stop for k in range(1, len(s)) if self.text.endswith(s[:k])),
                                   default=0)
        self._stream(len(self.text) - held)

    def _end(self, piece: str, finish: str) -> None:
        self._add(piece, final=True)
        if self.finish is None:
            self.finish = finish

    def _stream(self, upto: int) -> None:
        if upto > self.streamed:
            self.emit(self.text[self.streamed:upto])
            self.streamed = upto


def generate_texts(model: nn.Module, tokenizer: Tokenizer, prompts: Sequence[str], max_new_tokens: int,
                   temperature: float, top_k: int | None, seed: int, device: torch.device, *,
                   top_p: float | None = None, batch_size: int = 8, stop: Sequence[str] = (),
                   stop_tokens: Sequence[int] = (), on_text: Callable[[int, str], None] | None = None,
                   on_completion: Callable[[int, Completion], None] | None = None,
                   autocast: contextlib.AbstractContextManager | None = None,
                   compile_step: bool = False) -> list[Completion]:
    """Sample a continuation of every prompt (see the module docstring), seeded: one generator for the
    whole call, so a prompt's sample depends on the batch it is in (greedy, temperature 0, does not).
    `on_completion(index, completion)` is called for each prompt, in order, as its batch ends.
    `compile_step` (MM-Rec): torch.compile the one-token step before it is captured (mm_rec/decoding.py)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if compile_step and not hasattr(model, "step"):
        raise ValueError(f"compiling the one-token step needs an MM-Rec model, not {type(model).__name__}")
    step_options = {"compile_step": True} if compile_step else {}
    if any(not s for s in stop):
        raise ValueError("a stop string must not be empty")
    encoded = encode_prompts(tokenizer, prompts, model.config.vocab_size)
    generator = torch.Generator(device=device).manual_seed(seed)
    completions = []
    was_training = model.training
    model.eval()
    try:
        with autocast or contextlib.nullcontext():
            for first in range(0, len(encoded), batch_size):
                batch = encoded[first:first + batch_size]
                lengths = [len(ids) for ids in batch]
                ids = torch.zeros(len(batch), max(lengths), dtype=torch.long)
                for row, prompt_ids in enumerate(batch):
                    ids[row, :len(prompt_ids)] = torch.tensor(prompt_ids)
                rows = [_Row(tokenizer.stream_decoder(), stop,
                             (lambda piece, i=first + row: on_text(i, piece)) if on_text else (lambda piece: None))
                        for row in range(len(batch))]
                stream = model.generate_stream(ids.to(device), max_new_tokens, temperature, top_k, top_p,
                                               generator=generator, lengths=lengths, **step_options)
                for tokens in stream:
                    for row, token in zip(rows, tokens.tolist()):  # one host sync per step
                        if row.finish is None:
                            row.push(token, stop_tokens)
                    if all(row.finish is not None for row in rows):
                        stream.close()  # every row has ended: no more steps
                        break
                for i, row in enumerate(rows):
                    row.close()
                    completions.append(Completion(prompts[first + i], row.text, row.finish))
                    if on_completion:
                        on_completion(first + i, completions[-1])
    finally:
        model.train(was_training)
    return completions


def generate_text(model: nn.Module, tokenizer: Tokenizer, prompt: str, max_new_tokens: int, temperature: float,
                  top_k: int | None, seed: int, device: torch.device,
                  autocast: contextlib.AbstractContextManager | None = None, top_p: float | None = None,
                  echo: bool = False, stop: Sequence[str] = (), compile_step: bool = False) -> str:
    """Sample a continuation of one `prompt` (empty: a newline), seeded; with `echo` stream it to stdout
    as it comes (the prompt first). Returns the prompt and the continuation."""
    encode_prompts(tokenizer, [prompt], model.config.vocab_size)  # refused before anything is printed

    def write(_: int, piece: str) -> None:
        sys.stdout.write(piece)
        sys.stdout.flush()

    if echo:
        write(0, prompt)
    completion, = generate_texts(model, tokenizer, [prompt], max_new_tokens, temperature, top_k, seed, device,
                                 top_p=top_p, batch_size=1, stop=stop, on_text=write if echo else None,
                                 autocast=autocast, compile_step=compile_step)
    if echo:
        sys.stdout.write("\n")
    return prompt + completion.text
