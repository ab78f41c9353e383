"""The project's one exception family for user mistakes.

Every error a user can cause (a bad path, a bad flag, a corpus too short, a run that does not
match) is raised as a CharRNNError whose message is one line naming the problem and the fix.
The command-line entry points turn it into that line on stderr and a non-zero exit code; anything
else is a bug and keeps its traceback.
"""


class CharRNNError(Exception):
    """A runtime error caused by the user's input or environment (exit code 1)."""

    exit_code = 1


class UsageError(CharRNNError):
    """A malformed or out-of-range command-line argument or config value (exit code 2)."""

    exit_code = 2
