"""Regression tests for the known container-runtime escapes, on the real kernel.

Each test is named after what an untrusted image or program tries; each asserts both that
the attempt fails and that the host is unchanged (files hashed, directories listed).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

import pyhcs
from pyhcs._layers import DriverInfo, import_layer_from_tar
from pyhcs._runtime._spec import CAPABILITY_NUMBERS, DEFAULT_CAPABILITIES, MASKED_PATHS

from .conftest import run

Make = Callable[..., pyhcs.Container]


# -- crafted images -------------------------------------------------------------------------


def _tar(entries: list[tuple[str, str]]) -> bytes:
    """A layer tar of (path, symlink target) entries; a target of "" makes a directory."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as t:
        for name, target in entries:
            info = tarfile.TarInfo(name)
            if target:
                info.type = tarfile.SYMTYPE
                info.linkname = target
                info.mode = 0o777
            else:
                info.type = tarfile.DIRTYPE
                info.mode = 0o755
            t.addfile(info)
    return buf.getvalue()


@pytest.fixture
def crafted(busybox: list[str]) -> Iterator[Callable[..., pyhcs.Container]]:
    """Create containers whose image is busybox with a crafted layer on top (removed at
    teardown; the test's private store goes with the test)."""
    made: list[str] = []

    def make(entries: list[tuple[str, str]], **fields: object) -> pyhcs.Container:
        lid = "crafted-" + uuid.uuid4().hex[:12]
        path = import_layer_from_tar(DriverInfo(), lid, io.BytesIO(_tar(entries)), busybox)
        layers = [pyhcs.Layer(id=lid, path=path),
                  *(pyhcs.Layer(id=p.rsplit("/", 1)[-1], path=p) for p in busybox)]
        cid = "esc-" + uuid.uuid4().hex[:12]
        config = pyhcs.ContainerConfig(layers=layers, **fields)  # type: ignore[arg-type]
        c = pyhcs.create_container(cid, config)
        made.append(cid)
        return c

    yield make
    for cid in made:
        with contextlib.suppress(pyhcs.HcsError):
            pyhcs.remove_container(cid, force=True)


def _snapshot(d: Path) -> dict[str, tuple[int, int, bytes]]:
    """Every entry under *d* (no symlink followed): mode, size and content hash."""
    out: dict[str, tuple[int, int, bytes]] = {}
    for base, dirs, files in os.walk(d):
        for name in dirs + files:
            p = os.path.join(base, name)
            st = os.lstat(p)
            digest = b""
            if os.path.isfile(p) and not os.path.islink(p):
                digest = hashlib.sha256(Path(p).read_bytes()).digest()
            out[os.path.relpath(p, d)] = (st.st_mode, st.st_size, digest)
    return out


@pytest.fixture
def host_dir() -> Iterator[Path]:
    """A host directory under /run that a crafted image points its symlinks at."""
    d = Path("/run") / f"pyhcs-victim-{uuid.uuid4().hex[:8]}"
    d.mkdir()
    (d / "keep").write_text("host data\n")
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def _start_with_init(c: pyhcs.Container) -> pyhcs.Process:
    """Start *c* with a long-lived pid 1, so that several processes can run in it."""
    c.start()
    return c.create_process(pyhcs.ProcessConfig(command_line="sleep 300"))


def _start_and_probe(c: pyhcs.Container) -> None:
    """Start the container and run a process; either may be refused (HcsError)."""
    try:
        c.start()
    except pyhcs.HcsError:
        return
    try:
        p = c.create_process(pyhcs.ProcessConfig(
            command_line="sh -c 'echo x > /dev/null; ls /dev /proc >/dev/null; true'"))
        p.wait(30)
    except pyhcs.HcsError:
        pass


@pytest.mark.parametrize("name", ["dev", "proc", "sys"])
def test_absolute_symlink_to_host_dir_creates_nothing_on_the_host(
        crafted: Callable[..., pyhcs.Container], host_dir: Path, name: str) -> None:
    before = _snapshot(host_dir)
    c = crafted([(name, str(host_dir))])
    _start_and_probe(c)
    assert _snapshot(host_dir) == before
    mounts = Path("/proc/self/mountinfo").read_text()
    assert str(host_dir) not in mounts


