"""Vocabulary and TextLoader: determinism, batch layout invariants, split, cache, errors."""

import json

import numpy as np
import pytest
import tensorflow as tf

from tf_charrnn.data import BatchRows, TextLoader, Vocab, cache_paths, ids_dtype, split_ids
from tf_charrnn.errors import CharRNNError


def test_vocab_orders_by_descending_frequency_then_code_point():
    assert Vocab.from_text("cbbaaaxyz").chars == "abcxyz"
    assert Vocab.from_text("ba").chars == "ab"


def test_vocab_is_deterministic_and_round_trips_through_json(tmp_path):
    text = "hello, wörld! 안녕 \n\t" * 3
    first, second = Vocab.from_text(text), Vocab.from_text(text)
    assert first == second
    first.save(tmp_path / "vocab.json")
    assert Vocab.load(tmp_path / "vocab.json") == first
    assert json.loads((tmp_path / "vocab.json").read_text(encoding="utf-8"))["chars"] == first.chars


def test_encode_decode_round_trip_in_the_smallest_dtype():
    text = "the quick brown fox 🦊 jumps"
    vocab = Vocab.from_text(text)
    ids = vocab.encode(text)
    assert ids.dtype == np.uint8
    assert vocab.decode(ids) == text
    assert ids_dtype(256) == np.uint8 and ids_dtype(257) == np.uint16
    assert ids_dtype(70000) == np.uint32
    wide = "".join(chr(0x4E00 + i) for i in range(300))
    assert Vocab.from_text(wide).encode(wide).dtype == np.uint16


def test_unknown_characters_are_reported():
    vocab = Vocab.from_text("abc")
    assert vocab.unknown_chars("abxcy") == ["x", "y"]
    with pytest.raises(CharRNNError, match="characters not in the vocabulary: 'xy'"):
        vocab.encode("axy")


def positions(n):
    """Ids equal to their own position, to check where every character lands."""
    return np.arange(n, dtype=np.int64)


def test_targets_are_inputs_shifted_by_one_without_wrap_around():
    ids = positions(1003)
    rows = BatchRows(ids, batch_size=4, seq_length=10)
    assert rows.num_batches == 25
    for x, y in rows:
        np.testing.assert_array_equal(y[:, :-1], x[:, 1:])
        np.testing.assert_array_equal(y, x + 1)  # the next character in the corpus, always
    assert rows.y.max() == 4 * 25 * 10  # the last target is a real next char, not ids[0]


def test_row_continues_across_batches():
    rows = BatchRows(positions(2000), batch_size=5, seq_length=7)
    for index in range(rows.num_batches - 1):
        x_now, _ = rows.batch(index)
        x_next, _ = rows.batch(index + 1)
        np.testing.assert_array_equal(x_next[:, 0], x_now[:, -1] + 1)


def test_split_is_contiguous_and_disjoint():
    ids = positions(1000)
    train, val = split_ids(ids, 0.05)
    assert len(train) == 950 and len(val) == 50
    assert set(train).isdisjoint(val) and len(set(train) | set(val)) == 1000
    assert val[0] == 950  # the held-out block is the end of the corpus
    rows = BatchRows(train, batch_size=4, seq_length=10)
    assert rows.y.max() < 950  # no training target reaches into the validation block


def test_loader_batches_cover_the_corpus_in_order(tiny_corpus):
    loader = TextLoader(tiny_corpus, batch_size=4, seq_length=16, val_fraction=0.1)
    text = tiny_corpus.read_text(encoding="utf-8")
    assert loader.vocab.decode(loader.ids) == text
    x0, y0 = loader.next_batch()
    assert loader.vocab.decode(x0[0]) == text[:16]
    assert loader.vocab.decode(y0[0]) == text[1:17]
    for _ in range(loader.num_batches - 1):
        loader.next_batch()
    loader.reset_batch_pointer()
    np.testing.assert_array_equal(loader.next_batch()[0], x0)


