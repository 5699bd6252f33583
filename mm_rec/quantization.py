"""Weight-only INT8 and INT4 quantization of a model's linear layers (torchao), and how a quantized
model is saved and loaded back.

    info = quantize_model(model, "int8")                   # one int8 scale per output channel
    info = quantize_model(model, "int4", group_size=128)   # one scale and zero per 128 inputs
    info.modules, info.skipped                             # what was quantized, what was not and why
    dequantize_model(model)                                # a float copy computing the same (for measuring)
    model.save_pretrained("out/q")                         # config.json, quantization.json, model.pt
    mm_rec.loading.load_model("out/q")                     # the same quantized model

What is quantized: every `nn.Linear` (the fused projections, the memory's projections, the FFN, an
untied LM head) whose shape the kernel takes. What stays in its dtype: the embedding (and the LM head
tied to it), the recurrence's W_g [H, d, d] (read by the recurrence kernels, not a linear layer), the
norms, the convolution and the memory's small parameters. Activations, the recurrent state and
every sum stay in the model's float dtype: only the weights are stored in fewer bits and dequantized
inside the matrix product.

Where each mode runs (torchao 0.18; the configs are torchao's, applied with `torchao.quantize_`):

    int8  any device, any float dtype: `Int8WeightOnlyConfig` (per output channel, symmetric)
    int4  CPU, fp32/bf16/fp16: `PrototypeInt4WeightOnlyConfig` (Int4OpaqueTensor, the CPU tinygemm
          kernel `aten._weight_int4pack_mm_for_cpu`); group_size 32, 64 or 128; it needs
          out_features % 16 == 0, so a layer that has not stays in its dtype (listed in `skipped`)
    int4  CUDA (compute capability >= 8.0), bf16 only: `Int4WeightOnlyConfig` with the
          "tile_packed_to_4d" packing (tinygemm, `aten._weight_int4pack_mm`); group_size 32 to 256

torchao 0.18's `Int4WeightOnlyConfig` has no CPU packing: its default "plain" packing needs the
`mslk` kernels (CUDA) and "tile_packed_to_4d" needs CUDA; `Int4CPULayout` (version 1) was removed,
and its successor is the prototype config above. A mode that cannot run on the model's device, or a
missing torchao, raises ValueError with one line saying so.

The saved folder (`save_quantized`, called by `save_pretrained` for a quantized model): safetensors
holds plain tensors only, so the weights are `torch.save`d as the state dict with torchao's tensor
subclasses in it (model.pt; read back with `torch.load(weights_only=True)`: torchao registers its
classes as safe), beside quantization.json, which records how it was quantized:

    {"format": 1, "mode": "int4", "group_size": 128, "device_type": "cpu", "dtype": "float32",
     "modules": ["blocks.0.mixer.in_proj", ...], "skipped": {"lm_head": "tied to ..."}, "torchao": "0.18.0"}

`load_quantized` rebuilds the model: the float model in `dtype`, the same modules quantized the same
way on the target device, then the saved tensors copied in (strict: every key, every shape). INT8
weights load on any device; INT4 weights are packed for one kernel, so they load only on the device
type they were quantized on (else ValueError: quantize the unquantized checkpoint there instead).
"""

from __future__ import annotations

import copy
import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

MODES = ("int8", "int4")
DEFAULT_GROUP_SIZE = 128  # int4: torchao's default
INT4_GROUP_SIZES = {"cpu": (32, 64, 128), "cuda": (32, 64, 128, 256)}
CPU_INT4_OUT_MULTIPLE = 16  # aten._convert_weight_to_int4pack_for_cpu: "expect N to be dividable by 16"
QUANTIZATION_NAME = "quantization.json"
QUANTIZED_WEIGHTS_NAME = "model.pt"
FORMAT_VERSION = 1
INSTALL_HINT = "pip install 'mm-rec[quant]'"


@dataclass(frozen=True)
class Quantization:
    """How a model's weights were quantized: `quantize_model` returns it and sets it as
    `model.quantization`; quantization.json holds it."""

    mode: str  # "int8" or "int4"
    group_size: int | None  # int4: inputs per scale and zero; int8: None (one scale per output channel)
    device_type: str  # "cpu" or "cuda": where it was quantized (int4: the kernel its weights are packed for)
    dtype: str  # the float dtype of the activations and scales, e.g. "float32"
    modules: tuple[str, ...]  # the linear layers quantized
    skipped: dict[str, str] = field(default_factory=dict)  # linear layers left in their dtype: why

    def describe(self) -> str:
        """One line: mode, groups, how many linear layers were quantized."""
        groups = f" (groups of {self.group_size})" if self.group_size else " (per output channel)"
        return (f"{self.mode} weights{groups}: {len(self.modules)} linear layers quantized, "
                f"{len(self.skipped)} left in {self.dtype}")


