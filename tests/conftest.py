"""Shared fixtures: tiny corpora, the shared tiny-shakespeare copy, float64 Keras."""

import contextlib
import os
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import pytest  # noqa: E402

SHARED_SHAKESPEARE = Path(__file__).resolve().parents[2] / "shared/data/tinyshakespeare/input.txt"

TINY_TEXT = (
    "First Citizen:\nBefore we proceed any further, hear me speak.\n\n"
    "All:\nSpeak, speak.\n\nFirst Citizen:\nYou are all resolved rather to die than to famish?\n"
) * 40


class StopAfter:
    """A stop flag that turns on after it has been asked `calls` times (like a Ctrl-C)."""

    signal_name = "SIGINT"

    def __init__(self, calls):
        self.calls = calls

    def __bool__(self):
        self.calls -= 1
        return self.calls < 0


@pytest.fixture
def shakespeare_path():
    """The shared tiny-shakespeare file; the test is skipped when it is not there."""
    if not SHARED_SHAKESPEARE.is_file():
        pytest.skip("../shared/data/tinyshakespeare/input.txt is not present")
    return SHARED_SHAKESPEARE


@pytest.fixture
def tiny_corpus(tmp_path):
    """A few kilobytes of text in its own directory (so caches land in tmp_path)."""
    path = tmp_path / "corpus" / "input.txt"
    path.parent.mkdir()
    path.write_text(TINY_TEXT, encoding="utf-8")
    return path


@contextlib.contextmanager
def keras_dtype(dtype):
    """Build Keras layers in dtype inside the block. Keras 3 freezes its global dtype policy the
    first time a layer is built, so the policy is set along with floatx."""
    previous_floatx, previous_policy = keras.config.floatx(), keras.config.dtype_policy()
    keras.config.set_floatx(dtype)
    keras.config.set_dtype_policy(dtype)
    try:
        yield
    finally:
        keras.config.set_floatx(previous_floatx)
        keras.config.set_dtype_policy(previous_policy)


@pytest.fixture
def float64():
    """Build Keras layers in float64 for the duration of a test."""
    with keras_dtype("float64"):
        yield
