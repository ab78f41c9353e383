"""The memory check: what is available (the machine's, or a container's cgroup limit) and the
one-line refusal."""

import pytest

from tf_charrnn import memory
from tf_charrnn.errors import CharRNNError

MIB = 2 ** 20


def fake_cgroup(root, proc_line, directory, files):
    (root / "proc/self").mkdir(parents=True)
    (root / "proc/self/cgroup").write_text(proc_line + "\n")
    path = root / directory
    path.mkdir(parents=True)
    for name, text in files.items():
        (path / name).write_text(text)
    return root


def test_cgroup_v2_headroom_is_the_limit_less_what_the_group_holds_but_its_dropable_cache(
        tmp_path):
    root = fake_cgroup(tmp_path, "0::/box", "sys/fs/cgroup/box",
                       {"memory.max": f"{4096 * MIB}\n", "memory.current": f"{3000 * MIB}\n",
                        "memory.stat": f"anon 1\ninactive_file {1000 * MIB}\n"})
    assert memory._cgroup_headroom(root) == (4096 - 3000 + 1000) * MIB


def test_cgroup_v1_limit_is_read_where_the_group_is_mounted_at_its_root(tmp_path):
    # Inside a container the group's own directory is often mounted as the controller's root.
    root = fake_cgroup(tmp_path, "4:memory:/docker/abc", "sys/fs/cgroup/memory",
                       {"memory.limit_in_bytes": f"{2048 * MIB}", "memory.usage_in_bytes":
                        f"{2000 * MIB}", "memory.stat": f"total_inactive_file {500 * MIB}\n"})
    assert memory._cgroup_headroom(root) == (2048 - 2000 + 500) * MIB


@pytest.mark.parametrize("proc_line, directory, files", [
    ("0::/", "sys/fs/cgroup", {"memory.max": "max", "memory.current": "5", "memory.stat": ""}),
    ("4:memory:/", "sys/fs/cgroup/memory", {"memory.limit_in_bytes": "9223372036854771712",
                                            "memory.usage_in_bytes": "5", "memory.stat": ""}),
    ("0::/", "sys/fs/unrelated", {}),
])
def test_no_cgroup_limit_means_no_headroom_figure(tmp_path, proc_line, directory, files):
    assert memory._cgroup_headroom(fake_cgroup(tmp_path, proc_line, directory, files)) is None


def test_available_memory_is_the_smaller_of_the_machines_and_the_cgroups(monkeypatch):
    machine = memory.available_memory_bytes()
    monkeypatch.setattr(memory, "_cgroup_headroom", lambda: None)
    if machine is None:
        pytest.skip("no /proc/meminfo here")
    assert memory.available_memory_bytes() > 0
    monkeypatch.setattr(memory, "_cgroup_headroom", lambda: 123 * MIB)
    assert memory.available_memory_bytes() == 123 * MIB


def test_check_fits_refuses_in_one_line_naming_what_and_the_fix():
    memory.check_fits(100 * MIB, "the thing", "make it smaller", available=200 * MIB)
    with pytest.raises(CharRNNError) as caught:
        memory.check_fits(3 * 2 ** 30, "the thing", "make it smaller", available=2 ** 30)
    assert str(caught.value) == ("the thing need about 3.0 GiB, more than the 1.0 GiB of memory "
                                 "available: make it smaller")
