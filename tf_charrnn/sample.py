"""Sampling: a trained run -> text, generated inside one compiled loop.

Shapes: N sample streams (batch rows), P prime length, K chunk length, V vocabulary size,
H hidden size.

The Generator owns the path from a prime to text:

* The prime is fed through the model in ONE forward pass (all but its last character), which
  leaves the state ready for the first draw.
* Characters are drawn by a loop that generates a chunk of K characters per call, for N rows at
  once, the state staying where the loop runs. Each draw inverts the cumulative distribution at
  one uniform number that depends only on (seed, position) (and the row), so a seed gives the
  same text however the output is chunked. Temperature, top-k, top-p and argmax (a cut to top-k
  1) are inputs, so a loop is built once per Generator whatever the options. Three loops:
  native  one C++ op (native_loops.cc's TfCharrnnGenerate, built by native.py), the default
          where the library builds: the same weights and cell math, the rows split between the
          threads; uniform numbers from a hash of (seed, position, row). K = 2048: each call
          also prepares the weights and crosses into TensorFlow, about 1 ms. Lecture model, two
          CPU cores: one stream ~140k characters/s, 64 streams ~600k. precision="bfloat16"
          (with AVX-512 BF16) does the products in bfloat16, weights and each new h rounded to
          bfloat16: on AMX tiles one stream ~160k, 64 streams ~2.6M (4x float32 for one stream
          of 2x256 units, whose bfloat16 weights fit the core's L2 cache); without AMX, with
          AVX-512 BF16 dot products (an AMD EPYC): one stream ~185k, 64 streams ~810k.
  xla     a `tf.function` holding a `tf.while_loop`, compiled with XLA: the loop the exported
          SavedModel (tf_charrnn.export) runs and the fallback without the native library; one
          stream ~60k, 64 streams ~210k, about 1.5 s of compilation per number of rows. Its
          uniform numbers come from tf.random.stateless_uniform(seed, position). (An inverse-CDF
          draw costs one random number a row where tf.random.stateless_categorical spent about
          a fifth of a one-stream step under XLA.)
  plain   the same loop uncompiled (~12k one stream); draws differently from XLA.
  Each step of the xla and plain loops runs the fused kernel's cell math (kernels.py: one tanh
  for all gates) on weights prepared once per chunk, the first layer's input projection read
  as a row of a [V, G] table (embedding, or one-hot, times the input kernel); the native op
  takes the same prepared weights. See benchmarks/sample_speed.py. A seed's text depends on
  the loop (`python -m tf_charrnn.sample --loops xla` gives the SavedModel's).
* The Python side calls the chunk function once per chunk, decodes it, looks for the stop string
  and yields text, so the CLI can stream. A run trained on Hangul jamo (data.hangul_jamo) is
  recomposed into syllables as it streams; a trailing run of jamo that the next chunk may
  complete is held back until it can be composed.

Lengths, positions and the stop string count model characters: jamo, for a jamo run.
"""

import functools
import random
import sys
import time
import warnings

import numpy as np
import tensorflow as tf

from tf_charrnn.cli import (ArgumentParser, add_debug_flag, add_run_arguments, drop_stdout,
                            run_cli)
from tf_charrnn.config import SampleConfig
from tf_charrnn.errors import CharRNNError, UsageError
from tf_charrnn.memory import available_memory_bytes, check_fits
from tf_charrnn.models import GATES
from tf_charrnn.text import HANGUL_ESCAPE, compose_hangul, decompose_hangul

CHUNK_LENGTH = 256  # characters per call of a compiled (XLA or plain) loop
NATIVE_CHUNK_LENGTH = 2048  # per call of the native loop, whose per-call work is about 1 ms
LOOPS = ("auto", "native", "xla", "plain")
PRECISIONS = ("float32", "bfloat16")  # of the generation loop's products
UNKNOWN_CHOICES = ("error", "skip")
SEED_MODULUS = 2 ** 31  # stateless RNG seeds are int32 under XLA: seeds are taken modulo 2**31

# The jamo that text.compose_hangul joins: initial L, medial V, final T; an escape mark takes
# the character after it literally.
_L_FIRST, _L_LAST = "\u1100", "\u1112"
_V_FIRST, _V_LAST = "\u1161", "\u1175"
_T_FIRST, _T_LAST = "\u11a8", "\u11c2"


