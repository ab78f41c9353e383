"""Shared fixtures: tiny corpora, the shared tiny-shakespeare copy, float64 Keras."""

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


@pytest.fixture
def float64():
    """Build Keras layers in float64 for the duration of a test."""
    previous = keras.config.floatx()
    keras.config.set_floatx("float64")
    yield
    keras.config.set_floatx(previous)
