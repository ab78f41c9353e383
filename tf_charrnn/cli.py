"""Shared command-line plumbing: one-line errors, exit codes, the common flags.

Exit codes: 0 success, 1 runtime error (CharRNNError), 2 usage error (UsageError or a bad flag),
130 interrupted. `--debug` shows the traceback instead of the one-line message.
"""

import argparse
import sys

from tf_charrnn.errors import CharRNNError, UsageError


class ArgumentParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line raised as UsageError, not a usage dump."""

    def error(self, message):
        raise UsageError(f"{message} (see {self.prog} --help)")


def add_debug_flag(parser):
    parser.add_argument("--debug", action="store_true",
                        help="show full tracebacks instead of one-line errors")


def add_run_arguments(parser):
    """--run DIR | --checkpoint PATH, and --runs-dir: which trained model a command uses."""
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--run", metavar="DIR",
                       help="run directory (default: the most recent run under --runs-dir)")
    where.add_argument("--checkpoint", metavar="PATH",
                       help="a checkpoint prefix, e.g. runs/NAME/checkpoints/ckpt-1000")
    parser.add_argument("--runs-dir", default="runs", metavar="DIR",
                        help="where to look for the most recent run (default: runs)")


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
