"""The sampler: the draw on fake logits, the compiled loop, streaming, stop, Hangul, the CLI."""

import os
import random
import re
import tracemalloc

import keras
import numpy as np
import pytest
import tensorflow as tf

import numpy_reference
from tf_charrnn import native
from tf_charrnn.cli import run_cli
from tf_charrnn.config import Config, DataConfig, ModelConfig
from tf_charrnn.data import Vocab
from tf_charrnn.errors import CharRNNError, UsageError
from tf_charrnn.models import build_model
from tf_charrnn.runs import Run
from tf_charrnn.sample import (Generator, JamoComposer, default_prime, draw, filter_logits,
                               main, make_chunk_function, model_step, parse_escapes,
                               sample_divider)
from tf_charrnn.text import HANGUL_ESCAPE, compose_hangul, decompose_hangul

CHARS = "ab \ncde.!"  # V = 9
TINY = ModelConfig(cell="lstm", num_layers=2, hidden_size=8, embedding_size=4, kernel="keras")
KOREAN = "한국어 문장입니다. 대한민국 만세! 강아지가 뛰어갑니다."


def tiny_model(vocab, model_config=TINY, seed=0):
    keras.utils.set_random_seed(seed)
    return build_model(model_config, len(vocab))


def make_run(path, vocab, model, config=None, step=1):
    config = config or Config(model=TINY)
    run = Run(path)
    run.write_metadata(config, vocab, corpus={"path": "x", "sha256": "0"})
    if model is not None:
        run.checkpoints.write(tf.train.Checkpoint(model=model), step=step)
    return run


@pytest.fixture(scope="module")
def vocab():
    return Vocab(CHARS)


@pytest.fixture(scope="module")
def model(vocab):
    return tiny_model(vocab)


def native_loop_or_skip():
    if native.library() is None:
        pytest.skip("the native library is not built here (no C++ compiler)")


@pytest.fixture(scope="module", params=["native", "xla"])
def loops(request):
    if request.param == "native":
        native_loop_or_skip()
    return request.param


@pytest.fixture(scope="module")
def generator(model, vocab, loops):
    return Generator(model, vocab, chunk_length=16, loops=loops)


# --- the draw on fake logits -----------------------------------------------------------------

PROBS = np.log(np.array([[0.1, 0.4, 0.2, 0.3]], np.float32))


def kept(filtered):
    return set(np.flatnonzero(np.isfinite(np.asarray(filtered)[0])))


def test_temperature_divides_logits_shifted_to_max_zero():
    logits = np.array([[1.0, 2.0, 4.0]], np.float32)
    filtered = filter_logits(logits, temperature=0.5).numpy()
    np.testing.assert_array_equal(filtered, [[-6.0, -4.0, 0.0]])


def test_top_k_keeps_the_k_largest():
    logits = np.array([[0.1, 3.0, 2.0, -1.0, 5.0]], np.float32)
    filtered = filter_logits(logits, top_k=2).numpy()
    np.testing.assert_array_equal(filtered, [[-np.inf, -2.0, -np.inf, -np.inf, 0.0]])
    assert kept(filter_logits(logits, top_k=50)) == {0, 1, 2, 3, 4}


def test_top_p_keeps_the_smallest_set_reaching_p():
    assert kept(filter_logits(PROBS, top_p=0.5)) == {1, 3}       # 0.4 < 0.5 <= 0.4 + 0.3
    assert kept(filter_logits(PROBS, top_p=0.75)) == {1, 2, 3}   # 0.7 < 0.75
    assert kept(filter_logits(PROBS, top_p=1e-6)) == {1}         # only the max
    assert kept(filter_logits(PROBS, top_p=1.0)) == {0, 1, 2, 3}


def test_top_p_renormalises_after_top_k():
    # After top_k=2 the two left are 4/7 and 3/7, so 4/7 alone reaches 0.5.
    assert kept(filter_logits(PROBS, top_k=2, top_p=0.5)) == {1}


def test_filter_works_per_row():
    logits = np.array([[0.0, 5.0, 1.0], [9.0, 0.0, 8.0]], np.float32)
    filtered = filter_logits(logits, top_k=1).numpy()
    assert np.isfinite(filtered).tolist() == [[False, True, False], [True, False, False]]


def test_top_p_draws_follow_the_renormalised_distribution():
    rows = 20000
    logits = filter_logits(np.repeat(PROBS, rows, axis=0), top_p=0.5)
    ids = draw(logits, [7, 0]).numpy()
    frequencies = np.bincount(ids, minlength=4) / rows
    np.testing.assert_allclose(frequencies, [0, 4 / 7, 0, 3 / 7], atol=0.02)


def test_top_k_one_and_tiny_temperature_draw_the_argmax():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(64, 9)).astype(np.float32)
    expected = logits.argmax(axis=1)
    for seed in range(3):
        np.testing.assert_array_equal(draw(filter_logits(logits, top_k=1), [seed, 0]), expected)
        np.testing.assert_array_equal(
            draw(filter_logits(logits, temperature=1e-4), [seed, 0]), expected)
    np.testing.assert_array_equal(draw(logits, [0, 0], argmax=True), expected)


def test_draw_is_a_function_of_the_seed():
    logits = np.zeros((256, 9), np.float32)
    first = draw(logits, [1, 5]).numpy()
    np.testing.assert_array_equal(draw(logits, [1, 5]), first)
    assert (draw(logits, [1, 6]).numpy() != first).any()
    assert (draw(logits, [2, 5]).numpy() != first).any()


