"""tf.distribute: replicas share the global batch and train exactly as one device would.

Logical devices and collective ops can only be configured before TensorFlow starts, which the
pytest process has already done, so the strategy runs happen in child processes: this file run as
a script (`python tests/test_distribute.py mirrored|worker ...`). Each child trains with the real
train() and records, after every compiled call, the step, the losses and every trainable weight,
through wrappers around make_strategy and make_train_call; the tests compare the recordings.
Children see no GPU (CUDA_VISIBLE_DEVICES is empty): this file is about the CPU path;
scripts/gpu_check.py measures the GPU one.

Sizes: B=4 rows, T=8 steps, H=8 units, two LSTM layers, a few steps; the learning rate is high so
that a wrong split of rows or state would move the loss visibly.
"""

import json
import signal
import os
import socket
import subprocess
import sys
import time
import types
from pathlib import Path

import numpy as np
import pytest

from conftest import StopAfter
from tf_charrnn.config import Config, apply_overrides

THIS_FILE = Path(__file__).resolve()
REPO = THIS_FILE.parents[1]
CHILD_TIMEOUT = 150  # seconds for a child (or a pair of workers) before it counts as hung

# kernel auto: the fused CPU kernel, the one a CPU-only machine trains with. Dropout on: each
# replica must apply the masks one device applies to its rows.
TINY = [("data", "batch_size", 4), ("data", "seq_length", 8), ("model", "num_layers", 2),
        ("model", "hidden_size", 8), ("model", "embedding_size", 8), ("model", "kernel", "auto"),
        ("model", "dropout", 0.3),
        ("train", "learning_rate", 0.05), ("train", "eval_every", 1000),
        ("train", "sample_every", 1000), ("train", "checkpoint_every", 1000),
        ("train", "log_every", 1000), ("data", "val_fraction", 0.0),
        ("train", "steps_per_call", 1)]  # one step a call: the children record each step


# Replicas sum their partial gradients in another order than one device does, and Adam divides
# each gradient by its own running size, so an entry whose gradient is nearly zero carries that
# rounding into its weight at up to ~1e-4 relative; losses agree far more tightly.
WEIGHT_TOLERANCE = {"rtol": 1e-4, "atol": 1e-5}
LOSS_TOLERANCE = {"rtol": 1e-5}


def tiny_config(corpus, runs_dir, strategy, max_steps, *overrides):
    return apply_overrides(Config(), [("data", "corpus", str(corpus)),
                                      ("train", "runs_dir", str(runs_dir)),
                                      ("train", "strategy", strategy),
                                      ("train", "max_steps", max_steps), *TINY, *overrides])


# --- the child side ------------------------------------------------------------------------------

def train_and_record(config, out_path, **train_kwargs):
    """Run train(config) and save what every compiled call did to out_path (.npz)."""
    import tensorflow as tf

    from tf_charrnn import train as trainer

    record = {"steps": [], "losses": [], "weights": [], "replicas": [], "chief": []}
    make_strategy, make_train_call = trainer.make_strategy, trainer.make_train_call

    def recording_strategy(name, **kwargs):
        strategy = make_strategy(name, **kwargs)
        record["replicas"].append(strategy.num_replicas_in_sync)
        record["chief"].append(trainer.is_chief(strategy))
        return strategy

    def recording_train_call(model, optimizer, progress, strategy, config):
        train_call = make_train_call(model, optimizer, progress, strategy, config)

        def call(xs, ys):
            losses, norms = train_call(xs, ys)
            record["steps"].append(int(optimizer.iterations.numpy()))
            record["losses"].extend(losses.numpy().tolist())
            record["weights"].append(np.concatenate(
                [np.ravel(v.numpy()) for v in model.trainable_variables]))
            return losses, norms

        return call

    trainer.make_strategy, trainer.make_train_call = recording_strategy, recording_train_call
    try:
        result = trainer.train(config, run_name="run", **train_kwargs)
    finally:
        trainer.make_strategy, trainer.make_train_call = make_strategy, make_train_call
    assert result.losses == record["losses"]
    np.savez(out_path, steps=record["steps"], losses=record["losses"],
             weights=np.stack(record["weights"]), replicas=record["replicas"][0],
             chief=record["chief"][0], pid=os.getpid(),
             devices=[d.name for d in tf.config.list_logical_devices()])
    return result


