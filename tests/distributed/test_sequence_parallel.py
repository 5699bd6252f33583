"""Sequence parallelism on CPU (gloo, 2 and 4 processes) against one process on the same batches:
the pipelined model (logits, loss, every parameter gradient, the state handed to the next batch,
and forwards only without gradients) and the parallel associative scan (outputs and gradients);
plus the single-process pieces (cuts, the schedule simulated, one process)."""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from mm_rec import MMRecConfig, MMRecModel
from mm_rec.constants import IGNORE_INDEX
from mm_rec.core.associative_scan import associative_scan_exponential
from mm_rec.distributed import init_distributed
from mm_rec.distributed.sequence_parallel import (
    all_reduce_gradients,
    local_part,
    part_bounds,
    pipeline_schedule,
    sequence_parallel_scan,
    sequence_parallel_step,
)

# C = 4 and a ring of S = 4 sub-slots (2 per block; 1 block kept by age, 2 sub-slots by importance):
# every part of ~31-62 tokens completes 7-15 blocks, so the ring wraps and evicts inside each part.
# 123 tokens cut into 2 or 4 parts: the cuts (62; 31, 62, 93) are not multiples of C. Segments of
# 16 tokens: each part also runs as several recomputed segments inside the model.
CONFIG = MMRecConfig.from_preset("tiny", num_layers=2, memory_size_M=4, chunk_size=4, slots_per_block=2,
                                 max_segment_len=16)
ROWS, LENGTH, MICROBATCHES, BATCHES = 3, 123, 2, 2  # micro-batches of 2 rows and 1 row
DTYPES = (torch.float32, torch.float64)


def build(dtype: torch.dtype) -> MMRecModel:
    torch.manual_seed(0)
    return MMRecModel(CONFIG).to(dtype)


def batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Fresh random batches; labels partly ignored, unevenly over the parts (the loss is normalised
    by the count over all of them)."""
    generator = torch.Generator().manual_seed(int(os.environ.get("SP_TEST_SEED", "1")))
    out = []
    for _ in range(BATCHES):
        ids = torch.randint(0, CONFIG.vocab_size, (ROWS, LENGTH), generator=generator)
        labels = torch.randint(0, CONFIG.vocab_size, (ROWS, LENGTH), generator=generator)
        labels[0, :40] = IGNORE_INDEX
        labels[torch.rand(ROWS, LENGTH, generator=generator) < 0.1] = IGNORE_INDEX
        out.append((ids, labels))
    return out


def scan_inputs(dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    """log_a (some beyond both clamps), b, h0 [2, LENGTH, 3, 5] and the loss weights of h and final."""
    generator = torch.Generator().manual_seed(2)
    log_a = -torch.rand(2, LENGTH, 3, 5, generator=generator, dtype=torch.float64) * 0.3
    log_a[:, 5] = -60.0
    log_a[:, 50] = 0.5
    b = torch.randn(2, LENGTH, 3, 5, generator=generator, dtype=torch.float64)
    h0 = torch.randn(2, 3, 5, generator=generator, dtype=torch.float64)
    weight = torch.randn(2, LENGTH, 3, 5, generator=generator, dtype=torch.float64)
    final_weight = torch.randn(2, 3, 5, generator=generator, dtype=torch.float64)
    return tuple(t.to(dtype) for t in (log_a, b, h0, weight, final_weight))


def scan_part_loss(h, final, weight, final_weight):
    return (h * weight).sum() + (final * final_weight).sum()


def _worker(rank: int, world_size: int, port: int, workdir: str) -> None:
    """One process: both dtypes, two batches with the state handed over, then the parallel scan;
    its results go to rank{rank}.pt for the test to compare with one process."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    init_distributed("cpu")
    part = lambda x: local_part(x, rank, world_size)  # noqa: E731
    results = {}
    for dtype in DTYPES:
        model, state, steps = build(dtype), None, []
        for ids, labels in batches():
            out = sequence_parallel_step(model, part(ids), part(labels), state=state, num_microbatches=MICROBATCHES,
                                         return_logits=True, hand_over_state=True)
            all_reduce_gradients(model)
            steps.append(dict(loss=out.loss, logits=out.logits, state=out.state and out.state.state_dict(),
                              grads={n: p.grad.clone() for n, p in model.named_parameters()}))
            model.zero_grad(set_to_none=True)
            state = out.state
        with torch.no_grad():  # forwards only: the same loss and logits, no gradient messages
            ids, labels = batches()[0]
            out = sequence_parallel_step(model, part(ids), part(labels), num_microbatches=MICROBATCHES,
                                         return_logits=True)
        steps.append(dict(loss=out.loss, logits=out.logits))
        results[dtype] = steps

        log_a, b, h0, weight, final_weight = scan_inputs(dtype)
        log_a, b, h0 = (t.requires_grad_() for t in (log_a, b, h0))
        h, final = sequence_parallel_scan(part(log_a), part(b), initial_state=h0 if rank == 0 else None)
        scan_part_loss(h, final, part(weight), final_weight * (rank + 1)).backward()
        results[("scan", dtype)] = dict(h=h.detach(), final=final.detach(), log_a=log_a.grad, b=b.grad, h0=h0.grad)
    torch.save(results, Path(workdir) / f"rank{rank}.pt")
    (Path(workdir) / f"done-{rank}").touch()
    # skip the interpreter's teardown: gloo's threads can abort there on a loaded 2-core machine
    os._exit(0)