# --- the model, one character at a time ------------------------------------------------------

@pytest.mark.parametrize("model_config", [
    TINY,
    ModelConfig(cell="gru", num_layers=2, hidden_size=8, embedding_size=4, kernel="keras"),
    ModelConfig(cell="rnn", num_layers=1, hidden_size=8, one_hot=True, embedding_size=0,
                kernel="keras"),
], ids=["lstm", "gru", "rnn-one-hot"])
def test_priming_in_one_pass_equals_feeding_one_char_at_a_time(vocab, model_config):
    model = tiny_model(vocab, model_config)
    generator = Generator(model, vocab)
    prime = np.array([vocab.encode("ab cd.e"), vocab.encode("!!a\nb c")], np.int32)  # [2, 7]
    last, states = generator.prime_states(prime)
    np.testing.assert_array_equal(last, prime[:, -1])

    step_states = layer_states = model.zero_states(2)
    for t in range(prime.shape[1] - 1):
        step_logits, step_states = model_step(model, prime[:, t], step_states)
        layer_logits, layer_states = model(prime[:, t:t + 1], layer_states)
        np.testing.assert_allclose(step_logits, layer_logits[:, 0], rtol=1e-5, atol=1e-6)
    for one_pass, stepped, layered in zip(states, step_states, layer_states):
        np.testing.assert_allclose(one_pass, stepped, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(one_pass, layered, rtol=1e-5, atol=1e-6)


def test_vocab_that_does_not_fit_the_model_is_an_error(model):
    with pytest.raises(CharRNNError, match="vocabulary has 3 characters but the model expects 9"):
        Generator(model, Vocab("abc"))


# --- generation ------------------------------------------------------------------------------

def test_same_seed_same_text_and_other_seeds_differ(generator):
    text = generator.generate("ab", 60, seed=3)
    assert generator.generate("ab", 60, seed=3) == text
    assert generator.generate("ab", 60, seed=4) != text
    assert generator.generate("ab", 60, seed=3 + 2 ** 31) == text  # seeds are taken mod 2**31


def test_text_is_prime_plus_length_characters(generator, vocab):
    for length in (0, 1, 16, 37):
        text = generator.generate("ab", length, seed=1)
        assert text.startswith("ab") and len(text) == 2 + length
        assert not vocab.unknown_chars(text)


def test_default_prime_is_the_most_frequent_character(generator, vocab):
    assert generator.generate(length=5, seed=0).startswith(vocab.most_frequent)


def test_batched_samples_are_independent(generator):
    texts = generator.generate("ab", 40, seed=5, num_samples=4)
    assert len(texts) == 4 and len(set(texts)) == 4
    assert all(text.startswith("ab") and len(text) == 42 for text in texts)
    assert generator.generate("ab", 40, seed=5, num_samples=4) == texts


def test_stream_yields_the_prime_first_then_chunks_that_make_generate(generator):
    chunks = list(generator.stream("ab c", 50, seed=2))
    assert chunks[0] == "ab c" and len(chunks) == 1 + 4  # chunk_length 16: 16+16+16+2
    assert "".join(chunks) == generator.generate("ab c", 50, seed=2)
    rows = list(generator.stream("ab", 20, seed=2, num_samples=2))
    assert rows[0] == ["ab", "ab"]
    assert ["".join(row) for row in zip(*rows)] == generator.generate("ab", 20, seed=2,
                                                                      num_samples=2)


def test_text_does_not_depend_on_the_chunk_length(model, vocab, generator):
    other = Generator(model, vocab, chunk_length=5, loops=generator.loops)
    assert other.generate("ab", 40, seed=8) == generator.generate("ab", 40, seed=8)


def test_argmax_and_top_k_one_are_greedy(generator):
    greedy = generator.generate("ab", 30, argmax=True)
    assert generator.generate("ab", 30, argmax=True) == greedy
    assert generator.generate("ab", 30, top_k=1, seed=9) == greedy
    assert generator.generate("ab", 30, temperature=0.7, top_p=1e-6, seed=10) == greedy


# --- the native loop against the model and the draw's rules ---------------------------------

NATIVE_MODELS = {
    "lstm": ModelConfig(cell="lstm", num_layers=2, hidden_size=48, embedding_size=4,
                        kernel="keras"),  # G = 192: the register tiles, three strips
    "gru": ModelConfig(cell="gru", num_layers=2, hidden_size=8, embedding_size=4,
                       kernel="keras"),  # G = 24: Eigen's product
    "rnn-one-hot": ModelConfig(cell="rnn", num_layers=1, hidden_size=8, one_hot=True,
                               embedding_size=0, kernel="keras"),
}


def native_chunk(model, ids, states, steps, seed=3, temperature=1.0, top_k=0, top_p=1.0):
    chunk = make_chunk_function(model, steps, "native")
    return chunk(tf.constant(ids, tf.int32), states, tf.constant(seed), tf.constant(0),
                 tf.constant(temperature), tf.constant(top_k), tf.constant(top_p),
                 tf.constant(False))


@pytest.mark.parametrize("name", NATIVE_MODELS)
def test_native_loop_feeds_its_draws_through_the_model(vocab, name):
    """Replayed through model_step, the drawn ids give the op's states, and every draw is
    among the top_k largest logits of its step."""
    native_loop_or_skip()
    model = tiny_model(vocab, NATIVE_MODELS[name], seed=4)
    generator = Generator(model, vocab, loops="native")
    ids, states = generator.prime_states(np.array([vocab.encode("ab c"), vocab.encode("!e.d"),
                                                   vocab.encode("cc\nb")], np.int32))
    drawn, final = native_chunk(model, ids, states, 30, top_k=3)  # [3, 30]
    drawn = drawn.numpy()
    assert len(set(map(tuple, drawn))) == 3  # the rows draw apart
    fed = np.concatenate([ids.numpy()[:, None], drawn[:, :-1]], axis=1)
    replayed = states
    for t in range(30):
        logits, replayed = model_step(model, fed[:, t], replayed)
        ranked = np.sort(logits.numpy(), axis=1)[:, ::-1]
        chosen = logits.numpy()[np.arange(3), drawn[:, t]]
        assert (chosen >= ranked[:, 2] - 1e-5).all(), (t, drawn[:, t])
    for ours, theirs in zip(final, replayed):
        np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("options", [{"temperature": 0.7}, {"top_k": 4, "top_p": 0.8},
                                     {"temperature": 1.5, "top_p": 0.6}])
def test_native_draws_follow_the_filtered_distribution(model, vocab, options):
    """4000 rows from one state draw one character each: their frequencies are softmax of
    filter_logits (the XLA loop's rules) within 0.03 (about four standard deviations)."""
    native_loop_or_skip()
    rows = 4000
    states = tuple(tf.repeat(state, rows, axis=0)
                   for state in Generator(model, vocab).prime_states(
                       np.array([vocab.encode("ab c")], np.int32))[1])
    last = np.full([rows], vocab.encode("c")[0], np.int32)
    drawn, _ = native_chunk(model, last, states, 1, seed=11, **options)
    logits, _ = model_step(model, last[:1], tuple(state[:1] for state in states))
    expected = tf.nn.softmax(filter_logits(logits, **options)).numpy()[0]
    frequencies = np.bincount(drawn.numpy()[:, 0], minlength=len(vocab)) / rows
    np.testing.assert_allclose(frequencies, expected, atol=0.03)
    assert (frequencies[expected == 0] == 0).all()  # a cut character is never drawn


# 37 ids: the draw's blocks of 16, two whole and one partial of 5.
MULTI_BLOCK_VOCAB = "abcdefghijklmnopqrstuvwxyz0123456789 "


def multi_block_gru(precision, seed):
    """(vocab, model): a 1x16 GRU over MULTI_BLOCK_VOCAB, skipping where the precision's native
    generation does not run."""
    native_loop_or_skip()
    if precision == "bfloat16":
        bfloat16_generation_or_skip()
    vocab = Vocab(MULTI_BLOCK_VOCAB)
    return vocab, tiny_model(vocab, ModelConfig(cell="gru", num_layers=1, hidden_size=16,
                                                embedding_size=8, kernel="keras"), seed=seed)


@pytest.mark.parametrize("precision", ["float32", "bfloat16"])
def test_native_draws_over_several_blocks_of_ids_follow_the_distribution(precision):
    """A vocabulary of 37 (the draw sums weights in blocks of 16: two whole, one partial of 5)
    and logits rising across the ids (most of the weight in the last blocks), the 7 smallest cut
    (top-k 30): the frequencies of 20000 draws are the filtered softmax within 4.5 standard
    deviations each, and the cut ids are never drawn."""
    vocab, model = multi_block_gru(precision, seed=2)
    model.head.bias.assign(np.linspace(-4.0, 2.0, len(vocab)))  # kept p: about 0.001 to 0.15
    rows, options = 20000, {"temperature": 1.0, "top_k": 30}
    states = tuple(tf.zeros([rows, 16]) for _ in range(model.num_states))
    last = np.full([rows], 3, np.int32)
    chunk = make_chunk_function(model, 1, "native", precision=precision)
    drawn, _ = chunk(tf.constant(last), states, tf.constant(5), tf.constant(0),
                     tf.constant(1.0), tf.constant(30), tf.constant(1.0), tf.constant(False))
    logits, _ = model_step(model, last[:1], tuple(state[:1] for state in states))
    expected = tf.nn.softmax(filter_logits(logits, **options)).numpy()[0]
    frequencies = np.bincount(drawn.numpy()[:, 0], minlength=len(vocab)) / rows
    sigma = np.sqrt(expected * (1 - expected) / rows)
    assert (np.abs(frequencies - expected) <= 4.5 * sigma + 1e-4).all(), (frequencies, expected)
    assert (expected == 0).sum() == 7 and (frequencies[expected == 0] == 0).all()
    assert expected[32:].sum() > 0.35  # the last, partial block carries a good share


@pytest.mark.parametrize("precision", ["float32", "bfloat16"])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("rows", [52, 44])
def test_native_draws_by_lanes_are_the_row_by_row_draws(precision, temperature, rows):
    """Without top-k or top-p the op draws groups of 8 to 16 rows at once, a row per vector lane;
    top-k = V keeps every id and draws each row on its own, the other way. Over 100 steps and 37
    ids (three blocks of 16), both give the same ids (a difference would feed back and spread).
    On two threads 52 rows make blocks of 26 (a group of 16, one of 10), 44 blocks of 22 (a
    group of 16, then 6 rows one by one)."""
    vocab, model = multi_block_gru(precision, seed=5)
    model.head.bias.assign(np.random.default_rng(0).normal(0.0, 1.5, len(vocab)))
    steps = 100
    states = (tf.constant(np.random.default_rng(1).normal(0.0, 1.0, [rows, 16]), tf.float32),)
    last = tf.constant(np.arange(rows) % len(vocab), tf.int32)
    chunk = make_chunk_function(model, steps, "native", precision=precision)

    def drawn(top_k):
        ids, _ = chunk(last, states, tf.constant(7), tf.constant(0), tf.constant(temperature),
                       tf.constant(top_k), tf.constant(1.0), tf.constant(False))
        return ids.numpy()

    by_lanes = drawn(0)
    np.testing.assert_array_equal(by_lanes, drawn(len(vocab)))
    assert len(set(map(tuple, by_lanes))) == rows and len(np.unique(by_lanes)) > 30


@pytest.mark.parametrize("vocab_size", [1, 5, 16, 37, 65])
@pytest.mark.parametrize("temperature", [1.0, 0.7, 1.3])
def test_lane_draws_match_row_draws_at_the_boundaries_of_the_cumulative_weights(vocab_size,
                                                                                 temperature):
    """The op's draw on given logits and uniform numbers, 16 rows a group against row by row:
    the same ids for 1003 rows (62 whole groups and one of 11), each uniform within two floats of
    a boundary where the cumulative weights pass from one id to the next (or 0, or the float
    below 1), so that a sum, a scale or a comparison off by one rounding would show; and never an
    id that weighs nothing, though there the running sums of the two ids either side of it may
    come out a float out of order."""
    native_loop_or_skip()
    rng = np.random.default_rng(vocab_size)
    rows = 1003
    logits = rng.normal(0.0, 3.0, [rows, vocab_size]).astype(np.float32)
    # Ids that weigh nothing: cut (-inf), or finite with an exp below float's range.
    logits[rng.random([rows, vocab_size]) < 0.05] = -np.inf
    logits[rng.random([rows, vocab_size]) < 0.03] = -150.0
    logits[np.arange(rows), rng.integers(0, vocab_size, rows)] = 1.0  # every row has a finite max
    scaled = (logits - logits.max(axis=1, keepdims=True)) / np.float32(temperature)
    weights = np.exp(scaled.astype(np.float64))
    cumulative = np.cumsum(weights, axis=1) / weights.sum(axis=1, keepdims=True)
    boundary = cumulative[np.arange(rows), rng.integers(0, vocab_size, rows)].astype(np.float32)
    uniforms = boundary
    for _ in range(2):  # up to two floats either way
        step = rng.integers(-1, 2, rows)
        uniforms = np.where(step < 0, np.nextafter(uniforms, np.float32(0)),
                            np.where(step > 0, np.nextafter(uniforms, np.float32(1)), uniforms))
    uniforms = np.clip(uniforms, 0.0, np.nextafter(np.float32(1), np.float32(0)))
    uniforms[:2] = [0.0, np.nextafter(np.float32(1), np.float32(0))]
    draw_op = native.library().tf_charrnn_draw

    def draws(by_lanes):
        return draw_op(logits=logits, uniforms=uniforms.astype(np.float32),
                       temperature=temperature, top_k=0, top_p=1.0, by_lanes=by_lanes).numpy()

    try:
        by_lanes = draws(True)
    except tf.errors.UnimplementedError:
        pytest.skip("the native library has no AVX-512 here: it draws row by row only")
    by_rows = draws(False)
    np.testing.assert_array_equal(by_lanes, by_rows)
    assert (logits[np.arange(rows), by_rows] > -100).all()  # never an id that weighs nothing
    assert len(np.unique(by_rows)) >= min(vocab_size, 30)


def test_native_rows_do_not_depend_on_the_batch_or_the_threads(model, vocab):
    """Row 0 of 40 samples (split between the threads) is the one-sample text; all differ."""
    native_loop_or_skip()
    generator = Generator(model, vocab, loops="native", chunk_length=16)
    texts = generator.generate("ab", 50, seed=6, num_samples=40)
    assert texts[0] == generator.generate("ab", 50, seed=6)
    assert len(set(texts)) == 40


def bfloat16_generation_or_skip():
    native_loop_or_skip()
    if not native.bfloat16_generation():
        pytest.skip("no AVX-512 BF16 here: bfloat16 generation does not run")


BFLOAT16_MODELS = dict(NATIVE_MODELS, **{
    "lstm-3x40": ModelConfig(cell="lstm", num_layers=3, hidden_size=40, embedding_size=6,
                             kernel="keras")})  # depth 40: padded to 64; G = 160: 10 tiles


@pytest.mark.parametrize("rows", [3, 40])
@pytest.mark.parametrize("name", BFLOAT16_MODELS)
def test_bfloat16_generation_is_the_model_with_bfloat16_products(vocab, name, rows):
    """Step by step from the op's own states, the float64 reference of the bfloat16 contract
    gives the op's new states to 2e-5 in nine rows of ten and ranks each draw among its top 3
    logits. (A new h that lies within float32 error of a bfloat16 rounding midpoint rounds the
    other way in the reference now and then; that row's deeper layers then differ by about a
    bfloat16 step's effect, under 2e-3.) The float32 model's states are ten times further off,
    so the comparison tells the two precisions apart. 3 rows (padded to a tile of 16) and 40
    (two threads of 20: a whole tile and a padded one)."""
    bfloat16_generation_or_skip()
    model = tiny_model(vocab, BFLOAT16_MODELS[name], seed=5)
    for layer in model.rnn_layers:  # weights large enough for bfloat16 rounding to show
        layer.cell.recurrent_kernel.assign(layer.cell.recurrent_kernel * 3.0)
    primes = [vocab.encode(text) for text in ("ab c", "!e.d", "cc\nb", "d.a ")]
    ids, states = Generator(model, vocab, loops="native").prime_states(
        np.array([primes[row % 4] for row in range(rows)], np.int32))
    chunk = make_chunk_function(model, 1, "native", precision="bfloat16")
    errors, float32_errors = [], []
    for position in range(12):
        drawn, new_states = chunk(ids, states, tf.constant(7), tf.constant(position),
                                  tf.constant(1.0), tf.constant(3), tf.constant(1.0),
                                  tf.constant(False))
        logits, expected = numpy_reference.model_step(model, ids.numpy(),
                                                      [state.numpy() for state in states],
                                                      bfloat16=True)
        _, in_float32 = model_step(model, ids, states)
        drawn = drawn.numpy()[:, 0]
        chosen = logits[np.arange(rows), drawn]
        assert (chosen >= np.sort(logits, axis=1)[:, -3] - 1e-4).all(), (position, drawn)
        errors.append(np.max([np.abs(ours.numpy() - theirs).max(axis=1)
                              for ours, theirs in zip(new_states, expected)], axis=0))
        float32_errors.append(np.max([np.abs(ours.numpy() - theirs.numpy()).max(axis=1)
                                      for ours, theirs in zip(new_states, in_float32)], axis=0))
        # The op returns the states after feeding all but its last draw: that draw goes next.
        ids, states = tf.constant(drawn), new_states
    errors, float32_errors = np.concatenate(errors), np.concatenate(float32_errors)  # per row
    assert np.quantile(errors, 0.9) < 2e-5 and errors.max() < 2e-3, np.sort(errors)[-5:]
    assert np.median(float32_errors) > 10 * np.quantile(errors, 0.9)


@pytest.mark.parametrize("options", [{}, {"temperature": 0.7, "top_p": 0.8}])
def test_bfloat16_generation_streams_text_with_the_float32_statistics(model, vocab, options):
    """Over 4000 rows of one draw each, the bfloat16 loop's frequencies are the float32 model's
    (filtered) softmax within 0.03; a seed repeats its text, and a row does not depend on the
    batch."""
    bfloat16_generation_or_skip()
    generator = Generator(model, vocab, precision="bfloat16")
    rows = 4000
    texts = generator.generate("ab c", 1, seed=11, num_samples=rows, **options)
    logits, _ = model_step(model, vocab.encode("c"),
                           Generator(model, vocab).prime_states(
                               np.array([vocab.encode("ab c")], np.int32))[1])
    expected = tf.nn.softmax(filter_logits(logits, **options)).numpy()[0]
    frequencies = np.bincount([vocab.encode(text[-1])[0] for text in texts],
                              minlength=len(vocab)) / rows
    np.testing.assert_allclose(frequencies, expected, atol=0.03)
    assert (frequencies[expected == 0] == 0).all()
    text = generator.generate("ab", 60, seed=3, **options)
    assert text == generator.generate("ab", 60, seed=3, **options)
    assert generator.generate("ab", 60, seed=3, num_samples=17, **options)[0] == text


def test_bfloat16_generation_needs_the_native_loop_and_avx512_bf16(model, vocab, monkeypatch):
    with pytest.raises(UsageError, match="runs in the native loop only, not xla: use --loops"):
        Generator(model, vocab, loops="xla", precision="bfloat16")
    with pytest.raises(UsageError, match="precision must be one of float32, bfloat16"):
        Generator(model, vocab, precision="float16")
    native_loop_or_skip()
    with monkeypatch.context() as patch:
        patch.setattr(native, "bfloat16_generation", lambda: False)
        with pytest.raises(UsageError, match="not available here: it needs a CPU with AVX-512 "
                                             "BF16 .*: use --precision float32"):
            Generator(model, vocab, loops="auto", precision="bfloat16")
    monkeypatch.setattr(native, "library", lambda: None)  # auto then falls back to xla
    with pytest.raises(UsageError, match="needs the native loop, which is not available here"):
        Generator(model, vocab, loops="auto", precision="bfloat16")


def test_native_op_rejects_bad_inputs(model, vocab):
    native_loop_or_skip()
    states = model.zero_states(1)
    with pytest.raises(tf.errors.InvalidArgumentError, match="id 9 at 0 is outside"):
        native_chunk(model, [9], states, 4)
    with pytest.raises(tf.errors.InvalidArgumentError, match="temperature must be > 0"):
        native_chunk(model, [1], states, 4, temperature=0.0)


def test_stop_ends_the_sample_after_the_stop_string(generator):
    full = generator.generate("ab", 80, seed=11)
    stop = full[30:33]  # found by the 33rd character at the latest, across a chunk boundary
    end = full.find(stop, len("ab") - len(stop) + 1) + len(stop)
    assert generator.generate("ab", 80, seed=11, stop=stop) == full[:end]
    # A stop string that starts in the prime and ends in the first generated character.
    assert generator.generate("ab", 80, seed=11, stop="b" + full[2]) == full[:3]
    # A stop string inside the prime alone does not count.
    position = full.find("ab", 1)
    assert generator.generate("ab", 80, seed=11, stop="ab") == \
        (full if position < 0 else full[:position + 2])


@pytest.mark.parametrize("seed", [1.7, "1", True])
def test_a_seed_must_be_an_integer(generator, seed):
    with pytest.raises(UsageError, match=f"seed must be an integer .*got {seed!r}"):
        generator.generate("ab", 5, seed=seed)


def test_stop_is_per_sample(generator):
    full = generator.generate("ab", 60, seed=12, num_samples=3)
    stop = full[0][20]
    stopped = generator.generate("ab", 60, seed=12, num_samples=3, stop=stop)
    for whole, cut in zip(full, stopped):
        position = whole.find(stop, 2)
        assert cut == (whole if position < 0 else whole[:position + 1])


def test_unknown_prime_characters_are_listed_or_skipped(model, vocab):
    messages = []
    generator = Generator(model, vocab, log=messages.append)
    with pytest.raises(CharRNNError) as error:
        generator.generate("aZb?", 5, seed=0)
    assert str(error.value) == ("the prime has characters not in the run's vocabulary: 'Z' '?'; "
                                "remove them or pass --unknown skip")
    text = generator.generate("aZb?", 5, seed=0, unknown="skip")
    assert text.startswith("ab") and len(text) == 7
    assert messages == ["warning: dropping prime characters not in the vocabulary: 'Z' '?'"]
    with pytest.raises(CharRNNError, match="the prime is empty"):
        generator.generate("ZZ", 5, unknown="skip")
    with pytest.raises(CharRNNError, match="the prime is empty"):
        generator.generate("", 5)


@pytest.mark.parametrize("options, message", [
    ({"temperature": 0.0}, "temperature must be > 0, got 0.0 (for greedy sampling use --argmax)"),
    ({"temperature": -1.0}, "temperature must be > 0, got -1.0"),
    ({"top_p": 0.0}, "top_p must be in (0, 1] (1 turns it off), got 0.0"),
    ({"top_p": 1.5}, "top_p must be in (0, 1] (1 turns it off), got 1.5"),
    ({"top_k": -1}, "top_k must be an integer >= 0 (0 turns it off), got -1"),
    ({"length": -1}, "length must be an integer >= 0, got -1"),
    ({"num_samples": 0}, "num_samples must be an integer >= 1, got 0"),
    ({"stop": ""}, "stop must be a non-empty string (leave it out for no stop string)"),
    ({"unknown": "ignore"}, "unknown must be one of error, skip, got 'ignore'"),
])
def test_bad_options_are_one_line_usage_errors(generator, options, message):
    with pytest.raises(UsageError) as error:
        generator.generate("ab", **{"length": 5, **options})
    assert str(error.value).startswith(message)
    with pytest.raises(UsageError):
        generator.stream("ab", **{"length": 5, **options})  # before the first item is asked for


# --- Hangul ----------------------------------------------------------------------------------

L, V, T = "\u1100\u1112", "\u1161\u1175", "\u11a8\u11c2"


def test_streamed_jamo_compose_exactly_like_the_whole_text():
    rng = random.Random(0)
    alphabet = L + V + T + HANGUL_ESCAPE + "a "
    for _ in range(300):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 12)))
        cuts = sorted(rng.randint(0, len(text)) for _ in range(3))
        composer = JamoComposer()
        pieces = [composer.feed(text[start:end])
                  for start, end in zip([0] + cuts, cuts + [len(text)])]
        assert "".join(pieces) + composer.flush() == compose_hangul(text), repr(text)


