"""Decoding speed: ms per token, tokens/s and peak memory of greedy generation, MM-Rec against a
Hugging Face Llama of the same sizes and the memory-bandwidth floor, in the same run.

    python benchmarks/bench_generate.py [--presets 1b,7b] [--batches 1,8,64] [--prompts 2K,32K,128K]
                                        [--new-tokens 64] [--methods mmrec-step,mmrec-forward,hf-llama]
                                        [--prefill forward|synthetic] [--compile] [--quantize none,int8,int4]
                                        [--profile 30] [--rounds 3] [--device cuda] [--json out.json]

Per preset (random weights, bf16; the MM-Rec state fp32), weight format (`--quantize`), batch size B and
prompt length L:

  * mmrec-step: `MMRecModel.generate_stream` from the state after the prompt: every token one
    `step` in O(1), replayed as a captured CUDA graph on CUDA (mm_rec/decoding.py; `--compile`
    also passes the step through torch.compile before the capture); the C - 1 of every C tokens that
    close no block run the smaller step (no block-closing writes);
  * mmrec-step-full: the same with every token on the block-closing step (the reference for that split);
  * mmrec-step-torch-memory: mmrec-step with the memory's step (window, ring and delta-rule read and
    write) in torch ops instead of the fused Triton kernel of mm_rec/ops/memory_step (its reference);
  * mmrec-step-fp32-entries: mmrec-step with the window's and ring's keys and values held in fp32, not
    in the bf16 weights' dtype (`MMRecModel.decode_entry_dtype`; the reference for those bf16 entries);
  * mmrec-forward: the generate path before the step existed (`generate_stream(..., use_step=False)`):
    `model(token[:, None], state)`, the whole segment machinery for T = 1, launch by launch;
  * hf-llama: `LlamaForCausalLM` (transformers >= 5, optional) with hidden size, layers, heads, FFN width
    and vocabulary of the preset, generating with `cache_implementation="static"`, which makes
    transformers compile the decoding forward (torch.compile, mode reduce-overhead: CUDA graphs),
    its fastest documented path;
  * weights (`--quantize`, default none): bf16, or the linear layers' weights quantized weight-only to
    int8 or int4 (groups of `--group-size`) by `mm_rec.quantization.quantize_model` (torchao), for both
    models; the embedding stays bf16 (docs/benchmarks.md, "Decoding");
  * the bandwidth floor: weight bytes (as stored: quantized weights by their int data and scales)
    / the device-to-device copy bandwidth measured in this run
    (bytes read + written), the time a token needs at batch 1 if reading the weights once were
    all it cost; "% floor" is the floor over the measured time per token (the design's target:
    >= 70% at batch 1, docs/architecture.md section 6). `ctx MiB/row` is what each row carries:
    MM-Rec's state (constant), the Llama's KV cache at L + new tokens (grows with L).

Time per token: every method streams its tokens to the host as they come (one copy per token, as
`mmrec generate` does); the time between consecutive tokens, median over the tokens after the first
`--skip` (graph capture, compilation), excluding the prompt. Peak memory: the most allocated during
the generation call (weights, state or KV cache included; for hf-llama its prompt forward too; the
MM-Rec prompt was read before, `--prefill forward`, its peak is `prefill GiB`). `--prefill synthetic`
skips MM-Rec's prompt forward and starts from a random full state at position L (the step's work
does not depend on the state's values or the position: the time per token is the same; use it for
the long prompts when only decoding is measured). A configuration that runs out of memory is
reported as OOM, another failure by its error, and the run goes on.

`--device cpu --presets tiny --prompts 64,100 --batches 1,2 --new-tokens 8` checks the script on a
CPU; CPU times are no GPU result.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from unittest import mock

import torch

from mm_rec import DecodeState, MMRecConfig, MMRecModel
from mm_rec.core.memory_state import MemoryState
from mm_rec.distributed import init_model_on_device
from mm_rec.loading import build_model
from mm_rec.quantization import DEFAULT_GROUP_SIZE, MODES, parameter_bytes, quantize_model
from mm_rec.utils.profiling import kernel_profile, peak_memory, print_report, reset_peak_memory, time_fn

METHODS = ("mmrec-step", "mmrec-step-full", "mmrec-step-torch-memory", "mmrec-step-fp32-entries", "mmrec-forward",
           "hf-llama")
WEIGHTS = ("none",) + MODES  # --quantize: bf16 weights, or int8 / int4 weight-only


def parse_sizes(text: str, flag: str) -> list[int]:
    """'2K,32k,128K,100' -> [2048, 32768, 131072, 100]."""
    sizes = []
    for item in text.split(","):
        item = item.strip().lower()
        try:
            sizes.append(int(item[:-1]) * 1024 if item.endswith("k") else int(item))
        except ValueError:
            raise SystemExit(f"{flag}: {item!r} is not a size (e.g. 2K or 100)") from None
        if sizes[-1] < 1:
            raise SystemExit(f"{flag}: sizes must be >= 1, got {item!r}")
    return sizes


def copy_bandwidth(device: torch.device, gib: float = 1.0) -> float:
    """Bytes per second of a device-to-device copy (bytes read + written), median of 10."""
    n = int(gib * 2**30) // 2
    src = torch.empty(n, dtype=torch.bfloat16, device=device).normal_()
    dst = torch.empty_like(src)
    ms = time_fn(lambda: dst.copy_(src), warmup=3, iters=10, cuda=device.type == "cuda").median_ms
    return 2 * n * 2 / (ms * 1e-3)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_gib(device: torch.device) -> float | None:
    """GiB allocated at most since `reset_peak_memory` (CUDA; None on the CPU, whose peak cannot be reset)."""
    return peak_memory(device).allocated_gib if device.type == "cuda" else None


class TokenClock:
    """Host time of every token as it reaches the host; `ms_per_token(skip)` is the median gap after
    the first `skip` tokens."""

    def __init__(self):
        self.times: list[float] = []

    def tick(self, tokens: torch.Tensor) -> None:
        tokens.tolist()  # the copy to the host a streaming consumer makes (it waits for the token)
        self.times.append(time.perf_counter())

    def ms_per_token(self, skip: int) -> float:
        gaps = [b - a for a, b in zip(self.times[skip:-1], self.times[skip + 1:])]
        if not gaps:
            raise SystemExit(f"--new-tokens must exceed --skip + 1 = {skip + 1} to time anything")
        return statistics.median(gaps) * 1e3


class HFTokenClock(TokenClock):
    """The same clock as a transformers streamer (put: the prompt first, then each new token)."""

    def __init__(self):
        super().__init__()
        self.prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if self.prompt_seen:
            self.tick(value)
        self.prompt_seen = True

    def end(self) -> None:
        pass


# ---------------------------------------------------------------------- MM-Rec
def build_mmrec(config: MMRecConfig, device: torch.device) -> MMRecModel:
    model = init_model_on_device(lambda: build_model(config), device)
    return model.to(torch.bfloat16).eval()


def quantized(model: torch.nn.Module, weights: str, group_size: int) -> torch.nn.Module:
    """The bf16 `model` with its linear layers' weights quantized to `weights` (none: as it is)."""
    if weights != "none":
        quantize_model(model, weights, group_size if weights == "int4" else None)
    return model


