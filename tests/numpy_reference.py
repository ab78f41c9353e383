"""Float64 numpy references of the model, written from Keras's definitions of its cells: what the
tests hold the layers, the kernels and the generation loops to (benchmarks/
bfloat16_sampling_loss.py measures with the same model_step)."""

import numpy as np
import tensorflow as tf


def sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def lstm_cell(xw, hu, c):
    """Keras's LSTM step from its two products (the bias in xw): gates i, f, c, o -> (h, c)."""
    i, f, g, o = np.split(xw + hu, 4, axis=-1)
    c = sigmoid(f) * c + sigmoid(i) * np.tanh(g)
    return sigmoid(o) * np.tanh(c), c


def gru_cell(xw, hu, h):
    """Keras's GRU step, reset_after=True, from x W + input bias and h U + recurrent bias: gates
    z, r, h -> h."""
    (x_z, x_r, x_h), (h_z, h_r, h_h) = np.split(xw, 3, axis=-1), np.split(hu, 3, axis=-1)
    z, r = sigmoid(x_z + h_z), sigmoid(x_r + h_r)
    return z * h + (1.0 - z) * np.tanh(x_h + r * h_h)


def rnn_cell(xw, hu):
    return np.tanh(xw + hu)


def to_bfloat16(array):
    """float32, then rounded to bfloat16 (to nearest even), back as float64."""
    return tf.cast(tf.cast(tf.constant(array, tf.float32), tf.bfloat16), tf.float64).numpy()


def model_step(model, ids, states, bfloat16=False):
    """One character per row (ids [N]) through a CharRNN in float64 -> (logits [N, V], states).

    bfloat16: the bfloat16 generation loop's contract: every product's operands rounded to
    bfloat16 (the weights, each layer's h, the input a layer takes from the one below) except
    the first layer's input projection (a row of the loop's float32 table); sums, biases and
    cell math exact.
    """
    cast = to_bfloat16 if bfloat16 else (lambda array: np.asarray(array, np.float64))
    weight = lambda variable: np.asarray(variable.numpy(), np.float64)  # noqa: E731
    per_layer, x, new_states = model.states_per_layer, None, []
    for index, layer in enumerate(model.rnn_layers):
        kernel, recurrent, bias = (weight(w) for w in (layer.cell.kernel,
                                                       layer.cell.recurrent_kernel,
                                                       layer.cell.bias))
        input_bias, recurrent_bias = (bias[0], bias[1]) if bias.ndim == 2 else (bias, 0.0)
        if index == 0:
            rows = (np.eye(model.vocab_size) if model.one_hot
                    else weight(model.embedding.embeddings))
            xw = rows[ids] @ kernel + input_bias
        else:
            xw = cast(x) @ cast(kernel) + input_bias
        layer_states = [np.asarray(state, np.float64)
                        for state in states[index * per_layer:(index + 1) * per_layer]]
        hu = cast(layer_states[0]) @ cast(recurrent) + recurrent_bias
        if model.cell == "lstm":
            x, c = lstm_cell(xw, hu, layer_states[1])
            new_states += [x, c]
        else:
            x = gru_cell(xw, hu, layer_states[0]) if model.cell == "gru" else rnn_cell(xw, hu)
            new_states.append(x)
    logits = cast(x) @ cast(weight(model.head.kernel)) + weight(model.head.bias)
    return logits, new_states