def _stderr(message):
    print(message, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# The draw: pure functions of logits, checked with fake logits by the tests.

def filter_logits(logits, temperature=1.0, top_k=0, top_p=1.0):
    """[N, V] logits -> [N, V] logits to draw from: scaled by 1/temperature, cut ones at -inf.

    The result is (logits - row max) / temperature, the same distribution as logits / temperature
    without overflow at tiny temperatures. top_k > 0 keeps the top_k largest logits of a row (a tie
    with the k-th keeps all the tied ones); top_p < 1 then keeps the smallest set of the largest
    logits whose probability (after temperature and top-k) reaches top_p. The largest logit is
    always kept. top_k = 0 and top_p = 1 turn the cuts off.
    """
    logits = tf.convert_to_tensor(logits, tf.float32)
    temperature = tf.cast(temperature, tf.float32)
    top_k = tf.cast(top_k, tf.int32)
    top_p = tf.cast(top_p, tf.float32)
    scaled = (logits - tf.reduce_max(logits, axis=-1, keepdims=True)) / temperature  # [N, V]

    def cut():
        vocab_size = tf.shape(scaled)[-1]
        ordered = tf.sort(scaled, axis=-1, direction="DESCENDING")  # [N, V]
        k = tf.where(top_k > 0, tf.minimum(top_k, vocab_size), vocab_size)
        kth = tf.gather(ordered, k - 1, axis=-1)[:, None]  # [N, 1]
        ordered = tf.where(ordered >= kth, ordered, -np.inf)
        # Probability mass of the logits strictly larger in the order: a logit stays while the
        # mass before it is still short of top_p.
        before = tf.math.cumsum(tf.nn.softmax(ordered, axis=-1), axis=-1, exclusive=True)
        in_nucleus = (before < top_p) | (top_p >= 1.0)
        in_nucleus &= ordered > -np.inf
        count = tf.maximum(tf.reduce_sum(tf.cast(in_nucleus, tf.int32), axis=-1), 1)  # [N]
        threshold = tf.gather(ordered, count - 1, axis=-1, batch_dims=1)[:, None]  # [N, 1]
        return tf.where(scaled >= threshold, scaled, -np.inf)

    return tf.cond((top_k > 0) | (top_p < 1.0), cut, lambda: scaled)


def draw(logits, seed, argmax=False):
    """[N, V] logits -> ids [N] int32: one categorical draw per row, or the row's argmax.

    seed is a [2] int32 tensor for tf.random.stateless_uniform: the same seed and logits give
    the same ids. The draw inverts the row's cumulative distribution at one uniform number; an
    id whose logit is -inf (cut by filter_logits) is never drawn.
    """
    logits = tf.convert_to_tensor(logits, tf.float32)
    weights = tf.exp(logits - tf.reduce_max(logits, axis=-1, keepdims=True))  # [N, V], max 1
    cdf = tf.math.cumsum(weights, axis=-1)  # [N, V]
    total = cdf[:, -1:]  # [N, 1], at least 1
    uniform = tf.random.stateless_uniform([tf.shape(logits)[0], 1], tf.cast(seed, tf.int32))
    # Strictly below the total, so the draw never runs past the last id with any weight.
    point = tf.minimum(uniform * total, tf.math.nextafter(total, tf.zeros_like(total)))
    drawn = tf.reduce_sum(tf.cast(cdf <= point, tf.int32), axis=-1)  # [N]
    return tf.where(tf.cast(argmax, tf.bool), tf.argmax(logits, axis=-1, output_type=tf.int32),
                    drawn)


# ---------------------------------------------------------------------------------------------
# The model, one character at a time, and the compiled generation loop.

_CELL_KINDS = {"lstm": "lstm", "gru": "gru", "rnn": "simple_rnn"}


def prepare_step(model):
    """The model's weights as model_step uses them, float32: (the cell math of kernels.py, per
    layer (input kernel, input bias, the math's per-step constants)), the first layer's input
    kernel and bias folded into one [V, G] table (bias None). Call it once per chunk, outside
    the loop."""
    from tf_charrnn.kernels import _MATHS, input_table

    math = _MATHS[_CELL_KINDS[model.cell]]
    layers = []
    for index, layer in enumerate(model.rnn_layers):
        cell = layer.cell
        kernel, recurrent, bias = (tf.cast(w, tf.float32)
                                   for w in (cell.kernel, cell.recurrent_kernel, cell.bias))
        _, w_kernel, w_bias, consts = math.prepare(kernel, recurrent, bias)
        if index == 0:
            # A one-hot input times the kernel is a row of it; an embedded one, a row of E W.
            rows = None if model.one_hot else tf.cast(model.embedding.embeddings, tf.float32)
            layers.append((input_table(w_kernel, w_bias, rows), None, consts))  # [V, G]
        else:
            layers.append((w_kernel, w_bias, consts))
    return math, tuple(layers)


def model_step(model, ids, states, prepared=None):
    """Feed ids [N] (one character per row) -> (logits [N, V], new states).

    The same weights and function as model(ids[:, None], states) (equal to float32 rounding),
    through the fused kernel's cell math rather than a length-one sequence loop per layer; the
    model's cells are the standard ones (tanh, sigmoid gates, GRU reset_after), as models.py
    builds them. prepared: prepare_step(model), to keep that work out of a generation loop.
    Dropout is off, as in sampling.
    """
    math, layers = prepared if prepared is not None else prepare_step(model)
    ids = tf.cast(ids, tf.int32)
    per_layer = model.states_per_layer
    x, new_states = None, []
    for index, (weight, bias, consts) in enumerate(layers):
        xw = tf.gather(weight, ids) if index == 0 else tf.matmul(x, weight) + bias  # [N, G]
        layer_states = tuple(tf.cast(state, tf.float32)
                             for state in states[index * per_layer:(index + 1) * per_layer])
        layer_states, _ = math.step(xw, layer_states, consts, with_jacobian=False)
        x = layer_states[0]  # [N, H]
        new_states.extend(tf.cast(state, model.state_dtype) for state in layer_states)
    head = model.head
    logits = tf.matmul(x, tf.cast(head.kernel, tf.float32)) + tf.cast(head.bias, tf.float32)
    return logits, tuple(new_states)  # [N, V]


def greedy_as_top_k(top_k, argmax):
    """The generation loops' top_k: 1 when argmax, else top_k. Greedy is a cut to the single
    largest logit: a second branch in the loop body costs more than the draw it would save
    (measured under XLA on a CPU)."""
    return tf.where(tf.cast(argmax, tf.bool), 1, tf.cast(top_k, tf.int32))


def generate_ids(model, ids, states, num_steps, seed, position, temperature, top_k, top_p,
                 argmax):
    """The generation loop: num_steps characters for each row, drawn one after another.

    ids [N] are each row's last character, not yet fed; states the state before it. The draw at
    step i is seeded with (seed, position + i). Returns (drawn ids [N, num_steps], states after
    feeding all but the last drawn id). num_steps may be a Python int (a fixed size, as XLA needs)
    or a tensor. Call it inside a tf.function.
    """
    ids = tf.convert_to_tensor(ids, tf.int32)
    seed = tf.cast(seed, tf.int32)
    position = tf.cast(position, tf.int32)

    top_k = greedy_as_top_k(top_k, argmax)

    prepared = prepare_step(model)

    def body(step, ids, states, drawn):
        logits, states = model_step(model, ids, states, prepared)  # [N, V]
        logits = filter_logits(logits, temperature, top_k, top_p)
        ids = draw(logits, tf.stack([seed, position + step]))  # [N]
        return step + 1, ids, states, drawn.write(step, ids)

    drawn = tf.TensorArray(tf.int32, size=num_steps, element_shape=ids.shape)
    _, _, states, drawn = tf.while_loop(
        lambda step, *_: step < num_steps, body, (tf.constant(0), ids, tuple(states), drawn))
    return tf.transpose(drawn.stack()), states  # [N, num_steps]


def _prime_pass(model, ids, states):
    _, states = model(ids, states, training=False)  # ids [N, P - 1]
    return states


def _generate_chunk(model, num_steps, ids, states, seed, position, temperature, top_k, top_p,
                    argmax):
    return generate_ids(model, ids, states, num_steps, seed, position, temperature, top_k, top_p,
                        argmax)


def _generate_chunk_natively(model, num_steps, ids, states, seed, position, temperature, top_k,
                             top_p, argmax, precision="float32"):
    """generate_ids as one native op (native_loops.cc's TfCharrnnGenerate): the same weights,
    cell math and draw rules; its own uniform numbers (a hash of seed, position and row).
    precision "bfloat16" runs the products in bfloat16 (AMX tiles, else AVX-512 BF16 dot
    products) with the weights and each new h rounded to bfloat16 (float32 sums, cell math and
    draw)."""
    from tf_charrnn import native

    _, layers = prepare_step(model)
    empty_kernel, empty = tf.zeros([0, 0]), tf.zeros([0])
    kernels, biases, recurrent, recurrent_biases = [], [], [], []
    for index, (weight, bias, consts) in enumerate(layers):
        kernels.append(empty_kernel if index == 0 else weight)  # layer 0: the table
        biases.append(empty if index == 0 else bias)
        recurrent.append(consts[0])
        recurrent_biases.append(consts[1] if model.cell == "gru" else empty)
    drawn, states = native.library().tf_charrnn_generate(
        table=layers[0][0], kernels=kernels, biases=biases, recurrent=recurrent,
        recurrent_biases=recurrent_biases, head_kernel=tf.cast(model.head.kernel, tf.float32),
        head_bias=tf.cast(model.head.bias, tf.float32), ids=ids,
        states=[tf.cast(state, tf.float32) for state in states], seed=seed, position=position,
        temperature=temperature, top_k=greedy_as_top_k(top_k, argmax), top_p=top_p,
        kind=_CELL_KINDS[model.cell], num_steps=num_steps, precision=precision)
    return drawn, tuple(tf.cast(state, model.state_dtype) for state in states)


def state_specs(model, batch_size=None):
    """TensorSpecs of the model's state tuple; batch_size None leaves the batch dimension open."""
    return tuple(tf.TensorSpec([batch_size, model.hidden_size], model.state_dtype)
                 for _ in range(model.num_states))


def chunk_signature(model, batch_size=None):
    """The input signature of a compiled generation chunk (see make_chunk_function)."""
    return (tf.TensorSpec([batch_size], tf.int32), state_specs(model, batch_size),
            tf.TensorSpec([], tf.int32), tf.TensorSpec([], tf.int32),
            tf.TensorSpec([], tf.float32), tf.TensorSpec([], tf.int32),
            tf.TensorSpec([], tf.float32), tf.TensorSpec([], tf.bool))


def resolve_loops(loops="auto"):
    """The generation loop to run: "auto" picks "native" where the native library loads, else
    "xla"; "xla" and "plain" (a tf.while_loop graph) are taken as they are, and "native" where
    the library does not load is a UsageError."""
    if loops not in LOOPS:
        raise UsageError(f"loops must be one of {', '.join(LOOPS)}, got {loops!r}")
    if loops in ("xla", "plain"):
        return loops
    from tf_charrnn import native

    if native.library() is not None:
        return "native"
    if loops == "native":
        raise UsageError("the native loop is not available here (no C++ compiler, a failed "
                         "build, or TF_CHARRNN_NATIVE=0): use --loops auto or xla")
    return "xla"


def resolve_precision(precision, loops, requested=None):
    """Check the generation loop's precision: "bfloat16" needs the native loop built with
    AVX-512 BF16 (see native.bfloat16_generation); a UsageError otherwise. loops: the loop that
    will run; requested: the one asked for (default the same), to say why it is not the native
    one."""
    if precision not in PRECISIONS:
        raise UsageError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision == "bfloat16":
        from tf_charrnn import native

        if loops != "native" and (requested or loops) != "auto":
            raise UsageError(f"bfloat16 sampling runs in the native loop only, not {loops}: "
                             f"use --loops auto or native, or --precision float32")
        if loops != "native":
            raise UsageError("bfloat16 sampling needs the native loop, which is not available "
                             "here (no C++ compiler, a failed build, or TF_CHARRNN_NATIVE=0): "
                             "use --precision float32")
        if not native.bfloat16_generation():
            raise UsageError("bfloat16 sampling is not available here: it needs a CPU with "
                             "AVX-512 BF16 (AMD Zen 4 or later, Intel Xeon of the 4th "
                             "generation or later) and a compiler that builds it: use "
                             "--precision float32")
    return precision


def make_chunk_function(model, chunk_length=CHUNK_LENGTH, loops="xla", batch_size=None,
                        precision="float32"):
    """A tf.function (ids, states, seed, position, temperature, top_k, top_p, argmax) ->
    (ids [N, chunk_length], states): chunk_length steps of the generation loop, traced once.
    loops: "native" (one C++ op), "xla" (generate_ids compiled with XLA) or "plain"; precision
    "bfloat16" only with "native"."""
    resolve_precision(precision, loops)
    # A partial rather than a closure or method: TensorFlow counts traces per code object, and
    # each chunk function's one trace is not a retrace to warn about.
    if loops == "native":
        chunk = functools.partial(_generate_chunk_natively, precision=precision)
    else:
        chunk = _generate_chunk
    return tf.function(functools.partial(chunk, model, chunk_length),
                       input_signature=chunk_signature(model, batch_size),
                       jit_compile=loops == "xla")


# ---------------------------------------------------------------------------------------------
# Streaming text out: decoding, the stop string, Hangul recomposition.

def _composable_length(text):
    """How much of text compose_hangul can join now: all but a trailing run that may continue.

    Walks text as compose_hangul's pattern does (an escape and the character after it; L V with
    an optional T; anything else alone) and stops before an escape, an L or an L V at the end.
    """
    index, size = 0, len(text)
    while index < size:
        char = text[index]
        if char == HANGUL_ESCAPE:
            if index + 1 == size:
                break
            index += 2
        elif _L_FIRST <= char <= _L_LAST:
            if index + 1 == size:
                break
            if _V_FIRST <= text[index + 1] <= _V_LAST:
                if index + 2 == size:
                    break
                index += 3 if _T_FIRST <= text[index + 2] <= _T_LAST else 2
            else:
                index += 1
        else:
            index += 1
    return index


def find_stop(text, stop, jamo=False):
    """The index just after the first occurrence of stop in text, else -1. In jamo text an
    occurrence counts only where a syllable ends: '하' (L V) is no stop inside '학' (L V T), and
    one that ends text with a vowel is not known yet (a final consonant may follow)."""
    open_vowel = jamo and _V_FIRST <= stop[-1] <= _V_LAST
    start = text.find(stop)
    while start >= 0:
        end = start + len(stop)
        if not open_vowel or (end < len(text) and not _T_FIRST <= text[end] <= _T_LAST):
            return end
        start = text.find(stop, start + 1)
    return -1


class JamoComposer:
    """Recompose streamed jamo text into syllables: feed chunks, get composed text back."""

    def __init__(self):
        self.pending = ""

    def feed(self, text):
        self.pending += text
        cut = _composable_length(self.pending)
        ready, self.pending = self.pending[:cut], self.pending[cut:]
        return compose_hangul(ready)

    def flush(self):
        ready, self.pending = self.pending, ""
        return compose_hangul(ready)


class _PlainText:
    def feed(self, text):
        return text

    def flush(self):
        return ""


def default_prime(vocab, hangul_jamo=False):
    """The prime when none is given: the most frequent character, or for a jamo run the most
    frequent one that can start text (a lone medial vowel or final consonant jamo cannot compose
    into a syllable, so every sample would open with a broken one)."""
    if hangul_jamo:
        for char in vocab.chars:  # most frequent first
            if not (_V_FIRST <= char <= _T_LAST or char == HANGUL_ESCAPE):
                return char
    return vocab.most_frequent


def known_prime(prime, vocab, hangul_jamo=False):
    """(the prime without the characters the vocabulary lacks, those characters once each in
    order); for a jamo run a syllable counts as lacking when one of its jamo is."""
    split = decompose_hangul if hangul_jamo else (lambda char: char)
    missing = [char for char in dict.fromkeys(prime) if vocab.unknown_chars(split(char))]
    dropped = set(missing)
    return "".join(char for char in prime if char not in dropped), missing


def check_sampling_options(length=1000, temperature=1.0, top_k=0, top_p=1.0, num_samples=1,
                           stop=None, unknown="error"):
    """Raise UsageError naming the first option out of range."""
    def require(condition, message):
        if not condition:
            raise UsageError(message)

    require(isinstance(length, (int, np.integer)) and length >= 0,
            f"length must be an integer >= 0, got {length!r}")
    require(temperature > 0, f"temperature must be > 0, got {temperature} "
                             f"(for greedy sampling use --argmax)")
    require(isinstance(top_k, (int, np.integer)) and top_k >= 0,
            f"top_k must be an integer >= 0 (0 turns it off), got {top_k!r}")
    require(0.0 < top_p <= 1.0, f"top_p must be in (0, 1] (1 turns it off), got {top_p}")
    require(isinstance(num_samples, (int, np.integer)) and num_samples >= 1,
            f"num_samples must be an integer >= 1, got {num_samples!r}")
    require(stop is None or (isinstance(stop, str) and stop != ""),
            "stop must be a non-empty string (leave it out for no stop string)")
    require(unknown in UNKNOWN_CHOICES,
            f"unknown must be one of {', '.join(UNKNOWN_CHOICES)}, got {unknown!r}")


class Generator:
    """Text from a CharRNN: a compiled chunked generation loop plus the prime and text handling.

    Constructing one is cheap: the loop is traced on the first call and then reused for every
    prime, length, option and seed (XLA compiles once more per new number of rows).
    """

    def __init__(self, model, vocab, hangul_jamo=False, chunk_length=None, loops="auto",
                 precision="float32", log=_stderr):
        if len(vocab) != model.vocab_size:
            raise CharRNNError(f"vocabulary has {len(vocab)} characters but the model expects "
                               f"{model.vocab_size}: use the run's own vocab.json")
        self.model, self.vocab, self.hangul_jamo = model, vocab, bool(hangul_jamo)
        self.loops, self.log = resolve_loops(loops), log
        self.precision = resolve_precision(precision, self.loops, requested=loops)
        if chunk_length is None:
            chunk_length = NATIVE_CHUNK_LENGTH if self.loops == "native" else CHUNK_LENGTH
        self.chunk_length = int(chunk_length)
        self.loaded = None  # the LoadedRun, for a Generator made by from_run
        self._prime_fn = tf.function(
            functools.partial(_prime_pass, model),
            input_signature=(tf.TensorSpec([None, None], tf.int32), state_specs(model)))
        self._chunk_fn = make_chunk_function(model, self.chunk_length, self.loops,
                                             precision=self.precision)

    @classmethod
    def from_run(cls, path=None, checkpoint=None, runs_dir="runs", log=_stderr, **kwargs):
        """A Generator for a run directory (its newest good checkpoint) or a checkpoint prefix."""
        from tf_charrnn.runs import load_run

        loaded = load_run(path, checkpoint, runs_dir, log=log)
        generator = cls(loaded.model, loaded.vocab, loaded.config.data.hangul_jamo, log=log,
                        **kwargs)
        generator.loaded = loaded
        return generator

    def prime_states(self, prime_ids):
        """prime_ids [N, P] (P >= 1) -> (last ids [N], states after all but the last id).

        One forward pass over the prime, not a call per character.
        """
        prime_ids = tf.convert_to_tensor(prime_ids, tf.int32)
        states = self.model.zero_states(int(prime_ids.shape[0]))
        if prime_ids.shape[1] > 1:
            states = self._prime_fn(prime_ids[:, :-1], states)
        return prime_ids[:, -1], states

    # -- text ------------------------------------------------------------------------------------

    def encode_prime(self, prime=None, unknown="error"):
        """The prime as model characters (jamo for a jamo run) and ids [P].

        None means default_prime. Characters not in the vocabulary (for a jamo run, syllables
        with a jamo not in it, named as typed) are an error listing them (unknown="error") or
        are dropped whole with a warning (unknown="skip").
        """
        if prime is None:
            prime = default_prime(self.vocab, self.hangul_jamo)
        prime, missing = known_prime(prime, self.vocab, self.hangul_jamo)
        if missing:
            listed = " ".join(map(repr, missing))
            if unknown == "error":
                raise CharRNNError(f"the prime has characters not in the run's vocabulary: "
                                   f"{listed}; remove them or pass --unknown skip")
            self.log(f"warning: dropping prime characters not in the vocabulary: {listed}")
        units = decompose_hangul(prime) if self.hangul_jamo else prime
        if not units:
            raise CharRNNError("the prime is empty: give at least one character of the "
                               "vocabulary (or leave --prime out for the most frequent one)")
        return units, self.vocab.encode(units).astype(np.int32)

    def _check_memory(self, rows, prime_length, length, keeps_text):
        """Refuse, before allocating anything, a batch that cannot fit in the memory available
        (else it grows until the system kills it). keeps_text: the whole text is held (generate),
        not handed on a chunk at a time (stream)."""
        model = self.model
        state_bytes = 4 * model.num_states * model.hidden_size
        # The prime pass holds about one layer at a time: its input, gate pre-activations and
        # output, a character each.
        inputs = model.vocab_size if model.one_hot else model.embedding_size
        prime_bytes = 4 * ((GATES[model.cell] + 2) * model.hidden_size + inputs)
        # Per row: a chunk's ids (the op's output and its NumPy copy), the states (in, out, the
        # prime pass's), the prime pass, the text kept (up to 4 bytes a character, and its
        # pieces before they are joined).
        kept = prime_length + (length if keeps_text else self.chunk_length)
        per_row = (8 * self.chunk_length + 4 * state_bytes + prime_bytes * prime_length
                   + 8 * kept + 256)
        available = available_memory_bytes()
        shorter = "fewer characters (-n) or a shorter prime" if keeps_text else "a shorter prime"
        check_fits(rows * per_row, f"{rows:,} samples of {length:,} characters",
                   f"ask for at most {max((available or 0) // per_row, 1):,} samples "
                   f"(--num-samples), {shorter}", available)

    def _rows(self, prime, length, temperature, top_k, top_p, argmax, seed, num_samples, stop,
              unknown, keeps_text):
        """Check the options, the memory and the prime now; return an iterator over the stream:
        one list of num_samples text pieces for the prime, then one per chunk."""
        check_sampling_options(length, temperature, top_k, top_p, num_samples, stop, unknown)
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, (int, np.integer))):
            raise UsageError(f"seed must be an integer (or None for a random one), got {seed!r}")
        units, prime_ids = self.encode_prime(prime, unknown)
        self._check_memory(num_samples, len(prime_ids), length, keeps_text)
        if seed is None:
            seed = random.SystemRandom().randrange(SEED_MODULUS)
        if stop is not None and self.hangul_jamo:
            stop = decompose_hangul(stop)
        options = (tf.constant(int(seed) % SEED_MODULUS, tf.int32),
                   tf.constant(temperature, tf.float32), tf.constant(top_k, tf.int32),
                   tf.constant(top_p, tf.float32), tf.constant(bool(argmax)))
        return self._chunks(units, prime_ids, length, options, num_samples, stop)

    def _chunks(self, units, prime_ids, length, options, rows, stop):
        seed, temperature, top_k, top_p, argmax = options
        composers = [JamoComposer() if self.hangul_jamo else _PlainText() for _ in range(rows)]
        yield [composer.feed(units) for composer in composers]

        ids, states = self.prime_states(np.tile(prime_ids, (rows, 1)))  # [N], states
        tails = [units] * rows  # the text before each chunk, for a stop string across chunks
        done = [False] * rows
        position = 0
        while position < length and not all(done):
            drawn, states = self._chunk_fn(ids, states, seed, tf.constant(position, tf.int32),
                                           temperature, top_k, top_p, argmax)  # [N, K]
            ids = drawn[:, -1]
            drawn = drawn.numpy()[:, :length - position]  # [N, <= K]
            position += self.chunk_length
            pieces = []
            for row in range(rows):
                if done[row]:
                    pieces.append("")
                    continue
                text = self.vocab.decode(drawn[row])
                if stop is not None:
                    # A jamo run keeps one more: a match at a chunk's end waits for the next jamo.
                    keep = len(stop) - (0 if self.hangul_jamo else 1)
                    tail = tails[row][-keep:] if keep else ""
                    end = find_stop(tail + text, stop, self.hangul_jamo)
                    if end >= 0:
                        text = text[:end - len(tail)]
                        done[row] = True
                    tails[row] = tail + text
                pieces.append(composers[row].feed(text))
            yield pieces
        rest = [composer.flush() for composer in composers]
        if any(rest):
            yield rest

    def stream(self, prime=None, length=1000, temperature=1.0, top_k=0, top_p=1.0, argmax=False,
               seed=None, num_samples=1, stop=None, unknown="error"):
        """An iterator over the text as it is generated: the prime first, then about a chunk at a
        time. Bad options and prime characters raise here, before anything is generated.

        With num_samples == 1 each item is a str (empty pieces are skipped); with more, each item
        is a list of num_samples strs, one per sample. Concatenated, the items are generate()'s
        result. See generate for the options.
        """
        rows = self._rows(prime, length, temperature, top_k, top_p, argmax, seed, num_samples,
                          stop, unknown, keeps_text=False)
        if num_samples > 1:
            return rows
        return (pieces[0] for pieces in rows if pieces[0])

    def generate(self, prime=None, length=1000, temperature=1.0, top_k=0, top_p=1.0,
                 argmax=False, seed=None, num_samples=1, stop=None, unknown="error"):
        """The prime followed by length generated characters (a str; a list of num_samples strs).

        temperature > 0 scales the logits; top_k > 0 and top_p < 1 cut the tail (see
        filter_logits); argmax takes the most likely character instead of drawing (a cut to
        top_k = 1). The same seed (an int, taken modulo 2**31) gives the same text, whatever
        the chunk length; None draws a fresh one. num_samples rows are generated together as one
        batch, each its own independent sample. stop ends a sample just after the first
        occurrence of that string that ends in the generated text. unknown says what to do with
        prime characters not in the vocabulary: "error" or "skip" them with a warning. For a
        jamo run, length and stop count jamo and the text is recomposed into syllables.
        """
        rows = self._rows(prime, length, temperature, top_k, top_p, argmax, seed, num_samples,
                          stop, unknown, keeps_text=True)  # the memory check: before any list
        pieces = [[] for _ in range(num_samples)]
        for row_pieces in rows:
            for row, piece in zip(pieces, row_pieces):
                row.append(piece)
        texts = ["".join(row) for row in pieces]
        return texts[0] if num_samples == 1 else texts


