"""Memory test: a 200 MB corpus loads and trains in bounded memory.

    python scripts/memory_test.py [--size-mb 200] [--steps 5] [--workdir DIR]

Writes a corpus of random-ish text from a small alphabet (in chunks, never whole in memory), then
measures, each phase in a fresh process so that its peak resident set (ru_maxrss) is its own:

  baseline     import TensorFlow and build the same model, no corpus: what any training costs
  first load   TextLoader building the id cache (decode, vocabulary, ids, data.npy)
  second load  TextLoader from the cache: the ids must be an np.memmap, not a copy
  training     train() for a few steps on the cached corpus (the trainer's whole path)
  training 1MB the same on a 1 MB corpus: the difference to `training` is what the corpus costs

and prints one line per phase: peak RSS (ru_maxrss), the peak of its anonymous part (copies;
sampled), the file-backed pages mapped at the end (the memory-mapped id cache: page cache the
kernel can drop), and the time. The
exit status is 1 when the second load is not memory-mapped or training fails. What to expect:
the first load holds the decoded text and the ids at once (about twice the corpus for ASCII);
the second load and training add little anonymous memory whatever the corpus size, while the
mapped pages of data.npy that training touches show in ru_maxrss (page cache, not a copy).
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

MB = 1 << 20
ALPHABET = np.frombuffer(b"etaoinshrdlucmfwyp      \n.,", dtype=np.uint8)


def make_corpus(path, size_mb, seed=0, chunk_mb=2):
    """size_mb of letters, spaces, a little punctuation and line breaks, written chunk by chunk.

    Small chunks keep this process small: Linux hands a parent's peak RSS down to the children
    it forks, so a large parent would inflate every phase's ru_maxrss."""
    rng = np.random.default_rng(seed)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remaining = size_mb * MB
    with open(path, "wb") as out:
        while remaining:
            count = min(chunk_mb * MB, remaining)
            out.write(ALPHABET[rng.integers(0, len(ALPHABET), count, dtype=np.uint8)].tobytes())
            remaining -= count
    return path


def peak_rss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: kilobytes


def current_rss_mb():
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / MB


TRAIN_SIZES = [("data", "batch_size", 32), ("data", "seq_length", 64),
               ("data", "val_fraction", 0.001), ("model", "num_layers", 1), ("model", "hidden_size", 16),
               ("model", "embedding_size", 8), ("model", "kernel", "keras"),
               ("train", "eval_every", 1000000), ("train", "sample_every", 1000000),
               ("train", "checkpoint_every", 1000000), ("train", "log_every", 1)]


# --- phases, each run in a fresh process ---------------------------------------------------------

def phase_baseline(corpus, workdir, steps):
    import keras  # noqa: F401  (TensorFlow and Keras, as training imports them)

    from tf_charrnn.config import Config, apply_overrides
    from tf_charrnn.models import build_model

    config = apply_overrides(Config(), TRAIN_SIZES)
    build_model(config.model, 30)
    return {}


def phase_load(corpus, workdir, steps):
    from tf_charrnn.data import TextLoader

    loader = TextLoader(corpus, 32, 64, val_fraction=0.001, log=lambda *a: None)
    return {"ids_type": type(loader.ids).__name__, "num_chars": int(len(loader.ids)),
            "vocab": len(loader.vocab)}


def phase_train(corpus, workdir, steps):
    from tf_charrnn.config import Config, apply_overrides
    from tf_charrnn.train import train

    config = apply_overrides(Config(), [("data", "corpus", str(corpus)),
                                        ("train", "runs_dir", str(Path(workdir) / "runs")),
                                        ("train", "max_steps", steps), *TRAIN_SIZES])
    result = train(config, run_name=f"memory-{os.getpid()}", log=lambda *a, **k: None)
    return {"step": result.step, "stopped": result.stopped}


PHASES = {"baseline": phase_baseline, "first load": phase_load, "second load": phase_load,
          "training": phase_train, "training 1MB": phase_train}


def run_phase(name, corpus, workdir, steps):
    """Run one phase in a fresh interpreter; return its JSON report."""
    command = [sys.executable, __file__, "--phase", name, "--corpus", str(corpus),
               "--workdir", str(workdir), "--steps", str(steps)]
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"phase {name} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(lines[-1])