def import_torchao():
    """torchao's quantize_ and the configs used here; ValueError (one line) when it is not installed.
    Its import warnings (prebuilt CUDA extensions it cannot load on a CPU build of torch, which these
    modes do not use) are silenced."""
    quiet = [logging.getLogger(name) for name in ("torchao", "torch.utils._pytree")]
    levels = [logger.level for logger in quiet]
    for logger in quiet:
        logger.setLevel(logging.ERROR)
    try:
        import torchao
        from torchao.prototype.quantization.int4 import PrototypeInt4WeightOnlyConfig
        from torchao.quantization import Int4WeightOnlyConfig, Int8WeightOnlyConfig, quantize_
    except ImportError as err:
        raise ValueError(f"weight quantization needs torchao ({INSTALL_HINT}): {err}") from None
    finally:
        for logger, level in zip(quiet, levels):
            logger.setLevel(level)
    return torchao, quantize_, Int8WeightOnlyConfig, Int4WeightOnlyConfig, PrototypeInt4WeightOnlyConfig


def check_supported(mode: str, device: torch.device, dtype: torch.dtype, group_size: int | None) -> None:
    """ValueError (one line) unless `mode` with `group_size` runs on `device` for weights of `dtype`."""
    if mode not in MODES:
        raise ValueError(f"unknown quantization mode {mode!r}; use one of {MODES}")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"weight quantization runs on the CPU or CUDA, not on {device.type}")
    if mode == "int8":
        if group_size is not None:
            raise ValueError("int8 weights have one scale per output channel: group_size applies to int4 only")
        return
    sizes = INT4_GROUP_SIZES[device.type]
    if group_size not in sizes:
        raise ValueError(f"int4 on {device.type} takes group_size {' / '.join(map(str, sizes))}, got {group_size}")
    if device.type == "cuda":
        if dtype != torch.bfloat16:
            raise ValueError(f"int4 on CUDA (tinygemm) needs bf16 weights, the model is {dtype}: use bf16 precision")
        if torch.cuda.get_device_capability(device)[0] < 8:
            raise ValueError("int4 on CUDA (tinygemm) needs a GPU of compute capability 8.0 or newer")


def skip_reason(linear: nn.Linear, mode: str, device_type: str, group_size: int | None,
                embedding_weights: set[int]) -> str | None:
    """Why `linear` stays in its dtype (None: it is quantized)."""
    if id(linear.weight) in embedding_weights:
        return "tied to the token embedding, which stays in its dtype"
    if mode == "int4":
        out_features, in_features = linear.weight.shape
        if in_features % group_size:
            return f"in_features {in_features} is not a multiple of group_size {group_size}"
        if device_type == "cpu" and out_features % CPU_INT4_OUT_MULTIPLE:
            return f"the CPU int4 kernel needs out_features divisible by {CPU_INT4_OUT_MULTIPLE}, got {out_features}"
    return None


