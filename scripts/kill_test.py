"""Kill test: a training run SIGKILLed at random moments, again and again, loses nothing.

    python scripts/kill_test.py --kills 20 --seed 1

1. A small corpus is written (or --corpus is used) and an uninterrupted reference run trains it
   for --steps steps, saving every --checkpoint-every steps.
2. The same run is started in a fresh run directory and SIGKILLed, --kills times, each time at a
   moment drawn from one of these kinds:
     early      a random delay after launch: during start-up, corpus loading, restore
     mid-save   the moment a new checkpoint's first file (TensorFlow's ckpt-N_temp directory,
                ckpt-N.data-*, ckpt-N.index) appears, before its manifest: the save is cut short
     after-save a random short delay after a new checkpoint's first file appears: inside the
                hashing or the manifest write, pruning, or the steps that follow
   After each kill the run is relaunched. Each relaunch must resume from the newest checkpoint
   that was complete (manifest written, every file matching its sha256, checked here with
   hashlib, independently of tf_charrnn.runs) at the moment of the kill, so at most
   checkpoint_every steps are lost.
3. A last launch trains to --steps undisturbed; every variable of its final checkpoint (model,
   optimiser slots, counters, carried state, RNG) must equal the reference's.

The table printed at the end has one row per kill; the exit status is 1 when anything failed.
tests/test_reliability.py runs the same machinery with a few kills.
"""

import argparse
import dataclasses
import hashlib
import json
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

KILL_KINDS = ("early", "mid-save", "after-save")
_KIND_WEIGHTS = (0.2, 0.4, 0.4)
_CHECKPOINT_FILE = re.compile(r"^ckpt-(\d+)(?:_temp|\.index|\.data-\d+-of-\d+)")
_MANIFEST = re.compile(r"^ckpt-(\d+)\.manifest\.json$")
_RESUMED = re.compile(r"^resumed .* from (\S+) \(step (\d+)\)$", re.MULTILINE)
_SKIPPED = re.compile(r"^warning: skipping checkpoint .*$", re.MULTILINE)
_WORDS = ("the", "a", "king", "queen", "sword", "night", "shall", "speak", "love", "death",
          "and", "of", "to", "my", "lord", "what", "is", "this", "come", "go", "no", "yes")


def make_corpus(path, seed, size=8000):
    """Write about `size` characters of word salad with punctuation and line breaks."""
    rng = random.Random(seed)
    lines, length = [], 0
    while length < size:
        words = [rng.choice(_WORDS) for _ in range(rng.randint(3, 10))]
        line = " ".join(words).capitalize() + rng.choice(".,;!?:")
        lines.append(line)
        length += len(line) + 1
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@dataclasses.dataclass(frozen=True)
class KillConfig:
    """What the trainer is asked to do; the reference and the killed run share it."""

    corpus: Path
    steps: int = 400
    checkpoint_every: int = 10
    seed: int = 0
    kernel: str = "auto"
    steps_per_call: int = 1

    def argv(self, runs_dir, run):
        return ["--corpus", str(self.corpus), "--runs-dir", str(runs_dir), "--run", run,
                "--max-steps", str(self.steps), "--checkpoint-every", str(self.checkpoint_every),
                "--seed", str(self.seed), "--kernel", self.kernel,
                "--batch-size", "4", "--seq-length", "16", "--num-layers", "2",
                "--hidden-size", "16", "--embedding-size", "8", "--dropout", "0.2",
                "--eval-every", "25", "--log-every", "10", "--sample-every", "1000000",
                "--steps-per-call", str(self.steps_per_call)]


def _child_env():
    return {**os.environ, "PYTHONUNBUFFERED": "1"}


def launch(config, runs_dir, run, log_path):
    """Start `python -m tf_charrnn.train` for the run; its stdout and stderr go to log_path."""
    command = [sys.executable, "-m", "tf_charrnn.train", *config.argv(runs_dir, run)]
    with open(log_path, "wb") as out:
        return subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=_child_env())


