"""Corpus name or path -> a verified input.txt on disk.

This module owns where training text comes from. `resolve_corpus` accepts a known corpus name, a
text file, or a directory holding input.txt. The known corpora are built or fetched into
`data_dir/<name>/input.txt`, written atomically (a temp file in the same directory, then
os.replace), and reused only when they verifiably match what was asked for:

* linux_kernel: every .c and .h file of a kernel source tree or tarball (`--source`), else of the
  newest /usr/src/linux-source-* tarball, else of the kernel UAPI headers that ship with the C
  toolchain (linux-libc-dev), concatenated in sorted path order. A manifest.json beside it records
  the source, its fingerprint, the cap and the sha256 of the result.
* shakespeare: tiny-shakespeare, downloaded (any urllib URL, file:// included) and checked
  against its known sha256.
"""

import glob
import hashlib
import http.client
import json
import lzma
import os
import re
import tarfile
import tempfile
import urllib.error
import urllib.request
import zlib
from pathlib import Path

from tf_charrnn.errors import CharRNNError, UsageError
from tf_charrnn.files import sha256_file, temp_file_beside, user_path, write_atomic

KNOWN_CORPORA = ("linux_kernel", "shakespeare")

# Debian/Ubuntu's linux-source package drops a tarball here.
LINUX_SOURCE_GLOB = "/usr/src/linux-source-*/linux-source-*.tar.*"
# Kernel UAPI header directories installed with the C toolchain (glob patterns; missing ones skip).
UAPI_ROOTS = (
    "/usr/include/linux",
    "/usr/include/asm-generic",
    "/usr/include/asm",
    "/usr/include/*/asm",
    "/usr/include/drm",
    "/usr/include/mtd",
    "/usr/include/rdma",
    "/usr/include/scsi",
    "/usr/include/sound",
    "/usr/include/video",
    "/usr/include/xen",
    "/usr/include/misc",
)
TARBALL_SUFFIXES = (".tar.xz", ".tar.gz", ".tgz", ".tar.bz2", ".tar")
SOURCE_SUFFIXES = (".c", ".h")

SHAKESPEARE_URL = (
    "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
)
SHAKESPEARE_URL_ENV = "TF_CHARRNN_SHAKESPEARE_URL"
SHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
SHAKESPEARE_CHARS = 1115394  # all ASCII, so also its size in bytes
DOWNLOAD_TIMEOUT_S = 60

MANIFEST_FORMAT = 1
_CHUNK = 1 << 20


def resolve_corpus(corpus: str, data_dir, *, source=None, max_bytes=None, url=None,
                   log=print) -> Path:
    """The text file for `corpus`: a known corpus name, a file, or a directory with input.txt.

    Known corpora are built or fetched under `data_dir`; `source` and `max_bytes` apply to
    linux_kernel only and `url` to shakespeare only, and passing them elsewhere is an error.
    """
    options = {"--source": source, "--max-bytes": max_bytes, "--url": url}
    allowed = {"linux_kernel": ("--source", "--max-bytes"), "shakespeare": ("--url",)}
    for flag, value in options.items():
        if value is not None and flag not in allowed.get(corpus, ()):
            users = [name for name, flags in allowed.items() if flag in flags]
            raise UsageError(f"{flag} only applies to corpus {users[0]}, not {corpus!r}: "
                             f"drop {flag} or use corpus {users[0]}")
    if corpus == "linux_kernel":
        return build_linux_kernel(data_dir, source=source, max_bytes=max_bytes, log=log)
    if corpus == "shakespeare":
        return fetch_shakespeare(data_dir, url=url, log=log)

    path = user_path(corpus, "the corpus")
    if path.is_dir():
        if not (path / "input.txt").is_file():
            raise CharRNNError(f"directory {path} has no input.txt: put your text in "
                               f"{path / 'input.txt'} or pass the file itself")
        path = path / "input.txt"
    elif not path.exists():
        known = ", ".join(KNOWN_CORPORA)
        if "/" not in corpus and os.sep not in corpus and "." not in corpus:
            raise CharRNNError(f"unknown corpus {corpus!r}: known corpora are {known}, "
                               f"or give a path to a text file")
        raise CharRNNError(f"corpus file {path} does not exist: check the path, "
                           f"or use a known corpus ({known})")
    elif not path.is_file():
        raise CharRNNError(f"corpus {path} is not a regular file: give a text file")
    if path.stat().st_size == 0:
        raise CharRNNError(f"corpus file {path} is empty: give a file with some text in it")
    return path


