"""CUDA C++ kernels, built just in time with `torch.utils.cpp_extension` (ninja) on first use.

    scan_kernel.cu / scan_kernel.h             single-pass log-space scan with decoupled look-back
    recurrence_kernel.cu / recurrence_kernel.h  core recurrence, one head's step spread over a
                                                thread-block cluster of 1, 2 or 4 CTAs (Hopper)
    dtype.h                                     the element types both read
    binding.cpp                                 the PyTorch binding (checks, allocation, current stream)

`load_extension()` builds the module once per source version and machine (cached under
torch's extension directory, `TORCH_EXTENSIONS_DIR`; the first build takes about a minute) and
returns it, or returns None when it cannot be built here (no CUDA GPU, a CPU build of PyTorch,
no CUDA toolkit, or `MMREC_DISABLE_CUDA_KERNELS=1`), after one notice naming the reason. Callers
then fall back to the Triton or torch backends (`mm_rec.core.associative_scan`,
`mm_rec.core.recurrence`).
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from types import ModuleType

import torch

__all__ = ["build", "load_extension", "unavailable_reason"]

logger = logging.getLogger(__name__)

_SOURCES = ("binding.cpp", "scan_kernel.cu", "recurrence_kernel.cu")
_EXTENSION: ModuleType | None = None
_FAILURE: str | None = None  # why the extension is not available (set once)


def unavailable_reason() -> str | None:
    """Why the CUDA kernels cannot be built here, or None if nothing speaks against it (the build
    itself may still fail: `load_extension` then reports its error)."""
    if os.environ.get("MMREC_DISABLE_CUDA_KERNELS") == "1":
        return "MMREC_DISABLE_CUDA_KERNELS=1"
    if torch.version.cuda is None:
        return "this PyTorch is not a CUDA build"
    if not torch.cuda.is_available():
        return "no CUDA GPU visible"
    from torch.utils.cpp_extension import CUDA_HOME

    if CUDA_HOME is None:
        return "no CUDA toolkit found (set CUDA_HOME to a toolkit with nvcc)"
    return None


def _arch_flags() -> list[str]:
    major, minor = torch.cuda.get_device_capability()
    arch = f"{major}{minor}" + ("a" if major == 9 else "")  # sm_90a: Hopper's own instructions
    return [f"-gencode=arch=compute_{arch},code=sm_{arch}"]


def build(name: str = "mm_rec_cuda", defines: dict[str, int] | None = None) -> ModuleType:
    """Build (or load from the cache) the extension; raises on failure. `defines` set the kernels'
    launch-shape macros (MMREC_SCAN_WARPS, MMREC_SCAN_STEPS, MMREC_SCAN_MIN_BLOCKS; MMREC_REC_ROW_GROUPS,
    MMREC_REC_ROW_GROUPS_CS1, MMREC_REC_FWD_UNROLL, MMREC_REC_BWD_UNROLL) for sweeps."""
    from torch.utils.cpp_extension import load

    here = Path(__file__).parent
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "{}.{}".format(*torch.cuda.get_device_capability()))
    macros = [f"-D{key}={value}" for key, value in (defines or {}).items()]
    # no -std flag: torch's own (C++17 or newer, as its headers need) applies; the kernels need C++17
    return load(name=name, sources=[str(here / s) for s in _SOURCES], extra_cflags=["-O3"],
                extra_cuda_cflags=["-O3", *_arch_flags(), *macros], verbose=False)


def load_extension() -> ModuleType | None:
    """The compiled kernels (built on the first call), or None with a one-line notice."""
    global _EXTENSION, _FAILURE
    if _EXTENSION is not None or _FAILURE is not None:
        return _EXTENSION
    reason = unavailable_reason()
    if reason is None:
        start = time.perf_counter()
        try:
            _EXTENSION = build()
        except Exception as err:  # a broken toolkit or compiler: fall back, say why
            reason = f"build failed: {str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__}"
        else:
            logger.info("mm_rec CUDA kernels ready in %.1f s", time.perf_counter() - start)
            return _EXTENSION
    _FAILURE = reason
    logger.warning("mm_rec CUDA kernels unavailable (%s): using the Triton or torch backend", reason)
    return None