def child_mirrored(corpus, out_dir):
    """One device for 4 steps; two CPU replicas for 2 steps, then resumed to 4; two refusals."""
    import tensorflow as tf

    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(
        cpu, [tf.config.LogicalDeviceConfiguration(), tf.config.LogicalDeviceConfiguration()])
    from tf_charrnn.errors import UsageError

    out_dir = Path(out_dir)
    several = [("train", "steps_per_call", 2)]  # the K-step loop carries the gathered state
    train_and_record(tiny_config(corpus, out_dir / "one", "one_device", 4, *several),
                     out_dir / "one.npz")
    train_and_record(tiny_config(corpus, out_dir / "mirrored", "mirrored", 2, *several),
                     out_dir / "mirrored_first.npz")
    train_and_record(tiny_config(corpus, out_dir / "mirrored", "mirrored", 4, *several),
                     out_dir / "mirrored_resumed.npz")
    refusals = {"odd_batch": ("data", "batch_size", 3), "jit": ("train", "jit_compile", True)}
    messages = {}
    for name, override in refusals.items():
        try:
            train_and_record(tiny_config(corpus, out_dir / name, "mirrored", 2, override),
                             out_dir / f"{name}.npz")
            messages[name] = "no error"
        except UsageError as error:
            messages[name] = str(error)
    (out_dir / "refusals.json").write_text(json.dumps(messages))


def child_worker(corpus, runs_dir, max_steps, sample_every, out_path, max_seconds="0",
                 clock_rate="1", stop_after="0"):
    """One worker of the cluster in TF_CONFIG (samples are the chief's job alone). With
    max_seconds, a time-budgeted cosine run whose trainer reads a clock running clock_rate
    times as fast as the real one; with stop_after, a stop signal after that many checks."""
    from tf_charrnn import train as trainer

    overrides = [("train", "sample_every", int(sample_every)), ("train", "sample_length", 10)]
    if float(max_seconds):
        overrides += [("train", "max_seconds", float(max_seconds)),
                      ("train", "schedule", "cosine")]
        start, real_clock, rate = time.perf_counter(), time.perf_counter, float(clock_rate)
        trainer.time = types.SimpleNamespace(**{
            **vars(time), "perf_counter": lambda: start + rate * (real_clock() - start)})
    stop_flag = StopAfter(int(stop_after)) if int(stop_after) else None
    train_and_record(tiny_config(corpus, runs_dir, "multi_worker", int(max_steps), *overrides),
                     out_path, stop_flag=stop_flag)


# --- the pytest side -----------------------------------------------------------------------------

def child_env(**extra):
    env = {key: value for key, value in os.environ.items() if key != "TF_CONFIG"}
    env.update(CUDA_VISIBLE_DEVICES="", TF_CPP_MIN_LOG_LEVEL="3", **extra)
    return env


def free_ports(count):
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def start_children(commands, logs, envs):
    """Start every command at once, each writing to its log."""
    processes = []
    for command, log, env in zip(commands, logs, envs):
        with open(log, "wb") as handle:
            processes.append(subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT,
                                              env=env, cwd=REPO))
    return processes


def wait_all(processes, logs, timeout=CHILD_TIMEOUT):
    """Wait for all within timeout (together); kill any left in `finally`; their exit codes."""
    try:
        deadline = time.monotonic() + timeout
        for process in processes:
            process.wait(timeout=max(deadline - time.monotonic(), 1))
    except subprocess.TimeoutExpired:
        pytest.fail(f"children still running after {timeout} s:\n" + tails(logs))
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()
    return [process.returncode for process in processes]


