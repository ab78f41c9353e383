#!/usr/bin/env python
"""Micro benchmark: forward + backward of a 2-layer recurrent stack, stock Keras vs fused kernels.

Sizes (B batch rows, T time steps, D input features, H units, two layers):
    lecture   B=50  T=50   D=128  H=128
    medium    B=64  T=100  D=64   H=256   (the second layer's input is H wide)

One step is a tf.function that runs the stack on fixed random inputs with random non-zero initial
states and takes the gradient of a scalar loss with respect to the inputs, the initial states and
every weight (no optimizer update). Variants, measured in one process with their repeats
interleaved (the machine is shared, so only same-run ratios mean anything):

    keras        keras.layers.LSTM / GRU / SimpleRNN
    fused        tf_charrnn.kernels.FusedLSTM / FusedGRU / FusedSimpleRNN with the loops the layers
                 choose (kernels.choose_loops: native C++ where it built, else XLA)
    fused-xla    the same fused recurrence with its loops compiled by XLA (--xla)
    fused-plain  the same fused recurrence with plain tf.while_loops (--plain)
    keras-xla    the stock layers inside tf.function(jit_compile=True) (--keras-xla)

Each round times every variant for about --seconds; the table shows the median over --repeats
rounds in steps/s and the median of the per-round ratios against keras.

    python benchmarks/kernels_micro.py [--cells lstm gru] [--sizes lecture medium]
        [--repeats 7] [--seconds 0.5] [--xla] [--plain] [--keras-xla]
"""

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from tf_charrnn import kernels  # noqa: E402

SIZES = {
    "lecture": dict(batch=50, steps=50, features=128, units=128),
    "medium": dict(batch=64, steps=100, features=64, units=256),
}
LAYERS = {
    "lstm": (keras.layers.LSTM, kernels.FusedLSTM, 2),
    "gru": (keras.layers.GRU, kernels.FusedGRU, 1),
    "simple_rnn": (keras.layers.SimpleRNN, kernels.FusedSimpleRNN, 1),
}
GATES = {"lstm": 4, "gru": 3, "simple_rnn": 1}


class WithLoops:
    """A fused layer class whose recurrence runs the given loops (one of kernels.LOOPS)."""

    def __init__(self, layer_class, loops):
        self.layer_class, self.loops = layer_class, loops

    def __call__(self, *args, **kwargs):
        layer = self.layer_class(*args, **kwargs)
        layer._fused_loops = self.loops
        return layer


def make_step(layer_class, cell, size, seed=0, jit_compile=False):
    """A compiled fwd+bwd step over a fresh 2-layer stack; identical weights for every variant."""
    keras.utils.set_random_seed(seed)
    rng = np.random.default_rng(seed)
    n_states = LAYERS[cell][2]
    b, t, d, h = size["batch"], size["steps"], size["features"], size["units"]
    layers = [layer_class(h, return_sequences=True, return_state=True) for _ in range(2)]
    x = tf.constant(rng.standard_normal((b, t, d)), tf.float32)
    states = [[tf.constant(0.1 * rng.standard_normal((b, h)), tf.float32) for _ in range(n_states)]
              for _ in layers]
    inputs = x
    for layer, layer_states in zip(layers, states):
        inputs = layer(inputs, initial_state=layer_states)[0]
    weights = [w for layer in layers for w in layer.trainable_variables]

    def step():
        with tf.GradientTape() as tape:
            tape.watch([x] + [s for layer_states in states for s in layer_states])
            outputs = x
            loss = 0.0
            for layer, layer_states in zip(layers, states):
                outputs, *final = layer(outputs, initial_state=layer_states, training=True)
                loss += sum(tf.reduce_sum(f * f) for f in final)
            loss += tf.reduce_mean(tf.square(outputs))
        grads = tape.gradient(loss, [x] + weights)
        return tf.add_n([tf.reduce_sum(g) for g in grads])

    return tf.function(step, jit_compile=jit_compile)


def measure(steps, repeats, seconds):
    """Interleaved rounds -> {name: [seconds per step, one per round]}."""
    counts = {}
    for name, step in steps.items():
        step().numpy()  # trace and compile
        start = time.perf_counter()
        step().numpy()
        counts[name] = max(1, int(seconds / (time.perf_counter() - start)))
    times = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            start = time.perf_counter()
            for _ in range(counts[name]):
                result = step()
            result.numpy()
            times[name].append((time.perf_counter() - start) / counts[name])
    return times


def run(cells=("lstm", "gru"), sizes=("lecture", "medium"), repeats=7, seconds=0.5, xla=False,
        plain=False, keras_xla=False):
    print(f"TensorFlow {tf.__version__}, Keras {keras.__version__}, "
          f"loops={kernels.choose_loops(tf.float32)}, "
          f"{os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}")
    print(f"{'cell':<10} {'size':<8} {'variant':<12} {'steps/s':>8} {'GFLOP/s':>8} {'x keras':>8}")
    rows = []
    for size_name in sizes:
        size = SIZES[size_name]
        for cell in cells:
            stock, fused, _ = LAYERS[cell]
            steps = {"keras": make_step(stock, cell, size), "fused": make_step(fused, cell, size)}
            if xla:
                steps["fused-xla"] = make_step(WithLoops(fused, "xla"), cell, size)
            if plain:
                steps["fused-plain"] = make_step(WithLoops(fused, "plain"), cell, size)
            if keras_xla:
                steps["keras-xla"] = make_step(stock, cell, size, jit_compile=True)
            times = measure(steps, repeats, seconds)
            b, t, d, h = size["batch"], size["steps"], size["features"], size["units"]
            flops = 3 * 2 * b * t * ((d + h) + (h + h)) * GATES[cell] * h  # fwd + 2x bwd GEMMs
            for name, seconds_per_step in times.items():
                median = statistics.median(seconds_per_step)
                ratio = statistics.median(k / v for k, v in zip(times["keras"], seconds_per_step))
                rows.append((cell, size_name, name, 1 / median, ratio))
                print(f"{cell:<10} {size_name:<8} {name:<12} {1 / median:8.2f} "
                      f"{flops / median / 1e9:8.1f} {ratio:8.2f}", flush=True)
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cells", nargs="+", default=["lstm", "gru"], choices=sorted(LAYERS))
    parser.add_argument("--sizes", nargs="+", default=["lecture", "medium"], choices=sorted(SIZES))
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--seconds", type=float, default=0.5)
    parser.add_argument("--xla", action="store_true", help="also time fused loops under XLA")
    parser.add_argument("--plain", action="store_true", help="also time fused loops without XLA")
    parser.add_argument("--keras-xla", action="store_true", help="also time Keras under XLA")
    args = parser.parse_args(argv)
    run(args.cells, args.sizes, args.repeats, args.seconds, args.xla, args.plain, args.keras_xla)


if __name__ == "__main__":
    main()
