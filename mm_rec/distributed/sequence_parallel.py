"""Sequence parallelism: every sequence of a batch cut in time across N processes, the recurrent state
handed on exactly (`mmrec train --parallel sp`; docs/distributed.md, "Sequence parallelism").

Process r (rank r of the group) holds part r of every sequence: tokens [bounds[r], bounds[r + 1]) of
the batch (`part_bounds`; the cuts need not fall on block boundaries, invariant I4 of
docs/architecture.md makes any cut exact), and a full replica of the model.

**The nonlinear path: a pipeline.** The core recurrence h_t = z_t * sigmoid(h_{t-1} W_g + b_g) +
gamma_t * h_{t-1} cannot be split in time, so rank r needs the whole carried state (every
`LayerState` piece of every layer and the position: `MemoryState.state_dict`) at the end of part
r - 1 before it starts. `sequence_parallel_step` cuts the batch into M micro-batches of rows and
pipelines them: rank r runs micro-batch j while rank r + 1 runs j - 1.

  forward   rank r receives micro-batch j's state from rank r - 1 (`_RecvState`), runs the model on
            its part, sends the state after its part to rank r + 1 (`_SendState`);
  backward  the gradient of that state comes back from rank r + 1 (`_SendState`'s backward
            receives it) and the gradient of the received state goes to rank r - 1 (`_RecvState`'s
            backward sends it): autograd carries d(state) across the boundaries like any other edge.

Schedule: one-forward-one-backward (1F1B) per rank: N - 1 - r warm-up forwards, then alternately
one forward and one backward, then the remaining backwards; at most N - r micro-batches are in
flight on rank r. The bubble (idle fraction of a step with equal parts and micro-batches) is
(N - 1) / (M + N - 1), as in GPipe; 1F1B only bounds the memory.

Messages (point-to-point, `torch.distributed.isend`/`irecv`; sends never block the sender) are the
tensors of `MemoryState.state_dict()` in its order (position, then layer by layer the present
pieces in `LAYER_FIELDS` order), shapes and dtypes known on both sides from `model.init_state`.
A gradient message is the floating-point ones in the same order. Between two neighbours both
post their operations in one order: forward states j = 0..M-1 interleaved with gradients
j = 0..M-1 as the schedule runs them (the receive of a forward state is posted before a backward
whose gradient goes the other way, as Megatron-LM's send_backward_recv_forward), then the
hand-over. NCCL needs that (it runs one pair's operations in order on one stream, so a large
message posted out of order deadlocks); gloo also matches them by tag. Only gloo is tested (CPU).

**The loss** is the cross entropy summed over this rank's labelled tokens divided by the number of
labelled tokens of the whole batch on all ranks (one all-reduce), so the sum over ranks is the
single-process mean. Each rank holds a full replica: `all_reduce_gradients` sums the parameter
gradients (composing with FSDP over a second mesh dimension is not implemented).

**The linear path** (`sequence_parallel_scan`): a linear recurrence needs no pipeline; each rank
scans its part from zero and one all-gather of per-part (total decay, final state) summaries
gives every rank its true incoming state. MM-Rec's layers do not use it: the default recurrence
is nonlinear, and even the gate_input=input ablation carries nonlinear state (the ring's top-P
selection, the window), so the model runs on the pipeline in every configuration.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn

try:  # the differentiable all-gather (its backward is a reduce-scatter)
    from torch.distributed._functional_collectives import all_gather_single_autograd as all_gather_autograd
except ImportError:  # older torch (the GPU machine's 2.11): the same under its earlier name
    from torch.distributed._functional_collectives import all_gather_tensor_autograd as all_gather_autograd

from mm_rec.constants import IGNORE_INDEX
from mm_rec.core.associative_scan import LOG_CLAMP_MAX, LOG_CLAMP_MIN, associative_scan_exponential
from mm_rec.core.memory_state import MemoryState
from mm_rec.ops import compute_dtype

FORWARD, BACKWARD, HAND_OVER = 0, 1, 2  # message kinds (part of the tag)


def part_bounds(length: int, world_size: int) -> list[int]:
    """[0, b_1, ..., length]: the cuts of a sequence of `length` tokens into `world_size` contiguous
    parts, part r = [b_r, b_{r+1}), as equal as possible (the first length % world_size one longer)."""
    if length < world_size:
        raise ValueError(f"a sequence of {length} tokens cannot be cut into {world_size} non-empty parts")
    base, extra = divmod(length, world_size)
    bounds = [0]
    for r in range(world_size):
        bounds.append(bounds[-1] + base + (r < extra))
    return bounds


def local_part(x: torch.Tensor, rank: int, world_size: int, bounds: list[int] | None = None) -> torch.Tensor:
    """Rank `rank`'s part of x [B, T, ...] along dim 1 (`bounds` from `part_bounds` by default)."""
    bounds = bounds or part_bounds(x.shape[1], world_size)
    return x[:, bounds[rank]:bounds[rank + 1]]


