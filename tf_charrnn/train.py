"""Training: `python -m tf_charrnn.train --corpus linux_kernel`.

Shapes: K train steps per compiled call, B batch rows, T seq_length, V vocabulary, H hidden size.

train(config) reads top to bottom: the strategy (cluster.py) -> the run directory named and
checked (a --resume of no run, a directory of other files) -> corpus -> TextLoader -> a cluster's
workers agree on their settings -> will it fit in memory -> run directory created and locked ->
model and optimiser under the strategy's scope -> restore the newest good checkpoint -> loop.
From the command line a resumed run's config.yaml is the base the flags change
(config_from_args). The loop feeds K batches at a time to one compiled call that runs K steps; the
hidden state is carried from batch to batch within an epoch (truncated BPTT over the loader's
continuing rows) and reset at each epoch. The learning rate is a function of the step, and for the
cosine and wsd schedules under a time budget (max_seconds) of the share of that budget spent.
Checkpoints hold everything a resumed run needs to continue exactly: model, optimiser slots, step,
epoch, batch pointer, carried state, the seconds trained and the smoothed loss; dropout masks are
drawn from the seed and the step, so a resumed run draws the same ones. TensorFlow is imported
inside functions, so `--help` and argument errors answer without loading it.
"""

import contextlib
import dataclasses
import datetime
import math
import os
import signal
import sys
import time
import typing
from pathlib import Path

import numpy as np

from tf_charrnn import cli
from tf_charrnn.cluster import (check_workers_agree, check_workers_share_settings, is_chief,
                                is_multi_worker, lost_workers_reported, make_strategy,
                                make_worker_gather, shared_settings)
from tf_charrnn.config import (CONFIGS_DIR, PATH_FIELDS, Config, TrainConfig, apply_overrides,
                               load_config, parse_override, recipe_path)
from tf_charrnn.errors import CharRNNError, UsageError

LN2 = math.log(2.0)


# --- learning rate -------------------------------------------------------------------------------

def learning_rate_at(step, train_config: TrainConfig, steps_per_epoch, total_steps,
                     seconds_trained=0.0):
    """The learning rate at a step (a float or a scalar tensor).

    exponential: learning_rate * decay_rate ** epoch, epoch = step // steps_per_epoch (the lecture).
    cosine and wsd (warmup, stable, decay) run on the run's progress p from 0 to 1: the larger of
    the steps done after the warmup over those left to total_steps and, under a time budget,
    seconds_trained over max_seconds, so a run that max_seconds stops ends its schedule as its
    time runs out. cosine: from learning_rate to min_learning_rate along a half cosine in p.
    wsd: learning_rate until p = 1 - cooldown_fraction, then linearly down to min_learning_rate
    at p = 1. constant: learning_rate. All of them after a linear warmup over warmup_steps.
    """
    import tensorflow as tf

    step = tf.cast(step, tf.float32)
    base, floor = train_config.learning_rate, train_config.min_learning_rate
    if train_config.schedule == "exponential":
        epoch = tf.floor(step / float(max(steps_per_epoch, 1)))
        rate = base * tf.pow(train_config.decay_rate, epoch)
    elif train_config.schedule in ("cosine", "wsd"):
        # Step indices run from 0 to total_steps - 1: the last one trains at the floor.
        span = float(max(total_steps - 1 - train_config.warmup_steps, 1))
        progress = tf.clip_by_value((step - train_config.warmup_steps) / span, 0.0, 1.0)
        if train_config.max_seconds:
            spent = tf.cast(seconds_trained, tf.float32) / float(train_config.max_seconds)
            progress = tf.maximum(progress, tf.minimum(spent, 1.0))
        if train_config.schedule == "cosine":
            share = 0.5 * (1.0 + tf.cos(math.pi * progress))
        else:
            share = tf.minimum(1.0, (1.0 - progress) / train_config.cooldown_fraction)
        rate = floor + (base - floor) * share
    else:
        rate = tf.constant(base, tf.float32)
    if train_config.warmup_steps > 0:
        rate = rate * tf.minimum(1.0, (step + 1.0) / float(train_config.warmup_steps))
    return rate


def make_schedule(train_config, steps_per_epoch, total_steps, seconds_trained=None):
    """learning_rate_at as a Keras schedule; seconds_trained: the variable the loop keeps (the
    run's training time, against train_config.max_seconds), or None."""
    import keras

    class StepSchedule(keras.optimizers.schedules.LearningRateSchedule):
        def __call__(self, step):
            seconds = 0.0 if seconds_trained is None else seconds_trained.read_value()
            return learning_rate_at(step, train_config, steps_per_epoch, total_steps, seconds)

        def get_config(self):
            return {}

    return StepSchedule()


def make_optimizer(train_config, schedule, precision="float32"):
    import keras

    kinds = {
        "adam": lambda: keras.optimizers.Adam(learning_rate=schedule),
        "rmsprop": lambda: keras.optimizers.RMSprop(learning_rate=schedule),
        # min-char-rnn's Adagrad: memory starts at zero, 1e-8 under the square root.
        "adagrad": lambda: keras.optimizers.Adagrad(learning_rate=schedule,
                                                    initial_accumulator_value=0.0, epsilon=1e-8),
        "sgd": lambda: keras.optimizers.SGD(learning_rate=schedule),
    }
    optimizer = kinds[train_config.optimizer]()
    if precision == "mixed_float16":
        optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
    return optimizer


