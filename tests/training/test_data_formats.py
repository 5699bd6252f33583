"""Data formats beside text files: .jsonl, .parquet, gzip and Hugging Face `datasets` folders give
the documents their records hold; binary and compressed files are refused, not learned as bytes."""

import gzip
import json
import lzma
import random

import pytest
import torch

from mm_rec.cli import main
from mm_rec.data.cache import prepare_tokens, tokenize_in_memory
from mm_rec.data.corpus import iter_documents, resolve_source
from mm_rec.data.tokenizers import ByteTokenizer

from .conftest import TINY


def random_texts(n: int, seed: int) -> list[str]:
    """Documents of random length with non-ASCII characters, newlines and JSON-escaped characters."""
    rng = random.Random(seed)
    alphabet = "abcdefghij klmnop\n\t\"\\é→日😀"
    return ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 300))) for _ in range(n)]


def write_jsonl(path, texts, field="text", opener=open):
    with opener(path, "wt", encoding="utf-8") as fh:
        for i, text in enumerate(texts):
            fh.write(json.dumps({"id": i, field: text, "meta": {"n": i}}) + "\n")
            if i == 1:
                fh.write("\n")  # blank lines are skipped


def assert_documents(source, texts, tmp_path):
    """The token cache holds the texts' UTF-8 bytes, one document per record."""
    expected = [t.encode() for t in texts]
    assert list(iter_documents(source)) == expected
    data = prepare_tokens(source, ByteTokenizer(), tmp_path / "cache", log=lambda *_: None)
    assert bytes(data.tokens.tolist()) == b"".join(expected)
    starts = torch.tensor([0] + [len(e) for e in expected]).cumsum(0)[:-1]
    assert torch.equal(data.doc_starts, starts)
    assert torch.equal(tokenize_in_memory(source, ByteTokenizer()).tokens, data.tokens)


def test_jsonl_records_with_a_named_field(tmp_path):
    texts = random_texts(12, seed=1)
    write_jsonl(tmp_path / "a.jsonl", texts)
    assert_documents(resolve_source(str(tmp_path / "a.jsonl")), texts, tmp_path / "one")
    write_jsonl(tmp_path / "b.jsonl", texts, field="body")
    assert_documents(resolve_source(str(tmp_path / "b.jsonl"), text_field="body"), texts, tmp_path / "two")
    # another field is another cache key: the same file does not reuse the tokens of the other field
    assert resolve_source(str(tmp_path / "b.jsonl"), "body").fingerprint() != \
        resolve_source(str(tmp_path / "b.jsonl"), "id").fingerprint()