@pytest.fixture(scope="module")
def hangul():
    vocab = Vocab.from_text(decompose_hangul(KOREAN))
    return vocab, tiny_model(vocab, seed=1)


def test_a_jamo_runs_default_prime_can_start_a_syllable(hangul):
    """The most frequent jamo here is the vowel ᅡ, which no syllable starts with: every sample
    opened with a loose vowel."""
    vocab, model = hangul
    assert vocab.most_frequent == "\u1161"
    generator = Generator(model, vocab, hangul_jamo=True, chunk_length=16, loops="xla")
    assert default_prime(vocab, hangul_jamo=True) == " "  # the next most frequent
    assert generator.generate(length=5, seed=0).startswith(" ")
    assert default_prime(vocab) == "\u1161"  # a plain run keeps the most frequent


def test_a_jamo_runs_unknown_prime_syllables_are_named_and_dropped_whole(hangul):
    """뷁's vowel ᅰ is not in this vocabulary: the error names the syllable typed, not the jamo,
    and skipping drops the syllable, not only its vowel (which left ᄇᆰ in the text)."""
    vocab, model = hangul
    messages = []
    generator = Generator(model, vocab, hangul_jamo=True, chunk_length=16, loops="xla",
                          log=messages.append)
    with pytest.raises(CharRNNError, match=r"not in the run's vocabulary: '뷁'; remove them"):
        generator.generate("한뷁국", 5, seed=0)
    text = generator.generate("한뷁국", 5, seed=0, unknown="skip")
    assert text.startswith("한국") and "\u1107" not in text and "\u11b0" not in text
    assert messages == ["warning: dropping prime characters not in the vocabulary: '뷁'"]