def state_bytes_per_row(model: MMRecModel, device: torch.device, entry_dtype: torch.dtype | None) -> int:
    """Bytes of one row's decode state, its window and ring entries in `entry_dtype` (None: the state's)."""
    state = DecodeState.from_memory_state(model.init_state(1, device=device), model.config, entry_dtype)
    return sum(t.numel() * t.element_size() for layer in state.layers for t in layer.tensors().values())


def synthetic_state(model: MMRecModel, batch: int, position: int, device: torch.device) -> MemoryState:
    """A full state at `position` with random contents (timing only: the step's work is the same)."""
    state = model.init_state(batch, device=device)
    for layer in state.layers:
        for name, tensor in layer.tensors().items():
            if tensor.is_floating_point():
                tensor.normal_(0.0, 0.1)
            elif name == "slot_ids":
                tensor.copy_(torch.arange(tensor.shape[-1], device=device).expand_as(tensor))
    state.position.fill_(position)
    return state


def full_step_stream(stream: Iterator[torch.Tensor]) -> Iterator[torch.Tensor]:
    """`stream` with every token on the block-closing step (as before the step was split in two kinds):
    the same-run reference for the smaller step that C - 1 of every C tokens run."""
    with mock.patch("mm_rec.decoding.closes_a_block", lambda positions, chunk_size: True):
        yield from stream


def torch_memory_stream(model: MMRecModel, stream: Callable[[], Iterator[torch.Tensor]]) -> Iterator[torch.Tensor]:
    """`stream` with the memory's step in torch ops (`memory_step_backend = "torch"`) instead of the fused
    kernel of mm_rec/ops/memory_step: the same-run reference for that kernel."""
    mixers = [block.mixer for block in model.blocks]
    before = [mixer.memory_step_backend for mixer in mixers]
    for mixer in mixers:
        mixer.memory_step_backend = "torch"
    try:
        yield from stream()
    finally:
        for mixer, backend in zip(mixers, before):
            mixer.memory_step_backend = backend


