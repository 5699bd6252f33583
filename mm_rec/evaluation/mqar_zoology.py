"""MQAR under Zoology's protocol (Arora, Eyuboglu et al., "Zoology: measuring and improving recall
in efficient language models"): their `multiquery_ar` data, a fixed training set trained for
epochs, fixed test sets scored after every epoch, early stop once the main test set passes 0.99.

The data (`multiquery_ar`), per row of T tokens with P pairs over a vocabulary of V:

    [0, 2P)    the context: key, value, key, value, ...; P distinct keys from [1, V/2), P distinct
               values from [V/2, V)
    [2P, T)    the query region, read as space = (T - 2P) // 2 two-token slots; P distinct gaps
               g in [0, space) are drawn without replacement with p_g ∝ a (g+1)^(a-1)
               (a = power_a, 0.01: nearly 1/(g+1)), and key i is asked at position 2P + 2 g_i, in
               the order of the draw. Every other position of the region holds a uniform random
               token from [0, V) (random_non_queries) or 0.

The labels are already shifted (labels[t] is the target of input t): the value of key i at
2P + 2 g_i, -100 everywhere else. The value is not in the input after its query: the model must
answer at the query itself. Accuracy is the argmax accuracy over the labelled positions.

This module is a reimplementation from that description, not Zoology's code: the draws differ
(torch generators, Floyd's algorithm, Gumbel top-k), the distribution is the same.

Training (`train_zoology`): AdamW and the warmup + cosine schedule of mm_rec.training.optim
(warmup ~1% of the steps, cosine to 0 at max_epochs), gradient clipping, bf16 autocast on CUDA.
The whole data set sits on the device; batches hold rows of one length (Zoology batches per
data segment too), so nothing is padded.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from mm_rec.constants import IGNORE_INDEX
from mm_rec.evaluation.training_state import load_training_state, save_training_state
from mm_rec.training.config import TrainingConfig
from mm_rec.training.optim import build_optimizer, build_scheduler, clip_gradients
from mm_rec.utils.device import autocast_for

ZOOLOGY_VOCAB = 8192
# Eval rows per forward: at most this many logits (1 GiB in bf16 on a GPU, 32 MiB in fp32 on a CPU).
EVAL_LOGITS = {"cuda": 2**29, "cpu": 2**23}


# ---------------------------------------------------------------------- the data
def multiquery_ar(num_rows: int, seq_len: int, num_pairs: int, vocab_size: int = ZOOLOGY_VOCAB,
                  seed: int | torch.Generator = 0, power_a: float = 0.01,
                  random_non_queries: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Zoology's MQAR rows (see the module docstring): inputs, labels, both int64 [num_rows, seq_len]
    on the CPU. The same integer seed gives the same rows on every machine; a generator is advanced.
    ValueError for sizes the task cannot hold."""
    check_cell(seq_len, num_pairs, vocab_size)
    if not (isinstance(num_rows, int) and num_rows >= 0):
        raise ValueError(f"num_rows={num_rows!r}: must be a non-negative integer")
    if not power_a > 0:
        raise ValueError(f"power_a={power_a!r}: must be > 0 (p_g ∝ a (g+1)^(a-1))")
    generator = seed if isinstance(seed, torch.Generator) else torch.Generator().manual_seed(seed)
    N, T, P, half = num_rows, seq_len, num_pairs, vocab_size // 2
    keys = 1 + _distinct(N, half - 1, P, generator)  # [N, P] from [1, V/2)
    values = half + _distinct(N, vocab_size - half, P, generator)  # [N, P] from [V/2, V)
    gaps = _power_law_gaps(N, (T - 2 * P) // 2, P, power_a, generator)  # [N, P], key i at gap i

    inputs = torch.zeros(N, T, dtype=torch.int64)
    inputs[:, 0:2 * P:2], inputs[:, 1:2 * P:2] = keys, values
    if random_non_queries:  # drawn for the whole region, then the queries overwrite their positions
        inputs[:, 2 * P:] = torch.randint(0, vocab_size, (N, T - 2 * P), generator=generator)
    positions = 2 * P + 2 * gaps
    inputs.scatter_(1, positions, keys)
    labels = torch.full_like(inputs, IGNORE_INDEX).scatter_(1, positions, values)
    return inputs, labels


def check_cell(seq_len: int, num_pairs: int, vocab_size: int) -> None:
    """ValueError unless P pairs fit a row of T tokens (T even, T >= 4P) and the vocabulary of V
    (P distinct keys from [1, V/2))."""
    for name, value in (("seq_len", seq_len), ("num_pairs", num_pairs), ("vocab_size", vocab_size)):
        if not (isinstance(value, int) and not isinstance(value, bool) and value > 0):
            raise ValueError(f"MQAR {name}={value!r}: must be a positive integer")
    if seq_len % 2:
        raise ValueError(f"MQAR seq_len={seq_len}: must be even (the query region is two-token slots)")
    if seq_len < 4 * num_pairs:
        raise ValueError(f"MQAR {seq_len}:{num_pairs}: seq_len must be >= 4 * num_pairs = {4 * num_pairs} "
                         "(the context and one query slot per pair)")
    if num_pairs > vocab_size // 2 - 1:
        raise ValueError(f"MQAR num_pairs={num_pairs}: a vocabulary of {vocab_size} holds at most "
                         f"{vocab_size // 2 - 1} distinct keys (from [1, {vocab_size // 2}))")


def _distinct(rows: int, n: int, k: int, generator: torch.Generator) -> torch.Tensor:
    """[rows, k] int64: per row k distinct values of [0, n) in a uniformly random order.

    Floyd's algorithm (a uniform k-subset in k draws, O(rows * k^2) work and no [rows, n] table),
    then a random permutation of each subset."""
    sample = torch.empty(rows, k, dtype=torch.int64)
    for i, j in enumerate(range(n - k, n)):
        draw = (torch.rand(rows, generator=generator, dtype=torch.float64) * (j + 1)).long()  # [0, j]
        taken = (sample[:, :i] == draw[:, None]).any(dim=1)
        sample[:, i] = torch.where(taken, j, draw)
    order = torch.rand(rows, k, generator=generator).argsort(dim=1)
    return sample.gather(1, order)


def gap_weights(space: int, power_a: float) -> torch.Tensor:
    """[space] float64: Zoology's gap law p_g = a (g+1)^(a-1) / sum, g = 0 .. space-1."""
    weights = power_a * torch.arange(1, space + 1, dtype=torch.float64) ** (power_a - 1)
    return weights / weights.sum()


def _power_law_gaps(rows: int, space: int, k: int, power_a: float, generator: torch.Generator) -> torch.Tensor:
    """[rows, k] int64: k distinct gaps of [0, space) per row, drawn one after another without
    replacement with probabilities p_g (numpy's `choice(replace=False, p=p)`), in draw order.

    Gumbel top-k: the k largest of log p_g + Gumbel noise, in descending order, have the
    distribution of k successive draws without replacement."""
    uniform = torch.rand(rows, space, generator=generator, dtype=torch.float64).clamp_min(1e-300)
    scores = gap_weights(space, power_a).log() - torch.log(-torch.log(uniform))
    return scores.topk(k, dim=1).indices


# ---------------------------------------------------------------------- the data sets
@dataclass(frozen=True)
class MQARCell:
    """One data configuration: `rows` rows of `seq_len` tokens with `num_pairs` pairs."""

    seq_len: int
    num_pairs: int
    rows: int

    @property
    def name(self) -> str:
        """"T:P", the key of the cell in logs and results."""
        return f"{self.seq_len}:{self.num_pairs}"


# Zoology's mixed training set of its MQAR figures (zoology/experiments/.../original_mqar_configs.py)
ZOOLOGY_TRAIN_SETS = "64:4:100000,128:8:20000,256:16:20000,256:32:20000,256:64:20000"
ZOOLOGY_TEST_SETS = "512:64"
ZOOLOGY_TEST_ROWS = 3000


def parse_cells(text: str, default_rows: int, vocab_size: int, what: str) -> tuple[MQARCell, ...]:
    """"T:P[:ROWS],..." -> cells (ROWS defaults to `default_rows`); ValueError naming `what` (the
    option) for anything else or a cell the vocabulary cannot hold."""
    cells = []
    for item in text.split(","):
        parts = item.strip().split(":")
        try:
            numbers = [int(p) for p in parts]
        except ValueError:
            numbers = []
        if len(numbers) not in (2, 3):
            raise ValueError(f"{what}: {item.strip()!r} is not T:P or T:P:ROWS (e.g. 512:64 or 64:4:100000)")
        seq_len, num_pairs, rows = numbers if len(numbers) == 3 else (*numbers, default_rows)
        if rows < 1:
            raise ValueError(f"{what}: {item.strip()!r} asks for {rows} rows; need at least 1")
        try:
            check_cell(seq_len, num_pairs, vocab_size)
        except ValueError as err:
            raise ValueError(f"{what}: {err}") from None
        cells.append(MQARCell(seq_len, num_pairs, rows))
    names = [cell.name for cell in cells]
    if len(set(names)) != len(names):
        raise ValueError(f"{what}: a T:P cell appears twice in {text!r}")
    return tuple(cells)


@dataclass(frozen=True)
class ZoologyConfig:
    """The protocol's settings. Construction validates them (ValueError naming the field)."""

    vocab_size: int = ZOOLOGY_VOCAB
    train_sets: tuple[MQARCell, ...] = ()  # may be empty to score a trained model only
    test_sets: tuple[MQARCell, ...] = ()  # the first is the main cell (early stop, reports)
    power_a: float = 0.01
    random_non_queries: bool = True
    lr: float = 1e-3
    max_epochs: int = 64
    batch_size: int | None = None  # rows per step at every length; None: zoology_batch_size(T)
    warmup_fraction: float = 0.01  # of all max_epochs' steps
    weight_decay: float = 0.1  # on matrices and embeddings (build_optimizer)
    betas: tuple[float, float] = (0.9, 0.999)  # torch's AdamW defaults, which Zoology uses
    grad_clip: float = 1.0
    target_accuracy: float = 0.99  # stop once the main test cell's accuracy exceeds this
    time_budget_s: float | None = None  # stop after the epoch that crosses this much wall time
    compile: bool = False  # torch.compile each block (GPU runs)
    seed: int = 0  # the data; the model's init is the caller's

    def __post_init__(self) -> None:
        def need(ok: bool, name: str, rule: str) -> None:
            if not ok:
                raise ValueError(f"ZoologyConfig.{name}={getattr(self, name)!r}: {rule}")

        need(bool(self.test_sets), "test_sets", "needs at least one T:P cell")
        for cell in self.train_sets + self.test_sets:
            check_cell(cell.seq_len, cell.num_pairs, self.vocab_size)
        need(self.lr > 0, "lr", "must be > 0")
        need(isinstance(self.max_epochs, int) and self.max_epochs > 0, "max_epochs", "must be a positive integer")
        need(self.batch_size is None or (isinstance(self.batch_size, int) and self.batch_size > 0), "batch_size",
             "must be a positive integer or None (Zoology's rule)")
        need(0 <= self.warmup_fraction < 1, "warmup_fraction", "must lie in [0, 1)")
        need(self.weight_decay >= 0, "weight_decay", "must be >= 0")
        need(self.grad_clip >= 0, "grad_clip", "must be >= 0 (0 = no clipping)")
        need(self.time_budget_s is None or self.time_budget_s > 0, "time_budget_s", "must be > 0 or None")

    @property
    def main_cell(self) -> str:
        return self.test_sets[0].name


@dataclass(eq=False)  # compared by identity: it holds tensors
class LengthGroup:
    """Training rows of one length on the training device: inputs, labels [N, T] int64."""

    inputs: torch.Tensor
    labels: torch.Tensor
    batch_size: int  # rows per step (<= N)

    @property
    def seq_len(self) -> int:
        return self.inputs.shape[1]


def zoology_batch_size(seq_len: int) -> int:
    """Zoology's rows per batch: 512 at T <= 128, then 64K tokens per batch (256 at T = 256, 128 at
    512, 64 at 1024)."""
    return max(1, min(512, 65536 // seq_len))


def cell_seed(seed: int, split: str, index: int) -> int:
    """The generator seed of cell `index` of the train or test split: every cell its own, the test
    cells disjoint from the training ones."""
    return 1000 * seed + (500 if split == "test" else 0) + index


def _cell_rows(config: ZoologyConfig, cells: tuple[MQARCell, ...], split: str) -> list[tuple[torch.Tensor, ...]]:
    return [multiquery_ar(cell.rows, cell.seq_len, cell.num_pairs, config.vocab_size, cell_seed(config.seed, split, i),
                          config.power_a, config.random_non_queries) for i, cell in enumerate(cells)]


def build_train_groups(config: ZoologyConfig, device: torch.device) -> list[LengthGroup]:
    """The training set on `device`, merged per length (cells of one T share batches). Generated
    on the CPU, so every device trains on the same rows."""
    rows = _cell_rows(config, config.train_sets, "train")
    groups = []
    for seq_len in sorted({cell.seq_len for cell in config.train_sets}):
        parts = [data for cell, data in zip(config.train_sets, rows) if cell.seq_len == seq_len]
        inputs, labels = (torch.cat(tensors).to(device) for tensors in zip(*parts))
        batch_size = min(config.batch_size or zoology_batch_size(seq_len), inputs.shape[0])
        groups.append(LengthGroup(inputs, labels, batch_size))
    return groups


def build_test_sets(config: ZoologyConfig, device: torch.device) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{cell name: (inputs, labels)} on `device`, in the order of config.test_sets."""
    rows = _cell_rows(config, config.test_sets, "test")
    return {cell.name: (inputs.to(device), labels.to(device)) for cell, (inputs, labels) in zip(config.test_sets, rows)}


def epoch_batches(groups: list[LengthGroup], device_generator: torch.Generator,
                  order_generator: torch.Generator) -> list[tuple[LengthGroup, torch.Tensor]]:
    """One epoch: every group's rows in a fresh random order, cut into full batches (the last
    partial batch of each group is left out, so every step has its group's shape: fixed shapes
    suit torch.compile; another epoch's shuffle leaves out other rows), then all batches in a
    random order. Row indices stay on the device: no host sync."""
    batches = []
    for group in groups:
        n = group.inputs.shape[0]
        perm = torch.randperm(n, device=group.inputs.device, generator=device_generator)
        full = n // group.batch_size
        batches += [(group, index) for index in perm[:full * group.batch_size].view(full, group.batch_size)]
    order = torch.randperm(len(batches), generator=order_generator).tolist()  # a CPU generator
    return [batches[i] for i in order]


# ---------------------------------------------------------------------- training
@dataclass
class EpochPoint:
    epoch: int
    step: int  # optimizer steps done
    train_loss: float  # mean over the epoch's steps
    accuracy: dict[str, float]  # per test cell
    seconds: float  # wall time since the start of training, evaluations included


@dataclass
class ZoologyResult:
    curve: list[EpochPoint] = field(default_factory=list)
    batch_sizes: dict[int, int] = field(default_factory=dict)  # T -> rows per step
    steps_per_epoch: int = 0
    warmup_steps: int = 0
    planned_steps: int = 0  # max_epochs * steps_per_epoch: the cosine's length
    stopped: str = ""  # "target" (accuracy passed), "time_budget" or "max_epochs"

    @property
    def best_accuracy(self) -> dict[str, float]:
        names = self.curve[0].accuracy if self.curve else {}
        return {name: max(p.accuracy[name] for p in self.curve) for name in names}

    def first_above(self, name: str, threshold: float) -> EpochPoint | None:
        """The first point whose accuracy on cell `name` exceeds `threshold`."""
        return next((p for p in self.curve if p.accuracy[name] > threshold), None)


@torch.inference_mode()
def count_correct(model: nn.Module, inputs: torch.Tensor, labels: torch.Tensor,
                  rows_per_forward: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(correct, labelled) as 0-dim tensors on the model's device: argmax predictions equal to the
    labels at the labelled positions of inputs, labels [N, T]. No host sync."""
    correct = torch.zeros((), dtype=torch.int64, device=inputs.device)
    labelled = torch.zeros((), dtype=torch.int64, device=inputs.device)
    for ids, target in zip(inputs.split(rows_per_forward), labels.split(rows_per_forward)):
        predicted = model(ids).logits.argmax(dim=-1)
        scored = target != IGNORE_INDEX
        correct += ((predicted == target) & scored).sum()
        labelled += scored.sum()
    return correct, labelled


def evaluate(model: nn.Module, tests: dict[str, tuple[torch.Tensor, torch.Tensor]],
             device: torch.device) -> dict[str, float]:
    """Accuracy per test cell (one host sync for all of them), under the device's autocast."""
    logits_width = getattr(getattr(model, "config", None), "vocab_size", ZOOLOGY_VOCAB)
    counts = []
    was_training = model.training
    model.eval()
    with autocast_for("auto", device):
        for inputs, labels in tests.values():
            rows = max(1, EVAL_LOGITS.get(device.type, EVAL_LOGITS["cpu"]) // (inputs.shape[1] * logits_width))
            counts.append(torch.stack(count_correct(model, inputs, labels, rows)))
    model.train(was_training)
    table = torch.stack(counts).tolist()
    return {name: c / max(n, 1) for name, (c, n) in zip(tests, table)}


def train_zoology(model: nn.Module, groups: list[LengthGroup], tests: dict[str, tuple[torch.Tensor, torch.Tensor]],
                  config: ZoologyConfig, log: Callable[[str], None] | None = print,
                  on_epoch: Callable[[ZoologyResult], None] | None = None, state_path: Path | None = None,
                  resume: bool = False) -> ZoologyResult:
    """Train `model` in place on its device for up to config.max_epochs epochs over `groups`,
    scoring `tests` after every epoch (the first test cell decides the early stop); `on_epoch`
    sees the result after every epoch (e.g. to write it). Returns the curve.

    `state_path`: the training state (weights, optimizer, schedule, the shuffles' and the global random
    generators, the curve) is written there after every epoch. With `resume`, training continues from
    it: the epochs after the saved one, as one uninterrupted run would have taken them (bit for bit on
    the CPU), with the time budget counted afresh and `seconds` continuing from the saved total. For a
    run stopped by its time budget, across processes or machines; the settings must be the same but
    for the time budget and compile (ValueError otherwise)."""
    if not groups:
        raise ValueError("train_zoology needs training rows (ZoologyConfig.train_sets is empty)")
    device = next(model.parameters()).device
    steps_per_epoch = sum(g.inputs.shape[0] // g.batch_size for g in groups)
    planned = config.max_epochs * steps_per_epoch
    warmup = max(1, round(config.warmup_fraction * planned)) if config.warmup_fraction > 0 else 0
    optimisation = TrainingConfig(max_steps=planned, batch_size=max(g.batch_size for g in groups), lr=config.lr,
                                  min_lr=0.0, warmup_steps=warmup, lr_decay_steps=planned,
                                  weight_decay=config.weight_decay, beta1=config.betas[0], beta2=config.betas[1],
                                  grad_clip=config.grad_clip)
    optimizer = build_optimizer(model, optimisation, device)
    scheduler = build_scheduler(optimizer, optimisation)
    if config.compile:
        from mm_rec.distributed.parallelize import apply_compile  # slow to import; only --compile needs it

        apply_compile(model)
    result = ZoologyResult(batch_sizes={g.seq_len: g.batch_size for g in groups}, steps_per_epoch=steps_per_epoch,
                           warmup_steps=warmup, planned_steps=planned)
    device_generator = torch.Generator(device=device).manual_seed(config.seed)
    order_generator = torch.Generator().manual_seed(config.seed)
    generators = dict(device_generator=device_generator, order_generator=order_generator)
    first_epoch, step, offset = 1, 0, 0.0
    if resume:
        saved = load_training_state(state_path, model, optimizer, scheduler, _resumable_settings(config))
        if saved["stopped"] in ("target", "max_epochs"):
            raise ValueError(f"nothing to resume: the run in {state_path} ended ({saved['stopped']}) after epoch "
                             f"{saved['epoch']}")
        for name, generator in generators.items():
            generator.set_state(saved["generators"][name])
        result.curve[:] = [EpochPoint(**point) for point in saved["curve"]]
        first_epoch, step, offset = saved["epoch"] + 1, saved["step"], saved["curve"][-1]["seconds"]
        if log is not None:
            log(f"resumed from {state_path} after epoch {first_epoch - 1} (step {step}, {offset:.1f} s)")
    start = time.perf_counter() - offset
    model.train()
    for epoch in range(first_epoch, config.max_epochs + 1):
        loss_sum = torch.zeros((), device=device)  # summed on the device: one sync per epoch
        batches = epoch_batches(groups, device_generator, order_generator)
        for group, index in batches:
            with autocast_for("auto", device):
                loss = model(group.inputs[index], labels=group.labels[index], return_logits=False).loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            clip_gradients(model, config.grad_clip)
            optimizer.step()
            scheduler.step()
            loss_sum += loss.detach().float()
        step += len(batches)
        accuracy = evaluate(model, tests, device)
        point = EpochPoint(epoch, step, loss_sum.item() / max(1, len(batches)), accuracy, time.perf_counter() - start)
        result.curve.append(point)
        if accuracy[config.main_cell] > config.target_accuracy:
            result.stopped = "target"
        elif config.time_budget_s is not None and point.seconds - offset > config.time_budget_s:
            result.stopped = "time_budget"
        elif epoch == config.max_epochs:
            result.stopped = "max_epochs"
        if log is not None:
            cells = "  ".join(f"{name} {acc:.4f}" for name, acc in accuracy.items())
            log(f"epoch {epoch:3d}/{config.max_epochs}  step {step:7d}  loss {point.train_loss:.4f}  "
                f"accuracy {cells}  lr {scheduler.get_last_lr()[0]:.2e}  {point.seconds:7.1f} s")
        if state_path is not None:
            progress = dict(epoch=epoch, step=step, stopped=result.stopped, curve=[asdict(p) for p in result.curve],
                            generators={name: g.get_state() for name, g in generators.items()})
            save_training_state(state_path, model, optimizer, scheduler, _resumable_settings(config), progress)
        if on_epoch is not None:
            on_epoch(result)
        if result.stopped:
            break
    if log is not None and result.stopped != "max_epochs":
        reason = (f"{config.main_cell} accuracy above {config.target_accuracy}" if result.stopped == "target"
                  else f"time budget of {config.time_budget_s} s")
        log(f"stopped after epoch {len(result.curve)} of {config.max_epochs} ({step} of {planned} steps): {reason}")
    return result


def _resumable_settings(config: ZoologyConfig) -> dict:
    """The settings a resumed run must share with the saved one (all but the time budget and compile)."""
    settings = asdict(config)
    for name in ("time_budget_s", "compile"):
        settings.pop(name)
    return settings


def transformer_cache_size(num_layers: int, hidden_dim: int, seq_len: int) -> int:
    """Values a Transformer keeps per sequence to decode at `seq_len`: keys and values of every
    layer and position."""
    return 2 * num_layers * seq_len * hidden_dim


def chance_accuracy(vocab_size: int) -> float:
    """Accuracy of always answering the same value token."""
    return 1.0 / (vocab_size - vocab_size // 2)


__all__ = ["EpochPoint", "LengthGroup", "MQARCell", "ZOOLOGY_TEST_ROWS", "ZOOLOGY_TEST_SETS", "ZOOLOGY_TRAIN_SETS",
           "ZOOLOGY_VOCAB", "ZoologyConfig", "ZoologyResult", "build_test_sets", "build_train_groups",
           "chance_accuracy", "check_cell", "count_correct", "epoch_batches", "evaluate", "gap_weights",
           "multiquery_ar", "parse_cells", "train_zoology", "transformer_cache_size", "zoology_batch_size"]