@dataclass
class _Channel:
    """The point-to-point messages of one step between this rank and its neighbours in time."""

    group: dist.ProcessGroup | None
    rank: int  # in the group
    size: int
    num_microbatches: int
    num_tensors: int  # tensors of one state message
    device: torch.device
    pending: list = field(default_factory=list)  # (work, tensor) of sends not yet completed
    posted: dict = field(default_factory=dict)  # (kind, microbatch) -> (buffers, works) of receives posted early

    def peer(self, offset: int) -> int:
        """Global rank of the group member `offset` places after this one (cyclically)."""
        member = (self.rank + offset) % self.size
        return member if self.group is None else dist.get_global_rank(self.group, member)

    def tag(self, kind: int, microbatch: int, index: int) -> int:
        return (kind * self.num_microbatches + microbatch) * self.num_tensors + index

    def send(self, tensors: dict[int, torch.Tensor], offset: int, kind: int, microbatch: int) -> None:
        """Post non-blocking sends of {message index: tensor}; `wait` completes them."""
        # drop the sends already completed: each holds a whole state (a GiB per row at the 7B sizes)
        self.pending = [(work, tensor) for work, tensor in self.pending if not work.is_completed()]
        for index, tensor in tensors.items():
            tensor = tensor.detach().contiguous()  # kept referenced until the send completes
            work = dist.isend(tensor, self.peer(offset), group=self.group, tag=self.tag(kind, microbatch, index))
            self.pending.append((work, tensor))

    def post_recv(self, specs: dict[int, tuple[torch.Size, torch.dtype]], offset: int, kind: int,
                  microbatch: int) -> None:
        """Post non-blocking receives of {message index: tensor of this shape and dtype}; `recv` takes them."""
        out = {i: torch.empty(shape, dtype=dtype, device=self.device) for i, (shape, dtype) in specs.items()}
        works = [dist.irecv(t, self.peer(offset), group=self.group, tag=self.tag(kind, microbatch, i))
                 for i, t in out.items()]
        self.posted[kind, microbatch] = out, works

    def recv(self, specs: dict[int, tuple[torch.Size, torch.dtype]], offset: int, kind: int,
             microbatch: int) -> dict[int, torch.Tensor]:
        """Receive {message index: tensor} of the given shapes and dtypes (posted now unless posted already)."""
        if (kind, microbatch) not in self.posted:
            self.post_recv(specs, offset, kind, microbatch)
        out, works = self.posted.pop((kind, microbatch))
        for work in works:
            work.wait()
        return out

    def wait(self) -> None:
        for work, _ in self.pending:
            work.wait()
        self.pending.clear()


