"""GPU check: the lecture recipe on the GPU for a short while; is cuDNN used, how fast is it?

    python scripts/gpu_check.py                 # about 60-120 s on a GPU machine
    python scripts/gpu_check.py --seconds 20 --corpus linux_kernel

For one_device, and for mirrored when several GPUs are visible, the real trainer runs
configs/lecture.yaml (2-layer LSTM 128, batch 50 x 50) for --seconds of training after its first
compiled call, and one table row is printed per strategy:

    kernel     what model.kernel resolves to: 'keras' on a GPU, whose LSTM/GRU is cuDNN's
    cuDNN op   the CudnnRNN* op found in the graph of the trainer's compiled step (that op has
               GPU kernels only, so a step that ran with it ran cuDNN); 'none' means Keras fell
               back to its generic loop (a cell option cuDNN does not support)
    chars/s    characters trained per second over every compiled call after the first (the
               first one traces and compiles)

mirrored keeps 50 rows per replica (global batch 50 x replicas), so its chars/s against
one_device's is the scaling a user gets from adding GPUs at the same per-replica load.

The default corpus is this project's own source text, repeated to a few megabytes: training speed
depends on the vocabulary size (under 100 here, as for the kernel), not on what the text says, and
it needs neither network nor kernel sources. --corpus takes anything train accepts.

Without a GPU the script says so and exits 0 without training (--cpu runs the same measurement on
the CPU, to check the script itself). Exit status 1: a GPU run did not use cuDNN.
"""

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CORPUS_BYTES = 3 << 20
NEVER = 10 ** 9  # a step count no run reaches: evaluation, sampling, checkpoints stay out


class Deadline:
    """A stop flag for train(): false until started, then true after `seconds`."""

    signal_name = "the time limit"

    def __init__(self, seconds):
        self.seconds, self.end = seconds, None

    def start(self):
        if self.end is None:
            self.end = time.monotonic() + self.seconds

    def __bool__(self):
        return self.end is not None and time.monotonic() >= self.end


