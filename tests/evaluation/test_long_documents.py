"""Long documents: the per-byte losses are the model's own (carried = one pass, reset = separate
windows, sliding = its windows), the buckets are a plain per-file mean, the file selection is
deterministic and held out, and the CLI writes its JSON."""

import argparse
import json
import math

import pytest
import torch
import torch.nn.functional as F

from mm_rec import MMRecConfig, MMRecModel
from mm_rec.baselines.transformer import TransformerModel
from mm_rec.cli.tasks import add_eval_task_arguments, run_eval_task
from mm_rec.data.cache import tokenize_in_memory
from mm_rec.data.corpus import resolve_source
from mm_rec.data.tokenizers import ByteTokenizer
from mm_rec.evaluation.long_documents import (
    bucket_stats,
    read_documents,
    score_long_documents,
    select_documents,
    sliding_nll,
    token_nll,
)
from mm_rec.training.checkpoint import RECIPE, TRAINER_STATE

CONFIG = dict(vocab_size=256, hidden_dim=32, num_layers=2, num_heads=2, ffn_dim=64, num_memories=2, mem_dim=8,
              memory_size_M=4, chunk_size=8, max_segment_len=1024)


def tiny_model(**overrides) -> MMRecModel:
    return MMRecModel(MMRecConfig(**{**CONFIG, **overrides})).double().eval()


def tiny_transformer(max_seq_len: int = 64) -> TransformerModel:
    config = MMRecConfig(vocab_size=256, hidden_dim=32, num_layers=2, num_heads=2, ffn_dim=64, max_seq_len=max_seq_len)
    return TransformerModel(config).double().eval()


def one_pass_nll(model, ids: torch.Tensor) -> torch.Tensor:
    """NLL [F, N-1] of one forward over the whole rows."""
    with torch.no_grad():
        logits = model(ids[:, :-1]).logits
    return F.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")


def random_ids(rows: int, n: int) -> torch.Tensor:
    return torch.randint(0, 256, (rows, n), generator=torch.Generator().manual_seed(3))