def train_to_end(config, runs_dir, run, log_path, in_process=False):
    """Train the run to config.steps undisturbed; raise RuntimeError unless it succeeds.

    Returns (output, seconds from launch to the first new checkpoint file, or None)."""
    if in_process:
        from tf_charrnn.cli import run_cli
        from tf_charrnn.train import main

        code = run_cli(main, config.argv(runs_dir, run))
        if code != 0:
            raise RuntimeError(f"in-process training of {run} exited {code}")
        return "", None
    run_path = Path(runs_dir) / run
    baseline = checkpoint_entries(run_path)
    started, first_save = time.monotonic(), None
    process = launch(config, runs_dir, run, log_path)
    while process.poll() is None:
        if first_save is None and any(baseline.get(name) != stamp for name, stamp
                                      in checkpoint_entries(run_path).items()):
            first_save = time.monotonic() - started
        time.sleep(0.01)
    code = process.wait()
    output = Path(log_path).read_text(errors="replace")
    if code != 0 or f"(step {config.steps})" not in output:
        raise RuntimeError(f"training {run} exited {code}:\n{output[-3000:]}")
    return output, first_save


# --- what is on disk -----------------------------------------------------------------------------

def _sha256(path):
    with open(path, "rb") as handle:
        return hashlib.sha256(handle.read()).hexdigest()


def newest_verified(directory):
    """The step of the newest checkpoint in directory whose manifest lists files that all match
    their sha256, or None. Checked here without tf_charrnn.runs, as an independent witness."""
    directory = Path(directory)
    steps = []
    if directory.is_dir():
        steps = sorted((int(m.group(1)) for m in map(_MANIFEST.match, os.listdir(directory))
                        if m), reverse=True)
    for step in steps:
        try:
            manifest = json.loads((directory / f"ckpt-{step}.manifest.json").read_text())
            files = manifest["files"]
            if files and all(_sha256(directory / name) == digest
                             for name, digest in files.items()):
                return step
        except (OSError, ValueError, KeyError):
            continue
    return None


def expected_resume_step(run_path):
    """Where a relaunch must resume: the newest verified checkpoint, else the best, else 0."""
    step = newest_verified(run_path / "checkpoints")
    if step is None:
        step = newest_verified(run_path / "best")
    return step or 0


def checkpoint_entries(run_path):
    """{relative name: (inode, mtime_ns)} for every checkpoint file or _temp directory."""
    entries = {}
    for sub in ("checkpoints", "best"):
        try:
            with os.scandir(run_path / sub) as found:
                for entry in found:
                    if _CHECKPOINT_FILE.match(entry.name):
                        stat = entry.stat(follow_symlinks=False)
                        entries[f"{sub}/{entry.name}"] = (stat.st_ino, stat.st_mtime_ns)
        except FileNotFoundError:
            pass
    return entries


def _step_of(name):
    return int(_CHECKPOINT_FILE.match(name.split("/", 1)[1]).group(1))


def leftovers(run_path):
    """Files a kill left behind that no complete checkpoint owns (names, sorted)."""
    found = []
    for sub in ("checkpoints", "best"):
        directory = run_path / sub
        if not directory.is_dir():
            continue
        names = os.listdir(directory)
        complete = {int(m.group(1)) for m in map(_MANIFEST.match, names) if m}
        for name in names:
            match = _CHECKPOINT_FILE.match(name)
            if (match and int(match.group(1)) not in complete) or name.startswith("."):
                found.append(f"{sub}/{name}")
    return sorted(found)


# --- one kill ------------------------------------------------------------------------------------

@dataclasses.dataclass
class KillRecord:
    index: int
    kind: str
    detail: str = ""           # the delay, or which checkpoint file triggered the kill
    must_resume: int = 0       # newest verified checkpoint when the launch started
    resumed: object = None     # the step the launch reported resuming from (None: not reached)
    newest_at_kill: int = 0    # newest verified checkpoint right after the kill
    reached: int = 0           # the highest step any checkpoint file of the launch shows
    mid_save: bool = False     # a checkpoint of the launch was left without its manifest
    exit_code: object = None
    skipped: list = dataclasses.field(default_factory=list)
    problems: list = dataclasses.field(default_factory=list)

    @property
    def ok(self):
        return not self.problems


