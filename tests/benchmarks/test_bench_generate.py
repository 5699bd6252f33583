"""The decoding benchmark's plumbing on the CPU (no timing is checked: timings belong in benchmarks)."""

import importlib.util
from pathlib import Path

import pytest

SPEC = importlib.util.spec_from_file_location(
    "bench_generate", Path(__file__).resolve().parents[2] / "benchmarks" / "bench_generate.py")
bench_generate = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(bench_generate)


def test_sizes_parse_with_k_suffixes_and_refuse_nonsense():
    assert bench_generate.parse_sizes("2K,32k,128K,100", "--prompts") == [2048, 32768, 131072, 100]
    with pytest.raises(SystemExit, match="--prompts"):
        bench_generate.parse_sizes("2K,lots", "--prompts")
    with pytest.raises(SystemExit, match=">= 1"):
        bench_generate.parse_sizes("0", "--batches")


@pytest.mark.parametrize("flag", ["--coordinate-descent", "--combo-kernels"])
def test_compiler_options_without_compile_are_refused(flag):
    with pytest.raises(SystemExit, match="add --compile"):
        bench_generate.main(["--device", "cpu", "--presets", "tiny", flag])


@pytest.mark.parametrize("prefill", ["forward", "synthetic"])
def test_the_script_runs_every_mmrec_method_on_the_cpu(prefill, tmp_path, capsys):
    results = bench_generate.main(["--device", "cpu", "--presets", "tiny", "--batches", "1,3", "--prompts", "1,37",
                                   "--new-tokens", "5", "--skip", "1", "--methods", "mmrec-step,mmrec-forward",
                                   "--prefill", prefill, "--json", str(tmp_path / "out.json")])
    assert [(r["method"], r["batch"], r["prompt"]) for r in results] == [
        (m, b, p) for b in (1, 3) for p in (1, 37) for m in ("mmrec-step", "mmrec-forward")]
    assert all("error" not in r and r["ms_per_token"] > 0 for r in results)
    table = capsys.readouterr().out
    assert table.count("| tiny | mmrec-") == 8 and "CPU (no GPU result)" in table
    assert (tmp_path / "out.json").stat().st_size > 0


def test_the_full_step_reference_closes_blocks_at_every_token(monkeypatch):
    """mmrec-step-full runs the block-closing step at every token, mmrec-step only where a block closes."""
    from mm_rec.core.hds import HDSHierarchy

    calls = []
    close = HDSHierarchy.step_close_block
    monkeypatch.setattr(HDSHierarchy, "step_close_block", lambda self, *a: calls.append(1) or close(self, *a))
    counts = {}
    for method in ("mmrec-step", "mmrec-step-full"):
        calls.clear()
        bench_generate.main(["--device", "cpu", "--presets", "tiny", "--batches", "1", "--prompts", "40",
                             "--new-tokens", "40", "--skip", "1", "--methods", method, "--prefill", "synthetic"])
        counts[method] = len(calls)
    layers = 4  # the tiny preset (blocks of 32 tokens): 39 steps cross one or two block ends
    assert counts["mmrec-step-full"] == 39 * layers  # the first new token comes from the prompt's forward
    assert 0 < counts["mmrec-step"] <= 2 * layers


def test_quantized_weights_are_rows_of_their_own():
    """--quantize none,int8,int4: the same methods once per weight format; the quantized weights take fewer
    bytes than bf16, so their bandwidth floor is lower (the floor is bytes over the copy bandwidth of the run;
    on the CPU the tiny preset's int4 keeps its input projections in bf16, so it is not below int8)."""
    pytest.importorskip("torchao")
    results = bench_generate.main(["--device", "cpu", "--presets", "tiny", "--batches", "2", "--prompts", "9",
                                   "--new-tokens", "4", "--skip", "1", "--methods", "mmrec-step",
                                   "--quantize", "none,int8,int4", "--group-size", "32"])
    assert [r["weights"] for r in results] == ["none", "int8", "int4"]
    assert all("error" not in r and r["ms_per_token"] > 0 for r in results), results
    assert results[0]["floor_ms"] > max(results[1]["floor_ms"], results[2]["floor_ms"])
    with pytest.raises(SystemExit, match="--quantize: unknown"):
        bench_generate.main(["--device", "cpu", "--quantize", "int2"])


def test_the_llama_baseline_runs_where_transformers_is_installed(capsys):
    pytest.importorskip("transformers")
    results = bench_generate.main(["--device", "cpu", "--presets", "tiny", "--batches", "2", "--prompts", "9",
                                   "--new-tokens", "4", "--skip", "1", "--methods", "hf-llama"])
    assert len(results) == 1 and "error" not in results[0], results
    assert "| tiny | hf-llama | none | 2 | 9 |" in capsys.readouterr().out


def test_failures_are_rows_of_the_table():
    row = dict(preset="7b", method="hf-llama", weights="int4", batch=64, prompt=131072, ctx_mib_per_row=1.0,
               floor_ms=2.0, error="OOM", prefill_gib=None)
    assert "| 7b | hf-llama | int4 | 64 | 131072 | OOM |" in bench_generate.markdown([row])
