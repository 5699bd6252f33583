"""Data: sources, tokenizers, the token cache and both batching modes."""

import array

import pytest
import torch

from mm_rec.data.batching import IGNORE_INDEX, ROW_STATE_KEYS, ContiguousStreams, RandomWindows, regroup_rows
from mm_rec.data.cache import TokenData, load_bin, prepare_tokens, tokenize_in_memory
from mm_rec.data.corpus import resolve_source, stdlib_files
from mm_rec.data.tokenizers import BPETokenizer, ByteTokenizer, load_tokenizer


def make_data(docs: list[list[int]]) -> TokenData:
    starts, flat = [], []
    for d in docs:
        starts.append(len(flat))
        flat.extend(d)
    return TokenData(torch.tensor(flat), torch.tensor(starts), max(flat), "test", "test")


def test_embedded_corpus_is_deterministic_and_python():
    files = stdlib_files()
    assert len(files) > 100 and files == stdlib_files()
    assert all(f.suffix == ".py" and "site-packages" not in f.parts for f in files)
    assert resolve_source(None).kind == "stdlib"


def test_sources(text_file, text_folder, tmp_path):
    assert resolve_source(str(text_file)).kind == "file"
    folder = resolve_source(str(text_folder))
    assert [f.name for f in folder.files] == ["a.txt", "c.txt", "b.txt"]  # sorted paths, hidden files skipped
    with pytest.raises(FileNotFoundError, match="data not found"):
        resolve_source(str(tmp_path / "missing.txt"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no text files"):
        resolve_source(str(tmp_path / "empty"))
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(ValueError, match="no text"):
        prepare_tokens(resolve_source(str(empty)), ByteTokenizer(), tmp_path / "cache", log=lambda *_: None)


def test_byte_tokenizer_streams_split_characters():
    tok = ByteTokenizer()
    text = "héllo → wörld"
    ids = tok.encode(text.encode())
    assert tok.decode(ids) == text and len(ids) == len(text.encode())
    decoder = tok.stream_decoder()
    assert "".join(decoder.push(i) for i in ids) + decoder.flush() == text


def test_token_cache_is_built_once(text_folder, tmp_path):
    messages = []
    source = resolve_source(str(text_folder))
    data = prepare_tokens(source, ByteTokenizer(), tmp_path / "cache", log=messages.append)
    again = prepare_tokens(source, ByteTokenizer(), tmp_path / "cache", log=messages.append)
    assert len(messages) == 1 and again.digest == data.digest
    assert data.tokens.dtype == torch.uint8 and data.doc_starts.tolist()[0] == 0
    expected = b"".join(f.read_bytes() for f in source.files)
    assert bytes(data.window(0, len(data)).tolist()) == expected
    assert data.doc_starts.tolist() == [0, len(source.files[0].read_bytes()), len(source.files[0].read_bytes()) + 1]
    in_memory = tokenize_in_memory(source, ByteTokenizer())
    assert torch.equal(in_memory.tokens, data.window(0, len(data)))


def test_document_separator(tmp_path):
    path = tmp_path / "stories.txt"
    path.write_text("one<|endoftext|>two two<|endoftext|>three")
    data = tokenize_in_memory(resolve_source(str(path)), ByteTokenizer(), separator="<|endoftext|>")
    assert bytes(data.tokens.tolist()) == b"onetwo twothree" and data.doc_starts.tolist() == [0, 3, 10]


def test_bin_files(tmp_path):
    path = tmp_path / "tokens.bin"
    path.write_bytes(array.array("H", [1, 2, 300, 4]).tobytes())
    data = load_bin(path, "uint16")
    assert data.window(0, 4).tolist() == [1, 2, 300, 4] and data.max_id == 300
    with pytest.raises(ValueError, match="token id 300, outside the model's vocabulary"):
        data.check_vocab(256)
    (tmp_path / "odd.bin").write_bytes(b"abc")
    with pytest.raises(ValueError, match="whole number"):
        load_bin(tmp_path / "odd.bin", "uint16")


def test_random_windows_resume_exactly():
    data = make_data([list(range(1, 200))])
    a = RandomWindows(data, 0, 150, batch_size=3, seq_len=8, seed=0)
    first = a.next_batch()
    assert torch.equal(first.labels[:, :-1], first.input_ids[:, 1:]) and first.input_ids.max() < 150
    saved = a.state_dict()
    b = RandomWindows(data, 0, 150, batch_size=3, seq_len=8, seed=123)
    b.load_state_dict(saved)
    assert torch.equal(a.next_batch().input_ids, b.next_batch().input_ids)


def test_random_windows_split_one_global_batch_over_processes():
    """N processes of batch_size B read the rows that one process of batch_size N * B reads."""
    data = make_data([list(range(1, 200))])
    whole = RandomWindows(data, 0, 150, batch_size=4, seq_len=8, seed=5)
    halves = [RandomWindows(data, 0, 150, batch_size=2, seq_len=8, seed=5, rows=4, first_row=2 * k) for k in range(2)]
    for _ in range(3):
        batch = whole.next_batch()
        assert torch.equal(batch.input_ids, torch.cat([h.next_batch().input_ids for h in halves]))


def test_stream_positions_regroup_for_another_number_of_processes():
    """The positions of 2 processes regrouped for 1 are the position of one process with both
    halves' rows, and the other way round; either continues with the same batches."""
    data = make_data([[1] * 37, [2] * 50, [3] * 9, list(range(4, 120))])
    whole = ContiguousStreams(data, 0, len(data), batch_size=4, seq_len=6, seed=1)
    halves = [ContiguousStreams(data, 0, len(data), batch_size=2, seq_len=6, rows=4, first_row=2 * k, seed=1)
              for k in range(2)]
    for _ in range(9):
        whole.next_batch()
        for h in halves:
            h.next_batch()
    joined = {key: regroup_rows([h.state_dict()[key] for h in halves], 0, 1) for key in ROW_STATE_KEYS}
    assert all(torch.equal(joined[key], value) for key, value in whole.state_dict().items())
    cut = [{key: regroup_rows([value], k, 2) for key, value in whole.state_dict().items()} for k in range(2)]
    for k, h in enumerate(halves):
        assert all(torch.equal(cut[k][key], value) for key, value in h.state_dict().items())
    resumed = ContiguousStreams(data, 0, len(data), batch_size=4, seq_len=6, seed=1)
    resumed.load_state_dict(joined)
    for _ in range(5):
        batch = resumed.next_batch()
        assert torch.equal(batch.input_ids, torch.cat([h.next_batch().input_ids for h in halves]))
        assert torch.equal(batch.input_ids, whole.next_batch().input_ids)
    with pytest.raises(ValueError, match="cannot be shared equally by 3 processes"):
        regroup_rows([torch.zeros(2), torch.zeros(2)], 0, 3)


def test_contiguous_streams_cover_each_row_and_respect_documents():
    docs = [[1] * 10, [2] * 3, [3], [4] * 20]  # a one-token document has no target and is skipped
    data = make_data(docs)
    streams = ContiguousStreams(data, 0, len(data), batch_size=2, seq_len=4)
    pairs: list[list[tuple[int, int]]] = [[], []]
    resets = []
    for _ in range(7):
        batch = streams.next_batch()
        resets.append(batch.reset.tolist())
        for r in range(2):
            for x, y in zip(batch.input_ids[r].tolist(), batch.labels[r].tolist()):
                if y != IGNORE_INDEX:
                    assert x == y, "a target never comes from another document"
                    pairs[r].append((x, y))
    assert resets[0] == [True, True]
    # row 0 reads tokens [0, 17) in windows of 4: document 1 (10 tokens, 9 targets) in batches 0-2,
    # document 2 (3 tokens, 2 targets) in batch 3, the single-token document 3 is skipped, the first
    # 3 tokens of document 4 (2 targets) in batch 4; batch 5 starts the stretch over
    assert pairs[0][:15] == [(1, 1)] * 9 + [(2, 2)] * 2 + [(4, 4)] * 2 + [(1, 1)] * 2
    assert [r[0] for r in resets[:7]] == [True, False, False, True, True, True, False]
    assert [r[1] for r in resets[:7]] == [True, False, False, False, True, False, False]  # [17, 34): in doc 4


def test_contiguous_streams_resume_exactly():
    data = make_data([list(range(i * 50, i * 50 + 40)) for i in range(6)])
    a = ContiguousStreams(data, 0, len(data), batch_size=3, seq_len=7)
    for _ in range(5):
        a.next_batch()
    b = ContiguousStreams(data, 0, len(data), batch_size=3, seq_len=7)
    b.load_state_dict(a.state_dict())
    for _ in range(10):
        x, y = a.next_batch(), b.next_batch()
        assert torch.equal(x.input_ids, y.input_ids) and torch.equal(x.reset, y.reset)
    with pytest.raises(ValueError, match="another data split or batch size"):
        ContiguousStreams(data, 0, len(data), batch_size=2, seq_len=7).load_state_dict(a.state_dict())


def test_contiguous_streams_restart_at_random_phases_independent_of_the_process_split():
    """Later passes over a stretch start at a seeded phase in [0, seq_len), so epochs are not cut
    into the same windows; the phases depend on the global row, not on how rows are split."""
    data = make_data([list(range(1, 401))])
    T, passes = 8, 12
    whole = ContiguousStreams(data, 0, len(data), batch_size=4, seq_len=T, seed=3)
    halves = [ContiguousStreams(data, 0, len(data), batch_size=2, seq_len=T, rows=4, first_row=2 * k, seed=3)
              for k in range(2)]
    starts: list[set[int]] = [set() for _ in range(4)]
    for _ in range(passes * (100 // T + 1)):
        batch = whole.next_batch()
        split = [h.next_batch() for h in halves]
        assert torch.equal(batch.input_ids, torch.cat([b.input_ids for b in split]))
        for r in range(4):
            if batch.reset[r]:
                starts[r].add((int(batch.input_ids[r, 0]) - 1) % 100)
    for r in range(4):
        assert all(0 <= s < T for s in starts[r]), "a pass starts within the first window of its stretch"
        assert len(starts[r]) >= 3, f"row {r} restarted at phases {starts[r]} only"
    other = ContiguousStreams(data, 0, len(data), batch_size=4, seq_len=T, seed=4)
    assert any(not torch.equal(whole.next_batch().input_ids, other.next_batch().input_ids)
               for _ in range(passes * (100 // T + 1))), "the phases follow the seed"


def test_too_little_data_is_refused():
    data = make_data([list(range(1, 20))])
    with pytest.raises(ValueError, match="seq_len"):
        RandomWindows(data, 0, 19, batch_size=2, seq_len=32, seed=0)
    with pytest.raises(ValueError, match="need"):
        ContiguousStreams(data, 0, 19, batch_size=4, seq_len=8)


def test_bpe_tokenizer(tmp_path, text_file):
    pytest.importorskip("tokenizers")
    text = text_file.read_text()
    tok = BPETokenizer.train(iter([text]), vocab_size=400)
    assert 256 < tok.vocab_size <= 400
    ids = tok.encode(text.encode())
    assert tok.decode(ids) == text
    assert sum(tok.token_bytes()[i] for i in ids) == len(text.encode())  # bits per byte counts exact bytes
    decoder = tok.stream_decoder()
    assert "".join(decoder.push(i) for i in ids) + decoder.flush() == text
    tok.save(tmp_path)
    assert load_tokenizer(tmp_path).encode(b"def f(x):") == tok.encode(b"def f(x):")
