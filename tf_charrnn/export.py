"""Export a trained run as a SavedModel that generates text with nothing but TensorFlow.

    python -m tf_charrnn.export --run runs/NAME --out exported/NAME

The SavedModel is a tf.Module holding the model's variables, with the vocabulary baked into the
graph as constants, and one function (also the serving signature "generate"):

    generate(prime: tf.string [], length: tf.int32 [], temperature: tf.float32 [],
             seed: tf.int64 []) -> tf.string []

    loaded = tf.saved_model.load("exported/NAME")
    text = loaded.generate(tf.constant("ROMEO:"), tf.constant(200), tf.constant(0.8),
                           tf.constant(7, tf.int64)).numpy().decode("utf-8")
    # or: loaded.signatures["generate"](prime=..., length=..., ...)["text"]

Everything runs in the graph: the prime's UTF-8 is decoded to code points and looked up in the
vocabulary (a sorted code point table and tf.searchsorted; characters not in the vocabulary are
dropped, and a prime left empty starts from sample.default_prime), the state is primed by
one pass over the prime, `length` characters are drawn by tf_charrnn.sample's chunk function
(the XLA-compiled loop, seeded with (seed mod 2**31, position), so a seed gives the same text
as `python -m tf_charrnn.sample --loops xla --seed` with top-k and top-p off; the sampler's
default native loop draws its own numbers), and the ids go back to code points and UTF-8. The
text returned is the prime's known characters followed by the generated ones. temperature <= 0,
length < 0 or length > MAX_LENGTH (2**27) fail with InvalidArgumentError. Loading needs a
TensorFlow with XLA (the pip package has it); `--no-xla` exports a loop that does not.

Hangul: for a run trained on jamo (data.hangul_jamo), the exported function does both halves of
text.decompose_hangul / text.compose_hangul in the graph, so callers pass and receive ordinary
syllables; `length` then counts jamo, a syllable with a jamo the vocabulary lacks is dropped
whole (as the sampler's --unknown skip does), and the last syllable of the prime may be extended
by a generated final consonant.
"""

import shutil
import sys
from pathlib import Path

import numpy as np
import tensorflow as tf

from tf_charrnn.cli import (ArgumentParser, add_debug_flag, add_run_arguments, path_argument,
                            run_cli)
from tf_charrnn.errors import CharRNNError
from tf_charrnn.kernels import portable_loops
from tf_charrnn.sample import CHUNK_LENGTH, SEED_MODULUS, default_prime, make_chunk_function
from tf_charrnn.text import HANGUL_ESCAPE

# Hangul arithmetic, as in tf_charrnn.text: a syllable is S_BASE + (L * V_COUNT + V) * T_COUNT + T.
_S_BASE, _S_COUNT = 0xAC00, 11172
_L_BASE, _V_BASE, _T_BASE = 0x1100, 0x1161, 0x11A7
_L_COUNT, _V_COUNT, _T_COUNT = 19, 21, 28  # _T_BASE + 0 means "no final"
_N_COUNT = _V_COUNT * _T_COUNT
_JAMO_FIRST, _JAMO_LAST = 0x1100, 0x11FF
_ESCAPE = ord(HANGUL_ESCAPE)


def _between(codes, first, last):
    return (codes >= first) & (codes <= last)


