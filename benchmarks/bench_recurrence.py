"""GPU benchmark of the exact core recurrence h_t = z_t * sigmoid(h_{t-1} W_g + b_g) + gamma_t * h_{t-1}.

Times, in one run and on the same bf16 inputs (z bf16; log_gamma, W_g, b_g, h_0 fp32):
  * the fused Triton kernels (`backend="triton"`), forward and forward+backward;
  * the PyTorch backend (`backend="torch"`: a loop of batched matmuls, hand-written backward);
  * a plain per-token PyTorch loop differentiated by autograd (the earlier attempt's approach);
  * for scale, the layer's matmuls: [B*T, D] x [D, 4*D + 3*ffn] in bf16 (MM-Rec projections
    plus a SwiGLU FFN), forward and forward+backward;
  * with `--backends ...,cuda`: the CUDA C++ kernels (`backend="cuda"`, mm_rec/cuda/recurrence_kernel.cu)
    at each cluster size of `--cluster-sizes` (CTAs per (batch row, head); 0 = the default rule),
    after checking that their outputs and gradients agree with Triton's; per-step latency
    (ns per step, forward and backward) against the cluster size;
and prints a Markdown table with the device and the date. `--backends` picks the rows (Triton is
always timed: the others are compared with it). `--variants` also times the raw Triton kernels
under several launch configurations (unroll depth, L2 prefetch distance, warps, row groups of W_g)
and checks each against the default configuration's outputs.

    python benchmarks/bench_recurrence.py [--shapes 8x2048,1x32768] [--heads 32] [--head-dim 128]
                                          [--ffn 11008] [--variants]
                                          [--backends triton,torch,naive,matmuls,cuda] [--cluster-sizes 0,1,2,4]
"""

from __future__ import annotations

import argparse
import datetime
import statistics

import torch
import triton

from mm_rec.core.recurrence import mmrec_recurrence
from mm_rec.ops.recurrence.triton_kernels import launch_bwd, launch_config, launch_fwd


def naive_loop(z, log_gamma, W_g, b_g, h0):
    """One token at a time, autograd through every step."""
    h = h0
    out = []
    gamma = torch.exp(log_gamma)
    for t in range(z.shape[1]):
        gate = torch.sigmoid(torch.einsum("bhd,hde->bhe", h, W_g) + b_g)
        h = z[:, t].float() * gate + gamma[:, t] * h
        out.append(h)
    return torch.stack(out, dim=1).to(z.dtype), h


def time_ms(fn, reps: int, leaves=()) -> float:
    """Median milliseconds of fn(); events around each call, one untimed warm-up call first."""
    if reps >= 10:
        return triton.testing.do_bench(fn, warmup=25, rep=max(100, reps), grad_to_none=list(leaves),
                                       return_mode="median")
    fn()
    times = []
    for _ in range(reps):
        for leaf in leaves:
            leaf.grad = None
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def make_inputs(B: int, T: int, H: int, d: int):
    z = torch.randn(B, T, H, d, device="cuda").bfloat16()
    log_gamma = -torch.rand(B, T, H, d, device="cuda") * 2
    W_g = torch.randn(H, d, d, device="cuda") / d**0.5
    b_g = torch.randn(H, d, device="cuda")
    h0 = torch.randn(B, H, d, device="cuda")
    return [z, log_gamma, W_g, b_g, h0]


def time_recurrence(fn, inputs, reps: int, with_backward: bool) -> tuple[float, float | None]:
    """(forward ms, forward+backward ms) of fn(*inputs) -> (h, h_last)."""
    with torch.no_grad():
        fwd = time_ms(lambda: fn(*inputs), reps)
    if not with_backward:
        return fwd, None
    leaves = [x.detach().clone().requires_grad_() for x in inputs]
    dh = torch.randn_like(inputs[0])

    def step():
        h, _ = fn(*leaves)
        torch.autograd.backward([h], [dh])

    return fwd, time_ms(step, reps, leaves)