def run_children(commands, logs, envs, timeout=CHILD_TIMEOUT):
    """Run every command at once; all must succeed within timeout. Their logs' texts."""
    codes = wait_all(start_children(commands, logs, envs), logs, timeout)
    failed = [str(log) for code, log in zip(codes, logs) if code != 0]
    assert not failed, f"children failed ({', '.join(failed)}):\n" + tails(logs)
    return [Path(log).read_text(errors="replace") for log in logs]


def tails(logs, lines=25):
    text = ""
    for log in logs:
        content = Path(log).read_text(errors="replace").splitlines() if Path(log).exists() else []
        text += f"--- {log}\n" + "\n".join(content[-lines:]) + "\n"
    return text


def checkpoint_tensors(prefix):
    """{name: array} of every numeric tensor in a checkpoint but the wall-clock seconds_trained."""
    import tensorflow as tf

    reader = tf.train.load_checkpoint(str(prefix))
    tensors = {name: reader.get_tensor(name) for name in reader.get_variable_to_shape_map()
               if not name.startswith("seconds_trained/")}
    return {name: value for name, value in tensors.items()
            if isinstance(value, np.ndarray) and value.dtype.kind in "fiu"}


def test_two_cpu_replicas_train_exactly_like_one_device(tiny_corpus, tmp_path):
    from tf_charrnn.runs import Run

    run_children([[sys.executable, str(THIS_FILE), "mirrored", str(tiny_corpus), str(tmp_path)]],
                 [tmp_path / "mirrored.log"], [child_env()])
    one = np.load(tmp_path / "one.npz")
    first = np.load(tmp_path / "mirrored_first.npz")
    resumed = np.load(tmp_path / "mirrored_resumed.npz")
    assert int(one["replicas"]) == 1
    assert int(first["replicas"]) == int(resumed["replicas"]) == 2
    assert {"/device:CPU:0", "/device:CPU:1"} <= set(first["devices"].tolist())
    assert first["steps"].tolist() == [2] and resumed["steps"].tolist() == [4]
    # Same global batch: the same loss at every step and the same weights after every call.
    mirrored_losses = np.concatenate([first["losses"], resumed["losses"]])
    assert len(mirrored_losses) == 4 and mirrored_losses[-1] < mirrored_losses[0]
    np.testing.assert_allclose(mirrored_losses, one["losses"], **LOSS_TOLERANCE)
    mirrored_weights = np.concatenate([first["weights"], resumed["weights"]])
    np.testing.assert_allclose(mirrored_weights, one["weights"], **WEIGHT_TOLERANCE)
    # Everything the checkpoint holds agrees too: optimiser slots, counters, the carried state.
    one_tensors = checkpoint_tensors(Run(tmp_path / "one/run").checkpoints.complete()[0].prefix)
    mirrored_run = Run(tmp_path / "mirrored/run")
    assert [info.step for info in mirrored_run.checkpoints.complete()] == [4, 2]
    mirrored_tensors = checkpoint_tensors(mirrored_run.checkpoints.complete()[0].prefix)
    assert mirrored_tensors.keys() == one_tensors.keys()
    assert any(name.startswith("state_0") for name in one_tensors)
    for name, value in one_tensors.items():
        np.testing.assert_allclose(mirrored_tensors[name], value, err_msg=name,
                                   **WEIGHT_TOLERANCE)
    refusals = json.loads((tmp_path / "refusals.json").read_text())
    assert "data.batch_size 3 must be a multiple of the 2 replicas" in refusals["odd_batch"]
    assert "train.jit_compile works on one device only, not on 2 replicas" in refusals["jit"]