def test_jamo_runs_are_recomposed_into_syllables(hangul):
    vocab, model = hangul
    composed = Generator(model, vocab, hangul_jamo=True, chunk_length=5)
    raw = Generator(model, vocab, hangul_jamo=False, chunk_length=5)
    jamo = raw.generate(decompose_hangul("한국"), 60, seed=4)
    text = composed.generate("한국", 60, seed=4)
    assert text == compose_hangul(jamo) and text.startswith("한국")
    assert "".join(composed.stream("한국", 60, seed=4)) == text

def test_a_jamo_runs_stop_string_ends_only_where_a_syllable_ends(hangul):
    """'대' is no stop inside '댕' (the same two jamo and a final consonant), even when a chunk
    ends between them (chunks of 5 jamo here)."""
    vocab, model = hangul
    composed = Generator(model, vocab, hangul_jamo=True, chunk_length=5)
    inside_only = 0
    for seed in range(4, 16):
        text = composed.generate("한국", 60, seed=seed)
        for stop in ("대", "다", "지"):
            at = text.find(stop, len("한국"))
            expected = text if at < 0 else text[:at + 1]
            assert composed.generate("한국", 60, seed=seed, stop=stop) == expected, (seed, stop)
            jamo = decompose_hangul(text[len("한국"):])
            inside_only += at < 0 and decompose_hangul(stop) in jamo
    assert inside_only > 0, "no sample held a stop's jamo only inside a longer syllable"


