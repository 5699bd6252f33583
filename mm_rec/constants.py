"""Values that several layers must agree on, defined once at the bottom of the package.

    IGNORE_INDEX    the label of a position without a target: the models' loss skips it, the
                    batchers pad with it, the task generators put it everywhere but the answers
    PARALLEL_MODES  the multi-GPU modes: a recipe's distributed.parallel, ParallelConfig.mode
"""

IGNORE_INDEX = -100
PARALLEL_MODES = ("none", "ddp", "fsdp", "sp")  # sp: sequence parallelism
