"""Run logging: OUT/metrics.jsonl (one JSON object per line), TensorBoard when installed, and
`mmrec plot` (loss curves as a PNG).

Rows: training steps `{"step", "loss", "lr", "grad_norm", "tokens", "tokens_per_s", "elapsed_s"}`
(plus `"skipped": true` for a non-finite step), evaluations `{"step", "val_loss", "val_ppl",
"val_bpb", "val_tokens"}`.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

METRICS_FILE = "metrics.jsonl"


class MetricsLogger:
    def __init__(self, run_dir: Path, tensorboard: bool = True, resume_step: int | None = None):
        self.path = run_dir / METRICS_FILE
        if resume_step is not None:
            truncate_metrics(self.path, resume_step)
        elif self.path.exists():
            self.path.unlink()
        self.file = self.path.open("a")
        self.writer = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # tensorboard is an optional extra
                pass
            else:
                self.writer = SummaryWriter(str(run_dir / "tensorboard"), purge_step=resume_step)

    def log(self, row: dict[str, Any]) -> None:
        self.file.write(json.dumps(row) + "\n")
        self.file.flush()
        if self.writer is not None:
            for key, value in row.items():
                if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                    self.writer.add_scalar(_tb_name(key), value, row["step"])

    def close(self) -> None:
        self.file.close()
        if self.writer is not None:
            self.writer.close()


def _tb_name(key: str) -> str:
    return f"val/{key[4:]}" if key.startswith("val_") else f"train/{key}"


def read_metrics(path: Path) -> list[dict[str, Any]]:
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut by a crash
            continue
    return rows


def truncate_metrics(path: Path, step: int) -> None:
    """Drop rows after `step` (logged after the checkpoint a run resumes from)."""
    if not path.exists():
        return
    keep = [json.dumps(r) + "\n" for r in read_metrics(path) if r.get("step", 0) <= step]
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(keep))
    os.replace(tmp, path)


def plot_run(run_dir: Path, out: Path | None = None) -> Path:
    """Training loss (raw and smoothed) and validation loss against steps, as a PNG."""
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found (is {run_dir} a run folder of mmrec train?)")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ImportError("matplotlib is not installed: pip install 'mm-rec[plot]'") from None
    rows = read_metrics(path)
    train = [(r["step"], r["loss"]) for r in rows if "loss" in r and math.isfinite(r["loss"])]
    val = [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r]
    if not train and not val:
        raise ValueError(f"{path} holds no loss values yet")
    fig, ax = plt.subplots(figsize=(8, 5))
    if train:
        steps, losses = zip(*train)
        ax.plot(steps, losses, color="tab:blue", alpha=0.25, linewidth=0.8, label="train (per step)")
        ax.plot(steps, _ema(losses, 0.95), color="tab:blue", label="train (smoothed)")
    if val:
        steps, losses = zip(*val)
        ax.plot(steps, losses, "o-", color="tab:orange", label="validation")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats per token)")
    ax.set_title(str(run_dir))
    ax.grid(alpha=0.3)
    ax.legend()
    out = Path(out) if out is not None else Path(run_dir) / "loss.png"
    fig.savefig(out, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return out


def _ema(values, decay: float) -> list[float]:
    out, avg = [], None
    for v in values:
        avg = v if avg is None else decay * avg + (1 - decay) * v
        out.append(avg)
    return out