def run_workers(world_size: int, workdir: Path, timeout_s: float = 300) -> None:
    """mp.spawn of `_worker` that fails instead of hanging when messages deadlock; a worker killed
    at teardown after finishing its work (gloo on a loaded machine) is accepted, once retried."""
    for attempt in range(2):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        context = mp.spawn(_worker, args=(world_size, port, str(workdir)), nprocs=world_size, join=False)
        deadline = time.monotonic() + timeout_s
        try:
            while not context.join(timeout=1):
                if time.monotonic() > deadline:
                    for process in context.processes:
                        process.kill()
                    pytest.fail(f"sequence-parallel workers did not finish within {timeout_s} s")
            return
        except mp.ProcessExitedException as err:
            if err.exit_code is not None and err.exit_code >= 0:
                raise
            if all((workdir / f"done-{r}").exists() for r in range(world_size)):
                return
            if attempt == 1:
                raise


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative error of a against b (Frobenius norms, float64)."""
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


def single_process(dtype: torch.dtype) -> list[dict]:
    """The reference: one process, whole sequences, the state carried (detached) to the next batch."""
    model, state, steps = build(dtype), None, []
    for ids, labels in batches():
        out = model(ids, state=state, labels=labels)
        out.loss.backward()
        steps.append(dict(loss=out.loss.detach(), logits=out.logits.detach(), state=out.state.detach().state_dict(),
                          grads={n: p.grad.clone() for n, p in model.named_parameters()}))
        model.zero_grad(set_to_none=True)
        state = out.state.detach()
    return steps


TOLERANCE = {torch.float32: 1e-5, torch.float64: 1e-6}  # float64: the level weights' softmax runs in fp32


@pytest.mark.slow
@pytest.mark.parametrize("world_size", [2, 4])
def test_pipelined_model_and_parallel_scan_match_one_process(world_size, tmp_path):
    run_workers(world_size, tmp_path)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(world_size)]
    reference = {dtype: single_process(dtype) for dtype in DTYPES}
    for dtype in DTYPES:
        tol = TOLERANCE[dtype]
        no_grad = ranks[0][dtype][-1]
        assert rel(no_grad["loss"], reference[dtype][0]["loss"]) < tol
        assert rel(torch.cat([ranks[r][dtype][-1]["logits"] for r in range(world_size)], 1),
                   reference[dtype][0]["logits"]) < tol
        for step, ref in enumerate(reference[dtype]):
            where = f"{dtype}, batch {step}"
            for r in range(world_size):  # the loss is global: the same on every rank
                assert rel(ranks[r][dtype][step]["loss"], ref["loss"]) < tol, where
            logits = torch.cat([ranks[r][dtype][step]["logits"] for r in range(world_size)], dim=1)
            assert rel(logits, ref["logits"]) < tol, where
            handed = ranks[0][dtype][step]["state"]  # the last rank's final state, now on rank 0
            assert handed.keys() == ref["state"].keys() and all(ranks[r][dtype][step]["state"] is None
                                                                  for r in range(1, world_size))
            for name, value in ref["state"].items():
                if value.is_floating_point():
                    assert rel(handed[name], value) < tol, (where, name)
                else:
                    assert torch.equal(handed[name], value), (where, name)
            for name, expected in ref["grads"].items():
                grads = [ranks[r][dtype][step]["grads"][name] for r in range(world_size)]
                assert all(torch.equal(g, grads[0]) for g in grads), (where, name)  # all-reduced: identical
                error = rel(grads[0], expected)
                if dtype == torch.float32 and error >= tol:
                    # A few gradients cancel to ~1e-7 of the largest at init (age and window slopes, level-2
                    # biases): fp32 rounding alone moves them by more than 1e-5, whatever the summation order.
                    # Those must be no farther from the float64 gradient than 3x the single-process fp32 one.
                    exact = reference[torch.float64][step]["grads"][name]
                    assert rel(grads[0], exact) < 3 * rel(expected, exact), (where, name, error)
                else:
                    assert error < tol, (where, name, error)

        # The scan: every rank's part of h, its final state and its gradients against one scan.
        log_a, b, h0, weight, final_weight = scan_inputs(dtype)
        log_a, b, h0 = (t.requires_grad_() for t in (log_a, b, h0))
        h, final = associative_scan_exponential(log_a, b, h0)
        bounds = part_bounds(LENGTH, world_size)
        loss = (h * weight).sum()
        for r in range(world_size):
            loss = loss + (h[:, bounds[r + 1] - 1] * final_weight * (r + 1)).sum()
        loss.backward()
        scan = [ranks[r][("scan", dtype)] for r in range(world_size)]
        tol = {torch.float32: 1e-5, torch.float64: 1e-12}[dtype]
        assert rel(torch.cat([s["h"] for s in scan], 1), h) < tol
        for r in range(world_size):
            assert rel(scan[r]["final"], h[:, bounds[r + 1] - 1]) < tol, r
        for name, grad in (("log_a", log_a.grad), ("b", b.grad)):
            got = sum(s[name] for s in scan)  # each rank's gradient is nonzero on its own part only
            assert rel(got, grad) < tol, name
        assert rel(scan[0]["h0"], h0.grad) < tol


def test_part_bounds_cut_anywhere_and_refuse_empty_parts():
    assert part_bounds(123, 4) == [0, 31, 62, 93, 123]
    assert part_bounds(8, 2) == [0, 4, 8]
    x = torch.arange(30).view(2, 15)
    assert torch.equal(torch.cat([local_part(x, r, 4) for r in range(4)], 1), x)
    with pytest.raises(ValueError, match="non-empty"):
        part_bounds(3, 4)


@pytest.mark.parametrize("world_size, microbatches", [(1, 3), (2, 1), (2, 4), (4, 2), (4, 8), (8, 3)])
def test_1f1b_schedule_runs_without_deadlock_and_has_the_documented_bubble(world_size, microbatches):
    """Simulate the schedule with unit-time forwards and backwards: every step once, a forward after the
    previous rank's, a backward after the next rank's and its own forward; no more than N - r micro-batches
    in flight on rank r; the step takes 2 (M + N - 1) units, so the idle fraction is (N - 1) / (M + N - 1)."""
    N, M = world_size, microbatches
    orders = [pipeline_schedule(r, N, M) for r in range(N)]
    for r, order in enumerate(orders):
        assert sorted(order) == sorted([("F", j) for j in range(M)] + [("B", j) for j in range(M)])
        in_flight = [sum(1 if k == "F" else -1 for k, _ in order[:i + 1]) for i in range(len(order))]
        assert max(in_flight) <= min(N - r, M)
    done, position, clock = {}, [0] * N, 0
    while any(p < 2 * M for p in position):
        ready = []
        for r in range(N):
            if position[r] == 2 * M:
                continue
            kind, j = orders[r][position[r]]
            needs = [("F", r - 1, j)] if kind == "F" and r > 0 else []
            if kind == "B":
                needs = [("F", r, j)] + ([("B", r + 1, j)] if r < N - 1 else [])
            if all(done.get(n, clock + 1) <= clock for n in needs):
                ready.append((r, kind, j))
        assert ready, f"deadlock at time {clock}"
        for r, kind, j in ready:
            done[(kind, r, j)] = clock + 1
            position[r] += 1
        clock += 1
    assert clock == 2 * (M + N - 1)
    busy = 2 * M * N
    assert 1 - busy / (N * clock) == pytest.approx((N - 1) / (M + N - 1))


def test_one_process_step_and_scan_equal_the_model_and_the_scan():
    """Without a process group (or with one process) the step is the model's forward and backward."""
    model, reference = build(torch.float64), build(torch.float64)
    (ids, labels), _ = batches()
    out = sequence_parallel_step(model, ids, labels, num_microbatches=2, return_logits=True, hand_over_state=True)
    expected = reference(ids, labels=labels)
    expected.loss.backward()
    assert rel(out.loss, expected.loss) < 1e-12 and rel(out.logits, expected.logits) < 1e-12
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        assert rel(p.grad, q.grad) < TOLERANCE[torch.float64], name
    for name, value in expected.state.state_dict().items():
        assert rel(out.state.state_dict()[name], value) < 1e-12, name
    log_a, b, h0, _, _ = scan_inputs(torch.float64)
    h, final = sequence_parallel_scan(log_a, b, initial_state=h0)
    h_ref, final_ref = associative_scan_exponential(log_a, b, h0)
    assert rel(h, h_ref) < 1e-14 and rel(final, final_ref) < 1e-14


def test_step_needs_labels():
    model = build(torch.float32)
    (ids, _), _ = batches()
    with pytest.raises(ValueError, match="labels"):
        sequence_parallel_step(model, ids, None)
