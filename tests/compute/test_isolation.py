"""What a container must never reach: host paths through cwd, mounts or symlinks."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest

import pyhcs

from .conftest import run

Make = Callable[..., pyhcs.Container]


def test_cwd_cannot_leave_the_root(make_container: Make) -> None:
    c = make_container()
    c.start()
    code, out, _ = run(c, "sh -c 'pwd; ls /'", working_directory="/../../..")
    assert code == 0
    lines = out.decode().split()
    assert lines[0] == "/"
    assert "busybox" not in lines and "bin" in lines
    host_only = set(os.listdir("/")) - {"bin", "dev", "etc", "home", "proc", "root", "sys",
                                         "tmp", "usr", "var"}
    assert host_only and not host_only & set(lines[1:])


def test_sysfs_and_mqueue_are_the_containers_own(make_container: Make) -> None:
    # the supervisor mounts them, from the host's namespaces; each must show the
    # container's network and ipc namespaces (pid 1's), not the host's
    a, b = make_container(), make_container()
    for c in (a, b):
        c.start()
        c.create_process(pyhcs.ProcessConfig(command_line="sleep 60"))
    assert run(a, "ls /sys/class/net")[1].split() == [b"lo"]
    assert len(os.listdir("/sys/class/net")) > 1  # the host has more than lo
    code, out, _ = run(a, "sh -c 'touch /dev/mqueue/pyhcs-q && ls /dev/mqueue'")
    assert (code, out) == (0, b"pyhcs-q\n")  # a message queue in a's ipc namespace...
    assert run(b, "ls /dev/mqueue") == (0, b"", b"")  # ...is not b's
    assert not os.path.exists("/dev/mqueue/pyhcs-q")  # (nor the host's, if it has one)


def test_cwd_through_proc_fd_is_refused(make_container: Make) -> None:
    c = make_container()
    c.start()
    p = c.create_process(pyhcs.ProcessConfig(command_line="pwd",
                                             working_directory="/proc/self/fd/3"))
    assert p.exec_error  # no host fd is open at that point, so nothing to enter
    assert p.wait(10) == pyhcs.WAIT_ERR_EXEC_FAILED


def test_mapped_directory_read_only(make_container: Make, tmp_path: Path) -> None:
    (tmp_path / "data.txt").write_text("host data\n")
    c = make_container(mapped_directories=[
        pyhcs.MappedDir(host_path=str(tmp_path), container_path="/mnt/ro", read_only=True)])
    c.start()
    code, out, _ = run(c, "sh -c 'cat /mnt/ro/data.txt; echo x > /mnt/ro/new'")
    assert out == b"host data\n"
    assert code != 0
    assert not (tmp_path / "new").exists()


def test_mapped_directory_writable(make_container: Make, tmp_path: Path) -> None:
    c = make_container(mapped_directories=[
        pyhcs.MappedDir(host_path=str(tmp_path), container_path="/mnt/rw")])
    c.start()
    assert run(c, "sh -c 'echo from-container > /mnt/rw/out'")[0] == 0
    assert (tmp_path / "out").read_text() == "from-container\n"


def _victim_and_source(tmp_path: Path) -> tuple[Path, Path]:
    """A host directory that must stay empty, and a source directory holding `marker`."""
    victim = tmp_path / "victim"
    victim.mkdir()
    src = tmp_path / "src"
    src.mkdir()
    (src / "marker").write_text("m")
    return victim, src


def test_mount_target_with_dotdot_stays_inside(make_container: Make, tmp_path: Path) -> None:
    """`..` in a mount target cannot climb out of the rootfs onto a host path."""
    host_victim, src = _victim_and_source(tmp_path)
    c = make_container(mapped_directories=[
        pyhcs.MappedDir(host_path=str(src), container_path=f"/tmp/../../{host_victim}/x")])
    c.start()
    code, out, _ = run(c, f"ls {host_victim}/x")
    assert code == 0 and out == b"marker\n"
    assert list(host_victim.iterdir()) == []  # nothing was created or mounted on the host


def test_proc_masked_and_sys_read_only(make_container: Make) -> None:
    c = make_container()
    c.start()
    _, out, err = run(c, "sh -c 'cat /proc/kcore | wc -c; touch /sys/x; echo 1 > "
                            "/proc/sys/kernel/domainname; cat /proc/self/status'")
    if os.path.exists("/proc/kcore"):  # this kernel may have none (no CONFIG_PROC_KCORE)
        assert out.split()[0] == b"0"  # /dev/null over kcore
    assert b"Read-only file system" in err
    status = out.decode()
    assert "NoNewPrivs:\t1" in status
    capbnd = int(status.split("CapBnd:")[1].split()[0], 16)
    assert capbnd & (1 << 21) == 0  # CAP_SYS_ADMIN is gone
    assert capbnd & (1 << 19) == 0  # CAP_SYS_PTRACE is gone


def test_unsupported_fields_are_named(make_container: Make) -> None:
    with pytest.raises(pyhcs.NotSupportedError, match="HvPartition"):
        make_container(hv_partition=True)


def test_failed_create_leaves_nothing(make_container: Make) -> None:
    before = set(os.listdir("/proc/self/fd"))
    with pytest.raises(pyhcs.InvalidConfigError):
        make_container(processor_maximum=500)
    assert pyhcs.get_containers() == []
    assert set(os.listdir("/proc/self/fd")) <= before | {str(max(map(int, before)) + 1)}


def test_mount_target_through_absolute_symlink_stays_inside(make_container: Make,
                                                            tmp_path: Path) -> None:
    """A symlink `esc -> /` in one mount must not lead a later mount onto the host."""
    linkdir = tmp_path / "links"
    linkdir.mkdir()
    (linkdir / "esc").symlink_to("/")
    victim, src = _victim_and_source(tmp_path)
    c = make_container(mapped_directories=[
        pyhcs.MappedDir(host_path=str(linkdir), container_path="/mnt/links"),
        pyhcs.MappedDir(host_path=str(src), container_path=f"/mnt/links/esc{victim}/x"),
    ])
    c.start()
    code, out, _ = run(c, f"ls {victim}/x")
    assert code == 0 and out == b"marker\n"  # resolved inside the container's root
    assert list(victim.iterdir()) == []
