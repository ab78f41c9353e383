#!/usr/bin/env python
"""What `sample --precision bfloat16` costs in quality: a trained run's loss on held-out text.

The bfloat16 generation loop rounds the weights and each layer's h to bfloat16 for the products
and keeps everything else float32. This script feeds --streams rows of the last characters of
--text (held out from training: the end of a file split 90/10) through the run's model, one
character at a time with the state carried, and reports the mean cross-entropy of the next
character, in nats, three ways:

    float32    the model's own step (sample.model_step, the float32 generation loop's math)
    float64    the same step in float64 numpy, no rounding
    bfloat16   the float64 step with the bfloat16 loop's rounding (its contract, as the tests
               hold the native op to it)

    python benchmarks/bfloat16_sampling_loss.py --run runs/NAME --text input.txt [--chars 1000]
"""

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import tensorflow as tf  # noqa: E402

from tf_charrnn.runs import load_run  # noqa: E402
from tf_charrnn.sample import model_step  # noqa: E402


def to_bfloat16(array):
    return tf.cast(tf.cast(tf.constant(array, tf.float32), tf.bfloat16), tf.float64).numpy()


def numpy_step(model, ids, states, rounded):
    """One character per row in float64; rounded: the bfloat16 loop's rounding of the
    products' operands (not of the first layer's input projection, a float32 table row)."""
    cast = to_bfloat16 if rounded else (lambda array: np.asarray(array, np.float64))

    def sigmoid(x):
        return 1.0 / (1.0 + np.exp(-x))

    per_layer, x, new_states = model.states_per_layer, None, []
    for index, layer in enumerate(model.rnn_layers):
        kernel, recurrent, bias = (np.asarray(w.numpy(), np.float64) for w in (
            layer.cell.kernel, layer.cell.recurrent_kernel, layer.cell.bias))
        input_bias, recurrent_bias = (bias[0], bias[1]) if bias.ndim == 2 else (bias, 0.0)
        if index == 0:
            rows = (np.eye(model.vocab_size) if model.one_hot
                    else np.asarray(model.embedding.embeddings.numpy(), np.float64))
            xw = rows[ids] @ kernel + input_bias
        else:
            xw = cast(x) @ cast(kernel) + input_bias
        h = states[index * per_layer]
        hu = cast(h) @ cast(recurrent) + recurrent_bias
        if model.cell == "lstm":
            i, f, g, o = np.split(xw + hu, 4, axis=1)
            c = sigmoid(f) * states[index * per_layer + 1] + sigmoid(i) * np.tanh(g)
            h = sigmoid(o) * np.tanh(c)
            new_states += [h, c]
        elif model.cell == "gru":
            (xz, xr, xh), (hz, hr, hh) = np.split(xw, 3, axis=1), np.split(hu, 3, axis=1)
            z, r = sigmoid(xz + hz), sigmoid(xr + hr)
            h = z * h + (1 - z) * np.tanh(xh + r * hh)
            new_states.append(h)
        else:
            h = np.tanh(xw + hu)
            new_states.append(h)
        x = h
    head = np.asarray(model.head.kernel.numpy(), np.float64)
    logits = cast(x) @ cast(head) + np.asarray(model.head.bias.numpy(), np.float64)
    return logits, new_states


def cross_entropy(logits, targets):
    logits = np.asarray(logits, np.float64)
    shifted = logits - logits.max(axis=1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    return -log_probs[np.arange(len(targets)), targets].mean()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", required=True, help="a trained run directory")
    parser.add_argument("--text", required=True, help="a text file; its end is read")
    parser.add_argument("--streams", type=int, default=32)
    parser.add_argument("--chars", type=int, default=1000, help="per stream")
    args = parser.parse_args(argv)
    loaded = load_run(args.run, log=lambda message: print(message, file=sys.stderr))
    model, vocab = loaded.model, loaded.vocab
    text = Path(args.text).read_text(encoding="utf-8")
    known = set(vocab.chars)
    text = "".join(char for char in text if char in known)
    size = args.streams * (args.chars + 1)
    ids = vocab.encode(text[-size:]).reshape(args.streams, args.chars + 1)
    zeros = [np.zeros([args.streams, model.hidden_size]) for _ in range(model.num_states)]
    states = {"float32": model.zero_states(args.streams), "float64": zeros,
              "bfloat16": list(zeros)}
    losses = {name: [] for name in states}
    for t in range(args.chars):
        for name in states:
            if name == "float32":
                logits, states[name] = model_step(model, ids[:, t], states[name])
                logits = logits.numpy()
            else:
                logits, states[name] = numpy_step(model, ids[:, t], states[name],
                                                  rounded=name == "bfloat16")
            losses[name].append(cross_entropy(logits, ids[:, t + 1]))
    print(f"{args.run}: {args.streams} streams x {args.chars} characters of the end of "
          f"{args.text}, mean next-character loss (nats):")
    for name, values in losses.items():
        print(f"  {name:>8}: {np.mean(values):.5f}")
    print(f"  bfloat16 - float32: {np.mean(losses['bfloat16']) - np.mean(losses['float32']):+.5f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
