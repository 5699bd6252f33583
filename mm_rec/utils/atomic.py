"""A folder that appears complete or not at all: write it under a staging name, then commit it.

    staging = final.with_name(f".tmp-{final.name}")
    ...write every file into staging...
    commit_directory(staging, final)

The one atomic writer of the package: training checkpoints, distributed (DCP) checkpoints and
the tokenized-data cache all go through `commit_directory`; single files (a task run's results and
training state) through `replace_file`.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path


def commit_directory(staging: Path, final: Path) -> None:
    """Make the fully written folder `staging` appear as `final`, replacing what is there.

    Every file under `staging` and every folder is fsync'ed before the rename, so after a crash
    `final` is either the old folder or the complete new one (an existing `final` is moved aside
    first and deleted last; a leftover `.old-*` folder is never read as a result).
    """
    for path in sorted(staging.rglob("*")):
        _fsync(path)
    _fsync(staging)
    old = final.with_name(f".old-{final.name}")
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(staging, final)
    _fsync(final.parent)
    shutil.rmtree(old, ignore_errors=True)


def replace_file(final: Path, write: Callable[[Path], None]) -> None:
    """Make `final` the file that `write(staging)` writes, replacing what is there: a reader sees the
    old file or the complete new one."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = final.with_name(f".tmp-{final.name}")
    write(staging)
    _fsync(staging)
    os.replace(staging, final)


def _fsync(path: Path) -> None:
    if path.is_dir():
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:  # not every platform opens directories
            return
    else:
        fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
