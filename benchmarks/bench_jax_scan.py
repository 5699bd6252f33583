"""Benchmark of the JAX log-space scan (mm_rec.jax.associative_scan_exponential) on whatever
device JAX sees, beside a device copy of the same bytes and, where torch sees a CUDA GPU, the
PyTorch Triton scan, all in one run.

Per shape [B, T, D] and input dtypes (log_a, b; h_0 fp32), forward and forward+backward (the
backward from a random dh) median times:
  * the JAX scan, jitted: forward `(h, final) = scan(log_a, b, h0)`, forward+backward
    `jax.vjp` and its pullback;
  * a JAX device copy moving the forward's bytes (x -> -x over an fp32 array: reads and writes
    half of them each; XLA may drop a plain copy), the bandwidth ceiling of the forward;
  * with torch + CUDA + Triton: `associative_scan_exponential(..., backend="triton")` of
    mm_rec.core and a torch device-to-device copy of the same bytes (`triton.testing.do_bench`).
Bandwidth counts the bytes each pass must move: forward log_a + b read and h written (in b's
dtype); backward dh, log_a, h read and db, d log_a written. Also prints the largest relative
difference of the JAX h from the PyTorch one (Triton on a GPU, the torch backend elsewhere).

    python benchmarks/bench_jax_scan.py [--shapes 8x2048x4096] [--dtypes fp32,bf16,mixed]

JAX times are wall-clock medians over `--reps` samples of `--inner` back-to-back calls each, so
that dispatch overlaps the device work (as do_bench's CUDA events measure it). On a CPU, use a
small shape (e.g. --shapes 2x512x256) to check that the script runs: CPU times say nothing
about a GPU.
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import time

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # leave GPU memory to torch too

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from mm_rec.core.associative_scan import associative_scan_exponential as torch_scan  # noqa: E402
from mm_rec.jax import associative_scan_exponential as jax_scan  # noqa: E402

# name: (log_a dtype, b dtype). "mixed" is what the model hands over: log_a fp32, b bf16.
DTYPES = {"fp32": ("float32", "float32"), "bf16": ("bfloat16", "bfloat16"), "mixed": ("float32", "bfloat16")}
SIZE = {"float32": 4, "bfloat16": 2}


def forward_bytes(n: int, la: str, b: str) -> int:
    """log_a and b read, h written in b's dtype."""
    return n * (SIZE[la] + 2 * SIZE[b])


def backward_bytes(n: int, la: str, b: str) -> int:
    """dh, log_a, h read; db, d log_a written."""
    return n * (3 * SIZE[b] + 2 * SIZE[la])


def median_ms(fn, args, reps: int, inner: int) -> float:
    """Median wall-clock ms per call of fn(*args): `reps` samples of `inner` calls each, after a
    compile and a warm-up call."""
    jax.block_until_ready(fn(*args))
    jax.block_until_ready(fn(*args))
    samples = []
    for _ in range(reps):
        start = time.perf_counter()
        for _ in range(inner):
            out = fn(*args)
        jax.block_until_ready(out)
        samples.append((time.perf_counter() - start) / inner * 1e3)
    return statistics.median(samples)


@jax.jit
def _forward(log_a, b, h0):
    return jax_scan(log_a, b, h0)


@jax.jit
def _forward_backward(log_a, b, h0, dh):
    (h, final), pullback = jax.vjp(jax_scan, log_a, b, h0)
    return pullback((dh, jnp.zeros_like(final)))


@jax.jit
def _copy(x):
    return -x