def test_find_stop_in_jamo_waits_for_a_final_consonant():
    from tf_charrnn.sample import find_stop

    jamo, ha = decompose_hangul("어느 학교에 하늘"), decompose_hangul("하")
    assert find_stop(jamo, ha, jamo=True) == len(decompose_hangul("어느 학교에 하"))
    assert find_stop(jamo, ha, jamo=False) == len(decompose_hangul("어느 하"))
    assert find_stop(decompose_hangul("어느 하"), decompose_hangul("하"), jamo=True) == -1
    assert find_stop(decompose_hangul("어느 학"), decompose_hangul("학"), jamo=True) == \
        len(decompose_hangul("어느 학"))


# --- the command line ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def runs_dir(tmp_path_factory, vocab, model):
    root = tmp_path_factory.mktemp("runs")
    make_run(root / "old", vocab, model, step=3)
    make_run(root / "new", vocab, model, step=7)
    os.utime(root / "old/checkpoints/ckpt-3.manifest.json", (1, 1))
    make_run(root / "untrained", vocab, None)
    return root


def lines(text):
    return text.strip().splitlines()


def test_cli_streams_the_run_sample_and_names_run_and_checkpoint(runs_dir, generator, capsys):
    assert run_cli(main, ["--runs-dir", str(runs_dir), "--prime", "ab", "-n", "30",
                          "--seed", "6", "--loops", generator.loops]) == 0
    out, err = capsys.readouterr()
    expected = generator.generate("ab", 30, seed=6)
    assert out == expected + ("" if expected.endswith("\n") else "\n")
    assert f"using the most recent run {runs_dir / 'new'}" in err
    assert f"checkpoint {runs_dir / 'new/checkpoints/ckpt-7'} (step 7)" in err