# ----------------------------------------------------------------------------- shared plumbing

def _ensure_writable_dir(directory):
    """Create `directory` and prove a file can be written in it, before any expensive work."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=directory):
            pass
    except OSError as error:
        raise CharRNNError(
            f"cannot write to data directory {directory}: {error.strerror or error}; "
            f"pass --data-dir with a writable directory or fix its permissions"
        ) from None


def _unlink_quietly(path):
    try:
        path.unlink()
    except OSError:
        pass


# ----------------------------------------------------------------------------- linux_kernel

class _KernelSource:
    """Where linux_kernel text comes from: a directory tree, a tarball, or the UAPI headers."""

    def __init__(self, kind, label, roots=(), tarball=None):
        self.kind = kind          # "directory", "tarball" or "uapi-headers"
        self.label = label        # what the manifest records as "source"
        self.roots = list(roots)  # directories to walk (directory, uapi-headers)
        self.tarball = tarball
        self._files = None

    def fingerprint(self):
        """A digest of what the source holds now, cheap enough to check on every run."""
        digest = hashlib.sha256()
        if self.tarball is not None:
            stat = self.tarball.stat()
            digest.update(f"{stat.st_size}\t{stat.st_mtime_ns}".encode())
        else:
            for key, path in self.files():
                stat = path.stat()
                digest.update(f"{key}\t{stat.st_size}\t{stat.st_mtime_ns}\n".encode())
        return digest.hexdigest()

    def files(self):
        """(sort key, path) of every regular .c/.h file under the roots, sorted by key.

        The key is the path relative to the root for one tree, and root-qualified for the UAPI
        headers, whose roots are separate directories. Symlinks are skipped, as in a tarball.
        Walked once and remembered.
        """
        if self._files is not None:
            return self._files
        found = []
        for root in self.roots:
            prefix = "" if self.kind == "directory" else f"{root.as_posix()}/"
            for directory, subdirs, names in os.walk(root):
                subdirs.sort()
                for name in names:
                    if not name.endswith(SOURCE_SUFFIXES):
                        continue
                    path = Path(directory, name)
                    if path.is_symlink() or not path.is_file():
                        continue
                    found.append((prefix + path.relative_to(root).as_posix(), path))
        self._files = sorted(found)
        return self._files


def _is_tarball(path):
    return path.name.endswith(TARBALL_SUFFIXES)


def _version_key(path):
    return [int(number) for number in re.findall(r"\d+", path.name)], path.name


def _uapi_roots():
    roots, seen = [], set()
    for pattern in UAPI_ROOTS:
        for match in sorted(glob.glob(pattern)):
            path = Path(match)
            real = os.path.realpath(path)
            if path.is_dir() and real not in seen:
                seen.add(real)
                roots.append(path)
    return roots


def _find_kernel_source(source):
    """Pick the linux_kernel source: --source, else linux-source, else the UAPI headers."""
    if source is not None:
        path = user_path(source, "--source")
        if path.is_dir():
            return _KernelSource("directory", str(path.resolve()), roots=[path])
        if path.is_file() and _is_tarball(path):
            return _KernelSource("tarball", str(path.resolve()), tarball=path)
        if path.exists():
            raise CharRNNError(f"--source {path} is neither a directory nor a tarball "
                               f"({', '.join(TARBALL_SUFFIXES)}): pass a kernel tree or tarball")
        raise CharRNNError(f"--source {path} does not exist: pass a kernel source directory "
                           f"or tarball ({', '.join(TARBALL_SUFFIXES)})")
    tarballs = [Path(match) for match in glob.glob(LINUX_SOURCE_GLOB)]
    tarballs = [path for path in tarballs if path.is_file() and _is_tarball(path)]
    if tarballs:
        newest = max(tarballs, key=_version_key)
        return _KernelSource("tarball", str(newest.resolve()), tarball=newest)
    roots = _uapi_roots()
    if roots:
        return _KernelSource("uapi-headers", [str(root) for root in roots], roots=roots)
    raise CharRNNError("no Linux kernel source found: install linux-libc-dev or linux-source, "
                       "or pass --source PATH to a kernel tree or tarball")


def _decode_source_file(raw):
    """Source bytes as text: UTF-8, or Latin-1 for the odd file that is not (second item True)."""
    try:
        return raw.decode("utf-8"), False
    except UnicodeDecodeError:
        return raw.decode("latin-1"), True


def _read_source_file(path):
    try:
        return path.read_bytes()
    except OSError as error:
        raise CharRNNError(f"cannot read kernel source file {path}: {error.strerror or error}; "
                           f"fix its permissions or pass --source to another tree") from None


def _concatenate(contents, max_bytes):
    """Join decoded files in order, capped at max_bytes characters.

    `contents` yields each file's bytes. Past the cap, cut at the last file boundary if that keeps
    at least half the cap, else cut inside the file at exactly max_bytes. Returns
    (text, files used, Latin-1 files, whether the cap was reached).
    """
    pieces, total, latin1_files = [], 0, 0
    for raw in contents:
        text, is_latin1 = _decode_source_file(raw)
        if max_bytes is not None and total + len(text) > max_bytes:
            if total * 2 < max_bytes:
                pieces.append(text[:max_bytes - total])
                latin1_files += is_latin1
            return "".join(pieces), len(pieces), latin1_files, True
        pieces.append(text)
        total += len(text)
        latin1_files += is_latin1
    return "".join(pieces), len(pieces), latin1_files, total == max_bytes


def _tar_error(path, error):
    return CharRNNError(f"cannot read tarball {path}: {error}; check that it is a complete "
                        f"{', '.join(TARBALL_SUFFIXES)} file")


_TAR_ERRORS = (tarfile.TarError, OSError, EOFError, lzma.LZMAError, zlib.error)


def _tar_sources(path, wanted=None):
    """{member name: bytes} of the regular .c/.h members (those in `wanted`, if given).

    Reads the archive once as a stream: random access into a compressed tarball would
    decompress it again for every member.
    """
    contents = {}
    try:
        with tarfile.open(path, "r|*") as tar:
            for member in tar:
                if not (member.isreg() and member.name.endswith(SOURCE_SUFFIXES)):
                    continue
                if wanted is None or member.name in wanted:
                    contents[member.name] = tar.extractfile(member).read()
    except _TAR_ERRORS as error:
        raise _tar_error(path, error) from None
    return contents


def _tar_sizes(path):
    """[(member name, size)] of the regular .c/.h members, sorted by name, without the data."""
    sizes = {}
    try:
        with tarfile.open(path, "r|*") as tar:
            for member in tar:
                if member.isreg() and member.name.endswith(SOURCE_SUFFIXES):
                    sizes[member.name] = member.size
    except _TAR_ERRORS as error:
        raise _tar_error(path, error) from None
    return sorted(sizes.items())


def _concatenate_tarball(path, max_bytes):
    """_concatenate over a tarball's sources in member-name order; file count 0 if none."""
    if max_bytes is None:
        contents = _tar_sources(path)
        return _concatenate((contents[name] for name in sorted(contents)), None)
    members = _tar_sizes(path)
    # Read only a sorted prefix holding about max_bytes; characters never outnumber bytes, so
    # a prefix can only fall short on multi-byte text, and then a longer one is read.
    budget = max_bytes
    while True:
        prefix, size = [], 0
        for name, member_size in members:
            if size >= budget:
                break
            prefix.append(name)
            size += member_size
        contents = _tar_sources(path, wanted=set(prefix))
        result = _concatenate((contents[name] for name in prefix), max_bytes)
        if result[3] or len(prefix) == len(members):
            return result
        budget *= 2