OPTIMIZER_SLOTS = {"adam": 2, "rmsprop": 1, "adagrad": 1, "sgd": 0}  # float32 per weight


def training_memory_bytes(config: Config, vocab_size):
    """About what a train step holds: the weights with their gradients, optimiser slots and one
    more copy (the weight-gradient GEMMs' results), and a batch's activations for backprop."""
    from tf_charrnn.models import GATES, parameter_count

    model, data = config.model, config.data
    weights = parameter_count(model, vocab_size) * (3 + OPTIMIZER_SLOTS[config.train.optimizer])
    per_char = (model.num_layers * (GATES[model.cell] + 2) * model.hidden_size
                + model.embedding_size + 3 * vocab_size)
    return 4 * (weights + data.batch_size * data.seq_length * per_char)


# --- the compiled step ---------------------------------------------------------------------------

class TrainProgress:
    """Counters and carried state that live in the checkpoint beside model and optimiser."""

    def __init__(self, model, batch_size):
        import tensorflow as tf

        self.epoch = tf.Variable(0, dtype=tf.int64, trainable=False, name="epoch")
        self.batch_index = tf.Variable(0, dtype=tf.int64, trainable=False, name="batch_index")
        self.smooth_loss = tf.Variable(-1.0, dtype=tf.float64, trainable=False, name="smooth_loss")
        self.best_val_loss = tf.Variable(np.inf, dtype=tf.float64, trainable=False,
                                         name="best_val_loss")
        # The run's training time over all its calls of train: what max_seconds limits, and the
        # clock of the cosine and wsd schedules under it.
        self.seconds_trained = tf.Variable(0.0, dtype=tf.float64, trainable=False,
                                           name="seconds_trained")
        self.states = [tf.Variable(state, trainable=False, name=f"state_{index}")
                       for index, state in enumerate(model.zero_states(batch_size))]

    def trackables(self):
        return {"epoch": self.epoch, "batch_index": self.batch_index,
                "smooth_loss": self.smooth_loss, "best_val_loss": self.best_val_loss,
                "seconds_trained": self.seconds_trained,
                **{f"state_{index}": state for index, state in enumerate(self.states)}}

    def trackables_in(self, prefix):
        """trackables() less seconds_trained where checkpoint prefix predates it (it stays 0)."""
        import tensorflow as tf

        trackables = self.trackables()
        try:
            names = [name for name, _ in tf.train.list_variables(prefix)]
        except (tf.errors.OpError, ValueError):
            return trackables  # unreadable: restore_checkpoint says so
        if not any(name.startswith("seconds_trained/") for name in names):
            del trackables["seconds_trained"]
        return trackables

    def reset_states(self):
        for state in self.states:
            state.assign(np.zeros(state.shape, state.dtype.as_numpy_dtype))


def sequence_loss(logits, targets, reduction_size):
    """Sum of cross-entropy over the batch, divided by reduction_size (nats per character)."""
    import tensorflow as tf

    losses = tf.nn.sparse_softmax_cross_entropy_with_logits(
        labels=tf.cast(targets, tf.int32), logits=tf.cast(logits, tf.float32))  # [B, T]
    return tf.reduce_sum(losses) / reduction_size


def check_replicas(config: Config, replicas):
    """Refuse settings that cannot be split over the strategy's replicas."""
    batch_size = config.data.batch_size
    if batch_size % replicas:
        raise UsageError(f"data.batch_size {batch_size} must be a multiple of the "
                         f"{replicas} replicas: each replica owns batch_size / replicas rows")
    if config.train.jit_compile and replicas > 1:
        # XLA compiles the whole call for one device; it cannot reach the other replicas' copies.
        raise UsageError(f"train.jit_compile works on one device only, not on {replicas} "
                         f"replicas: drop it or use --strategy one_device")


