"""`mmrec eval --task longdoc`: the loss by position far into long documents, with the memory
state carried from each file's start and reset every `--reset-every` tokens
(mm_rec.evaluation.long_documents); prints a table of the position buckets and writes
OUT/longdoc_results.json.

    mmrec eval --task longdoc --checkpoint runs/longdoc/mmrec --out runs/longdoc/mmrec_eval

The files are the embedded corpus's files of at least --max-bytes bytes. For a checkpoint that
`mmrec train` wrote on the embedded corpus they come from its validation split (its recipe's
data.val_fraction), and the corpus is checked against the digest of the data it trained on, so
no scored byte was trained on.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from mm_rec.evaluation import long_documents as ld
from mm_rec.loading import load_model_and_tokenizer
from mm_rec.training.checkpoint import RECIPE, TRAINER_STATE
from mm_rec.utils.device import autocast_for, resolve_device

RESULTS = "longdoc_results.json"


def _tokens(text: str) -> int:
    """'2048' -> 2048, '32k' -> 32768."""
    return int(text[:-1]) * 1024 if text[-1:] in ("k", "K") else int(text)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of `--task longdoc` (--checkpoint, --device and --out are the eval command's)."""
    group = parser.add_argument_group("longdoc")
    group.add_argument("--max-bytes", type=_tokens, default=ld.DEFAULT_MAX_BYTES,
                       help="longdoc: bytes scored per file; files shorter than this are not selected")
    group.add_argument("--segment-len", type=_tokens, default=ld.DEFAULT_SEGMENT_LEN,
                       help="longdoc: tokens per forward, the state carried between them")
    group.add_argument("--reset-every", type=_tokens, default=ld.DEFAULT_RESET_EVERY,
                       help="longdoc: the 'reset' scoring starts a fresh state every this many tokens")
    group.add_argument("--files", type=int, help="longdoc: score only the first N selected files")
    group.add_argument("--edges", type=lambda text: [_tokens(v) for v in text.split(",")],
                       default=list(ld.DEFAULT_EDGES), help="longdoc: position bucket edges, e.g. 0,2k,8k,32k")


def _training_data(folder: Path) -> tuple[dict, dict]:
    """The recipe's data section and the trainer state saved with a checkpoint ({} when absent)."""
    recipe = json.loads((folder / RECIPE).read_text()) if (folder / RECIPE).is_file() else {}
    state = (torch.load(folder / TRAINER_STATE, map_location="cpu", weights_only=True)
             if (folder / TRAINER_STATE).is_file() else {})
    return recipe.get("data") or {}, state


def _held_out(folder: Path, max_bytes: int) -> tuple[ld.Selection, dict]:
    """The files to score and how they are known to be held out."""
    data, state = _training_data(folder)
    if not data:
        selection = ld.select_documents(max_bytes)
        return selection, dict(val_fraction=None, digest_checked=False,
                               note=f"{folder} holds no {RECIPE}: not checked that the files were held out")
    if data.get("path") is not None:
        selection = ld.select_documents(max_bytes)
        return selection, dict(val_fraction=None, digest_checked=False,
                               note=f"trained on {data['path']}, not the embedded corpus: every long file is scored")
    if data.get("document_separator"):
        raise ValueError("the checkpoint was trained with data.document_separator set, which moves the validation "
                         "split; longdoc reads whole files and needs it null")
    val_fraction = data.get("val_fraction", 0.05)
    selection = ld.select_documents(max_bytes, val_fraction)
    digest = state.get("data_digest")
    if digest is not None and digest != selection.digest:
        raise ValueError(f"the embedded corpus here ({selection.description}, digest {selection.digest}) is not the "
                         f"one {folder} was trained on (digest {digest}): its validation split is unknown")
    note = f"the validation split of the training data (data.val_fraction {val_fraction})"
    return selection, dict(val_fraction=val_fraction, split=selection.split, digest_checked=digest is not None,
                           note=note if digest is not None else note + "; corpus digest not checked")


def run(args: argparse.Namespace) -> int:
    """Score the checkpoint, print the bucket table, write OUT/longdoc_results.json."""
    if not args.checkpoint:
        raise ValueError("--task longdoc needs --checkpoint DIR (a run folder or a saved model)")
    if args.files is not None and args.files < 1:
        raise ValueError(f"--files must be a positive number of files, got {args.files}")
    device = resolve_device(args.device or "auto")
    model, tokenizer, folder = load_model_and_tokenizer(args.checkpoint, device)
    if tokenizer.kind != "byte":
        raise ValueError(f"--task longdoc scores byte-level models; {folder} has a {tokenizer.kind} tokenizer")
    selection, held_out = _held_out(folder, args.max_bytes)
    documents = selection.documents[:args.files]
    if not documents:
        raise ValueError(f"no file of {selection.description} with at least {args.max_bytes} bytes "
                         f"({held_out['note']}); lower --max-bytes")
    ids = ld.read_documents(documents, args.max_bytes)
    autocast = autocast_for(getattr(args, "precision", None) or "auto", device)
    report = ld.score_long_documents(model, ids, args.segment_len, args.reset_every, args.edges, autocast=autocast)
    step = _training_data(folder)[1].get("step")

    print(f"longdoc: {type(model).__name__} ({model.num_parameters() / 1e6:.2f}M parameters"
          + (f", step {step}" if step is not None else "") + f"), {len(documents)} files of {selection.description}, "
          f"first {args.max_bytes} bytes each; {held_out['note']}")
    print(f"segments of {args.segment_len} tokens, reset every {args.reset_every}; "
          "mean nats per byte ± standard error over files, by byte position")
    for note in report["notes"]:
        print(note)
    columns = {**report["modes"], **report["differences"]}
    print(f"{'bucket':>10}" + "".join(f"{name:>22}" for name in columns))
    for i, bucket in enumerate(next(iter(columns.values()))):
        cells = [columns[name][i] for name in columns]
        print(f"{bucket['range']:>10}" + "".join(f"{_cell(c):>22}" for c in cells))

    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        result = dict(task="longdoc", model=type(model).__name__, parameters=model.num_parameters(),
                      checkpoint=args.checkpoint, model_dir=str(folder), step=step, corpus=selection.description,
                      corpus_digest=selection.digest, held_out=held_out, max_bytes=args.max_bytes,
                      segment_len=args.segment_len, reset_every=args.reset_every, edges=args.edges,
                      files=[dict(name=d.name, bytes=d.size) for d in documents], **report)
        (out / RESULTS).write_text(json.dumps(result, indent=2) + "\n")
        print(f"results written to {out / RESULTS}")
    return 0


def _cell(bucket: dict) -> str:
    return f"{bucket['mean']:.4f}" + (f" ± {bucket['se']:.4f}" if bucket["se"] is not None else "")
