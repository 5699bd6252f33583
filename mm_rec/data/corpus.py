"""Training text sources: a text file, a folder of text files, a pre-tokenized .bin, or the
embedded corpus (the Python standard library's own source files, present wherever Python is).

Files are read as bytes, in a deterministic order (sorted relative paths); each file is one
document, and `document_separator` can split files further (e.g. "<|endoftext|>").
"""

from __future__ import annotations

import hashlib
import os
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

EMBEDDED_NAME = "python-stdlib"
SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__", "test", "tests"}


@dataclass(frozen=True)
class Source:
    """What `path` resolves to. kind: stdlib | file | dir | bin."""

    kind: str
    root: Path | None
    files: tuple[Path, ...]

    @property
    def description(self) -> str:
        if self.kind == "stdlib":
            return f"the embedded corpus ({len(self.files)} Python standard library files under {self.root})"
        if self.kind == "dir":
            return f"{self.root} ({len(self.files)} files)"
        return str(self.root)

    def fingerprint(self) -> str:
        """Changes when a file is added, removed, resized or touched (cache key)."""
        h = hashlib.sha1(self.kind.encode())
        for f in self.files:
            st = f.stat()
            h.update(f"{f}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        return h.hexdigest()[:16]


def stdlib_files() -> list[Path]:
    """The standard library's .py files (no tests, no site-packages), sorted by relative path."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS and not d.startswith("."))
        files.extend(Path(dirpath, f) for f in filenames if f.endswith(".py"))
    return sorted(files, key=lambda f: f.relative_to(root).as_posix())


def resolve_source(path: str | None) -> Source:
    """Resolve `data.path`; raises FileNotFoundError / ValueError with a clear message."""
    if path is None:
        files = stdlib_files()
        if not files:
            stdlib = sysconfig.get_paths()["stdlib"]
            raise FileNotFoundError(f"no Python standard library sources found under {stdlib}; give --data PATH")
        return Source("stdlib", Path(sysconfig.get_paths()["stdlib"]), tuple(files))
    p = Path(path).expanduser()
    if not p.exists():
        raise FileNotFoundError(f"data not found: {p}")
    if p.is_dir():
        files = sorted((f for f in p.rglob("*") if f.is_file() and not _hidden(f.relative_to(p))),
                       key=lambda f: f.relative_to(p).as_posix())
        files = [f for f in files if not _is_binary(f)]
        if not files:
            raise ValueError(f"no text files in {p}")
        return Source("dir", p, tuple(files))
    if p.suffix == ".bin":
        return Source("bin", p, (p,))
    return Source("file", p, (p,))


def iter_documents(source: Source, separator: str | None = None) -> Iterator[bytes]:
    """Documents as bytes, in order; empty documents are skipped."""
    sep = separator.encode() if separator else None
    for f in source.files:
        data = f.read_bytes()
        for doc in (data.split(sep) if sep else [data]):
            if doc:
                yield doc


def _hidden(relative: Path) -> bool:
    return any(part.startswith(".") for part in relative.parts)


def _is_binary(path: Path) -> bool:
    with path.open("rb") as fh:
        return b"\0" in fh.read(8192)
