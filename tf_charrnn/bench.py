"""The benchmark: `python -m tf_charrnn.bench` prints a table and writes JSON.

For each recipe (lecture, medium, large, gru, min_char_rnn) it measures, in one process:
- train_chars_per_sec: the real compiled train call (make_train_call) in steady state, after
  warm-up, median of repeats;
- flops_per_char: forward matmul FLOPs per character (training costs 3x: forward, and the two
  backward products);
- matmul_gflops: tf.matmul's rate on the very GEMM shapes the model runs (the input projection
  [B*T, D] x [D, G], the recurrent product [B, H] x [H, G], the output layer [B*T, H] x [H, V]),
  combined by FLOP weight: the time the model's matmuls alone would take;
- roofline_fraction: train FLOP/s over that matmul rate: how close training is to the time its
  own matrix products need;
- sample_chars_per_sec_1 / _64: the compiled generation loop, one stream and 64 streams;
  sample_chars_per_sec_1_bfloat16 / _64_bfloat16 the same with `--precision bfloat16` (where
  the CPU has AVX-512 BF16); sample_64_over_1: the best 64-stream rate over the best one-stream
  rate;
  naive_sample_chars_per_sec: one model(...) call per character from a Python loop;
- preprocess_mb_per_sec and preprocess_peak_rss_mb: building the id cache of a generated corpus,
  in a child process so its peak memory is its own;
- val_loss_at_budget (with --val-budget S): tiny-shakespeare, 90/10 split, trained from scratch
  for S seconds by the real trainer, with dropout --val-dropout (default 0.1, the shakespeare
  recipe's) on each layer's output and our schedule --val-schedule (default the recipe's); the
  PyTorch peer's budget run gets the same dropout and a constant rate (the throughput runs have
  no dropout on either side);
- peak_rss_mb of the benchmark process.
`--vs-torch` runs benchmarks/torch_peer.py (PyTorch, same model math) in turn for each recipe, in
a child process, and prints tf_charrnn / PyTorch ratios measured in the same run.
"""

import importlib.util
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from tf_charrnn import cli, native
from tf_charrnn.config import Config, apply_overrides, load_config, recipe_path
from tf_charrnn.errors import CharRNNError, UsageError

REPO = Path(__file__).resolve().parents[1]
TORCH_PEER = REPO / "benchmarks" / "torch_peer.py"
TORCH_MISSING = "--vs-torch needs PyTorch: pip install torch==2.13.0 (a CPU build will do)"
SHARED_SHAKESPEARE = REPO.parent / "shared" / "data" / "tinyshakespeare" / "input.txt"
VOCAB_SIZE = 65  # tiny-shakespeare's

SIZES = {
    "lecture": dict(cell="lstm", num_layers=2, hidden_size=128, embedding_size=128,
                    batch_size=50, seq_length=50),
    "medium": dict(cell="lstm", num_layers=2, hidden_size=256, embedding_size=64,
                   batch_size=64, seq_length=100),
    "large": dict(cell="lstm", num_layers=3, hidden_size=512, embedding_size=128,
                  batch_size=50, seq_length=50),
    "gru": dict(cell="gru", num_layers=2, hidden_size=128, embedding_size=128,
                batch_size=50, seq_length=50),
    "min_char_rnn": None,  # configs/min_char_rnn.yaml as it is
}
TORCH_RECIPES = ("lecture", "medium", "large", "gru")


def recipe_config(name, kernel="auto", steps_per_call=None, precision="float32"):
    """The Config a benchmark recipe trains with."""
    if name not in SIZES:
        raise UsageError(f"unknown recipe '{name}': choose from {', '.join(SIZES)}")
    size = SIZES[name]
    if size is None:
        config = load_config(recipe_path("min_char_rnn"))
    else:
        config = apply_overrides(Config(), [
            ("data", "batch_size", size["batch_size"]), ("data", "seq_length", size["seq_length"]),
            ("model", "cell", size["cell"]), ("model", "num_layers", size["num_layers"]),
            ("model", "hidden_size", size["hidden_size"]),
            ("model", "embedding_size", size["embedding_size"])])
    overrides = [("model", "kernel", kernel), ("model", "precision", precision)]
    if steps_per_call:
        overrides.append(("train", "steps_per_call", steps_per_call))
    return apply_overrides(config, overrides)


