"""The SavedModel export: in-graph Hangul, the generate function, a round trip without the
package installed."""

import dataclasses
import json
import os
import random
import subprocess
import sys

import keras
import pytest
import tensorflow as tf

from tf_charrnn.cli import run_cli
from tf_charrnn.config import Config, ModelConfig
from tf_charrnn.data import Vocab
from tf_charrnn.export import (ExportedGenerator, compose_hangul_codepoints,
                               decompose_hangul_codepoints, main)
from tf_charrnn.models import build_model
from tf_charrnn.runs import Run
from tf_charrnn.sample import Generator
from tf_charrnn.text import HANGUL_ESCAPE, compose_hangul, decompose_hangul

TINY = ModelConfig(cell="gru", num_layers=2, hidden_size=8, embedding_size=4, kernel="keras")
CHARS = "ab \ncde.!xyz"  # V = 12


def tiny_model(vocab, seed=0, kernel="keras"):
    keras.utils.set_random_seed(seed)
    return build_model(dataclasses.replace(TINY, kernel=kernel), len(vocab))


def make_run(path, vocab, model, config=None):
    run = Run(path)
    run.write_metadata(config or Config(model=TINY), vocab, corpus={"path": "x", "sha256": "0"})
    run.checkpoints.write(tf.train.Checkpoint(model=model), step=2)
    return run


def codes(text):
    return [ord(char) for char in text]


def test_in_graph_hangul_matches_text_module():
    spec = [tf.TensorSpec([None], tf.int32)]
    decompose = tf.function(decompose_hangul_codepoints, input_signature=spec)
    compose = tf.function(compose_hangul_codepoints, input_signature=spec)
    rng = random.Random(0)
    alphabet = ("한국어가각힣" + "\u1100\u1112\u1161\u1175\u11a8\u11c2\u11ff"
                + HANGUL_ESCAPE + "a \n")
    for _ in range(200):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 10)))
        jamo = decompose_hangul(text)
        assert decompose(codes(text)).numpy().tolist() == codes(jamo), repr(text)
        assert compose(codes(jamo)).numpy().tolist() == codes(compose_hangul(jamo)), repr(jamo)
        assert compose(codes(text)).numpy().tolist() == codes(compose_hangul(text)), repr(text)


def generate(module, prime, length, temperature=1.0, seed=0):
    return module.generate(tf.constant(prime), tf.constant(length), tf.constant(temperature),
                           tf.constant(seed, tf.int64)).numpy().decode("utf-8")


@pytest.mark.parametrize("jit_compile", [True, False], ids=["xla", "no-xla"])
def test_exported_generate_is_the_sampler_loop(jit_compile):
    vocab = Vocab(CHARS)
    model = tiny_model(vocab)
    module = ExportedGenerator(model, vocab, jit_compile=jit_compile, chunk_length=16)
    sampler = Generator(model, vocab, loops="xla" if jit_compile else "plain")
    assert generate(module, "ab c", 40, 0.8, 5) == sampler.generate("ab c", 40, temperature=0.8,
                                                                     seed=5)
    assert generate(module, "aQb", 10, seed=1) == sampler.generate("ab", 10, seed=1)  # Q dropped
    assert generate(module, "QQ", 3, seed=1) == sampler.generate(None, 3, seed=1)
    assert generate(module, "ab", 0) == "ab"
    with pytest.raises(tf.errors.InvalidArgumentError, match="temperature must be > 0"):
        generate(module, "ab", 5, temperature=0.0)
    with pytest.raises(tf.errors.InvalidArgumentError, match="length must be >= 0"):
        generate(module, "ab", -1)


def test_exported_jamo_run_takes_and_returns_syllables():
    vocab = Vocab.from_text(decompose_hangul("한국어 문장입니다. 대한민국 만세!"))
    model = tiny_model(vocab, seed=1)
    composed = ExportedGenerator(model, vocab, hangul_jamo=True, jit_compile=False)
    raw = ExportedGenerator(model, vocab, hangul_jamo=False, jit_compile=False)
    text = generate(composed, "대한", 50, seed=3)
    assert text == compose_hangul(generate(raw, decompose_hangul("대한"), 50, seed=3))
    assert text.startswith("대한")
    # 뷁's ᆰ and 꿳's ᄁ are not in the vocabulary: each syllable goes whole, as the sampler's
    # --unknown skip drops it, never a loose jamo of it into the prime.
    sampler = Generator(model, vocab, hangul_jamo=True, loops="plain", log=lambda *args: None)
    for prime, known in (("뷁대한", "대한"), ("대꿳한", "대한"), ("뷁", None)):
        assert generate(composed, prime, 30, seed=2) == sampler.generate(
            known, 30, seed=2), prime