def run_workers(corpus, runs_dirs, max_steps, sample_every, tmp_path, phase, max_seconds=0,
                clock_rates=(1, 1), stops_after=(0, 0)):
    """Two workers on 127.0.0.1 training together; returns (recordings, logs) per worker."""
    ports = free_ports(2)
    cluster = {"worker": [f"127.0.0.1:{port}" for port in ports]}
    commands, logs, envs, outs = [], [], [], []
    for index, runs_dir in enumerate(runs_dirs):
        outs.append(tmp_path / f"{phase}_worker{index}.npz")
        commands.append([sys.executable, str(THIS_FILE), "worker", str(corpus), str(runs_dir),
                         str(max_steps), str(sample_every), str(outs[-1]), str(max_seconds),
                         str(clock_rates[index]), str(stops_after[index])])
        logs.append(tmp_path / f"{phase}_worker{index}.log")
        tf_config = {"cluster": cluster, "task": {"type": "worker", "index": index}}
        envs.append(child_env(TF_CONFIG=json.dumps(tf_config)))
    texts = run_children(commands, logs, envs)
    return [np.load(out) for out in outs], texts


def assert_workers_in_lockstep(chief, worker):
    assert bool(chief["chief"]) and not bool(worker["chief"])
    assert int(chief["replicas"]) == int(worker["replicas"]) == 2
    assert chief["steps"].tolist() == worker["steps"].tolist()
    np.testing.assert_array_equal(chief["losses"], worker["losses"])
    # All-reduce hands every worker the same gradient sum, so the weights stay bit-identical.
    np.testing.assert_array_equal(chief["weights"], worker["weights"])


def test_two_workers_train_like_one_device_and_only_the_chief_writes(tiny_corpus, tmp_path):
    from tf_charrnn.runs import Run
    from tf_charrnn.train import train

    chief_runs, worker_runs = tmp_path / "chief_runs", tmp_path / "worker_runs"
    (chief, worker), (chief_log, worker_log) = run_workers(
        tiny_corpus, [chief_runs, worker_runs], 3, 2, tmp_path, "first")
    assert_workers_in_lockstep(chief, worker)
    assert chief["steps"].tolist() == [1, 2, 3]
    run = Run(chief_runs / "run")
    assert run.exists() and [info.step for info in run.checkpoints.complete()] == [3]
    assert list(run.path.glob("events.out.tfevents.*"))
    assert not worker_runs.exists(), "a non-chief worker must not create its run directory"
    assert "--- sample at step 2 ---" in chief_log
    assert "--- sample at step" not in worker_log

    # Resume: both workers read the chief's run (one shared runs_dir), only the chief writes it.
    (chief2, worker2), (chief2_log, _) = run_workers(
        tiny_corpus, [chief_runs, chief_runs], 5, 1000, tmp_path, "resumed")
    assert_workers_in_lockstep(chief2, worker2)
    assert worker2["steps"].tolist() == [4, 5], "the non-chief restored step 3 from the chief's run"
    assert f"resumed {run.path} from" in chief2_log
    assert [info.step for info in run.checkpoints.complete()] == [5, 3]
    assert (run.path / ".lock").read_text() == str(int(chief2["pid"]))
    writers = {event.name.split(".")[-3] for event in run.path.glob("events.out.tfevents.*")}
    assert writers == {str(int(chief["pid"])), str(int(chief2["pid"]))}

    # The cluster's trajectory is one device's with the same global batch.
    reference = train(tiny_config(tiny_corpus, tmp_path / "reference", "one_device", 5),
                      run_name="run", log=lambda *args: None)
    cluster_losses = np.concatenate([chief["losses"], chief2["losses"]])
    np.testing.assert_allclose(cluster_losses, reference.losses, **LOSS_TOLERANCE)
    reference_tensors = checkpoint_tensors(Run(reference.run_path).checkpoints.complete()[0].prefix)
    cluster_tensors = checkpoint_tensors(run.checkpoints.complete()[0].prefix)
    assert cluster_tensors.keys() == reference_tensors.keys()
    for name, value in reference_tensors.items():
        np.testing.assert_allclose(cluster_tensors[name], value, err_msg=name,
                                   **WEIGHT_TOLERANCE)