def test_cli_checkpoint_samples_and_stop(runs_dir, generator, capsys):
    checkpoint = str(runs_dir / "old/checkpoints/ckpt-3")
    assert run_cli(main, ["--checkpoint", checkpoint, "--prime", "a", "-n", "25",
                          "--num-samples", "3", "--seed", "1", "--stop", "\\n",
                          "--loops", generator.loops]) == 0
    out, err = capsys.readouterr()
    assert f"checkpoint {checkpoint} (step 3)" in err
    texts = generator.generate("a", 25, seed=1, num_samples=3, stop="\n")
    assert out == ("=" * 24 + " sample 1 of 3 " + "=" * 24 + "\n" + texts[0]
                   + sample_divider(2, 3) + texts[1] + sample_divider(3, 3) + texts[2] + "\n")
    assert "sample 3 of 3" in sample_divider(3, 3)


def test_cli_skips_unknown_prime_characters_with_a_warning(runs_dir, generator, capsys):
    assert run_cli(main, ["--run", str(runs_dir / "new"), "--prime", "aZb", "-n", "10",
                          "--seed", "2", "--unknown", "skip", "--loops", generator.loops]) == 0
    out, err = capsys.readouterr()
    assert out.startswith(generator.generate("ab", 10, seed=2))
    assert "warning: dropping prime characters not in the vocabulary: 'Z'" in err