def time_jax(log_a, b, h0, dh, n_bytes: int, reps: int, inner: int) -> tuple[float, float, float]:
    """(forward ms, forward+backward ms, copy ms of n_bytes) on JAX's default device."""
    fwd = median_ms(_forward, (log_a, b, h0), reps, inner)
    both = median_ms(_forward_backward, (log_a, b, h0, dh), reps, inner)
    src = jnp.ones(n_bytes // 8, jnp.float32)  # read n_bytes / 2, write n_bytes / 2
    copy = median_ms(_copy, (src,), reps, inner)
    return fwd, both, copy


def time_triton(log_a, b, h0, dh, n_bytes: int) -> tuple[float, float, float]:
    """The same for the PyTorch Triton scan through autograd and a torch device copy."""
    import triton

    bench = lambda fn, leaves=(): triton.testing.do_bench(fn, warmup=25, rep=100, grad_to_none=list(leaves),
                                                          return_mode="median")
    with torch.no_grad():
        fwd = bench(lambda: torch_scan(log_a, b, h0, backend="triton"))
    leaves = [t.detach().clone().requires_grad_() for t in (log_a, b, h0)]

    def step():
        h, _ = torch_scan(*leaves, backend="triton")
        torch.autograd.backward([h], [dh])

    both = bench(step, leaves)
    src = torch.randn(n_bytes // 8, device="cuda")
    dst = torch.empty_like(src)
    copy = bench(lambda: dst.copy_(src))
    return fwd, both, copy


def to_torch(x: np.ndarray, dtype: str, device: str) -> torch.Tensor:
    return torch.from_numpy(x).to(device=device, dtype=getattr(torch, dtype))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", "--shape", default="8x2048x4096", help="comma-separated BxTxD")
    parser.add_argument("--dtypes", default="fp32,bf16,mixed", help=f"comma-separated, of {sorted(DTYPES)}")
    parser.add_argument("--reps", type=int, default=20, help="timed samples per measurement")
    parser.add_argument("--inner", type=int, default=10, help="back-to-back calls per sample")
    args = parser.parse_args()
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    dtype_names = args.dtypes.split(",")
    with_triton = torch.cuda.is_available()
    torch_device = "cuda" if with_triton else "cpu"
    jax_device = jax.devices()[0]

    rows = []
    for B, T, D in shapes:
        rng = np.random.default_rng(0)
        log_a_np = -2 * rng.random((B, T, D), dtype=np.float32)  # random: zeros could run faster than real data
        b_np = rng.standard_normal((B, T, D), dtype=np.float32)
        h0_np = rng.standard_normal((B, D), dtype=np.float32)
        dh_np = rng.standard_normal((B, T, D), dtype=np.float32)
        n = B * T * D
        for name in dtype_names:
            la_dt, b_dt = DTYPES[name]
            fwd_bytes = forward_bytes(n, la_dt, b_dt)
            both_bytes = fwd_bytes + backward_bytes(n, la_dt, b_dt)
            dtypes = f"log_a {la_dt}, b {b_dt}"
            log_a, b = jnp.asarray(log_a_np, la_dt), jnp.asarray(b_np, b_dt)
            h0, dh = jnp.asarray(h0_np), jnp.asarray(dh_np, b_dt)
            fwd, both, copy = time_jax(log_a, b, h0, dh, fwd_bytes, args.reps, args.inner)
            h_jax = np.asarray(_forward(log_a, b, h0)[0]).astype(np.float64)
            del log_a, b, h0, dh

            t_log_a, t_b = to_torch(log_a_np, la_dt, torch_device), to_torch(b_np, b_dt, torch_device)
            t_h0 = torch.from_numpy(h0_np).to(torch_device)
            backend = "triton" if with_triton else "torch"
            with torch.no_grad():
                h_torch = torch_scan(t_log_a, t_b, t_h0, backend=backend)[0].double().cpu().numpy()
            diff = float(np.linalg.norm(h_jax - h_torch) / np.linalg.norm(h_torch))
            rows.append((f"JAX ({jax_device.platform})", (B, T, D), dtypes, fwd, fwd_bytes, copy, both, both_bytes,
                         f"{diff:.1e} vs {backend}"))
            print("measured:", *rows[-1], flush=True)
            if with_triton:
                t_dh = to_torch(dh_np, b_dt, torch_device)
                fwd, both, copy = time_triton(t_log_a, t_b, t_h0, t_dh, fwd_bytes)
                rows.append(("PyTorch Triton scan", (B, T, D), dtypes, fwd, fwd_bytes, copy, both, both_bytes, ""))
                print("measured:", *rows[-1], flush=True)
                del t_dh
            del t_log_a, t_b, t_h0
            if with_triton:
                torch.cuda.empty_cache()
    print_table(rows, jax_device)


def print_table(rows: list[tuple], jax_device) -> None:
    """The Markdown table, with the devices, versions and date."""
    gpu = f"; torch sees {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    print(f"\nJAX device: {jax_device.device_kind} ({jax_device.platform}){gpu}; jax {jax.__version__}, "
          f"torch {torch.__version__}; {datetime.date.today().isoformat()}")
    print("h_0 fp32, h written in b's dtype, accumulation fp32. Median times. GB/s counts log_a + b read and h "
          "written (forward), plus dh, log_a, h read and db, d log_a written (backward). % copy = forward time "
          "of a device copy of the forward's bytes (same framework, same run) over the scan's forward time.\n")
    print("| method | shape [B, T, D] | dtypes | forward (ms) | forward GB/s | copy (ms) | % copy | fwd+bwd (ms) "
          "| fwd+bwd GB/s | rel. diff of h |")
    print("| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |")
    for method, shape, dtypes, fwd, fwd_bytes, copy, both, both_bytes, diff in rows:
        print(f"| {method} | {list(shape)} | {dtypes} | {fwd:.3f} | {fwd_bytes / fwd / 1e6:.0f} | {copy:.3f} | "
              f"{100 * copy / fwd:.0f}% | {both:.3f} | {both_bytes / both / 1e6:.0f} | {diff} |")


if __name__ == "__main__":
    main()