def gemm_shapes(config, vocab_size):
    """The (m, k, n) matmuls of one training step's forward pass: ((m, k, n), count, dtype).

    count is how often each runs; dtype the one it runs in: under mixed_bfloat16 the fused
    kernel's input projections take bfloat16 operands while its loops (the per-step product) and
    the output layer stay float32. The first layer's input projection counts as a GEMM, as in the
    peers' FLOP counts, though a one-hot or embedded input lets a kernel read it as rows of the
    weight matrix.
    """
    from tf_charrnn.models import GATES, resolve_kernel

    data, model = config.data, config.model
    low = "bfloat16" if model.precision == "mixed_bfloat16" else "float32"
    per_step = "float32" if resolve_kernel(model.kernel) == "fused" else low
    gates = GATES[model.cell] * model.hidden_size
    rows = data.batch_size * data.seq_length
    shapes = []
    width = vocab_size if model.one_hot else model.embedding_size
    for _ in range(model.num_layers):
        shapes.append(((rows, width, gates), 1, low))
        shapes.append(((data.batch_size, model.hidden_size, gates), data.seq_length, per_step))
        width = model.hidden_size
    shapes.append(((rows, model.hidden_size, vocab_size), 1, "float32"))
    return shapes


def flops_per_char(config, vocab_size):
    chars = config.data.batch_size * config.data.seq_length
    shapes = gemm_shapes(config, vocab_size)
    return sum(2 * m * k * n * count for (m, k, n), count, _ in shapes) / chars


def measure_matmul_gflops(config, vocab_size, seconds=1.0):
    """tf.matmul's GFLOP/s on the model's own GEMM shapes and dtypes, combined by FLOP weight."""
    import tensorflow as tf

    total_flops, total_time = 0.0, 0.0
    for (m, k, n), count, dtype in gemm_shapes(config, vocab_size):
        a = tf.random.normal([m, k], dtype=dtype)
        b = tf.random.normal([k, n], dtype=dtype)
        repeats = 20

        @tf.function
        def run(a, b):
            out = tf.zeros([m, n], dtype)
            for _ in tf.range(repeats):
                out += tf.matmul(a, b)
            return out

        run(a, b).numpy()
        samples, deadline = [], time.perf_counter() + seconds
        while time.perf_counter() < deadline or len(samples) < 3:
            start = time.perf_counter()
            run(a, b).numpy()
            samples.append((time.perf_counter() - start) / repeats)
        per_call = min(samples)  # the achievable rate: least disturbed by the shared machine
        total_flops += 2 * m * k * n * count
        total_time += per_call * count
    return total_flops / total_time / 1e9


def build_training(config, vocab_size):
    """Model, optimiser and compiled train call, as train() makes them."""
    import keras
    import tensorflow as tf

    from tf_charrnn.models import build_model
    from tf_charrnn.train import TrainProgress, make_optimizer, make_schedule, make_train_call

    keras.utils.set_random_seed(0)
    strategy = tf.distribute.get_strategy()
    model = build_model(config.model, vocab_size)
    optimizer = make_optimizer(config.train, make_schedule(config.train, 1000, 10 ** 6),
                               config.model.precision)
    optimizer.build(model.trainable_variables)
    progress = TrainProgress(model, config.data.batch_size)
    return model, make_train_call(model, optimizer, progress, strategy, config)


