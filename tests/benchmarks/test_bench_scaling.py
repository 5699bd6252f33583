"""The scaling driver's table: efficiency against each model's own 1-GPU row, squeezed flag."""

import importlib.util
import random
from pathlib import Path

import pytest

SPEC = importlib.util.spec_from_file_location(
    "bench_scaling", Path(__file__).resolve().parents[2] / "benchmarks" / "bench_scaling.py")
bench_scaling = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(bench_scaling)


def fake_run(n, tokens_per_s, reserved=10.0):
    results = []
    for model, tps in tokens_per_s.items():
        results.append({"model": model, "step_s": 1.0, "tokens_per_s": tps, "tokens_per_s_per_gpu": tps / n,
                        "tflops_per_gpu": 100.0, "peak_allocated_gib": reserved - 1, "peak_reserved_gib": reserved})
    return {"header": "Device: test\n", "peaks": {"data sheet": 1e15}, "results": results}


def row(table, model, n):
    return next(line for line in table.splitlines() if line.startswith(f"| {model} | {n} |"))


def test_efficiency_is_throughput_over_n_times_the_one_gpu_throughput():
    rng = random.Random()
    base = {"mmrec": rng.uniform(1e3, 1e5), "transformer": rng.uniform(1e3, 1e5)}
    runs = {1: fake_run(1, base)}
    expected = {}
    for n in (2, 4):
        eff = {m: rng.uniform(0.5, 1.0) for m in base}
        runs[n] = fake_run(n, {m: base[m] * n * eff[m] for m in base})
        expected[n] = eff
    table = bench_scaling.efficiency_table(runs)
    for n, eff in expected.items():
        for model, e in eff.items():
            assert row(table, model, n).rstrip(" |").endswith(f"{e:.2f}")
    assert row(table, "mmrec", 1).rstrip(" |").endswith("1.00")
    assert "10.0%" in row(table, "mmrec", 1)  # 100 TFLOP/s of a 1000 TFLOP/s peak
    assert "Note" not in table


def test_a_squeezed_baseline_is_flagged_and_counts_must_include_one():
    table = bench_scaling.efficiency_table({1: fake_run(1, {"mmrec": 1.0}, reserved=130.0)}, gpu_memory_gib=140.0)
    assert "memory-squeezed" in table
    with pytest.raises(SystemExit, match="include 1"):
        bench_scaling.parse_gpu_counts("2,4")
    with pytest.raises(SystemExit, match="integers"):
        bench_scaling.parse_gpu_counts("1,two")
    assert bench_scaling.parse_gpu_counts("4,1,2,2") == [1, 2, 4]
