"""Killed runs lose nothing; damaged, foreign or locked run directories never load wrong weights.

* Kills: scripts/kill_test.py's machinery, with a few SIGKILLs (all twenty behind -m slow).
* Checkpoint integrity: a truncated or flipped .data/.index file, or an unreadable manifest, makes
  both resume and load_run (the sampler's path) fall back to the previous checkpoint, naming the
  bad one; the weights restored are the ones saved at that step; with none good, a clear error.
* Run directory safety: a runs_dir that is a file, a full disk at start or mid-run, a second
  trainer, and config.yaml / vocab.json edited by hand all end in one CharRNNError line.
"""

import errno
import gc
import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
import yaml

from tf_charrnn import runs as runs_module
from tf_charrnn.cli import run_cli
from tf_charrnn.config import Config, apply_overrides
from tf_charrnn.errors import CharRNNError
from tf_charrnn.runs import Run, load_run
from tf_charrnn.train import main as train_main
from tf_charrnn.train import train

ROOT = Path(__file__).resolve().parents[1]
# kernel keras: the fused CPU kernel (model.kernel auto) is still being finished.
TINY = [("data", "batch_size", 4), ("data", "seq_length", 8), ("model", "num_layers", 1),
        ("model", "hidden_size", 8), ("model", "embedding_size", 4), ("model", "kernel", "keras"),
        ("train", "log_every", 4), ("train", "eval_every", 1000), ("train", "sample_every", 1000),
        ("train", "checkpoint_every", 4)]


def tiny_config(corpus, runs_dir, *overrides):
    return apply_overrides(Config(), [("data", "corpus", str(corpus)),
                                      ("train", "runs_dir", str(runs_dir)), *TINY, *overrides])