@pytest.mark.parametrize(("name", "target"), [
    ("dev", "/tmp"), ("dev", "tmp"), ("proc", "/etc"), ("proc", "etc"), ("sys", "/etc"),
])
def test_symlinked_system_dir_is_refused(crafted: Callable[..., pyhcs.Container],
                                         name: str, target: str) -> None:
    c = crafted([(name, target)])
    with pytest.raises(pyhcs.ContainerError):
        c.start()


@pytest.mark.parametrize("target", ["keep", "/etc/passwd"])
def test_symlinked_dev_null_is_refused(crafted: Callable[..., pyhcs.Container],
                                       host_dir: Path, target: str) -> None:
    """An image whose /dev/null points at a host file is refused; the file is untouched."""
    victim = host_dir / "keep" if target == "keep" else Path(target)
    before = (_snapshot(host_dir), hashlib.sha256(Path("/etc/passwd").read_bytes()).digest())
    c = crafted([("dev", ""), ("dev/null", str(victim)), ("dev/pts", "/etc")])
    with pytest.raises(pyhcs.ContainerError, match="/dev/null is a symlink"):
        c.start()
    assert (_snapshot(host_dir), hashlib.sha256(Path("/etc/passwd").read_bytes()).digest()
            ) == before
    assert str(victim) not in Path("/proc/self/mountinfo").read_text()


def test_a_real_dev_directory_in_the_image_is_covered(crafted: Callable[..., pyhcs.Container]
                                                      ) -> None:
    """/dev is a fresh tmpfs: what the image's own /dev holds never comes into play."""
    c = crafted([("dev", ""), ("dev/pts", "/etc"), ("dev/zero", "/etc/passwd")])
    _start_with_init(c)
    code, out, _ = run(c, "sh -c 'echo x > /dev/null; stat -c %F,%t,%T /dev/null /dev/zero'")
    assert code == 0
    assert out == b"character special file,1,3\ncharacter special file,1,5\n"


# -- fds and working directories ----------------------------------------------------------


@pytest.mark.parametrize("n", range(0, 8))
def test_cwd_in_proc_self_fd_is_refused(make_container: Make, n: int) -> None:
    c = make_container()
    c.start()
    init = c.create_process(pyhcs.ProcessConfig(command_line="sleep 30"))
    p = c.create_process(pyhcs.ProcessConfig(command_line="pwd", create_std_out_pipe=True,
                                             working_directory=f"/proc/self/fd/{n}"))
    assert p.exec_error, "a process started in a /proc/self/fd directory"
    assert p.wait(10) == pyhcs.WAIT_ERR_EXEC_FAILED
    init.kill()
    init.wait(10)


def test_no_host_fd_in_pid_1(make_container: Make) -> None:
    leak = os.open("/", os.O_RDONLY | os.O_DIRECTORY)  # a host directory fd, inheritable
    os.set_inheritable(leak, True)
    try:
        c = make_container()
        c.start()
        init = c.create_process(pyhcs.ProcessConfig(command_line="sleep 30",
                                                    create_std_out_pipe=True))
        code, out, _ = run(c, "sh -c 'ls /proc/1/fd; echo --; ls -l /proc/1/fd /proc/self/fd'")
        assert code == 0, out
        fds, _, listing = out.decode().partition("--")
        assert sorted(fds.split()) == ["0", "1", "2"]
        # nothing points at a host directory, and ls's own fd 3 is its /proc directory
        targets = [line.split("->")[1].strip() for line in listing.splitlines() if "->" in line]
        assert all(t.startswith(("/dev/", "pipe:", "/proc/")) for t in targets), targets
        init.kill()
        assert init.wait(10) == 137
    finally:
        os.close(leak)


# -- host binaries through /proc/*/exe ------------------------------------------------------

_WRITE_EXES = ("sh -c 'n=0; while [ ! -e /stop ] && [ $n -lt 20000 ]; do n=$((n+1)); "
               "for p in /proc/[0-9]*; do "
               "(echo x >> $p/exe) 2>/dev/null && echo WROTE $p $(readlink $p/exe); "
               "(exec 3< $p/exe && readlink $p/exe | grep -qv busybox && echo READ $p) "
               "2>/dev/null; "
               "done; done; echo done $n'")


