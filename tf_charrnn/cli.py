"""Shared command-line plumbing: one-line errors, exit codes, the common flags.

Exit codes: 0 success, 1 runtime error (CharRNNError), 2 usage error (UsageError or a bad flag),
130 interrupted. `--debug` shows the traceback instead of the one-line message.
"""

import argparse
import contextlib
import logging
import os
import re
import sys

from tf_charrnn.errors import CharRNNError, UsageError


def _is_utf8(text):
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # bytes that were not UTF-8, kept by Python as lone surrogates
        return False
    return True


class ArgumentParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line raised as UsageError, not a usage dump.

    A value that is not UTF-8 (a terminal in EUC-KR or Latin-1 under a UTF-8 locale) is refused
    here, naming its flag, rather than failing deep inside TensorFlow or the vocabulary.
    """

    def error(self, message):
        raise UsageError(f"{message} (see {self.prog} --help)")

    def parse_args(self, args=None, namespace=None):
        parsed = super().parse_args(args, namespace)
        flags = {action.dest: (action.option_strings or [action.dest])[-1]
                 for action in self._actions}
        for dest, value in vars(parsed).items():
            for text in value if isinstance(value, list) else [value]:
                if isinstance(text, str) and not _is_utf8(text):
                    raise UsageError(f"{flags.get(dest, dest)} is not UTF-8 text ({ascii(text)}): "
                                     f"give it in UTF-8 (set the terminal to UTF-8, or convert "
                                     f"it with iconv -t utf-8)")
        return parsed


def add_debug_flag(parser):
    parser.add_argument("--debug", action="store_true",
                        help="show full tracebacks instead of one-line errors")


def path_argument(text):
    """argparse type of a path flag: a leading ~ or ~user expanded, as an unquoted one is by the
    shell (an unknown user's ~name stays as it is, as there)."""
    return os.path.expanduser(text)


def add_run_arguments(parser):
    """--run DIR | --checkpoint PATH, and --runs-dir: which trained model a command uses."""
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--run", metavar="DIR", type=path_argument,
                       help="run directory (default: the most recent run under --runs-dir)")
    where.add_argument("--checkpoint", metavar="PATH", type=path_argument,
                       help="a checkpoint prefix, e.g. runs/NAME/checkpoints/ckpt-1000")
    parser.add_argument("--runs-dir", default="runs", metavar="DIR", type=path_argument,
                        help="where to look for the most recent run (default: runs)")


def drop_stdout():
    """Point stdout's file descriptor at /dev/null (its reader has gone, `... | head`), so later
    writes and the interpreter's last flush do not fail again."""
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


class _OutputThatOutlivesItsReader:
    """sys.stdout, whose reader may leave (`train ... | head`): from then on what is written goes
    to /dev/null instead of raising BrokenPipeError, so a long job carries on and saves."""

    def __init__(self, stream):
        self._stream = stream

    def write(self, text):
        try:
            return self._stream.write(text)
        except BrokenPipeError:
            drop_stdout()
            return len(text)

    def flush(self):
        try:
            self._stream.flush()
        except BrokenPipeError:
            drop_stdout()

    def __getattr__(self, name):
        return getattr(self._stream, name)


@contextlib.contextmanager
def stdout_outliving_its_reader():
    """sys.stdout, for the duration, as a stream that outlives its reader (see above)."""
    saved = sys.stdout
    sys.stdout = _OutputThatOutlivesItsReader(saved)
    try:
        yield
    finally:
        sys.stdout = saved


_MEMORY_HINT = "use a smaller model or batch (when sampling, fewer --num-samples)"
_DISK_FULL = re.compile(r"No space left on device|Disk quota exceeded|[Oo]ut of disk space")


def _report(message, exit_code):
    """The one line on stderr; TensorFlow's warnings as the process ends (e.g. about values a
    failed checkpoint read left unrestored) would only bury it."""
    logging.getLogger("tensorflow").setLevel(logging.ERROR)
    print(f"error: {message}", file=sys.stderr)
    return exit_code


def run_cli(main, argv=None):
    """Call main(argv); map user errors to one line on stderr and an exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    try:
        code = main(argv)
    except CharRNNError as error:
        if debug:
            raise
        return _report(str(error), error.exit_code)
    except MemoryError:
        if debug:
            raise
        return _report(f"out of memory: {_MEMORY_HINT}", 1)
    except Exception as error:  # noqa: BLE001 - TensorFlow's out-of-memory error, else re-raised
        tf = sys.modules.get("tensorflow")
        if debug or tf is None or not isinstance(error, tf.errors.ResourceExhaustedError):
            raise
        disk_full = _DISK_FULL.search(str(error))  # TensorFlow's file writes report ENOSPC so
        if disk_full:
            return _report(f"a write failed: {disk_full.group(0)}; free disk space, then resume "
                           f"the run (checkpoints already written are kept)", 1)
        found = re.search(r"OOM when allocating tensor with shape\[[\d,]*\]", str(error))
        detail = found.group(0) if found else (str(error).strip().splitlines() or ["?"])[0]
        return _report(f"out of memory ({detail[:160]}): {_MEMORY_HINT}", 1)
    except KeyboardInterrupt:
        if debug:
            raise
        print("interrupted", file=sys.stderr)
        return 130
    return 0 if code is None else code
