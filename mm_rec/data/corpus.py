"""Training text sources: a text file, a folder of them, a pre-tokenized .bin, a Hugging Face
`datasets` folder (save_to_disk), or the embedded corpus (the Python standard library's own
source files, present wherever Python is).

Files are read in a deterministic order (sorted relative paths), by their suffix:

    .jsonl        one JSON object per line; its `text_field` (data.text_field, default "text") is a document
    .parquet      the `text_field` column, one document per row (needs pyarrow: the `data` extra)
    .gz           gzip-compressed text (or .jsonl.gz records), decompressed as it is read
    anything else text, as bytes: the whole file is one document

`document_separator` can split documents further (e.g. "<|endoftext|>"). A single file that is
binary (a NUL byte in its first 8 KB) or compressed in another format is refused, so it is
never learned as bytes; in a folder such files are skipped. Records are read a batch at a time
(streamed), so a large file never sits in memory whole.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

EMBEDDED_NAME = "python-stdlib"
SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__", "test", "tests"}
RECORD_SUFFIXES = (".jsonl", ".parquet")  # files of records with a text field
COMPRESSED_SUFFIXES = (".zip", ".bz2", ".xz", ".lzma", ".zst", ".7z", ".tar", ".tgz", ".lz4", ".br", ".rar")
HF_DATASET_MARKERS = (("dataset_info.json", "state.json"), ("dataset_dict.json",))  # what save_to_disk writes
RECORD_BATCH = 1024


@dataclass(frozen=True)
class Source:
    """What `path` resolves to. kind: stdlib | file | dir | bin | datasets (a save_to_disk folder).
    `text_field` names the text of .jsonl / .parquet records and of a datasets folder."""

    kind: str
    root: Path | None
    files: tuple[Path, ...]
    text_field: str = "text"

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
        if self.kind == "datasets" or any(_is_records(f) for f in self.files):  # plain text ignores the field
            h.update(f"text_field={self.text_field}".encode())
        return h.hexdigest()[:16]


def stdlib_files() -> list[Path]:
    """The standard library's .py files (no tests, no site-packages), sorted by relative path."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS and not d.startswith("."))
        files.extend(Path(dirpath, f) for f in filenames if f.endswith(".py"))
    return sorted(files, key=lambda f: f.relative_to(root).as_posix())


def resolve_source(path: str | None, text_field: str = "text") -> Source:
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
        if any(all((p / name).is_file() for name in marker) for marker in HF_DATASET_MARKERS):
            return Source("datasets", p, tuple(files), text_field)
        files = [f for f in files if _readable_text(f) is None]
        if not files:
            raise ValueError(f"no text files in {p}")
        return Source("dir", p, tuple(files), text_field)
    if p.suffix == ".bin":
        return Source("bin", p, (p,))
    problem = _readable_text(p)
    if problem:
        raise ValueError(f"{p} {problem}")
    return Source("file", p, (p,), text_field)


def iter_documents(source: Source, separator: str | None = None) -> Iterator[bytes]:
    """Documents as bytes (records' text as UTF-8), in order; empty documents are skipped."""
    sep = separator.encode() if separator else None
    for data in _raw_documents(source):
        for doc in (data.split(sep) if sep else [data]):
            if doc:
                yield doc


def _raw_documents(source: Source) -> Iterator[bytes]:
    if source.kind == "datasets":
        yield from _dataset_documents(source.root, source.text_field)
        return
    for f in source.files:
        if f.name.endswith((".jsonl", ".jsonl.gz")):
            yield from _jsonl_documents(f, source.text_field)
        elif f.suffix == ".parquet":
            yield from _parquet_documents(f, source.text_field)
        elif f.suffix == ".gz":
            with gzip.open(f, "rb") as fh:
                yield fh.read()
        else:
            yield f.read_bytes()


def _field(record, field: str, where: str) -> bytes:
    if not isinstance(record, dict) or field not in record:
        found = sorted(record) if isinstance(record, dict) else type(record).__name__
        raise ValueError(f"{where}: no field {field!r} (set data.text_field; found {found})")
    text = record[field]
    if text is None:
        return b""
    if not isinstance(text, str):
        raise ValueError(f"{where}: field {field!r} holds {type(text).__name__}, not text")
    return text.encode("utf-8")


def _jsonl_documents(path: Path, field: str) -> Iterator[bytes]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as fh:
        for number, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{number}: not valid JSON ({err.msg})") from None
            yield _field(record, field, f"{path}:{number}")


def _parquet_documents(path: Path, field: str) -> Iterator[bytes]:
    try:
        import pyarrow.parquet as pq  # optional: the `data` extra
    except ImportError:
        raise ValueError(f"{path}: reading .parquet needs pyarrow: pip install 'mm-rec[data]'") from None
    parquet = pq.ParquetFile(path)
    if field not in parquet.schema_arrow.names:
        raise ValueError(f"{path}: no column {field!r} (set data.text_field; found {parquet.schema_arrow.names})")
    for batch in parquet.iter_batches(batch_size=RECORD_BATCH, columns=[field]):
        for number, text in enumerate(batch.column(0).to_pylist()):
            yield _field({field: text}, field, f"{path} row {number}")


def _dataset_documents(folder: Path, field: str) -> Iterator[bytes]:
    """The `field` column of a `datasets` save_to_disk folder (memory-mapped Arrow files); of a
    DatasetDict, its "train" split."""
    try:
        import datasets  # optional: the `data` extra
    except ImportError:
        raise ValueError(f"{folder} is a Hugging Face datasets folder; reading it needs the datasets package: "
                         "pip install 'mm-rec[data]'") from None
    dataset = datasets.load_from_disk(str(folder))
    if isinstance(dataset, datasets.DatasetDict):
        if "train" not in dataset:
            raise ValueError(f"{folder} holds the splits {sorted(dataset)}, none named 'train'; give the folder of "
                             "one split (DatasetDict[split].save_to_disk)")
        dataset = dataset["train"]
    if field not in dataset.column_names:
        raise ValueError(f"{folder}: no column {field!r} (set data.text_field; found {dataset.column_names})")
    for batch in dataset.select_columns([field]).iter(batch_size=RECORD_BATCH):
        for text in batch[field]:
            yield _field({field: text}, field, str(folder))


def _hidden(relative: Path) -> bool:
    return any(part.startswith(".") for part in relative.parts)


def _is_records(path: Path) -> bool:
    return path.name.endswith(RECORD_SUFFIXES + (".jsonl.gz",))


def _readable_text(path: Path) -> str | None:
    """None for a file read as text or records; else why it is not (the end of an error message)."""
    if path.suffix in COMPRESSED_SUFFIXES or path.name.endswith((".tar.gz", ".tar.bz2", ".tar.xz")):
        return f"is compressed ({path.suffix}): decompress it first (.gz text files are read directly)"
    if path.suffix == ".parquet":
        return None
    if path.suffix == ".gz":
        try:
            with gzip.open(path, "rb") as fh:
                head = fh.read(8192)
        except (OSError, EOFError) as err:
            return f"is not a readable gzip file ({err})"
    else:
        with path.open("rb") as fh:
            head = fh.read(8192)
    if b"\0" in head:
        return ("looks binary (a NUL byte in its first 8 KB), not text; pre-tokenized ids must be a .bin file "
                "(data.bin_dtype)")
    return None
