"""Vocabulary and TextLoader: text -> ids -> batch-major (batch_size, seq_length) batches.

Shapes: N characters in a split, B = batch_size rows, T = seq_length, V = vocabulary size.

The corpus is cut into B rows laid side by side; batch i is columns [i*T, (i+1)*T) of every row, so
row r of batch i+1 continues row r of batch i and a hidden state can be carried between batches.
Targets are the inputs shifted by one inside the corpus; nothing wraps around to the start.
Preprocessing is vectorised with numpy and cached beside the input file, keyed by the input's
sha256 and the loader options, so a changed input or option rebuilds the cache.
"""

import hashlib
import json
import os
import re
from pathlib import Path

import numpy as np

from tf_charrnn.errors import CharRNNError
from tf_charrnn.files import sha256_file, temp_file_beside, write_atomic
from tf_charrnn.text import decode_bytes, decompose_hangul

CACHE_FORMAT = 1
_CHUNK_CHARS = 1 << 20  # characters per vectorised pass: bounds the scratch arrays to ~12 MB
_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


def _codepoints(text):
    """Code points of text: uint8 for ASCII (no UTF-32 copy), else uint32."""
    if text.isascii():
        return np.frombuffer(text.encode("ascii"), dtype=np.uint8)
    return np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)


def _chunks(text):
    for start in range(0, len(text), _CHUNK_CHARS):
        yield text[start:start + _CHUNK_CHARS]


def ids_dtype(vocab_size):
    """The smallest unsigned integer dtype that holds ids 0..vocab_size-1."""
    for dtype in (np.uint8, np.uint16, np.uint32):
        if vocab_size <= np.iinfo(dtype).max + 1:
            return np.dtype(dtype)
    raise ValueError(f"vocabulary of {vocab_size} characters is too large")