def test_two_workers_agree_on_when_a_time_budget_ends(tiny_corpus, tmp_path):
    """Worker 1's clock runs twice as fast: unless the workers agree on the time, worker 1
    leaves the loop first and worker 0 waits in a collective, and the cosine schedule, which
    follows the time spent, gives each worker its own learning rate. (The budget counts the
    first, compiling call: 8 s on worker 1's clock leaves steps after it even on a loaded
    machine, where 4 s once did not.)"""
    import tensorflow as tf

    from tf_charrnn.runs import Run

    (chief, worker), _ = run_workers(tiny_corpus, [tmp_path / "chief", tmp_path / "worker"],
                                     10 ** 6, 10 ** 6, tmp_path, "timed", max_seconds=8,
                                     clock_rates=(1, 2))
    assert_workers_in_lockstep(chief, worker)
    assert len(chief["steps"]) > 1
    newest = Run(tmp_path / "chief" / "run").checkpoints.complete()[0]
    assert newest.step == chief["steps"][-1]
    seconds = tf.train.load_checkpoint(str(newest.prefix)).get_tensor(
        "seconds_trained/.ATTRIBUTES/VARIABLE_VALUE")
    assert 8 <= seconds < 30


def test_a_stop_signal_to_one_worker_stops_every_worker(tiny_corpus, tmp_path):
    from tf_charrnn.runs import Run

    (chief, worker), (chief_log, _) = run_workers(
        tiny_corpus, [tmp_path / "chief", tmp_path / "worker"], 1000, 1000, tmp_path, "stopped",
        stops_after=(0, 6))
    assert_workers_in_lockstep(chief, worker)
    assert 1 <= len(chief["steps"]) < 1000
    run = Run(tmp_path / "chief" / "run")
    assert [info.step for info in run.checkpoints.complete()] == [chief["steps"][-1]]
    assert (f"stopped by a signal to another worker at step {chief['steps'][-1]}; checkpoint "
            f"saved") in chief_log


def test_multi_worker_without_tf_config_names_the_variable(monkeypatch):
    from tf_charrnn.errors import UsageError
    from tf_charrnn.train import make_strategy

    monkeypatch.delenv("TF_CONFIG", raising=False)
    with pytest.raises(UsageError, match="strategy multi_worker needs the TF_CONFIG environment"):
        make_strategy("multi_worker")


def test_auto_strategy_is_one_device_without_several_gpus():
    import tensorflow as tf

    from tf_charrnn.train import is_chief, make_strategy

    if len(tf.config.list_logical_devices("GPU")) > 1:
        pytest.skip("several GPUs are visible: auto picks mirrored here")
    strategy = make_strategy("auto")
    assert strategy.num_replicas_in_sync == 1 and is_chief(strategy)


def run_gpu_check(*args):
    result = subprocess.run([sys.executable, str(REPO / "scripts/gpu_check.py"), *args],
                            cwd=REPO, env=child_env(), capture_output=True, text=True,
                            timeout=CHILD_TIMEOUT)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def test_gpu_check_exits_cleanly_without_a_gpu():
    assert "no GPU visible to TensorFlow; nothing to measure" in run_gpu_check()


def test_gpu_check_measures_and_tabulates_on_the_cpu_when_asked():
    tiny = ["model.kernel=keras", "model.hidden_size=8", "model.embedding_size=8",
            "data.batch_size=4", "data.seq_length=8"]
    out = run_gpu_check("--cpu", "--seconds", "1", *[f"--set={text}" for text in tiny])
    header, row = out.strip().splitlines()[-2:]
    assert header.split()[:5] == ["strategy", "replicas", "rows/replica", "kernel", "cuDNN"]
    strategy, replicas, rows, kernel, cudnn, steps, chars_per_sec, loss = row.split()
    assert (strategy, replicas, rows, kernel, cudnn) == ("one_device", "1", "4", "keras", "none")
    assert int(steps) > 1 and float(chars_per_sec.replace(",", "")) > 0


if __name__ == "__main__":
    children = {"mirrored": child_mirrored, "worker": child_worker}
    children[sys.argv[1]](*sys.argv[2:])


# --- TF_CONFIG, start-up and a lost worker -------------------------------------------------------

