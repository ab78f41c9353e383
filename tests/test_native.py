"""Building and loading the native loops library; what happens when it cannot be built.

The loops themselves are tested against Keras's layers and the XLA loops in test_kernels.py.
"""

import keras
import numpy as np
import pytest
import tensorflow as tf

from tf_charrnn import kernels, native
from tf_charrnn.config import ModelConfig
from tf_charrnn.data import Vocab
from tf_charrnn.errors import UsageError
from tf_charrnn.models import build_model
from tf_charrnn.sample import Generator


def test_native_library_builds_where_there_is_a_compiler():
    """The native tests skip only where nothing could build them, never on a broken build."""
    if not native.enabled() or native.find_compiler() is None:
        pytest.skip("no C++ compiler (or TF_CHARRNN_NATIVE=0): the layers run their XLA loops")
    assert native.library() is not None
    assert kernels.choose_loops(tf.float32) == "native"


def test_a_cached_build_is_reused_not_rebuilt():
    if native.find_compiler() is None:
        pytest.skip("no C++ compiler")
    path = native.build()  # the library the session already built (or builds now)
    before = path.stat().st_mtime_ns
    assert native.build() == path and path.stat().st_mtime_ns == before


def test_a_failed_build_says_why_once_and_layers_still_run(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("CXX", "false")  # a "compiler" that fails every build
    monkeypatch.setenv("TF_CHARRNN_CACHE", str(tmp_path))
    with pytest.raises(native.BuildError, match="false failed"):
        native.build()
    native.library.cache_clear()
    try:
        assert native.library() is None and native.library() is None
        assert kernels.choose_loops(tf.float32) in ("xla", "plain")
        stock, fused = keras.layers.LSTM(8), kernels.FusedLSTM(8)
        for layer in (stock, fused):
            layer.build((2, 5, 4))
        fused.set_weights(stock.get_weights())
        x = tf.constant(np.random.default_rng(0).standard_normal((2, 5, 4)), tf.float32)
        np.testing.assert_allclose(fused(x).numpy(), stock(x).numpy(), rtol=1e-5, atol=1e-5)
    finally:
        native.library.cache_clear()
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "native RNN loops unavailable (" in lines[0], lines
    assert "false failed" in lines[0] and "TF_CHARRNN_NATIVE=0" in lines[0], lines
    assert list(tmp_path.iterdir()) == []  # no half-built library left behind


def test_switched_off_it_does_not_build(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TF_CHARRNN_NATIVE", "0")
    monkeypatch.setenv("TF_CHARRNN_CACHE", str(tmp_path))
    native.library.cache_clear()
    try:
        assert native.library() is None
        assert kernels.choose_loops(tf.float32) != "native"
        # The sampler falls back to its XLA loop.
        vocab = Vocab("ab \n")
        keras.utils.set_random_seed(0)
        model = build_model(ModelConfig(hidden_size=8, embedding_size=4, kernel="keras"), 4)
        generator = Generator(model, vocab)
        assert generator.loops == "xla"
        assert generator.generate("ab", 5, seed=1) == Generator(
            model, vocab, loops="xla").generate("ab", 5, seed=1)
        with pytest.raises(UsageError, match="the native loop is not available here"):
            Generator(model, vocab, loops="native")
    finally:
        native.library.cache_clear()
    assert capsys.readouterr().err == "" and list(tmp_path.iterdir()) == []