# ---------------------------------------------------------------------------------------------
# Speed: the compiled loop against the naive one-call-per-character loop.

def measure_sampling(generator, num_streams=1, seconds=3.0, prime=None):
    """Generated characters per second (all streams together) of generator.stream, after warm-up."""
    prime = default_prime(generator.vocab, generator.hangul_jamo) if prime is None else prime
    generator.generate(prime, generator.chunk_length, num_samples=num_streams, seed=0)  # compile
    count, start = 0, time.perf_counter()
    pieces = generator.stream(prime, length=2 ** 31 - 1, num_samples=num_streams, seed=1)
    next(pieces)  # the prime
    for piece in pieces:
        count += len(piece) if num_streams == 1 else sum(map(len, piece))
        if time.perf_counter() - start >= seconds:
            break
    pieces.close()
    return count / (time.perf_counter() - start)


def measure_naive_sampling(model, seconds=3.0, temperature=1.0, seed=0, compiled=False):
    """Characters per second of the naive loop: one model(...) call per character from Python and
    a numpy draw from its softmax, the way a first sampler is usually written. compiled=True
    wraps the one-character call in a tf.function (the per-character loop stays in Python)."""
    call = (lambda ids, states: model(ids, states, training=False))
    if compiled:
        call = tf.function(call, input_signature=(tf.TensorSpec([1, 1], tf.int32),
                                                  state_specs(model)))
    rng = np.random.default_rng(seed)
    states = model.zero_states(1)
    current = 0
    call(np.zeros([1, 1], np.int32), states)  # warm-up
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        logits, states = call(np.array([[current]], np.int32), states)
        scaled = logits.numpy()[0, -1].astype(np.float64) / temperature
        probs = np.exp(scaled - scaled.max())
        current = int(rng.choice(len(probs), p=probs / probs.sum()))
        count += 1
    return count / (time.perf_counter() - start)