class _RecvState(torch.autograd.Function):
    """Forward: receive a state message from the previous rank. Backward: send the gradients of its
    floating-point tensors back to that rank. `anchor` (a scalar that requires grad) only makes
    autograd record the node; its gradient is None."""

    @staticmethod
    def forward(ctx, anchor, channel: _Channel, microbatch: int, specs: dict):
        tensors = channel.recv(specs, -1, FORWARD, microbatch)
        ctx.channel, ctx.microbatch = channel, microbatch
        ctx.floating = [i for i, t in tensors.items() if t.is_floating_point()]
        ctx.mark_non_differentiable(*[t for t in tensors.values() if not t.is_floating_point()])
        return tuple(tensors.values())

    @staticmethod
    def backward(ctx, *grads):
        ctx.channel.send({i: grads[i] for i in ctx.floating}, -1, BACKWARD, ctx.microbatch)
        return None, None, None, None


class _SendState(torch.autograd.Function):
    """Forward: send a state message to the next rank and return a zero scalar (the caller adds it
    to its loss, so that backward reaches this node). Backward: receive the gradients of the
    message's floating-point tensors from the next rank."""

    @staticmethod
    def forward(ctx, channel: _Channel, microbatch: int, *tensors):
        channel.send(dict(enumerate(tensors)), 1, FORWARD, microbatch)
        ctx.channel, ctx.microbatch = channel, microbatch
        ctx.specs = {i: (t.shape, t.dtype) for i, t in enumerate(tensors) if t.is_floating_point()}
        return torch.zeros((), device=channel.device)

    @staticmethod
    def backward(ctx, _):
        grads = ctx.channel.recv(ctx.specs, 1, BACKWARD, ctx.microbatch)
        return None, None, *(grads.get(i) for i in range(len(ctx.needs_input_grad) - 2))


def pipeline_schedule(rank: int, world_size: int, num_microbatches: int,
                      backward: bool = True) -> list[tuple[str, int]]:
    """The 1F1B order of rank `rank`: ("F", j) and ("B", j) steps (forwards only without backward)."""
    if not backward:
        return [("F", j) for j in range(num_microbatches)]
    warmup = min(world_size - 1 - rank, num_microbatches)
    order = [("F", j) for j in range(warmup)]
    for j in range(warmup, num_microbatches):
        order += [("F", j), ("B", j - warmup)]
    return order + [("B", j) for j in range(num_microbatches - warmup, num_microbatches)]


@dataclass
class SequenceParallelOutput:
    """What `sequence_parallel_step` returns on every rank.

    loss    mean cross entropy over every labelled token of the batch on all ranks (detached; the same
            value everywhere)
    logits  [B, T_r, V] this rank's part (with return_logits; detached), else None
    state   with hand_over_state, on rank 0: the (detached) state after the whole sequence, handed over
            by the last rank, to start the next batch with; None elsewhere
    """

    loss: torch.Tensor
    logits: torch.Tensor | None = None
    state: MemoryState | None = None


