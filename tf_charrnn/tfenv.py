"""How the project starts TensorFlow: without its C++ start-up noise, and which GPUs it sees.

TensorFlow 2.21 writes oneDNN notices, CUDA probing results ("Could not find cuda drivers", a
failed cuInit) and absl warnings straight to file descriptor 2 while it loads and when it first
lists devices, whatever TF_CPP_MIN_LOG_LEVEL says. On a CPU-only machine every command would
open with a screen of false alarms. Unless the user set TF_CPP_MIN_LOG_LEVEL themselves, those
two moments run with descriptor 2 pointed at /dev/null; Python exceptions still reach the user.
"""

import contextlib
import functools
import importlib.abc
import importlib.util
import os
import sys

QUIET = "TF_CPP_MIN_LOG_LEVEL" not in os.environ


@contextlib.contextmanager
def stderr_silenced(enabled=True):
    """Point file descriptor 2 at /dev/null for the duration (C++ writers included)."""
    if not enabled:
        yield
        return
    sys.stderr.flush()
    saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


class _QuietLoader(importlib.abc.Loader):
    def __init__(self, loader):
        self.loader = loader

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module):
        with stderr_silenced():
            self.loader.exec_module(module)


class _QuietTensorFlowImport(importlib.abc.MetaPathFinder):
    """Finds `tensorflow` once, with a loader that silences descriptor 2 while it loads."""

    def find_spec(self, name, path=None, target=None):
        if name != "tensorflow":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.loader is not None:
            spec.loader = _QuietLoader(spec.loader)
        return spec


def install():
    """Make the first import of TensorFlow quiet (no-op if it is already imported)."""
    if QUIET and "tensorflow" not in sys.modules and not any(
            isinstance(finder, _QuietTensorFlowImport) for finder in sys.meta_path):
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
        sys.meta_path.insert(0, _QuietTensorFlowImport())


@functools.lru_cache(maxsize=None)
def visible_gpus():
    """The logical GPU devices (the first device query, where CUDA probing prints, is quiet)."""
    import tensorflow as tf

    with stderr_silenced(QUIET):
        return tuple(tf.config.list_logical_devices("GPU"))