# ---------------------------------------------------------------------------------------------
# Command line.

def parse_escapes(text, name="--stop"):
    """Interpret backslash escapes (\\n, \\t, \\u00e9, \\\\) in a command-line string."""
    try:
        with warnings.catch_warnings():  # an unknown escape such as \q stays as typed
            warnings.simplefilter("ignore", DeprecationWarning)
            return text.encode("latin-1", "backslashreplace").decode("unicode_escape")
    except UnicodeDecodeError as error:
        raise UsageError(f"{name} {text!r} has a bad backslash escape ({error.reason}): write "
                         f"\\n for a newline and \\\\ for a backslash") from None


def build_parser():
    parser = ArgumentParser(
        prog="python -m tf_charrnn.sample",
        description="Generate text from a trained run. The text streams to stdout, the prime "
                    "first; the run, checkpoint and seed used are named on stderr. Sampling "
                    "options left out take the run's config.yaml sample section (prime: the "
                    "most frequent character, length 1000, temperature 1.0, top-k and top-p "
                    "off, unless the run says otherwise). For a run trained on Hangul jamo the "
                    "prime is decomposed and the output recomposed into syllables; lengths count "
                    "jamo.")
    add_run_arguments(parser)
    parser.add_argument("--prime", metavar="TEXT",
                        help="text to start from (default: the most frequent character; for a "
                             "jamo run the most frequent that can start a syllable)")
    parser.add_argument("-n", "--length", type=int,
                        help="characters to generate after the prime (default: 1000)")
    parser.add_argument("--temperature", type=float,
                        help="> 0; lower is more conservative (default: 1.0)")
    parser.add_argument("--top-k", type=int, metavar="K",
                        help="draw from the K most likely characters only; 0 is off (default)")
    parser.add_argument("--top-p", type=float, metavar="P",
                        help="draw from the fewest most likely characters that hold probability "
                             "P, in (0, 1]; 1 is off (default)")
    parser.add_argument("--argmax", action="store_true",
                        help="always take the most likely character (greedy)")
    parser.add_argument("--seed", type=int,
                        help="the same seed gives the same text (default: a fresh one, printed "
                             "on stderr)")
    parser.add_argument("--num-samples", type=int, default=1, metavar="N",
                        help="N independent samples generated together as one batch, printed "
                             "when done with a divider between them (default: 1, streamed)")
    parser.add_argument("--stop", metavar="STRING",
                        help="end a sample just after this string; backslash escapes are read, "
                             "e.g. '\\n\\n' for a blank line")
    parser.add_argument("--loops", choices=LOOPS, default="auto",
                        help="the generation loop: native (C++, the fastest), xla, plain, or "
                             "auto (native where it builds, else xla; the default). A seed's "
                             "text depends on the loop; xla gives the exported SavedModel's")
    parser.add_argument("--precision", choices=PRECISIONS, default="float32",
                        help="of the native loop's products: float32 (the default) or bfloat16 "
                             "(CPUs with AVX-512 BF16; on AMX tiles, Intel Xeons of the 4th "
                             "generation on, 2.2x-6.7x float32's characters/s for 64 streams, "
                             "1.1x-4.0x for one; with AVX-512 BF16 dot products, AMD Zen 4, "
                             "1.48x-2.8x and 1.35x-4.9x; cell math and draw stay float32)")
    parser.add_argument("--unknown", choices=UNKNOWN_CHOICES, default="error",
                        help="prime characters not in the vocabulary: fail listing them "
                             "(error, the default) or drop them with a warning (skip)")
    add_debug_flag(parser)
    return parser


