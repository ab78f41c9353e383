#!/usr/bin/env python
"""Micro benchmark: the native time loops alone (tf_charrnn/native_loops.cc), forward and backward.

For each cell and size it times one call of the forward op (with the Jacobian factors, as training
runs it) and one of the backward op on fixed random inputs, and prints the median over --repeats
rounds of about --seconds each, in milliseconds per call, with the rate of the per-step products
(h @ U forward, dZ @ U^T backward: 2 B H G FLOPs a step each) in GFLOP/s.

Sizes (T steps, B batch rows, H units), as the benchmark's recipes run their layers:
    lecture   T=50   B=50  H=128
    medium    T=100  B=64  H=256
    large     T=50   B=50  H=512

To compare two versions of the loops, run this script from each checkout in turn (the loops are
built per source, so each checkout loads its own): the machine is shared, so alternate the runs.

    python benchmarks/native_loops_micro.py [--cells lstm gru simple_rnn]
        [--sizes lecture medium large] [--repeats 5] [--seconds 1]
"""

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from tf_charrnn import kernels, native  # noqa: E402

SIZES = {"lecture": (50, 50, 128), "medium": (100, 64, 256), "large": (50, 50, 512)}
GATES = {"lstm": 4, "gru": 3, "simple_rnn": 1}


def loop_calls(kind, steps, batch, units):
    """(forward, backward) as compiled functions of no arguments on fixed random inputs."""
    math = kernels._MATHS[kind]
    gates = GATES[kind] * units
    rng = np.random.default_rng(0)

    def normal(*shape, scale=1.0):
        return tf.constant(scale * rng.standard_normal(shape), tf.float32)

    bias = normal(2, gates) if kind == "gru" else normal(gates)
    _, _, _, consts = math.prepare(normal(units, gates), normal(units, gates, scale=units ** -0.5),
                                   bias)
    xw = normal(steps, batch, gates)
    states0 = tuple(normal(batch, units) for _ in range(math.n_states))
    d_hs = normal(steps, batch, units)
    d_final = tuple(normal(batch, units) for _ in states0)
    u_t = tf.transpose(consts[0])
    forward = tf.function(lambda: kernels._native_forward_loop(kind, True, xw, states0, consts))
    factors = forward()[2]
    backward = tf.function(
        lambda: kernels._native_backward_loop(kind, factors, d_hs, d_final, u_t))
    return forward, backward


def time_call(call, seconds, repeats):
    call()
    per_call = []
    for _ in range(repeats):
        count, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds or count == 0:
            call()  # eager on the CPU: returns once the op has run
            count += 1
        per_call.append((time.perf_counter() - start) / count)
    return statistics.median(per_call)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cells", nargs="+", default=["lstm", "gru"], choices=sorted(GATES))
    parser.add_argument("--sizes", nargs="+", default=["lecture", "medium"], choices=list(SIZES))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=1.0)
    args = parser.parse_args()
    if native.library() is None:
        sys.exit("the native loops are unavailable here (see the message above)")
    print(f"{'cell':<11}{'size':<9}{'pass':<10}{'ms/call':>9}{'GFLOP/s':>9}")
    for kind in args.cells:
        for size in args.sizes:
            steps, batch, units = SIZES[size]
            flops = 2 * steps * batch * units * GATES[kind] * units
            for name, call in zip(("forward", "backward"), loop_calls(kind, steps, batch, units)):
                seconds = time_call(call, args.seconds, args.repeats)
                print(f"{kind:<11}{size:<9}{name:<10}{seconds * 1e3:>9.3f}"
                      f"{flops / seconds / 1e9:>9.1f}")


if __name__ == "__main__":
    main()