def measure_training(config, vocab_size, seconds, repeats=3):
    """Steady-state training characters per second: median over repeats, after warm-up."""
    model, train_call = build_training(config, vocab_size)
    data = config.data
    steps = config.train.steps_per_call
    rng = np.random.default_rng(0)
    xs = rng.integers(0, vocab_size, (steps, data.batch_size, data.seq_length)).astype(np.int32)
    ys = np.roll(xs, -1, axis=2)
    for _ in range(2):
        train_call(xs, ys)[0].numpy()
    rates = []
    for _ in range(repeats):
        count, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds / repeats or count == 0:
            train_call(xs, ys)[0].numpy()
            count += steps
        rates.append(count * data.batch_size * data.seq_length / (time.perf_counter() - start))
    return statistics.median(rates), model


def measure_sampling_speed(model, seconds):
    from tf_charrnn.data import Vocab
    from tf_charrnn.sample import Generator, measure_naive_sampling, measure_sampling

    vocab = Vocab("".join(chr(32 + i) for i in range(model.vocab_size)))
    generator = Generator(model, vocab, log=lambda *a: None)
    result = {"sample_chars_per_sec_1": measure_sampling(generator, 1, seconds),
              "sample_chars_per_sec_64": measure_sampling(generator, 64, seconds),
              "naive_sample_chars_per_sec": measure_naive_sampling(model, seconds)}
    if generator.loops == "native" and native.bfloat16_generation():
        generator = Generator(model, vocab, precision="bfloat16", log=lambda *a: None)
        for streams in (1, 64):
            result[f"sample_chars_per_sec_{streams}_bfloat16"] = measure_sampling(
                generator, streams, seconds)
    # The batch's gain: 64 streams' best rate over one stream's best, either precision each.
    result["sample_64_over_1"] = (max(result["sample_chars_per_sec_64"],
                                      result.get("sample_chars_per_sec_64_bfloat16", 0.0)) /
                                  max(result["sample_chars_per_sec_1"],
                                      result.get("sample_chars_per_sec_1_bfloat16", 0.0)))
    return result


def peak_rss_mb():
    """This process's peak resident memory. VmHWM, unlike ru_maxrss, starts afresh at exec, so a
    child's figure is its own and not its parent's."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


_PREPROCESS_CHILD = """
import json, sys, time
from tf_charrnn.bench import peak_rss_mb
from tf_charrnn.data import CorpusIds
start = time.perf_counter()
corpus = CorpusIds.load(sys.argv[1], log=lambda *a: None)
elapsed = time.perf_counter() - start
print(json.dumps({"seconds": elapsed, "chars": int(len(corpus.ids)), "peak_rss_mb": peak_rss_mb()}))
"""


def make_corpus(path, megabytes):
    """A corpus of the given size: tiny-shakespeare repeated when present, else random words."""
    if SHARED_SHAKESPEARE.is_file():
        block = SHARED_SHAKESPEARE.read_bytes()
    else:
        rng = np.random.default_rng(0)
        words = ["".join(chr(97 + c) for c in rng.integers(0, 26, rng.integers(1, 9)))
                 for _ in range(5000)]
        block = " ".join(rng.choice(words, 200000)).encode()
    target = int(megabytes * 1e6)
    with open(path, "wb") as handle:
        written = 0
        while written < target:
            piece = block[:target - written]
            handle.write(piece)
            written += len(piece)


def measure_preprocess(megabytes):
    """Build the id cache of a generated corpus in a child process: MB/s and its peak RSS."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "input.txt"
        make_corpus(path, megabytes)
        done = subprocess.run([sys.executable, "-c", _PREPROCESS_CHILD, str(path)],
                              capture_output=True, text=True, check=True)
        result = json.loads(done.stdout.strip().splitlines()[-1])
    return {"preprocess_mb": megabytes,
            "preprocess_mb_per_sec": megabytes / result["seconds"],
            "preprocess_peak_rss_mb": result["peak_rss_mb"]}


