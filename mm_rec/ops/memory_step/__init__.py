"""The memory's part of a decoding step (one token per row), fused into one Triton kernel.

    triton_kernels.py   `mm_rec::memory_step` (the kernel as a torch.compile-visible operator) and
                        `combine_partials` (imported on demand: needs Triton)

Reference: the torch step it replaces, `HDSHierarchy.step_token` then `MultiMemoryAttention.step`
(mm_rec/core/hds.py, mm_rec/blocks/attention.py); the mixer picks one or the other
(`MMRecMixer.memory_step_backend`). Tests: tests/ops/memory_step/.
"""

MEMORY_STEP_BACKENDS = ("auto", "torch", "triton")
""""auto": the fused kernel on CUDA tensors when Triton runs there, the torch step otherwise;
"torch": always the torch step; "triton": always the kernel (on the CPU through TRITON_INTERPRET=1)."""

__all__ = ["MEMORY_STEP_BACKENDS"]