def make_train_call(model, optimizer, progress, strategy, config: Config):
    """A compiled function running K train steps: (xs [K, B, T], ys [K, B, T]) -> stats.

    Each replica owns a contiguous block of the B rows, so a row's state always continues on the
    replica that owns it. The loss is the cross-entropy averaged over the global batch, so summing
    the replicas' gradients gives the single-device gradient; clipping applies to that sum.
    Returns (losses [K], grad_norms [K]) as the mean loss per character before each update.
    """
    import keras
    import tensorflow as tf

    train = config.train
    batch_size, seq_length = config.data.batch_size, config.data.seq_length
    replicas = strategy.num_replicas_in_sync
    check_replicas(config, replicas)
    rows = batch_size // replicas
    # mean: per-character mean (the lecture); sum_over_time: min-char-rnn's chunk sum per row.
    loss_denominator = float(batch_size * seq_length if train.loss_reduction == "mean"
                             else batch_size)
    scaled = isinstance(optimizer, keras.optimizers.LossScaleOptimizer)  # mixed_float16
    variables = model.trainable_variables

    def replica_step(x, y, states, dropout_seed):
        replica = tf.distribute.get_replica_context().replica_id_in_sync_group
        start = replica * rows
        x_rows, y_rows = x[start:start + rows], y[start:start + rows]  # [B/R, T]
        state_rows = [state[start:start + rows] for state in states]
        with tf.GradientTape() as tape:
            logits, new_states = model(x_rows, tuple(state_rows), training=True,
                                       dropout_seed=dropout_seed,
                                       rows=tf.stack([start, batch_size]))  # [B/R, T, V]
            loss = sequence_loss(logits, y_rows, loss_denominator)
            tape_loss = optimizer.scale_loss(loss) if scaled else loss
        grads = tape.gradient(tape_loss, variables)
        grads = [tf.convert_to_tensor(g) for g in grads]  # embedding IndexedSlices -> dense
        return loss, grads, list(new_states)

    def one_step(x, y, states):
        # The step's dropout seed: the same masks on a resumed run and on any number of replicas.
        dropout_seed = tf.random.experimental.stateless_fold_in(
            tf.constant([train.seed, 0], tf.int64), optimizer.iterations)
        loss, grads, new_states = strategy.run(replica_step,
                                               args=(x, y, states, dropout_seed))
        loss = strategy.reduce(tf.distribute.ReduceOp.SUM, loss, axis=None)
        grads = [strategy.reduce(tf.distribute.ReduceOp.SUM, g, axis=None) for g in grads]
        if replicas > 1:
            # gather loses the static shape the loop over K steps needs: [B, H] again.
            new_states = [tf.ensure_shape(strategy.gather(state, axis=0), variable.shape)
                          for state, variable in zip(new_states, progress.states)]
        else:
            new_states = [strategy.experimental_local_results(s)[0] for s in new_states]
        if scaled:
            norm = tf.linalg.global_norm(grads) / optimizer.dynamic_scale
        else:
            norm = tf.linalg.global_norm(grads)
            if train.clip == "global_norm":
                grads, _ = tf.clip_by_global_norm(grads, train.clip_threshold, use_norm=norm)
            elif train.clip == "value":
                grads = [tf.clip_by_value(g, -train.clip_threshold, train.clip_threshold)
                         for g in grads]
        optimizer.apply_gradients(zip(grads, variables))
        if train.loss_reduction != "mean":
            loss = loss / seq_length  # report nats per character either way
        return loss, norm, new_states

    @tf.function(jit_compile=train.jit_compile or None, reduce_retracing=True)
    def train_call(xs, ys):
        steps = tf.shape(xs)[0]
        losses = tf.TensorArray(tf.float32, size=steps)
        norms = tf.TensorArray(tf.float32, size=steps)
        states = [tf.identity(state) for state in progress.states]
        for k in tf.range(steps):
            loss, norm, states = one_step(xs[k], ys[k], states)
            losses = losses.write(k, tf.cast(loss, tf.float32))
            norms = norms.write(k, tf.cast(norm, tf.float32))
        for variable, state in zip(progress.states, states):
            variable.assign(state)
        return losses.stack(), norms.stack()

    return train_call


def make_eval_call(model, config: Config):
    """A compiled function: (xs [K, B, T], ys [K, B, T]) -> summed cross-entropy over all chars.

    The state is carried through the K batches from zero, without dropout.
    """
    import tensorflow as tf

    @tf.function(reduce_retracing=True)
    def eval_call(xs, ys):
        states = model.zero_states(tf.shape(xs)[1])
        total = tf.constant(0.0, tf.float64)
        for k in tf.range(tf.shape(xs)[0]):
            logits, states = model(xs[k], states, training=False)
            losses = tf.nn.sparse_softmax_cross_entropy_with_logits(
                labels=tf.cast(ys[k], tf.int32), logits=tf.cast(logits, tf.float32))
            total += tf.reduce_sum(tf.cast(losses, tf.float64))
        return total

    return eval_call


def evaluate(eval_call, rows):
    """Validation loss (nats per character) over every batch of a BatchRows split."""
    xs, ys = rows.stacked(dtype=np.int32)
    total = float(eval_call(xs, ys))
    return total / xs.size


# --- progress and logging ------------------------------------------------------------------------

class ProgressLine:
    """One live status line on a terminal, an occasional plain line in a log file; messages
    (validation, samples) go to say() above it. Disabled, only the messages remain."""

    def __init__(self, say=print, enabled=True, stream=None, min_interval=None):
        self.say, self.enabled = say, enabled
        self.stream = stream or sys.stdout
        self.live = enabled and self.stream.isatty()
        self.min_interval = min_interval if min_interval is not None else (
            0.25 if self.live else 10.0)
        self.last_time = 0.0

    def update(self, text):
        now = time.monotonic()
        if not self.enabled or now - self.last_time < self.min_interval:
            return
        self.last_time = now
        self.stream.write("\r\033[K" + text if self.live else text + "\n")
        self.stream.flush()

    def message(self, text):
        if self.live:
            self.stream.write("\r\033[K")
            self.stream.flush()
        self.say(text)
        self.last_time = 0.0

    def close(self):
        if self.live:
            self.stream.write("\n")
            self.stream.flush()


def format_eta(seconds):
    if not math.isfinite(seconds):
        return "?"
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def hparams_dict(config):
    flat = {}
    for section, values in dataclasses.asdict(config).items():
        for key, value in values.items():
            if value is None:
                value = "none"
            flat[f"{section}.{key}"] = value
    return flat


# --- the run -------------------------------------------------------------------------------------