class Vocab:
    """Characters in id order: most frequent first, ties broken by code point."""

    def __init__(self, chars):
        self.chars = "".join(chars)
        if len(set(self.chars)) != len(self.chars):
            raise CharRNNError("vocabulary has duplicate characters: rebuild vocab.json")
        codepoints = _codepoints(self.chars).astype(np.int64)
        self._codepoints = codepoints
        # code point -> id, -1 where the character is not in the vocabulary
        self._table = np.full(int(codepoints.max(initial=0)) + 1, -1, dtype=np.int32)
        self._table[codepoints] = np.arange(len(codepoints), dtype=np.int32)
        self.dtype = ids_dtype(max(len(self.chars), 1))

    @classmethod
    def from_text(cls, text):
        counts = np.zeros(0x110000, dtype=np.int64)
        for chunk in _chunks(text):
            counts += np.bincount(_codepoints(chunk), minlength=0x110000)
        present = np.flatnonzero(counts)
        order = np.lexsort((present, -counts[present]))  # by count descending, then code point
        return cls("".join(map(chr, present[order])))

    def __len__(self):
        return len(self.chars)

    def __eq__(self, other):
        return isinstance(other, Vocab) and self.chars == other.chars

    def __repr__(self):
        return f"Vocab({len(self)} chars)"

    @property
    def most_frequent(self):
        return self.chars[0]

    def _lookup(self, codepoints):
        """ids of codepoints, -1 for those not in the vocabulary."""
        inside = codepoints < len(self._table)
        if inside.all():
            return self._table[codepoints]
        return np.where(inside, self._table[np.where(inside, codepoints, 0)], -1)

    def unknown_chars(self, text):
        """The characters of text that are not in the vocabulary, in first-seen order."""
        if not text:
            return []
        codepoints = _codepoints(text)
        unknown = codepoints[self._lookup(codepoints) < 0]
        return list(dict.fromkeys(chr(c) for c in unknown))

    def encode(self, text, out=None):
        """text -> ids [N] in self.dtype; raises CharRNNError on characters not in the vocab."""
        ids = np.empty(len(text), dtype=self.dtype) if out is None else out
        offset = 0
        for chunk in _chunks(text):
            chunk_ids = self._lookup(_codepoints(chunk))
            if chunk_ids.min(initial=0) < 0:
                missing = "".join(self.unknown_chars(chunk))
                raise CharRNNError(f"characters not in the vocabulary: {missing!r}; "
                                   f"remove them or train on a corpus that has them")
            ids[offset:offset + len(chunk)] = chunk_ids
            offset += len(chunk)
        return ids

    def decode(self, ids):
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        return self._codepoints[ids].astype("<u4").tobytes().decode("utf-32-le")

    def to_dict(self):
        return {"chars": self.chars}

    @classmethod
    def from_dict(cls, values):
        if not isinstance(values, dict) or not isinstance(values.get("chars"), str):
            raise CharRNNError("vocab.json has no 'chars' string: delete it to rebuild it")
        return cls(values["chars"])

    def save(self, path, **extra):
        write_atomic(Path(path), json.dumps({**self.to_dict(), **extra}, ensure_ascii=False,
                                             indent=1).encode("utf-8"))

    @classmethod
    def load(cls, path):
        try:
            values = json.loads(Path(path).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise CharRNNError(f"{path} not found: the run or cache is incomplete") from None
        except (OSError, ValueError) as error:
            raise CharRNNError(f"{path} is not readable JSON ({error}): restore or delete it") \
                from None
        return cls.from_dict(values)


def cache_paths(input_path):
    """Where the id cache of input_path lives: <name>.data.npy + <name>.vocab.json beside it
    (input.txt.data.npy for input.txt: not data.npy, which other char-rnn tools keep there)."""
    input_path = Path(input_path)
    return (input_path.with_name(input_path.name + ".data.npy"),
            input_path.with_name(input_path.name + ".vocab.json"))


def _corpus_file_errors(input_path, action):
    """Run action(input_path), turning the usual file mistakes into one-line CharRNNErrors."""
    try:
        return action(input_path)
    except FileNotFoundError:
        raise CharRNNError(f"corpus file {input_path} not found: check the path") from None
    except IsADirectoryError:
        raise CharRNNError(f"{input_path} is a directory: give a text file, or a directory "
                           f"holding input.txt") from None
    except OSError as error:
        raise CharRNNError(f"cannot read corpus file {input_path}: {error.strerror}") from None


def read_corpus_bytes(input_path):
    """The raw bytes of a corpus file; an empty file is an error."""
    raw = _corpus_file_errors(Path(input_path), Path.read_bytes)
    if not raw:
        raise CharRNNError(f"corpus file {input_path} is empty: give a file with text in it")
    return raw


def corpus_text(raw, encoding=None, hangul_jamo=False, name="input"):
    """Decode corpus bytes into the text the model trains on: (text, encoding used)."""
    text, used = decode_bytes(raw, encoding, name=name)
    # utf-7 and the *unicode_escape codecs can yield lone surrogates, which no text holds and
    # the vocabulary cannot encode; strict UTF-8/16/32 never do, and ASCII cannot.
    if not used.startswith("utf") or used == "utf-7":
        surrogate = None if text.isascii() else _LONE_SURROGATE.search(text)
        if surrogate:
            raise CharRNNError(f"{name} decoded as {used} holds a lone surrogate "
                               f"U+{ord(surrogate.group()):04X} at character {surrogate.start()}, "
                               f"which is not text: pass its real --encoding")
    if hangul_jamo:
        text = decompose_hangul(text)
    return text, used


class CorpusIds:
    """A corpus as ids: the vocabulary, the ids array (memory-mapped when cached), provenance."""

    def __init__(self, vocab, ids, encoding, sha256):
        self.vocab, self.ids, self.encoding, self.sha256 = vocab, ids, encoding, sha256

    @classmethod
    def load(cls, input_path, encoding=None, hangul_jamo=False, use_cache=True, log=print):
        """Ids of input_path from its cache when the cache matches, else built (and cached)."""
        input_path = Path(input_path)
        data_path, vocab_path = cache_paths(input_path)
        sha256 = _corpus_file_errors(input_path, sha256_file)
        key = {"format": CACHE_FORMAT, "input_sha256": sha256, "encoding": encoding,
               "hangul_jamo": bool(hangul_jamo)}
        if use_cache:
            cached = cls._load_cache(data_path, vocab_path, key, log)
            if cached is not None:
                return cached
        raw = read_corpus_bytes(input_path)
        sha256 = hashlib.sha256(raw).hexdigest()  # the bytes actually used, if the file changed
        key["input_sha256"] = sha256
        text, used = corpus_text(raw, encoding, hangul_jamo, name=str(input_path))
        del raw
        if used != "utf-8":
            log(f"decoded {input_path} as {used}")
        vocab = Vocab.from_text(text)
        ids = vocab.encode(text)
        del text
        if use_cache and cls._save_cache(data_path, vocab_path, key, vocab, ids, used, log):
            ids = np.load(data_path, mmap_mode="r", allow_pickle=False)  # pages, not a copy
        return cls(vocab, ids, used, sha256)

    @classmethod
    def _load_cache(cls, data_path, vocab_path, key, log):
        if not (data_path.is_file() and vocab_path.is_file()):
            return None
        try:
            meta = json.loads(vocab_path.read_text(encoding="utf-8"))
            if not isinstance(meta, dict):
                raise ValueError(f"{vocab_path.name} holds no JSON object")
            if meta.get("cache_key") != key:
                return None  # stale: other input bytes or other options
            vocab = Vocab.from_dict(meta)
            if sha256_file(data_path) != meta.get("data_sha256"):
                raise ValueError(f"{data_path.name} checksum mismatch")
            ids = np.load(data_path, mmap_mode="r", allow_pickle=False)
            if ids.ndim != 1 or ids.dtype != vocab.dtype or len(ids) != meta.get("num_chars"):
                raise ValueError(f"{data_path.name} shape or dtype mismatch")
            if len(ids) and int(ids.max()) >= len(vocab):  # vocab.json's chars cut short
                raise ValueError(f"{data_path.name} holds ids past the vocabulary's {len(vocab)}")
        except (OSError, ValueError, CharRNNError) as error:
            log(f"warning: ignoring corrupt cache {data_path} ({error}); rebuilding it")
            return None
        return cls(vocab, ids, meta.get("encoding", "utf-8"), key["input_sha256"])

    @staticmethod
    def _save_cache(data_path, vocab_path, key, vocab, ids, encoding, log):
        """Write data.npy then vocab.json (which vouches for it); False when not possible."""
        try:
            handle, tmp = temp_file_beside(data_path)
        except OSError as error:
            log(f"warning: cannot write the id cache beside the corpus ({error.strerror}); "
                f"continuing without it")
            return False
        try:
            with handle:
                np.save(handle, ids, allow_pickle=False)
            data_sha256 = sha256_file(tmp)
            vocab_path.unlink(missing_ok=True)  # a vocab.json never points at the wrong data.npy
            os.replace(tmp, data_path)
            vocab.save(vocab_path, cache_key=key, encoding=encoding, num_chars=len(ids),
                       data_sha256=data_sha256)
        except OSError as error:
            tmp.unlink(missing_ok=True)
            log(f"warning: could not write the id cache ({error}); continuing without it")
            return False
        return True


def split_ids(ids, val_fraction):
    """Contiguous train/validation split: the last val_fraction of the ids is held out."""
    num_val = int(round(len(ids) * val_fraction))
    return ids[:len(ids) - num_val], ids[len(ids) - num_val:]


class BatchRows:
    """One split laid out as B rows; batch i is x[:, i*T:(i+1)*T] with targets y."""

    def __init__(self, ids, batch_size, seq_length):
        self.batch_size, self.seq_length = batch_size, seq_length
        self.num_batches = (len(ids) - 1) // (batch_size * seq_length)
        used = self.num_batches * batch_size * seq_length
        self.x = ids[:used].reshape(batch_size, -1)       # [B, num_batches * T]
        self.y = ids[1:used + 1].reshape(batch_size, -1)  # [B, num_batches * T]

    def batch(self, index):
        columns = slice(index * self.seq_length, (index + 1) * self.seq_length)
        return self.x[:, columns], self.y[:, columns]  # [B, T], [B, T]

    def __iter__(self):
        for index in range(self.num_batches):
            yield self.batch(index)

    def stacked(self, start=0, count=None, dtype=None):
        """Batches start..start+count-1 (default: all) as arrays [count, B, T], a copy in dtype
        (default: the ids' own)."""
        count = self.num_batches - start if count is None else count
        columns = slice(start * self.seq_length, (start + count) * self.seq_length)
        shape = (self.batch_size, count, self.seq_length)
        return tuple(np.ascontiguousarray(rows[:, columns].reshape(shape).transpose(1, 0, 2),
                                          dtype) for rows in (self.x, self.y))


class TextLoader:
    """A corpus file -> vocabulary, train/validation ids and carried-state batches."""

    def __init__(self, input_path, batch_size, seq_length, val_fraction=0.05, encoding=None,
                 hangul_jamo=False, use_cache=True, log=print):
        self.input_path = Path(input_path)
        self.batch_size, self.seq_length = batch_size, seq_length
        corpus = CorpusIds.load(self.input_path, encoding, hangul_jamo, use_cache, log)
        self.vocab, self.ids, self.encoding, self.sha256 = (corpus.vocab, corpus.ids,
                                                            corpus.encoding, corpus.sha256)
        self.train_ids, self.val_ids = split_ids(self.ids, val_fraction)
        needed = batch_size * seq_length + 1
        if len(self.train_ids) < needed:
            raise CharRNNError(
                f"corpus {self.input_path} is too short: {len(self.train_ids)} training characters, "
                f"but batch_size x seq_length + 1 = {batch_size} x {seq_length} + 1 = {needed} "
                f"are needed for one batch; use a longer text or a smaller batch_size/seq_length")
        self.train = BatchRows(self.train_ids, batch_size, seq_length)
        self.val = self._validation_rows(val_fraction)
        self.pointer = 0

    def _validation_rows(self, val_fraction):
        if val_fraction == 0:
            return None
        rows = min(self.batch_size, (len(self.val_ids) - 1) // self.seq_length)
        if rows < 1:
            raise CharRNNError(
                f"validation split of {len(self.val_ids)} characters is shorter than one sequence "
                f"of seq_length + 1 = {self.seq_length + 1}; raise val_fraction or use a longer text")
        return BatchRows(self.val_ids, rows, self.seq_length)

    @classmethod
    def from_config(cls, data_config, input_path, log=print):
        return cls(input_path, data_config.batch_size, data_config.seq_length,
                   data_config.val_fraction, data_config.encoding, data_config.hangul_jamo,
                   log=log)

    @property
    def num_batches(self):
        return self.train.num_batches

    def next_batch(self):
        """The next training batch (x, y), each [B, T]; wraps to batch 0 after the last one."""
        if self.pointer >= self.num_batches:
            self.pointer = 0
        batch = self.train.batch(self.pointer)
        self.pointer += 1
        return batch

    def reset_batch_pointer(self):
        self.pointer = 0

    def dataset(self, split="train"):
        """A tf.data.Dataset of the same (x, y) batches, in order, as int32 [B, T]."""
        import tensorflow as tf

        rows = {"train": self.train, "val": self.val}[split]
        return tf.data.Dataset.from_tensor_slices(rows.stacked(dtype=np.int32))
