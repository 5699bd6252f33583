"""Devices and autocast by name: what `training.device`, `training.precision` and the command
line's --device and --precision accept."""

from __future__ import annotations

import contextlib

import torch


def resolve_device(name: str = "auto", local_rank: int = 0) -> torch.device:
    """"auto" (CUDA device `local_rank` when there is one, else the CPU), "cpu", "cuda" or
    "cuda:N"; ValueError when CUDA is asked for and there is none."""
    if name == "auto":
        return torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise ValueError(f"unknown device {name!r}: use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} asked for, but no CUDA device is available")
    return device


def resolve_precision(precision: str, device: torch.device) -> str:
    """"auto" becomes bf16 on CUDA (fp16 where the GPU has no bf16) and fp32 elsewhere; fp32,
    bf16 and fp16 stay as they are."""
    if precision == "auto":
        return ("bf16" if torch.cuda.is_bf16_supported() else "fp16") if device.type == "cuda" else "fp32"
    return precision


def autocast_for(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    """Autocast for fp32 (none), bf16 or fp16 ("auto": bf16 on CUDA, fp32 on CPU, whose runs so
    stay bit-reproducible)."""
    precision = resolve_precision(precision, device)
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)