def quantize_model(model: nn.Module, mode: str, group_size: int | None = None,
                   modules: list[str] | tuple[str, ...] | None = None) -> Quantization:
    """Quantize `model`'s linear layers in place, weight-only, on the device and in the dtype they are
    in (cast the model first: int4 on CUDA needs bf16). `group_size`: int4's inputs per scale (default
    128); int8 takes none. `modules`: exactly these linear layers (what `load_quantized` passes;
    default: every one the kernel takes). Returns what was done, also set as `model.quantization`.
    ValueError for an unknown or unsupported mode, a missing torchao or a model quantized already."""
    if getattr(model, "quantization", None) is not None:
        raise ValueError(f"the model is quantized already ({model.quantization.describe()})")
    if mode == "int4" and group_size is None:
        group_size = DEFAULT_GROUP_SIZE
    linears = {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    if not linears:
        raise ValueError("the model has no linear layers to quantize")
    weight = next(iter(linears.values())).weight
    device, dtype = weight.device, weight.dtype
    check_supported(mode, device, dtype, group_size)
    _, quantize_, Int8Config, Int4Config, CPUInt4Config = import_torchao()
    embedding_weights = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    reasons = {name: skip_reason(m, mode, device.type, group_size, embedding_weights) for name, m in linears.items()}
    if modules is None:
        chosen = [name for name, reason in reasons.items() if reason is None]
    else:
        unknown = [name for name in modules if reasons.get(name, "not a linear layer of this model") is not None]
        if unknown:
            first = unknown[0]
            raise ValueError(f"cannot quantize {first}: {reasons.get(first, 'not a linear layer of this model')}")
        chosen = list(modules)
    if mode == "int8":
        config = Int8Config(set_inductor_config=False)  # leave torch.compile's global settings alone
    elif device.type == "cpu":
        config = CPUInt4Config(group_size=group_size, set_inductor_config=False)
    else:
        config = Int4Config(group_size=group_size, int4_packing_format="tile_packed_to_4d", set_inductor_config=False)
    selected = set(chosen)
    if selected:
        quantize_(model, config, filter_fn=lambda module, name: name in selected)
    info = Quantization(mode=mode, group_size=group_size if mode == "int4" else None, device_type=device.type,
                        dtype=str(dtype).removeprefix("torch."), modules=tuple(chosen),
                        skipped={name: reason for name, reason in reasons.items() if name not in selected})
    model.quantization = info
    return info


def dequantize_model(model: nn.Module) -> nn.Module:
    """A float copy of a quantized `model` whose linear layers hold the weights the quantized kernels
    multiply by, read through each kernel itself (linear(identity) = W^T): the same function to
    float rounding, on plain matrix products. What the quality of a mode is measured with where its
    kernel is slow (int4 on the CPU, docs/quality.md), and what the tests compare the kernels with."""
    if getattr(model, "quantization", None) is None:
        raise ValueError("the model is not quantized")
    copied = copy.deepcopy(model)
    with torch.no_grad():
        for name in model.quantization.modules:
            linear = copied.get_submodule(name)
            weight = linear.weight
            identity = torch.eye(linear.in_features, dtype=weight.dtype, device=weight.device)
            linear.weight = nn.Parameter(F.linear(identity, weight).T.contiguous(), requires_grad=False)
    copied.quantization = None
    return copied


def parameter_bytes(model: nn.Module) -> int:
    """Bytes the parameters take as stored: a quantized weight by its inner tensors (int data, scales,
    zeros), a tied weight once."""
    total, seen = 0, set()
    for p in model.parameters():
        tensors = [p]
        if hasattr(p, "__tensor_flatten__"):  # a torchao tensor subclass
            tensors = [getattr(p, name) for name in p.__tensor_flatten__()[0]]
        for t in tensors:
            if t is not None and id(t) not in seen:
                seen.add(id(t))
                total += t.numel() * t.element_size()
    return total


# ---------------------------------------------------------------------- the saved folder
def is_quantized_folder(directory: Path) -> bool:
    return (Path(directory) / QUANTIZATION_NAME).is_file()


def save_quantized(model: nn.Module, directory: Path) -> None:
    """quantization.json and model.pt (the state dict with torchao's tensors) of a quantized model;
    config.json is the caller's (save_pretrained)."""
    torchao = import_torchao()[0]
    directory = Path(directory)
    values = {"format": FORMAT_VERSION, **asdict(model.quantization), "torchao": torchao.__version__}
    torch.save(model.state_dict(), directory / QUANTIZED_WEIGHTS_NAME)
    (directory / QUANTIZATION_NAME).write_text(json.dumps(values, indent=2) + "\n")


def remove_quantized(directory: Path) -> None:
    """Delete what `save_quantized` wrote (an unquantized save into the same folder replaces it)."""
    for name in (QUANTIZATION_NAME, QUANTIZED_WEIGHTS_NAME):
        (Path(directory) / name).unlink(missing_ok=True)


def read_quantization(directory: Path) -> Quantization:
    """quantization.json of a saved quantized model; ValueError when damaged or of an unknown format."""
    path = Path(directory) / QUANTIZATION_NAME
    try:
        values = json.loads(path.read_text())
        if values.pop("format", None) != FORMAT_VERSION:
            raise ValueError(f"unknown format (this version reads format {FORMAT_VERSION})")
        values.pop("torchao", None)
        values["modules"] = tuple(values["modules"])
        return Quantization(**values)
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
        raise ValueError(f"{path} is damaged: {' '.join(str(err).split())}") from None


def load_quantized(model: nn.Module, directory: Path, device: torch.device | str | None = None) -> nn.Module:
    """The quantized model saved in `directory`, rebuilt from `model` (the freshly built float model of
    its config.json) on `device` (default: CPU). ValueError when torchao is missing, the weights are
    packed for another device type (int4), or the file does not match; FileNotFoundError for a missing
    model.pt."""
    directory = Path(directory)
    info = read_quantization(directory)
    weights = directory / QUANTIZED_WEIGHTS_NAME
    if not weights.is_file():
        raise FileNotFoundError(f"{weights} not found (a quantized save_pretrained folder holds it)")
    device = torch.device(device or "cpu")
    if info.mode == "int4" and device.type != info.device_type:
        raise ValueError(f"{directory} holds int4 weights packed for the {info.device_type} kernel; load it on "
                         f"{info.device_type}, or quantize the unquantized model on {device.type}")
    model.to(device=device, dtype=getattr(torch, info.dtype))
    quantize_model(model, info.mode, info.group_size, modules=info.modules)
    try:
        state = torch.load(weights, map_location=device, weights_only=True)
        model.load_state_dict(state, strict=True)
    except Exception as err:  # a truncated file, a mismatched tensor
        raise ValueError(f"could not load the quantized weights in {weights}: {' '.join(str(err).split())}") from err
    return model