def sequence_parallel_step(model: nn.Module, input_ids: torch.Tensor, labels: torch.Tensor,
                           state: MemoryState | None = None, num_microbatches: int = 1,
                           group: dist.ProcessGroup | None = None, loss_scale: float = 1.0,
                           return_logits: bool = False, hand_over_state: bool = False) -> SequenceParallelOutput:
    """Forward (and, with gradients enabled, backward) of one batch cut in time across the group.

    Collective: every rank of `group` (default: all processes) calls it with its own part.

    model: an `MMRecModel` (possibly wrapped by `apply_parallelism(mode="sp")`), the same weights everywhere.
    input_ids, labels: [B, T_r] this rank's part of every sequence (rank r: tokens [b_r, b_{r+1}) of
        each row, see `local_part`); B is the same everywhere, T_r may differ.
    state: rank 0 only: the state the batch starts from (None: a fresh stream); None on other ranks,
        which receive theirs.
    num_microbatches: M, groups of consecutive rows pipelined through the ranks (at most B).
    loss_scale: the gradient is that of loss_scale * loss (1 / grad_accum_steps when accumulating).

    Parameter gradients are accumulated into `.grad` locally, each rank's for its own part: call
    `all_reduce_gradients` before the optimizer step.
    """
    rank = dist.get_rank(group) if dist.is_initialized() else 0
    size = dist.get_world_size(group) if dist.is_initialized() else 1
    if labels is None or labels.shape != input_ids.shape:
        raise ValueError("sequence parallelism needs labels of input_ids' shape on every rank")
    if num_microbatches < 1:
        raise ValueError(f"num_microbatches must be >= 1, got {num_microbatches}")
    if rank != 0 and state is not None:
        raise ValueError(f"rank {rank} was given a state: only rank 0 starts from one, the others receive it")
    device, B = input_ids.device, input_ids.shape[0]
    if state is None and rank == 0:
        state = model.init_state(B, device=device)
    rows = [slice(int(r[0]), int(r[-1]) + 1) for r in torch.arange(B).tensor_split(min(num_microbatches, B))]
    templates = [model.init_state(r.stop - r.start, device="meta").state_dict() for r in rows]
    specs = [{i: (t.shape, t.dtype) for i, t in enumerate(template.values())} for template in templates]
    names = list(templates[0])
    channel = _Channel(group, rank, size, len(rows), len(names), device)

    count = (labels != IGNORE_INDEX).sum()
    if size > 1:
        dist.all_reduce(count, group=group)  # the loss is the mean over the labelled tokens of all ranks
    count = count.clamp_min(1)

    graphs: dict[int, torch.Tensor] = {}
    loss_sums, logits, finals = [], [], []

    def forward(j: int) -> None:
        if rank == 0:
            state_in = state.select_rows(rows[j])
        else:
            anchor = torch.zeros((), device=device, requires_grad=torch.is_grad_enabled())
            state_in = MemoryState.from_state_dict(dict(zip(names, _RecvState.apply(anchor, channel, j, specs[j]))))
        out = model(input_ids[rows[j]], state=state_in, labels=labels[rows[j]], return_logits=return_logits,
                    loss_reduction="sum")
        objective = out.loss * loss_scale / count
        if rank < size - 1:
            message = out.state.state_dict()
            _check_message(message, templates[j])
            objective = objective + _SendState.apply(channel, j, *message.values())
        elif hand_over_state:
            finals.append(out.state.detach())
        graphs[j] = objective
        loss_sums.append(out.loss.detach())
        if return_logits:
            logits.append(out.logits.detach())

    schedule = pipeline_schedule(rank, size, len(rows), backward=torch.is_grad_enabled())
    for (kind, j), following in zip(schedule, schedule[1:] + [None]):
        if kind == "F":
            forward(j)
            continue
        if rank > 0 and following is not None and following[0] == "F":
            # Post the next forward's receive before this backward sends its gradient back: NCCL runs one
            # pair's sends and receives in order on one stream, and the previous rank sends that forward
            # state before it waits for this gradient, so a large message would otherwise deadlock.
            channel.post_recv(specs[following[1]], -1, FORWARD, following[1])
        graphs.pop(j).backward()
    channel.wait()

    handed = None
    if hand_over_state:  # the last rank's final state starts rank 0's next batch
        if rank == size - 1:
            final = MemoryState.cat_rows(finals)
            if rank == 0:
                handed = final
            else:
                channel.send(dict(enumerate(final.state_dict().values())), 1, HAND_OVER, 0)
                channel.wait()
        elif rank == 0:
            whole = model.init_state(B, device="meta").state_dict()
            received = channel.recv({i: (t.shape, t.dtype) for i, t in enumerate(whole.values())}, -1, HAND_OVER, 0)
            handed = MemoryState.from_state_dict(dict(zip(whole, received.values())))

    loss = torch.stack(loss_sums).sum()
    if size > 1:
        dist.all_reduce(loss, group=group)
    return SequenceParallelOutput(loss=loss / count, logits=torch.cat(logits) if return_logits else None,
                                  state=handed)


