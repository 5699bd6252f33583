"""One way to build a model and one way to load one, for every caller: training, evaluation,
generation, the command line and the benchmarks.

    model = build_model(MMRecConfig.from_preset("tiny"))        # MM-Rec, freshly initialised
    model = build_model(config, "transformer")                  # the baseline: same fields, same contract
    model = load_model("runs/x", device)                        # the newest checkpoint of a run
    model, tokenizer, folder = load_model_and_tokenizer("runs/x/checkpoints/step_00000700")

`load_model` reads three kinds of folder:

    save_pretrained folder   config.json (with its "model_type" marker: "mmrec" or "transformer") + model.safetensors;
                             a quantized model's: quantization.json + model.pt instead (mm_rec/quantization.py),
                             rebuilt quantized
    checkpoint folder        the same plus the training state (mm_rec.training.checkpoint); a
                             sharded one holds sharded/ (DCP shards) instead of model.safetensors
    run folder               RUN/checkpoints/step_XXXXXXXX/: its newest checkpoint

A missing folder or file raises FileNotFoundError; damaged or foreign contents ValueError, each
with a one-line message naming the file. Given a run folder, a newest checkpoint that cannot be
read is skipped with a warning and the one before it loaded (as `--resume auto` does).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import torch

from mm_rec.baselines.transformer import TransformerModel
from mm_rec.config import MMRecConfig
from mm_rec.data.tokenizers import ByteTokenizer, Tokenizer, load_tokenizer
from mm_rec.model import CONFIG_NAME, WEIGHTS_NAME, LanguageModel, MMRecModel, read_pretrained_config

MODEL_CLASSES: dict[str, type[LanguageModel]] = {"mmrec": MMRecModel, "transformer": TransformerModel}
MODEL_TYPES = tuple(MODEL_CLASSES)
CHECKPOINTS = "checkpoints"  # RUN/checkpoints/ holds one folder per saved step
STEP_PREFIX = "step_"
SHARDED = "sharded"  # the DCP folder of a checkpoint written with training.checkpoint_format: sharded


def build_model(config: MMRecConfig, model_type: str = "mmrec") -> LanguageModel:
    """A freshly initialised model on the default device (use `with torch.device("meta"):` to
    count parameters of any size): MM-Rec, or the Transformer baseline, which reads the sizes both
    share from the same config."""
    if model_type not in MODEL_CLASSES:
        raise ValueError(f"unknown model_type {model_type!r}; use one of {MODEL_TYPES}")
    return MODEL_CLASSES[model_type](config)


def load_model(path: str | Path, device: torch.device | str | None = None,
               warn: Callable[[str], None] | None = None) -> LanguageModel:
    """The model saved in `path` (any of the folders above) on `device` (default: CPU), in eval
    mode; the class comes from config.json's model_type marker (none, in older folders: MM-Rec).
    `warn` reports a skipped damaged checkpoint (default: a line on stderr)."""
    return _newest_good(path, lambda folder: _load(folder, device), warn)[0]


def load_model_and_tokenizer(path: str | Path, device: torch.device | str | None = None,
                             warn: Callable[[str], None] | None = None) -> tuple[LanguageModel, Tokenizer, Path]:
    """`load_model`, plus the tokenizer saved beside the model (bytes when there is none: a small
    vocabulary may still fit ASCII text) and the folder they were read from."""

    def load(folder: Path) -> tuple[LanguageModel, Tokenizer]:
        model = _load(folder, device)
        tokenizer = load_tokenizer(folder) or ByteTokenizer()
        vocab_size = model.config.vocab_size
        if tokenizer.kind != "byte" and tokenizer.vocab_size > vocab_size:
            raise ValueError(f"{folder}: the tokenizer has {tokenizer.vocab_size} tokens, the model only {vocab_size}")
        return model, tokenizer

    (model, tokenizer), folder = _newest_good(path, load, warn)
    return model, tokenizer, folder


def _newest_good(path: str | Path, load: Callable[[Path], object], warn: Callable[[str], None] | None):
    """(load(folder), folder) for the model folder `path`, or for the newest checkpoint of the run
    folder `path` that loads: damaged newer ones are skipped with a warning."""
    folder = find_model_dir(path)
    if folder == Path(path):  # a model folder itself: its damage is the error
        return load(folder), folder
    warn = warn or (lambda message: print(message, file=sys.stderr))
    for candidate in reversed(list_checkpoints(path)):
        try:
            return load(candidate), candidate
        except (ValueError, OSError) as err:
            if candidate == list_checkpoints(path)[0]:
                raise
            warn(f"warning: skipping {candidate}: {' '.join(str(err).split())}")
    raise AssertionError("unreachable: find_model_dir found a checkpoint")


def _load(folder: Path, device: torch.device | str | None) -> LanguageModel:
    model_type, config = read_pretrained_config(folder)
    if model_type not in MODEL_CLASSES:
        raise ValueError(f"{folder / CONFIG_NAME}: unknown model_type {model_type!r}; use one of {MODEL_TYPES}")
    model_class = MODEL_CLASSES[model_type]
    if (folder / SHARDED).is_dir() and not (folder / WEIGHTS_NAME).is_file():
        return _load_sharded(folder, model_class(config)).to(device).eval()
    return model_class.from_pretrained(folder, device).eval()


def _load_sharded(folder: Path, model: LanguageModel) -> LanguageModel:
    """The weights of a sharded checkpoint, resharded into one process's model (DCP)."""
    from mm_rec.distributed.checkpoint import load_sharded_state  # slow to import; only these folders need it

    try:
        load_sharded_state(folder / SHARDED, model)
    except ValueError as err:  # a missing or misshapen tensor
        raise ValueError(f"could not load the sharded weights in {folder}: {err}") from None
    return model


# ---------------------------------------------------------------------- run folders
def checkpoint_dir(run_dir: str | Path, step: int) -> Path:
    """Where the checkpoint of `step` lives in a run folder."""
    return Path(run_dir) / CHECKPOINTS / f"{STEP_PREFIX}{step:08d}"


def checkpoint_step(path: Path) -> int:
    return int(path.name[len(STEP_PREFIX):])


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """The checkpoint folders of a run, oldest first (only completely written ones carry the name)."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir()
             if p.is_dir() and p.name.startswith(STEP_PREFIX) and p.name[len(STEP_PREFIX):].isdigit()]
    return sorted(found, key=checkpoint_step)


def find_model_dir(path: str | Path) -> Path:
    """The folder holding the model: `path` itself when it has a config.json, else the newest
    checkpoint of the run folder `path`."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if (path / CONFIG_NAME).is_file():
        return path
    found = list_checkpoints(path)
    if not found:
        raise FileNotFoundError(f"{path} holds neither a model ({CONFIG_NAME}, {WEIGHTS_NAME}) nor {CHECKPOINTS}/")
    return found[-1]
