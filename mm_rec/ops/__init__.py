"""GPU kernels (Triton), each beside the slow reference it is tested against.

* `scan_triton`: the log-space associative scan (reference: `mm_rec.core.associative_scan`).
* `recurrence_triton`: the fused exact core recurrence (reference: `mm_rec.core.recurrence`).
"""

from __future__ import annotations

import os

_TRITON_AVAILABLE: bool | None = None  # probed once; a plain global, which torch.compile traces without warnings


def triton_available() -> bool:
    """True when Triton imports and can run here (a CUDA GPU, or TRITON_INTERPRET=1)."""
    global _TRITON_AVAILABLE
    if _TRITON_AVAILABLE is None:
        _TRITON_AVAILABLE = _probe_triton()
    return _TRITON_AVAILABLE


def _probe_triton() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:
        return False
    if os.environ.get("TRITON_INTERPRET") == "1":
        return True
    import torch

    return torch.cuda.is_available()