def _check_message(message: dict[str, torch.Tensor], template: dict[str, torch.Tensor]) -> None:
    """The receiver allocates from the template: a state that differs from it would arrive garbled."""
    got = [(name, tuple(t.shape), t.dtype) for name, t in message.items()]
    want = [(name, tuple(t.shape), t.dtype) for name, t in template.items()]
    if got != want:
        diff = next((g, w) for g, w in zip(got + [None] * len(want), want + [None] * len(got)) if g != w)
        raise ValueError(f"the state to hand on does not match model.init_state's layout: {diff[0]} vs {diff[1]}")


def all_reduce_gradients(model: nn.Module, group: dist.ProcessGroup | None = None) -> None:
    """Sum every parameter's gradient over the group (each rank holds the gradient of its own part).
    Every rank must hold gradients for the same parameters (true for replicas that ran a step)."""
    if not dist.is_initialized() or dist.get_world_size(group) == 1:
        return
    works = [dist.all_reduce(p.grad, group=group, async_op=True) for p in model.parameters() if p.grad is not None]
    for work in works:
        work.wait()


def sequence_parallel_scan(log_a: torch.Tensor, b: torch.Tensor, group: dist.ProcessGroup | None = None,
                           initial_state: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """h_t = exp(log_a_t) * h_{t-1} + b_t over a sequence cut in time across the group.

    Collective. Each rank passes its part log_a, b [B, T_r, ...] (T_r may differ; B and the feature
    shape may not); `initial_state` [B, ...] is h_0 of the whole sequence, read on rank 0 only.
    Returns, as `associative_scan_exponential` does for a whole sequence, this part's h [B, T_r, ...]
    (b's dtype) and the state after this part [B, ...] (accumulation dtype). Differentiable with
    respect to every input on every rank.

    1. every rank scans its part from zero (rank 0 from h_0): h'_t, and its summary
       (L_r = sum_t log a_t, the part's total decay in log space; F_r = h'_{T_r});
    2. one all-gather of the summaries; the incoming state of rank r is
       h_in(r) = sum_{s < r} exp(sum_{s < q < r} L_q) F_s (the scan of the summaries before it);
    3. h_t = h'_t + exp(sum_{s <= t} log a_s) * h_in(r).
    Every exponent is a sum of clamped log decays ([-50, 0], clamped first as the scan does), so it
    is <= 0 and never the difference of two sums. The gather's backward is a collective: every rank
    must backpropagate through its outputs, and every rank's h_in depends on the gathered tensor
    (rank 0's with weight zero) so that its backward reaches it.
    """
    rank = dist.get_rank(group) if dist.is_initialized() else 0
    acc = compute_dtype(log_a, b, initial_state)
    log_a = log_a.to(acc).clamp(LOG_CLAMP_MIN, LOG_CLAMP_MAX)
    h, final = associative_scan_exponential(log_a, b, initial_state if rank == 0 else None)
    total = log_a.sum(1)
    summaries = torch.stack([total, final])  # [2, B, ...]
    if dist.is_initialized() and dist.get_world_size(group) > 1:
        summaries = all_gather_autograd(summaries, 0, group or dist.group.WORLD)
    totals, finals = summaries.unflatten(0, (-1, 2)).unbind(1)  # [N, B, ...] each
    part = torch.arange(totals.shape[0], device=totals.device)
    between = ((part[:, None] < part[None, :]) & (part[None, :] < rank)).to(acc)  # [s, q]: s < q < rank
    decay = torch.einsum("sq,q...->s...", between, totals)  # log decay from the end of part s to our start
    before = (part < rank).view(-1, *[1] * final.dim())
    incoming = torch.where(before, torch.exp(decay) * finals, 0.0).sum(0)
    shape = (incoming.shape[0], 1, *incoming.shape[1:])
    h = h.to(acc) + torch.exp(torch.cumsum(log_a, dim=1)) * incoming.view(shape)
    return h.to(b.dtype), final + torch.exp(total) * incoming
