"""Corpus name or path -> input.txt: linux_kernel builds, shakespeare fetches, bad inputs."""

import hashlib
import io
import json
import tarfile
from pathlib import Path

import pytest

from tf_charrnn import corpora
from tf_charrnn.corpora import (
    KNOWN_CORPORA,
    SHAKESPEARE_SHA256,
    build_linux_kernel,
    fetch_shakespeare,
    resolve_corpus,
)
from tf_charrnn.errors import CharRNNError, UsageError

SHAKESPEARE_COPY = Path(__file__).resolve().parents[2] / "shared/data/tinyshakespeare/input.txt"

# A fake kernel tree: relative path -> bytes. "a-b/" sorts before "a/" as a string ('-' < '/'),
# which is the order the builder promises; the Latin-1 file is not UTF-8.
KERNEL_FILES = {
    "kernel/sched/core.c": b"/* scheduler */\nint schedule(void) { return 0; }\n",
    "include/linux/list.h": b"#ifndef _LIST_H\n#define _LIST_H\nstruct list_head;\n#endif\n",
    "a/y.c": b"int y;\n",
    "a-b/z.h": b"#define Z 1\n",
    "drivers/net/cafe.c": b"/* d\xe9j\xe0 vu, Latin-1 */\nint cafe;\n",
    "init/main.c": b"int main(void) { return 0; }\n",
    "Makefile": b"obj-y += main.o\n",
    "README": b"not source\n",
    "arch/x86/boot/head.S": b"/* assembly is not .c/.h */\n",
}
KERNEL_SOURCES = sorted(name for name in KERNEL_FILES if name.endswith((".c", ".h")))


def expected_kernel_text(names=KERNEL_SOURCES):
    parts = []
    for name in names:
        raw = KERNEL_FILES[name]
        try:
            parts.append(raw.decode("utf-8"))
        except UnicodeDecodeError:
            parts.append(raw.decode("latin-1"))
    return "".join(parts)


def quiet(*_):
    pass


@pytest.fixture
def logs():
    return []


@pytest.fixture
def kernel_tree(tmp_path):
    root = tmp_path / "linux-9.9"
    for name, data in KERNEL_FILES.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return root


def make_tarball(path, files, top="linux-9.9"):
    """A tarball of `files` under `top/`, members added in reverse order to prove sorting."""
    mode = {".xz": "w:xz", ".gz": "w:gz", ".bz2": "w:bz2", ".tar": "w"}[path.suffix]
    with tarfile.open(path, mode) as tar:
        for name in sorted(files, reverse=True):
            info = tarfile.TarInfo(f"{top}/{name}")
            info.size = len(files[name])
            info.mtime = 0
            tar.addfile(info, io.BytesIO(files[name]))
    return path


@pytest.fixture
def no_system_sources(monkeypatch, tmp_path):
    """Hide this machine's linux-source tarballs and UAPI headers from the builder."""
    monkeypatch.setattr(corpora, "LINUX_SOURCE_GLOB", str(tmp_path / "none/*/*.tar.*"))
    monkeypatch.setattr(corpora, "UAPI_ROOTS", (str(tmp_path / "none/linux"),))


def read_manifest(data_dir):
    return json.loads((data_dir / "linux_kernel/manifest.json").read_text())


# ----------------------------------------------------------------------------- linux_kernel

def test_kernel_tree_concatenates_c_and_h_files_in_sorted_path_order(kernel_tree, tmp_path):
    path = build_linux_kernel(tmp_path / "data", source=kernel_tree, log=quiet)
    assert path == tmp_path / "data/linux_kernel/input.txt"
    assert KERNEL_SOURCES[:3] == ["a-b/z.h", "a/y.c", "drivers/net/cafe.c"]
    assert path.read_text(encoding="utf-8") == expected_kernel_text()


def test_kernel_manifest_records_source_counts_and_checksum(kernel_tree, tmp_path):
    path = build_linux_kernel(tmp_path / "data", source=kernel_tree, log=quiet)
    manifest = read_manifest(tmp_path / "data")
    data = path.read_bytes()
    assert manifest["source"] == str(kernel_tree.resolve())
    assert manifest["kind"] == "directory"
    assert manifest["file_count"] == len(KERNEL_SOURCES) == 6
    assert manifest["latin1_files"] == 1
    assert manifest["bytes"] == len(data)
    assert manifest["sha256"] == hashlib.sha256(data).hexdigest()
    assert manifest["max_bytes"] is None
    assert manifest["truncated"] is False


