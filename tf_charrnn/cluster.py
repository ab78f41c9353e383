"""Distribution: the tf.distribute strategy a run trains under, and a cluster's workers agreeing.

For `multi_worker` the cluster comes from the TF_CONFIG environment variable, which is checked
here first (TensorFlow's own checks end in tracebacks, or in a single-process run when the
variable holds no cluster). The strategy's constructor waits until every worker has started;
Ctrl-C stops a worker while it waits. Before anything is written the workers compare their
settings and corpus field by field, then the step they restored; the loop shares its clock
through the same gather (train._Loop).
"""

import contextlib
import dataclasses
import hashlib
import json
import os
import signal
import sys

from tf_charrnn.errors import CharRNNError, UsageError

SCALE_OUT = "see the README's 'Scale out' section"

# Settings a worker may hold on its own: where its files are (hosts mount them at their own
# paths; the corpus's sha256 is compared instead) and the chief's own sampling options.
PER_WORKER_FIELDS = {("data", "corpus"), ("data", "data_dir"), ("data", "source"),
                     ("data", "url"), ("train", "runs_dir")}
PER_WORKER_SECTIONS = {"sample"}


def read_tf_config(text):
    """TF_CONFIG's (cluster {job: [address]}, task type, task index), or a UsageError naming
    what is wrong with it. multi_worker trains on `worker` tasks and at most one `chief`."""
    try:
        spec = json.loads(text)
    except ValueError as error:
        raise UsageError(f"TF_CONFIG is not JSON ({error}): {SCALE_OUT}") from None
    cluster = spec.get("cluster") if isinstance(spec, dict) else None
    if not isinstance(cluster, dict) or not cluster.get("worker"):
        raise UsageError(f"TF_CONFIG has no \"cluster\" with a \"worker\" list: {SCALE_OUT}")
    other_jobs = sorted(set(cluster) - {"chief", "worker"})
    if other_jobs:
        raise UsageError(f"TF_CONFIG's cluster has {', '.join(other_jobs)} tasks, which "
                         f"multi_worker does not use: list only \"worker\" (and one \"chief\")")
    for job, addresses in cluster.items():
        if not isinstance(addresses, list) or not all(map(_is_address, addresses)):
            raise UsageError(f"TF_CONFIG's cluster {job!r} must be a list of \"host:port\" "
                             f"addresses, got {addresses!r}")
    addresses = [address for job in cluster.values() for address in job]
    repeated = sorted({address for address in addresses if addresses.count(address) > 1})
    if repeated:
        raise UsageError(f"TF_CONFIG's cluster lists {', '.join(repeated)} more than once: give "
                         f"each task its own host:port")
    if len(cluster.get("chief", [None])) != 1:
        raise UsageError("TF_CONFIG's cluster may have one \"chief\", not "
                         f"{len(cluster['chief'])}")
    task = spec.get("task")
    task_type = task.get("type") if isinstance(task, dict) else None
    index = task.get("index", 0) if isinstance(task, dict) else None
    if (task_type not in cluster or isinstance(index, bool) or not isinstance(index, int)
            or not 0 <= index < len(cluster[task_type])):
        raise UsageError(f"TF_CONFIG's task {json.dumps(task)} is not one of its cluster's: give "
                         f"\"task\": {{\"type\": \"worker\", \"index\": i}} with i from 0 to "
                         f"{len(cluster['worker']) - 1}, a different i on each host")
    return cluster, task_type, index


def _is_address(address):
    host, _, port = address.rpartition(":") if isinstance(address, str) else ("", "", "")
    return bool(host) and port.isdigit() and 0 < int(port) < 65536


def make_strategy(name, log=print):
    """A tf.distribute strategy for `train.strategy`."""
    import tensorflow as tf

    if name == "multi_worker":
        if not os.environ.get("TF_CONFIG"):
            raise UsageError("strategy multi_worker needs the TF_CONFIG environment variable "
                             f"describing the cluster ({SCALE_OUT}); to train on this machine "
                             f"alone, give --strategy one_device")
        return start_multi_worker(*read_tf_config(os.environ["TF_CONFIG"]), log)
    from tf_charrnn.tfenv import visible_gpus

    gpus = visible_gpus()
    if name == "auto":
        return tf.distribute.MirroredStrategy() if len(gpus) > 1 else tf.distribute.get_strategy()
    if name == "one_device":
        return tf.distribute.OneDeviceStrategy("/gpu:0" if gpus else "/cpu:0")
    if name == "mirrored":
        devices = [d.name for d in gpus] or [d.name for d in tf.config.list_logical_devices("CPU")]
        return tf.distribute.MirroredStrategy(devices=devices)
    raise UsageError(f"unknown train.strategy {name!r}: choose auto, one_device, mirrored or "
                     f"multi_worker")