def measure_val_loss(config, budget_seconds, corpus_path, dropout=0.0, schedule=None):
    """Validation loss after budget_seconds of training from scratch (90/10 split), dropout on
    each layer's output, the recipe's learning-rate schedule or the one given. The time budget is
    what stops the run, not the recipe's epoch count (the PyTorch peer has none)."""
    from tf_charrnn.train import train

    with tempfile.TemporaryDirectory() as tmp:
        corpus = Path(tmp) / "corpus" / "input.txt"
        corpus.parent.mkdir()
        corpus.write_bytes(Path(corpus_path).read_bytes())
        config = apply_overrides(config, [
            ("data", "corpus", str(corpus)), ("data", "val_fraction", 0.1),
            ("model", "dropout", float(dropout)),
            ("train", "schedule", schedule or config.train.schedule),
            ("train", "max_seconds", float(budget_seconds)), ("train", "epochs", 10 ** 6),
            ("train", "runs_dir", tmp),
            ("train", "eval_every", 10 ** 9), ("train", "sample_every", 10 ** 9),
            ("train", "checkpoint_every", 10 ** 9), ("train", "log_every", 10 ** 9)])
        result = train(config, run_name="bench", log=lambda *a: None, show_progress=False)
    return {"val_loss_at_budget": result.val_loss, "steps_at_budget": result.step,
            "epochs_at_budget": result.epoch, "val_dropout": float(dropout),
            "val_schedule": schedule or config.train.schedule}


def run_torch_peer(recipe, seconds, val_budget, corpus_path, val_dropout=0.0):
    if not TORCH_PEER.is_file():
        raise CharRNNError(f"{TORCH_PEER} not found: --vs-torch needs the repository checkout")
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "torch.json"
        command = [sys.executable, str(TORCH_PEER), "--recipe", recipe, "--seconds", str(seconds),
                   "--json", str(out), "--quiet"]
        if corpus_path:
            command += ["--corpus", str(corpus_path)]
        if val_budget:
            command += ["--val-budget", str(val_budget), "--val-dropout", str(val_dropout)]
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            last = (done.stderr.strip().splitlines() or ["no output"])[-1]
            if "No module named 'torch'" in done.stderr:
                raise CharRNNError(TORCH_MISSING)
            raise CharRNNError(f"the PyTorch peer failed: {last}")
        return json.loads(out.read_text())[recipe]


def bench_recipe(name, args):
    config = recipe_config(name, args.kernel, args.steps_per_call, args.precision)
    result = {"recipe": name, "kernel": config.model.kernel, "precision": args.precision,
              "steps_per_call": config.train.steps_per_call}
    result["flops_per_char"] = flops_per_char(config, VOCAB_SIZE)
    result["matmul_gflops"] = measure_matmul_gflops(config, VOCAB_SIZE, args.matmul_seconds)
    result["train_chars_per_sec"], model = measure_training(config, VOCAB_SIZE, args.seconds)
    train_gflops = result["train_chars_per_sec"] * 3 * result["flops_per_char"] / 1e9
    result["train_gflops"] = train_gflops
    # Tiny GEMMs (min-char-rnn's [1, 100] x [100, 100]) time tf.matmul's per-op overhead, not
    # the arithmetic: no meaningful matmul limit exists for them.
    if min(m * k * n for (m, k, n), _, _ in gemm_shapes(config, VOCAB_SIZE)) >= 500_000:
        result["roofline_fraction"] = train_gflops / result["matmul_gflops"]
    if not args.no_sample:
        result.update(measure_sampling_speed(model, args.sample_seconds))
    if args.val_budget:
        # The peers' recipes take the dropout; min_char_rnn keeps its own (the seed's) recipe.
        dropout = args.val_dropout if name in TORCH_RECIPES else 0.0
        result.update(measure_val_loss(config, args.val_budget, args.corpus, dropout,
                                       args.val_schedule))
    if args.vs_torch and name in TORCH_RECIPES:
        peer = run_torch_peer(name, args.seconds, args.val_budget, args.corpus, args.val_dropout)
        result["torch"] = peer
        result["train_ratio_vs_torch"] = result["train_chars_per_sec"] / peer["train_chars_per_sec"]
        if "sample_chars_per_sec_1" in result:
            result["sample_ratio_vs_torch"] = (result["sample_chars_per_sec_1"] /
                                               peer["sample_chars_per_sec_1"])
    return result