def test_kernel_build_is_deterministic_and_reused(kernel_tree, tmp_path, logs):
    first = build_linux_kernel(tmp_path / "one", source=kernel_tree, log=quiet).read_bytes()
    second = build_linux_kernel(tmp_path / "two", source=kernel_tree, log=quiet).read_bytes()
    assert first == second
    assert read_manifest(tmp_path / "one")["sha256"] == read_manifest(tmp_path / "two")["sha256"]
    build_linux_kernel(tmp_path / "one", source=kernel_tree, log=logs.append)
    assert logs and logs[0].startswith("reusing ")


def test_kernel_is_rebuilt_when_input_changed_or_options_differ(kernel_tree, tmp_path, logs):
    path = build_linux_kernel(tmp_path / "data", source=kernel_tree, log=quiet)
    good = path.read_bytes()
    path.write_bytes(b"tampered")
    build_linux_kernel(tmp_path / "data", source=kernel_tree, log=logs.append)
    assert logs[0].startswith("building ") and path.read_bytes() == good
    build_linux_kernel(tmp_path / "data", source=kernel_tree, max_bytes=40, log=quiet)
    assert read_manifest(tmp_path / "data")["max_bytes"] == 40
    assert len(path.read_text(encoding="utf-8")) <= 40  # characters, not bytes


@pytest.mark.parametrize("suffix", [".tar.gz", ".tar.xz"])
def test_kernel_tarball_gives_the_same_text_as_the_tree(suffix, tmp_path):
    tarball = make_tarball(tmp_path / f"linux-9.9{suffix}", KERNEL_FILES)
    path = build_linux_kernel(tmp_path / "data", source=tarball, log=quiet)
    assert path.read_text(encoding="utf-8") == expected_kernel_text()
    manifest = read_manifest(tmp_path / "data")
    assert manifest["kind"] == "tarball"
    assert manifest["source"] == str(tarball.resolve())
    assert manifest["file_count"] == 6 and manifest["latin1_files"] == 1
    sha = manifest["sha256"]
    again = build_linux_kernel(tmp_path / "again", source=tarball, log=quiet)
    assert again.read_bytes() == path.read_bytes()
    assert read_manifest(tmp_path / "again")["sha256"] == sha
    assert not list(tmp_path.glob("data/linux_kernel/**/*.c"))  # nothing extracted


def test_max_bytes_cuts_at_a_file_boundary_when_that_keeps_most_of_the_cap(kernel_tree,
                                                                          tmp_path):
    whole = expected_kernel_text()
    two_files = expected_kernel_text(KERNEL_SOURCES[:2])
    cap = len(two_files) + 5  # the third file does not fit; two files are over half the cap
    path = build_linux_kernel(tmp_path / "data", source=kernel_tree, max_bytes=cap, log=quiet)
    assert path.read_text(encoding="utf-8") == two_files
    manifest = read_manifest(tmp_path / "data")
    assert manifest["file_count"] == 2 and manifest["truncated"] is True
    assert len(whole) > cap


def test_max_bytes_cuts_inside_a_file_when_no_boundary_is_close(kernel_tree, tmp_path):
    # The first two files hold 19 characters, under half of 50: cut the third file instead.
    assert len(expected_kernel_text(KERNEL_SOURCES[:2])) == 19
    path = build_linux_kernel(tmp_path / "data", source=kernel_tree, max_bytes=50, log=quiet)
    text = path.read_text(encoding="utf-8")
    assert text == expected_kernel_text()[:50]
    manifest = read_manifest(tmp_path / "data")
    assert manifest["chars"] == 50 and manifest["file_count"] == 3
    assert manifest["latin1_files"] == 1 and manifest["truncated"] is True


@pytest.mark.parametrize("cap", [5, 30, 50, 100])
def test_max_bytes_cap_is_the_same_for_tree_and_tarball(cap, kernel_tree, tmp_path):
    tarball = make_tarball(tmp_path / "linux-9.9.tar.gz", KERNEL_FILES)
    from_tree = build_linux_kernel(tmp_path / "tree", source=kernel_tree, max_bytes=cap,
                                   log=quiet)
    from_tar = build_linux_kernel(tmp_path / "tar", source=tarball, max_bytes=cap, log=quiet)
    assert from_tar.read_bytes() == from_tree.read_bytes()
    assert len(from_tree.read_text(encoding="utf-8")) <= cap


