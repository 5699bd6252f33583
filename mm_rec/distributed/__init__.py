"""Multi-GPU training: FSDP2 or DDP, activation checkpointing and torch.compile applied per
block from outside the model, torchrun process groups, resharding distributed checkpoints, and
sequence parallelism (each sequence cut in time over the processes, the state handed on).

    from mm_rec.distributed import ParallelConfig, apply_parallelism, init_distributed
    info = init_distributed()                     # under torchrun: one process per GPU
    model = init_model_on_device(lambda: MMRecModel(cfg), info.device)
    model = apply_parallelism(model, ParallelConfig(mode="fsdp", activation_checkpointing=True))

See docs/distributed.md for launching.
"""

from mm_rec.distributed.checkpoint import (
    load_distributed_checkpoint,
    load_sharded_state,
    save_distributed_checkpoint,
    save_sharded_state,
)
from mm_rec.distributed.parallelize import (
    ParallelConfig,
    apply_activation_checkpointing,
    apply_compile,
    apply_fsdp,
    apply_parallelism,
    init_model_on_device,
    run_forward_under_autocast,
)
from mm_rec.distributed.runtime import (
    DistributedInfo,
    all_reduce_max,
    all_reduce_mean,
    barrier,
    cleanup_distributed,
    get_rank,
    get_world_size,
    init_distributed,
    is_main_process,
)
from mm_rec.distributed.sequence_parallel import (
    SequenceParallelOutput,
    all_reduce_gradients,
    local_part,
    part_bounds,
    sequence_parallel_scan,
    sequence_parallel_step,
)

__all__ = [
    "DistributedInfo", "ParallelConfig", "SequenceParallelOutput", "all_reduce_gradients", "all_reduce_max",
    "all_reduce_mean", "apply_activation_checkpointing", "apply_compile", "apply_fsdp", "apply_parallelism", "barrier",
    "cleanup_distributed", "get_rank", "get_world_size", "init_distributed", "init_model_on_device",
    "is_main_process", "load_distributed_checkpoint", "load_sharded_state", "local_part", "part_bounds",
    "run_forward_under_autocast", "save_distributed_checkpoint", "save_sharded_state", "sequence_parallel_scan",
    "sequence_parallel_step",
]