def _sha(path: str) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def test_host_binaries_cannot_be_written_through_proc_exe(make_container: Make,
                                                           busybox: list[str]) -> None:
    python = os.path.realpath(sys.executable)
    host_busybox = os.path.realpath("/bin/busybox")
    image_busybox = os.path.join(busybox[-1], "fs", "bin", "busybox")
    before = {f: _sha(f) for f in (python, host_busybox, image_busybox)}
    c = make_container()
    c.start()
    init = c.create_process(pyhcs.ProcessConfig(command_line="sleep 300"))
    attacker = c.create_process(pyhcs.ProcessConfig(command_line=_WRITE_EXES,
                                                    create_std_out_pipe=True))
    _, out, _ = attacker.stdio()
    assert out is not None
    # spawn processes while the attacker sweeps /proc: each is the host's Python binary
    # between fork and exec
    for _ in range(40):
        assert run(c, "true")[0] == 0
    assert run(c, "touch /stop")[0] == 0
    report = out.read().decode()
    out.close()
    assert attacker.wait(60) == 0
    assert "WROTE" not in report and "READ" not in report, report
    assert report.startswith("done "), report  # the sweep ran and nothing got through
    assert {f: _sha(f) for f in before} == before
    init.kill()
    init.wait(10)


# -- host processes -------------------------------------------------------------------------


def test_host_processes_invisible_and_unsignalable(make_container: Make) -> None:
    host = subprocess.Popen(["sleep", "60"])
    try:
        c = make_container()
        c.start()
        code, out, err = run(c, f"sh -c 'ls /proc | grep -x {host.pid}; "
                                f"kill -0 {host.pid} || echo nokill0; "
                                f"kill -9 {host.pid} || echo nokill9; "
                                f"kill -9 -1; echo alive'")
        assert code == 0, err
        assert b"nokill0" in out and b"nokill9" in out and b"alive" in out, (out, err)
        assert str(host.pid).encode() + b"\n" not in out.split(b"nokill0")[0]
        assert host.poll() is None  # still running
    finally:
        host.send_signal(signal.SIGKILL)
        host.wait()


# -- security defaults ----------------------------------------------------------------------


def _status(c: pyhcs.Container) -> dict[str, str]:
    code, out, _ = run(c, "cat /proc/self/status")
    assert code == 0
    return {k: v.strip() for k, _, v in (line.partition(":") for line in out.decode().splitlines())}


def test_process_security_status(make_container: Make) -> None:
    c = make_container()
    c.start()
    st = _status(c)
    default = sum(1 << CAPABILITY_NUMBERS[name] for name in DEFAULT_CAPABILITIES)
    assert st["NoNewPrivs"] == "1"
    assert st["Seccomp"] == "2"
    assert int(st["CapInh"], 16) == 0
    assert int(st["CapAmb"], 16) == 0
    assert int(st["CapBnd"], 16) == default
    assert int(st["CapEff"], 16) == default and int(st["CapPrm"], 16) == default
    # containerd's default set, spelled out: a change to DEFAULT_CAPABILITIES must show here
    assert sorted(DEFAULT_CAPABILITIES) == sorted([
        "CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_FSETID", "CAP_FOWNER", "CAP_MKNOD",
        "CAP_NET_RAW", "CAP_SETGID", "CAP_SETUID", "CAP_SETFCAP", "CAP_SETPCAP",
        "CAP_NET_BIND_SERVICE", "CAP_SYS_CHROOT", "CAP_KILL", "CAP_AUDIT_WRITE"])


def test_non_root_user_has_no_capabilities(make_container: Make) -> None:
    c = make_container()
    c.start()
    code, out, _ = run(c, "grep -E '^(Cap(Eff|Prm|Inh|Amb)|NoNewPrivs|Seccomp)' /proc/self/status",
                       user="1000")
    assert code == 0
    st = dict(line.split(":\t") for line in out.decode().splitlines())
    assert all(int(st[k], 16) == 0 for k in ("CapEff", "CapPrm", "CapInh", "CapAmb"))
    assert st["NoNewPrivs"] == "1" and st["Seccomp"] == "2"