def test_jsonl_errors_name_the_line(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", ["one", "two"], field="body")
    with pytest.raises(ValueError, match=r"a.jsonl:1: no field 'text' \(set data.text_field; found \['body'"):
        list(iter_documents(resolve_source(str(tmp_path / "a.jsonl"))))
    (tmp_path / "b.jsonl").write_text('{"text": "fine"}\n{"text": broken\n')
    with pytest.raises(ValueError, match="b.jsonl:2: not valid JSON"):
        list(iter_documents(resolve_source(str(tmp_path / "b.jsonl"))))
    (tmp_path / "c.jsonl").write_text('{"text": 3}\n')
    with pytest.raises(ValueError, match="holds int, not text"):
        list(iter_documents(resolve_source(str(tmp_path / "c.jsonl"))))


def test_gzip_text_and_gzip_jsonl(tmp_path):
    texts = random_texts(5, seed=2)
    with gzip.open(tmp_path / "corpus.txt.gz", "wt", encoding="utf-8") as fh:
        fh.write("".join(texts))
    assert_documents(resolve_source(str(tmp_path / "corpus.txt.gz")), ["".join(texts)], tmp_path / "text")
    write_jsonl(tmp_path / "records.jsonl.gz", texts, opener=gzip.open)
    assert_documents(resolve_source(str(tmp_path / "records.jsonl.gz")), texts, tmp_path / "records")


def test_binary_and_compressed_files_are_refused(tmp_path):
    binary = tmp_path / "model.pt"
    torch.save(torch.randn(10), binary)
    with pytest.raises(ValueError, match="model.pt looks binary"):
        resolve_source(str(binary))
    packed = tmp_path / "corpus.txt.xz"
    packed.write_bytes(lzma.compress(b"some text"))
    with pytest.raises(ValueError, match=r"corpus.txt.xz is compressed \(.xz\): decompress it first"):
        resolve_source(str(packed))
    (tmp_path / "fake.gz").write_text("not gzip")
    with pytest.raises(ValueError, match="not a readable gzip file"):
        resolve_source(str(tmp_path / "fake.gz"))
    with gzip.open(tmp_path / "weights.bin.gz", "wb") as fh:
        fh.write(bytes(range(256)))
    with pytest.raises(ValueError, match="looks binary"):
        resolve_source(str(tmp_path / "weights.bin.gz"))
    # in a folder, such files are skipped and the text files read
    folder = tmp_path / "docs"
    folder.mkdir()
    for f in (binary, packed, tmp_path / "weights.bin.gz"):
        f.rename(folder / f.name)
    (folder / "notes.txt").write_text("plain text")
    write_jsonl(folder / "more.jsonl", ["from a record"])
    source = resolve_source(str(folder))
    assert [f.name for f in source.files] == ["more.jsonl", "notes.txt"]
    assert list(iter_documents(source)) == [b"from a record", b"plain text"]


def test_parquet_column(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    texts = random_texts(2500, seed=3)  # more rows than one read batch
    pq.write_table(pa.table({"id": list(range(len(texts))), "content": texts}), tmp_path / "data.parquet",
                   row_group_size=700)
    assert_documents(resolve_source(str(tmp_path / "data.parquet"), "content"), texts, tmp_path)
    with pytest.raises(ValueError, match=r"no column 'text' \(set data.text_field; found \['id', 'content'\]"):
        list(iter_documents(resolve_source(str(tmp_path / "data.parquet"))))


def test_datasets_folder_saved_to_disk(tmp_path):
    datasets = pytest.importorskip("datasets")
    texts = random_texts(30, seed=4)
    datasets.Dataset.from_dict({"text": texts, "n": list(range(30))}).save_to_disk(tmp_path / "ds")
    source = resolve_source(str(tmp_path / "ds"))
    assert source.kind == "datasets"
    assert_documents(source, texts, tmp_path / "one")
    splits = datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": texts[:10]}),
                                   "test": datasets.Dataset.from_dict({"text": texts[10:]})})
    splits.save_to_disk(tmp_path / "splits")
    assert_documents(resolve_source(str(tmp_path / "splits")), texts[:10], tmp_path / "two")  # the train split
    datasets.DatasetDict({"validation": splits["test"]}).save_to_disk(tmp_path / "no_train")
    with pytest.raises(ValueError, match=r"holds the splits \['validation'\], none named 'train'"):
        list(iter_documents(resolve_source(str(tmp_path / "no_train"))))


def test_training_reads_a_jsonl_field(tmp_path, capsys):
    """data.text_field reaches the trainer, and `mmrec eval` reads the checkpoint's data the same way."""
    texts = random_texts(60, seed=5)
    write_jsonl(tmp_path / "data.jsonl", texts, field="body")
    args = ["train", "--data", tmp_path / "data.jsonl", "--max-steps", 2, "--out", tmp_path / "run",
            "--set", *TINY, "data.text_field=body"]
    assert main([str(a) for a in args]) == 0
    out = capsys.readouterr().out
    assert f"{sum(len(t.encode()) for t in texts):,} byte tokens" in out
    assert main(["eval", "--checkpoint", str(tmp_path / "run"), "--max-tokens", "200"]) == 0
    binary = tmp_path / "data.bin.gz"
    with gzip.open(binary, "wb") as fh:
        fh.write(bytes(range(256)))
    assert main(["train", "--data", str(binary), "--out", str(tmp_path / "other"), "--set", *TINY]) == 2
    assert "looks binary" in capsys.readouterr().err
