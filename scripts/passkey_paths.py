"""Which memory path recalls the passkey: score a trained MM-Rec checkpoint with one read path masked
at inference (docs/quality.md, passkey on the CPU).

    python scripts/passkey_paths.py CHECKPOINT [--lengths 384,1024,2048] [--rows 8] [--device cpu]

On CUDA it scores under bf16 autocast, as `mmrec eval` does; long prompts are read in pieces of the
model's max_segment_len with the state carried.

Paths: "none" (the model as trained), "no_level2" (the delta-rule read replaced by zeros; the
memory is still written, so the state is unchanged), "no_slots" (no ring slot visible to any
query; the window and the null slot remain). Prints whole-key accuracy and per-digit accuracy per
length and depth (5 depths, `--rows` prompts each, seeds independent of `mmrec eval`'s).
"""

from __future__ import annotations

import argparse
import contextlib

import torch

from mm_rec.core.hds import HDSHierarchy
from mm_rec.evaluation import passkey
from mm_rec.evaluation.scoring import predict_tokens
from mm_rec.loading import load_model
from mm_rec.utils.device import autocast_for

DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)


@contextlib.contextmanager
def masked(path: str):
    """Mask one read path of every MM-Rec layer inside the block."""
    level2, slots = HDSHierarchy._level2, HDSHierarchy._slot_timeline

    def no_level2(self, *args):
        read, gates = level2(self, *args)
        return torch.zeros_like(read), gates

    def no_slots(self, *args):
        timeline = slots(self, *args)
        timeline["slot_visible"] = torch.zeros_like(timeline["slot_visible"])
        return timeline

    if path == "no_level2":
        HDSHierarchy._level2 = no_level2
    elif path == "no_slots":
        HDSHierarchy._slot_timeline = no_slots
    try:
        yield
    finally:
        HDSHierarchy._level2, HDSHierarchy._slot_timeline = level2, slots


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint")
    parser.add_argument("--lengths", default="384,1024,2048")
    parser.add_argument("--rows", type=int, default=8, help="prompts per (length, depth)")
    parser.add_argument("--paths", default="none,no_level2,no_slots")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    model = load_model(args.checkpoint, device=args.device).eval()
    print(f"| masked | length | key accuracy by depth {DEPTHS} | digit accuracy by depth |")
    print("| --- | ---: | --- | --- |")
    for path in args.paths.split(","):
        with masked(path), torch.no_grad(), autocast_for("auto", torch.device(args.device)):  # bf16 on CUDA
            for length in (int(x) for x in args.lengths.split(",")):
                keys, digits = [], []
                for depth in DEPTHS:
                    batch = passkey.make_passkey_batch(length, args.rows, f"paths-{length}-{depth}", depth)
                    right = predict_tokens(model, batch.input_ids, batch.answer_positions, args.rows, None) \
                        == batch.answers
                    keys.append(right.all(1).double().mean().item())
                    digits.append(right.double().mean().item())
                print(f"| {path} | {length} | {' '.join(f'{x:.2f}' for x in keys)} | "
                      f"{' '.join(f'{x:.2f}' for x in digits)} |", flush=True)


if __name__ == "__main__":
    main()
