"""Containers in a user namespace (``create_container(..., user_namespace=...)``) on the
real kernel, native and on crun: the container's root is an unprivileged host id,
the image reads as root's through id-mapped layers, and that root has no power over the
host."""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

import pyhcs
from pyhcs._paths import Roots

from .conftest import run

Make = Callable[..., pyhcs.Container]
BASE = 100000  # the host ids the namespace's 0.. map to
NS = pyhcs.UserNamespace(uid_map=(pyhcs.IdMapping(0, BASE, 65536),),
                         gid_map=(pyhcs.IdMapping(0, BASE, 65536),))


@pytest.fixture(params=["native", "crun"])
def started(request: pytest.FixtureRequest, make_container: Make,
            roots: Roots) -> Iterator[pyhcs.Container]:
    """A started container in NS whose pid 1 sleeps, so processes can be run in it."""
    if request.param != "native":
        # an OCI runtime sets the mounts up as the namespace's root: the run root must
        # be searchable by others (the test's private folder is 0700)
        os.chmod(roots.run_root.parent, 0o711)
    c = make_container(user_namespace=NS, runtime=request.param)
    c.start()
    init = c.create_process(pyhcs.ProcessConfig(command_line="sleep 60"))
    yield c
    init.close()


def _host_status(pid: int) -> dict[str, str]:
    with open(f"/proc/{pid}/status") as f:
        return dict(line.rstrip("\n").split(":\t", 1) for line in f if ":\t" in line)


def test_root_in_the_container_is_an_unprivileged_host_id(started: pyhcs.Container) -> None:
    code, out, err = run(started, "sh -c 'cat /proc/self/uid_map /proc/self/gid_map; id -u; "
                                  "id -g; stat -c %u:%g /bin/busybox /etc'")
    assert code == 0, err
    lines = out.decode().split("\n")
    assert [line.split() for line in lines[:2]] == [["0", str(BASE), "65536"]] * 2
    assert lines[2:6] == ["0", "0", "0:0", "0:0"]  # the image's files are root's in here
    # seen from the host, pid 1 (sleep) runs as the mapped id, not as root
    sleepers = [int(p) for p in os.listdir("/proc") if p.isdigit()
                and _cmdline(int(p)) == b"sleep\x0060\x00"
                and _host_status(int(p)).get("Uid", "").split()[0] == str(BASE)]
    assert sleepers, "pid 1 does not run as the mapped host id"


def _cmdline(pid: int) -> bytes:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read()
    except OSError:
        return b""


def test_root_writes_the_image_and_the_sandbox_stores_host_ids(
        started: pyhcs.Container, roots: object) -> None:
    code, _, err = run(started, "sh -c 'echo extra >> /etc/group && mkdir /made && "
                                "touch /made/file'")
    assert code == 0, err
    upper = Path(os.environ["PYHCS_ROOT"]) / "layers" / started.id / "upper"
    for rel in ("etc/group", "made", "made/file"):
        st = os.lstat(upper / rel)
        assert (st.st_uid, st.st_gid) == (BASE, BASE), rel
    # ...and read back inside as root's
    code, out, _ = run(started, "stat -c %u:%g /made/file /etc/group")
    assert (code, out.split()) == (0, [b"0:0", b"0:0"])


def test_a_non_root_user_has_no_capabilities(started: pyhcs.Container) -> None:
    code, out, _ = run(started, "sh -c 'grep -E \"^Cap(Prm|Eff|Amb)\" /proc/self/status; "
                                "touch /etc/x'", user="1000:1000")
    text = out.decode()
    assert re.findall(r"Cap(?:Prm|Eff|Amb):\s*([0-9a-f]+)", text) == ["0" * 16] * 3
    assert code != 0  # /etc is root's (the namespace's root) and 0755


def test_root_has_no_power_over_host_files(make_container: Make) -> None:
    host = Path(tempfile.mkdtemp(prefix="pyhcs-userns-"))
    try:
        os.chmod(host, 0o755)  # others may look in, not write
        (host / "secret").write_text("host only\n")
        os.chmod(host / "secret", 0o600)
        c = make_container(user_namespace=NS, mapped_directories=[
            pyhcs.MappedDir(host_path=str(host), container_path="/host")])
        c.start()
        init = c.create_process(pyhcs.ProcessConfig(command_line="sleep 60"))
        try:
            # a writable mapping, but the folder and file belong to the host's root,
            # which the namespace does not map: DAC_OVERRIDE does not reach them
            assert run(c, "cat /host/secret")[0] != 0
            assert run(c, "touch /host/new")[0] != 0
            assert run(c, "chmod 666 /host/secret")[0] != 0
            code, out, _ = run(c, "stat -c %u /host/secret")
            assert (code, out.strip()) == (0, b"65534")  # unmapped: the overflow id
            # the namespace's root cannot reach out of it either
            assert run(c, "hostname other")[0] != 0
        finally:
            init.close()
        assert sorted(os.listdir(host)) == ["secret"]
        assert (host / "secret").read_text() == "host only\n"
        assert os.stat(host / "secret").st_mode & 0o777 == 0o600
    finally:
        for name in os.listdir(host):
            os.unlink(host / name)
        os.rmdir(host)


def test_processes_joining_later_are_in_the_namespace_too(started: pyhcs.Container) -> None:
    code, out, _ = run(started, "sh -c 'readlink /proc/self/ns/user; readlink /proc/1/ns/user'")
    assert code == 0
    mine, pid1 = out.decode().split()
    assert mine == pid1
    assert mine != os.readlink("/proc/self/ns/user")


def test_sysfs_is_the_containers_own_and_read_only(started: pyhcs.Container) -> None:
    code, out, _ = run(started, "ls /sys/class/net")
    assert (code, out.split()) == (0, [b"lo"])  # its own network namespace's view
    assert run(started, "sh -c 'echo 1 > /sys/kernel/profiling'")[0] != 0


def test_user_namespace_needs_a_sandbox_pyhcs_makes_and_a_searchable_run_root(
        busybox: list[str], unique_id: str, roots: Roots) -> None:
    layers = [pyhcs.Layer(id=p.rsplit("/", 1)[-1], path=p) for p in busybox]
    # the test's private folder is 0700: no OCI runtime could reach the rootfs
    assert os.stat(roots.run_root.parent).st_mode & 0o777 == 0o700
    with pytest.raises(pyhcs.NotSupportedError, match="not searchable by others"):
        pyhcs.create_container(unique_id, pyhcs.ContainerConfig(layers=layers),
                               runtime="crun", user_namespace=NS)
    with pytest.raises(pyhcs.NotSupportedError, match="runc cannot"):
        pyhcs.create_container(unique_id, pyhcs.ContainerConfig(layers=layers),
                               runtime="runc", user_namespace=NS)
    with pytest.raises(pyhcs.NotSupportedError, match="sandbox that pyhcs prepares"):
        pyhcs.create_container(unique_id, pyhcs.ContainerConfig(
            layer_folder_path="/nonexistent/sandbox"), user_namespace=NS)
    with pytest.raises(pyhcs.InvalidConfigError, match="UserNamespace"):
        pyhcs.create_container(unique_id, pyhcs.ContainerConfig(layers=layers),
                               user_namespace=((0, BASE, 1),))  # type: ignore[arg-type]
    assert pyhcs.get_containers(pyhcs.ComputeSystemQuery(ids=[unique_id])) == []
