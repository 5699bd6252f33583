"""GPU kernels (Triton), each beside the slow reference it is tested against.

* `scan_triton`: the log-space associative scan (reference: `mm_rec.core.associative_scan`).
* `recurrence_triton`: the fused exact core recurrence (reference: `mm_rec.core.recurrence`).
"""

from __future__ import annotations

import functools
import os


@functools.cache
def triton_available() -> bool:
    """True when Triton imports and can run here (a CUDA GPU, or TRITON_INTERPRET=1)."""
    try:
        import triton  # noqa: F401
    except Exception:
        return False
    if os.environ.get("TRITON_INTERPRET") == "1":
        return True
    import torch

    return torch.cuda.is_available()
