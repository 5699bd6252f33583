"""GPU benchmark of the associative scan h_t = exp(log_a_t) * h_{t-1} + b_t (Triton and CUDA kernels).

Times, in one run, per shape [B, T, D] (b bf16 or --b-dtype fp32, h_0 fp32; log_a fp32 as the
model hands it over, and bf16), forward and forward+backward:
  * the Triton scan through autograd as eager code calls it (`mm_rec.ops.scan.triton_kernels`),
    through the registered operator `mm_rec::scan_fwd` (what torch.compile graphs call), and the
    raw kernel launches without autograd, with the host time each forward+backward takes to issue;
  * the public call `associative_scan_exponential` with backend "triton" and backend "cuda"
    (mm_rec/cuda/scan_kernel.cu; both clamp and cast log_a inside the kernels), and the CUDA
    kernels alone (the extension's functions, no autograd);
  * a device-to-device copy moving the same bytes as the forward (log_a + b read, h written),
    the bandwidth ceiling the forward is measured against;
  * the PyTorch backend (`backend="torch"`).
Bandwidth counts the bytes each pass must move: forward log_a + b read and h written; backward
dh, log_a and h read and db, d log_a written. Prints a Markdown table with the device and the
date. `--variants` also times the raw kernels under several launch configurations and chunk
counts along T, each checked against the default configuration's outputs.

    python benchmarks/bench_scan.py [--shapes 8x2048x4096,1x32768x4096,4x8192x2048] [--variants]
                                    [--backends triton,cuda,torch] [--b-dtype bf16|fp32]
"""

from __future__ import annotations

import argparse
import datetime
import multiprocessing
import os
import time
from concurrent.futures import ProcessPoolExecutor

import torch
import triton

from mm_rec.core.associative_scan import associative_scan_exponential
from mm_rec.ops.scan import triton_kernels as st

# Launch configurations tried by --variants (elements per thread, warps, steps loaded ahead).
FWD_VARIANTS = [
    {"EPT": 4, "num_warps": 1, "U": 16},
    {"EPT": 4, "num_warps": 1, "U": 32},
    {"EPT": 2, "num_warps": 1, "U": 32},
    {"EPT": 4, "num_warps": 2, "U": 16},
]
BWD_VARIANTS = [
    {"EPT": 4, "num_warps": 1, "U": 16},
    {"EPT": 2, "num_warps": 1, "U": 16},
    {"EPT": 2, "num_warps": 1, "U": 32},
    {"EPT": 1, "num_warps": 1, "U": 32},
]
CHUNK_COUNTS = [1, 2, 4, 8, 16]


def _compile_job(job: tuple) -> None:
    """Run one pass once on a short input so that its kernels land in Triton's on-disk cache
    (T is not specialised on, so the compiled kernels are those of the full-size runs)."""
    pass_, D, la_dtype, cfg, n_chunks = job
    log_a = -torch.rand(1, 64, D, device="cuda").to(la_dtype)
    b = torch.randn(1, 64, D, device="cuda").bfloat16()
    h0 = torch.randn(1, D, device="cuda")
    h, _ = st.launch_fwd(log_a, b, h0, n_chunks, cfg if pass_ == "forward" else None)
    if pass_ == "backward":
        st.launch_bwd(torch.randn_like(b), torch.randn_like(h0), log_a, h, h0, n_chunks, cfg)
    torch.cuda.synchronize()


def precompile(jobs: list[tuple]) -> None:
    """Compile the kernels of all jobs in parallel processes (each compile is single-threaded;
    unrolling U steps makes a compile take seconds to minutes)."""
    start = time.perf_counter()
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=min(16, os.cpu_count() or 1), mp_context=ctx) as pool:
        for job, _ in zip(jobs, pool.map(_compile_job, jobs)):
            print(f"compiled {job[0]} D={job[1]} {job[2]} {job[3]} chunks={job[4]}: "
                  f"{time.perf_counter() - start:.0f} s", flush=True)