def format_table(results):
    columns = [("recipe", "recipe", "{}"), ("train chars/s", "train_chars_per_sec", "{:,.0f}"),
               ("train GFLOP/s", "train_gflops", "{:.1f}"),
               ("matmul GFLOP/s", "matmul_gflops", "{:.1f}"),
               ("of matmul", "roofline_fraction", "{:.0%}"),
               ("sample 1", "sample_chars_per_sec_1", "{:,.0f}"),
               ("sample 64", "sample_chars_per_sec_64", "{:,.0f}"),
               ("sample 1 bf16", "sample_chars_per_sec_1_bfloat16", "{:,.0f}"),
               ("sample 64 bf16", "sample_chars_per_sec_64_bfloat16", "{:,.0f}"),
               ("64 / 1", "sample_64_over_1", "{:.1f}x"),
               ("naive 1", "naive_sample_chars_per_sec", "{:,.0f}"),
               ("val loss", "val_loss_at_budget", "{:.3f}"),
               ("torch chars/s", ("torch", "train_chars_per_sec"), "{:,.0f}"),
               ("vs torch", "train_ratio_vs_torch", "{:.2f}x"),
               ("torch val loss", ("torch", "val_loss_at_budget"), "{:.3f}"),
               ("torch sample 1", ("torch", "sample_chars_per_sec_1"), "{:,.0f}")]

    def cell(result, key, fmt):
        value = result.get(key[0], {}).get(key[1]) if isinstance(key, tuple) else result.get(key)
        return "-" if value is None else fmt.format(value)

    used = [column for column in columns
            if any(cell(r, column[1], column[2]) != "-" for r in results)]
    rows = [[title for title, _, _ in used]]
    rows += [[cell(r, key, fmt) for _, key, fmt in used] for r in results]
    lines = ["| " + " | ".join(row) + " |" for row in rows]
    lines.insert(1, "|" + "|".join("---" for _ in used) + "|")
    return "\n".join(lines)


def build_parser():
    parser = cli.ArgumentParser(prog="python -m tf_charrnn.bench",
                                description="Measure training, sampling and preprocessing speed.")
    parser.add_argument("--recipe", action="append", choices=list(SIZES),
                        help="a recipe to measure (repeatable; default: all)")
    parser.add_argument("--seconds", type=float, default=10.0,
                        help="training time measured per recipe (split into 3 repeats)")
    parser.add_argument("--sample-seconds", type=float, default=3.0)
    parser.add_argument("--matmul-seconds", type=float, default=0.5)
    parser.add_argument("--no-sample", action="store_true", help="skip the sampling measurements")
    parser.add_argument("--kernel", default="auto", choices=("auto", "keras", "fused"))
    parser.add_argument("--precision", default="float32", choices=("float32", "mixed_bfloat16"),
                        help="the model's precision (mixed_bfloat16: bfloat16 GEMMs, float32 "
                             "loops; the PyTorch peer stays float32)")
    parser.add_argument("--steps-per-call", type=int, default=None,
                        help="train steps per compiled call (default: the recipe's)")
    parser.add_argument("--val-budget", type=float, default=None, metavar="SECONDS",
                        help="also train from scratch on tiny-shakespeare this long and report "
                             "the validation loss")
    parser.add_argument("--val-dropout", type=float, default=0.1, metavar="P",
                        help="dropout on each layer's output in the --val-budget runs, ours and "
                             "the PyTorch peer's (default: 0.1, the shakespeare recipe's; 0 for "
                             "none)")
    parser.add_argument("--val-schedule", default=None,
                        choices=("exponential", "cosine", "wsd", "constant"),
                        help="our learning-rate schedule in the --val-budget runs (default: the "
                             "recipe's, x0.97 per epoch; cosine and wsd end theirs with the "
                             "budget; the PyTorch peer keeps a constant rate)")
    parser.add_argument("--corpus", default=str(SHARED_SHAKESPEARE),
                        help="the corpus for --val-budget (default: ../shared's tiny-shakespeare)")
    parser.add_argument("--preprocess-mb", type=float, default=100.0,
                        help="size of the generated corpus for the preprocessing measurement "
                             "(0 to skip)")
    parser.add_argument("--vs-torch", action="store_true",
                        help="also run the PyTorch peer (benchmarks/torch_peer.py) per recipe")
    parser.add_argument("--json", help="write the results to this file")
    cli.add_debug_flag(parser)
    return parser