@pytest.mark.parametrize("user", ["0", "1000"])
def test_the_filter_refuses_a_syscall_the_capabilities_allow(make_container: Make,
                                                             user: str) -> None:
    """unshare(CLONE_NEWUSER) needs no capability (the host lets nobody do it, checked
    here): inside the container only the seccomp profile can refuse it, as containerd's
    refuses it to a process without CAP_SYS_ADMIN."""
    def nobody() -> None:
        os.setgroups([])
        os.setgid(65534)
        os.setuid(65534)

    bb = shutil.which("busybox")
    assert bb is not None
    host = subprocess.run([bb, "unshare", "-U", "true"], preexec_fn=nobody,
                          capture_output=True, check=False)
    assert host.returncode == 0, host.stderr  # the kernel allows it without capabilities
    c = make_container()
    init = _start_with_init(c)
    code, _, err = run(c, "unshare -U true", user=user)
    assert code != 0
    assert b"Operation not permitted" in err
    init.kill()
    init.wait(10)


def test_proc_read_only_and_masked_paths(make_container: Make) -> None:
    c = make_container()
    _start_with_init(c)
    hostname = Path("/proc/sys/kernel/hostname").read_text()
    code, _, err = run(c, "sh -c 'echo evil > /proc/sys/kernel/hostname'")
    assert code != 0 and b"Read-only file system" in err
    assert Path("/proc/sys/kernel/hostname").read_text() == hostname
    # every read-only path this kernel has is a read-only mount in the container
    code, out, _ = run(c, "cat /proc/self/mountinfo")
    ro = {f[4] for f in (line.split() for line in out.decode().splitlines())
          if "ro" in f[5].split(",")}
    for path in ("/proc/sys", "/proc/sysrq-trigger", "/proc/bus", "/proc/fs", "/proc/irq"):
        if os.path.exists(path):
            assert path in ro, path
    # every masked path this kernel has (this one has no /proc/kcore) is /dev/null or an
    # empty read-only tmpfs in the container
    present = [p for p in MASKED_PATHS if os.path.exists(p)]
    assert "/proc/keys" in present and "/sys/firmware" in present
    for masked in present:
        if os.path.isdir(masked):
            code, out, _ = run(c, f"ls -A {masked}")
            assert code == 0 and out == b"", (masked, out)
        else:
            code, out, _ = run(c, f"sh -c 'stat -c %t,%T {masked}; wc -c < {masked}'")
            assert code == 0 and out.split() == [b"1,3", b"0"], (masked, out)
    code, out, _ = run(c, "ls -A /sys/firmware")
    assert code == 0 and out == b""
    code, _, err = run(c, "mkdir /sys/fs/cgroup/evil")
    assert code != 0


def test_cgroupfs_is_the_containers_own_and_read_only(make_container: Make) -> None:
    c = make_container(memory_maximum_in_mb=48)
    _start_with_init(c)
    code, out, _ = run(c, "cat /proc/self/mountinfo")
    assert code == 0
    mounts = {f[4]: f for f in (line.split() for line in out.decode().splitlines())}
    from pyhcs._runtime._cgroups import namespace_mounts

    expected = [n for n, fstype, _ in namespace_mounts() if fstype != "symlink"]
    assert expected, "this machine mounts no cgroup hierarchy"
    for name in expected:
        point = os.path.join("/sys/fs/cgroup", name).rstrip("/")
        assert point in mounts, point
        assert "ro" in mounts[point][5].split(","), mounts[point]
        assert mounts[point][3] == "/", mounts[point]  # the namespace's root: its own cgroup
    if "memory" in expected:
        # the container sees its own limit, at the root of its view
        code, out, _ = run(c, "cat /sys/fs/cgroup/memory/memory.limit_in_bytes")
        assert code == 0 and int(out) == 48 * 1024 * 1024
        code, _, err = run(c, "sh -c 'echo 1 > /sys/fs/cgroup/memory/memory.limit_in_bytes'")
        assert code != 0 and b"Read-only file system" in err
    code, _, err = run(c, f"mkdir /sys/fs/cgroup/{expected[0]}/evil")
    assert code != 0 and b"Read-only file system" in err
    code, _, err = run(c, "touch /sys/fs/cgroup/evil")
    assert code != 0 and b"Read-only file system" in err
    # read-only is the container's mounts' alone: the host's of the same hierarchies (the
    # same superblocks) stay writable
    with open("/proc/self/mountinfo") as f:
        host = {fl[4]: fl for fl in (line.split() for line in f)}
    for name in expected:
        point = os.path.join("/sys/fs/cgroup", name).rstrip("/")
        if point in host:
            assert "rw" in host[point][5].split(","), host[point]