def decompose_hangul_codepoints(codes, with_sources=False):
    """In-graph text.decompose_hangul on code points [P] int32 -> [P'] int32 (with_sources:
    also [P'], the index of the code point each came from)."""
    codes = tf.cast(codes, tf.int32)
    offset = codes - _S_BASE
    is_syllable = _between(offset, 0, _S_COUNT - 1)
    is_escaped = _between(codes, _JAMO_FIRST, _JAMO_LAST) | (codes == _ESCAPE)
    final = offset % _T_COUNT
    # Each code point becomes up to three: [L, V, T] for a syllable, [escape, c] for an existing
    # jamo or escape mark, [c] otherwise.
    first = tf.where(is_syllable, _L_BASE + offset // _N_COUNT,
                     tf.where(is_escaped, _ESCAPE, codes))
    second = tf.where(is_syllable, _V_BASE + (offset % _N_COUNT) // _T_COUNT, codes)
    third = _T_BASE + final
    candidates = tf.stack([first, second, third], axis=1)  # [P, 3]
    keep = tf.stack([tf.ones_like(is_syllable), is_syllable | is_escaped,
                     is_syllable & (final > 0)], axis=1)  # [P, 3]
    decomposed = tf.boolean_mask(candidates, keep)
    if not with_sources:
        return decomposed
    sources = tf.repeat(tf.range(tf.size(codes)), tf.reduce_sum(tf.cast(keep, tf.int32), 1))
    return decomposed, sources


def compose_hangul_codepoints(codes):
    """In-graph text.compose_hangul on code points [L] int32 -> [L'] int32.

    Scans left to right as compose_hangul's pattern does: an escape mark and the character after
    it become that character; L V with an optional T becomes a syllable; anything else stays.
    """
    codes = tf.cast(codes, tf.int32)
    size = tf.size(codes)
    padded = tf.concat([codes, [-1, -1]], axis=0)  # no character matches -1

    def body(index, out, count):
        c0, c1, c2 = padded[index], padded[index + 1], padded[index + 2]
        escaped = (c0 == _ESCAPE) & (index + 1 < size)
        pair = (_between(c0, _L_BASE, _L_BASE + _L_COUNT - 1)
                & _between(c1, _V_BASE, _V_BASE + _V_COUNT - 1))
        triple = pair & _between(c2, _T_BASE + 1, _T_BASE + _T_COUNT - 1)
        syllable = (_S_BASE + ((c0 - _L_BASE) * _V_COUNT + c1 - _V_BASE) * _T_COUNT
                    + tf.where(triple, c2 - _T_BASE, 0))
        value = tf.where(escaped, c1, tf.where(pair, syllable, c0))
        step = tf.where(escaped, 2, tf.where(triple, 3, tf.where(pair, 2, 1)))
        return index + step, out.write(count, value), count + 1

    out = tf.TensorArray(tf.int32, size=0, dynamic_size=True, element_shape=[])
    _, out, _ = tf.while_loop(lambda index, *_: index < size, body,
                              (tf.constant(0), out, tf.constant(0)))
    return out.stack()


MAX_LENGTH = 2 ** 27  # characters a call: about 0.5 GB of ids, far from int32's wrap


class ExportedGenerator(tf.Module):
    """What the SavedModel holds: the model's variables, the vocabulary, `generate`."""

    def __init__(self, model, vocab, hangul_jamo=False, jit_compile=True,
                 chunk_length=CHUNK_LENGTH):
        super().__init__(name="charrnn_generator")
        self.model_variables = list(model.variables)
        codepoints = np.array([ord(char) for char in vocab.chars], np.int32)
        order = np.argsort(codepoints, kind="stable")
        self._vocab_codepoints = codepoints          # [V], by id
        self._sorted_codepoints = codepoints[order]  # [V], ascending
        self._sorted_to_id = order.astype(np.int32)
        self._default_prime_id = vocab.chars.index(default_prime(vocab, hangul_jamo))
        self._hangul_jamo = bool(hangul_jamo)
        self._chunk_length = int(chunk_length)
        # The model lives in the functions' closures, not as a tracked attribute, so the
        # SavedModel holds plain variables and graphs and loads without Keras or this package.
        chunk = make_chunk_function(model, self._chunk_length, "xla" if jit_compile else "plain",
                                    batch_size=1)
        signature = (tf.TensorSpec([], tf.string, name="prime"),
                     tf.TensorSpec([], tf.int32, name="length"),
                     tf.TensorSpec([], tf.float32, name="temperature"),
                     tf.TensorSpec([], tf.int64, name="seed"))
        self.generate = tf.function(
            lambda prime, length, temperature, seed:
                self._generate(model, chunk, prime, length, temperature, seed),
            input_signature=signature)
        self.generate_signature = tf.function(
            lambda prime, length, temperature, seed:
                {"text": self.generate(prime, length, temperature, seed)},
            input_signature=signature)

    def _prime_ids(self, prime):
        """A UTF-8 scalar -> ids [P] of its characters in the vocabulary (P >= 1)."""
        codes = tf.strings.unicode_decode(prime, "UTF-8", errors="replace")  # [P]
        characters = tf.size(codes)
        sources = tf.range(characters)  # the prime's character each code point belongs to
        if self._hangul_jamo:
            codes, sources = decompose_hangul_codepoints(codes, with_sources=True)
        table = tf.constant(self._sorted_codepoints)
        position = tf.minimum(tf.searchsorted(table, codes), tf.size(table) - 1)
        known = tf.cast(tf.gather(table, position) == codes, tf.int32)
        # A character is kept whole or dropped whole (a syllable with one unknown jamo: all).
        whole = tf.gather(tf.math.unsorted_segment_min(known, sources, characters), sources) > 0
        ids = tf.gather(tf.constant(self._sorted_to_id), tf.boolean_mask(position, whole))
        return tf.cond(tf.size(ids) > 0, lambda: ids,
                       lambda: tf.constant([self._default_prime_id], tf.int32))

    def _generate(self, model, chunk, prime, length, temperature, seed):
        checks = [tf.debugging.assert_greater(temperature, 0.0,
                                              message="temperature must be > 0"),
                  tf.debugging.assert_non_negative(length, message="length must be >= 0"),
                  tf.debugging.assert_less_equal(length, MAX_LENGTH, message=(
                      f"length must be at most {MAX_LENGTH:,} (the text is returned whole)"))]
        with tf.control_dependencies(checks):
            length, temperature = tf.identity(length), tf.identity(temperature)
        ids = self._prime_ids(prime)[None, :]  # [1, P]
        zero = model.zero_states(1)
        states = tf.cond(tf.shape(ids)[1] > 1,
                         lambda: model(ids[:, :-1], zero, training=False)[1],
                         lambda: zero)
        seed = tf.cast(tf.math.floormod(seed, SEED_MODULUS), tf.int32)
        size = self._chunk_length
        num_chunks = (length + size - 1) // size

        def body(index, last, states, drawn):
            ids, states = chunk(last, states, seed, index * size, temperature, 0, 1.0, False)
            return index + 1, ids[:, -1], states, drawn.write(index, ids[0])  # ids [1, K]

        drawn = tf.TensorArray(tf.int32, size=num_chunks, element_shape=[size])
        _, _, _, drawn = tf.while_loop(lambda index, *_: index < num_chunks, body,
                                       (tf.constant(0), ids[:, -1], states, drawn))
        generated = tf.reshape(drawn.stack(), [-1])[:length]  # [length]
        codes = tf.gather(tf.constant(self._vocab_codepoints), tf.concat([ids[0], generated], 0))
        if self._hangul_jamo:
            codes = compose_hangul_codepoints(codes)
        return tf.strings.unicode_encode(codes, "UTF-8")


def export_model(model, vocab, out, hangul_jamo=False, jit_compile=True):
    """Write the SavedModel of (model, vocab) to the directory out."""
    # The graphs are traced here, while saving: keep this package's native ops out of them.
    with portable_loops():
        module = ExportedGenerator(model, vocab, hangul_jamo, jit_compile)
        tf.saved_model.save(
            module, str(out),
            signatures={"generate": module.generate_signature.get_concrete_function()})
    return module


def export_run(out, path=None, checkpoint=None, runs_dir="runs", jit_compile=True, log=print):
    """Load a run (its newest good checkpoint, or `checkpoint`) and export it to out."""
    from tf_charrnn.runs import load_run

    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise CharRNNError(f"--out {out} already exists and is not empty: remove it or choose "
                           f"another directory")
    loaded = load_run(path, checkpoint, runs_dir, log=log)
    log(f"checkpoint {loaded.checkpoint.prefix} (step {loaded.checkpoint.step})")
    created = not out.exists()
    try:
        out.mkdir(parents=True, exist_ok=True)
        export_model(loaded.model, loaded.vocab, out, loaded.config.data.hangul_jamo,
                     jit_compile)
    except (OSError, tf.errors.OpError) as error:
        if created:
            shutil.rmtree(out, ignore_errors=True)  # no half-written SavedModel left behind
        reason = getattr(error, "strerror", None) or getattr(error, "message", None) or error
        raise CharRNNError(f"cannot write the SavedModel to {out} ({str(reason).strip()[:160]}): "
                           f"check the path and free space") from None
    return loaded


def build_parser():
    parser = ArgumentParser(
        prog="python -m tf_charrnn.export",
        description="Export a trained run as a SavedModel with a 'generate' signature: "
                    "(prime: string, length: int32, temperature: float32, seed: int64) -> text: "
                    "string. It needs only TensorFlow to load and run. For a run trained on "
                    "Hangul jamo the prime is decomposed and the text recomposed into syllables "
                    "inside the graph (length counts jamo).")
    add_run_arguments(parser)
    parser.add_argument("--out", required=True, metavar="DIR", type=path_argument,
                        help="new (or empty) directory for the SavedModel")
    parser.add_argument("--no-xla", dest="jit_compile", action="store_false",
                        help="do not compile the generation loop with XLA (for a TensorFlow "
                             "runtime without XLA; slower, and a seed then gives other text "
                             "than tf_charrnn.sample's)")
    add_debug_flag(parser)
    return parser


def _stderr(message):
    print(message, file=sys.stderr, flush=True)


def main(argv=None):
    args = build_parser().parse_args(argv)
    export_run(args.out, args.run, args.checkpoint, args.runs_dir, args.jit_compile,
               log=_stderr)
    print(f"exported {args.out}: tf.saved_model.load({str(args.out)!r}).generate(prime, length, "
          f"temperature, seed)")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
