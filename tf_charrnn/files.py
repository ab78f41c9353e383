"""File plumbing shared by the corpus builder, the id cache and the run directory.

Everything this project writes goes through write_atomic (or a temp file beside the target and
os.replace), so a reader sees either the old file or the whole new one, never half of it.
"""

import hashlib
import os
import tempfile
from pathlib import Path

from tf_charrnn.errors import CharRNNError

_BLOCK = 1 << 22


def sha256_file(path):
    """The hex sha256 of a file, read in blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(_BLOCK):
            digest.update(block)
    return digest.hexdigest()


def temp_file_beside(path):
    """A new (handle, path) temp file in path's directory, so os.replace onto path is atomic.
    Its mode is 0644 (mkstemp's 0600 would keep the file from other users after os.replace)."""
    path = Path(path)
    fd, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.fchmod(fd, 0o644)
    return os.fdopen(fd, "wb"), Path(temp)


def user_path(text, what):
    """Path(text) with a leading ~ or ~user expanded; an unknown user is a CharRNNError."""
    try:
        return Path(text).expanduser()
    except RuntimeError:  # ~user of no user on this machine
        raise CharRNNError(f"{what} {text}: no such user's home directory; give the path in "
                           f"full") from None


def write_atomic(path, payload):
    """Write bytes to path through a synced temp file and os.replace: never half-written."""
    path = Path(path)
    handle, temp = temp_file_beside(path)
    try:
        with handle:
            handle.write(payload)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp, path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