@dataclasses.dataclass
class TrainResult:
    run_path: Path
    step: int
    epoch: int
    losses: list          # the training loss of every step run by this call of train()
    val_loss: float       # the last validation loss, nan if none was measured
    stopped: str          # "done", "interrupted" or "nan"
    chief: bool = True    # False on a cluster's other workers, which write nothing
    signal_name: typing.Optional[str] = None  # "SIGINT" or "SIGTERM" when one stopped this worker


class _StopFlag:
    """Set by SIGINT/SIGTERM; the loop checks it between compiled calls and saves."""

    def __init__(self):
        self.signal_name = None
        self._previous = {}

    def __bool__(self):
        return self.signal_name is not None

    def _handle(self, signum, frame):
        self.signal_name = signal.Signals(signum).name

    def install(self):
        for signum in (signal.SIGINT, signal.SIGTERM):
            try:
                self._previous[signum] = signal.signal(signum, self._handle)
            except ValueError:  # not the main thread: leave signals alone
                pass
        return self

    def restore(self):
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)


def finished_limit(step, total_steps, progress, train_config):
    """What a restored run has already spent ("its 600 steps"), or None when it can train on."""
    if step >= total_steps:
        return f"its {total_steps} steps"
    budget = train_config.max_seconds
    if budget and float(progress.seconds_trained.numpy()) >= budget:
        return f"its {budget:g} seconds (--max-seconds)"
    return None


def default_run_name(corpus):
    stem = Path(corpus).stem if ("/" in corpus or "." in corpus) else corpus
    return f"{stem}-{datetime.datetime.now():%Y%m%d-%H%M%S}"


def check_writable(path):
    """Fail before training when the run directory cannot be written or the disk is full."""
    from tf_charrnn.runs import WRITE_PROBE

    probe = Path(path) / WRITE_PROBE
    try:
        with open(probe, "wb") as handle:
            handle.write(b"\0" * 65536)
            handle.flush()
            os.fsync(handle.fileno())
    except OSError as error:
        raise CharRNNError(f"cannot write to run directory {path} ({error.strerror}): free disk "
                           f"space or choose another --runs-dir") from None
    finally:
        probe.unlink(missing_ok=True)


