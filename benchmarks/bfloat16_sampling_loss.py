#!/usr/bin/env python
"""What `sample --precision bfloat16` costs in quality: a trained run's loss on held-out text.

The bfloat16 generation loop rounds the weights and each layer's h to bfloat16 for the products
and keeps everything else float32. This script feeds --streams rows of the last characters of
--text (held out from training: the end of a file split 90/10) through the run's model, one
character at a time with the state carried, and reports the mean cross-entropy of the next
character, in nats, three ways:

    float32    the model's own step (sample.model_step, the float32 generation loop's math)
    float64    the same step in float64 numpy, no rounding (tests/numpy_reference.py)
    bfloat16   that float64 step with the bfloat16 loop's rounding: the model of it the tests
               hold the native op to

    python benchmarks/bfloat16_sampling_loss.py --run runs/NAME --text input.txt [--chars 1000]
"""

import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]  # the package, and the tests' numpy model

from numpy_reference import model_step as numpy_step  # noqa: E402
from tf_charrnn.runs import load_run  # noqa: E402
from tf_charrnn.sample import model_step  # noqa: E402


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
                                                  bfloat16=name == "bfloat16")
            losses[name].append(cross_entropy(logits, ids[:, t + 1]))
    print(f"{args.run}: {args.streams} streams x {args.chars} characters of the end of "
          f"{args.text}, mean next-character loss (nats):")
    for name, values in losses.items():
        print(f"  {name:>8}: {np.mean(values):.5f}")
    print(f"  bfloat16 - float32: {np.mean(losses['bfloat16']) - np.mean(losses['float32']):+.5f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
