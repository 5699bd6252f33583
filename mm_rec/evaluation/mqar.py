"""Multi-query associative recall (MQAR): can the model look a value up by its key, far back?

A sequence of T tokens is read as T // 2 two-token slots:

    slots 0 .. P-1       the context: P pairs (key, value); the keys are distinct and come from the
                         first half of the vocabulary [0, V//2), the values are uniform over the
                         second half [V//2, V)
    slots P .. T//2 - 1  the query region: Q of its slots are queries (an earlier key, then its
                         value); the others hold noise pairs of value-half tokens
    (an odd T ends with one noise token)

The Q queried keys are distinct context keys, chosen at random. Query slots follow a power law in
their gap g = slot - P + 1 (g = 1 is the first slot after the context): slot g holds a query with
probability pi_g = min(1, c * g^-alpha), c chosen so that sum_g pi_g = Q. Randomised systematic
sampling draws exactly Q distinct slots per row with exactly these inclusion probabilities, so over
many rows the number of queries at gap g is proportional to g^-alpha, except at the head where the
law would ask for more than one query per slot (those slots are always queries).

Labels follow the model's contract (already shifted): labels[b, t] = input_ids[b, t + 1] = the
value at every query key position t, -100 everywhere else. The score is the accuracy of the argmax
prediction at those positions: an oracle scores 1.0, a model that always predicts the same value
token about 1 / (V - V//2).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from mm_rec.config import dataclass_from_dict
from mm_rec.constants import IGNORE_INDEX
from mm_rec.evaluation.scoring import predict_tokens


@dataclass(frozen=True)
class MQARConfig:
    """Task parameters. Construction validates them and raises ValueError naming the field."""

    vocab_size: int = 256  # V: keys from [0, V//2), values from [V//2, V)
    seq_len: int = 512  # T, tokens per row
    num_pairs: int = 32  # P key-value pairs in the context
    num_queries: int | None = None  # Q distinct keys asked for; None: every key once (Q = P)
    alpha: float = 1.0  # power-law exponent of the query gaps (0 = uniform)

    def __post_init__(self) -> None:
        def need(ok: bool, name: str, rule: str) -> None:
            if not ok:
                raise ValueError(f"MQARConfig.{name}={getattr(self, name)!r}: {rule}")

        for name in ("vocab_size", "seq_len", "num_pairs"):
            value = getattr(self, name)
            need(isinstance(value, int) and not isinstance(value, bool) and value > 0, name,
                 "must be a positive integer")
        need(self.vocab_size >= 4, "vocab_size", "must be >= 4 (two halves: keys and values)")
        need(self.num_pairs <= self.vocab_size // 2, "num_pairs",
             f"must be <= {self.vocab_size // 2} (distinct keys from the first half of the vocabulary)")
        need(self.num_queries is None or (isinstance(self.num_queries, int) and 0 < self.num_queries <= self.num_pairs),
             "num_queries", f"must be None or an integer in [1, num_pairs={self.num_pairs}]")
        need(isinstance(self.alpha, (int, float)) and self.alpha >= 0, "alpha", "must be >= 0")
        need(self.query_region >= self.queries, "seq_len",
             f"leaves {max(self.query_region, 0)} query slots after the {self.num_pairs} pairs, "
             f"need >= {self.queries}: use seq_len >= {2 * (self.num_pairs + self.queries)}")

    @property
    def queries(self) -> int:
        """Q, the number of queries per row."""
        return self.num_pairs if self.num_queries is None else self.num_queries

    @property
    def query_region(self) -> int:
        """R, the number of two-token slots after the context."""
        return self.seq_len // 2 - self.num_pairs

    @property
    def num_values(self) -> int:
        return self.vocab_size - self.vocab_size // 2

    @classmethod
    def from_dict(cls, values: dict) -> MQARConfig:
        return dataclass_from_dict(cls, values, "MQAR")


@dataclass
class MQARBatch:
    """A batch of MQAR rows and where the answers are.

    input_ids        [B, T] int64
    labels           [B, T] int64  the value at query_positions, -100 elsewhere
    query_positions  [B, Q]        token position of each query's key (ascending)
    key_positions    [B, Q]        token position of the same key in the context
    values           [B, Q]        the answers: labels at query_positions
    """

    input_ids: torch.Tensor
    labels: torch.Tensor
    query_positions: torch.Tensor
    key_positions: torch.Tensor
    values: torch.Tensor
    config: MQARConfig

    @property
    def distances(self) -> torch.Tensor:
        """[B, Q] tokens from each queried key in the context to its query."""
        return self.query_positions - self.key_positions

    @property
    def gaps(self) -> torch.Tensor:
        """[B, Q] slots from the end of the context to each query (1 = the first slot after it)."""
        return self.query_positions // 2 - self.config.num_pairs + 1


def gap_probabilities(config: MQARConfig) -> torch.Tensor:
    """pi [R] float64: probability that gap g = 1..R holds a query; sums to Q, each <= 1.

    pi_g = min(1, c * g^-alpha). The weights decrease with g, so the capped gaps are the first k;
    k grows until the rest of the law fits under the cap.
    """
    R, Q = config.query_region, config.queries
    weights = torch.arange(1, R + 1, dtype=torch.float64) ** -float(config.alpha)
    tail = weights.flip(0).cumsum(0).flip(0)  # tail[k] = sum of weights[k:]
    capped = 0
    while capped < Q and (Q - capped) * weights[capped] > tail[capped]:  # c * w_k > 1 with k capped
        capped += 1
    scale = (Q - capped) / tail[capped] if capped < R else 0.0
    probs = (scale * weights).clamp(max=1.0)
    probs[:capped] = 1.0
    return probs


def _sample_query_slots(probs: torch.Tensor, num_queries: int, batch_size: int,
                        generator: torch.Generator) -> torch.Tensor:
    """Exactly `num_queries` distinct slot indices [B, Q] (ascending) per row, slot i included with
    probability probs[i]: systematic sampling (one uniform u, select every item whose stretch of the
    cumulative sum crosses u + n for an integer n) over the slots in a random order."""
    order = torch.rand(batch_size, probs.numel(), generator=generator).argsort(dim=1)
    cum = probs[order].cumsum(dim=1)
    cum[:, -1] = num_queries  # the exact total, so every row selects exactly Q slots
    u = torch.rand(batch_size, 1, generator=generator, dtype=torch.float64)
    crossings = torch.floor(cum - u)
    chosen = crossings > torch.cat([torch.floor(-u), crossings[:, :-1]], dim=1)
    return order[chosen].view(batch_size, num_queries).sort(dim=1).values


def generate_mqar(config: MQARConfig, batch_size: int, seed: int | torch.Generator) -> MQARBatch:
    """`batch_size` MQAR rows. The same integer seed (or a generator in the same state) gives the
    same batch; a generator is advanced, so successive calls give fresh batches."""
    generator = seed if isinstance(seed, torch.Generator) else torch.Generator().manual_seed(seed)
    V, T, P, Q, B = config.vocab_size, config.seq_len, config.num_pairs, config.queries, batch_size
    half = V // 2

    keys = torch.rand(B, half, generator=generator).argsort(dim=1)[:, :P]  # distinct keys [B, P]
    values = torch.randint(half, V, (B, P), generator=generator)
    asked = torch.rand(B, P, generator=generator).argsort(dim=1)[:, :Q]  # context slot of each query's key
    slots = P + _sample_query_slots(gap_probabilities(config), Q, B, generator)  # [B, Q]

    input_ids = torch.randint(half, V, (B, T), generator=generator)  # noise everywhere, then overwrite
    input_ids[:, 0:2 * P:2] = keys
    input_ids[:, 1:2 * P:2] = values
    query_positions = 2 * slots
    answers = values.gather(1, asked)
    input_ids.scatter_(1, query_positions, keys.gather(1, asked))
    input_ids.scatter_(1, query_positions + 1, answers)
    labels = torch.full_like(input_ids, IGNORE_INDEX).scatter_(1, query_positions, answers)
    return MQARBatch(input_ids=input_ids, labels=labels, query_positions=query_positions,
                     key_positions=2 * asked, values=answers, config=config)


@dataclass
class MQARScore:
    """accuracy over all queries, and per bucket of key-to-query distance in tokens
    (powers of two, "lo-hi" inclusive) the pair (accuracy, number of queries)."""

    accuracy: float
    num_queries: int
    by_distance: dict[str, tuple[float, int]]


def score_mqar(model_or_logits: nn.Module | torch.Tensor, batch: MQARBatch, batch_size: int = 8) -> MQARScore:
    """Score argmax predictions at the query positions: a model (run `batch_size` rows at a time)
    or logits [B, T, V] for batch.input_ids."""
    predicted = predict_tokens(model_or_logits, batch.input_ids, batch.query_positions, batch_size)
    correct = (predicted == batch.values).flatten()
    bucket = torch.log2(batch.distances.flatten().double()).floor().long()
    by_distance = {}
    for b in bucket.unique().tolist():
        hits = correct[bucket == b]
        by_distance[f"{2 ** b}-{2 ** (b + 1) - 1}"] = (hits.double().mean().item(), hits.numel())
    return MQARScore(accuracy=correct.double().mean().item(), num_queries=correct.numel(), by_distance=by_distance)


def chance_accuracy(config: MQARConfig) -> float:
    """Expected accuracy of a model that always predicts the same value token."""
    return 1.0 / config.num_values


__all__ = ["MQARBatch", "MQARConfig", "MQARScore", "chance_accuracy", "gap_probabilities", "generate_mqar",
           "score_mqar"]
