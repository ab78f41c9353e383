#!/usr/bin/env python
"""Micro benchmark: tf.matmul GFLOP/s by dtype (float32, bfloat16) and compiler (graph, XLA).

Shapes (m, k, n) are the ones the models run: the per-step recurrent product of a batch
([B, H] x [H, 4H]) and the GEMMs over all steps ([B*T, D] x [D, 4H]). Each measurement is a
tf.function that chains 10 products (so none can be folded away), timed after a warm-up call;
TensorFlow's graph matmul goes to oneDNN (AMX or AVX-512 BF16 for bfloat16 where the CPU has
them), XLA's CPU backend uses its own.

This is what decided which products of the fused kernel take bfloat16 under mixed_bfloat16:
the big GEMMs in graph mode gain 3-4x, the per-step product inside the XLA loop loses.

    python benchmarks/matmul_dtypes.py [--seconds 1]
"""

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import tf_charrnn  # noqa: E402,F401  (quiets TensorFlow's start-up notices)
import tensorflow as tf  # noqa: E402

SHAPES = [(50, 128, 512), (64, 128, 512), (64, 256, 1024), (2500, 128, 512),
          (6400, 256, 1024), (2500, 512, 2048)]
CHAIN = 5  # pairs of products per call: [m, k] @ [k, n] @ [n, k]


def gflops(m, k, n, dtype, jit, seconds):
    a = tf.cast(tf.random.normal([m, k]), dtype)
    b = tf.cast(tf.random.normal([k, n]) * 0.01, dtype)
    c = tf.cast(tf.random.normal([n, k]) * 0.01, dtype)

    @tf.function(jit_compile=jit)
    def chain(a, b, c):
        for _ in range(CHAIN):
            a = tf.matmul(tf.matmul(a, b), c)
        return a

    chain(a, b, c).numpy()
    calls, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds or calls < 3:
        chain(a, b, c).numpy()
        calls += 1
    per_call = (time.perf_counter() - start) / calls
    return 2 * m * k * n * 2 * CHAIN / per_call / 1e9


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=1.0, help="time per measurement")
    args = parser.parse_args()
    variants = [(tf.float32, False), (tf.float32, True), (tf.bfloat16, False), (tf.bfloat16, True)]
    titles = [f"{dtype.name}{' XLA' if jit else ''}" for dtype, jit in variants]
    print("| m, k, n | " + " | ".join(titles) + " |")
    print("|---" * (len(titles) + 1) + "|")
    for m, k, n in SHAPES:
        rates = [gflops(m, k, n, dtype, jit, args.seconds) for dtype, jit in variants]
        print(f"| {m}, {k}, {n} | " + " | ".join(f"{r:.0f}" for r in rates) + " |", flush=True)


if __name__ == "__main__":
    main()
