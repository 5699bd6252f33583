"""Passkey retrieval: a number hidden at a chosen depth in filler text, asked for at the end.

Byte level: token id = UTF-8 byte, so the model needs vocab_size >= 256. A prompt of exactly
`length` tokens reads

    INTRO + filler[:p] + " The pass key is 48213. Keep it in mind." + filler[p:] + QUESTION

where the filler is plain sentences drawn at random (seeded) from a fixed list, cut at the front
to the length the prompt needs (so it may open with the end of a sentence), p is the sentence
boundary nearest to depth * len(filler) (depth 0: the first one, at most one sentence after the
intro; depth 1: right before the question), and the key a random number of `num_digits` digits
without a leading zero. No fixed text and no filler sentence holds a digit, so the key appears
exactly once before the question. The question ends with "The pass key is ", the words that
precede the key in the needle.

The answer digits follow the prompt in input_ids; labels are already shifted (the model's
contract): labels[b, t] is the digit that follows position t for t = length-1 .. length+n-2,
-100 elsewhere. A prompt counts as solved when every digit is the argmax. With teacher forcing
that is the same event as greedy decoding returning the key (each step sees the right prefix
exactly when every earlier step was right), so `method="teacher_forced"` (one forward) and
`method="greedy"` (`model.generate`, which also exercises the recurrent state) agree on
`accuracy`; only `digit_accuracy` may differ.
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from mm_rec.constants import IGNORE_INDEX
from mm_rec.evaluation.scoring import carried_state, predict_tokens

INTRO = "A pass key is hidden somewhere in the long text below. Find it and remember it.\n"
NEEDLE = " The pass key is {key}. Keep it in mind."
QUESTION = "\nWhat is the pass key? The pass key is "
FILLER_SENTENCES = (
    "The river winds slowly past the old mill.",
    "A light wind moves through the tall grass.",
    "Clouds gather over the hills in the afternoon.",
    "The baker opens the shop before sunrise.",
    "Children walk to school along the narrow lane.",
    "An owl calls from the edge of the forest.",
    "The market square is quiet on a rainy day.",
    "Boats rest on the shore while the tide is low.",
    "Snow covers the roofs of the village in winter.",
    "The library keeps its oldest books behind glass.",
    "A train crosses the stone bridge every hour.",
    "Lanterns glow along the harbour wall at night.",
)


def min_length(num_digits: int = 5) -> int:
    """The shortest prompt: intro, needle and question with no filler."""
    return len(INTRO) + len(NEEDLE.format(key="0" * num_digits)) + len(QUESTION)


@dataclass
class PasskeyBatch:
    """Prompts of `prompt_length` tokens followed by their answers.

    input_ids         [B, L + n] int64  prompt bytes, then the n key digits
    labels            [B, L + n] int64  the digits at answer_positions, -100 elsewhere
    answer_positions  [B, n]            L-1 .. L+n-2: where labels hold the digits
    needle_positions  [B]               position of the key's first digit inside the prompt
    keys              the keys as strings; depths: the depth of every row
    """

    input_ids: torch.Tensor
    labels: torch.Tensor
    answer_positions: torch.Tensor
    needle_positions: torch.Tensor
    keys: list[str]
    depths: list[float]
    prompt_length: int

    @property
    def answers(self) -> torch.Tensor:
        """[B, n] the key digits as byte ids."""
        return self.labels.gather(1, self.answer_positions)


def _filler(num_bytes: int, rng: random.Random) -> str:
    """The last `num_bytes` of " S1. S2. ... Sn.": it ends with a whole sentence."""
    sentences, size = [], 0
    while size < num_bytes:
        sentences.append(" " + rng.choice(FILLER_SENTENCES))
        size += len(sentences[-1])
    return "".join(sentences)[size - num_bytes:]


def make_passkey_batch(length: int, batch_size: int, seed: int | str | random.Random,
                       depth: float | None = None, num_digits: int = 5) -> PasskeyBatch:
    """`batch_size` prompts of exactly `length` tokens with the key at `depth` in [0, 1]
    (None: a uniform random depth per row). The same seed gives the same batch; a
    `random.Random` is advanced, so successive calls give fresh batches."""
    if num_digits < 1:
        raise ValueError(f"num_digits must be >= 1, got {num_digits}")
    if length < min_length(num_digits):
        raise ValueError(f"passkey length {length} is too short: intro, needle and question alone "
                         f"take {min_length(num_digits)} tokens")
    if depth is not None and not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must lie in [0, 1], got {depth}")
    rng = seed if isinstance(seed, random.Random) else random.Random(seed)
    filler_bytes = length - min_length(num_digits)
    rows, needles, keys, depths = [], [], [], []
    for _ in range(batch_size):
        row_depth = rng.random() if depth is None else depth
        key = str(rng.randrange(10 ** (num_digits - 1), 10 ** num_digits))
        filler = _filler(filler_bytes, rng)
        boundaries = [m.start() for m in re.finditer(r" [A-Z]", filler)] + [filler_bytes]  # before " Next."
        cut = min(boundaries, key=lambda b: abs(b - row_depth * filler_bytes))
        needle = NEEDLE.format(key=key)
        text = INTRO + filler[:cut] + needle + filler[cut:] + QUESTION + key
        rows.append(torch.tensor(list(text.encode("utf-8"))))
        needles.append(len(INTRO) + cut + needle.index(key))
        keys.append(key)
        depths.append(row_depth)
    input_ids = torch.stack(rows)
    answer_positions = torch.arange(length - 1, length + num_digits - 1).expand(batch_size, -1)
    labels = torch.full_like(input_ids, IGNORE_INDEX)
    labels.scatter_(1, answer_positions, input_ids[:, length:])
    return PasskeyBatch(input_ids=input_ids, labels=labels, answer_positions=answer_positions,
                        needle_positions=torch.tensor(needles), keys=keys, depths=depths, prompt_length=length)


@dataclass
class PasskeyScore:
    accuracy: float  # fraction of prompts with every digit right
    digit_accuracy: float  # fraction of digits right
    num_samples: int


def score_passkey(model_or_logits: nn.Module | torch.Tensor, batch: PasskeyBatch, method: str = "teacher_forced",
                  batch_size: int = 8, piece_len: int | None = None) -> PasskeyScore:
    """Score a model (or logits [B, L + n, V] for batch.input_ids with teacher forcing).

    method "teacher_forced": the argmax at the answer positions of a forward over prompt + key;
    "greedy": `model.generate(prompt, n, temperature=0)`, `batch_size` rows at a time. A model
    with a state reads the prompt in pieces of `piece_len` tokens (default: its
    config.max_segment_len) with the state carried and keeps only the logits it scores, so a
    128K-token prompt needs the memory of one piece (`mm_rec.evaluation.scoring`).
    """
    answers = batch.answers
    if method == "teacher_forced":
        predicted = predict_tokens(model_or_logits, batch.input_ids, batch.answer_positions, batch_size, piece_len)
    elif method == "greedy":
        if not hasattr(model_or_logits, "generate"):
            raise ValueError("greedy passkey scoring needs a model with a generate(...) method")
        predicted = torch.cat([_greedy(model_or_logits, rows, answers.shape[1], piece_len)
                               for rows in batch.input_ids[:, :batch.prompt_length].split(batch_size)])
    else:
        raise ValueError(f"unknown passkey scoring method {method!r}; use 'teacher_forced' or 'greedy'")
    correct = predicted == answers
    return PasskeyScore(accuracy=correct.all(dim=1).double().mean().item(),
                        digit_accuracy=correct.double().mean().item(), num_samples=answers.shape[0])


def _greedy(model: nn.Module, prompts: torch.Tensor, num_tokens: int, piece_len: int | None) -> torch.Tensor:
    """[B, num_tokens] greedy continuation (CPU) of prompts [B, L]. A model with a state reads all
    but the last prompt token in pieces, then generates from that state (the same tokens as
    `generate` over the whole prompt: segment invariance)."""
    device = next(model.parameters()).device
    prompts = prompts.to(device)
    if not hasattr(model, "init_state"):
        return model.generate(prompts, num_tokens, temperature=0.0)[:, prompts.shape[1]:].cpu()
    state = carried_state(model, prompts[:, :-1], piece_len) if prompts.shape[1] > 1 else None
    return model.generate(prompts[:, -1:], num_tokens, temperature=0.0, state=state)[:, 1:].cpu()


def passkey_grid(model: nn.Module, lengths: Sequence[int], depths: Sequence[float], num_samples: int,
                 seed: int = 0, num_digits: int = 5, method: str = "teacher_forced",
                 tokens_per_forward: int = 65536, piece_len: int | None = None) -> list[dict]:
    """Score `num_samples` prompts per (length, depth) cell; one record per cell with length, depth,
    accuracy, digit_accuracy, num_samples and not_run. Each cell has its own seed, so adding a
    length or a depth leaves the other cells unchanged.

    Rows per forward: `tokens_per_forward` // the tokens of one row's forward (a piece for a
    model with a state, the whole prompt for one without). A model without a state (the
    Transformer; RoPE has no length limit of its own) is run only where prompt and answer fit its
    config.max_seq_len; a cell that is not run (too long, or out of GPU memory) has accuracy and
    digit_accuracy None and says why in not_run.
    """
    stateful = hasattr(model, "init_state")
    step = (piece_len or model.config.max_segment_len) if stateful else None
    records = []
    for length in lengths:
        tokens = length + num_digits - 1  # the forward reads the prompt and all but the last digit
        too_long = not stateful and tokens > model.config.max_seq_len
        rows_per_forward = max(1, tokens_per_forward // (min(tokens, step) if stateful else tokens))
        for depth in depths:
            record = dict(length=length, depth=depth, accuracy=None, digit_accuracy=None, num_samples=num_samples,
                          not_run=f"{tokens} tokens > max_seq_len {model.config.max_seq_len}" if too_long else None)
            if not too_long:
                batch = make_passkey_batch(length, num_samples, f"passkey-{seed}-{length}-{depth}", depth, num_digits)
                try:
                    score = score_passkey(model, batch, method, rows_per_forward, step)
                    record.update(accuracy=score.accuracy, digit_accuracy=score.digit_accuracy)
                except torch.OutOfMemoryError:
                    torch.cuda.empty_cache()
                    record["not_run"] = f"out of GPU memory at {rows_per_forward} row(s) of {tokens} tokens"
            records.append(record)
    return records


__all__ = ["PasskeyBatch", "PasskeyScore", "make_passkey_batch", "min_length", "passkey_grid", "score_passkey"]