def time_matmuls(rows: int, D: int, ffn: int) -> tuple[float, float]:
    x = torch.randn(rows, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = (torch.randn(D, 4 * D + 3 * ffn, device="cuda", dtype=torch.bfloat16) / D**0.5).requires_grad_()
    dy = torch.randn(rows, w.shape[1], device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        fwd = time_ms(lambda: x @ w, 50)
    both = time_ms(lambda: torch.autograd.backward([x @ w], [dy]), 50, [x, w])
    return fwd, both


def saved_bytes(inputs) -> int:
    """Bytes the Triton path keeps alive for backward beyond its inputs and its output h."""
    leaves = [x.detach().clone().requires_grad_() for x in inputs]
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    h, h_last = mmrec_recurrence(*leaves, backend="triton")
    torch.cuda.synchronize()
    return torch.cuda.memory_allocated() - before - h.numel() * h.element_size() - h_last.numel() * 4


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    return ((x.double() - ref.double()).norm() / ref.double().norm()).item()


def time_variants(inputs, fwd_configs, bwd_configs) -> list[tuple[str, str, float, float]]:
    """Raw kernels (no autograd) under each launch configuration: (pass, config name, ms, error),
    the error being the largest relative difference of its outputs from the default
    configuration's (h for the forward; dz, d log_gamma, dW_g, db_g, dh0 for the backward).
    The backward time includes the dW matmul and the db reduction."""
    z, log_gamma, W_g, b_g, h0 = inputs
    h_ref, _, gate, states = launch_fwd(z, log_gamma, W_g, b_g, h0)
    dh, dh_last = torch.randn_like(z), torch.randn_like(h0)
    grads_ref = launch_bwd(dh, dh_last, z, log_gamma, W_g, h0, gate, states)
    rows = []
    for name, config in fwd_configs:
        h = launch_fwd(z, log_gamma, W_g, b_g, h0, config)[0]
        ms = time_ms(lambda c=config: launch_fwd(z, log_gamma, W_g, b_g, h0, c), 100)
        rows.append(("forward", name, ms, rel_err(h, h_ref)))
    for name, config in bwd_configs:
        grads = launch_bwd(dh, dh_last, z, log_gamma, W_g, h0, gate, states, config)
        ms = time_ms(lambda c=config: launch_bwd(dh, dh_last, z, log_gamma, W_g, h0, gate, states, c), 100)
        rows.append(("backward", name, ms, max(rel_err(g, r) for g, r in zip(grads, grads_ref))))
    B, T, H, d = z.shape
    states_hdn = states.reshape(B * T, H, d).permute(1, 2, 0)
    dw_ms = time_ms(lambda: torch.bmm(states_hdn, states_hdn.transpose(1, 2)), 100)
    rows.append(("backward", "dW matmul alone", dw_ms, 0.0))
    return rows


def grads_of(fn, inputs, dh, dh_last) -> list[torch.Tensor]:
    """[h, h_last, dz, d log_gamma, dW_g, db_g, dh0] of fn(*inputs) for the given output gradients."""
    leaves = [x.detach().clone().requires_grad_() for x in inputs]
    h, h_last = fn(*leaves)
    torch.autograd.backward([h, h_last], [dh, dh_last])
    return [h.detach(), h_last.detach()] + [leaf.grad for leaf in leaves]


def cuda_rows(inputs, cluster_sizes, tri, shape, T) -> tuple[list, list]:
    """Time the CUDA kernels at each cluster size after checking them against Triton's results:
    (result rows, notes)."""
    from mm_rec.cuda import load_extension
    from mm_rec.ops.recurrence.cuda_ops import recurrence_cuda

    ext = load_extension()
    if ext is None:
        return [], [f"{shape}: CUDA kernels unavailable (see the log): not timed"]
    B, _, H, d = inputs[0].shape
    dh, dh_last = torch.randn_like(inputs[0]), torch.randn_like(inputs[4])
    want = grads_of(lambda *x: mmrec_recurrence(*x, backend="triton"), inputs, dh, dh_last)
    rows, notes = [], []
    default = ext.recurrence_cluster_size(B * H, d)
    for cs in cluster_sizes:
        fn = lambda *x, cs=cs: recurrence_cuda(*x, cluster_size=cs)
        got = grads_of(fn, inputs, dh, dh_last)
        err = max(rel_err(g, w) for g, w in zip(got, want))
        real_cs = cs or default
        resident = ext.recurrence_max_active_clusters(d, real_cs, True)
        label = f"CUDA kernels, cluster size {real_cs}" + (" (default rule)" if cs == 0 else "")
        if not err < 1e-2:  # bf16 h: agreement within bf16 rounding
            print(f"MISMATCH: {label} at {shape}: largest relative difference from Triton {err:.2e}", flush=True)
            label += f" (DIFFERS from Triton: {err:.1e})"
        fwd, both = time_recurrence(fn, inputs, 50, True)
        rows.append((label, shape, fwd, both))
        print("measured:", *rows[-1], flush=True)
        notes.append(f"{shape}: {label}: fwd {fwd:.3f} ms ({tri[0] / fwd:.2f}x Triton), fwd+bwd {both:.3f} ms "
                     f"({tri[1] / both:.2f}x Triton); per step: forward {fwd / T * 1e6:.0f} ns, backward "
                     f"{(both - fwd) / T * 1e6:.0f} ns (Triton {tri[0] / T * 1e6:.0f} / "
                     f"{(tri[1] - tri[0]) / T * 1e6:.0f}); {B * H} clusters of {real_cs} CTAs, at most "
                     f"{resident} resident; max rel. diff from Triton {err:.1e}")
    return rows, notes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default="8x2048,1x32768", help="comma-separated BxT")
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--ffn", type=int, default=11008, help="FFN width of the layer whose matmuls are timed")
    parser.add_argument("--variants", action="store_true", help="also time the raw kernels per launch config")
    parser.add_argument("--backends", default="triton,torch,naive,matmuls",
                        help="rows to time: triton (always), torch, naive, matmuls, cuda")
    parser.add_argument("--cluster-sizes", default="0,1,2,4",
                        help="cluster sizes of the cuda rows (0: the default rule)")
    args = parser.parse_args()
    methods = set(args.backends.split(","))
    unknown = methods - {"triton", "torch", "naive", "matmuls", "cuda"}
    if unknown:
        raise SystemExit(f"unknown backends {sorted(unknown)}")
    cluster_sizes = [int(c) for c in args.cluster_sizes.split(",")]
    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA GPU")
    H, d = args.heads, args.head_dim
    D = H * d
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]

    results, variant_rows, notes = [], [], []
    for B, T in shapes:
        torch.manual_seed(0)
        inputs = make_inputs(B, T, H, d)
        shape = f"[{B}, {T}, {H}, {d}]"
        tri = time_recurrence(lambda *x: mmrec_recurrence(*x, backend="triton"), inputs, 50, True)
        results.append(("Triton fused kernels", shape, *tri))
        print("measured:", *results[-1], flush=True)
        note = (f"{shape}: Triton per step: forward {tri[0] / T * 1e6:.0f} ns, backward "
                f"{(tri[1] - tri[0]) / T * 1e6:.0f} ns; saved for backward {saved_bytes(inputs) / 2**20:.0f} MiB")
        cuda_notes = []
        if "cuda" in methods:
            rows, cuda_notes = cuda_rows(inputs, cluster_sizes, tri, shape, T)
            results += rows
        if "torch" in methods:
            ref = time_recurrence(lambda *x: mmrec_recurrence(*x, backend="torch"), inputs,
                                  3 if T <= 4096 else 1, True)
            results.append(("PyTorch backend (loop of bmm, manual backward)", shape, *ref))
            print("measured:", *results[-1], flush=True)
            note += f"; {ref[1] / tri[1]:.0f}x faster than the PyTorch backend"
        if "naive" in methods:
            naive = time_recurrence(naive_loop, inputs, 3 if T <= 4096 else 1, T <= 4096)
            results.append(("per-token PyTorch loop (autograd)", shape, *naive))
            print("measured:", *results[-1], flush=True)
            note += f"; forward {naive[0] / tri[0]:.0f}x faster than the per-token loop"
        if "matmuls" in methods:
            mm = time_matmuls(B * T, D, args.ffn)
            results.append((f"layer matmuls [{B * T}, {D}] x [{D}, {4 * D + 3 * args.ffn}] bf16", shape, *mm))
            print("measured:", *results[-1], flush=True)
            note += f"; Triton fwd+bwd = {tri[1]:.2f} ms = {tri[1] / mm[1]:.3f} x the layer matmuls' fwd+bwd"
        notes += [note] + cuda_notes
        if args.variants:
            def cfg(u, pf=0, w=4, g=4):
                name = f"unroll {u}, L2 prefetch {pf}, {w} warps, {g} row groups"
                return name, launch_config(d, unroll=u, prefetch=pf, num_warps=w, row_groups=g)
            fwd_configs = [cfg(8), cfg(4), cfg(2, pf=8), cfg(4, g=2), cfg(2, pf=8, w=8)]
            bwd_configs = [cfg(2, pf=8), cfg(4), cfg(4, g=2), cfg(2, pf=8, g=2), cfg(2, pf=8, w=8)]
            variant_rows += [(shape, *row, T) for row in time_variants(inputs, fwd_configs, bwd_configs)]
            print("measured:", *variant_rows[-len(fwd_configs) - len(bwd_configs) - 1:], flush=True)
        del inputs
        torch.cuda.empty_cache()

    if variant_rows:
        print("\n| shape | pass | launch config | ms | ns per step | rel. diff from default |")
        print("| --- | --- | --- | ---: | ---: | ---: |")
        for shape, pass_, name, ms, err, T in variant_rows:
            print(f"| {shape} | {pass_} | {name} | {ms:.3f} | {ms / T * 1e6:.0f} | {err:.1e} |")

    print(f"\nDevice: {torch.cuda.get_device_name()}; torch {torch.__version__}, triton {triton.__version__}; "
          f"{datetime.date.today().isoformat()}")
    print("Inputs: z bf16, log_gamma / W_g / b_g / h_0 fp32; state fp32. Median times.\n")
    print("| method | shape [B, T, H, d] | forward (ms) | forward+backward (ms) |")
    print("| --- | --- | ---: | ---: |")
    for name, shape, fwd, both in results:
        both_s = f"{both:.2f}" if both is not None else "(not run: too slow)"
        print(f"| {name} | {shape} | {fwd:.2f} | {both_s} |")
    print()
    for note in notes:
        print("- " + note)


if __name__ == "__main__":
    main()
