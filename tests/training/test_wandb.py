"""training.wandb: Weights & Biases logging, in offline mode (no account, no network). The values
W&B records are metrics.jsonl's, a resumed run continues the same W&B run, and without the
package the switch is refused in one line."""

import json
import struct
import sys
import time
from pathlib import Path

import pytest

from mm_rec.cli import main
from mm_rec.training.metrics import WANDB_ID_FILE, scalars

from .conftest import TINY, read_metrics

HAS_WANDB = True
try:
    import wandb  # noqa: F401
except ImportError:
    HAS_WANDB = False


def train_args(data, out, steps, *extra):
    return ["train", "--data", str(data), "--max-steps", str(steps), "--out", str(out),
            "--set", *TINY, "training.wandb=true", "training.wandb_project=mmrec-test", "training.eval_interval=2",
            *extra]


def wandb_records(path: Path):
    """The records of an offline run's .wandb file: W&B's record log (LevelDB's log format:
    32 KiB blocks of chunks with a 7-byte header, after a 7-byte file header), each record a
    protobuf `Record`."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    if len(data) < 7:  # not written yet
        return
    assert data[:4] == b":W&B", f"{path} is not a W&B record log"
    pos, block, chunks = 7, 32768, []
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0 or pos + 7 + length > len(data):  # the end, or a chunk still being written
            break
        chunks.append(data[pos + 7:pos + 7 + length])
        pos += 7 + length
        if kind in (1, 4):  # a whole record, or the last chunk of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(b"".join(chunks))
            chunks = []
            yield record


def complete_records(path: Path, timeout_s: float = 60.0) -> list:
    """The records of a run's file once it ends with W&B's exit record. wandb-core writes the file
    in a separate process, which may still be flushing when `finish()` has returned."""
    deadline = time.monotonic() + timeout_s
    while True:
        records = list(wandb_records(path))
        if any(r.WhichOneof("record_type") == "exit" for r in records) or time.monotonic() > deadline:
            return records
        time.sleep(0.2)


def offline_runs(wandb_dir: Path) -> list[tuple[str, list[dict]]]:
    """(run id, history rows without W&B's own _step/_runtime/_timestamp) of every offline run."""
    runs = []
    for path in sorted(wandb_dir.glob("wandb/offline-run-*/run-*.wandb")):
        run_id, rows = None, []
        for record in complete_records(path):
            kind = record.WhichOneof("record_type")
            if kind == "run":
                run_id = record.run.run_id
            elif kind == "history":
                row = {item.key or "/".join(item.nested_key): json.loads(item.value_json)
                       for item in record.history.item}
                rows.append({k: v for k, v in row.items() if not k.startswith("_")})
        runs.append((run_id, rows))
    return runs


@pytest.mark.skipif(not HAS_WANDB, reason="wandb is not installed (pip install 'mm-rec[wandb]')")
def test_wandb_logs_the_metrics_rows_and_a_resume_continues_the_run(text_file, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "w"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    (tmp_path / "w").mkdir()
    run = tmp_path / "run"
    assert main(train_args(text_file, run, 3, "training.save_interval=3")) == 0
    run_id = (run / WANDB_ID_FILE).read_text().strip()
    assert main(train_args(text_file, run, 5, "training.save_interval=3") + ["--resume", "auto"]) == 0
    capsys.readouterr()
    runs = offline_runs(tmp_path / "w")
    assert [r[0] for r in runs] == [run_id, run_id]  # the resumed process continued the same run
    logged = sorted((row for _, rows in runs for row in rows), key=lambda r: (r["step"], "val/loss" in r))
    expected = [{"step": row["step"], **scalars(row)} for row in read_metrics(run)]
    assert [r["step"] for r in expected] == [1, 2, 2, 3, 3, 4, 4, 5, 5]  # evaluations at 2, 3 (last), 4, 5
    assert logged == expected  # every number as metrics.jsonl has it: loss, lr, grad norm, tokens/s, val_*


def test_wandb_on_without_the_package_is_one_line(text_file, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` raises ImportError
    assert main(train_args(text_file, tmp_path / "run", 2)) == 2
    err = capsys.readouterr().err.strip()
    assert err == ("mmrec train: error: training.wandb is on but the wandb package is not installed: "
                   "pip install 'mm-rec[wandb]', or set training.wandb=false")
    assert not (tmp_path / "run").exists()