def train(config: Config, run_name=None, resume=False, log=print, stop_flag=None,
          show_progress=True):
    """Train per config into runs/<run_name>; return a TrainResult. Resumes an existing run.

    log receives every message; show_progress=False drops the live status line.
    """
    import keras
    import tensorflow as tf

    from tf_charrnn.corpora import KNOWN_CORPORA, resolve_corpus
    from tf_charrnn.data import TextLoader
    from tf_charrnn.memory import check_fits
    from tf_charrnn.models import build_model, parameter_count
    from tf_charrnn.runs import Run, RunLock, describe_mismatch, latest_run, restore_checkpoint
    from tf_charrnn.tfenv import visible_gpus

    data, train_config = config.data, config.train
    strategy = make_strategy(train_config.strategy, log=log)
    chief = is_chief(strategy)
    say = log if chief else (lambda *args, **kwargs: None)
    check_replicas(config, strategy.num_replicas_in_sync)
    # Every worker calls it at the same points: the settings check, the step check, the loop.
    worker_gather = make_worker_gather(strategy) if is_multi_worker(strategy) else None

    if resume and run_name is None:
        run_path = latest_run(train_config.runs_dir)
    else:
        run_path = Path(train_config.runs_dir) / (run_name or default_run_name(data.corpus))
    run = Run(run_path)
    if resume and not (run.exists() and run.has_checkpoint()):  # before the corpus is fetched
        raise CharRNNError(f"run {run_path} has no checkpoint to resume from: drop --resume to "
                           f"start it")
    if chief:
        run.check_not_foreign()

    input_path = resolve_corpus(data.corpus, Path(data.data_dir), source=data.source,
                                max_bytes=data.max_bytes, url=data.url, log=say)
    if data.corpus not in KNOWN_CORPORA:  # a path: config.yaml keeps it whole, so that the run
        # resumes from any working directory
        data = dataclasses.replace(data, corpus=str(Path(data.corpus).expanduser().resolve()))
        config = dataclasses.replace(config, data=data)
    loader = TextLoader.from_config(data, input_path, log=say)
    vocab = loader.vocab
    corpus = {"path": str(input_path.resolve()), "sha256": loader.sha256,
              "encoding": loader.encoding, "num_chars": int(len(loader.ids))}
    if worker_gather is not None:
        with lost_workers_reported(chief, starting=True):
            check_workers_share_settings(worker_gather,
                                         shared_settings(config, loader.sha256, vocab))

    if not visible_gpus():  # on a GPU the weights and activations are in its memory, not here
        check_fits(training_memory_bytes(config, len(vocab)),
                   f"the model ({parameter_count(config.model, len(vocab)):,} parameters) and a "
                   f"batch", "use a smaller --hidden-size, --num-layers or --batch-size")
    created = chief and not run_path.exists()
    try:
        if chief:  # other workers only read the run (a shared runs_dir), never write it
            run_path.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise CharRNNError(f"cannot create run directory {run_path} ({error.strerror}): choose "
                           f"another --runs-dir") from None
    lock = RunLock(run_path).acquire() if chief else None
    stop = stop_flag if stop_flag is not None else _StopFlag().install()
    try:
        if chief:
            check_writable(run_path)
        resuming = run.exists() and run.has_checkpoint()
        if resuming:
            saved_vocab, saved_corpus = run.read_vocab()
            mismatch = describe_mismatch(run.read_config(), config, saved_vocab, vocab,
                                         saved_corpus, corpus)
            if mismatch:
                raise CharRNNError(f"cannot resume {run_path}: {mismatch}; resume with the "
                                   f"run's own settings, or start a new --run")
        keras.utils.set_random_seed(train_config.seed)
        steps_per_epoch = loader.num_batches
        total_steps = train_config.max_steps or train_config.epochs * steps_per_epoch
        with strategy.scope():
            model = build_model(config.model, len(vocab))
            progress = TrainProgress(model, data.batch_size)
            schedule = make_schedule(train_config, steps_per_epoch, total_steps,
                                     progress.seconds_trained)
            optimizer = make_optimizer(train_config, schedule, config.model.precision)
            optimizer.build(model.trainable_variables)
        checkpoint = tf.train.Checkpoint(model=model, optimizer=optimizer,
                                         **progress.trackables())
        if resuming:
            info = run.newest_checkpoint(say)
            if info is None:
                raise CharRNNError(f"every checkpoint of {run_path} is damaged: start a new --run")
            reader = tf.train.Checkpoint(model=model, optimizer=optimizer,
                                         **progress.trackables_in(str(info.prefix)))
            restore_checkpoint(reader, info, vocab, what="training state")
            step = int(optimizer.iterations.numpy())  # int() fails on a distributed variable
            say(f"resumed {run_path} from {info.prefix} (step {step})")
            spent = finished_limit(step, total_steps, progress, train_config)
            if spent:  # nothing to train: the run's files stay as they are
                say(f"the run has trained {spent}: raise --epochs, --max-steps or --max-seconds "
                    f"to train it further")
                return TrainResult(run_path, step, int(progress.epoch.numpy()), [],
                                   info.metrics.get("val_loss", float("nan")), "done", chief)
        if worker_gather is not None:
            with lost_workers_reported(chief, starting=True):
                check_workers_agree(worker_gather, int(optimizer.iterations.numpy()), run_path)
        if chief:
            run.write_metadata(config, vocab, corpus)
        say(model.summary_line())
        say(f"corpus: {input_path} ({len(loader.ids):,} chars, vocab {len(vocab)}, "
            f"{steps_per_epoch} batches/epoch of {data.batch_size}x{data.seq_length}); "
            f"run: {run_path}")
        if loader.val is None:
            say("no validation split (data.val_fraction 0): no validation loss and no best/ "
                "checkpoint")
        loop = _Loop(config, run, loader, model, optimizer, progress, checkpoint, strategy,
                     worker_gather, chief, total_steps, say, stop, show_progress)
        if worker_gather is None:
            return loop.run()
        def newest_step():  # when a worker is lost: the chief's newest checkpoint by then
            newest = run.checkpoints.complete()
            return newest[0].step if newest else None

        with lost_workers_reported(chief, newest_step):
            return loop.run()
    finally:
        if created and not run.exists():
            # A new run that failed before its first file (a mistyped --resume --run, a directory
            # it cannot write, a model that fails to build) leaves no directory with only a lock.
            # The lock file goes while still held, so no other trainer can hold it meanwhile.
            with contextlib.suppress(OSError):
                lock.path.unlink()
        if stop_flag is None:
            stop.restore()
        if lock is not None:
            lock.release()
        if created and not run.exists():
            with contextlib.suppress(OSError):
                run_path.rmdir()  # only when empty


