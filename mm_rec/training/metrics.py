"""Run logging: OUT/metrics.jsonl (one JSON object per line), TensorBoard when installed, Weights &
Biases when asked for (training.wandb), and `mmrec plot` (loss curves as a PNG).

Rows: training steps `{"step", "loss", "lr", "grad_norm", "tokens", "tokens_per_s", "elapsed_s"}`
(plus `"skipped": true` for a non-finite step), evaluations `{"step", "val_loss", "val_ppl",
"val_bpb", "val_tokens"}`. TensorBoard and W&B get every number of a row but the step, under the
same names (`train/loss`, `val/bpb`, ...: `scalars`).
"""

from __future__ import annotations

import json
import math
import os
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

METRICS_FILE = "metrics.jsonl"
WANDB_ID_FILE = "wandb_run_id"  # in the run folder: a resumed run continues the same W&B run


class MetricsLogger:
    """metrics.jsonl, plus TensorBoard (`tensorboard`, when the package is installed) and W&B
    (`wandb`: a `WandbOptions`, or None). `resume_step`: a resumed run drops the rows logged
    after its checkpoint and continues the TensorBoard events and the W&B run of the folder;
    None starts both anew."""

    def __init__(self, run_dir: Path, tensorboard: bool = True, resume_step: int | None = None,
                 wandb: WandbOptions | None = None):
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
        self.wandb_run = start_wandb(run_dir, wandb, resume_step is not None) if wandb is not None else None

    def log(self, row: dict[str, Any]) -> None:
        self.file.write(json.dumps(row) + "\n")
        self.file.flush()
        values = scalars(row)
        if self.writer is not None:
            for name, value in values.items():
                self.writer.add_scalar(name, value, row["step"])
        if self.wandb_run is not None:
            self.wandb_run.log({"step": row["step"], **values})

    def close(self) -> None:
        self.file.close()
        if self.writer is not None:
            self.writer.close()
        if self.wandb_run is not None:
            self.wandb_run.finish()


def scalars(row: dict[str, Any]) -> dict[str, float]:
    """The numbers of a metrics row as TensorBoard and W&B show them: `train/<key>`, and
    `val/<key>` for `val_<key>`; the step and flags such as `skipped` are left out."""
    return {(f"val/{key[4:]}" if key.startswith("val_") else f"train/{key}"): value for key, value in row.items()
            if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool)}


# ---------------------------------------------------------------------- Weights & Biases
@dataclass(frozen=True)
class WandbOptions:
    """training.wandb_project, and the recipe, shown as the W&B run's config."""

    project: str
    config: dict[str, Any] = field(default_factory=dict)


def require_wandb() -> None:
    """Raise a one-line ValueError when training.wandb is on but the package is missing (checked
    before any work is done, on every process)."""
    try:
        import wandb  # noqa: F401
    except ImportError:
        raise ValueError("training.wandb is on but the wandb package is not installed: "
                         "pip install 'mm-rec[wandb]', or set training.wandb=false") from None


def start_wandb(run_dir: Path, options: WandbOptions, resume: bool):
    """A W&B run named after the run folder. Its id is kept in RUN_DIR/wandb_run_id: a resumed run
    continues it (a fresh start in the folder begins a new one). W&B's files go to WANDB_DIR when
    set, else into the run folder. The x-axis of every chart is the training step (logged as
    `step`), so that steps logged again after a resume from an older checkpoint are kept, not dropped
    as W&B does with an explicit step that goes back."""
    require_wandb()
    import wandb

    id_file = run_dir / WANDB_ID_FILE
    run_id = id_file.read_text().strip() if resume and id_file.is_file() else None
    if not run_id:
        run_id = secrets.token_hex(4)  # W&B ids: letters and digits
        id_file.write_text(run_id + "\n")
    run = wandb.init(project=options.project, name=run_dir.name, id=run_id, resume="allow",
                     dir=os.environ.get("WANDB_DIR") or str(run_dir), config=options.config,
                     settings=wandb.Settings(console="off"))  # the terminal output stays ours (tqdm, torchrun)
    run.define_metric("step")
    for prefix in ("train", "val"):
        run.define_metric(f"{prefix}/*", step_metric="step")
    return run


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