def sampling_options(args, sample_config):
    """The generate() keyword arguments from parsed flags, unset ones from a SampleConfig."""
    def pick(flag, field):
        return getattr(sample_config, field) if flag is None else flag

    return {"prime": pick(args.prime, "prime"), "length": pick(args.length, "length"),
            # --argmax takes the likeliest id whatever the temperature (even 0, then unused)
            "temperature": 1.0 if args.argmax else pick(args.temperature, "temperature"),
            "top_k": pick(args.top_k, "top_k"), "top_p": pick(args.top_p, "top_p"),
            "argmax": args.argmax, "seed": args.seed, "num_samples": args.num_samples,
            "stop": None if args.stop is None else parse_escapes(args.stop),
            "unknown": args.unknown}


def sample_divider(index, count):
    return f"\n{'=' * 24} sample {index} of {count} {'=' * 24}\n"


def write_samples(generator, options, out=None):
    """Stream one sample to out (stdout) as it is generated, or print several with dividers."""
    out = sys.stdout if out is None else out
    if options["num_samples"] == 1:
        last = ""
        for piece in generator.stream(**options):
            out.write(piece)
            out.flush()
            last = piece
        if not last.endswith("\n"):
            out.write("\n")
    else:
        texts = generator.generate(**options)
        for index, text in enumerate(texts, 1):
            out.write(sample_divider(index, len(texts)).lstrip("\n") if index == 1
                      else sample_divider(index, len(texts)))
            out.write(text)
        out.write("\n")
    out.flush()


def main(argv=None):
    args = build_parser().parse_args(argv)
    check_sampling_options(**{key: value for key, value in
                              sampling_options(args, SampleConfig()).items()
                              if key not in ("prime", "argmax", "seed")})
    generator = Generator.from_run(args.run, args.checkpoint, args.runs_dir, loops=args.loops,
                                   precision=args.precision)
    loaded = generator.loaded
    _stderr(f"checkpoint {loaded.checkpoint.prefix} (step {loaded.checkpoint.step})")
    options = sampling_options(args, loaded.config.sample)
    if options["seed"] is None and not options["argmax"]:
        options["seed"] = random.SystemRandom().randrange(SEED_MODULUS)
        _stderr(f"seed {options['seed']} (pass --seed {options['seed']} to repeat this text)")
    try:
        write_samples(generator, options)
    except BrokenPipeError:
        # The reader left (e.g. `| head`): stop quietly, and keep the interpreter's final flush
        # from failing again.
        drop_stdout()
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