def wide_entries_stream(model: MMRecModel, stream: Callable[[], Iterator[torch.Tensor]]) -> Iterator[torch.Tensor]:
    """`stream` with the decode state's window and ring entries in the state's fp32, as before they followed
    half weights (`MMRecModel.decode_entry_dtype`): the same-run reference for the narrow entries."""
    with mock.patch.object(model, "decode_entry_dtype", lambda: None):
        yield from stream()


def time_stream(stream: Iterator[torch.Tensor], device: torch.device, skip: int) -> tuple[float, float | None]:
    """(ms per token, peak GiB during the stream)."""
    synchronize(device)
    reset_peak_memory(device)
    clock = TokenClock()
    for tokens in stream:
        clock.tick(tokens)
    synchronize(device)
    return clock.ms_per_token(skip), peak_gib(device)


def run_mmrec(model: MMRecModel, methods: list[str], batch: int, prompt: int, args: argparse.Namespace,
              device: torch.device) -> list[dict]:
    """The MM-Rec methods at one (batch, prompt): the prompt read once, each method from that state."""
    ids = torch.randint(0, model.config.vocab_size, (batch, prompt), device=device)
    prefill_gib = None
    if args.prefill == "synthetic":
        memory = synthetic_state(model, batch, prompt - 1, device)
    elif prompt > 1:  # all but the last prompt token: each method's generate call reads that one
        reset_peak_memory(device)
        _, memory = model.prefill(ids[:, :-1])
        synchronize(device)
        prefill_gib = peak_gib(device)
    else:
        memory = model.init_state(batch, device=device)
    last = ids[:, -1:]
    streams: dict[str, Callable[[], Iterator[torch.Tensor]]] = {
        "mmrec-step": lambda: model.generate_stream(last, args.new_tokens, temperature=0, state=memory,
                                                    compile_step=args.compile),
        "mmrec-step-full": lambda: full_step_stream(model.generate_stream(last, args.new_tokens, temperature=0,
                                                                          state=memory, compile_step=args.compile)),
        "mmrec-step-torch-memory": lambda: torch_memory_stream(model, streams["mmrec-step"]),
        "mmrec-step-fp32-entries": lambda: wide_entries_stream(model, streams["mmrec-step"]),
        "mmrec-forward": lambda: model.generate_stream(last, args.new_tokens, temperature=0, state=memory,
                                                       use_step=False),
    }
    records = {method: dict(method=method, batch=batch, prompt=prompt, prefill_gib=prefill_gib) for method in methods}
    timings: dict[str, list[tuple[float, float | None]]] = {method: [] for method in methods}
    for _ in range(args.rounds):  # the methods in turns, so a drift of the machine's speed slows them alike
        for method in methods:
            if "error" not in records[method]:
                timed = guarded(lambda stream=streams[method]: time_stream(stream(), device, args.skip),
                                records[method])
                if timed[0] is not None:
                    timings[method].append(timed)
    results = []
    for method in methods:
        record = records[method]
        if timings[method]:
            ms, peak = min(timings[method], key=lambda timed: timed[0])  # the least disturbed round
            record.update(ms_per_token=ms, peak_gib=peak)
            if args.rounds > 1:
                record["ms_per_round"] = [round(timed[0], 4) for timed in timings[method]]
            if args.profile:  # where the step's time goes: one more stream, its steady state under the profiler
                stream = streams[method]()
                for _ in range(args.skip):  # the warm-up's eager steps, captures and compilations: not profiled
                    next(stream)
                title = (f"{method}, batch {batch}, prompt {prompt}: the {args.new_tokens - args.skip} tokens after "
                         f"the first {args.skip} (the warm-up not profiled)")
                print(kernel_profile(lambda stream=stream: [t.tolist() for t in stream], args.profile, title),
                      flush=True)
        results.append(record)
    return results


# ---------------------------------------------------------------------- Hugging Face Llama
def build_llama(config: MMRecConfig, max_len: int, device: torch.device):
    from transformers import AutoModelForCausalLM, LlamaConfig  # optional: only this method needs it

    llama_config = LlamaConfig(vocab_size=config.vocab_size, hidden_size=config.hidden_dim,
                               intermediate_size=config.ffn_dim, num_hidden_layers=config.num_layers,
                               num_attention_heads=config.num_heads, num_key_value_heads=config.num_heads,
                               max_position_embeddings=max_len, rms_norm_eps=config.norm_eps,
                               tie_word_embeddings=config.tie_embeddings)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(llama_config, dtype=torch.bfloat16)
    return model.eval()