def _wait_for_new_file(process, run_path, baseline, count, timeout):
    """Wait until `count` new checkpoint files have appeared; return the last one's name."""
    seen, deadline = set(), time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            return None
        for name, stamp in checkpoint_entries(run_path).items():
            if baseline.get(name) != stamp and _step_of(name) not in seen:
                seen.add(_step_of(name))
                if len(seen) >= count:
                    return name
        time.sleep(0.0005)
    return None


def kill_once(index, kind, config, runs_dir, run, log_dir, rng, startup_seconds):
    """Launch the run, SIGKILL it at a moment of the given kind, and check what it left."""
    run_path = Path(runs_dir) / run
    record = KillRecord(index, kind, must_resume=expected_resume_step(run_path))
    baseline = checkpoint_entries(run_path)
    log_path = Path(log_dir) / f"launch-{index:02d}.log"
    process = launch(config, runs_dir, run, log_path)
    try:
        if kind == "early":
            delay = rng.uniform(0.0, startup_seconds)
            record.detail = f"{delay:.2f}s after launch"
            try:
                process.wait(timeout=delay)
            except subprocess.TimeoutExpired:
                pass
        else:
            count = rng.randint(1, 3)
            name = _wait_for_new_file(process, run_path, baseline, count,
                                      timeout=startup_seconds * 4 + 60)
            if kind == "mid-save":
                record.detail = f"on {name}" if name else "no new file"
            else:
                delay = rng.uniform(0.0, 0.1)
                time.sleep(delay)
                record.detail = f"{delay * 1000:.0f}ms after {name}" if name else "no new file"
        if process.poll() is None:
            process.send_signal(signal.SIGKILL)
        record.exit_code = process.wait()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    _check_kill(record, run_path, baseline, log_path, config)
    return record


def _check_kill(record, run_path, baseline, log_path, config):
    output = Path(log_path).read_text(errors="replace")
    resumed = _RESUMED.search(output)
    record.skipped = _SKIPPED.findall(output)
    record.newest_at_kill = expected_resume_step(run_path)
    new_names = [name for name, stamp in checkpoint_entries(run_path).items()
                 if baseline.get(name) != stamp]
    record.reached = max([record.newest_at_kill] + [_step_of(n) for n in new_names])
    record.mid_save = any(not (run_path / f"{n.split('/')[0]}/ckpt-{_step_of(n)}.manifest.json")
                          .is_file() for n in new_names)
    if resumed:
        record.resumed = int(resumed.group(2))
        if int(re.search(r"ckpt-(\d+)$", resumed.group(1)).group(1)) != record.resumed:
            record.problems.append(f"resumed from {resumed.group(1)} but reported step "
                                   f"{record.resumed}")
    if record.exit_code != -signal.SIGKILL:
        record.problems.append(f"exited {record.exit_code} before the kill:\n{output[-2000:]}")
    if record.resumed is not None and record.resumed != record.must_resume:
        record.problems.append(f"resumed from step {record.resumed}, but the newest complete "
                               f"checkpoint was {record.must_resume}")
    if record.resumed is None and record.must_resume and re.search(r"^step \d+", output,
                                                                    re.MULTILINE):
        record.problems.append("trained without saying where it resumed from")
    if record.newest_at_kill < record.must_resume:
        record.problems.append(f"the newest complete checkpoint went back from "
                               f"{record.must_resume} to {record.newest_at_kill}")
    if record.reached - record.newest_at_kill > config.checkpoint_every:
        record.problems.append(f"a relaunch would lose {record.reached - record.newest_at_kill} "
                               f"steps, more than checkpoint_every {config.checkpoint_every}")
    if "Traceback" in output:
        record.problems.append(f"a traceback:\n{output[-2000:]}")


# --- comparing the two runs ----------------------------------------------------------------------

def checkpoint_variables(prefix):
    """{name: ndarray} of every variable stored in a checkpoint."""
    import tensorflow as tf

    reader = tf.train.load_checkpoint(str(prefix))
    return {name: reader.get_tensor(name) for name in reader.get_variable_to_shape_map()
            if name != "_CHECKPOINTABLE_OBJECT_GRAPH"}