def rss_parts_mb():
    """(anonymous, file-backed) resident MB: copies in memory vs pages of mapped files."""
    parts = {}
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(("RssAnon:", "RssFile:")):
                parts[line.split(":")[0]] = int(line.split()[1]) / 1024
    return parts.get("RssAnon", 0.0), parts.get("RssFile", 0.0)


class AnonPeak:
    """Samples the anonymous RSS every few milliseconds: the peak of what was copied, as
    opposed to ru_maxrss, which also counts the memory-mapped cache's pages (page cache,
    dropped by the kernel under pressure)."""

    def __init__(self):
        self.peak, self._stop = 0.0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_parts_mb()[0])
            time.sleep(0.005)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_parts_mb()[0])


def child(name, corpus, workdir, steps):
    start_rss = current_rss_mb()
    started = time.perf_counter()
    with AnonPeak() as anon:
        report = PHASES[name](corpus, workdir, steps)
    anon_end, file_end = rss_parts_mb()
    report.update(phase=name, peak_rss_mb=round(peak_rss_mb(), 1),
                  start_rss_mb=round(start_rss, 1), end_rss_mb=round(current_rss_mb(), 1),
                  anon_peak_mb=round(anon.peak, 1), file_end_mb=round(file_end, 1),
                  seconds=round(time.perf_counter() - started, 1))
    print(json.dumps(report))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-mb", type=int, default=200)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--workdir", help="keep the corpus and runs here (default: a temp dir)")
    parser.add_argument("--phase", choices=PHASES, help=argparse.SUPPRESS)
    parser.add_argument("--corpus", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.phase:
        child(args.phase, Path(args.corpus), Path(args.workdir), args.steps)
        return 0

    from tf_charrnn.data import cache_paths

    with tempfile.TemporaryDirectory(prefix="memory_test.") as scratch:
        workdir = Path(args.workdir or scratch)
        corpus = workdir / "corpus" / "input.txt"
        for stale in cache_paths(corpus):
            stale.unlink(missing_ok=True)  # the first load must build the cache
        began = time.perf_counter()
        make_corpus(corpus, args.size_mb)
        print(f"corpus: {corpus} ({corpus.stat().st_size / MB:.0f} MB) written in "
              f"{time.perf_counter() - began:.1f}s")
        reports, ok = [], True
        print(f"this process: peak RSS {peak_rss_mb():.1f} MB (each phase starts from at least "
              f"this much: fork passes it down)")
        small = make_corpus(workdir / "small" / "input.txt", 1)
        for name in PHASES:
            report = run_phase(name, small if name == "training 1MB" else corpus, workdir,
                               args.steps)
            reports.append(report)
            extra = ""
            if "ids_type" in report:
                extra = f"  ids: {report['ids_type']} of {report['num_chars']:,} chars"
            if "step" in report:
                extra = f"  trained to step {report['step']}"
            print(f"{name:12s} peak RSS {report['peak_rss_mb']:6.1f} MB (anonymous "
                  f"{report['anon_peak_mb']:6.1f}; file pages mapped at end "
                  f"{report['file_end_mb']:5.1f}; at start {report['start_rss_mb']:5.1f})  "
                  f"{report['seconds']:5.1f}s{extra}")
        second = next(r for r in reports if r["phase"] == "second load")
        if second["ids_type"] != "memmap":
            print(f"FAIL: the second load's ids are a {second['ids_type']}, not an np.memmap")
            ok = False
        training = next(r for r in reports if r["phase"] == "training")
        if training["step"] != args.steps:
            print(f"FAIL: training stopped at step {training['step']}")
            ok = False
        small = next(r for r in reports if r["phase"] == "training 1MB")
        print(f"training on {args.size_mb} MB vs on 1 MB: peak RSS "
              f"{training['peak_rss_mb'] - small['peak_rss_mb']:+.1f} MB, of which anonymous "
              f"{training['anon_peak_mb'] - small['anon_peak_mb']:+.1f} MB (the rest: pages of "
              f"the memory-mapped data.npy)")
        print("RESULT: " + ("PASS" if ok else "FAIL"))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
