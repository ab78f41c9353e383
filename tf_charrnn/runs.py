"""Run directories: config, vocabulary, corpus fingerprint, verified checkpoints, the run lock.

    runs/<name>/config.yaml        the resolved Config the run trains with
    runs/<name>/vocab.json         the Vocab plus the corpus fingerprint (path, sha256, encoding)
    runs/<name>/checkpoints/       ckpt-<step>.{index,data-*} + ckpt-<step>.manifest.json
    runs/<name>/best/              the checkpoint with the best validation loss, same layout
    runs/<name>/events.out.*       TensorBoard
    runs/<name>/.lock              held by the one trainer writing the run

A checkpoint counts only once its manifest (sha256 of every file) is written, last and atomically,
so a checkpoint cut short by a kill or a full disk is never taken for a complete one; restore walks
from the newest to the oldest and skips, with a warning, any whose files no longer match.
"""

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import os
import re
import shutil
from pathlib import Path

from tf_charrnn.config import Config, config_from_dict, config_to_dict, save_config
from tf_charrnn.data import Vocab
from tf_charrnn.errors import CharRNNError, UsageError
from tf_charrnn.files import sha256_file, write_atomic

WRITE_PROBE = ".write-probe"  # train.check_writable's, removed at once (but for a kill)
# What a run directory holds besides config.yaml and vocab.json (the module docstring), its
# temporary files included.
_OWN_NAMES = {"checkpoints", "best", ".lock", WRITE_PROBE}
_OWN_PREFIXES = ("events.out.tfevents.", ".config.yaml.", ".vocab.json.")
_CHECKPOINT_NAME = re.compile(r"^ckpt-(\d+)\.manifest\.json$")


@dataclasses.dataclass(frozen=True)
class CheckpointInfo:
    prefix: Path      # ckpt-<step>, without the .index / .data-* suffixes
    step: int
    metrics: dict
    vocab_sha256: str = None  # the vocabulary the weights were trained with

    @property
    def name(self):
        return self.prefix.name


class CheckpointStore:
    """Verified tf.train.Checkpoint files in one directory: write, list, verify, prune."""

    def __init__(self, directory):
        self.directory = Path(directory)

    def _files(self, prefix):
        return sorted(self.directory.glob(prefix.name + ".*"))

    @staticmethod
    def _remove(path):
        # ckpt-N_temp/ is TensorFlow's scratch directory, left behind when a save is cut short.
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)

    def write(self, checkpoint, step, metrics=None, vocab=None):
        """Write checkpoint as ckpt-<step>, then its manifest; return its CheckpointInfo.

        The manifest records the vocabulary's fingerprint: swapping two characters in vocab.json
        keeps every shape, so only this can tell that the ids no longer mean the same characters.
        """
        fingerprint = vocab_fingerprint(vocab) if vocab is not None else None
        prefix = self.directory / f"ckpt-{step}"
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            self.delete(prefix)  # a leftover of a save that was cut short
            checkpoint.write(str(prefix))
            files = {path.name: sha256_file(path) for path in self._files(prefix)
                     if not path.name.endswith(".manifest.json")}
            manifest = {"step": int(step), "files": files, "metrics": metrics or {},
                        "vocab_sha256": fingerprint}
            write_atomic(self.manifest_path(prefix.name), json.dumps(manifest, indent=1).encode())
        except Exception as error:
            with contextlib.suppress(OSError):  # e.g. a file where the directory should be
                self.delete(prefix)
            raise CharRNNError(f"could not write checkpoint {prefix} ({error}); checkpoints "
                               f"written before it are kept: free disk space (or move what is in "
                               f"the way) and resume") from None
        return CheckpointInfo(prefix, int(step), metrics or {}, fingerprint)

    def delete(self, prefix):
        for path in [*self._files(prefix), self.directory / f"{prefix.name}_temp"]:
            self._remove(path)

    def complete(self):
        """Checkpoints with a manifest, newest first (their files not yet verified)."""
        found = []
        if not self.directory.is_dir():
            return found
        for path in self.directory.iterdir():
            match = _CHECKPOINT_NAME.match(path.name)
            if not match:
                continue
            try:
                manifest = json.loads(path.read_text())
            except (OSError, ValueError):
                manifest = {}
            found.append(CheckpointInfo(self.directory / f"ckpt-{match.group(1)}",
                                        int(match.group(1)), manifest.get("metrics", {}),
                                        manifest.get("vocab_sha256")))
        return sorted(found, key=lambda info: info.step, reverse=True)

    def manifest_path(self, name):
        """ckpt-<step>'s manifest: written last, its presence marks the checkpoint complete."""
        return self.directory / f"{name}.manifest.json"

    def verify(self, info):
        """None when every file of info matches its manifest, else what is wrong."""
        manifest_path = self.manifest_path(info.name)
        try:
            manifest = json.loads(manifest_path.read_text())
            files = manifest["files"]
        except (OSError, ValueError, KeyError):
            return "its manifest is unreadable"
        if not any(name.endswith(".index") for name in files):
            return "it has no index file"
        for name, digest in files.items():
            path = self.directory / name
            if not path.is_file():
                return f"{name} is missing"
            if sha256_file(path) != digest:
                return f"{name} is corrupt (checksum mismatch)"
        return None

    def newest_good(self, log=print):
        """The newest checkpoint whose files verify, warning about each newer bad one."""
        for info in self.complete():
            problem = self.verify(info)
            if problem is None:
                return info
            log(f"warning: skipping checkpoint {info.prefix} because {problem}; "
                f"trying the previous one")
        return None

    def prune(self, keep):
        """Delete all but the newest `keep` complete checkpoints, and any orphaned files."""
        complete = self.complete()
        keep_names = {info.name for info in complete[:keep]}
        for path in self.directory.iterdir():
            match = re.match(r"^(ckpt-\d+)(\.|_temp$)", path.name)
            if match and match.group(1) not in keep_names:
                self._remove(path)
            elif re.match(r"^\.ckpt-\d+\.manifest\.json\..*\.tmp$", path.name):
                self._remove(path)  # a manifest write cut short (the run lock bars any other)