def test_carried_is_one_pass_and_a_long_reset_changes_nothing():
    model, ids = tiny_model(), random_ids(3, 150)
    expected = one_pass_nll(model, ids)
    carried = token_nll(model, ids, segment_len=37)  # segments that cut blocks and wrap the ring
    assert carried.dtype == torch.float64 and carried.shape == (3, 149)
    torch.testing.assert_close(carried, expected, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(token_nll(model, ids, segment_len=37, reset_every=149), carried, rtol=0, atol=0)
    # other rows per forward: other matmul shapes, so equal up to float64 rounding
    torch.testing.assert_close(token_nll(model, ids, segment_len=37, reset_every=1000, rows_per_forward=2),
                               carried, rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("segment_len,reset_every", [(16, 48), (50, 48), (7, 20)])
def test_reset_is_independent_windows(segment_len, reset_every):
    model, ids = tiny_model(), random_ids(2, 130)
    got = token_nll(model, ids, segment_len, reset_every, rows_per_forward=1)
    inputs, targets = ids[:, :-1], ids[:, 1:]
    for start in range(0, 129, reset_every):
        window = slice(start, start + reset_every)
        with torch.no_grad():
            logits = model(inputs[:, window]).logits  # a fresh state
        expected = F.cross_entropy(logits.transpose(1, 2), targets[:, window], reduction="none")
        torch.testing.assert_close(got[:, window], expected, rtol=1e-10, atol=1e-10)
    assert not torch.allclose(got, token_nll(model, ids, segment_len))  # the carried state does matter


def test_transformer_blocked_and_sliding_windows():
    model, ids = tiny_transformer(max_seq_len=32), random_ids(2, 101)
    with pytest.raises(ValueError, match="keeps no state"):
        token_nll(model, ids)
    blocked = token_nll(model, ids, segment_len=7, reset_every=32)  # segment_len does not apply
    for start in range(0, 100, 32):
        expected = one_pass_nll(model, ids[:, start:start + 33])
        torch.testing.assert_close(blocked[:, start:start + 32], expected, rtol=1e-10, atol=1e-10)
    window = 32
    sliding = sliding_nll(model, ids, window, rows_per_forward=1)
    torch.testing.assert_close(sliding[:, :window], one_pass_nll(model, ids[:, :window + 1]))
    for p in range(window, 100):  # every later byte: in the window that ends at its hop's end
        end = window + (p - window) // (window // 2) * (window // 2) + window // 2
        start = end - window  # the last window is cut at the end, not moved back
        expected = one_pass_nll(model, ids[:, start:min(end, 100) + 1])[:, p - start]
        torch.testing.assert_close(sliding[:, p], expected, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(sliding_nll(model, ids, 200), one_pass_nll(model, ids))


def test_buckets_by_hand():
    """Bucket means and standard errors against plain loops over a softmax written out."""
    model, ids = tiny_model(), random_ids(3, 70)
    with torch.no_grad():
        logits = model(ids[:, :-1]).logits
    by_hand = [[0.0] * 70 for _ in range(3)]  # by_hand[f][p]: NLL of byte p of file f
    for f in range(3):
        for p in range(1, 70):
            row = logits[f, p - 1].tolist()
            top = max(row)
            log_z = top + math.log(sum(math.exp(v - top) for v in row))
            by_hand[f][p] = log_z - row[ids[f, p]]
    edges = [0, 16, 40, 100]
    report = score_long_documents(model, ids, segment_len=16, reset_every=16, edges=edges)
    buckets = report["modes"]["carried"]
    assert [b["range"] for b in buckets] == ["0-16", "16-40", "40-70"]
    for bucket, lo, hi in zip(buckets, [1, 16, 40], [16, 40, 70]):
        per_file = [sum(by_hand[f][lo:hi]) / (hi - lo) for f in range(3)]
        mean = sum(per_file) / 3
        se = math.sqrt(sum((v - mean) ** 2 for v in per_file) / 2 / 3)
        assert bucket["tokens"] == hi - lo and (bucket["lo"], bucket["hi"]) == (edges[buckets.index(bucket)], hi)
        assert bucket["per_file"] == pytest.approx(per_file, abs=1e-9)
        assert bucket["mean"] == pytest.approx(mean, abs=1e-9) and bucket["se"] == pytest.approx(se, abs=1e-9)
    difference = report["differences"]["reset - carried"]
    for d, r, c in zip(difference, report["modes"]["reset"], buckets):
        assert d["per_file"] == pytest.approx([a - b for a, b in zip(r["per_file"], c["per_file"])], abs=1e-9)
    assert difference[0]["mean"] == pytest.approx(0.0, abs=1e-12)  # the first window is the same in both


def test_bucket_edges_are_checked():
    nll = torch.ones(1, 9)
    with pytest.raises(ValueError, match="edges"):
        bucket_stats(nll, [2, 8])
    with pytest.raises(ValueError, match="edges"):
        bucket_stats(nll, [0, 8, 8])
    (only,) = bucket_stats(nll, [0, 4, 8, 16])[2:]
    assert only["range"] == "8-10" and only["tokens"] == 2 and only["se"] is None


def test_selection_is_deterministic_held_out_and_sized(tmp_path):
    sizes = {"b.py": 700, "a.py": 300, "sub/c.py": 1200, "d.py": 0, "e.py": 1000, "f.py": 900}
    for name, size in sizes.items():
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_bytes(bytes(range(65, 91)) * (size // 26) + b"x" * (size % 26))
    source = resolve_source(str(tmp_path))
    selection = select_documents(800, source=source)
    assert [d.name for d in selection.documents] == ["e.py", "f.py", "sub/c.py"]  # sorted paths, >= 800 bytes
    assert select_documents(800, source=source) == selection
    data = tokenize_in_memory(source, ByteTokenizer())
    assert selection.digest == data.digest and selection.split is None
    for doc in selection.documents:
        assert data.window(doc.start, doc.start + doc.size).tolist() == list(doc.path.read_bytes())
    # the trainer's validation split (the last 40% of 4100 bytes) starts inside f.py: only sub/c.py is held out
    held_out = select_documents(800, val_fraction=0.4, source=source)
    assert held_out.split == data.split_point(0.4) == 2460
    assert [d.name for d in held_out.documents] == ["sub/c.py"]
    assert read_documents(held_out.documents, 1000).shape == (1, 1000)
    with pytest.raises(ValueError, match="shorter"):
        read_documents(selection.documents, 1100)


def test_embedded_corpus_selection():
    selection = select_documents(32768)
    assert selection.documents and all(d.size >= 32768 for d in selection.documents)
    names = [d.name for d in selection.documents]
    assert names == sorted(names)  # the corpus order: sorted relative paths
    held_out = select_documents(32768, val_fraction=0.15)
    assert set(d.name for d in held_out.documents) < set(names)
    assert all(d.start >= held_out.split for d in held_out.documents)


def _cli(tmp_path, *extra: str) -> dict:
    parser = argparse.ArgumentParser()
    add_eval_task_arguments(parser)
    args = parser.parse_args(["--task", "longdoc", "--checkpoint", str(tmp_path / "model"), "--max-bytes", "600",
                              "--segment-len", "128", "--reset-every", "256", "--files", "2", "--edges", "0,256,1k",
                              "--out", str(tmp_path / "eval"), *extra])
    assert run_eval_task(args) == 0
    return json.loads((tmp_path / "eval" / "longdoc_results.json").read_text())


def test_cli_writes_the_results(tmp_path, capsys):
    MMRecModel(MMRecConfig(**CONFIG)).save_pretrained(tmp_path / "model")
    report = _cli(tmp_path)
    assert report["task"] == "longdoc" and report["held_out"]["val_fraction"] is None
    assert len(report["files"]) == 2 and all(f["bytes"] >= 600 for f in report["files"])
    assert set(report["modes"]) == {"carried", "reset"} and "reset - carried" in report["differences"]
    assert [b["range"] for b in report["modes"]["carried"]] == ["0-256", "256-600"]
    out = capsys.readouterr().out
    assert "0-256" in out and "carried" in out and "not checked" in out

    # a run folder's checkpoint: its recipe's validation split, its corpus digest checked
    (tmp_path / "model" / RECIPE).write_text(json.dumps({"data": {"path": None, "val_fraction": 0.15}}))
    torch.save({"step": 7, "data_digest": select_documents(600).digest}, tmp_path / "model" / TRAINER_STATE)
    report = _cli(tmp_path)
    held_out = select_documents(600, val_fraction=0.15)
    assert [f["name"] for f in report["files"]] == [d.name for d in held_out.documents[:2]]
    assert report["held_out"]["val_fraction"] == 0.15 and report["held_out"]["digest_checked"] and report["step"] == 7
    torch.save({"step": 7, "data_digest": "0123456789abcdef"}, tmp_path / "model" / TRAINER_STATE)
    with pytest.raises(ValueError, match="not the one"):
        _cli(tmp_path)


def test_cli_transformer(tmp_path, capsys):
    config = MMRecConfig(vocab_size=256, hidden_dim=32, num_layers=1, num_heads=2, ffn_dim=64, max_seq_len=256)
    TransformerModel(config).save_pretrained(tmp_path / "model")
    report = _cli(tmp_path)
    assert set(report["modes"]) == {"reset", "sliding"} and report["notes"]
    assert "impossible" in capsys.readouterr().out