def load_kill_test():
    spec = importlib.util.spec_from_file_location("kill_test", ROOT / "scripts" / "kill_test.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class Messages(list):
    """A log= callable that keeps what it is given."""

    def __call__(self, *args, **kwargs):
        self.append(" ".join(map(str, args)))

    def text(self):
        return "\n".join(self)


class StopNow:
    """A stop flag that is already set: train() restores, saves at once and returns."""

    signal_name = "SIGINT"

    def __bool__(self):
        return True


def variables(prefix):
    """{name: array} of everything stored in a checkpoint."""
    reader = tf.train.load_checkpoint(str(prefix))
    return {name: reader.get_tensor(name) for name in reader.get_variable_to_shape_map()
            if name != "_CHECKPOINTABLE_OBJECT_GRAPH"}


def model_weights(loaded):
    return [v.numpy() for v in loaded.model.weights]


def assert_same(a, b):
    assert a.keys() == b.keys() if isinstance(a, dict) else len(a) == len(b)
    pairs = [(a[k], b[k]) for k in a] if isinstance(a, dict) else list(zip(a, b))
    for x, y in pairs:
        np.testing.assert_array_equal(x, y)


def one_line(err):
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.fixture(scope="module")
def trained_once(tmp_path_factory):
    """One run trained 8 steps, checkpoints at steps 4 and 8: (corpus, runs dir)."""
    from conftest import TINY_TEXT

    root = tmp_path_factory.mktemp("trained")
    corpus = root / "corpus" / "input.txt"
    corpus.parent.mkdir()
    corpus.write_text(TINY_TEXT, encoding="utf-8")
    config = tiny_config(corpus, root / "runs", ("train", "max_steps", 8))
    result = train(config, run_name="r", log=lambda *a, **k: None)
    assert [info.step for info in Run(result.run_path).checkpoints.complete()] == [8, 4]
    return corpus, root / "runs"


@pytest.fixture
def trained(trained_once, tmp_path):
    """A fresh copy of that run for one test to damage: (config, run path)."""
    corpus, runs = trained_once
    shutil.copytree(runs, tmp_path / "runs")
    (tmp_path / "runs" / "r" / ".lock").unlink(missing_ok=True)
    config = tiny_config(corpus, tmp_path / "runs", ("train", "max_steps", 8))
    return config, tmp_path / "runs" / "r"


# --- kills ---------------------------------------------------------------------------------------

def test_killed_run_resumes_from_its_newest_complete_checkpoint_and_ends_identical(tmp_path):
    kill_test = load_kill_test()
    report = kill_test.run_kill_test(tmp_path, kills=3, seed=5, steps=60, checkpoint_every=10,
                                     kinds=["mid-save", "after-save", "early"],
                                     reference_in_process=True, log=lambda *a: None)
    assert report.ok, report.summary()
    assert len(report.records) == 3 and report.final_step == 60
    assert report.weights_equal and report.max_steps_lost <= 10
    assert any(record.resumed for record in report.records), "no kill was followed by a resume"


@pytest.mark.slow
def test_twenty_kills_lose_nothing(tmp_path):
    report = load_kill_test().run_kill_test(tmp_path, kills=20, seed=1)
    assert report.ok, report.summary()
    assert len(report.records) == 20 and report.weights_equal


# --- checkpoint integrity ------------------------------------------------------------------------

def truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def flip_byte(path):
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0x40
    path.write_bytes(bytes(raw))


def garble(path):
    path.write_text("{not json")


DAMAGE = [("data-00000-of-00001", truncate), ("data-00000-of-00001", flip_byte),
          ("index", truncate), ("index", flip_byte), ("manifest.json", garble)]
DAMAGE_IDS = ["truncated-data", "flipped-data", "truncated-index", "flipped-index",
              "garbled-manifest"]


@pytest.mark.parametrize("suffix, damage", DAMAGE, ids=DAMAGE_IDS)
def test_resume_skips_a_damaged_newest_checkpoint_naming_it(trained, suffix, damage):
    config, run_path = trained
    checkpoints = run_path / "checkpoints"
    saved_at_4 = variables(checkpoints / "ckpt-4")
    damage(checkpoints / f"ckpt-8.{suffix}")
    log = Messages()
    result = train(config, run_name="r", log=log, stop_flag=StopNow())
    assert result.step == 4 and result.stopped == "interrupted"
    assert f"warning: skipping checkpoint {checkpoints / 'ckpt-8'} because" in log.text()
    assert f"resumed {run_path} from {checkpoints / 'ckpt-4'} (step 4)" in log.text()
    # The stop flag saved what was restored straight back: every variable is what step 4 saved,
    # but the clock of the run's training time, which ran on while the resumed run started.
    saved_again = variables(checkpoints / "ckpt-4")
    clock = "seconds_trained/.ATTRIBUTES/VARIABLE_VALUE"
    assert 0 <= saved_again.pop(clock) - saved_at_4.pop(clock) < 5
    assert_same(saved_again, saved_at_4)


@pytest.mark.parametrize("suffix, damage", DAMAGE[:4], ids=DAMAGE_IDS[:4])
def test_load_run_skips_a_damaged_newest_checkpoint_and_says_which_it_used(trained, suffix,
                                                                          damage):
    _, run_path = trained
    checkpoints = run_path / "checkpoints"
    at_4 = model_weights(load_run(checkpoint=checkpoints / "ckpt-4", log=lambda *a: None))
    at_8 = model_weights(load_run(run_path, log=lambda *a: None))
    damage(checkpoints / f"ckpt-8.{suffix}")
    log = Messages()
    loaded = load_run(run_path, log=log)
    assert loaded.checkpoint.step == 4
    assert f"skipping checkpoint {checkpoints / 'ckpt-8'}" in log.text()
    assert_same(model_weights(loaded), at_4)
    assert not all(np.array_equal(a, b) for a, b in zip(at_4, at_8))


def test_the_sampler_names_the_damaged_checkpoint_and_the_one_it_used(trained, capsys):
    _, run_path = trained
    checkpoints = run_path / "checkpoints"
    flip_byte(checkpoints / "ckpt-8.data-00000-of-00001")
    from tf_charrnn.sample import main as sample_main

    code = run_cli(sample_main, ["--run", str(run_path), "-n", "5", "--seed", "1"])
    err = capsys.readouterr().err
    assert code == 0
    assert f"skipping checkpoint {checkpoints / 'ckpt-8'}" in err and "ckpt-4 (step 4)" in err


def test_a_damaged_checkpoint_named_explicitly_is_refused(trained):
    _, run_path = trained
    flip_byte(run_path / "checkpoints" / "ckpt-8.index")
    with pytest.raises(CharRNNError, match=r"ckpt-8 cannot be used because ckpt-8.index is "
                                           r"corrupt"):
        load_run(checkpoint=run_path / "checkpoints" / "ckpt-8")


def test_with_every_checkpoint_damaged_resume_and_load_run_say_so(trained):
    config, run_path = trained
    for path in sorted(run_path.glob("*/ckpt-*.index")):
        flip_byte(path)
    with pytest.raises(CharRNNError, match="every checkpoint of .* is damaged"):
        train(config, run_name="r", log=lambda *a, **k: None)
    with pytest.raises(CharRNNError, match="damaged") as caught:
        load_run(run_path, log=lambda *a: None)
    assert "\n" not in str(caught.value)


def test_a_checkpoint_cut_short_leaves_nothing_behind_once_training_moves_on(trained, tmp_path):
    """A kill inside a save leaves ckpt-N files (TensorFlow's ckpt-N_temp directory, or a
    half-written manifest) without a manifest; the next save of that step, or pruning, clears
    them."""
    config, run_path = trained
    checkpoints = run_path / "checkpoints"
    for name in ("ckpt-12.index", "ckpt-12.data-00000-of-00001", "ckpt-16_temp/part-0.tmp",
                 "ckpt-2_temp/part-0.tmp", ".ckpt-20.manifest.json.x1y2.tmp"):
        (checkpoints / name).parent.mkdir(exist_ok=True)
        (checkpoints / name).write_bytes(b"partial")
    more = apply_overrides(config, [("train", "max_steps", 24), ("train", "keep_checkpoints", 2)])
    train(more, run_name="r", log=lambda *a, **k: None)
    assert sorted(p.name for p in checkpoints.iterdir()) == [
        "ckpt-20.data-00000-of-00001", "ckpt-20.index", "ckpt-20.manifest.json",
        "ckpt-24.data-00000-of-00001", "ckpt-24.index", "ckpt-24.manifest.json"]


# --- run directory safety ------------------------------------------------------------------------

def test_a_runs_dir_that_is_a_file_fails_before_training(tiny_corpus, tmp_path, capsys):
    not_a_dir = tmp_path / "runs"
    not_a_dir.write_text("a file where the runs directory should be")
    argv = ["--corpus", str(tiny_corpus), "--runs-dir", str(not_a_dir), "--run", "x",
            "--max-steps", "2", "--batch-size", "4", "--seq-length", "8", "--hidden-size", "8",
            "--kernel", "keras"]
    assert run_cli(train_main, argv) == 1
    line = one_line(capsys.readouterr().err)
    assert "cannot create run directory" in line and str(not_a_dir) in line
    assert not_a_dir.read_text().startswith("a file")


_TRAIN_FLAGS = ["--max-steps", "2", "--batch-size", "4", "--seq-length", "8", "--hidden-size",
                "8", "--kernel", "keras"]


@pytest.mark.parametrize("files, refused", [
    ({"todo.txt": "mine", "draft.txt": "mine too"}, "draft.txt and 1 more"),
    ({"config.yaml": "server:\n  port: 8080\n"}, "config.yaml"),  # not a run's: kept
    ({"best/photo.jpg": "jpeg", "checkpoints/thesis.tex": "tex"}, "best/photo.jpg and 1 more"),
    ({"vocab.json": "{}"}, "vocab.json"),
    ({".lockfile": "x"}, ".lockfile"),
])
def test_a_directory_of_other_files_is_refused_as_a_new_run(tiny_corpus, tmp_path, capsys,
                                                            files, refused):
    """`--run ~/notes` must not put checkpoints among the user's own files, nor replace their
    config.yaml."""
    notes = tmp_path / "notes"
    for name, text in files.items():
        (notes / name).parent.mkdir(parents=True, exist_ok=True)
        (notes / name).write_text(text)
    before = {path: path.read_bytes() for path in notes.rglob("*") if path.is_file()}
    assert run_cli(train_main, ["--corpus", str(tiny_corpus), "--run", str(notes),
                                *_TRAIN_FLAGS]) == 2
    line = one_line(capsys.readouterr().err)
    assert f"{notes} is not a run directory (it holds {refused})" in line, line
    assert {path: path.read_bytes() for path in notes.rglob("*") if path.is_file()} == before


def test_a_new_run_takes_an_empty_directory_or_what_a_kill_at_start_up_left(tiny_corpus,
                                                                            tmp_path, capsys):
    config = apply_overrides(Config(), [("data", "corpus", str(tiny_corpus))])
    empty, killed = tmp_path / "empty", tmp_path / "killed"
    empty.mkdir()
    (killed / "checkpoints" / "ckpt-2_temp").mkdir(parents=True)  # a save cut short
    (killed / ".lock").write_text("123")
    (killed / ".write-probe").write_bytes(b"\0" * 4096)  # the writability probe, not removed
    Run(killed).write_metadata(config, runs_module.Vocab("ab"), {})
    (killed / "vocab.json").unlink()  # killed between config.yaml and vocab.json
    for path in (empty, killed):
        assert run_cli(train_main, ["--corpus", str(tiny_corpus), "--run", str(path),
                                    *_TRAIN_FLAGS]) == 0
        assert Run(path).newest_checkpoint().step == 2
    a_file = tmp_path / "a_file"
    a_file.write_text("mine")
    assert run_cli(train_main, ["--corpus", str(tiny_corpus), "--run", str(a_file),
                                *_TRAIN_FLAGS]) == 2
    line = one_line(capsys.readouterr().err)
    assert f"{a_file} is a file, not a run directory" in line, line
    assert a_file.read_text() == "mine"


@pytest.fixture
def unwritable_run(tmp_path):
    """(runs_dir, run name) of an existing run directory no file can be created in."""
    if os.geteuid() != 0:
        (tmp_path / "runs" / "ro").mkdir(parents=True)
        (tmp_path / "runs" / "ro").chmod(0o555)
        yield tmp_path / "runs", "ro"
        (tmp_path / "runs" / "ro").chmod(0o755)
        return
    # root writes through permission bits: use an empty directory of sysfs, where no file can
    # be created (an empty one: a directory holding other files is refused before any write).
    sysfs = Path("/sys/kernel")
    for directory in sorted(sysfs.iterdir()) if sysfs.is_dir() else ():
        try:
            if not directory.is_dir() or any(directory.iterdir()):
                continue
        except OSError:  # unreadable: not what this test is about
            continue
        try:
            (directory / ".probe").write_text("x")
            (directory / ".probe").unlink()
        except OSError:
            yield sysfs, directory.name
            return
    pytest.skip("no unwritable directory to try (root, and no empty read-only one in sysfs)")


def test_an_unwritable_run_directory_fails_before_training(tiny_corpus, unwritable_run, capsys):
    runs_dir, name = unwritable_run
    argv = ["--corpus", str(tiny_corpus), "--runs-dir", str(runs_dir), "--run", name,
            "--max-steps", "2", "--batch-size", "4", "--seq-length", "8", "--hidden-size", "8",
            "--kernel", "keras"]
    assert run_cli(train_main, argv) == 1
    line = one_line(capsys.readouterr().err)
    assert f"cannot write to run directory {runs_dir / name}" in line


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc")
def test_a_full_disk_is_detected_before_training_starts(tiny_corpus, tmp_path, monkeypatch):
    real_fsync = os.fsync

    def full_disk(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full_disk)
    log = Messages()
    with pytest.raises(CharRNNError, match=r"cannot write to run directory .*\(No space left on "
                                           r"device\): free disk space"):
        train(tiny_config(tiny_corpus, tmp_path / "runs", ("train", "max_steps", 2)),
              run_name="full", log=log)
    monkeypatch.setattr(os, "fsync", real_fsync)
    assert "model:" not in log.text(), "the model was built before the check"
    assert not Run(tmp_path / "runs" / "full").has_checkpoint()
    assert not open_files_under(tmp_path / "runs")


def open_files_under(directory):
    """Paths under directory that this process still holds open."""
    held = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith(str(directory)):
            held.append(target)
    return held


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc")
def test_training_leaves_no_file_of_the_run_open(tiny_corpus, tmp_path):
    train(tiny_config(tiny_corpus, tmp_path / "runs", ("train", "max_steps", 2)), run_name="fd",
          log=lambda *a, **k: None)
    gc.collect()  # the TensorBoard writer closes its file when it is collected
    assert open_files_under(tmp_path / "runs") == []


def _fail_at(step, error):
    """A tf.train.Checkpoint.write that raises error for checkpoints/ckpt-<step>."""
    real_write = tf.train.Checkpoint.write

    def write(self, file_prefix, *args, **kwargs):
        if Path(file_prefix).parent.name == "checkpoints" and \
                Path(file_prefix).name == f"ckpt-{step}":
            raise error
        return real_write(self, file_prefix, *args, **kwargs)

    return write


@pytest.mark.parametrize("error", [OSError(errno.ENOSPC, "No space left on device"),
                                   tf.errors.ResourceExhaustedError(None, None,
                                                                    "No space left on device")],
                         ids=["OSError", "tf.errors"])
def test_a_save_that_fails_mid_run_stops_cleanly_keeping_the_previous_checkpoint(
        tiny_corpus, tmp_path, monkeypatch, capsys, error):
    monkeypatch.setattr(tf.train.Checkpoint, "write", _fail_at(8, error))
    argv = ["--corpus", str(tiny_corpus), "--runs-dir", str(tmp_path / "runs"), "--run", "d",
            "--max-steps", "12", "--checkpoint-every", "4", "--batch-size", "4",
            "--seq-length", "8", "--num-layers", "1", "--hidden-size", "8",
            "--embedding-size", "4", "--kernel", "keras"]
    assert run_cli(train_main, argv) == 1
    line = one_line(capsys.readouterr().err)
    assert "could not write checkpoint" in line and "ckpt-8" in line
    assert "No space left on device" in line and "checkpoints written before it are kept" in line
    monkeypatch.undo()
    run = Run(tmp_path / "runs" / "d")
    assert [info.step for info in run.checkpoints.complete()] == [4]
    assert not list(run.checkpoints.directory.glob("ckpt-8*")), "the failed save was cleared"
    assert run.newest_checkpoint().step == 4 and load_run(run.path, log=lambda *a: None)
    resumed = train(tiny_config(tiny_corpus, tmp_path / "runs", ("model", "embedding_size", 4),
                                ("train", "max_steps", 12)), run_name="d",
                    log=lambda *a, **k: None)
    assert resumed.step == 12 and len(resumed.losses) == 8


def test_a_full_disk_while_writing_the_manifest_keeps_the_previous_checkpoint(
        tiny_corpus, tmp_path, monkeypatch):
    real_write_atomic = runs_module.write_atomic

    def write_atomic(path, payload):
        if path.name == "ckpt-8.manifest.json":
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write_atomic(path, payload)

    monkeypatch.setattr(runs_module, "write_atomic", write_atomic)
    with pytest.raises(CharRNNError, match="could not write checkpoint .*ckpt-8"):
        train(tiny_config(tiny_corpus, tmp_path / "runs", ("train", "max_steps", 12)),
              run_name="m", log=lambda *a, **k: None)
    run = Run(tmp_path / "runs" / "m")
    assert [info.step for info in run.checkpoints.complete()] == [4]
    assert not list(run.checkpoints.directory.glob("ckpt-8*"))


def test_a_second_trainer_process_on_the_same_run_is_refused(tiny_corpus, tmp_path):
    runs = tmp_path / "runs"
    command = [sys.executable, "-m", "tf_charrnn.train", "--corpus", str(tiny_corpus),
               "--runs-dir", str(runs), "--run", "busy", "--max-steps", "1000000",
               "--checkpoint-every", "1000000", "--batch-size", "4", "--seq-length", "8",
               "--num-layers", "1", "--hidden-size", "8", "--embedding-size", "4",
               "--kernel", "keras"]
    first = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                             env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    lock_file = runs / "busy" / ".lock"
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and first.poll() is None:
            if lock_file.is_file() and lock_file.read_text().strip() == str(first.pid):
                break
            time.sleep(0.05)
        assert first.poll() is None, first.stderr.read().decode()
        with pytest.raises(CharRNNError, match=rf"run {runs / 'busy'} is in use by another "
                                               rf"trainer \(pid {first.pid}\)"):
            train(tiny_config(tiny_corpus, runs, ("train", "max_steps", 2)), run_name="busy",
                  log=lambda *a, **k: None)
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=60)
        first.stderr.close()
    # The kernel drops a dead process's flock: the run is free again.
    result = train(tiny_config(tiny_corpus, runs, ("train", "max_steps", 2)), run_name="busy",
                   log=lambda *a, **k: None)
    assert result.step == 2


