"""The memory's part of one decoding step, one layer: the fused kernel's path
(`MMRecMixer._memory_step_triton`: the gates, the kernel, the combination of its partial reads) over a
sweep of the kernel's launch shapes, against the torch step it replaces (`HDSHierarchy.step_token` +
`MultiMemoryAttention.step`) in the same run; microseconds per call and the bandwidth that makes on the
state read and written (the ring, the window, the delta memory twice).

    python benchmarks/bench_memory_step.py [--presets 1b,7b] [--batches 1,8]
        [--tile-elements 4096,8192] [--tiles 1,2] [--warps 4,8] [--entries bfloat16,float32]

--entries: the dtypes the window's and the ring's keys and values are held in (`DecodeState`'s
entry_dtype: bf16 is what bf16 weights decode with, fp32 what they did before), each swept in turn.

Times are CUDA-graph replays (triton.testing.do_bench_cudagraph) of eager ops: the small element-wise
ops around the kernel count in full here, while the compiled step (`--compile` of bench_generate.py)
fuses them into its neighbours.
"""

from __future__ import annotations

import argparse
import itertools

import torch
from bench_generate import synthetic_state  # this folder's decoding benchmark

from mm_rec import MMRecConfig, MMRecModel
from mm_rec.core.decode_state import DecodeState


def layer_and_state(preset: str, batch: int, device: torch.device, entry_dtype: torch.dtype):
    """One MM-Rec layer of the preset's memory (a one-layer model) and a random full state at position 2047,
    its window and ring entries in `entry_dtype`."""
    model = MMRecModel(MMRecConfig.from_preset(preset).replace(num_layers=1)).to(device).eval()
    memory = synthetic_state(model, batch, 2047, device)
    return model, DecodeState.from_memory_state(memory, model.config, entry_dtype)


def state_bytes(state: DecodeState) -> int:
    """Bytes the kernel moves per call: the ring and window read, the delta memory read and written."""
    layer = state.layers[0]
    read = sum(t.numel() * t.element_size() for t in (layer.slot_keys, layer.slot_values, layer.window_keys,
                                                       layer.window_values) if t is not None)
    delta = layer.delta_memory
    return read + (2 * delta.numel() * delta.element_size() if delta is not None else 0)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", default="1b,7b")
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--tile-elements", default="2048,4096,8192")
    parser.add_argument("--tiles", default="1,2,4")
    parser.add_argument("--warps", default="4,8")
    parser.add_argument("--entries", default="bfloat16,float32", help="entry dtypes to sweep (torch names)")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA GPU")
    device = torch.device("cuda")
    ints = lambda text: [int(x) for x in text.split(",")]  # noqa: E731
    print(f"Device: {torch.cuda.get_device_name()}, torch {torch.__version__}")
    print("| preset | batch | entries | launch (tile elements, tiles/split, warps) | us | GB/s | torch step us |")
    print("| --- | ---: | --- | --- | ---: | ---: | ---: |")
    for preset, batch, entries in itertools.product(args.presets.split(","), ints(args.batches),
                                                    args.entries.split(",")):
        sweep(preset, batch, device, getattr(torch, entries), ints(args.tile_elements), ints(args.tiles),
              ints(args.warps))


def sweep(preset: str, batch: int, device: torch.device, entry_dtype: torch.dtype, tile_elements: list[int],
          tiles_per_split: list[int], warps: list[int]) -> None:
    import triton.testing

    from mm_rec.ops.memory_step import triton_kernels as kernels

    model, state = layer_and_state(preset, batch, device, entry_dtype)
    mixer, layer = model.blocks[0].mixer, state.layers[0]
    K, m = model.config.num_memories, model.config.mem_dim
    q, k, v = (torch.randn(batch, K, m, device=device, dtype=torch.bfloat16) for _ in range(3))
    gates = torch.randn(batch, 2 * K, device=device)

    def fused():
        mixer._memory_step_triton(q, k, v, layer, state.position, gates)

    def torch_step():
        mixer.attention.step(mixer.hds.step_token(q, k, v, layer, state.position, gates))

    with torch.no_grad():
        torch_us = triton.testing.do_bench_cudagraph(torch_step) * 1e3
        for elements, tiles, num_warps in itertools.product(tile_elements, tiles_per_split, warps):
            kernels._TILE_ELEMENTS, kernels._TILES_PER_SPLIT, kernels._NUM_WARPS = elements, tiles, num_warps
            us = triton.testing.do_bench_cudagraph(fused) * 1e3
            print(f"| {preset} | {batch} | {str(entry_dtype)[6:]} | {elements}, {tiles}, {num_warps} | {us:.1f} | "
                  f"{state_bytes(state) / us / 1e3:.0f} | {torch_us:.1f} |", flush=True)

if __name__ == "__main__":
    main()