def check_arguments(args):
    """Refuse, before anything is measured, what would fail (or never end) later."""
    for name in ("seconds", "sample_seconds", "matmul_seconds", "val_budget"):
        value = getattr(args, name)
        if value is not None and not (math.isfinite(value) and value > 0):
            raise UsageError(f"--{name.replace('_', '-')} must be a positive number of seconds, "
                             f"got {value}")
    if not 0.0 <= args.val_dropout < 1.0:
        raise UsageError(f"--val-dropout must be in [0, 1), got {args.val_dropout}")
    if not (args.preprocess_mb == 0 or 1 <= args.preprocess_mb < math.inf):
        raise UsageError(f"--preprocess-mb must be 0 (skip) or at least 1, got "
                         f"{args.preprocess_mb}")
    if args.steps_per_call is not None and args.steps_per_call < 1:
        raise UsageError(f"--steps-per-call must be at least 1, got {args.steps_per_call}")
    if Path(args.corpus).is_dir():  # the classic layout: a directory holding input.txt
        args.corpus = str(Path(args.corpus) / "input.txt")
    if (args.val_budget or args.vs_torch) and not Path(args.corpus).is_file():
        needs = "--val-budget" if args.val_budget else "--vs-torch"
        raise CharRNNError(f"{needs} needs a corpus: {args.corpus} not found; pass --corpus")
    if args.vs_torch and importlib.util.find_spec("torch") is None:
        raise CharRNNError(TORCH_MISSING)
    if args.json:
        check_writable_file(Path(args.json), "--json")


def check_writable_file(path, flag):
    """Fail unless path can be written (a file, new or existing, in a writable directory)."""
    parent = path.parent  # "." for a bare file name
    if path.is_dir() or not parent.is_dir():
        problem = "is a directory" if path.is_dir() else "its directory does not exist"
        raise UsageError(f"{flag} {path}: {problem}; give a file path in an existing directory")
    if not os.access(path if path.exists() else parent, os.W_OK):
        raise CharRNNError(f"{flag} {path} cannot be written (permission denied): give a path "
                           f"you can write")


def main(argv=None):
    args = build_parser().parse_args(argv)
    check_arguments(args)
    results = []
    for name in args.recipe or list(SIZES):
        print(f"measuring {name} ...", file=sys.stderr, flush=True)
        results.append(bench_recipe(name, args))
    import tensorflow as tf

    from tf_charrnn.kernels import choose_loops

    summary = {"recipes": results,
               "fused_loops": choose_loops(tf.float32),  # what the fused kernel's loops ran on
               "threads": os.cpu_count(),
               "peak_rss_mb": peak_rss_mb()}
    if args.preprocess_mb > 0:
        summary.update(measure_preprocess(args.preprocess_mb))
    print(f"precision {args.precision}, fused kernel loops: {summary['fused_loops']}")
    print(format_table(results))
    if args.preprocess_mb > 0:
        print(f"\npreprocess {summary['preprocess_mb']:.0f} MB: "
              f"{summary['preprocess_mb_per_sec']:.1f} MB/s, peak RSS "
              f"{summary['preprocess_peak_rss_mb']:.0f} MB")
    print(f"benchmark process peak RSS {summary['peak_rss_mb']:.0f} MB")
    if args.json:
        try:
            Path(args.json).write_text(json.dumps(summary, indent=1))
        except OSError as error:  # the table above holds the figures
            raise CharRNNError(f"cannot write --json {args.json} ({error.strerror}); the table "
                               f"above has the figures") from None
    return 0


if __name__ == "__main__":
    sys.exit(cli.run_cli(main))