def start_multi_worker(cluster, task_type, index, log):
    """MultiWorkerMirroredStrategy, once every worker of the cluster has started.

    Its constructor waits for all the workers inside TensorFlow, holding Python's interpreter
    lock, so Python's Ctrl-C handler cannot run until it returns: for the wait, SIGINT gets the
    system's default action (the worker stops at once; nothing has been written yet). SIGTERM
    is TensorFlow's own from the moment its cluster server starts.
    """
    import tensorflow as tf

    address = cluster[task_type][index]
    workers = sum(len(addresses) for addresses in cluster.values())
    log(f"{task_type} {index} ({address}): waiting for the cluster's {workers} workers in "
        f"TF_CONFIG to start (Ctrl-C stops it)")
    with contextlib.suppress(OSError, ValueError):  # the line shows now, even in a log file
        sys.stdout.flush()  # (ValueError: a closed stdout)
    try:
        with _default_sigint():
            return tf.distribute.MultiWorkerMirroredStrategy()
    except tf.errors.OpError as error:
        if "server" not in error.message.lower():
            raise
        raise CharRNNError(f"cannot start this worker's server at {address} "
                           f"({error.message.splitlines()[0].strip()}): free the port, or give "
                           f"this task another address in TF_CONFIG") from None


@contextlib.contextmanager
def _default_sigint():
    """SIGINT with the system's default action in this block (outside the main thread,
    signals are left alone)."""
    try:
        previous = signal.signal(signal.SIGINT, signal.SIG_DFL)
    except ValueError:
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def is_multi_worker(strategy):
    import tensorflow as tf

    return isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy)


def is_chief(strategy):
    """Only the chief writes checkpoints, events and samples."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not resolver.cluster_spec().as_dict():
        return True
    task_type, task_id = resolver.task_type, resolver.task_id
    return task_type == "chief" or (task_type == "worker" and task_id == 0 and
                                    "chief" not in resolver.cluster_spec().as_dict())


def make_worker_gather(strategy):
    """A function: this worker's float values [n] -> every worker's, [workers, n] (a collective
    call, so every worker must make it at the same point)."""
    import tensorflow as tf

    @tf.function
    def gather(local):
        return strategy.gather(strategy.run(tf.identity, (local[tf.newaxis],)), axis=0)

    return lambda values: gather(tf.constant(values, tf.float64)).numpy()


def shared_settings(config, corpus_sha256, vocab):
    """{name: value} of everything the workers must agree on: every config field but the
    per-worker ones, the corpus's sha256 and the vocabulary."""
    settings = {}
    for section in dataclasses.fields(config):
        if section.name in PER_WORKER_SECTIONS:
            continue
        for field in dataclasses.fields(getattr(config, section.name)):
            if (section.name, field.name) not in PER_WORKER_FIELDS:
                settings[f"{section.name}.{field.name}"] = getattr(getattr(config, section.name),
                                                                   field.name)
    settings["the corpus (its sha256)"] = corpus_sha256
    settings["the vocabulary"] = vocab.chars
    return settings


def _fingerprint(value):
    """48 bits of the value's hash: exact in the float64 the gather carries."""
    return int.from_bytes(hashlib.sha256(repr(value).encode()).digest()[:6], "big")


def check_workers_share_settings(gather, settings):
    """Fail on every worker, naming the first setting that differs, unless all agree (a
    collective call)."""
    names = list(settings)
    every = gather([_fingerprint(settings[name]) for name in names])
    for column, name in enumerate(names):
        if len(set(every[:, column].tolist())) > 1:
            raise CharRNNError(f"the cluster's workers differ in {name} (this worker: "
                               f"{_shown(settings[name])}): start every worker with the same "
                               f"flags, config and corpus")


def _shown(value):
    text = repr(value)
    return text if len(text) <= 60 else f"{text[:57]}..."


def check_workers_agree(gather, step, run_path):
    """Fail on every worker unless all of them start from the same step (a collective call)."""
    steps = [int(value) for value in gather([step])[:, 0]]
    if len(set(steps)) > 1:
        raise CharRNNError(f"the workers start from different steps ({', '.join(map(str, steps))}):"
                           f" every worker must read the chief's run {run_path}, so give them one "
                           f"shared runs_dir")


@contextlib.contextmanager
def lost_workers_reported(chief, newest_step=lambda: None, starting=False):
    """A collective that fails because another worker went away (killed, or stopped by its own
    error at start-up) becomes one line; newest_step() is the chief's newest checkpoint step
    (None: none yet)."""
    import tensorflow as tf

    try:
        yield
    except (tf.errors.UnavailableError, tf.errors.DeadlineExceededError,
            tf.errors.CancelledError, tf.errors.AbortedError) as error:
        failure = f"{type(error).__name__} in a collective"
        if starting:
            raise CharRNNError(f"another worker of the cluster stopped while the workers were "
                               f"starting ({failure}): see its error, then start every worker "
                               f"again") from None
        step = newest_step() if chief else None
        if not chief:
            saved = "the chief's run keeps its newest checkpoint"
        elif step is None:
            saved = "no checkpoint had been saved yet"
        else:
            saved = f"the run's newest checkpoint is step {step}"
        raise CharRNNError(f"lost contact with another worker of the cluster ({failure}); "
                           f"{saved}: start every worker again to resume") from None