def edit_config(run_path, section, key, value):
    path = run_path / "config.yaml"
    values = yaml.safe_load(path.read_text())
    values[section][key] = value
    path.write_text(yaml.safe_dump(values))


def edit_vocab(run_path, edit):
    path = run_path / "vocab.json"
    values = json.loads(path.read_text(encoding="utf-8"))
    values["chars"] = edit(values["chars"])
    path.write_text(json.dumps(values, ensure_ascii=False), encoding="utf-8")


HAND_EDITS = {
    "hidden_size": (lambda p: edit_config(p, "model", "hidden_size", 16),
                    r"model.hidden_size differs|does not fit"),
    "cell": (lambda p: edit_config(p, "model", "cell", "gru"), r"model.cell differs|does not fit"),
    "char-removed": (lambda p: edit_vocab(p, lambda chars: chars[:-1]),
                     r"vocabulary differs|does not match the vocabulary checkpoint"),
    "empty-config": (lambda p: (p / "config.yaml").write_text(""), r"config.yaml is empty"),
    "garbled-config": (lambda p: (p / "config.yaml").write_text("model: [\n  cell: lstm\n"),
                       r"config.yaml is unreadable"),
    "garbled-vocab": (lambda p: (p / "vocab.json").write_text("{"), r"vocab.json is unreadable"),
    "unknown-key": (lambda p: edit_config(p, "model", "hidden", 16),
                    r"config.yaml is invalid: unknown config key 'model.hidden'"),
}