class RunLock:
    """An exclusive, non-blocking flock on runs/<name>/.lock (released when the process dies)."""

    def __init__(self, run_path):
        self.path = Path(run_path) / ".lock"
        self._handle = None

    def acquire(self):
        try:
            self._handle = open(self.path, "a+")
        except OSError as error:  # the lock is the first file a trainer writes in the run
            raise CharRNNError(f"cannot write to run directory {self.path.parent} "
                               f"({error.strerror}): choose another --runs-dir or --run") \
                from None
        try:
            fcntl.flock(self._handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._handle.seek(0)
            holder = self._handle.read().strip() or "another process"
            self._handle.close()
            self._handle = None
            raise CharRNNError(f"run {self.path.parent} is in use by another trainer "
                               f"(pid {holder}): wait for it to finish or pick another --run") \
                from None
        self._handle.seek(0)
        self._handle.truncate()
        self._handle.write(str(os.getpid()))
        self._handle.flush()
        return self

    def release(self):
        if self._handle is not None:
            fcntl.flock(self._handle, fcntl.LOCK_UN)
            self._handle.close()
            self._handle = None

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()


class Run:
    """A run directory on disk."""

    def __init__(self, path):
        self.path = Path(path)
        self.config_path = self.path / "config.yaml"
        self.vocab_path = self.path / "vocab.json"
        self.checkpoints = CheckpointStore(self.path / "checkpoints")
        self.best = CheckpointStore(self.path / "best")

    def exists(self):
        return self.config_path.is_file() and self.vocab_path.is_file()

    def check_not_foreign(self):
        """Before a new run writes to an existing path: refuse a file, or a directory holding
        anything a run does not write (`--run ~/notes` would have put checkpoints among the
        user's files, and replaced a config.yaml of theirs)."""
        if self.exists() or not self.path.exists():
            return
        if not self.path.is_dir():
            raise UsageError(f"{self.path} is a file, not a run directory: give --run a new or "
                             f"empty directory, or an existing run")
        foreign = sorted(self._foreign_entries())
        if foreign:
            more = f" and {len(foreign) - 1} more" if len(foreign) > 1 else ""
            raise UsageError(f"{self.path} is not a run directory (it holds {foreign[0]}{more}): "
                             f"give --run a new or empty directory, or an existing run")

    def _foreign_entries(self):
        """Names (relative paths) in the directory that no run writes."""
        for entry in self.path.iterdir():
            name = entry.name
            if name in ("checkpoints", "best") and entry.is_dir() and not entry.is_symlink():
                yield from (f"{name}/{inner.name}" for inner in entry.iterdir()
                            if not inner.name.startswith(("ckpt-", ".ckpt-")))
            elif name == "config.yaml":  # a run's own, when it was killed before vocab.json
                try:
                    self.read_config()
                except CharRNNError:
                    yield name
            elif name not in _OWN_NAMES and not name.startswith(_OWN_PREFIXES):
                yield name

    def has_checkpoint(self):
        return bool(self.checkpoints.complete() or self.best.complete())

    def read_config(self):
        import yaml

        try:
            values = yaml.safe_load(self.config_path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise CharRNNError(f"{self.path} is not a run directory (no config.yaml): give a "
                               f"directory made by tf_charrnn.train") from None
        except (OSError, yaml.YAMLError) as error:
            first_line = str(error).strip().splitlines()[0] if str(error).strip() else "?"
            raise CharRNNError(f"{self.config_path} is unreadable ({first_line}): restore it "
                               f"from the original run") from None
        if not values:  # config_from_dict would take an empty file for the default Config
            raise CharRNNError(f"{self.config_path} is empty: restore it from the original run")
        try:
            return config_from_dict(values)
        except CharRNNError as error:
            raise CharRNNError(f"{self.config_path} is invalid: {error}") from None

    def read_vocab(self):
        """(Vocab, corpus fingerprint dict) from vocab.json."""
        try:
            values = json.loads(self.vocab_path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise CharRNNError(f"{self.path} has no vocab.json: the run directory is incomplete")\
                from None
        except (OSError, ValueError) as error:
            raise CharRNNError(f"{self.vocab_path} is unreadable ({error}): restore it from the "
                               f"original run") from None
        return Vocab.from_dict(values), values.get("corpus", {})

    def write_metadata(self, config, vocab, corpus):
        self.path.mkdir(parents=True, exist_ok=True)
        # Rewritten on every resume, beside good checkpoints: through a temporary file and
        # os.replace (as vocab.json and the manifests are), so a kill cannot leave it truncated.
        partial = self.path / ".config.yaml.tmp"
        save_config(config, partial)
        os.replace(partial, self.config_path)
        vocab.save(self.vocab_path, corpus=corpus)

    def newest_checkpoint(self, log=print):
        """The newest verified checkpoint in checkpoints/, else best/, else None."""
        return self.checkpoints.newest_good(log) or self.best.newest_good(log)


def describe_mismatch(saved: Config, wanted: Config, saved_vocab, vocab, saved_corpus, corpus):
    """What differs between a run on disk and the run asked for, or None when resumable."""
    if saved_corpus.get("sha256") and saved_corpus.get("sha256") != corpus.get("sha256"):
        return (f"the corpus differs (run trained on {saved_corpus.get('path')} "
                f"sha256 {saved_corpus.get('sha256', '')[:12]}, now {corpus.get('path')} "
                f"sha256 {corpus.get('sha256', '')[:12]})")
    if saved_vocab != vocab:
        if len(saved_vocab) != len(vocab):
            return f"the vocabulary differs ({len(saved_vocab)} vs {len(vocab)} characters)"
        at = next(i for i, (a, b) in enumerate(zip(saved_vocab.chars, vocab.chars)) if a != b)
        return (f"the vocabulary differs at id {at} (vocab.json has "
                f"{saved_vocab.chars[at]!r}, the corpus gives {vocab.chars[at]!r})")
    model_saved, model_wanted = config_to_dict(saved)["model"], config_to_dict(wanted)["model"]
    for key in ("cell", "num_layers", "hidden_size", "one_hot", "embedding_size"):
        if model_saved[key] != model_wanted[key]:
            return f"model.{key} differs (run has {model_saved[key]}, asked for {model_wanted[key]})"
    for key in ("batch_size", "seq_length", "hangul_jamo", "val_fraction"):
        if getattr(saved.data, key) != getattr(wanted.data, key):
            return (f"data.{key} differs (run has {getattr(saved.data, key)}, asked for "
                    f"{getattr(wanted.data, key)})")
    # The optimiser's slots are in the checkpoint, and so is mixed_float16's loss scale: another
    # optimiser would start from nothing (or fail to restore), so a change is refused up front.
    if saved.train.optimizer != wanted.train.optimizer:
        return (f"train.optimizer differs (run has {saved.train.optimizer}, asked for "
                f"{wanted.train.optimizer}; its state is in the checkpoint)")
    if (saved.model.precision == "mixed_float16") != (wanted.model.precision == "mixed_float16"):
        return (f"model.precision differs (run has {saved.model.precision}, asked for "
                f"{wanted.model.precision}; mixed_float16's loss scale is in the checkpoint)")
    return None


def latest_run(runs_dir):
    """The run under runs_dir with the most recently written checkpoint."""
    runs_dir = Path(runs_dir)
    candidates = []
    if runs_dir.is_dir():
        for path in runs_dir.iterdir():
            run = Run(path)
            if run.exists():
                stamp = max((store.manifest_path(info.name).stat().st_mtime
                             for store in (run.checkpoints, run.best)
                             for info in store.complete()), default=None)
                if stamp is not None:
                    candidates.append((stamp, path))
    if not candidates:
        raise CharRNNError(f"no trained run found under {runs_dir}/: train one with "
                           f"python -m tf_charrnn.train, or pass --run DIR")
    return max(candidates)[1]


@dataclasses.dataclass
class LoadedRun:
    run: Run
    config: Config
    vocab: Vocab
    corpus: dict
    model: object
    checkpoint: CheckpointInfo


def vocab_fingerprint(vocab):
    return hashlib.sha256(vocab.chars.encode("utf-8")).hexdigest()


class CheckpointGone(CharRNNError):
    """The checkpoint was removed between choosing and reading it (a training run pruned it)."""


def restore_checkpoint(checkpoint, info, vocab, what="model"):
    """Read info into a tf.train.Checkpoint; a mismatch with config.yaml/vocab.json is an error."""
    import tensorflow as tf

    if info.vocab_sha256 and info.vocab_sha256 != vocab_fingerprint(vocab):
        raise CharRNNError(f"vocab.json does not match the vocabulary checkpoint {info.prefix} "
                           f"was trained with (other characters, or another order): restore the "
                           f"run's original vocab.json")
    try:
        status = checkpoint.read(str(info.prefix))
        status.expect_partial()  # a model-only read leaves the optimiser's slots unread: no warning
        status.assert_existing_objects_matched()
    except (tf.errors.OpError, ValueError, AssertionError) as error:
        if not Path(f"{info.prefix}.index").exists():
            raise CheckpointGone(f"checkpoint {info.prefix} was deleted while it was read (its "
                                 f"run pruned it): take a newer one") from None
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error)
        raise CharRNNError(f"checkpoint {info.prefix} does not fit the {what} described by "
                           f"config.yaml and vocab.json ({first_line}); restore the run's "
                           f"original files") from None
    return status


def resolve_checkpoint_path(path):
    """--checkpoint PATH (a ckpt-N prefix, or one of its files, or a run's checkpoints/ or
    best/ directory: its newest good checkpoint) -> (run dir, CheckpointInfo)."""
    path = Path(path)
    if path.is_dir() and CheckpointStore(path).complete():
        newest = CheckpointStore(path).newest_good()
        if newest is None:
            raise CharRNNError(f"every checkpoint in {path} is damaged: give another one")
        return path.parent, newest
    name = re.sub(r"\.(index|manifest\.json|data-\d+-of-\d+)$", "", path.name)
    prefix = path.with_name(name)
    store = CheckpointStore(prefix.parent)
    matches = [info for info in store.complete() if info.name == name]
    if not matches:
        raise CharRNNError(f"no complete checkpoint at {prefix}: give a prefix such as "
                           f"runs/NAME/checkpoints/ckpt-1000")
    problem = store.verify(matches[0])
    if problem:
        raise CharRNNError(f"checkpoint {prefix} cannot be used because {problem}")
    return prefix.parent.parent, matches[0]


def load_run(path=None, checkpoint=None, runs_dir="runs", log=print):
    """A trained run: config, vocab and a model restored from its newest good checkpoint."""
    import tensorflow as tf

    from tf_charrnn.models import build_model

    info = None
    if checkpoint is not None:
        path, info = resolve_checkpoint_path(checkpoint)
    elif path is None:
        path = latest_run(runs_dir)
        log(f"using the most recent run {path}")
    run = Run(path)
    if not Path(path).is_dir():
        raise CharRNNError(f"run directory {path} not found: give a directory under runs/")
    config = run.read_config()
    vocab, corpus = run.read_vocab()
    if info is None:
        info = run.newest_checkpoint(log)
        if info is None and run.has_checkpoint():
            raise CharRNNError(f"every checkpoint of run {path} is damaged (see the warnings "
                               f"above): restore one from a backup, or train the run again")
        if info is None:
            raise CharRNNError(f"run {path} has no checkpoint yet: let training run until it saves "
                               f"one (every train.checkpoint_every steps, and at exit)")
    # The weights are float32 under every precision policy; inference runs them in float32,
    # which is exact and, in the sampler's XLA loop on a CPU, faster than bfloat16.
    model = build_model(dataclasses.replace(config.model, precision="float32"), len(vocab))
    for attempt in range(5):  # a run that is training prunes old checkpoints as it saves
        try:
            restore_checkpoint(tf.train.Checkpoint(model=model), info, vocab)
            break
        except CheckpointGone:
            if checkpoint is not None or attempt == 4:
                raise
            info = run.newest_checkpoint(log) or info
    return LoadedRun(run, config, vocab, corpus, model, info)