def compare_final(reference_path, killed_path, step):
    """(equal bit for bit, names that differ, largest absolute difference) of the two
    ckpt-<step> files."""
    import numpy as np

    ours = checkpoint_variables(Path(killed_path) / "checkpoints" / f"ckpt-{step}")
    theirs = checkpoint_variables(Path(reference_path) / "checkpoints" / f"ckpt-{step}")
    differ, largest = sorted(set(ours) ^ set(theirs)), 0.0
    # seconds_trained is the runs' wall-clock training time: it differs, and rightly so.
    for name in sorted(name for name in set(ours) & set(theirs)
                       if not name.startswith("seconds_trained/")):
        a, b = np.asarray(ours[name]), np.asarray(theirs[name])
        if a.shape != b.shape:
            differ.append(name)
            continue
        if a.dtype.kind in "fc":
            largest = max(largest, float(np.max(np.abs(a - b), initial=0.0)))
        if not np.array_equal(a, b):
            differ.append(name)
    return not differ, differ, largest


def draw_kinds(rng, kills):
    """The kinds of `kills` kills in random order, in _KIND_WEIGHTS's proportions (rounded down,
    at least one of each from three kills on, the rest drawn), so that start-up kills are never
    left out by chance."""
    least = 1 if kills >= len(KILL_KINDS) else 0
    counts = [max(least, int(kills * weight)) for weight in _KIND_WEIGHTS]
    kinds = [kind for kind, count in zip(KILL_KINDS, counts) for _ in range(count)]
    kinds += rng.choices(KILL_KINDS, _KIND_WEIGHTS, k=kills - len(kinds))
    rng.shuffle(kinds)
    return kinds


# --- the whole test ------------------------------------------------------------------------------

@dataclasses.dataclass
class KillReport:
    config: KillConfig
    records: list
    final_step: int = 0
    weights_equal: bool = False
    differing: list = dataclasses.field(default_factory=list)
    max_abs_diff: float = float("nan")
    leftovers: list = dataclasses.field(default_factory=list)    # right after the last kill
    left_at_end: list = dataclasses.field(default_factory=list)  # after the final launch
    seconds: float = 0.0
    problems: list = dataclasses.field(default_factory=list)

    @property
    def ok(self):
        return not self.problems and all(record.ok for record in self.records)

    @property
    def max_steps_lost(self):
        """The most steps a relaunch had to redo, as far as checkpoint files show."""
        return max((r.reached - r.newest_at_kill for r in self.records), default=0)

    def table(self):
        rows = [("#", "kind", "moment", "resume@launch", "reported", "newest@kill", "reached",
                 "mid-save", "result")]
        for r in self.records:
            rows.append((str(r.index), r.kind, r.detail, str(r.must_resume),
                         "-" if r.resumed is None else str(r.resumed), str(r.newest_at_kill),
                         str(r.reached), "yes" if r.mid_save else "", "OK" if r.ok else "FAIL"))
        widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
        lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip()
                 for row in rows]
        lines.insert(1, "  ".join("-" * width for width in widths))
        return "\n".join(lines)

    def summary(self):
        c = self.config
        resumes = sum(r.resumed is not None for r in self.records)
        kinds = ", ".join(f"{kind} {sum(r.kind == kind for r in self.records)}"
                          for kind in KILL_KINDS)
        lines = [
            self.table(),
            "",
            f"kills: {len(self.records)} ({kinds}); "
            f"{sum(r.mid_save for r in self.records)} cut a checkpoint short",
            f"relaunches that resumed: {resumes}, every one from the newest complete checkpoint: "
            f"{'yes' if all(r.ok for r in self.records) else 'NO'}",
            f"max steps lost: {self.max_steps_lost} (checkpoint_every {c.checkpoint_every})",
            f"warnings about damaged checkpoints on relaunch: "
            f"{sum(len(r.skipped) for r in self.records)}",
            f"final step {self.final_step}/{c.steps}; every variable equal to the uninterrupted "
            f"run, bit for bit: {'yes' if self.weights_equal else 'NO'} "
            f"(max |diff| {self.max_abs_diff:.3g})",
            f"files left behind by kills: {', '.join(self.leftovers) or 'none'}; still there "
            f"after the final launch: {', '.join(self.left_at_end) or 'none'}",
            f"time: {self.seconds:.0f}s",
            "RESULT: " + ("PASS" if self.ok else "FAIL"),
        ]
        for record in self.records:
            lines.extend(f"kill {record.index}: {problem}" for problem in record.problems)
        lines.extend(self.problems)
        return "\n".join(lines)