def test_a_length_past_the_limit_is_refused_by_name():
    """Near int32's limit the chunk count wrapped to a negative number (a cryptic TensorArray
    error); the limit keeps far from it."""
    vocab = Vocab(CHARS)
    module = ExportedGenerator(tiny_model(vocab), vocab, jit_compile=False, chunk_length=16)
    for length in (2 ** 27 + 1, 2 ** 31 - 1):
        with pytest.raises(tf.errors.InvalidArgumentError, match="length must be at most "
                                                                 "134,217,728"):
            generate(module, "ab", length)


LOADER = """
import json, sys
sys.modules["tf_charrnn"] = None  # the package must not be needed, nor Keras
sys.modules["keras"] = None
try:
    import tf_charrnn
    sys.exit("tf_charrnn is importable")
except ImportError:
    pass
import tensorflow as tf
loaded = tf.saved_model.load(sys.argv[1])
def generate(prime, length, seed):
    return loaded.generate(tf.constant(prime), tf.constant(length), tf.constant(1.0),
                           tf.constant(seed, tf.int64)).numpy().decode("utf-8")
signature = loaded.signatures["generate"](prime=tf.constant("ab"), length=tf.constant(30),
                                          temperature=tf.constant(1.0),
                                          seed=tf.constant(4, tf.int64))
print(json.dumps({"first": generate("ab", 30, 4), "again": generate("ab", 30, 4),
                  "other": generate("ab", 30, 5),
                  "signature": signature["text"].numpy().decode("utf-8")}))
"""


# "fused": the layers this package runs on a CPU, whose native loops must stay out of the export.
@pytest.mark.parametrize("kernel", ["keras", "fused"])
def test_export_round_trip_without_the_package(tmp_path, capsys, kernel):
    vocab = Vocab(CHARS)
    model = tiny_model(vocab, kernel=kernel)
    make_run(tmp_path / "run", vocab, model, Config(model=dataclasses.replace(TINY, kernel=kernel)))
    out = tmp_path / "exported"
    assert run_cli(main, ["--run", str(tmp_path / "run"), "--out", str(out)]) == 0
    assert b"TfCharrnn" not in (out / "saved_model.pb").read_bytes()  # no native ops inside
    stdout, stderr = capsys.readouterr()
    assert f"exported {out}" in stdout and "ckpt-2 (step 2)" in stderr
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    result = subprocess.run([sys.executable, "-I", "-c", LOADER, str(out)], cwd=tmp_path,
                            env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    texts = json.loads(result.stdout.strip().splitlines()[-1])
    assert texts["first"].startswith("ab") and len(texts["first"]) == 32
    assert texts["again"] == texts["first"] == texts["signature"]
    assert texts["other"] != texts["first"]
    assert texts["first"] == Generator(model, vocab, loops="xla").generate("ab", 30, seed=4)


@pytest.mark.parametrize("argv, code, message", [
    (["--run", "TMP/run"], 2, "error: the following arguments are required: --out"),
    (["--run", "TMP/missing", "--out", "TMP/out"], 1, "error: run directory TMP/missing not found"),
    (["--run", "TMP/run", "--out", "TMP/run"], 1,
     "error: --out TMP/run already exists and is not empty: remove it or choose another"),
    (["--runs-dir", "TMP/nothing", "--out", "TMP/out"], 1, "error: no trained run found under"),
])
def test_export_errors_are_one_line(tmp_path, capsys, argv, code, message):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.yaml").write_text("{}")
    argv = [arg.replace("TMP", str(tmp_path)) for arg in argv]
    assert run_cli(main, argv) == code
    _, err = capsys.readouterr()
    assert err.strip().splitlines()[-1].startswith(message.replace("TMP", str(tmp_path)))
    assert sum(line.startswith("error:") for line in err.splitlines()) == 1
