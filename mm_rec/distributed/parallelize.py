"""Parallelism applied from outside the model code: activation checkpointing, torch.compile,
then FSDP2 or DDP, each per block, in that order (torchtitan's).

The model code knows nothing of this. A model qualifies when it has
    blocks   nn.ModuleList of identical residual blocks (the units of sharding, checkpointing
             and compilation),
    embed    the token embedding, lm_head the output projection,
    config   with `tie_embeddings` (tied embed/lm_head weights must live in one FSDP unit),
which `MMRecModel` and the baseline `TransformerModel` both satisfy.

    model = init_model_on_device(lambda: MMRecModel(cfg), device)   # no CPU copy of a 7B model
    model = apply_parallelism(model, ParallelConfig(mode="fsdp", activation_checkpointing=True))
    optimizer = torch.optim.AdamW(model.parameters(), ...)          # after sharding

Mixed precision "bf16" means bf16 compute with fp32 master weights, fp32 gradient reduction and
fp32 optimizer state: for FSDP through `MixedPrecisionPolicy` (the all-gathered parameters are
bf16 copies of the fp32 shards); for DDP and "none" through `torch.autocast` around the model's
forward (parameters stay fp32, matmuls run in bf16, gradients are fp32 and reduced in fp32).
The recurrent state carried between segments always stays fp32.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.nn.parallel import DistributedDataParallel
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

from mm_rec.constants import PARALLEL_MODES

AC_POLICIES = ("full", "selective")
MIXED_PRECISIONS = ("bf16", "fp32")

aten = torch.ops.aten

# Selective checkpointing keeps the outputs of these (the expensive ops) and recomputes the
# rest of the block (norms, activations, gates, softmax, casts) in backward.
_SAVED_OPS = {
    aten.mm.default,
    aten.addmm.default,
    aten.bmm.default,
    aten.baddbmm.default,
    aten._scaled_dot_product_flash_attention.default,
    aten._scaled_dot_product_efficient_attention.default,
    aten._scaled_dot_product_cudnn_attention.default,
    aten._scaled_dot_product_flash_attention_for_cpu.default,
}
_SAVED_NAMESPACES = {"mm_rec"}  # this package's own kernels (the fused recurrence)


@dataclass
class ParallelConfig:
    """How `apply_parallelism` wraps a model.

    mode: "fsdp" (FSDP2: each block, then the root with embeddings and head, is one sharded
        unit), "ddp" (replicated parameters, all-reduced gradients), "sp" (sequence parallelism:
        a full replica per process, wrapped as for "none"; `mm_rec.distributed.sequence_parallel`
        runs the steps and all-reduces the gradients) or "none" (one device: checkpointing,
        compilation and precision only).
    activation_checkpointing: recompute each block in backward instead of keeping its
        activations; `ac_policy` "full" keeps only the block's inputs, "selective" also keeps
        the outputs of matmuls, attention and the recurrence kernel and recomputes the cheap
        element-wise work.
    compile: `torch.compile` each block (before checkpointing and sharding: the checkpoint
        wraps the compiled block); `compile_backend` is passed to torch.compile ("inductor" on
        GPUs; tests use "aot_eager").
    mixed_precision: "bf16" (bf16 compute, fp32 master weights and gradient reduction) or "fp32".
    reshard_after_forward: FSDP frees each block's gathered parameters after its forward and
        gathers them again in backward (less memory, one more all-gather per block). The last
        block and the root are never resharded: backward needs them first.
    """

    mode: str = "fsdp"
    activation_checkpointing: bool = False
    ac_policy: str = "selective"
    compile: bool = False
    compile_backend: str = "inductor"
    mixed_precision: str = "bf16"
    reshard_after_forward: bool = True

    def __post_init__(self) -> None:
        for name, choices in (("mode", PARALLEL_MODES), ("ac_policy", AC_POLICIES),
                              ("mixed_precision", MIXED_PRECISIONS)):
            if getattr(self, name) not in choices:
                raise ValueError(f"ParallelConfig.{name}={getattr(self, name)!r}: must be one of {choices}")

    @property
    def compute_dtype(self) -> torch.dtype:
        return torch.bfloat16 if self.mixed_precision == "bf16" else torch.float32


def apply_parallelism(model: nn.Module, config: ParallelConfig, mesh: DeviceMesh | None = None) -> nn.Module:
    """Apply torch.compile, activation checkpointing, then FSDP2 or DDP, per block.

    Compilation comes first, so the checkpoint recomputes the compiled block. The other order
    (torchtitan's: compile the checkpointed block) fails in torch 2.11's inductor on CUDA for
    MM-Rec blocks, with either policy ("Argument 'gather_3' of Node 'output' does not belong to
    this Graph": the carried ring the block returns from inside the checkpointed region).

    The model must already sit on this process's device (see `init_model_on_device`) and, for
    "fsdp", "ddp" and "sp", the default process group must exist (`init_distributed()` under
    torchrun). `mesh` is the 1-D data-parallel mesh for FSDP (default: all processes).

    Returns the model to train: the same object for "fsdp", "sp" and "none" (modified in place), a
    `DistributedDataParallel` wrapper for "ddp". Build the optimizer after this call.
    """
    _check_model(model)
    if config.mode != "none" and not dist.is_initialized():
        raise ValueError(f"parallel mode {config.mode!r} needs a process group: launch with "
                         "`torchrun --nproc_per_node N ...` and call mm_rec.distributed.init_distributed() first")
    if config.compile:
        apply_compile(model, config.compile_backend)
    if config.activation_checkpointing:
        apply_activation_checkpointing(model, config.ac_policy)
    if config.mode == "fsdp":
        apply_fsdp(model, config, mesh)
        return model
    if config.mixed_precision == "bf16":
        run_forward_under_autocast(model, torch.bfloat16)
    if config.mode == "ddp":
        device = _model_device(model)
        return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    return model


def apply_activation_checkpointing(model: nn.Module, policy: str = "full") -> None:
    """Wrap every block of `model.blocks` in a non-reentrant checkpoint (in place).

    Parameter names keep working: the wrapper strips its own prefix from state dicts, and
    attribute access falls through to the block.
    """
    if policy not in AC_POLICIES:
        raise ValueError(f"activation checkpointing policy must be one of {AC_POLICIES}, got {policy!r}")
    kwargs: dict = {"preserve_rng_state": False}  # the blocks draw no random numbers
    if policy == "selective":
        kwargs["context_fn"] = functools.partial(create_selective_checkpoint_contexts, _selective_policy)
    for i, block in enumerate(model.blocks):
        model.blocks[i] = checkpoint_wrapper(block, **kwargs)


def _selective_policy(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    if op in _SAVED_OPS or getattr(op, "namespace", None) in _SAVED_NAMESPACES:
        return CheckpointPolicy.MUST_SAVE
    return CheckpointPolicy.PREFER_RECOMPUTE


def apply_compile(model: nn.Module, backend: str = "inductor") -> None:
    """`torch.compile` each block in place (`nn.Module.compile`: names and types unchanged).

    Blocks are identical, so one compiled graph serves all of them; graph breaks are allowed
    (the fused recurrence is an opaque custom operator either way).
    """
    for block in model.blocks:
        # static shapes: torch 2.11's dynamic-shape guards fail on the MM-Rec block (IndexError in
        # produce_guards); training runs fixed shapes anyway, a new shape recompiles once
        block.compile(backend=backend, dynamic=False)


def apply_fsdp(model: nn.Module, config: ParallelConfig, mesh: DeviceMesh | None = None) -> None:
    """FSDP2 (`fully_shard`) on every block, on the embedding when untied, then on the root.

    Parameters are sharded on dim 0 over `mesh`; each block is one all-gather / reduce-scatter
    unit. The root unit holds what remains: the embedding (with the head when they are tied,
    since a tied weight must live in one unit), the final norm and the head.
    """
    if mesh is None:
        mesh = init_device_mesh(_model_device(model).type, (dist.get_world_size(),))
    if config.mixed_precision == "bf16":
        # Inputs are not cast: block inputs arrive in bf16 from the bf16 embedding already, and
        # the fp32 recurrent state passed into each block must stay fp32.
        mp_policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32,
                                         cast_forward_inputs=False)
    else:
        mp_policy = MixedPrecisionPolicy()
    last = len(model.blocks) - 1
    for i, block in enumerate(model.blocks):
        fully_shard(block, mesh=mesh, mp_policy=mp_policy,
                    reshard_after_forward=config.reshard_after_forward and i < last)
    if not model.config.tie_embeddings:
        fully_shard(model.embed, mesh=mesh, mp_policy=mp_policy, reshard_after_forward=config.reshard_after_forward)
    fully_shard(model, mesh=mesh, mp_policy=mp_policy, reshard_after_forward=False)


def run_forward_under_autocast(model: nn.Module, dtype: torch.dtype) -> None:
    """Make `model(...)` run its forward under `torch.autocast(dtype)` (in place).

    The instance gets a subclass of its own class whose `forward` enters autocast (the same
    technique FSDP2 uses for its hooks), so isinstance checks, attributes and state-dict names
    are unchanged. Used for DDP and single-device mixed precision.
    """
    base = type(model)
    device_type = _model_device(model).type

    def forward(self, *args, **kwargs):
        with torch.autocast(device_type=device_type, dtype=dtype):
            return base.forward(self, *args, **kwargs)

    model.__class__ = type(f"Autocast{base.__name__}", (base,), {"forward": forward, "__doc__": base.__doc__})


def init_model_on_device(build: Callable[[], nn.Module], device: torch.device | str) -> nn.Module:
    """Construct the model on the meta device, allocate it directly on `device` and initialise
    it there with `model.reset_parameters()`: a 7B model never exists in CPU memory.

    Tied parameters stay tied. With the same seed on every process the weights are identical
    everywhere (FSDP then keeps each process's shard; DDP would broadcast rank 0's anyway). The
    values differ from an eager `build()` with the same seed, whose constructor draws random
    numbers of its own before `reset_parameters`.
    """
    with torch.device("meta"):
        model = build()
    tied = _tied_parameter_names(model)
    model.to_empty(device=device)
    for names in tied:
        shared = model.get_parameter(names[0])
        for name in names[1:]:
            owner, _, attr = name.rpartition(".")
            setattr(model.get_submodule(owner), attr, shared)
    with torch.no_grad():
        model.reset_parameters()
    return model


def _tied_parameter_names(model: nn.Module) -> list[list[str]]:
    """Groups of parameter names that refer to one tensor, e.g. [["embed.weight", "lm_head.weight"]]."""
    groups: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(param), []).append(name)
    return [names for names in groups.values() if len(names) > 1]


def _check_model(model: nn.Module) -> None:
    for attr in ("blocks", "embed", "lm_head", "config"):
        if not hasattr(model, attr):
            raise ValueError(f"apply_parallelism needs a model with `{attr}` (blocks, embed, lm_head, config); "
                             f"{type(model).__name__} has none")
    if not isinstance(model.blocks, nn.ModuleList) or len(model.blocks) == 0:
        raise ValueError("model.blocks must be a non-empty nn.ModuleList")


def _model_device(model: nn.Module) -> torch.device:
    device = next(model.parameters()).device
    if device.type == "meta":
        raise ValueError("the model is on the meta device: materialise it first (init_model_on_device)")
    return device