def run_hf(model, batch: int, prompt: int, args: argparse.Namespace, device: torch.device) -> dict:
    record = dict(method="hf-llama", batch=batch, prompt=prompt, prefill_gib=None)

    @torch.inference_mode()
    def generate() -> tuple[float, float | None]:
        ids = torch.randint(0, model.config.vocab_size, (batch, prompt), device=device)
        clock = HFTokenClock()
        synchronize(device)
        reset_peak_memory(device)
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.new_tokens,
                       min_new_tokens=args.new_tokens, do_sample=False, cache_implementation="static",
                       streamer=clock, pad_token_id=0)
        synchronize(device)
        return clock.ms_per_token(args.skip), peak_gib(device)

    ms, peak = guarded(generate, record)
    if ms is not None:
        record.update(ms_per_token=ms, peak_gib=peak)
    return record


def kv_bytes_per_row(config: MMRecConfig, length: int) -> int:
    """bf16 keys and values of every layer at `length` tokens."""
    return 2 * config.num_layers * config.hidden_dim * 2 * length


# ---------------------------------------------------------------------- plumbing
def guarded(fn: Callable[[], tuple[float, float | None]], record: dict) -> tuple[float | None, float | None]:
    """fn(), or (None, None) with the failure in record["error"] (OOM, or the error's first line)."""
    try:
        return fn()
    except torch.OutOfMemoryError:
        record["error"] = "OOM"
    except Exception as err:  # a method that cannot run here (a missing package, a compile failure)
        record["error"] = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"[:120]
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return None, None


