"""The real trainer end to end on tiny sizes: runs, resume, interrupts, NaN, lock, TensorBoard."""

import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

from conftest import StopAfter
from tf_charrnn.cli import run_cli
from tf_charrnn.config import Config, TrainConfig, apply_overrides
from tf_charrnn.errors import CharRNNError
from tf_charrnn.runs import Run, RunLock
from tf_charrnn.train import learning_rate_at, main, train

TINY = [("data", "batch_size", 4), ("data", "seq_length", 8), ("model", "num_layers", 2),
        ("model", "hidden_size", 16), ("model", "embedding_size", 8),
        ("train", "log_every", 2), ("train", "eval_every", 5), ("train", "sample_every", 1000),
        ("train", "checkpoint_every", 4), ("train", "sample_length", 20)]


def tiny_config(corpus, runs_dir, *overrides):
    return apply_overrides(Config(), [("data", "corpus", str(corpus)),
                                      ("train", "runs_dir", str(runs_dir)), *TINY, *overrides])


def read_scalars(run_path):
    """{tag: [(step, value)]} from the run's event files, read with TensorBoard's own reader."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(run_path), size_guidance={"tensors": 0})
    accumulator.Reload()
    scalars = {}
    for tag in accumulator.Tags()["tensors"]:
        values = [(event.step, tf.make_ndarray(event.tensor_proto))
                  for event in accumulator.Tensors(tag)]
        if all(value.shape == () and value.dtype.kind == "f" for _, value in values):
            scalars[tag] = [(step, float(value)) for step, value in values]
    return scalars, accumulator


def model_weights(run_path):
    from tf_charrnn.runs import load_run

    loaded = load_run(run_path, log=lambda *a: None)
    return [v.numpy() for v in loaded.model.trainable_variables], loaded


def test_trainer_runs_end_to_end_and_leaves_a_complete_run(tiny_corpus, tmp_path, capsys):
    config = tiny_config(tiny_corpus, tmp_path / "runs", ("train", "max_steps", 12),
                         ("train", "sample_every", 6))
    result = train(config, run_name="e2e")
    out = capsys.readouterr().out
    assert result.step == 12 and result.stopped == "done" and len(result.losses) == 12
    assert "model: lstm 2x16, embedding 8" in out and "parameters" in out
    assert "--- sample at step 6 ---" in out
    run = Run(result.run_path)
    assert run.exists()
    assert [info.step for info in run.checkpoints.complete()] == [12, 8, 4]
    assert run.best.complete(), "the best checkpoint by validation loss is kept"
    assert math.isfinite(result.val_loss)
    assert np.mean(result.losses[-4:]) < np.mean(result.losses[:4])


def test_resumed_run_equals_an_uninterrupted_one(tiny_corpus, tmp_path):
    overrides = [("model", "dropout", 0.3), ("train", "seed", 7), ("train", "steps_per_call", 3)]
    straight = train(tiny_config(tiny_corpus, tmp_path / "a", ("train", "max_steps", 10),
                                 *overrides), run_name="r")
    first = train(tiny_config(tiny_corpus, tmp_path / "b", ("train", "max_steps", 5),
                              *overrides), run_name="r")
    second = train(tiny_config(tiny_corpus, tmp_path / "b", ("train", "max_steps", 10),
                               *overrides), run_name="r")
    assert first.step == 5 and second.step == 10
    np.testing.assert_array_equal(first.losses + second.losses, straight.losses)
    weights_a, _ = model_weights(straight.run_path)
    weights_b, _ = model_weights(second.run_path)
    for a, b in zip(weights_a, weights_b):
        np.testing.assert_array_equal(a, b)


def test_steps_per_call_does_not_change_what_is_trained(tiny_corpus, tmp_path):
    """K steps a compiled call (the default is 10) against one a call: the same losses, dropout
    masks and weights."""
    results = {}
    for k in (1, 4):
        overrides = [("model", "dropout", 0.3), ("train", "seed", 3),
                     ("train", "steps_per_call", k), ("train", "max_steps", 9),
                     ("train", "log_every", 1000), ("train", "eval_every", 1000),
                     ("train", "checkpoint_every", 1000)]  # calls cut by K and the epochs only
        results[k] = train(tiny_config(tiny_corpus, tmp_path / f"k{k}", *overrides),
                           run_name="r")
    assert results[1].step == results[4].step == 9
    np.testing.assert_array_equal(results[4].losses, results[1].losses)
    for a, b in zip(model_weights(results[1].run_path)[0], model_weights(results[4].run_path)[0]):
        np.testing.assert_array_equal(b, a)


def test_a_run_without_validation_says_so_once(tiny_corpus, tmp_path):
    lines = []
    config = tiny_config(tiny_corpus, tmp_path, ("data", "val_fraction", 0.0),
                         ("train", "max_steps", 4), ("train", "eval_every", 2))
    result = train(config, run_name="nv", log=lambda *args, **kwargs: lines.append(str(args[0])),
                   show_progress=False)
    said = [line for line in lines if "no validation split" in line]
    assert said == ["no validation split (data.val_fraction 0): no validation loss and no best/ "
                    "checkpoint"], lines
    assert result.step == 4 and not Run(result.run_path).best.complete()


def test_state_is_carried_within_an_epoch_and_reset_at_each_epoch(tiny_corpus, tmp_path):
    config = tiny_config(tiny_corpus, tmp_path / "runs", ("train", "max_steps", 3))
    result = train(config, run_name="s")
    _, loaded = model_weights(result.run_path)
    reader = tf.train.load_checkpoint(str(Run(result.run_path).checkpoints.complete()[0].prefix))
    state_keys = [key for key in reader.get_variable_to_shape_map() if key.startswith("state_0")]
    carried = reader.get_tensor(state_keys[0])
    assert carried.shape == (4, 16) and np.abs(carried).max() > 0  # carried, not reset


def test_resume_with_a_different_model_names_what_differs(tiny_corpus, tmp_path):
    train(tiny_config(tiny_corpus, tmp_path / "runs", ("train", "max_steps", 2)), run_name="m")
    with pytest.raises(CharRNNError, match="model.hidden_size differs .run has 16, asked for 32"):
        train(tiny_config(tiny_corpus, tmp_path / "runs", ("train", "max_steps", 4),
                          ("model", "hidden_size", 32)), run_name="m")


def test_resume_with_a_different_corpus_is_refused(tiny_corpus, tmp_path):
    train(tiny_config(tiny_corpus, tmp_path / "runs", ("train", "max_steps", 2)), run_name="c")
    other = tmp_path / "other.txt"
    other.write_text(tiny_corpus.read_text() + "more", encoding="utf-8")
    with pytest.raises(CharRNNError, match="the corpus differs"):
        train(tiny_config(other, tmp_path / "runs", ("train", "max_steps", 4)), run_name="c")


def test_a_model_too_large_for_memory_is_refused_before_anything_is_built(tiny_corpus, tmp_path,
                                                                          monkeypatch):
    from tf_charrnn import memory

    monkeypatch.setattr(memory, "available_memory_bytes", lambda: 10 ** 6)
    with pytest.raises(CharRNNError, match=r"the model \([\d,]+ parameters\) and a batch need "
                                           r"about [\d.]+ GiB, more than the 0.0 GiB of memory "
                                           r"available: use a smaller --hidden-size"):
        train(tiny_config(tiny_corpus, tmp_path / "runs", ("train", "max_steps", 2),
                          ("model", "hidden_size", 512)), run_name="big")
    assert not (tmp_path / "runs").exists()


def test_the_memory_estimate_counts_each_optimizers_slots_as_keras_makes_them():
    import keras

    from tf_charrnn.config import OPTIMIZER_CHOICES
    from tf_charrnn.train import OPTIMIZER_SLOTS, make_optimizer

    assert set(OPTIMIZER_SLOTS) == set(OPTIMIZER_CHOICES)
    weights = [keras.Variable(np.zeros((3, 5), np.float32)),
               keras.Variable(np.zeros(7, np.float32))]
    for name, slots in OPTIMIZER_SLOTS.items():
        optimizer = make_optimizer(TrainConfig(optimizer=name), 0.1)
        optimizer.build(weights)
        per_weight = [v for v in optimizer.variables if tuple(v.shape) in ((3, 5), (7,))]
        assert len(per_weight) == slots * len(weights), name


def test_flags_on_resume_are_checked_against_the_runs_config_not_the_defaults(tmp_path):
    """A one-hot run (embedding_size 0) resumed with --embedding-size 0: right for the run,
    though the defaults (an embedding) would refuse it."""
    from tf_charrnn.config import CONFIGS_DIR, load_config
    from tf_charrnn.data import Vocab
    from tf_charrnn.train import build_parser, config_from_args

    saved = apply_overrides(load_config(CONFIGS_DIR / "min_char_rnn.yaml"),
                            [("data", "corpus", "corpus.txt"), ("train", "seed", 7)])
    run = Run(tmp_path / "runs" / "mc")
    run.write_metadata(saved, Vocab("abc"), corpus={"path": "corpus.txt", "sha256": "0"})
    run.checkpoints.write(tf.train.Checkpoint(step=tf.Variable(1)), step=1)
    args = build_parser().parse_args(["--runs-dir", str(tmp_path / "runs"), "--run", "mc",
                                      "--embedding-size", "0", "--max-steps", "99"])
    config = config_from_args(args)
    assert config.model == saved.model and config.model.one_hot
    assert (config.train.seed, config.train.max_steps) == (7, 99)
    assert config.data.corpus == "corpus.txt"


@pytest.mark.parametrize("name, corpus", [
    ("korean", "data/korean/input.txt"), ("lecture", "linux_kernel"), ("shakespeare", "shakespeare")])
def test_corpus_naming_a_recipe_trains_on_that_recipes_corpus(name, corpus):
    """`--corpus korean` picks configs/korean.yaml; "korean" itself is no corpus."""
    from tf_charrnn.train import build_parser, config_from_args

    config = config_from_args(build_parser().parse_args(["--corpus", name]))
    assert config.data.corpus == corpus


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tiny_corpus, tmp_path):
    runs = tmp_path / "runs"
    train(tiny_config(tiny_corpus, runs, ("train", "max_steps", 4), ("train", "optimizer", "sgd")),
          run_name="n")
    exploding = [("train", "max_steps", 30), ("train", "optimizer", "sgd"),
                 ("train", "learning_rate", 1e38), ("train", "clip", "none"),
                 ("train", "schedule", "constant")]
    with pytest.raises(CharRNNError, match=r"training loss became (nan|inf) at step \d+; the last "
                                           r"good checkpoint .*ckpt-4 is kept"):
        train(tiny_config(tiny_corpus, runs, *exploding), run_name="n")
    newest = Run(runs / "n").newest_checkpoint()
    assert newest.step == 4
    weights, _ = model_weights(runs / "n")
    assert all(np.all(np.isfinite(w)) for w in weights)


def test_a_second_trainer_on_the_same_run_is_refused(tiny_corpus, tmp_path):
    run_path = tmp_path / "runs" / "locked"
    run_path.mkdir(parents=True)
    with RunLock(run_path):
        with pytest.raises(CharRNNError, match="is in use by another trainer"):
            train(tiny_config(tiny_corpus, tmp_path / "runs", ("train", "max_steps", 2)),
                  run_name="locked")


def test_interrupt_saves_a_checkpoint_that_resumes(tiny_corpus, tmp_path, capsys):
    config = tiny_config(tiny_corpus, tmp_path / "runs", ("train", "max_steps", 50))
    result = train(config, run_name="i", stop_flag=StopAfter(3))
    assert result.stopped == "interrupted" and 0 < result.step < 50
    assert "stopped by SIGINT" in capsys.readouterr().out
    assert Run(result.run_path).checkpoints.complete()[0].step == result.step
    resumed = train(config, run_name="i")
    assert resumed.step == 50 and len(resumed.losses) == 50 - result.step


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_stop_signal_to_a_training_process_saves_and_exits_128_plus_it(tiny_corpus, tmp_path,
                                                                        signum):
    runs = tmp_path / "runs"
    command = [sys.executable, "-m", "tf_charrnn.train", "--corpus", str(tiny_corpus),
               "--runs-dir", str(runs), "--run", "sig", "--max-steps", "100000",
               "--batch-size", "4", "--seq-length", "8", "--hidden-size", "8",
               "--embedding-size", "4", "--checkpoint-every", "100000", "--log-every", "1"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        deadline = time.monotonic() + 120
        for line in process.stdout:
            if line.startswith("step ") or time.monotonic() > deadline:
                break
        process.send_signal(signum)
        output, _ = process.communicate(timeout=60)
    finally:
        process.kill()
    assert process.returncode == 128 + signum, output
    # The hint names the run where it is (a bare name would mean runs/NAME, another run).
    assert f"stopped by {signum.name} at step" in output
    assert f"checkpoint saved: resume with --run {runs / 'sig'}" in output
    steps = [info.step for info in Run(runs / "sig").checkpoints.complete()]
    assert len(steps) == 1 and steps[0] > 0


def test_event_files_hold_the_scalars_text_and_hparams(tiny_corpus, tmp_path):
    config = tiny_config(tiny_corpus, tmp_path / "runs", ("train", "max_steps", 10),
                         ("train", "sample_every", 5))
    result = train(config, run_name="tb")
    scalars, accumulator = read_scalars(result.run_path)
    for tag in ("train/loss", "train/bpc", "val/loss", "val/bpc", "learning_rate", "grad_norm",
                "chars_per_sec"):
        assert scalars.get(tag), f"no {tag} events"
    steps, losses = zip(*scalars["train/loss"])
    assert list(steps) == [2, 4, 6, 8, 10]
    bpc = dict(scalars["train/bpc"])
    assert all(abs(bpc[s] - loss / math.log(2)) < 1e-5 for s, loss in zip(steps, losses))
    assert scalars["learning_rate"][0][1] == pytest.approx(0.002)
    assert "sample" in accumulator.Tags()["tensors"]
    plugins = accumulator.PluginTagToContent("hparams")
    assert plugins, "no hparams plugin data"


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_tensorboard_serves_the_runs_scalars(tiny_corpus, tmp_path):
    runs = tmp_path / "runs"
    train(tiny_config(tiny_corpus, runs, ("train", "max_steps", 6)), run_name="served")
    port = free_port()
    tensorboard = Path(sys.executable).with_name("tensorboard")
    process = subprocess.Popen([str(tensorboard), "--logdir", str(runs), "--host", "127.0.0.1",
                                "--port", str(port)], stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    try:
        deadline, tags = time.monotonic() + 90, {}
        url = f"http://127.0.0.1:{port}/data/plugin/scalars/tags"
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(url, timeout=5) as response:
                    tags = json.loads(response.read())
                if "served" in tags and "train/loss" in tags["served"]:
                    break
            except OSError:
                pass
            time.sleep(1)
        assert "train/loss" in tags.get("served", {}), tags
        assert "val/loss" in tags["served"] and "learning_rate" in tags["served"]
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()


def test_learning_rate_decays_per_epoch_as_a_pure_function_of_the_step():
    config = TrainConfig(learning_rate=0.002, decay_rate=0.97)
    assert float(learning_rate_at(0, config, 100, 1000)) == pytest.approx(0.002)
    assert float(learning_rate_at(99, config, 100, 1000)) == pytest.approx(0.002)
    assert float(learning_rate_at(100, config, 100, 1000)) == pytest.approx(0.002 * 0.97)
    assert float(learning_rate_at(250, config, 100, 1000)) == pytest.approx(0.002 * 0.97 ** 2)


def test_warmup_then_cosine_reaches_the_floor():
    config = TrainConfig(learning_rate=1.0, schedule="cosine", warmup_steps=10,
                         min_learning_rate=0.1)
    # 111 steps, indices 0-110: 10 of warmup, then 100 of decay; the last one trains at the floor.
    assert float(learning_rate_at(0, config, 50, 111)) == pytest.approx(0.1)
    assert float(learning_rate_at(9, config, 50, 111)) == pytest.approx(1.0)
    assert float(learning_rate_at(60, config, 50, 111)) == pytest.approx(0.55)
    assert float(learning_rate_at(110, config, 50, 111)) == pytest.approx(0.1)
    wsd = TrainConfig(learning_rate=1.0, schedule="wsd", min_learning_rate=0.0)
    assert float(learning_rate_at(19, wsd, 50, 20)) == pytest.approx(0.0)


def test_cosine_and_wsd_follow_the_steps_or_the_time_budget_whichever_is_further():
    config = TrainConfig(learning_rate=1.0, schedule="cosine", max_seconds=60.0)
    assert float(learning_rate_at(0, config, 50, 1000, seconds_trained=30)) == pytest.approx(0.5)
    assert float(learning_rate_at(500, config, 50, 1001, seconds_trained=15)) == pytest.approx(0.5)
    assert float(learning_rate_at(10, config, 50, 1000, seconds_trained=90)) == pytest.approx(0.0)
    no_budget = TrainConfig(learning_rate=1.0, schedule="cosine")
    assert float(learning_rate_at(500, no_budget, 50, 1001, 30)) == pytest.approx(0.5)
    wsd = TrainConfig(learning_rate=1.0, schedule="wsd", cooldown_fraction=0.2,
                      min_learning_rate=0.1, max_seconds=60.0)
    assert float(learning_rate_at(700, wsd, 50, 1000, seconds_trained=30)) == pytest.approx(1.0)
    assert float(learning_rate_at(0, wsd, 50, 1000, seconds_trained=54)) == pytest.approx(0.55)
    assert float(learning_rate_at(900, wsd, 50, 1001, seconds_trained=30)) == pytest.approx(0.55)
    assert float(learning_rate_at(0, wsd, 50, 1000, seconds_trained=61)) == pytest.approx(0.1)
    exponential = TrainConfig(learning_rate=0.002, decay_rate=0.97, max_seconds=60.0)
    assert float(learning_rate_at(0, exponential, 100, 1000, 55)) == pytest.approx(0.002)


def seconds_trained(run_path):
    prefix = Run(run_path).checkpoints.complete()[0].prefix
    return float(tf.train.load_checkpoint(str(prefix)).get_tensor(
        "seconds_trained/.ATTRIBUTES/VARIABLE_VALUE"))


def test_a_time_budget_anneals_the_cosine_rate_and_a_resumed_run_continues_it(
        tiny_corpus, tmp_path, capsys):
    """--max-seconds counts the run's training time over all its calls, as --max-steps counts
    its steps; the cosine rate follows that time down to its floor."""
    def budget(seconds):
        return tiny_config(tiny_corpus, tmp_path / "runs", ("train", "max_seconds", seconds),
                           ("train", "schedule", "cosine"), ("train", "epochs", 10 ** 4),
                           ("train", "log_every", 1), ("train", "eval_every", 10 ** 6),
                           ("train", "checkpoint_every", 10 ** 6))

    first = train(budget(3.0), run_name="t")
    assert first.step > 10 and 3.0 <= seconds_trained(first.run_path) < 3.0 + 10
    rates = [value for _, value in read_scalars(first.run_path)[0]["learning_rate"]]
    assert np.all(np.diff(rates) <= 1e-9) and rates[0] <= 0.002 and rates[-1] < 0.1 * 0.002

    again = train(budget(3.0), run_name="t")  # its budget is spent: nothing more to train
    assert again.step == first.step and not again.losses
    assert "the run has trained its 3 seconds (--max-seconds)" in capsys.readouterr().out

    longer = train(budget(6.0), run_name="t")
    assert longer.step > first.step and seconds_trained(longer.run_path) >= 6.0
    resumed_rates = [value for step, value in read_scalars(longer.run_path)[0]["learning_rate"]
                     if step > first.step]
    # Resumed at >= 3 of 6 seconds: at most half the rate, never back at the start.
    assert rates[-1] < resumed_rates[0] <= 0.5 * 0.002 + 1e-9
    assert resumed_rates[-1] < 0.1 * 0.002


def test_a_checkpoint_from_before_seconds_trained_resumes(tiny_corpus, tmp_path, monkeypatch):
    from tf_charrnn.train import TrainProgress

    config = tiny_config(tiny_corpus, tmp_path / "runs", ("train", "max_steps", 4))
    full = TrainProgress.trackables
    monkeypatch.setattr(TrainProgress, "trackables",
                        lambda self: {k: v for k, v in full(self).items()
                                      if k != "seconds_trained"})
    old = train(config, run_name="old")
    names = [name for name, _ in tf.train.list_variables(
        str(Run(old.run_path).checkpoints.complete()[0].prefix))]
    assert not any(name.startswith("seconds_trained") for name in names)
    monkeypatch.setattr(TrainProgress, "trackables", full)
    resumed = train(tiny_config(tiny_corpus, tmp_path / "runs", ("train", "max_steps", 8)),
                    run_name="old")
    assert resumed.step == 8 and len(resumed.losses) == 4
    assert 0 < seconds_trained(resumed.run_path) < 60


def test_min_char_rnn_recipe_reports_its_smoothed_loss(tiny_corpus, tmp_path, capsys):
    code = run_cli(main, ["--config", "configs/min_char_rnn.yaml", "--corpus", str(tiny_corpus),
                          "--runs-dir", str(tmp_path / "runs"), "--run", "mc",
                          "--max-steps", "200", "--hidden-size", "16"])
    out = capsys.readouterr().out
    assert code == 0
    assert "smooth_loss" in out


@pytest.mark.parametrize("argv, message", [
    (["--set", "train.nonsense=1"], "unknown config key 'train.nonsense'"),
    (["--set", "model.hidden_size=abc"], "model.hidden_size must be int, got 'abc'"),
    (["--set", "learning_rate"], "must look like section.field=value"),
    (["--hidden-size", "abc"], "argument --hidden-size: invalid int value"),
    (["--cell", "lstmm"], "model.cell must be one of rnn, lstm, gru, got 'lstmm'"),
    (["--config", "no/such.yaml"], "config file no/such.yaml not found"),
    (["--corpus", "nope"], "unknown corpus 'nope'"),
])
def test_bad_arguments_exit_with_one_line(argv, message, capsys, tmp_path):
    code = run_cli(main, argv + ["--runs-dir", str(tmp_path / "runs")])
    err = capsys.readouterr().err
    assert code in (1, 2)
    assert message in err and err.count("\n") == 1 and "Traceback" not in err


def test_overrides_reach_the_saved_config(tiny_corpus, tmp_path):
    code = run_cli(main, ["--corpus", str(tiny_corpus), "--runs-dir", str(tmp_path / "runs"),
                          "--run", "o", "--max-steps", "2", "--batch-size", "4",
                          "--seq-length", "8", "--hidden-size", "8", "--embedding-size", "4",
                          "--set", "train.learning_rate=0.01", "--set", "model.cell=gru"])
    assert code == 0
    saved = Run(tmp_path / "runs" / "o").read_config()
    assert saved.train.learning_rate == 0.01 and saved.model.cell == "gru"
    assert saved.model.hidden_size == 8 and saved.train.max_steps == 2


def test_a_recipe_prime_the_vocabulary_lacks_does_not_stop_training(tiny_corpus, tmp_path):
    """The linux_kernel recipe's '/*' on a corpus without '/' or '*': the samples during
    training start from the default prime, said once, and every checkpoint is written."""
    messages = []
    config = tiny_config(tiny_corpus, tmp_path / "runs", ("train", "max_steps", 6),
                         ("train", "sample_every", 2), ("train", "checkpoint_every", 2),
                         ("train", "sample_length", 5), ("sample", "prime", "/*"))
    result = train(config, run_name="prime", log=messages.append, show_progress=False)
    assert result.step == 6
    warnings = [m for m in messages if "sample.prime has characters not in the vocabulary" in m]
    assert len(warnings) == 1 and "'/' '*'" in warnings[0]
    assert sum("--- sample at step" in m for m in messages) == 3
    assert [info.step for info in Run(result.run_path).checkpoints.complete()] == [6, 4, 2]


def test_the_logged_rate_leaves_out_the_compiling_calls(tiny_corpus, tmp_path):
    """The first call of each size K traces and compiles; a rate over it would be a fraction of
    the steady one, so the first logged point is the first call after it."""
    config = tiny_config(tiny_corpus, tmp_path / "runs", ("train", "max_steps", 4),
                         ("train", "log_every", 1), ("train", "steps_per_call", 1))
    result = train(config, run_name="rate", log=lambda *args: None, show_progress=False)
    scalars, _ = read_scalars(result.run_path)
    assert [step for step, _ in scalars["train/loss"]] == [1, 2, 3, 4]
    assert [step for step, _ in scalars["chars_per_sec"]] == [2, 3, 4]
    assert all(value > 0 for _, value in scalars["chars_per_sec"])


def test_a_file_where_the_checkpoints_go_is_one_error(tiny_corpus, tmp_path):
    (tmp_path / "runs" / "blocked").mkdir(parents=True)
    (tmp_path / "runs" / "blocked" / "checkpoints").write_text("in the way")
    config = tiny_config(tiny_corpus, tmp_path / "runs", ("train", "max_steps", 2))
    with pytest.raises(CharRNNError, match=r"could not write checkpoint .*ckpt-2 .*File exists.*"
                                           r"checkpoints written before it are kept"):
        train(config, run_name="blocked", log=lambda *args: None)


def test_a_run_under_relative_paths_resumes_from_anywhere(tiny_corpus, tmp_path, monkeypatch,
                                                          capsys):
    """Relative --corpus and --runs-dir: config.yaml keeps the corpus's absolute path, and the
    stop message names the run by its absolute path, which `--run` takes as it is."""
    from tf_charrnn.train import build_parser, config_from_args

    monkeypatch.chdir(tiny_corpus.parent)
    config = tiny_config("input.txt", "runs", ("train", "max_steps", 50))
    result = train(config, run_name="rel", stop_flag=StopAfter(2))
    assert result.stopped == "interrupted"
    hint = f"resume with --run {(tiny_corpus.parent / 'runs' / 'rel').resolve()}"
    assert hint in capsys.readouterr().out
    assert Run(result.run_path).read_config().data.corpus == str(tiny_corpus.resolve())
    monkeypatch.chdir(tmp_path)  # elsewhere, as the hint says
    args = build_parser().parse_args(["--run", hint.split()[-1], "--max-steps", "6"])
    resumed = train(config_from_args(args), run_name=args.run, log=lambda *a: None)
    assert resumed.step == 6 and len(resumed.losses) == 6 - result.step


def test_a_run_started_but_not_yet_saved_keeps_its_settings(tiny_corpus, tmp_path):
    """`--run NAME` of a run with config.yaml but no checkpoint yet (still training, or stopped
    before its first save) takes that config.yaml, not the defaults' corpus."""
    from tf_charrnn.data import Vocab
    from tf_charrnn.train import build_parser, config_from_args

    config = tiny_config(tiny_corpus, tmp_path / "runs", ("train", "max_steps", 3))
    Run(tmp_path / "runs" / "early").write_metadata(config, Vocab("ab"), {})
    args = build_parser().parse_args(["--runs-dir", str(tmp_path / "runs"), "--run", "early"])
    assert config_from_args(args).data.corpus == str(tiny_corpus)


def test_a_tilde_in_a_path_flag_or_recipe_is_the_home_directory(tmp_path):
    from tf_charrnn.config import load_config
    from tf_charrnn.train import build_parser, config_from_args

    args = build_parser().parse_args(["--corpus", "shakespeare", "--runs-dir", "~/somewhere",
                                      "--data-dir", "~/data"])
    config = config_from_args(args)
    assert config.train.runs_dir == str(Path.home() / "somewhere")
    assert config.data.data_dir == str(Path.home() / "data")
    recipe = tmp_path / "r.yaml"
    recipe.write_text("train:\n  runs_dir: ~/runs\n")
    assert load_config(recipe).train.runs_dir == str(Path.home() / "runs")


def test_the_logged_rate_is_the_one_each_step_trained_with(tiny_corpus, tmp_path):
    """Warmup over 4 steps: step 1 trains at a quarter of the rate, step 2 at half, ..."""
    config = tiny_config(tiny_corpus, tmp_path / "runs", ("train", "max_steps", 3),
                         ("train", "log_every", 1), ("train", "steps_per_call", 1),
                         ("train", "schedule", "constant"), ("train", "warmup_steps", 4),
                         ("train", "learning_rate", 1.0))
    result = train(config, run_name="lr", log=lambda *args: None, show_progress=False)
    rates = read_scalars(result.run_path)[0]["learning_rate"]
    assert rates == [(1, pytest.approx(0.25)), (2, pytest.approx(0.5)), (3, pytest.approx(0.75))]