def test_multibyte_text_cap_reads_enough_of_a_tarball(tmp_path):
    # 40 bytes of "é" are only 20 characters, so a 40-byte prefix of members is not enough.
    files = {"a.c": "é".encode() * 20, "b.c": b"x" * 30, "c.h": b"y" * 30}
    tree = tmp_path / "tree"
    tree.mkdir()
    for name, data in files.items():
        (tree / name).write_bytes(data)
    tarball = make_tarball(tmp_path / "t.tar.xz", files)
    from_tree = build_linux_kernel(tmp_path / "one", source=tree, max_bytes=40, log=quiet)
    from_tar = build_linux_kernel(tmp_path / "two", source=tarball, max_bytes=40, log=quiet)
    assert from_tree.read_text(encoding="utf-8") == "é" * 20
    assert from_tar.read_bytes() == from_tree.read_bytes()


def test_newest_linux_source_tarball_is_used_without_source(tmp_path, monkeypatch):
    for version, body in (("6.9", b"int old;\n"), ("6.10", b"int new;\n")):
        folder = tmp_path / f"usr/src/linux-source-{version}"
        folder.mkdir(parents=True)
        make_tarball(folder / f"linux-source-{version}.tar.xz", {"k.c": body})
    monkeypatch.setattr(corpora, "LINUX_SOURCE_GLOB",
                        str(tmp_path / "usr/src/linux-source-*/linux-source-*.tar.*"))
    path = build_linux_kernel(tmp_path / "data", log=quiet)
    assert path.read_text() == "int new;\n"
    assert read_manifest(tmp_path / "data")["source"].endswith("linux-source-6.10.tar.xz")


def test_uapi_headers_are_the_fallback(tmp_path, monkeypatch, no_system_sources):
    include = tmp_path / "include"
    (include / "linux").mkdir(parents=True)
    (include / "linux/types.h").write_text("typedef int __s32;\n")
    (include / "x86_64-linux-gnu/asm").mkdir(parents=True)
    (include / "x86_64-linux-gnu/asm/unistd.h").write_text("#define __NR_read 0\n")
    (include / "x86_64-linux-gnu/asm/notes.txt").write_text("skipped\n")
    monkeypatch.setattr(corpora, "UAPI_ROOTS", (str(include / "linux"), str(include / "*/asm"),
                                                str(include / "drm")))
    path = build_linux_kernel(tmp_path / "data", log=quiet)
    assert path.read_text() == "typedef int __s32;\n#define __NR_read 0\n"
    manifest = read_manifest(tmp_path / "data")
    assert manifest["kind"] == "uapi-headers"
    assert manifest["source"] == [str(include / "linux"), str(include / "x86_64-linux-gnu/asm")]
    assert manifest["file_count"] == 2


def test_no_kernel_source_says_how_to_get_one(tmp_path, no_system_sources):
    with pytest.raises(CharRNNError, match="no Linux kernel source found: install linux-libc-dev "
                                           "or linux-source, or pass --source PATH"):
        build_linux_kernel(tmp_path / "data", log=quiet)


def test_missing_source_path_is_a_clear_error(tmp_path):
    with pytest.raises(CharRNNError, match=r"--source .*nowhere does not exist: pass a kernel"):
        build_linux_kernel(tmp_path / "data", source=tmp_path / "nowhere", log=quiet)


def test_source_without_c_or_h_files_is_a_clear_error(tmp_path):
    empty_tree = tmp_path / "tree"
    empty_tree.mkdir()
    (empty_tree / "README").write_text("docs only\n")
    with pytest.raises(CharRNNError, match="has no .c or .h files: point --source at a kernel"):
        build_linux_kernel(tmp_path / "data", source=empty_tree, log=quiet)
    assert not (tmp_path / "data").exists()
    tarball = make_tarball(tmp_path / "docs.tar.gz", {"README": b"docs\n"})
    with pytest.raises(CharRNNError, match="has no .c or .h files"):
        build_linux_kernel(tmp_path / "data", source=tarball, log=quiet)


def test_source_that_is_not_a_tarball_is_a_clear_error(tmp_path):
    notes = tmp_path / "notes.zip"
    notes.write_bytes(b"PK")
    with pytest.raises(CharRNNError, match="is neither a directory nor a tarball"):
        build_linux_kernel(tmp_path / "data", source=notes, log=quiet)