@pytest.mark.parametrize("text, message", [
    ('{"cluster": ', "TF_CONFIG is not JSON"),
    ("{}", 'TF_CONFIG has no "cluster" with a "worker" list'),
    ("[1, 2]", 'TF_CONFIG has no "cluster" with a "worker" list'),
    ('{"cluster": {"worker": ["a:1", "b:2"]}}', "TF_CONFIG's task null is not one of its"),
    ('{"cluster": {"worker": ["a:1", "b:2"]}, "task": {"type": "worker", "index": 5}}',
     r'with i from 0 to 1'),
    ('{"cluster": {"worker": ["a:1"], "ps": ["c:3"]}, "task": {"type": "worker", "index": 0}}',
     "cluster has ps tasks, which multi_worker does not use"),
    ('{"cluster": {"worker": ["nohost"]}, "task": {"type": "worker", "index": 0}}',
     "must be a list of \"host:port\" addresses"),
    ('{"cluster": {"worker": ["a:1"]}, "task": {"type": "evaluator", "index": 0}}',
     '"evaluator".* is not one of its cluster'),
    ('{"cluster": {"worker": ["a:1", "a:1"]}, "task": {"type": "worker", "index": 0}}',
     "cluster lists a:1 more than once"),
])
def test_a_bad_tf_config_is_one_usage_error(text, message):
    from tf_charrnn.cluster import read_tf_config
    from tf_charrnn.errors import UsageError

    with pytest.raises(UsageError, match=message):
        read_tf_config(text)


def test_a_good_tf_config_names_the_task():
    from tf_charrnn.cluster import read_tf_config

    text = ('{"cluster": {"chief": ["h:1"], "worker": ["h:2", "[::1]:3"]}, '
            '"task": {"type": "worker", "index": 1}}')
    assert read_tf_config(text) == ({"chief": ["h:1"], "worker": ["h:2", "[::1]:3"]}, "worker", 1)


def test_workers_that_differ_in_a_setting_are_told_which(tiny_corpus):
    """Each worker sees every worker's fingerprints; the first setting that differs is named."""
    from tf_charrnn.cluster import _fingerprint, check_workers_share_settings, shared_settings
    from tf_charrnn.data import Vocab
    from tf_charrnn.errors import CharRNNError

    config = tiny_config(tiny_corpus, "runs", "multi_worker", 5)
    mine = shared_settings(config, "abc", Vocab("ab"))
    other = shared_settings(apply_overrides(config, [("train", "learning_rate", 0.5)]), "abc",
                            Vocab("ab"))
    assert "data.corpus" not in mine and "train.runs_dir" not in mine  # per host
    both = np.array([[_fingerprint(v) for v in mine.values()],
                     [_fingerprint(v) for v in other.values()]], np.float64)
    check_workers_share_settings(lambda values: both[:1], mine)  # alone: nothing to differ
    with pytest.raises(CharRNNError, match=r"workers differ in train.learning_rate \(this "
                                           r"worker: 0.05\): start every worker with the same"):
        check_workers_share_settings(lambda values: both, mine)
    corpus = shared_settings(config, "other sha", Vocab("ab"))
    both[1] = [_fingerprint(v) for v in corpus.values()]
    with pytest.raises(CharRNNError, match=r"differ in the corpus \(its sha256\)"):
        check_workers_share_settings(lambda values: both, mine)


def start_cli_workers(corpus, runs_dir, tmp_path, name, extra=((), ()), count=2):
    """`python -m tf_charrnn.train` as each worker of a cluster on 127.0.0.1: (processes, logs)."""
    ports = free_ports(count)
    cluster = {"worker": [f"127.0.0.1:{port}" for port in ports]}
    commands, logs, envs = [], [], []
    for index in range(count):
        logs.append(tmp_path / f"{name}{index}.log")
        commands.append([sys.executable, "-m", "tf_charrnn.train", "--corpus", str(corpus),
                         "--runs-dir", str(runs_dir), "--run", "run", "--strategy",
                         "multi_worker", "--batch-size", "4", "--seq-length", "8",
                         "--hidden-size", "8", "--embedding-size", "8", "--val-fraction", "0",
                         *extra[index]])
        envs.append(child_env(TF_CONFIG=json.dumps({"cluster": cluster,
                                                   "task": {"type": "worker", "index": index}})))
    return start_children(commands, logs, envs), logs