def test_parse_escapes():
    assert parse_escapes("\\n\\n") == "\n\n"
    assert parse_escapes("a\\tb\\\\") == "a\tb\\"
    assert parse_escapes("é\\u00e9") == "éé"


@pytest.mark.parametrize("argv, code, message", [
    (["--temperature", "0"], 2, "error: temperature must be > 0, got 0.0"),
    (["--top-p", "1.5"], 2, "error: top_p must be in (0, 1]"),
    (["--top-k", "-2"], 2, "error: top_k must be an integer >= 0"),
    (["-n", "-5"], 2, "error: length must be an integer >= 0, got -5"),
    (["--num-samples", "0"], 2, "error: num_samples must be an integer >= 1"),
    (["--stop", "\\x"], 2, "error: --stop '\\\\x' has a bad backslash escape"),
    (["--unknown", "drop"], 2, "error: argument --unknown: invalid choice"),
    (["--bogus"], 2, "error: unrecognized arguments: --bogus"),
    (["--run", "RUNS/new", "--checkpoint", "RUNS/new/checkpoints/ckpt-7"], 2,
     "error: argument --checkpoint: not allowed with argument --run"),
    (["--run", "RUNS/new", "--loops", "xla", "--precision", "bfloat16"], 2,
     "error: bfloat16 sampling runs in the native loop only, not xla: use --loops auto"),
    (["--run", "RUNS/missing"], 1, "error: run directory RUNS/missing not found"),
    (["--runs-dir", "RUNS/missing"], 1, "error: no trained run found under RUNS/missing/"),
    (["--run", "RUNS/untrained"], 1, "error: run RUNS/untrained has no checkpoint yet"),
    (["--checkpoint", "RUNS/new/checkpoints/ckpt-5"], 1,
     "error: no complete checkpoint at RUNS/new/checkpoints/ckpt-5"),
    (["--run", "RUNS/new", "--prime", "aZ"], 1,
     "error: the prime has characters not in the run's vocabulary: 'Z'"),
])
def test_cli_errors_are_one_line(runs_dir, capsys, argv, code, message):
    argv = [arg.replace("RUNS", str(runs_dir)) for arg in argv]
    assert run_cli(main, argv) == code
    out, err = capsys.readouterr()
    assert out == ""
    error_lines = [line for line in lines(err) if line.startswith("error:")]
    assert len(error_lines) == 1 and error_lines[0].startswith(message.replace("RUNS",
                                                                               str(runs_dir)))
    assert err.rstrip("\n").splitlines()[-1] == error_lines[0]