def test_corrupt_tarball_is_a_clear_error(tmp_path):
    broken = tmp_path / "linux.tar.gz"
    broken.write_bytes(b"\x1f\x8b\x08\x00 definitely not gzip data")
    with pytest.raises(CharRNNError, match="cannot read tarball .*check that it is a complete"):
        build_linux_kernel(tmp_path / "data", source=broken, log=quiet)


def test_bad_max_bytes_is_a_usage_error(kernel_tree, tmp_path):
    with pytest.raises(UsageError, match="--max-bytes must be a positive whole number"):
        build_linux_kernel(tmp_path / "data", source=kernel_tree, max_bytes=0, log=quiet)


# ----------------------------------------------------------------------------- shakespeare

@pytest.fixture
def shakespeare_copy():
    if not SHAKESPEARE_COPY.is_file():
        pytest.skip(f"no local tiny-shakespeare at {SHAKESPEARE_COPY}")
    return SHAKESPEARE_COPY


def test_shakespeare_downloads_from_a_file_url_and_verifies(shakespeare_copy, tmp_path):
    path = fetch_shakespeare(tmp_path / "data", url=shakespeare_copy.as_uri(), log=quiet)
    assert path == tmp_path / "data/shakespeare/input.txt"
    assert path.read_bytes() == shakespeare_copy.read_bytes()
    assert len(path.read_text(encoding="utf-8")) == corpora.SHAKESPEARE_CHARS
    assert [p.name for p in path.parent.iterdir()] == ["input.txt"]


def test_shakespeare_already_there_is_reused_without_downloading(shakespeare_copy, tmp_path,
                                                                 logs):
    fetch_shakespeare(tmp_path / "data", url=shakespeare_copy.as_uri(), log=quiet)
    path = fetch_shakespeare(tmp_path / "data", url="file:///nonexistent/input.txt",
                             log=logs.append)
    assert logs == [f"reusing {path} (sha256 verified)"]


def test_shakespeare_url_comes_from_the_environment_unless_given(shakespeare_copy, tmp_path,
                                                                 monkeypatch):
    monkeypatch.setenv("TF_CHARRNN_SHAKESPEARE_URL", shakespeare_copy.as_uri())
    assert fetch_shakespeare(tmp_path / "env", log=quiet).is_file()
    monkeypatch.setenv("TF_CHARRNN_SHAKESPEARE_URL", "file:///nonexistent/input.txt")
    assert fetch_shakespeare(tmp_path / "arg", url=shakespeare_copy.as_uri(), log=quiet).is_file()


def test_shakespeare_checksum_mismatch_leaves_nothing_behind(tmp_path):
    fake = tmp_path / "fake.txt"
    fake.write_text("First Citizen:\nBefore we proceed any further, hear me speak.\n")
    fake_sha = hashlib.sha256(fake.read_bytes()).hexdigest()
    data_dir = tmp_path / "data"
    (data_dir / "shakespeare").mkdir(parents=True)
    existing = data_dir / "shakespeare/input.txt"
    existing.write_bytes(b"an older, unverified copy\n")
    with pytest.raises(CharRNNError) as caught:
        fetch_shakespeare(data_dir, url=fake.as_uri(), log=quiet)
    message = str(caught.value)
    assert "\n" not in message
    assert f"has sha256 {fake_sha}, expected {SHAKESPEARE_SHA256}" in message
    assert "TF_CHARRNN_SHAKESPEARE_URL" in message
    assert [p.name for p in existing.parent.iterdir()] == ["input.txt"]
    assert existing.read_bytes() == b"an older, unverified copy\n"


def test_shakespeare_download_failure_says_how_to_use_a_local_copy(tmp_path):
    with pytest.raises(CharRNNError, match="cannot download tiny-shakespeare from file:///nonexi"
                                           ".*set TF_CHARRNN_SHAKESPEARE_URL to a local copy"):
        fetch_shakespeare(tmp_path / "data", url="file:///nonexistent/input.txt", log=quiet)
    assert list((tmp_path / "data/shakespeare").iterdir()) == []


# ----------------------------------------------------------------------------- resolve_corpus

def test_known_corpora_are_listed_in_a_stable_order():
    assert KNOWN_CORPORA == ("linux_kernel", "shakespeare")