@pytest.mark.parametrize("edit", HAND_EDITS)
def test_hand_edited_run_files_give_one_line_errors_on_resume_and_sampling(trained, edit,
                                                                          capsys):
    config, run_path = trained
    apply_edit, message = HAND_EDITS[edit]
    apply_edit(run_path)
    capsys.readouterr()
    with pytest.raises(CharRNNError, match=message) as caught:
        train(config, run_name="r", log=lambda *a, **k: None)
    assert "\n" not in str(caught.value)
    with pytest.raises(CharRNNError, match=message) as caught:
        load_run(run_path, log=lambda *a: None)
    assert "\n" not in str(caught.value)
    from tf_charrnn.sample import main as sample_main

    assert run_cli(sample_main, ["--run", str(run_path), "-n", "3", "--seed", "1"]) == 1
    assert one_line(capsys.readouterr().err).startswith("error: ")


def test_swapped_characters_in_vocab_json_are_caught_when_sampling_and_resuming(trained):
    config, run_path = trained
    edit_vocab(run_path, lambda chars: chars[1] + chars[0] + chars[2:])
    with pytest.raises(CharRNNError, match="vocab.json does not match the vocabulary checkpoint"):
        load_run(run_path, log=lambda *a: None)
    chars = json.loads((run_path / "vocab.json").read_text(encoding="utf-8"))["chars"]
    with pytest.raises(CharRNNError, match=re.escape(  # it said "(N vs N characters)"
            f"the vocabulary differs at id 0 (vocab.json has {chars[0]!r}, the corpus gives "
            f"{chars[1]!r})")):
        train(config, run_name="r", log=lambda *a, **k: None)