def test_cli_recomposes_a_jamo_run(tmp_path, hangul, capsys):
    vocab, model = hangul
    make_run(tmp_path / "ko", vocab, model, Config(data=DataConfig(hangul_jamo=True), model=TINY))
    assert run_cli(main, ["--run", str(tmp_path / "ko"), "--prime", "대한", "-n", "40",
                          "--seed", "2"]) == 0
    out, _ = capsys.readouterr()
    text = compose_hangul(Generator(model, vocab).generate(decompose_hangul("대한"), 40, seed=2))
    assert out == text + ("" if text.endswith("\n") else "\n")


@pytest.mark.parametrize("precision", ["mixed_bfloat16", "mixed_float16"])
def test_a_mixed_precision_run_samples_with_its_weights_in_float32(tmp_path, vocab, precision):
    config = Config(model=ModelConfig(**dict(TINY.__dict__, precision=precision)))
    trained = tiny_model(vocab, config.model, seed=3)
    make_run(tmp_path / "mixed", vocab, trained, config)
    generator = Generator.from_run(tmp_path / "mixed", log=lambda *a: None)
    assert generator.model.rnn_layers[0].compute_dtype == "float32"
    for restored, saved in zip(generator.model.weights, trained.weights):
        np.testing.assert_array_equal(restored.numpy(), saved.numpy())
    text = generator.generate("ab", 20, seed=1)
    assert len(text) == 22 and text.startswith("ab")


# --- memory --------------------------------------------------------------------------------------

def test_a_batch_of_samples_too_large_for_memory_is_refused_before_allocating(model, vocab,
                                                                              monkeypatch):
    from tf_charrnn import sample as sample_module

    generator = Generator(model, vocab, chunk_length=16, loops="xla")
    monkeypatch.setattr(sample_module, "available_memory_bytes", lambda: 2 ** 20)  # 1 MiB
    allocations = []
    monkeypatch.setattr(generator, "prime_states", lambda *a: allocations.append(a))
    expected = (r"^100,000 samples of 5 characters need about [\d.]+ GiB, more than the 0.0 GiB "
                r"of memory available: ask for at most ([\d,]+) samples")
    with pytest.raises(CharRNNError, match=expected) as caught:
        generator.generate("ab", 5, seed=1, num_samples=100_000)
    assert not allocations, "nothing is allocated before the check"
    tracemalloc.start()  # not even generate()'s list of texts: 20M samples' lists are ~1 GB
    try:
        with pytest.raises(CharRNNError, match=r"^20,000,000 samples of 5 characters need"):
            generator.generate("ab", 5, seed=1, num_samples=20_000_000)
        assert tracemalloc.get_traced_memory()[1] < 2 ** 24
    finally:
        tracemalloc.stop()
    most = int(re.search(r"at most ([\d,]+) samples", str(caught.value)).group(1).replace(",", ""))
    assert 1 <= most < 100_000
    monkeypatch.undo()
    assert len(generator.generate("ab", 5, seed=1, num_samples=most)) == most  # and it fits
    # A stream hands its text on a chunk at a time: any length fits (the benchmark's is 2**31-1).
    pieces = generator.stream("ab", 2 ** 31 - 1, seed=1, num_samples=64)
    assert next(pieces) == ["ab"] * 64
    pieces.close()


def test_argmax_takes_any_temperature_even_zero():
    from tf_charrnn.config import SampleConfig
    from tf_charrnn.sample import build_parser, sampling_options

    args = build_parser().parse_args(["--argmax", "--temperature", "0"])
    assert sampling_options(args, SampleConfig())["temperature"] == 1.0
    args = build_parser().parse_args(["--temperature", "0.5"])
    assert sampling_options(args, SampleConfig())["temperature"] == 0.5
