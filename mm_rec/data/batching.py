"""Batches of (input_ids, labels) from a token range, in two modes.

`RandomWindows` (data.carry_state: false): every row is a window of seq_len + 1 tokens at a
uniformly random start (nanoGPT style); the model starts each batch from a fresh state. The
sampler's position is the state of its own torch.Generator.

Under torchrun both split one global batch of `rows` rows: a process reads rows [first_row,
first_row + batch_size), so N processes of batch_size B see the rows that one process of batch_size
N * B sees (the same windows, cut the same way), and a process's position is a piece of the global
one (`regroup_rows` moves it to another number of processes).

`ContiguousStreams` (data.carry_state: true): the range is cut into one contiguous stretch per
batch row, and each row reads its stretch window after window, so the memory state can be
carried (detached) from one batch to the next: truncated backpropagation through time, which
is how the long-term memory learns to span segments. A window never crosses a document
boundary: it stops at the document's end (the rest of the row is padding with label -100) and
the row's state is reset before the next document starts (`Batch.reset`). At the end of its
stretch a row starts over (reset) at a random phase in [0, seq_len), so that later passes do not
cut the text into the same windows as the first (which small corpora overfit to). The position
is the per-row offsets and pass counts.

Labels are already shifted: labels[b, t] is the token after input_ids[b, t].
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mm_rec.constants import IGNORE_INDEX
from mm_rec.data.cache import TokenData

PAD_ID = 0


@dataclass
class Batch:
    input_ids: torch.Tensor  # [B, T] int64
    labels: torch.Tensor  # [B, T] int64, IGNORE_INDEX where there is no target
    reset: torch.Tensor | None  # [B] bool: rows that start a new stream (ContiguousStreams only)


# entries of `ContiguousStreams.state_dict` that hold one value per batch row; the rest of a
# batcher's state (RandomWindows' generator) is the same on every process
ROW_STATE_KEYS = ("offset", "fresh", "row_start", "row_end", "passes")


def regroup_rows(parts: list[torch.Tensor], rank: int, world_size: int) -> torch.Tensor:
    """Per-row tensors of the processes of one run (rank order, rows on dim 0) -> the rows that
    process `rank` of `world_size` holds: the global rows, cut into `world_size` equal pieces."""
    rows = torch.cat(parts)
    if rows.shape[0] % world_size:
        raise ValueError(f"{rows.shape[0]} batch rows cannot be shared equally by {world_size} processes")
    per = rows.shape[0] // world_size
    return rows[rank * per:(rank + 1) * per].clone()


class RandomWindows:
    """`rows` random windows per batch from one generator (the same `seed` on every process); this
    process reads rows [first_row, first_row + batch_size)."""

    def __init__(self, data: TokenData, start: int, end: int, batch_size: int, seq_len: int, seed: int,
                 rows: int | None = None, first_row: int = 0):
        if end - start < seq_len + 1:
            raise ValueError(f"the training split holds {end - start} tokens; a window needs seq_len + 1 = "
                             f"{seq_len + 1} (use more data or a shorter training.seq_len)")
        self.data, self.start, self.end = data, start, end
        self.batch_size, self.seq_len = batch_size, seq_len
        self.rows, self.first_row = rows or batch_size, first_row
        self.generator = torch.Generator().manual_seed(seed)

    def next_batch(self) -> Batch:
        T = self.seq_len
        starts = torch.randint(self.start, self.end - T, (self.rows,), generator=self.generator)
        starts = starts[self.first_row:self.first_row + self.batch_size]  # every process draws the whole batch
        rows = torch.stack([self.data.window(s, s + T + 1) for s in starts.tolist()])
        return Batch(rows[:, :-1], rows[:, 1:], None)

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])


class ContiguousStreams:
    """`rows` streams over [start, end); this process reads rows [first_row, first_row + batch_size).

    With `wrap=False` (evaluation) each row reads its stretch once; `exhausted` says when every row
    is done (finished rows yield padding)."""

    def __init__(self, data: TokenData, start: int, end: int, batch_size: int, seq_len: int,
                 rows: int | None = None, first_row: int = 0, wrap: bool = True, seed: int = 0):
        rows = rows or batch_size
        length = (end - start) // rows
        if length < 2 or (wrap and length < seq_len + 1):
            need = rows * (seq_len + 1 if wrap else 2)
            raise ValueError(f"the split holds {end - start} tokens; {rows} streams of seq_len + 1 = {seq_len + 1} "
                             f"need {need} (use more data, a smaller training.batch_size or a shorter seq_len)")
        bounds = [start + length * r for r in range(rows + 1)]
        self.data, self.seq_len, self.wrap = data, seq_len, wrap
        self.row_start = torch.tensor(bounds[first_row:first_row + batch_size], dtype=torch.int64)
        self.row_end = torch.tensor(bounds[first_row + 1:first_row + batch_size + 1], dtype=torch.int64)
        self.offset = self.row_start.clone()  # next token each row reads
        self.fresh = torch.ones(batch_size, dtype=torch.bool)  # the row's next window starts a stream
        self.doc_starts = data.doc_starts
        self.seed, self.first_row = seed, first_row
        self.passes = torch.zeros(batch_size, dtype=torch.int64)  # completed passes over each row's stretch

    @property
    def exhausted(self) -> bool:
        return bool((self.offset >= self.row_end - 1).all())

    def _phase(self, r: int) -> int:
        """Start of row r's next pass, in [0, seq_len): a function of (seed, global row, pass), so
        it does not depend on how the rows are split over processes."""
        key = (self.seed * 1_000_003 + (self.first_row + r) * 10_007 + int(self.passes[r])) % (2**63 - 1)
        return int(torch.randint(0, self.seq_len, (), generator=torch.Generator().manual_seed(key)))

    def _limit(self, r: int) -> int:
        """End of the document (or stretch) that offset[r] lies in."""
        p = int(self.offset[r])
        i = int(torch.searchsorted(self.doc_starts, torch.tensor(p), right=True))
        doc_end = int(self.doc_starts[i]) if i < self.doc_starts.shape[0] else len(self.data)
        return min(doc_end, int(self.row_end[r]))

    def _advance_to_window(self, r: int) -> int | None:
        """Move row r to the next position with at least one target; return its limit (None: done)."""
        for _ in range(self.doc_starts.shape[0] + 2):
            limit = self._limit(r)
            if limit - int(self.offset[r]) >= 2:
                return limit
            self.fresh[r] = True  # the rest of this document has no target: next document
            self.offset[r] = limit
            if limit >= int(self.row_end[r]):
                if not self.wrap:
                    return None
                self.passes[r] += 1
                self.offset[r] = self.row_start[r] + self._phase(r)
        raise ValueError("no document of two or more tokens in a stream: the data is too fragmented")

    def next_batch(self) -> Batch:
        B, T = self.offset.shape[0], self.seq_len
        input_ids = torch.full((B, T), PAD_ID, dtype=torch.int64)
        labels = torch.full((B, T), IGNORE_INDEX, dtype=torch.int64)
        reset = torch.zeros(B, dtype=torch.bool)
        for r in range(B):
            limit = self._advance_to_window(r)
            if limit is None:
                continue
            p = int(self.offset[r])
            n = min(T, limit - p)  # inputs p .. p+n-1; targets p+1 .. p+n, those < limit
            window = self.data.window(p, p + n + 1 if p + n < limit else p + n)
            input_ids[r, :n] = window[:n]
            labels[r, :window.shape[0] - 1] = window[1:]
            reset[r] = self.fresh[r]
            self.fresh[r] = p + n == limit  # the document (or stretch) ends here: the next window starts anew
            self.offset[r] = p + n
        return Batch(input_ids, labels, reset)

    def state_dict(self) -> dict:
        return {key: getattr(self, key).clone() for key in ROW_STATE_KEYS}

    def load_state_dict(self, state: dict) -> None:
        if not (torch.equal(state["row_start"], self.row_start) and torch.equal(state["row_end"], self.row_end)):
            raise ValueError("the saved stream positions were made for another data split or batch size")
        self.offset = state["offset"].clone()
        self.fresh = state["fresh"].clone()
        if "passes" in state:  # absent in checkpoints written before the random phase
            self.passes = state["passes"].clone()