def test_resuming_with_the_edited_config_itself_still_refuses_the_checkpoint(trained):
    """Hand-editing config.yaml and passing the same values on the command line agrees with
    config.yaml, so only the checkpoint can tell: it must, in one line."""
    config, run_path = trained
    edit_config(run_path, "model", "hidden_size", 16)
    edited = apply_overrides(config, [("model", "hidden_size", 16)])
    with pytest.raises(CharRNNError, match=r"checkpoint .*ckpt-8 does not fit the training "
                                           r"state described by config.yaml and vocab.json"):
        train(edited, run_name="r", log=lambda *a, **k: None)


def test_a_hand_edited_config_is_one_line_on_stderr_in_a_real_process(trained):
    """The failed checkpoint read leaves values unrestored, which TensorFlow warns about as the
    process ends; the user must see only the error line."""
    _, run_path = trained
    edit_config(run_path, "model", "hidden_size", 16)
    env = {key: value for key, value in os.environ.items() if key != "TF_CPP_MIN_LOG_LEVEL"}
    done = subprocess.run([sys.executable, "-m", "tf_charrnn.sample", "--run", str(run_path),
                           "-n", "3"], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 1
    assert one_line(done.stderr).startswith(f"error: checkpoint {run_path}/checkpoints/ckpt-8 "
                                            f"does not fit the model")


# --- resuming from the command line --------------------------------------------------------------

def run_files(run_path):
    """{name: bytes} of everything in a run directory but its lock."""
    return {str(path.relative_to(run_path)): path.read_bytes()
            for path in sorted(run_path.rglob("*")) if path.is_file() and path.name != ".lock"}


@pytest.mark.parametrize("how", [["--run", "r"], ["--resume"]])
def test_the_run_name_alone_resumes_the_run_with_its_own_settings(trained, how, capsys):
    """`--run NAME` (or `--resume`) without the flags the run was started with: config.yaml is
    the base, not the defaults (which would name another corpus, batch and model)."""
    _, run_path = trained
    saved = yaml.safe_load((run_path / "config.yaml").read_text())
    code = run_cli(train_main, ["--runs-dir", str(run_path.parent), *how, "--max-steps", "12"])
    assert code == 0, capsys.readouterr().err
    assert f"resumed {run_path} from" in capsys.readouterr().out
    assert Run(run_path).newest_checkpoint().step == 12
    now = yaml.safe_load((run_path / "config.yaml").read_text())
    # The one setting given, and where the run lies now (a copy of the trained one); nothing else.
    saved["train"].update(max_steps=12, runs_dir=str(run_path.parent))
    assert now == saved


@pytest.mark.parametrize("flags, message", [
    (["--optimizer", "sgd"], "train.optimizer differs (run has adam, asked for sgd; its state is "
                             "in the checkpoint)"),
    (["--precision", "mixed_float16"], "model.precision differs (run has float32, asked for "
                                       "mixed_float16; mixed_float16's loss scale is in the "
                                       "checkpoint)"),
    (["--batch-size", "5"], "data.batch_size differs (run has 4, asked for 5)"),
    # Another split moves the training rows under the saved batch pointer.
    (["--val-fraction", "0.2"], "data.val_fraction differs (run has 0.05, asked for 0.2)"),
])
def test_a_resume_that_changes_the_checkpointed_state_is_refused_writing_nothing(
        trained, flags, message, capsys):
    """Another optimiser would start from empty slots (or fail to restore after config.yaml was
    rewritten), so the run would no longer resume as it was: refused before anything is written."""
    _, run_path = trained
    before = run_files(run_path)
    code = run_cli(train_main, ["--runs-dir", str(run_path.parent), "--run", "r",
                                "--max-steps", "12", *flags])
    assert code == 1
    line = one_line(capsys.readouterr().err)
    assert line == (f"error: cannot resume {run_path}: {message}; resume with the run's own "
                    f"settings, or start a new --run")
    assert run_files(run_path) == before


def test_resuming_a_finished_run_says_so_and_writes_nothing(trained, capsys):
    _, run_path = trained
    before = run_files(run_path)
    assert run_cli(train_main, ["--runs-dir", str(run_path.parent), "--run", "r"]) == 0
    out = capsys.readouterr().out
    assert "the run has trained its 8 steps: raise" in out and f"run unchanged: {run_path}" in out
    assert run_files(run_path) == before  # no validation, event file, checkpoint or config


def test_training_piped_into_head_carries_on_and_saves(trained):
    """`train ... | head -1`: the reader leaves after one line; the run must not die on a broken
    pipe (it did, with a traceback and no checkpoint)."""
    config, run_path = trained
    process = subprocess.Popen(
        [sys.executable, "-m", "tf_charrnn.train", "--runs-dir", str(run_path.parent), "--run",
         "piped", "--corpus", config.data.corpus, "--batch-size", "4", "--seq-length", "8",
         "--num-layers", "1", "--hidden-size", "8", "--embedding-size", "4", "--kernel", "keras",
         "--max-steps", "30", "--log-every", "1", "--eval-every", "5"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    process.stdout.readline()
    process.stdout.close()  # as head does after its line
    err = process.stderr.read()
    assert process.wait(timeout=300) == 0, err
    assert "Traceback" not in err and "BrokenPipeError" not in err
    assert Run(run_path.parent / "piped").newest_checkpoint().step == 30


def test_a_new_run_that_fails_before_its_first_file_leaves_no_directory(trained, capsys):
    config, run_path = trained
    runs = run_path.parent
    code = run_cli(train_main, ["--corpus", config.data.corpus, "--runs-dir", str(runs),
                                "--resume", "--run", "typo"])
    assert code == 1 and "has no checkpoint to resume from" in capsys.readouterr().err
    assert sorted(path.name for path in runs.iterdir()) == ["r"]


def test_resuming_a_run_that_does_not_exist_says_so_before_fetching_the_corpus(tmp_path,
                                                                             capsys):
    code = run_cli(train_main, ["--resume", "--run", "typo", "--runs-dir", str(tmp_path / "runs"),
                                "--corpus", "shakespeare", "--data-dir", str(tmp_path / "data"),
                                "--url", (tmp_path / "nowhere.txt").as_uri()])
    assert code == 1
    line = one_line(capsys.readouterr().err)
    assert "typo has no checkpoint to resume from" in line, line  # not a failed download
    assert not (tmp_path / "data").exists() and not (tmp_path / "runs").exists()


def test_a_kill_while_config_yaml_is_rewritten_cannot_spoil_the_run(trained, monkeypatch):
    """Resuming rewrites config.yaml; a kill in the middle of that write must not leave a
    truncated file behind (it is written atomically, like vocab.json and the manifests)."""
    config, run_path = trained
    config = apply_overrides(config, [("train", "max_steps", 12)])  # more to train: a real resume
    before = (run_path / "config.yaml").read_text()
    real_replace = os.replace

    def killed_during_write(src, dst):
        if Path(dst).name == "config.yaml":
            raise KeyboardInterrupt  # the process dies before the new file takes the old's place
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", killed_during_write)
    real_write_text = Path.write_text

    def killed_write_text(self, data, *args, **kwargs):
        if self.name == "config.yaml":
            real_write_text(self, data[: len(data) // 3], *args, **kwargs)
            raise KeyboardInterrupt
        return real_write_text(self, data, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", killed_write_text)
    with pytest.raises(KeyboardInterrupt):
        train(config, run_name="r", log=lambda *a, **k: None, stop_flag=StopNow())
    monkeypatch.undo()
    assert (run_path / "config.yaml").read_text() == before
    assert train(config, run_name="r", log=lambda *a, **k: None, stop_flag=StopNow()).step == 8


def test_a_checkpoint_pruned_while_the_sampler_reads_it_gives_way_to_a_newer_one(
        trained, monkeypatch):
    """A run that is training deletes old checkpoints as it saves: the one the sampler chose
    can vanish before it is read. It takes the newest one then, instead of blaming the files."""
    _, run_path = trained
    store = Run(run_path).checkpoints
    newest_good = runs_module.CheckpointStore.newest_good
    calls = []

    def chosen_then_pruned(self, log=print):
        calls.append(self.directory)
        if len(calls) == 1:  # the sampler chooses ckpt-4; the trainer prunes it right after
            older = [info for info in self.complete() if info.step == 4][0]
            self.delete(older.prefix)
            return older
        return newest_good(self, log)

    monkeypatch.setattr(runs_module.CheckpointStore, "newest_good", chosen_then_pruned)
    loaded = load_run(run_path, log=lambda *args: None)
    assert loaded.checkpoint.step == 8 and len(calls) == 2
    assert store.complete()[0].step == 8


def test_a_checkpoint_directory_names_its_newest_checkpoint(trained):
    """`--checkpoint RUN/best` or `RUN/checkpoints`: the newest good one there."""
    _, run_path = trained
    loaded = load_run(checkpoint=run_path / "checkpoints", log=lambda *args: None)
    assert loaded.checkpoint.step == 8 and loaded.run.path == run_path
