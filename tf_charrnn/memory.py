"""Memory a command may take: refuse a job that cannot fit before allocating it.

A batch of samples or a model far too large for the machine does not fail at once: it grows
until the system kills it, or until TensorFlow stops with a page of out-of-memory errors. Each
command estimates what its buffers need (`sample.Generator`, `train.train`) and asks
`check_fits` first, against the memory available now.
"""

from tf_charrnn.errors import CharRNNError

GIB = 2 ** 30


def available_memory_bytes():
    """MemAvailable from /proc/meminfo: what a process can take now without swapping; None
    where there is no such file (not Linux), and then nothing is refused."""
    try:
        with open("/proc/meminfo", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def check_fits(need_bytes, what, fix, available=None):
    """Raise CharRNNError when need_bytes is more than the memory available: one line naming
    what needs it and the fix."""
    available = available_memory_bytes() if available is None else available
    if available is not None and need_bytes > available:
        raise CharRNNError(f"{what} need about {need_bytes / GIB:,.1f} GiB, more than the "
                           f"{available / GIB:.1f} GiB of memory available: {fix}")