def project_corpus(directory):
    """This project's Python, Markdown and YAML text in ASCII (a kernel-sized vocabulary under
    100), repeated to CORPUS_BYTES, as input.txt."""
    parts = [path.read_text(encoding="utf-8", errors="replace")
             for pattern in ("tf_charrnn/*.py", "tests/*.py", "scripts/*.py", "*.md",
                             "configs/*.yaml")
             for path in sorted(REPO.glob(pattern))]
    text = "\n".join(parts).encode("ascii", "ignore").decode("ascii")
    path = Path(directory) / "project_text" / "input.txt"
    path.parent.mkdir(parents=True)
    path.write_text(text * max(1, CORPUS_BYTES // max(len(text), 1)), encoding="utf-8")
    return path


def graph_op_types(concrete_function):
    """Every op type in a concrete function's graph and the functions it calls (loop bodies)."""
    graph_def = concrete_function.graph.as_graph_def()
    types = {node.op for node in graph_def.node}
    for function in graph_def.library.function:
        types.update(node.op for node in function.node_def)
    return types


def measure(config, seconds):
    """Train config for `seconds` after the first compiled call; return one table row (dict)."""
    from tf_charrnn import train as trainer
    from tf_charrnn.models import resolve_kernel

    deadline = Deadline(seconds)
    seen = {"calls": [], "args": None, "train_call": None, "replicas": None}
    make_train_call = trainer.make_train_call

    def timed_train_call(model, optimizer, progress, strategy, config):
        train_call = make_train_call(model, optimizer, progress, strategy, config)
        seen["train_call"], seen["replicas"] = train_call, strategy.num_replicas_in_sync

        def call(xs, ys):
            start = time.perf_counter()
            losses, norms = train_call(xs, ys)
            losses.numpy()  # wait for the device
            seen["calls"].append((xs.size, time.perf_counter() - start, float(losses[-1])))
            seen["args"] = (xs, ys)
            deadline.start()
            return losses, norms

        return call

    trainer.make_train_call = timed_train_call
    try:
        result = trainer.train(config, run_name=f"gpu_check-{config.train.strategy}",
                               stop_flag=deadline)
    finally:
        trainer.make_train_call = make_train_call
    steady = seen["calls"][1:] or seen["calls"]
    chars_per_sec = sum(chars for chars, _, _ in steady) / sum(sec for _, sec, _ in steady)
    op_types = graph_op_types(seen["train_call"].get_concrete_function(*seen["args"]))
    cudnn = sorted(op for op in op_types if op.startswith("CudnnRNN"))
    return {"strategy": config.train.strategy, "replicas": seen["replicas"],
            "rows": config.data.batch_size // seen["replicas"],
            "kernel": resolve_kernel(config.model.kernel), "cudnn": ",".join(cudnn) or "none",
            "steps": result.step, "chars_per_sec": chars_per_sec,
            "loss": statistics.fmean(loss for _, _, loss in seen["calls"][-10:])}


def print_table(rows):
    header = ("strategy", "replicas", "rows/replica", "kernel", "cuDNN op", "steps", "chars/s",
              "loss")
    lines = [header] + [(row["strategy"], str(row["replicas"]), str(row["rows"]), row["kernel"],
                         row["cudnn"], str(row["steps"]), f"{row['chars_per_sec']:,.0f}",
                         f"{row['loss']:.3f}") for row in rows]
    widths = [max(len(line[column]) for line in lines) for column in range(len(header))]
    for line in lines:
        print("  ".join(cell.ljust(width) for cell, width in zip(line, widths)).rstrip())


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(REPO / "configs/lecture.yaml"))
    parser.add_argument("--corpus", help="default: this project's text, repeated")
    parser.add_argument("--seconds", type=float, default=40.0,
                        help="training time per strategy after the first compiled call")
    parser.add_argument("--cpu", action="store_true",
                        help="measure on the CPU when no GPU is visible (checks this script)")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                        help="override a config field, as for train")
    args = parser.parse_args(argv)

    from tf_charrnn import tfenv  # first: TensorFlow's start-up noise stays off the terminal
    import tensorflow as tf

    with tfenv.stderr_silenced(tfenv.QUIET):  # CUDA probing (a failed cuInit where none is)
        gpus = tf.config.list_physical_devices("GPU")
    if not gpus and not args.cpu:
        print("gpu_check: no GPU visible to TensorFlow; nothing to measure. The GPU path stays "
              "untested until this script has run on a machine with a GPU.")
        return 0
    from tf_charrnn.config import apply_overrides, load_config, parse_override

    names = [tf.config.experimental.get_device_details(gpu).get("device_name", gpu.name)
             for gpu in gpus]
    print(f"gpu_check: TensorFlow {tf.__version__}, GPUs: {', '.join(names) or 'none (--cpu)'}")
    strategies = ["one_device"] + (["mirrored"] if len(gpus) > 1 else [])
    rows = []
    with tempfile.TemporaryDirectory(prefix="gpu_check-") as scratch:
        corpus = args.corpus or str(project_corpus(scratch))
        base = apply_overrides(load_config(args.config), [
            ("data", "corpus", corpus), ("data", "val_fraction", 0.0),
            ("train", "runs_dir", str(Path(scratch) / "runs")), ("train", "max_steps", NEVER),
            ("train", "eval_every", NEVER), ("train", "sample_every", NEVER),
            ("train", "checkpoint_every", NEVER), ("train", "log_every", 100),
            *[parse_override(text) for text in args.set]])
        for strategy in strategies:
            replicas = len(gpus) if strategy == "mirrored" else 1
            batch_size = base.data.batch_size * replicas  # the same rows per replica
            config = apply_overrides(base, [("train", "strategy", strategy),
                                            ("data", "batch_size", batch_size)])
            print(f"--- {strategy}: {config.data.batch_size} rows over {replicas} replica(s), "
                  f"{args.seconds:g} s of training")
            rows.append(measure(config, args.seconds))
    print()
    print_table(rows)
    if gpus and any(row["kernel"] != "keras" or row["cudnn"] == "none" for row in rows):
        print("gpu_check: FAILED: a GPU run did not use cuDNN's recurrent kernel")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
