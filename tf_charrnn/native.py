"""The fused kernels' time loops in C++ (native_loops.cc), built on first use and cached.

On a CPU the recurrence's serial part (per step: h @ U on a [B, H] block, then the gate math)
decides the speed of training. XLA's CPU loop runs that product at about 65 GFLOP/s on the
lecture shapes; the same product in C++ (Eigen, then AVX-512 register tiles), with the batch
rows split between the cores (rows never interact, so each core runs the whole time loop over
its own rows; wide layers split their units instead), runs at about twice that or more.
native_loops.cc holds the loops of kernels.py's _forward_loop and _backward_loop for LSTM, GRU
and SimpleRNN as TensorFlow ops, with the same inputs, outputs and arithmetic, and the sampler's
generation loop (sample.py) as one op, whose products also run in bfloat16 where the CPU has
AVX-512 BF16: on AMX tiles, else with its dot-product instructions (bfloat16_generation()).

The library is compiled with the system's C++ compiler (`$CXX`, else c++/g++/clang++) against
the installed TensorFlow's headers, once per source, TensorFlow version, compiler and CPU, into
the cache directory ($TF_CHARRNN_CACHE, else $XDG_CACHE_HOME/tf_charrnn, else
~/.cache/tf_charrnn); about 25 s the first time, a file load after that. Without a compiler,
or if the build or the load fails, `library()` returns None, says why once on stderr, and the
kernels run their tf.while_loops (XLA-compiled where available) instead: slower, same results;
the sampler runs its XLA loop (draws from other random numbers).
TF_CHARRNN_NATIVE=0 turns the native loops off.
"""

from __future__ import annotations

import functools
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

SOURCE = Path(__file__).with_name("native_loops.cc")
# Tried in order: the first is this CPU's full instruction set (AVX-512 where there is one; its
# FP16 extension is left out, some GCC releases cannot compile Eigen's code for it), the second
# any x86-64 or ARM machine.
ARCH_FLAGS = (("-march=native", "-mno-avx512fp16"), ("-march=native",), ())
ENV_SWITCH = "TF_CHARRNN_NATIVE"


class BuildError(RuntimeError):
    """The library could not be built or loaded; the message says why in one line."""


def enabled():
    """False when TF_CHARRNN_NATIVE is set to 0/false/no/off."""
    return os.environ.get(ENV_SWITCH, "1").strip().lower() not in ("0", "false", "no", "off")


def cache_dir():
    root = os.environ.get("TF_CHARRNN_CACHE")
    if root:
        return Path(root)
    xdg = os.environ.get("XDG_CACHE_HOME")
    try:
        return (Path(xdg) if xdg else Path.home() / ".cache") / "tf_charrnn"
    except RuntimeError as error:  # no home directory
        raise BuildError(f"no cache directory ({error}): set TF_CHARRNN_CACHE") from error


def find_compiler():
    for name in (os.environ.get("CXX"), "c++", "g++", "clang++"):
        path = shutil.which(name) if name else None
        if path:
            return path
    return None


def _cpu_signature():
    """The CPU's feature flags: a library built with -march=native runs only where they match."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _compile(compiler, arch_flags, out):
    import tensorflow as tf

    command = [compiler, "-shared", "-fPIC", "-O3", "-DNDEBUG", "-w", *arch_flags,
               *tf.sysconfig.get_compile_flags(), str(SOURCE), "-o", str(out),
               *tf.sysconfig.get_link_flags()]
    try:
        result = subprocess.run(command, capture_output=True, text=True, errors="replace",
                                timeout=600)
    except (OSError, subprocess.TimeoutExpired) as error:
        raise BuildError(f"{compiler} failed to run: {error}") from error
    if result.returncode != 0:
        lines = [line for line in result.stderr.splitlines() if "error" in line]
        raise BuildError(f"{compiler} failed: {(lines or ['(no message)'])[0].strip()}")


def build(directory=None):
    """Compile native_loops.cc unless a matching build is cached; returns the library's path."""
    import tensorflow as tf

    compiler = find_compiler()
    if compiler is None:
        raise BuildError("no C++ compiler found (install g++, or set CXX)")
    try:
        version = subprocess.run([compiler, "--version"], capture_output=True, timeout=60).stdout
    except (OSError, subprocess.TimeoutExpired) as error:
        raise BuildError(f"{compiler} --version failed: {error}") from error
    key = hashlib.sha256("\0".join([
        SOURCE.read_text(), tf.__version__, tf.sysconfig.get_include(),
        version.decode(errors="replace"), _cpu_signature(), repr(ARCH_FLAGS)]).encode()
    ).hexdigest()[:16]
    directory = Path(directory) if directory is not None else cache_dir()
    target = directory / f"native_loops-{key}.so"
    if target.exists():
        return target
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise BuildError(f"cannot create the cache directory {directory}: {error}") from error
    errors = []
    for arch_flags in ARCH_FLAGS:
        # Build beside the target and rename into place: a concurrent process sees either no
        # library or a whole one.
        handle, partial = tempfile.mkstemp(prefix=target.stem + ".", suffix=".tmp",
                                           dir=directory)
        os.close(handle)
        try:
            _compile(compiler, arch_flags, partial)
            os.replace(partial, target)
            return target
        except BuildError as error:
            errors.append(str(error))
        finally:
            if os.path.exists(partial):
                os.remove(partial)
    raise BuildError(errors[0])


@functools.lru_cache(maxsize=None)
def library():
    """The loaded op library, or None (disabled, or unavailable: said once on stderr)."""
    if not enabled():
        return None
    import tensorflow as tf

    path = None
    try:
        path = build()
        return tf.load_op_library(str(path))
    except Exception as error:  # noqa: BLE001 - any failure here means: run the portable loops
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        if path is not None:
            reason += f" (loading {path}; delete it to rebuild)"
        print(f"tf_charrnn: native RNN loops unavailable ({reason}); using the slower "
              f"tf.while_loops. Set {ENV_SWITCH}=0 to skip this attempt.", file=sys.stderr)
        return None


@functools.lru_cache(maxsize=None)
def bfloat16_generation():
    """Whether the generation op runs with precision "bfloat16" here: the library loads and was
    built with AVX-512 BF16 (this CPU has it); the op uses AMX tiles where the CPU has them and
    Linux lets the process use them, else AVX-512 BF16 dot products."""
    lib = library()
    return lib is not None and bool(lib.tf_charrnn_bfloat16_generation())