def test_dataset_view_yields_the_same_batches(tiny_corpus):
    loader = TextLoader(tiny_corpus, batch_size=3, seq_length=9)
    batches = list(loader.dataset())
    assert len(batches) == loader.num_batches
    for index, (x, y) in enumerate(batches):
        expected_x, expected_y = loader.train.batch(index)
        assert x.dtype == tf.int32
        np.testing.assert_array_equal(x, expected_x)
        np.testing.assert_array_equal(y, expected_y)


def test_cache_is_written_and_reused_memory_mapped(tiny_corpus):
    TextLoader(tiny_corpus, batch_size=2, seq_length=5)
    data_path, vocab_path = cache_paths(tiny_corpus)
    assert data_path.name == f"{tiny_corpus.name}.data.npy"
    assert vocab_path.name == f"{tiny_corpus.name}.vocab.json"
    assert data_path.is_file() and vocab_path.is_file()
    loader = TextLoader(tiny_corpus, batch_size=2, seq_length=5)
    assert isinstance(loader.ids, np.memmap)


def test_cache_is_rebuilt_when_the_content_changes(tiny_corpus):
    first = TextLoader(tiny_corpus, batch_size=2, seq_length=5)
    text = tiny_corpus.read_text(encoding="utf-8")
    tiny_corpus.write_text(text.replace("e", "Q"), encoding="utf-8")  # same length, new content
    second = TextLoader(tiny_corpus, batch_size=2, seq_length=5)
    assert "Q" in second.vocab.chars and "Q" not in first.vocab.chars
    assert second.vocab.decode(second.ids) == text.replace("e", "Q")


def test_cache_is_rebuilt_when_an_option_changes(tmp_path):
    path = tmp_path / "input.txt"
    path.write_text("한국어 텍스트입니다. " * 50, encoding="utf-8")
    syllables = TextLoader(path, batch_size=2, seq_length=5)
    jamo = TextLoader(path, batch_size=2, seq_length=5, hangul_jamo=True)
    assert "한" in syllables.vocab.chars and "한" not in jamo.vocab.chars
    again = TextLoader(path, batch_size=2, seq_length=5)
    assert again.vocab == syllables.vocab


def test_corrupt_cache_is_detected_and_rebuilt(tiny_corpus):
    messages = []
    TextLoader(tiny_corpus, batch_size=2, seq_length=5)
    data_path, _ = cache_paths(tiny_corpus)
    raw = bytearray(data_path.read_bytes())
    raw[-10] ^= 0xFF  # flip bits inside the ids
    data_path.write_bytes(bytes(raw))
    loader = TextLoader(tiny_corpus, batch_size=2, seq_length=5, log=messages.append)
    assert any(f"corrupt cache {data_path} ({data_path.name} checksum mismatch)" in message
               for message in messages), messages
    assert loader.vocab.decode(loader.ids) == tiny_corpus.read_text(encoding="utf-8")


def test_euc_kr_corpus_loads_to_the_same_ids_as_utf8(tmp_path):
    text = "옛날 옛적에 호랑이가 살았습니다. 호랑이는 떡을 좋아했어요.\n" * 30
    (tmp_path / "u").mkdir()
    (tmp_path / "e").mkdir()
    (tmp_path / "u" / "input.txt").write_text(text, encoding="utf-8")
    (tmp_path / "e" / "input.txt").write_bytes(text.encode("euc-kr"))
    utf8 = TextLoader(tmp_path / "u" / "input.txt", batch_size=2, seq_length=5)
    euc_kr = TextLoader(tmp_path / "e" / "input.txt", batch_size=2, seq_length=5, log=print)
    assert euc_kr.encoding in ("cp949", "euc_kr")
    assert euc_kr.vocab == utf8.vocab
    np.testing.assert_array_equal(euc_kr.ids, utf8.ids)