class _Loop:
    """The epoch/batch loop with its periodic evaluation, sampling, logging and checkpoints."""

    def __init__(self, config, run, loader, model, optimizer, progress, checkpoint, strategy,
                 worker_gather, chief, total_steps, say, stop, show_progress=True):
        import tensorflow as tf

        self.config, self.run_dir, self.loader, self.model = config, run, loader, model
        self.optimizer, self.progress, self.checkpoint = optimizer, progress, checkpoint
        self.chief, self.total_steps, self.say, self.stop = chief, total_steps, say, stop
        self.show_progress = show_progress
        # Workers must agree on when the time is up and on a stop signal, or one would wait
        # forever in a collective the others left; and on the time spent, which sets the rate.
        self.worker_gather = worker_gather
        self.train_call = make_train_call(model, optimizer, progress, strategy, config)
        self.eval_call = make_eval_call(model, config)
        self.writer = tf.summary.create_file_writer(str(run.path)) if chief else None
        self.generator, self.sample_prime = None, None  # made at the first sample
        self.val_loss, self.val_step = float("nan"), None

    @property
    def step(self):
        return int(self.optimizer.iterations.numpy())

    def _learning_rate(self):
        """The rate the last step trained with (the optimiser's count is past it by one)."""
        t = self.config.train
        return float(learning_rate_at(max(self.step - 1, 0), t, self.loader.num_batches,
                                      self.total_steps, self._seconds_trained()))

    def _seconds_trained(self):
        return float(self.progress.seconds_trained.numpy())

    def _clock(self, started_at):
        """(seconds trained in this call of train, whether a stop signal came), the same on every
        worker: the longest time and any signal."""
        elapsed, signalled = time.perf_counter() - started_at, bool(self.stop)
        if self.worker_gather is not None:
            every = self.worker_gather([elapsed, float(signalled)])
            elapsed, signalled = float(every[:, 0].max()), bool(every[:, 1].max() > 0)
        return elapsed, signalled

    def run(self):
        t, data = self.config.train, self.config.data
        chars_per_step = data.batch_size * data.seq_length
        losses, stopped = [], "done"
        line = ProgressLine(self.say, enabled=self.show_progress)
        if self.chief and self.step == 0:
            with self.writer.as_default():
                from tensorboard.plugins.hparams import api as hparams
                hparams.hparams(hparams_dict(self.config), trial_id=self.run_dir.path.name)
        window_losses, window_norms, window_time, window_timed_steps = [], [], 0.0, 0
        chars_per_sec = float("nan")
        traced = set()  # the call sizes K compiled so far: a size's first call traces it
        started_at = time.perf_counter()
        rate_since, rate_steps = None, 0  # the ETA's clock starts after the first (compiling) call
        max_seconds = t.max_seconds or float("inf")
        seconds_before = self._seconds_trained()  # by earlier calls of train (a resumed run)
        while True:
            elapsed, signalled = self._clock(started_at)
            self.progress.seconds_trained.assign(seconds_before + elapsed)
            if signalled:
                stopped = "interrupted"
                break
            if self.step >= self.total_steps or seconds_before + elapsed >= max_seconds:
                break
            epoch, batch = int(self.progress.epoch.numpy()), int(self.progress.batch_index.numpy())
            if batch >= self.loader.num_batches:  # epoch done: next epoch, fresh state
                self.progress.epoch.assign_add(1)
                self.progress.batch_index.assign(0)
                self.progress.reset_states()
                self._end_of_epoch(epoch, line)
                continue
            if self.step == 0 and batch == 0 and epoch == 0:
                self.progress.reset_states()
            count = self._steps_this_call(batch)
            call_start = time.perf_counter()
            xs, ys = self.loader.train.stacked(batch, count, np.int32)  # [K, B, T]
            step_losses, step_norms = self.train_call(xs, ys)
            step_losses, step_norms = step_losses.numpy(), step_norms.numpy()
            if count in traced:  # a compiling call is no measure of the rate
                window_time += time.perf_counter() - call_start
                window_timed_steps += count
            traced.add(count)
            if not np.all(np.isfinite(step_losses)):
                stopped = "nan"
                self._stop_on_nan(step_losses, line)
                break
            self.progress.batch_index.assign_add(count)
            losses.extend(float(v) for v in step_losses)
            window_losses.extend(step_losses)
            window_norms.extend(step_norms)
            self._smooth(step_losses)
            step = self.step
            if self._crossed(step, count, t.log_every) or step >= self.total_steps:
                if window_timed_steps:
                    chars_per_sec = window_timed_steps * chars_per_step / max(window_time, 1e-9)
                self._log_train(step, window_losses, window_norms, chars_per_sec)
                window_losses, window_norms, window_time, window_timed_steps = [], [], 0.0, 0
            if rate_since is None:
                rate_since, rate_steps, rate = time.perf_counter(), step, 0.0
            else:
                rate = (step - rate_steps) / max(time.perf_counter() - rate_since, 1e-9)
            seconds_left = max_seconds - seconds_before - (time.perf_counter() - started_at)
            line.update(self._status(step, losses[-1], chars_per_sec, rate, seconds_left))
            if self._crossed(step, count, t.eval_every):
                self._validate(line)
            if self._crossed(step, count, t.sample_every):
                self._sample(line)
            if self._crossed(step, count, t.checkpoint_every):
                self._save(line)
        if stopped != "nan":
            if stopped == "done":  # finished (steps or time): a last validation before the save
                self._validate(line)
            self._save(line)
        line.close()
        if stopped == "interrupted":
            self.say(f"stopped by {self.stop.signal_name or 'a signal to another worker'} at step "
                     f"{self.step}; checkpoint saved: resume with --run "
                     f"{self.run_dir.path.resolve()}")
        if self.writer is not None:
            self.writer.flush()
        return TrainResult(self.run_dir.path, self.step, int(self.progress.epoch.numpy()), losses,
                           self.val_loss, stopped, self.chief, self.stop.signal_name)

    def _steps_this_call(self, batch):
        """K: up to steps_per_call, never past the epoch's end, the last step, or the next
        logging, evaluation, sampling or checkpoint step (so they happen at exact multiples)."""
        t, step = self.config.train, self.step
        to_next = [every - step % every for every in
                   (t.log_every, t.eval_every, t.sample_every, t.checkpoint_every)]
        return max(1, min(t.steps_per_call, self.loader.num_batches - batch,
                          self.total_steps - step, *to_next))

    @staticmethod
    def _crossed(step, count, every):
        return step // every != (step - count) // every

    def _smooth(self, step_losses):
        """min-char-rnn's smoothed loss: the chunk's summed loss, smoothed over iterations."""
        smoothing = self.config.train.loss_smoothing
        if smoothing <= 0:
            return
        seq_length = self.config.data.seq_length
        smooth = float(self.progress.smooth_loss.numpy())
        if smooth < 0:
            smooth = math.log(len(self.loader.vocab)) * seq_length
        for loss in step_losses:
            smooth = smooth * smoothing + float(loss) * seq_length * (1 - smoothing)
        self.progress.smooth_loss.assign(smooth)

    def _status(self, step, loss, chars_per_sec, steps_per_sec, seconds_left):
        eta = (self.total_steps - step) / steps_per_sec if steps_per_sec > 0 else float("inf")
        eta = min(eta, seconds_left) if steps_per_sec > 0 else eta  # --max-seconds may end first
        speed = f"{chars_per_sec:,.0f}" if math.isfinite(chars_per_sec) else "-"
        text = (f"step {step}/{self.total_steps} epoch {int(self.progress.epoch.numpy()) + 1} "
                f"loss {loss:.3f} bpc {loss / LN2:.3f} lr {self._learning_rate():.2e} "
                f"{speed} chars/s ETA {format_eta(eta)}")
        if self.config.train.loss_smoothing > 0:
            text += f" smooth_loss {float(self.progress.smooth_loss.numpy()):.3f}"
        return text

    def _log_train(self, step, window_losses, window_norms, chars_per_sec):
        if not self.chief:
            return
        import tensorflow as tf

        loss = float(np.mean(window_losses))
        with self.writer.as_default(step=step):
            tf.summary.scalar("train/loss", loss)
            tf.summary.scalar("train/bpc", loss / LN2)
            tf.summary.scalar("learning_rate", self._learning_rate())
            tf.summary.scalar("grad_norm", float(np.mean(window_norms)))
            if math.isfinite(chars_per_sec):  # none before the first call after compiling
                tf.summary.scalar("chars_per_sec", chars_per_sec)
            if self.config.train.loss_smoothing > 0:
                tf.summary.scalar("train/smooth_loss", float(self.progress.smooth_loss.numpy()))

    def _validate(self, line):
        step = self.step
        if self.loader.val is None or self.val_step == step:
            return
        import tensorflow as tf

        self.val_loss, self.val_step = evaluate(self.eval_call, self.loader.val), step
        line.message(f"step {step}: val loss {self.val_loss:.4f} bpc {self.val_loss / LN2:.4f}")
        if self.chief:
            with self.writer.as_default(step=step):
                tf.summary.scalar("val/loss", self.val_loss)
                tf.summary.scalar("val/bpc", self.val_loss / LN2)
            if self.val_loss < float(self.progress.best_val_loss.numpy()):
                self.progress.best_val_loss.assign(self.val_loss)
                self.run_dir.best.write(self.checkpoint, step, {"val_loss": self.val_loss},
                                        vocab=self.loader.vocab)
                self.run_dir.best.prune(1)

    def _end_of_epoch(self, epoch, line):
        line.message(f"epoch {epoch + 1} done at step {self.step}")
        self._validate(line)

    def _sample(self, line):
        if not self.chief:
            return
        import tensorflow as tf

        from tf_charrnn.sample import Generator

        if self.generator is None:
            self.generator = Generator(self.model, self.loader.vocab,
                                       hangul_jamo=self.config.data.hangul_jamo)
            self.sample_prime = self._usable_prime(line)
        sample = self.config.sample
        text = self.generator.generate(self.sample_prime, self.config.train.sample_length,
                                       temperature=sample.temperature, top_k=sample.top_k,
                                       top_p=sample.top_p, seed=self.config.train.seed + self.step,
                                       unknown="skip")
        line.message(f"--- sample at step {self.step} ---\n{text}\n---")
        with self.writer.as_default(step=self.step):
            tf.summary.text("sample", text)

    def _usable_prime(self, line):
        """sample.prime without the characters the vocabulary lacks (said once), or None (the
        default prime) when none is left: a recipe's prime ('/*' for C) must not stop a run on
        another corpus."""
        from tf_charrnn.sample import default_prime, known_prime

        prime = self.config.sample.prime
        if prime is None:
            return None
        kept, missing = known_prime(prime, self.loader.vocab, self.config.data.hangul_jamo)
        if missing:
            used = kept or default_prime(self.loader.vocab, self.config.data.hangul_jamo)
            line.message(f"warning: sample.prime has characters not in the vocabulary "
                         f"({' '.join(map(repr, missing))}): the samples during training start "
                         f"from {used!r}")
        return kept or None

    def _save(self, line):
        if not self.chief:
            return
        metrics = {"val_loss": self.val_loss} if math.isfinite(self.val_loss) else {}
        self.run_dir.checkpoints.write(self.checkpoint, self.step, metrics,
                                       vocab=self.loader.vocab)
        self.run_dir.checkpoints.prune(self.config.train.keep_checkpoints)

    def _stop_on_nan(self, step_losses, line):
        bad_step = self.step - len(step_losses) + int(np.argmin(np.isfinite(step_losses))) + 1
        newest = self.run_dir.checkpoints.complete()
        kept = f"the last good checkpoint {newest[0].prefix} is kept" if newest else \
            "no checkpoint had been saved yet"
        line.close()
        raise CharRNNError(f"training loss became {step_losses[~np.isfinite(step_losses)][0]} at "
                           f"step {bad_step}; {kept}: lower train.learning_rate or "
                           f"train.clip_threshold and resume")


