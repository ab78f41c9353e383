#!/usr/bin/env python
"""Sampling speed: the compiled chunked loop against the naive one-call-per-character loop.

For the lecture-size model (2-layer LSTM 128 over an embedding of 128, V = 65, random weights:
speed does not depend on training), measured in one process, one after another:

    naive            one eager model(...) call per character from Python, numpy draw
    naive, compiled  the same loop with the one-character call in a tf.function
    graph N          Generator.stream on the plain tf.while_loop graph, N streams in one batch
    XLA N            the same loop compiled with XLA (the exported SavedModel's), N streams
    native N         the native loop (one C++ op; the Generator's default where it builds)
    native bf16 N    the native loop with precision bfloat16 (products on AMX tiles, else
                     AVX-512 BF16 dot products), where the CPU has AVX-512 BF16

and the ratios the sampler is held to: compiled 1 stream >= 10x naive, 64 streams >= 20x the
chars/s of 1 stream (each loop against itself, and the best 64-stream rate against the best
one-stream rate). Times are wall-clock over --seconds each, after a warm-up (tracing, XLA
compilation); small shared machines are noisy, so --repeats takes the best of several rounds.

    python benchmarks/sample_speed.py [--seconds 3] [--repeats 2] [--streams 1 64] [--json out.json]
"""

import argparse
import dataclasses
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))



import keras  # noqa: E402

from tf_charrnn import native  # noqa: E402
from tf_charrnn.config import ModelConfig  # noqa: E402
from tf_charrnn.data import Vocab  # noqa: E402
from tf_charrnn.models import build_model, resolve_kernel  # noqa: E402
from tf_charrnn.sample import Generator, measure_naive_sampling, measure_sampling  # noqa: E402

# The 65 characters of tiny Shakespeare.
CHARS = " !$&',-.3:;?ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz\n"


def lecture_model(kernel):
    keras.utils.set_random_seed(0)
    config = ModelConfig(cell="lstm", num_layers=2, hidden_size=128, embedding_size=128,
                         kernel=kernel)
    try:
        return build_model(config, len(CHARS))
    except (ImportError, AttributeError):
        print(f"kernel {kernel!r} is not available here; using keras", file=sys.stderr)
        return build_model(dataclasses.replace(config, kernel="keras"), len(CHARS))


def run(seconds=3.0, repeats=2, streams=(1, 64), kernel="auto"):
    vocab = Vocab(CHARS)
    model = lecture_model(kernel)
    generators = {"graph": Generator(model, vocab, loops="plain"),
                  "XLA": Generator(model, vocab, loops="xla")}
    auto = Generator(model, vocab)  # what Generator uses unless told otherwise
    if auto.loops == "native":
        generators["native"] = auto
        if native.bfloat16_generation():
            generators["native bf16"] = Generator(model, vocab, precision="bfloat16")
    default = {"native": "native", "xla": "XLA"}[auto.loops]
    results = {}

    def best(name, measure):
        results[name] = max(measure() for _ in range(repeats))
        print(f"{name:>20}: {results[name]:12,.0f} chars/s", flush=True)

    print(f"lecture model, {resolve_kernel(model.kernel)} kernel for the naive loops, "
          f"V={len(vocab)}, {seconds:g} s x best of {repeats}")
    best("naive", lambda: measure_naive_sampling(model, seconds))
    best("naive, compiled", lambda: measure_naive_sampling(model, seconds, compiled=True))
    for mode, generator in generators.items():
        for count in streams:
            best(f"{mode} {count}", lambda: measure_sampling(generator, count, seconds))

    ratios = {}
    for mode in generators:
        ratios[f"{mode} 1 / naive"] = results[f"{mode} 1"] / results["naive"]
        ratios[f"{mode} 1 / naive, compiled"] = results[f"{mode} 1"] / results["naive, compiled"]
        for count in streams:
            if count != 1:
                ratios[f"{mode} {count} / {mode} 1"] = results[f"{mode} {count}"] / \
                    results[f"{mode} 1"]
    print()
    for name, ratio in ratios.items():
        print(f"{name:>28}: {ratio:8.1f}x")
    print()
    print(f"target compiled 1 stream >= 10x naive: {ratios[f'{default} 1 / naive']:.1f}x "
          f"({'met' if ratios[f'{default} 1 / naive'] >= 10 else 'NOT met'})")
    if 64 in streams:
        ratio = ratios[f"{default} 64 / {default} 1"]
        print(f"target 64 streams >= 20x 1 stream: {ratio:.1f}x "
              f"({'met' if ratio >= 20 else 'NOT met'}; graph: "
              f"{ratios['graph 64 / graph 1']:.1f}x, XLA: {ratios['XLA 64 / XLA 1']:.1f}x)")
        best = (max(results[f"{mode} 64"] for mode in generators) /
                max(results[f"{mode} 1"] for mode in generators))
        ratios["best 64 / best 1"] = best
        print(f"best 64 streams / best 1 stream (any loop or precision): {best:.1f}x "
              f"({'met' if best >= 20 else 'NOT met'})")
    return {"chars_per_second": results, "ratios": ratios}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=3.0, help="per measurement")
    parser.add_argument("--repeats", type=int, default=2, help="rounds; the best is kept")
    parser.add_argument("--streams", type=int, nargs="+", default=[1, 64])
    parser.add_argument("--kernel", default="auto", choices=("auto", "keras", "fused"),
                        help="the model's recurrent kernel (the naive loops run it)")
    parser.add_argument("--json", metavar="PATH", help="also write the numbers here")
    args = parser.parse_args(argv)
    streams = sorted(set(args.streams) | {1})
    result = run(args.seconds, args.repeats, streams, args.kernel)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