def test_text_file_path_resolves_to_itself(tmp_path):
    path = tmp_path / "novel.txt"
    path.write_text("Call me Ishmael.\n")
    assert resolve_corpus(str(path), tmp_path / "data") == path


def test_directory_with_input_txt_resolves_to_it(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine/input.txt").write_text("some text\n")
    assert resolve_corpus(str(tmp_path / "mine"), tmp_path / "data") == tmp_path / "mine/input.txt"


def test_known_names_build_or_fetch(kernel_tree, shakespeare_copy, tmp_path):
    kernel = resolve_corpus("linux_kernel", tmp_path / "data", source=str(kernel_tree),
                            max_bytes=1000, log=quiet)
    assert kernel == tmp_path / "data/linux_kernel/input.txt"
    shakespeare = resolve_corpus("shakespeare", tmp_path / "data", url=shakespeare_copy.as_uri(),
                                 log=quiet)
    assert shakespeare == tmp_path / "data/shakespeare/input.txt"


def test_directory_without_input_txt_is_a_clear_error(tmp_path):
    (tmp_path / "texts").mkdir()
    with pytest.raises(CharRNNError, match=r"directory .*texts has no input.txt: put your text "
                                           r"in .*texts/input.txt or pass the file itself"):
        resolve_corpus(str(tmp_path / "texts"), tmp_path / "data")


def test_missing_corpus_path_is_a_clear_error(tmp_path):
    with pytest.raises(CharRNNError, match=r"corpus file .*nope\.txt does not exist: check the "
                                           r"path, or use a known corpus \(linux_kernel, "):
        resolve_corpus(str(tmp_path / "nope.txt"), tmp_path / "data")


def test_unknown_corpus_name_lists_the_known_ones(tmp_path):
    with pytest.raises(CharRNNError) as caught:
        resolve_corpus("tolstoy", tmp_path / "data")
    assert str(caught.value) == ("unknown corpus 'tolstoy': known corpora are linux_kernel, "
                                 "shakespeare, or give a path to a text file")


def test_empty_corpus_file_is_a_clear_error(tmp_path):
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(CharRNNError, match=r"corpus file .*empty\.txt is empty: give a file with "
                                           r"some text in it"):
        resolve_corpus(str(tmp_path / "empty.txt"), tmp_path / "data")


def test_options_for_another_corpus_are_usage_errors(tmp_path):
    (tmp_path / "a.txt").write_text("text\n")
    with pytest.raises(UsageError, match="--source only applies to corpus linux_kernel, not "
                                         "'shakespeare': drop --source"):
        resolve_corpus("shakespeare", tmp_path / "data", source="/usr/src/linux")
    with pytest.raises(UsageError, match="--url only applies to corpus shakespeare"):
        resolve_corpus(str(tmp_path / "a.txt"), tmp_path / "data", url="file:///x")


@pytest.mark.parametrize("corpus", KNOWN_CORPORA)
def test_unwritable_data_dir_is_a_clear_error(corpus, kernel_tree, tmp_path):
    # chmod does not stop root, so make the data directory a regular file instead.
    data_dir = tmp_path / "data"
    data_dir.write_text("I am a file\n")
    options = {"source": str(kernel_tree)} if corpus == "linux_kernel" else {
        "url": "file:///never/fetched.txt"}
    with pytest.raises(CharRNNError) as caught:
        resolve_corpus(corpus, data_dir, log=quiet, **options)
    message = str(caught.value)
    assert message.startswith(f"cannot write to data directory {data_dir / corpus}: ")
    assert message.endswith("pass --data-dir with a writable directory or fix its permissions")


def test_real_uapi_headers_build_when_this_machine_has_them(tmp_path, monkeypatch):
    if not any(Path(p).is_dir() for p in ("/usr/include/linux", "/usr/include/asm-generic")):
        pytest.skip("no kernel UAPI headers installed (linux-libc-dev)")
    monkeypatch.setattr(corpora, "LINUX_SOURCE_GLOB", str(tmp_path / "none/*.tar.*"))
    path = build_linux_kernel(tmp_path / "data", max_bytes=200_000, log=quiet)
    text = path.read_text(encoding="utf-8")
    assert 100_000 <= len(text) <= 200_000
    assert "#define" in text


def test_a_corpus_under_an_unknown_users_home_is_one_error(tmp_path):
    with pytest.raises(CharRNNError, match="no such user's home directory; give the path in full"):
        resolve_corpus("~no_such_user_here/x.txt", tmp_path)