# --- command line --------------------------------------------------------------------------------

# Flags that set a config field: --flag-name <-> section.flag_name, one name everywhere.
FIELD_FLAGS = {
    "data": ("corpus", "data_dir", "source", "max_bytes", "url", "encoding", "batch_size",
             "seq_length", "val_fraction"),
    "model": ("cell", "num_layers", "hidden_size", "embedding_size", "dropout", "precision",
              "kernel"),
    "train": ("optimizer", "learning_rate", "schedule", "decay_rate", "warmup_steps",
              "cooldown_fraction", "clip",
              "clip_threshold", "epochs", "max_steps", "max_seconds", "seed", "eval_every",
              "sample_every",
              "checkpoint_every", "log_every", "steps_per_call", "strategy", "runs_dir"),
}


def build_parser():
    import typing

    from tf_charrnn.config import SECTIONS

    parser = cli.ArgumentParser(
        prog="python -m tf_charrnn.train",
        description="Train a character-level RNN language model. Every config field can be set "
                    "with --set section.field=value; the common ones also have flags.")
    parser.add_argument("--config", help="a YAML recipe (default: configs/<corpus>.yaml when it "
                                         f"exists; recipes live in {CONFIGS_DIR})")
    parser.add_argument("--run", type=cli.path_argument,
                        help="run name under runs_dir, or a run directory's path (default: "
                             "corpus and time); an existing run is resumed")
    parser.add_argument("--resume", action="store_true",
                        help="resume --run, or the most recent run when --run is not given")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                        help="override any config field, e.g. --set train.learning_rate=1e-3")
    parser.add_argument("--hangul-jamo", action="store_true", default=None,
                        help="train on Hangul jamo (data.hangul_jamo)")
    for section, names in FIELD_FLAGS.items():
        hints = typing.get_type_hints(SECTIONS[section])
        for name in names:
            kind = hints[name]
            inner = [a for a in typing.get_args(kind) if a is not type(None)]
            kind = inner[0] if inner else kind
            if name in PATH_FIELDS.get(section, ()):
                kind = cli.path_argument
            parser.add_argument(f"--{name.replace('_', '-')}", dest=f"{section}.{name}",
                                type=kind, default=None, metavar=name.upper(),
                                help=f"{section}.{name}")
    cli.add_debug_flag(parser)
    return parser


