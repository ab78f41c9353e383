"""Shared command-line plumbing: one-line errors, exit codes, quiet TensorFlow start-up.

Exit codes: 0 success, 1 runtime error (CharRNNError), 2 usage error (UsageError or a bad flag),
130 interrupted. `--debug` shows the traceback instead of the one-line message.
"""

import argparse
import sys

from tf_charrnn import tfenv
from tf_charrnn.errors import CharRNNError, UsageError


def quiet_tensorflow():
    """Keep TensorFlow's C++ start-up noise off the terminal (see tf_charrnn.tfenv)."""
    tfenv.install()


class ArgumentParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line raised as UsageError, not a usage dump."""

    def error(self, message):
        raise UsageError(f"{message} (see {self.prog} --help)")


def add_debug_flag(parser):
    parser.add_argument("--debug", action="store_true",
                        help="show full tracebacks instead of one-line errors")


def run_cli(main, argv=None):
    """Call main(argv); map user errors to one line on stderr and an exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    try:
        code = main(argv)
    except CharRNNError as error:
        if debug:
            raise
        print(f"error: {error}", file=sys.stderr)
        return error.exit_code
    except KeyboardInterrupt:
        if debug:
            raise
        print("interrupted", file=sys.stderr)
        return 130
    return 0 if code is None else code