def _read_manifest(path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def build_linux_kernel(data_dir, source=None, max_bytes=None, log=print) -> Path:
    """Build (or reuse) data_dir/linux_kernel/input.txt from kernel .c/.h files.

    Sources, first found wins: `source` (a kernel tree or tarball), the newest
    LINUX_SOURCE_GLOB tarball, the UAPI_ROOTS header directories. Files are concatenated in sorted
    path order (member-name order for tarballs, read without extracting), each decoded as UTF-8
    or else Latin-1, and capped at `max_bytes` characters. Same sources, same bytes.
    """
    if max_bytes is not None and (isinstance(max_bytes, bool) or not isinstance(max_bytes, int)
                                  or max_bytes <= 0):
        raise UsageError(f"--max-bytes must be a positive whole number of characters, "
                         f"got {max_bytes!r}: pass e.g. --max-bytes 10000000")
    directory = Path(data_dir) / "linux_kernel"
    target, manifest_path = directory / "input.txt", directory / "manifest.json"
    found = _find_kernel_source(source)
    wanted = {"format": MANIFEST_FORMAT, "source": found.label, "kind": found.kind,
              "fingerprint": found.fingerprint(), "max_bytes": max_bytes}

    manifest = _read_manifest(manifest_path) if manifest_path.is_file() else None
    if (manifest is not None and all(manifest.get(key) == value for key, value in wanted.items())
            and target.is_file() and sha256_file(target) == manifest.get("sha256")):
        log(f"reusing {target} ({manifest['file_count']} files, {manifest['bytes']} bytes)")
        return target

    label = ", ".join(found.label) if isinstance(found.label, list) else found.label
    where = f"--source {source}" if source is not None else f"{found.kind} {label}"
    no_sources = CharRNNError(f"{where} has no .c or .h files: point --source at a kernel "
                              f"source tree or tarball")
    if found.tarball is None and not found.files():
        raise no_sources
    _ensure_writable_dir(directory)
    log(f"building {target} from {found.kind} {label}")
    if found.tarball is not None:
        text, file_count, latin1_files, truncated = _concatenate_tarball(found.tarball,
                                                                         max_bytes)
        if file_count == 0:
            raise no_sources
    else:
        text, file_count, latin1_files, truncated = _concatenate(
            (_read_source_file(path) for _, path in found.files()), max_bytes)

    data = text.encode("utf-8")
    manifest = dict(wanted, corpus="linux_kernel", file_count=file_count,
                    latin1_files=latin1_files, chars=len(text), bytes=len(data),
                    truncated=truncated, sha256=hashlib.sha256(data).hexdigest())
    # input.txt first: a crash before the manifest lands leaves a sha256 mismatch, so a rebuild.
    write_atomic(target, data)
    write_atomic(manifest_path, (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode())
    log(f"wrote {target}: {file_count} files, {len(data)} bytes"
        + (f", {latin1_files} read as Latin-1" if latin1_files else ""))
    return target


# ----------------------------------------------------------------------------- shakespeare

def _as_url(url):
    """Accept a plain local path where a URL is expected."""
    path = None if "://" in url else user_path(url, "--url")
    return path.resolve().as_uri() if path is not None and path.exists() else url


def _download(url, file):
    """Copy `url` into the open binary `file`; return the sha256 of what was copied."""
    limit = 2 * SHAKESPEARE_CHARS
    digest, size = hashlib.sha256(), 0
    try:
        with urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S) as response:
            for chunk in iter(lambda: response.read(_CHUNK), b""):
                size += len(chunk)
                if size > limit:
                    raise CharRNNError(
                        f"{url} is over {limit} bytes but tiny-shakespeare is "
                        f"{SHAKESPEARE_CHARS}: set {SHAKESPEARE_URL_ENV} to the right file")
                digest.update(chunk)
                file.write(chunk)
    except (OSError, ValueError, http.client.HTTPException) as error:
        reason = getattr(error, "reason", None) or error
        raise CharRNNError(
            f"cannot download tiny-shakespeare from {url}: {reason}; check the network, or set "
            f"{SHAKESPEARE_URL_ENV} to a local copy (e.g. file:///path/to/input.txt)"
        ) from None
    return digest.hexdigest()


def fetch_shakespeare(data_dir, url=None, log=print) -> Path:
    """Fetch (or reuse) data_dir/shakespeare/input.txt, verified against SHAKESPEARE_SHA256.

    The URL is `url`, else $TF_CHARRNN_SHAKESPEARE_URL, else SHAKESPEARE_URL; file:// works.
    A failed or corrupt download leaves nothing behind and any existing good file untouched.
    """
    directory = Path(data_dir) / "shakespeare"
    target = directory / "input.txt"
    if target.is_file() and sha256_file(target) == SHAKESPEARE_SHA256:
        log(f"reusing {target} (sha256 verified)")
        return target

    _ensure_writable_dir(directory)
    url = _as_url(url or os.environ.get(SHAKESPEARE_URL_ENV) or SHAKESPEARE_URL)
    log(f"downloading tiny-shakespeare from {url}")
    file, temp = temp_file_beside(directory / target.name)
    try:
        with file:
            got = _download(url, file)
        if got != SHAKESPEARE_SHA256:
            raise CharRNNError(
                f"download from {url} has sha256 {got}, expected {SHAKESPEARE_SHA256}: it is "
                f"not tiny-shakespeare or is corrupt; retry, or set {SHAKESPEARE_URL_ENV} to a "
                f"good copy"
            )
        os.chmod(temp, 0o644)
        os.replace(temp, target)
    except BaseException:
        _unlink_quietly(temp)
        raise
    return target