def make_inputs(B: int, T: int, D: int, b_dtype: torch.dtype = torch.bfloat16
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """log_a fp32 in [-2, 0], b (bf16), h_0 fp32 (random: zeros could run faster than real data)."""
    torch.manual_seed(0)
    log_a = -torch.rand(B, T, D, device="cuda") * 2
    return log_a, torch.randn(B, T, D, device="cuda").to(b_dtype), torch.randn(B, D, device="cuda")


def time_ms(fn, leaves=()) -> float:
    """Median milliseconds of fn() (CUDA events, warm-up first)."""
    return triton.testing.do_bench(fn, warmup=25, rep=100, grad_to_none=list(leaves), return_mode="median")


def nbytes(*tensors: torch.Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def copy_ms(n_bytes: int) -> float:
    """A device-to-device copy that reads n_bytes / 2 and writes n_bytes / 2."""
    src = torch.randn(n_bytes // 8, device="cuda")
    dst = torch.empty_like(src)
    return time_ms(lambda: dst.copy_(src))


def host_ms(fn, leaves=(), calls: int = 10) -> float:
    """Host (CPU) milliseconds to issue one fn() call, the GPU left to run behind."""
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        for leaf in leaves:
            leaf.grad = None
        fn()
    ms = (time.perf_counter() - start) / calls * 1e3
    torch.cuda.synchronize()
    return ms


def time_scan(fn, log_a, b, h0) -> tuple[float, float, float]:
    """(forward ms, forward+backward ms, host ms per forward+backward) of fn(log_a, b, h0) ->
    (h, final) through autograd, the backward from a random dh."""
    with torch.no_grad():
        fwd = time_ms(lambda: fn(log_a, b, h0))
    leaves = [t.detach().clone().requires_grad_() for t in (log_a, b, h0)]
    dh = torch.randn_like(b)

    def step():
        h, _ = fn(*leaves)
        torch.autograd.backward([h], [dh])

    return fwd, time_ms(step, leaves), host_ms(step, leaves)


def time_kernels(log_a, b, h0) -> tuple[float, float, float]:
    """time_scan's numbers for the raw kernel launches, without autograd."""
    dh, d_final = torch.randn_like(b), torch.randn_like(h0)

    def step():
        h, _ = st.launch_fwd(log_a, b, h0)
        st.launch_bwd(dh, d_final, log_a, h, h0)

    return time_ms(lambda: st.launch_fwd(log_a, b, h0)), time_ms(step), host_ms(step)


def time_cuda_kernels(log_a, b, h0) -> tuple[float, float, float]:
    """time_scan's numbers for the CUDA extension's functions, without autograd."""
    from mm_rec.cuda import load_extension

    ext = load_extension()
    dh, d_final = torch.randn_like(b), torch.randn_like(h0)

    def step():
        h, _ = ext.scan_fwd(log_a, b, h0, -50.0, 0.0)
        ext.scan_bwd(dh, d_final, log_a, h, h0, -50.0, 0.0)

    return time_ms(lambda: ext.scan_fwd(log_a, b, h0, -50.0, 0.0)), time_ms(step), host_ms(step)


def measure_cuda_variant(ext, default, B: int, T: int, D: int, b_dtype: torch.dtype) -> tuple:
    """(fwd ms, fwd GB/s, fwd % of copy, bwd ms, bwd GB/s, rel. diff from the default build)."""
    log_a, b, h0 = make_inputs(B, T, D, b_dtype)
    dh, d_final = torch.randn_like(b), torch.randn_like(h0)
    h_ref, _ = default.scan_fwd(log_a, b, h0, -50.0, 0.0)
    h, _ = ext.scan_fwd(log_a, b, h0, -50.0, 0.0)
    g_ref = default.scan_bwd(dh, d_final, log_a, h_ref, h0, -50.0, 0.0)
    g = ext.scan_bwd(dh, d_final, log_a, h_ref, h0, -50.0, 0.0)
    err = max([rel_err(h, h_ref)] + [rel_err(x, y) for x, y in zip(g, g_ref)])
    fwd_bytes, bwd_bytes = nbytes(log_a, b, h), nbytes(dh, log_a, h, b, log_a)
    fwd = time_ms(lambda: ext.scan_fwd(log_a, b, h0, -50.0, 0.0))
    bwd = time_ms(lambda: ext.scan_bwd(dh, d_final, log_a, h_ref, h0, -50.0, 0.0))
    copy = copy_ms(fwd_bytes)
    return fwd, fwd_bytes / fwd / 1e9, 100 * copy / fwd, bwd, bwd_bytes / bwd / 1e9, err


def time_cuda_variants(shapes, b_dtype: torch.dtype, spec: str) -> None:
    """Raw CUDA forward and backward per launch shape (a build each), as a Markdown table."""
    from mm_rec.cuda import build, load_extension

    default = load_extension()
    rows = []
    for variant in spec.split(","):
        warps, steps, min_blocks = (int(v) for v in variant.split("x"))
        start = time.perf_counter()
        ext = build(f"mm_rec_cuda_w{warps}s{steps}m{min_blocks}", {"MMREC_SCAN_WARPS": warps, "MMREC_SCAN_STEPS": steps,
                                                                  "MMREC_SCAN_MIN_BLOCKS": min_blocks})
        print(f"variant {variant} built in {time.perf_counter() - start:.1f} s", flush=True)
        for B, T, D in shapes:
            rows.append((variant, f"[{B}, {T}, {D}]", *measure_cuda_variant(ext, default, B, T, D, b_dtype)))
            print("measured:", *rows[-1], flush=True)
            torch.cuda.empty_cache()
    print("\n| CUDA launch shape (warps x steps x min blocks) | shape | fwd ms | fwd TB/s | fwd % copy | bwd ms "
          "| bwd TB/s | rel. diff from default |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for variant, shape, fwd, fwd_tbs, pct, bwd, bwd_tbs, err in rows:
        print(f"| {variant} | {shape} | {fwd:.3f} | {fwd_tbs:.2f} | {pct:.0f}% | {bwd:.3f} | {bwd_tbs:.2f} "
              f"| {err:.1e} |")


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    return ((x.double() - ref.double()).norm() / ref.double().norm()).item()


def config_name(cfg: dict) -> str:
    return f"EPT {cfg['EPT']}, {cfg['num_warps']} warp(s), U {cfg['U']}"


def time_variants(log_a, b, h0) -> list[tuple[str, str, float, float, float]]:
    """Raw kernels under each launch configuration (where the plan is one chunk) and each chunk
    count (default configuration): (pass, name, ms, TB/s, rel. diff from the default outputs)."""
    B, T, D = b.shape
    configs = st.num_chunks(B, T, D, b.device) == 1
    h_ref, final_ref = st.launch_fwd(log_a, b, h0)
    dh, d_final = torch.randn_like(b), torch.randn_like(h0)
    grads_ref = st.launch_bwd(dh, d_final, log_a, h_ref, h0)
    fwd_bytes = nbytes(log_a, b, h_ref)
    bwd_bytes = nbytes(dh, log_a, h_ref, *grads_ref[:2])
    runs = [("forward", config_name(c), c, 1) for c in FWD_VARIANTS if configs]
    runs += [("forward", f"default, {n} chunk(s)", None, n) for n in CHUNK_COUNTS if n <= T // 64]
    runs += [("backward", config_name(c), c, 1) for c in BWD_VARIANTS if configs]
    runs += [("backward", f"default, {n} chunk(s)", None, n) for n in CHUNK_COUNTS if n <= T // 64]
    rows = []
    for pass_, name, cfg, n in runs:
        if pass_ == "forward":
            h, final = st.launch_fwd(log_a, b, h0, n, cfg)
            err = max(rel_err(h, h_ref), rel_err(final, final_ref))
            ms = time_ms(lambda n=n, cfg=cfg: st.launch_fwd(log_a, b, h0, n, cfg))
            rows.append((pass_, name, ms, fwd_bytes / ms / 1e9, err))
        else:
            grads = st.launch_bwd(dh, d_final, log_a, h_ref, h0, n, cfg)
            err = max(rel_err(g, r) for g, r in zip(grads, grads_ref))
            ms = time_ms(lambda n=n, cfg=cfg: st.launch_bwd(dh, d_final, log_a, h_ref, h0, n, cfg))
            rows.append((pass_, name, ms, bwd_bytes / ms / 1e9, err))
        print("measured:", *rows[-1], flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default="8x2048x4096,1x32768x4096,4x8192x2048", help="comma-separated BxTxD")
    parser.add_argument("--variants", action="store_true", help="also time the raw kernels per launch config")
    parser.add_argument("--no-torch", action="store_true", help="skip the PyTorch backend")
    parser.add_argument("--backends", default="triton,cuda,torch", help="comma-separated subset of triton,cuda,torch")
    parser.add_argument("--cuda-variants", default="",
                        help="also build and time the CUDA kernels at these launch shapes, WARPSxSTEPSxMINBLOCKS "
                             "comma-separated (e.g. 8x8x1,8x4x2,4x8x2), each checked against the default build")
    parser.add_argument("--b-dtype", choices=["bf16", "fp32"], default="bf16", help="dtype of b and h")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA GPU")
    backends = {name.strip() for name in args.backends.split(",")}
    b_dtype = torch.bfloat16 if args.b_dtype == "bf16" else torch.float32
    if "cuda" in backends:
        from mm_rec.cuda import load_extension

        start = time.perf_counter()
        if load_extension() is None:
            raise SystemExit("the CUDA kernels could not be built here (see the notice above)")
        print(f"CUDA extension ready in {time.perf_counter() - start:.1f} s (a build on first use, else the cache)")
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    jobs = set()
    for B, T, D in shapes:
        n = 1 if st.num_chunks(B, T, D, torch.device("cuda")) == 1 else 2  # what gets compiled: chunked or not
        for pass_ in ("forward", "backward"):
            jobs |= {(pass_, D, dt, None, n) for dt in (torch.float32, torch.bfloat16)}
            if args.variants:
                variants = FWD_VARIANTS if pass_ == "forward" else BWD_VARIANTS
                jobs |= {(pass_, D, torch.float32, tuple(c.items()), 1) for c in variants if n == 1}
                jobs |= {(pass_, D, torch.float32, None, min(k, 2)) for k in CHUNK_COUNTS}
    # Longest compiles (most steps unrolled) first.
    jobs = sorted(jobs, key=lambda job: (-dict(job[3] or st._BWD_CONFIG)["U"], str(job)))
    if "triton" in backends:
        precompile([(p, D, dt, dict(c) if c else None, n) for p, D, dt, c, n in jobs])

    results = []
    for B, T, D in shapes:
        log_a, b, h0 = make_inputs(B, T, D, b_dtype)
        shape = f"[{B}, {T}, {D}]"
        eager, operator = "Triton, eager (autograd.Function)", "Triton, registered operator (autograd)"
        methods = []
        if "triton" in backends:
            methods += [(eager, log_a, st.scan_triton),
                        (operator, log_a, lambda *x: torch.ops.mm_rec.scan_fwd(*x, -50.0, 0.0)),
                        ("Triton kernels alone (no autograd)", log_a, None),
                        ("Triton, public call (clamp + cast inside)", log_a,
                         lambda *x: associative_scan_exponential(*x, backend="triton")),
                        (eager, log_a.to(b_dtype), st.scan_triton)]
        if "cuda" in backends:
            cuda_call = lambda *x: associative_scan_exponential(*x, backend="cuda")  # noqa: E731
            methods += [("CUDA kernels alone (no autograd)", log_a, "cuda"),
                        ("CUDA, public call (autograd)", log_a, cuda_call),
                        ("CUDA kernels alone (no autograd)", log_a.to(b_dtype), "cuda"),
                        ("CUDA, public call (autograd)", log_a.to(b_dtype), cuda_call)]
        if "torch" in backends and not args.no_torch:
            methods.append(("PyTorch backend", log_a, lambda *x: associative_scan_exponential(*x, backend="torch")))
        for name, la, fn in methods:
            fwd_bytes = nbytes(la, b, b)  # h is written in b's dtype
            # backward: dh, log_a, h read; db, d log_a written
            both_bytes = fwd_bytes + nbytes(b, la, b, b, la)
            copy = copy_ms(fwd_bytes)
            if fn == "cuda":
                fwd, both, host = time_cuda_kernels(la, b, h0)
            else:
                fwd, both, host = time_scan(fn, la, b, h0) if fn else time_kernels(la, b, h0)
            dtypes = f"log_a {str(la.dtype)[6:]}, b {args.b_dtype}"
            results.append((name, shape, dtypes, fwd, fwd_bytes / fwd / 1e9, copy, fwd_bytes / copy / 1e9,
                            both, both_bytes / both / 1e9, host))
            print("measured:", *results[-1], flush=True)
        del log_a, b, h0
        torch.cuda.empty_cache()
    print_results(results)

    if args.cuda_variants:
        time_cuda_variants(shapes, b_dtype, args.cuda_variants)

    if args.variants and "triton" in backends:
        for B, T, D in shapes:
            log_a, b, h0 = make_inputs(B, T, D)
            variant_rows = [(f"[{B}, {T}, {D}]", *row) for row in time_variants(log_a, b, h0)]
            print("\n| shape | pass | launch config | ms | TB/s | rel. diff from default |")
            print("| --- | --- | --- | ---: | ---: | ---: |")
            for shape, pass_, name, ms, tbs, err in variant_rows:
                print(f"| {shape} | {pass_} | {name} | {ms:.3f} | {tbs:.2f} | {err:.1e} |")
            del log_a, b, h0
            torch.cuda.empty_cache()


def print_results(results: list[tuple]) -> None:
    """The Markdown table of the main measurements, with the device and the date."""
    print(f"\nDevice: {torch.cuda.get_device_name()}; torch {torch.__version__}, triton {triton.__version__}; "
          f"{datetime.date.today().isoformat()}")
    print("h_0 fp32, h written in b's dtype, state fp32. Median times. TB/s counts log_a + b read and h "
          "written (forward), plus dh, log_a, h read and db, d log_a written (backward). "
          "% copy = forward TB/s over a device-to-device copy of the forward's bytes in the same run.\n")
    print("| method | shape [B, T, D] | dtypes | forward (ms) | forward TB/s | copy (ms) | copy TB/s | % copy "
          "| fwd+bwd (ms) | fwd+bwd TB/s | host ms per fwd+bwd |")
    print("| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name, shape, dtypes, fwd, fwd_tbs, copy, copy_tbs, both, both_tbs, host in results:
        print(f"| {name} | {shape} | {dtypes} | {fwd:.3f} | {fwd_tbs:.2f} | {copy:.3f} | {copy_tbs:.2f} | "
              f"{100 * fwd_tbs / copy_tbs:.0f}% | {both:.3f} | {both_tbs:.2f} | {host:.3f} |")


if __name__ == "__main__":
    main()