def markdown(results: list[dict]) -> str:
    lines = ["| preset | method | weights | batch | prompt | ms/token | tokens/s | peak GiB | prefill GiB | "
             "ctx MiB/row | floor ms | % floor |",
             "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in results:
        head = f"| {r['preset']} | {r['method']} | {r['weights']} | {r['batch']} | {r['prompt']} |"
        floor = f"{r['floor_ms']:.3f}"
        if "error" in r:
            lines.append(f"{head} {r['error']} | | | | {r['ctx_mib_per_row']:.2f} | {floor} | |")
            continue
        ms = r["ms_per_token"]
        peak, prefill = ("" if r[k] is None else f"{r[k]:.2f}" for k in ("peak_gib", "prefill_gib"))
        lines.append(f"{head} {ms:.3f} | {r['batch'] * 1e3 / ms:,.0f} | {peak} | {prefill} | "
                     f"{r['ctx_mib_per_row']:.2f} | {floor} | {100 * r['floor_ms'] / ms:.0f}% |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", default="1b,7b", help="comma-separated model presets")
    parser.add_argument("--batches", default="1,8,64", help="comma-separated batch sizes")
    parser.add_argument("--prompts", default="2K,32K,128K", help="comma-separated prompt lengths (K = 1024)")
    parser.add_argument("--new-tokens", type=int, default=64, help="tokens generated per configuration")
    parser.add_argument("--skip", type=int, default=8, help="first tokens not timed (capture, compilation)")
    parser.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated subset of {METHODS}")
    parser.add_argument("--prefill", choices=["forward", "synthetic"], default="forward",
                        help="MM-Rec: read the prompt (forward) or start from a random full state at its end")
    parser.add_argument("--segment-len", type=int, help="MM-Rec prompt forwards in segments of this many tokens "
                        "(default: the preset's max_segment_len; lower it if long prompts run out of memory)")
    parser.add_argument("--compile", action="store_true", help="torch.compile MM-Rec's step before capturing it")
    parser.add_argument("--coordinate-descent", action="store_true",
                        help="with --compile: inductor's coordinate-descent tuning of the generated kernels (gpt-fast "
                             "decodes with it; the one-row matmuls are where it may pay; compiles longer)")
    parser.add_argument("--combo-kernels", action="store_true",
                        help="with --compile: inductor's combo kernels (independent small kernels of the step "
                             "launched as one: the batch-1 step runs ~19 fused element-wise kernels a layer)")
    parser.add_argument("--quantize", default="none",
                        help=f"comma-separated weight formats from {WEIGHTS}: a row per format (int4 needs CUDA bf16 "
                             "or the CPU; torchao: pip install 'mm-rec[quant]')")
    parser.add_argument("--group-size", type=int, default=DEFAULT_GROUP_SIZE, help="int4: inputs per scale and zero")
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda",
                        help="cpu: a check of this script with a small preset (no GPU result)")
    parser.add_argument("--rounds", type=int, default=1,
                        help="time the MM-Rec methods this many times, in turns (A B A B ...), and keep each one's "
                             "fastest round: a same-run comparison that the machine's drift does not bias")
    parser.add_argument("--profile", type=int, default=0, metavar="N",
                        help="also print the N kernels with the most device time over one more stream of each "
                             "MM-Rec method (torch.profiler; totals over its --new-tokens minus --skip tokens after "
                             "the warm-up, i.e. graph replays only)")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA GPU visible (use --device cpu --presets tiny for a check of the script)")
    methods = [m.strip() for m in args.methods.split(",")]
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        raise SystemExit(f"--methods: unknown {unknown}; choose from {METHODS}")
    weight_formats = [w.strip() for w in args.quantize.split(",")]
    if sorted(set(weight_formats) - set(WEIGHTS)):
        raise SystemExit(f"--quantize: unknown {sorted(set(weight_formats) - set(WEIGHTS))}; choose from {WEIGHTS}")
    batches, prompts = parse_sizes(args.batches, "--batches"), parse_sizes(args.prompts, "--prompts")
    if args.rounds < 1:
        raise SystemExit(f"--rounds {args.rounds}: must be at least 1")
    if args.coordinate_descent:
        if not args.compile:
            raise SystemExit("--coordinate-descent tunes compiled kernels: add --compile")
        import torch._inductor.config as inductor_config
        inductor_config.coordinate_descent_tuning = True
    if args.combo_kernels:
        if not args.compile:
            raise SystemExit("--combo-kernels combines compiled kernels: add --compile")
        import torch._inductor.config as inductor_config
        inductor_config.combo_kernels = True
    device = torch.device(args.device)
    torch.manual_seed(0)
    bandwidth = copy_bandwidth(device, gib=1.0 if device.type == "cuda" else 0.25)
    print(f"copy bandwidth {bandwidth / 1e12:.3f} TB/s (read + write)", flush=True)
    results = []
    for preset in [p.strip() for p in args.presets.split(",")]:
        config = MMRecConfig.from_preset(preset)
        if args.segment_len:
            config = config.replace(max_segment_len=args.segment_len)
        mmrec_methods = [m for m in methods if m.startswith("mmrec")]
        for weights in weight_formats:
            if mmrec_methods:
                model = quantized(build_mmrec(config, device), weights, args.group_size)
                floor_ms = parameter_bytes(model) / bandwidth * 1e3
                state_mib = {entries: state_bytes_per_row(model, device, entries) / 2**20
                             for entries in (model.decode_entry_dtype(), None)}
                for batch in batches:
                    for prompt in prompts:
                        for r in run_mmrec(model, mmrec_methods, batch, prompt, args, device):
                            entries = None if r["method"] == "mmrec-step-fp32-entries" else model.decode_entry_dtype()
                            results.append({**r, "preset": preset, "weights": weights, "floor_ms": floor_ms,
                                            "ctx_mib_per_row": state_mib[entries]})
                            print(json.dumps(results[-1]), flush=True)
                del model
                gc.collect()
            if "hf-llama" in methods:
                for prompt in prompts:  # one model per prompt length: the position table covers prompt + new tokens
                    record = {"preset": preset, "weights": weights,
                              "ctx_mib_per_row": kv_bytes_per_row(config, prompt + args.new_tokens) / 2**20}
                    try:
                        llama = quantized(build_llama(config, prompt + args.new_tokens, device), weights,
                                          args.group_size)
                    except (ImportError, ValueError) as err:
                        results += [{**record, "method": "hf-llama", "batch": b, "prompt": prompt,
                                     "floor_ms": float("nan"), "error": f"not run: {err}"} for b in batches]
                        continue
                    record["floor_ms"] = parameter_bytes(llama) / bandwidth * 1e3
                    for batch in batches:
                        results.append({**run_hf(llama, batch, prompt, args, device), **record})
                        print(json.dumps(results[-1]), flush=True)
                    del llama
                    gc.collect()
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (no GPU result)"
    header = (f"Device: {name}, torch {torch.__version__}, {datetime.date.today()}; bf16 weights, random "
              f"(quantized: {args.quantize}, int4 groups of {args.group_size}); "
              f"copy bandwidth {bandwidth / 1e12:.3f} TB/s; new tokens {args.new_tokens} "
              f"(first {args.skip} not timed); prefill {args.prefill}; compile {args.compile}"
              f"{' with coordinate-descent tuning' if args.coordinate_descent else ''}"
              f"{' with combo kernels' if args.combo_kernels else ''}\n"
              f"Command: python {' '.join(sys.argv)}\n")
    print_report(header, markdown(results), results, args.json)
    return results


if __name__ == "__main__":
    main()