def run_kill_test(workdir, kills=20, seed=0, steps=400, checkpoint_every=10, corpus=None,
                  kernel="auto", steps_per_call=1, kinds=None, reference_in_process=False,
                  log=print):
    """Run the whole kill test in workdir; return a KillReport.

    kinds: the kind of every kill in order (default: draw_kinds, with the seed).
    reference_in_process: train the reference in this process (faster in the test suite).
    """
    started = time.monotonic()
    workdir = Path(workdir)
    rng = random.Random(seed)
    corpus = Path(corpus) if corpus else make_corpus(workdir / "corpus" / "input.txt", seed)
    config = KillConfig(corpus.resolve(), steps, checkpoint_every, seed, kernel, steps_per_call)
    runs_dir, log_dir = workdir / "runs", workdir / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)

    log(f"reference: {steps} steps uninterrupted")
    _, first_save = train_to_end(config, runs_dir, "reference", log_dir / "reference.log",
                                 reference_in_process)
    # A kill drawn within this long of the launch lands in start-up, loading, restoring or the
    # first steps (the reference's time to its first checkpoint file).
    startup_seconds = first_save or 3.0

    kinds = list(kinds) if kinds else draw_kinds(rng, kills)
    records = []
    for index, kind in enumerate(kinds, 1):
        record = kill_once(index, kind, config, runs_dir, "killed", log_dir, rng,
                           startup_seconds)
        records.append(record)
        resumed = "-" if record.resumed is None else record.resumed
        log(f"kill {index}/{len(kinds)} {kind:10s} {record.detail:36s} resumed {resumed:>4} "
            f"newest {record.newest_at_kill:>4} {'OK' if record.ok else 'FAIL'}")
        if record.newest_at_kill >= steps:
            break
    report = KillReport(config, records)

    killed_path = runs_dir / "killed"
    report.leftovers = leftovers(killed_path)
    log(f"final launch: train to {steps} undisturbed")
    last = KillRecord(len(records) + 1, "final", must_resume=expected_resume_step(killed_path))
    try:
        output, _ = train_to_end(config, runs_dir, "killed", log_dir / "final.log")
        resumed = _RESUMED.search(output)
        if last.must_resume and (not resumed or int(resumed.group(2)) != last.must_resume):
            report.problems.append(f"the final launch did not resume from step "
                                   f"{last.must_resume}: {resumed and resumed.group(0)}")
        report.final_step = steps
    except RuntimeError as error:
        report.problems.append(f"the final launch failed: {error}")
    if len(records) < len(kinds):
        report.problems.append(f"only {len(records)} of {len(kinds)} kills landed before the run "
                               f"finished: raise --steps")
    if report.final_step:
        report.weights_equal, report.differing, report.max_abs_diff = compare_final(
            runs_dir / "reference", killed_path, steps)
        if not report.weights_equal:
            report.problems.append(f"final variables differ from the reference: "
                                   f"{', '.join(report.differing)}")
    report.left_at_end = leftovers(killed_path)
    report.seconds = time.monotonic() - started
    return report


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--checkpoint-every", type=int, default=10)
    parser.add_argument("--steps-per-call", type=int, default=1)
    parser.add_argument("--kernel", default="auto", choices=("auto", "keras", "fused"))
    parser.add_argument("--corpus", help="a text file (default: a generated 8 KB corpus)")
    parser.add_argument("--workdir", help="keep runs and logs here (default: a temporary dir)")
    args = parser.parse_args(argv)
    if args.kills < 1 or args.steps < 2 * args.checkpoint_every or args.checkpoint_every < 1:
        parser.error("need --kills >= 1 and --steps >= 2 x --checkpoint-every >= 2")
    with tempfile.TemporaryDirectory(prefix="kill_test.") as scratch:
        workdir = Path(args.workdir) if args.workdir else Path(scratch)
        report = run_kill_test(workdir, args.kills, args.seed, args.steps, args.checkpoint_every,
                               args.corpus, args.kernel, args.steps_per_call)
        print()
        print(report.summary())
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