def config_from_args(args):
    """The Config to train with: a base with the command line's flags and --set applied.

    The base is the run's own config.yaml when --run (or --resume) names an existing run (one
    with a checkpoint, or started but not saved yet), so `--run NAME` alone continues it as it
    was set up; else --config, or
    configs/<corpus>.yaml (with its own corpus), or the defaults. --config given with an
    existing run is the base instead of config.yaml; either way a resumed run refuses a change
    to what its checkpoint holds (see runs.describe_mismatch).
    """
    corpus = getattr(args, "data.corpus")
    if args.config:
        recipe = load_config(args.config)
    elif corpus and recipe_path(corpus):
        recipe = load_config(recipe_path(corpus))
    else:
        recipe = Config()
    # `--corpus korean` names a recipe, whose data.corpus is the text it trains on.
    names_recipe = not args.config and corpus and recipe_path(corpus)
    overrides = [parse_override(text) for text in args.set]
    for key, value in vars(args).items():
        if "." in key and value is not None and not (key == "data.corpus" and names_recipe):
            section, field = key.split(".")
            overrides.append((section, field, value))
    if args.hangul_jamo:
        overrides.append(("data", "hangul_jamo", True))
    # Where the runs are: the last --runs-dir / --set train.runs_dir given, else the recipe's.
    runs_dir = next((str(value) for section, field, value in reversed(overrides)
                     if (section, field) == ("train", "runs_dir")), recipe.train.runs_dir)
    saved = None if args.config else saved_run_config(runs_dir, args.run, args.resume)
    if saved is None:
        return apply_overrides(recipe, overrides)
    # The run where it lies now, whatever runs_dir it was trained under.
    return apply_overrides(saved, [*overrides, ("train", "runs_dir", runs_dir)])


def saved_run_config(runs_dir, run_name, resume):
    """config.yaml of the run that --run/--resume names, when it has one; else None."""
    from tf_charrnn.runs import Run, latest_run

    if run_name is None and not resume:
        return None
    run = Run(Path(runs_dir) / run_name if run_name is not None else latest_run(runs_dir))
    if not run.exists():  # with or without a checkpoint yet: the settings it was started with
        return None
    return run.read_config()


def main(argv=None):
    args = build_parser().parse_args(argv)
    config = config_from_args(args)
    with cli.stdout_outliving_its_reader():  # `train ... | head` must not cost the run
        result = train(config, run_name=args.run, resume=args.resume)
        if result.stopped == "interrupted":  # the shell's code for that signal, else Ctrl-C's
            return 128 + int(signal.Signals[result.signal_name or "SIGINT"])
        if not result.chief:
            print(f"worker done at step {result.step}; the cluster's chief saves the run")
            return 0
        done = "saved in" if result.losses else "unchanged:"  # a finished run trains nothing
        print(f"run {done} {result.run_path} (step {result.step}); sample it with: "
              f"python -m tf_charrnn.sample --run {result.run_path}")
    return 0


if __name__ == "__main__":
    sys.exit(cli.run_cli(main))
