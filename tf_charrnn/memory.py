"""Memory a command may take: refuse a job that cannot fit before allocating it.

A batch of samples or a model far too large for the machine does not fail at once: it grows
until the system kills it, or until TensorFlow stops with a page of out-of-memory errors. Each
command estimates what its host-memory buffers need (`sample.Generator`, `train.train`) and asks
`check_fits` first, against the memory available now: the machine's, or a container's limit
(its cgroup's) where that is less.
"""

from pathlib import Path

from tf_charrnn.errors import CharRNNError

GIB = 2 ** 30
_NO_LIMIT = 2 ** 60  # cgroup v1 writes an unlimited group's limit as a number near 2**63

# (controller name in /proc/self/cgroup, its mount, limit file, usage file, reclaimable-cache key)
_CGROUPS = (("", "sys/fs/cgroup", "memory.max", "memory.current", "inactive_file"),
            ("memory", "sys/fs/cgroup/memory", "memory.limit_in_bytes", "memory.usage_in_bytes",
             "total_inactive_file"))


def _read_int(path):
    text = Path(path).read_text(encoding="ascii").strip()
    return _NO_LIMIT if text == "max" else int(text)


def _cgroup_headroom(root="/"):
    """The memory this process's cgroup (v2, else v1) may still take: its limit minus what it
    holds, not counting page cache it can drop; None where there is no limit. root: where /proc
    and /sys are (a test's fake tree)."""
    root = Path(root)
    try:
        lines = (root / "proc/self/cgroup").read_text(encoding="utf-8").splitlines()
    except OSError:
        return None
    groups = dict(line.split(":", 2)[1:] for line in lines if line.count(":") >= 2)
    for controller, mount, limit_file, usage_file, cache_key in _CGROUPS:
        if controller not in groups:
            continue
        for directory in (root / mount / groups[controller].lstrip("/"), root / mount):
            try:
                limit = _read_int(directory / limit_file)
                usage = _read_int(directory / usage_file)
                stat = dict(line.split() for line in
                            (directory / "memory.stat").read_text(encoding="ascii").splitlines())
            except (OSError, ValueError):
                continue
            if limit >= _NO_LIMIT:
                break
            return max(limit - (usage - int(stat.get(cache_key, 0))), 0)
    return None


def available_memory_bytes():
    """What a process can take now without swapping: MemAvailable from /proc/meminfo, or the
    cgroup's headroom where that is less; None where neither can be read (not Linux), and then
    nothing is refused."""
    available = None
    try:
        with open("/proc/meminfo", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    available = int(line.split()[1]) * 1024
                    break
    except (OSError, ValueError, IndexError):
        pass
    headroom = _cgroup_headroom()
    if headroom is not None:
        available = headroom if available is None else min(available, headroom)
    return available


def check_fits(need_bytes, what, fix, available=None):
    """Raise CharRNNError when need_bytes is more than the memory available: one line naming
    what needs it and the fix."""
    available = available_memory_bytes() if available is None else available
    if available is not None and need_bytes > available:
        raise CharRNNError(f"{what} need about {need_bytes / GIB:,.1f} GiB, more than the "
                           f"{available / GIB:.1f} GiB of memory available: {fix}")