def test_too_short_corpus_says_how_many_characters_are_needed(tmp_path):
    path = tmp_path / "input.txt"
    path.write_text("short text", encoding="utf-8")
    with pytest.raises(CharRNNError, match=r"batch_size x seq_length \+ 1 = 50 x 50 \+ 1 = 2501"):
        TextLoader(path, batch_size=50, seq_length=50)


def test_validation_split_too_short_for_one_sequence(tmp_path):
    path = tmp_path / "input.txt"
    path.write_text("abcdefghij" * 30, encoding="utf-8")
    with pytest.raises(CharRNNError, match="validation split of 3 characters"):
        TextLoader(path, batch_size=2, seq_length=10, val_fraction=0.01)


@pytest.mark.parametrize("content, message", [
    (b"", "is empty"),
    (b"abc\x00\x01\x02def" * 10, "binary"),
])
def test_bad_corpus_files_get_one_line_errors(tmp_path, content, message):
    path = tmp_path / "input.txt"
    path.write_bytes(content)
    with pytest.raises(CharRNNError, match=message) as error:
        TextLoader(path, batch_size=2, seq_length=5)
    assert "\n" not in str(error.value)


def test_missing_corpus_file(tmp_path):
    with pytest.raises(CharRNNError, match="not found"):
        TextLoader(tmp_path / "nope.txt", batch_size=2, seq_length=5)


def test_another_tools_cache_beside_input_txt_is_never_touched(tmp_path):
    """char-rnn tools keep data.npy (and vocab files) beside input.txt; ours has its own names."""
    corpus = tmp_path / "input.txt"
    corpus.write_text("hello world\n" * 50, encoding="utf-8")
    theirs = {tmp_path / "data.npy": b"their ids", tmp_path / "vocab.json": b'{"my": "vocab"}'}
    for path, content in theirs.items():
        path.write_bytes(content)
    TextLoader(corpus, batch_size=2, seq_length=5)
    assert all(path.read_bytes() == content for path, content in theirs.items())
    assert all(path.is_file() for path in cache_paths(corpus))


@pytest.mark.parametrize("content", ["null", '["a", "b"]', "3"])
def test_a_cache_vocab_that_is_no_json_object_is_rebuilt(tiny_corpus, content):
    TextLoader(tiny_corpus, batch_size=2, seq_length=5)
    _, vocab_path = cache_paths(tiny_corpus)
    vocab_path.write_text(content)
    messages = []
    loader = TextLoader(tiny_corpus, batch_size=2, seq_length=5, log=messages.append)
    assert any("holds no JSON object" in message for message in messages)
    assert loader.vocab.decode(loader.ids) == tiny_corpus.read_text(encoding="utf-8")


def test_a_cache_vocab_cut_short_is_rebuilt(tiny_corpus):
    """Its cache_key intact, its chars shortened: the ids would index past the vocabulary."""
    TextLoader(tiny_corpus, batch_size=2, seq_length=5)
    _, vocab_path = cache_paths(tiny_corpus)
    meta = json.loads(vocab_path.read_text(encoding="utf-8"))
    meta["chars"] = meta["chars"][:-5]
    vocab_path.write_text(json.dumps(meta), encoding="utf-8")
    messages = []
    loader = TextLoader(tiny_corpus, batch_size=2, seq_length=5, log=messages.append)
    assert any("holds ids past the vocabulary" in message for message in messages)
    assert loader.vocab.decode(loader.ids) == tiny_corpus.read_text(encoding="utf-8")


def test_files_written_atomically_are_readable_by_others(tmp_path):
    from tf_charrnn.files import temp_file_beside, write_atomic

    write_atomic(tmp_path / "a.json", b"{}")
    handle, temp = temp_file_beside(tmp_path / "b.npy")
    handle.close()
    assert (tmp_path / "a.json").stat().st_mode & 0o777 == 0o644
    assert temp.stat().st_mode & 0o777 == 0o644