def error_lines(log):
    return [line for line in Path(log).read_text(errors="replace").splitlines()
            if line.startswith(("error:", "Traceback"))]


def test_workers_started_with_different_settings_refuse_before_writing(tiny_corpus, tmp_path):
    processes, logs = start_cli_workers(
        tiny_corpus, tmp_path / "runs", tmp_path, "differ",
        extra=(["--max-steps", "5", "--learning-rate", "0.01"],
               ["--max-steps", "5", "--learning-rate", "0.05"]))
    assert wait_all(processes, logs) == [1, 1], tails(logs)
    for log, rate in zip(logs, ("0.01", "0.05")):
        assert error_lines(log) == [f"error: the cluster's workers differ in train.learning_rate "
                                    f"(this worker: {rate}): start every worker with the same "
                                    f"flags, config and corpus"], tails(logs)
    assert not (tmp_path / "runs").exists()


def test_ctrl_c_stops_a_worker_waiting_for_the_others(tiny_corpus, tmp_path):
    """Worker 0 alone waits inside TensorFlow's start-up, where Python's own Ctrl-C handler
    cannot run; the default action still stops it (before anything is written)."""
    processes, logs = start_cli_workers(tiny_corpus, tmp_path / "runs", tmp_path, "alone",
                                        count=2)
    processes[1].kill()  # the other worker never comes
    processes[1].wait()
    deadline = time.monotonic() + 60
    while "waiting for the cluster's 2 workers" not in logs[0].read_text(errors="replace"):
        assert time.monotonic() < deadline and processes[0].poll() is None, tails(logs)
        time.sleep(0.2)
    time.sleep(1.0)  # into the constructor's wait
    processes[0].send_signal(signal.SIGINT)
    assert wait_all(processes[:1], logs[:1], timeout=30) == [-signal.SIGINT], tails(logs)
    assert not (tmp_path / "runs").exists()


def test_a_worker_that_dies_leaves_the_other_one_line(tiny_corpus, tmp_path):
    from tf_charrnn.runs import Run

    several = ["--max-steps", "100000", "--checkpoint-every", "20", "--log-every", "10",
               "--steps-per-call", "10"]
    processes, logs = start_cli_workers(tiny_corpus, tmp_path / "runs", tmp_path, "lost",
                                        extra=(several, several))
    run = Run(tmp_path / "runs" / "run")
    deadline = time.monotonic() + CHILD_TIMEOUT
    while not (run.exists() and run.checkpoints.complete()):
        assert time.monotonic() < deadline and all(p.poll() is None for p in processes), \
            tails(logs)
        time.sleep(0.2)
    processes[1].kill()
    codes = wait_all(processes, logs)
    assert codes[0] == 1, tails(logs)
    [line] = error_lines(logs[0])
    assert line.startswith("error: lost contact with another worker of the cluster (")
    assert "the run's newest checkpoint is step " in line and "start every worker again" in line
    assert run.checkpoints.complete()


def test_a_worker_stopped_by_its_own_error_at_start_up_stops_the_others(tiny_corpus, tmp_path):
    processes, logs = start_cli_workers(
        tiny_corpus, tmp_path / "runs", tmp_path, "startup",
        extra=(["--max-steps", "5"], ["--max-steps", "5", "--corpus", str(tmp_path / "none")]))
    assert wait_all(processes, logs) == [1, 1], tails(logs)
    assert error_lines(logs[1])[0].startswith("error: corpus file"), tails(logs)
    [line] = error_lines(logs[0])
    assert line.startswith("error: another worker of the cluster stopped while the workers were "
                           "starting (") and line.endswith("start every worker again"), tails(logs)
