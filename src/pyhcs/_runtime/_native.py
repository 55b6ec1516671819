"""The native executor: runs an OCI runtime spec with namespaces, mounts and cgroups.

A started container is a :class:`Sandbox`: its cgroup, the namespaces it lives in, and its
pid 1. The supervisor builds it and stays in the host's namespaces itself, so that one
supervisor can serve many containers. It forks pid 1 into a new pid namespace (a
:class:`Stub`: made ahead, before the container is known, by a supervisor that expects
more containers); pid 1 makes the uts, ipc and net namespaces itself. The supervisor
then sets up the root filesystem's mounts in a new mount namespace, which it leaves
again at once. Pid 1 joins that mount namespace, pivots into the root filesystem and
mounts /proc while the supervisor makes the cgroup; then it joins the cgroup, takes its
own cgroup namespace, installs the seccomp filter and waits for the container's first
process, which it becomes by exec. Later processes
are the supervisor's own forks: born in pid 1's pid namespace (the supervisor sets its
pid_for_children for the fork), they join the cgroup and pid 1's other namespaces. So
the supervisor is the parent of every process it starts and reaps each exit itself;
when pid 1 exits the kernel ends the rest of the container. The supervisor stays out of
the cgroup (pausing the container must not freeze it) and keeps the host's root.

Everything that runs between fork and exec is careful: no exception may unwind into the
parent's stack, so each child ends in ``os._exit``.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import functools
import json
import os
import resource
import signal
import socket
import stat
import struct
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from .. import _linux as L
from ._cgroups import BlockDevice, Cgroup, Resources, manager
from ._cgroups import namespace_mounts as cgroup_namespace_mounts
from ._seccomp import load_bpf
from ._spec import CAPABILITY_NUMBERS, MAX_ID, SANDBOX_DEVICE_ANNOTATION, UserNamespace

__all__ = ["Sandbox", "SpawnResult", "Stub", "create_sandbox", "destroy_sandbox",
           "discard_stub", "namespace_flags", "prepare_stub", "raise_fd_limit", "resolve_user",
           "secure_join", "spawn"]

_NS_FLAGS = {"ipc": L.CLONE_NEWIPC, "uts": L.CLONE_NEWUTS, "net": L.CLONE_NEWNET,
             "cgroup": L.CLONE_NEWCGROUP, "mnt": L.CLONE_NEWNS, "pid": L.CLONE_NEWPID,
             "user": L.CLONE_NEWUSER}
# Made by pid 1 itself, at once (see _init_stub): the supervisor stays in the host's.
_PID1_FIRST = L.CLONE_NEWUTS | L.CLONE_NEWIPC | L.CLONE_NEWNET
# The namespaces a later process joins (pid 1's), in this order: the user namespace
# last, as joining it ends our privileges over the host's namespaces.
_JOINED = ("net", "ipc", "uts", "cgroup", "mnt", "user")
# pid 1's namespaces that are there once it has reported them made (_init_stub), before
# create_sandbox sends it the spec: its mount namespace is not (it enters the one made for
# it when the spec comes), nor its cgroup and user ones (made at the end of its setup)
_MADE_FIRST = ("pid", "net", "ipc", "uts")
_MAX_SYMLINKS = 255
_PASSWD_LIMIT = 1 << 20  # bytes of /etc/passwd or /etc/group we are willing to read
_MAX_ID = MAX_ID  # ids at or past 2**31 are refused, never wrapped


@dataclass
class Sandbox:
    """A started container: its cgroup, pid 1, and the namespace fds later processes join."""

    container_id: str
    cgroup: Cgroup
    init_pid: int = 0  # host pid of the container's pid 1
    #: our end of pid 1's socket until pid 1 has exec'd the first process
    init_sock: socket.socket | None = None
    #: the cgroup files a single-threaded process writes "0" to, to move itself in
    join_files: list[str] = field(default_factory=list)
    #: pid 1's namespaces that are not the supervisor's (pid, net, ..., user), once it runs
    ns_fds: dict[str, int] = field(default_factory=dict)
    #: the compiled seccomp filter every process installs right before exec (b"": none)
    seccomp_bpf: bytes = b""
    #: the uid_map and gid_map of pid 1's user namespace (None: the host's)
    id_maps: tuple[str, str] | None = None
    #: an ``O_PATH`` fd of the container's devpts, where its consoles come from (-1: none)
    pts_dir: int = -1
    #: the spec's CLONE_NEW* namespaces
    flags: int = 0

    def close(self) -> None:
        """Close the namespace fds and pid 1's socket (a pid 1 that is still waiting for
        its process then exits)."""
        for fd in self.ns_fds.values():
            os.close(fd)
        self.ns_fds.clear()
        if self.pts_dir >= 0:
            os.close(self.pts_dir)
            self.pts_dir = -1
        if self.init_sock is not None:
            self.init_sock.close()
            self.init_sock = None


@dataclass(frozen=True)
class SpawnResult:
    """A spawned process: host pid, and the errno/message if its program could not start."""

    pid: int
    exec_errno: int = 0
    exec_error: str = ""


# -- path safety ----------------------------------------------------------------------------


def secure_join(root: str, unsafe: str) -> str:
    """Resolve *unsafe* as if *root* were ``/``: symlinks (absolute ones too) and ``..``
    can never leave *root*. Components that do not exist yet are kept as they are."""
    parts = [p for p in unsafe.split("/") if p not in ("", ".")]
    resolved: list[str] = []
    links = 0
    while parts:
        part = parts.pop(0)
        if part == "..":
            if resolved:
                resolved.pop()
            continue
        candidate = os.path.join(root, *resolved, part)
        try:
            st = os.lstat(candidate)
        except FileNotFoundError:
            resolved.append(part)
            continue
        if stat.S_ISLNK(st.st_mode):
            links += 1
            if links > _MAX_SYMLINKS:
                raise OSError(errno.ELOOP, "too many symlinks", unsafe)
            target = os.readlink(candidate)
            if target.startswith("/"):
                resolved = []
            parts = [p for p in target.split("/") if p not in ("", ".")] + parts
            continue
        resolved.append(part)
    return os.path.join(root, *resolved)


def _mkdir_in(root: str, dest: str, is_file: bool = False) -> str:
    path = secure_join(root, dest)
    try:
        st = os.lstat(path)
        if stat.S_ISLNK(st.st_mode):
            raise OSError(errno.ELOOP, "mount target is a symlink", dest)
        return path
    except FileNotFoundError:
        pass
    parent = os.path.dirname(path)
    # create parent components one at a time, re-resolving, so no symlink is followed
    rel = os.path.relpath(parent, root)
    cur = root
    for comp in [] if rel == "." else rel.split("/"):
        cur = os.path.join(cur, comp)
        try:
            os.mkdir(cur, 0o755)
        except FileExistsError:
            if stat.S_ISLNK(os.lstat(cur).st_mode):
                raise OSError(errno.ELOOP, "mount target path holds a symlink", dest) from None
    if is_file:
        os.close(os.open(path, os.O_CREAT | os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644))
    else:
        os.mkdir(path, 0o755)
    return path


# -- mounts ---------------------------------------------------------------------------------

_FLAG_OPTS = {
    "ro": L.MS_RDONLY, "nosuid": L.MS_NOSUID, "nodev": L.MS_NODEV, "noexec": L.MS_NOEXEC,
    "strictatime": L.MS_STRICTATIME, "relatime": L.MS_RELATIME, "bind": L.MS_BIND,
    "rbind": L.MS_BIND | L.MS_REC,
}
# options that only clear a flag (the default) or set propagation, which the rootfs's
# rslave already decides; none of them is mount data
_CLEAR_OPTS = {"rw", "suid", "dev", "exec", "rprivate", "private", "rslave", "slave"}


def _parse_options(options: list[str]) -> tuple[int, str]:
    flags = 0
    data = []
    for o in options:
        if o in _FLAG_OPTS:
            flags |= _FLAG_OPTS[o]
        elif o in _CLEAR_OPTS:
            continue
        else:
            data.append(o)
    return flags, ",".join(data)


_DEVICES = (("null", 1, 3), ("zero", 1, 5), ("full", 1, 7), ("random", 1, 8),
            ("urandom", 1, 9), ("tty", 5, 0))
_DEV_LINKS = (("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"),
              ("stdout", "/proc/self/fd/1"), ("stderr", "/proc/self/fd/2"),
              ("ptmx", "pts/ptmx"))


def _setup_dev(dev: str) -> None:
    """Device nodes and links in *dev*, the fresh tmpfs just mounted at the root's /dev."""
    old = os.umask(0)
    try:
        for name, major, minor in _DEVICES:
            os.mknod(os.path.join(dev, name), 0o666 | stat.S_IFCHR, os.makedev(major, minor))
    finally:
        os.umask(old)
    for name, target in _DEV_LINKS:
        os.symlink(target, os.path.join(dev, name))


def _refuse_image_dev_null(dev: str) -> None:
    """Refuse an image whose /dev/null is a symlink, as runc refuses one it would use.

    The fresh tmpfs on /dev hides it, so it could do no harm here; but an image that
    carries one was made to escape a runtime (runc's masked paths bound the container's
    /dev/null, CVE-2025-31133), and its author is told so rather than run."""
    with contextlib.suppress(FileNotFoundError):
        # *dev* is the image's /dev, checked to be no symlink, before the tmpfs covers it
        if stat.S_ISLNK(os.lstat(os.path.join(dev, "null")).st_mode):
            raise OSError(errno.ELOOP, "the image's /dev/null is a symlink", "/dev/null")


def _mount_one(root: str, m: dict[str, Any]) -> str:
    """Make the mount *m* inside *root*; return the host path it was mounted on."""
    dest = m["destination"]
    mtype = m.get("type", "")
    flags, data = _parse_options(m.get("options", []))
    if mtype == "bind" or flags & L.MS_BIND:
        src = m["source"]
        target = _mkdir_in(root, dest, is_file=not os.path.isdir(src))
        L.mount(src, target, None, flags & (L.MS_BIND | L.MS_REC) | L.MS_BIND, None)
        if flags & ~(L.MS_BIND | L.MS_REC):
            L.mount(None, target, None,
                    L.MS_BIND | L.MS_REMOUNT | (flags & ~(L.MS_BIND | L.MS_REC)), None)
        return target
    target = _mkdir_in(root, dest)
    # An image whose /dev, /proc or /sys is a symlink would have its kernel filesystems
    # (and /dev's nodes) land elsewhere: refused, as runc does (secure_join already walked
    # the path, so this costs no syscall).
    if target != os.path.normpath(os.path.join(root, dest.lstrip("/"))):
        raise OSError(errno.ELOOP, "the image has a symlink on the mount path", dest)
    if dest == "/dev":
        _refuse_image_dev_null(target)
    if mtype in ("proc", "cgroup"):
        # mounted by the container's pid 1, inside the pid and cgroup namespaces
        return target
    L.mount(m.get("source", mtype), target, mtype, flags, data or None)
    return target


def _bring_up_loopback() -> None:
    SIOCGIFFLAGS, SIOCSIFFLAGS, IFF_UP = 0x8913, 0x8914, 0x1
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        ifr = struct.pack("16sH14x", b"lo", 0)
        flags = struct.unpack("16sH14x", fcntl.ioctl(s, SIOCGIFFLAGS, ifr))[1]
        fcntl.ioctl(s, SIOCSIFFLAGS, struct.pack("16sH14x", b"lo", flags | IFF_UP))


def _setup_rootfs(spec: dict[str, Any]) -> int:
    """The root filesystem's mounts, made in the supervisor's new mount namespace. Returns
    an ``O_PATH`` fd of the container's devpts mount (-1: the spec has none): the
    supervisor opens consoles through it after it has left the namespace."""
    root = spec["root"]["path"]
    L.mount(None, "/", None, L.MS_REC | L.MS_SLAVE, None)
    L.mount(root, root, None, L.MS_BIND | L.MS_REC, None)
    pts = -1
    try:
        for m in spec.get("mounts", []):
            target = _mount_one(root, m)
            if m["destination"] == "/dev":
                _setup_dev(target)  # never root + "/dev": that path may be the image's symlink
            elif m.get("type") == "devpts" and pts < 0:
                pts = os.open(target, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        for p in spec.get("linux", {}).get("maskedPaths", []):
            if p.startswith("/sys/"):
                _mask(secure_join(root, p))
    except BaseException:
        if pts >= 0:
            os.close(pts)
        raise
    return pts


def _pivot(spec: dict[str, Any]) -> None:
    """Make the root filesystem our root (pid 1, in its own copy of the mount namespace,
    so the supervisor keeps the host's root)."""
    os.chdir(spec["root"]["path"])
    L.pivot_root(".", ".")
    L.umount(".", L.MNT_DETACH)
    os.chdir("/")
    if spec["root"].get("readonly"):
        L.mount(None, "/", None, L.MS_BIND | L.MS_REMOUNT | L.MS_RDONLY, None)


def _mount_cgroups(spec: dict[str, Any]) -> None:
    """Mount the container's cgroups read-only where the spec asks (pid 1, pivoted, in its
    cgroup namespace): a tmpfs holding one mount per hierarchy of the host's layout, or
    the one cgroup2 mount of a pure v2 host."""
    for m in spec.get("mounts", []):
        if m.get("type") != "cgroup":
            continue
        flags, _ = _parse_options(m.get("options", []))
        # A new cgroup mount is read-only from the start: MS_RDONLY makes the mount
        # read-only (the host's mounts of the same hierarchy stay writable). The tmpfs
        # holding them is made read-only once they are in place.
        ro = flags | L.MS_RDONLY
        flags &= ~L.MS_RDONLY
        dest = m["destination"]
        layout = cgroup_namespace_mounts()
        if layout == [("", "cgroup2", "")]:
            L.mount("cgroup2", dest, "cgroup2", ro, None)
            continue
        L.mount("tmpfs", dest, "tmpfs", flags, "mode=755")
        for name, fstype, data in layout:
            path = os.path.join(dest, name)
            if fstype == "symlink":
                os.symlink(data, path)
                continue
            os.mkdir(path, 0o555)
            L.mount(fstype, path, fstype, ro, data or None)
        L.mount(None, dest, None, L.MS_BIND | L.MS_REMOUNT | ro, None)


def _mask(path: str) -> None:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if stat.S_ISDIR(st.st_mode):
        L.mount("tmpfs", path, "tmpfs", L.MS_RDONLY, None)
    else:
        L.mount("/dev/null", path, None, L.MS_BIND, None)


def _mount_proc(spec: dict[str, Any]) -> None:
    """Mount /proc from inside the pid namespace, then mask and protect it (pid 1 only)."""
    for m in spec.get("mounts", []):
        if m.get("type") == "proc":
            flags, data = _parse_options(m.get("options", []))
            st = os.lstat(m["destination"])
            if not stat.S_ISDIR(st.st_mode):
                raise OSError(errno.ENOTDIR, "/proc is not a directory", m["destination"])
            L.mount("proc", m["destination"], "proc", flags, data or None)
    linux = spec.get("linux", {})
    for p in linux.get("maskedPaths", []):
        if p.startswith("/proc/"):
            _mask(p)
    for p in linux.get("readonlyPaths", []):
        if os.path.lexists(p):
            L.mount(p, p, None, L.MS_BIND | L.MS_REC, None)
            L.mount(None, p, None, L.MS_BIND | L.MS_REMOUNT | L.MS_RDONLY | L.MS_NOSUID
                    | L.MS_NODEV | L.MS_NOEXEC, None)


# -- the sandbox ----------------------------------------------------------------------------


def _resources(spec: dict[str, Any]) -> Resources:
    res = Resources.from_oci(spec.get("linux", {}).get("resources", {}))
    dev = spec.get("annotations", {}).get(SANDBOX_DEVICE_ANNOTATION)
    if dev:
        # counted even without a throttle (cgroup v1 counts only devices it throttles)
        major, _, minor = dev.partition(":")
        res = res.counting_io_of(BlockDevice(int(major), int(minor)))
    return res


def _join_cgroup(files: list[str]) -> None:
    """Move this single-threaded process into the cgroup whose join files are *files*
    (in a forked child: an open that fails ends it, and the fds opened before with it)."""
    _join_fds([os.open(f, os.O_WRONLY | os.O_CLOEXEC) for f in files])


def _join_fds(procs: list[int]) -> None:
    """:func:`_join_cgroup` through fds of those files (closed here)."""
    try:
        for fd in procs:
            os.write(fd, b"0")
    finally:
        for fd in procs:
            os.close(fd)


def _child_fail(fd: int, e: BaseException) -> None:
    code = e.errno if isinstance(e, OSError) and e.errno else errno.EINVAL
    text = str(e)
    if isinstance(e, OSError) and e.strerror:
        text = e.strerror + (f": {os.fsdecode(e.filename)}" if e.filename else "")
    msg = f"{code}:{text}".encode(errors="replace")[:4000]
    try:
        os.write(fd, msg)
    finally:
        os._exit(127)


@dataclass
class Stub:
    """Namespaces made ahead of a container, and its pid 1 waiting in them.

    :func:`prepare_stub` makes it in the supervisor before the container is known (see
    "the supervisor process" in ``pyhcs._compute._supervisor``): everything that does not
    depend on the container's spec is then off the start path.
    """

    flags: int  #: the CLONE_NEW* namespaces made (the cgroup one is pid 1's own, later)
    pid: int  #: pid 1's host pid
    sock: socket.socket  #: our end of pid 1's socket


def namespace_flags(spec: dict[str, Any]) -> int:
    """The CLONE_NEW* flags of the spec's namespaces."""
    flags = 0
    for ns in spec["linux"]["namespaces"]:
        flags |= _NS_FLAGS[{"network": "net", "mount": "mnt"}.get(ns["type"], ns["type"])]
    return flags


def prepare_stub(flags: int) -> Stub:
    """Fork the pid 1 of a container with the namespaces *flags* (but the mount and cgroup
    ones): in a new pid namespace, where pid 1 makes the net, ipc and uts namespaces itself
    and brings up loopback. It then waits for :func:`create_sandbox`.

    This process stays in its own namespaces, so it can prepare any number of stubs. The
    mount namespace is left to :func:`create_sandbox`: a copy made now would miss what the
    client mounts meanwhile (the container's root filesystem), and copying is cheap. Call
    it in a single-threaded process (the supervisor). :func:`discard_stub` ends pid 1 if
    no container comes.
    """
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    L.prctl(L.PR_SET_DUMPABLE, 0)  # inherited by pid 1: see _fork_exec
    try:
        with (_switched("pid", lambda: L.unshare(L.CLONE_NEWPID)) if flags & L.CLONE_NEWPID
              else contextlib.nullcontext()):
            pid = L.fork_bare()  # single-threaded here (above); pid 1 only waits and execs
            if pid == 0:
                _init_stub(theirs, ours, flags)  # never returns (nor leaves the block)
    except BaseException:
        ours.close()
        raise
    finally:
        theirs.close()
    return Stub(flags, pid, ours)


@contextlib.contextmanager
def _switched(kind: str, enter: Callable[[], None]) -> Iterator[None]:
    """Inside the block, be in the namespace of type *kind* (``pid``, ``net``, ``mnt``...)
    that *enter* moves us into (an unshare or a setns), and back in our own after it.

    For ``pid`` only our pid_for_children changes: we fork into it, inside the block. A
    setns into a mount namespace also resets our root to the namespace's, so a process in
    a chroot (a supervisor in its client's) goes back into its own root, never above it.
    """
    own = os.open(f"/proc/self/ns/{kind}", os.O_RDONLY | os.O_CLOEXEC)
    root = os.open("/", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC) if kind == "mnt" else -1
    try:
        enter()
        try:
            yield
        finally:
            L.setns(own, _NS_FLAGS[kind])
            if root >= 0:
                os.fchdir(root)
                os.chroot(".")
                os.chdir("/")
    finally:
        os.close(own)
        if root >= 0:
            os.close(root)


def _setns_path(path: str, kind: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        L.setns(fd, _NS_FLAGS[kind])
    finally:
        os.close(fd)


def discard_stub(stub: Stub) -> None:
    """End a stub's pid 1 (it sees its socket close and exits) and reap it."""
    stub.sock.close()
    try:
        os.waitpid(stub.pid, 0)
    except ChildProcessError:
        pass


def create_sandbox(container_id: str, spec: dict[str, Any], *,
                   seccomp_bpf: bytes = b"", stub: Stub | None = None) -> Sandbox:
    """Create the container's cgroup and namespaces and set up its pid 1.

    The caller is the supervisor (a single-threaded process that lives as long as the
    container); it stays in its own namespaces, so it can call this for any number of
    containers. With a *stub* made by :func:`prepare_stub` for the spec's namespaces,
    pid 1 is waiting already. *seccomp_bpf* is the spec's ``linux.seccomp`` compiled by
    :func:`pyhcs._runtime._seccomp.compile_seccomp` (compiling takes tens of milliseconds:
    the caller does it once, before it forks).
    """
    flags = namespace_flags(spec)
    if stub is None:
        stub = prepare_stub(flags)
    elif stub.flags != flags:
        discard_stub(stub)
        raise OSError(errno.EINVAL, "the namespaces made ahead are not the container's")
    mnt = pts = -1
    try:
        made = stub.sock.recv(4096)  # pid 1 has made its namespaces (at once, if ahead)
        if made != b"namespaces":
            raise _error_reply(made)
        with contextlib.ExitStack() as inside:
            # sysfs shows the net namespace of whoever mounts it, an mqueue its ipc
            # namespace: pid 1's, then
            for kind in ("net", "ipc"):
                if flags & _NS_FLAGS[kind]:
                    path = f"/proc/{stub.pid}/ns/{kind}"
                    inside.enter_context(_switched(kind, functools.partial(_setns_path, path,
                                                                           kind)))
            if flags & L.CLONE_NEWNS:
                mnt, pts = _rootfs_namespace(spec)
            else:
                pts = _setup_rootfs(spec)
        # What pid 1 needs of the spec (it was forked before there was one), and the mount
        # namespace with the root filesystem, which it pivots in: it gets going on them
        # (pivot, /proc) while we make its cgroup, which it joins after (_init_stub).
        linux = spec.get("linux", {})
        setup = json.dumps({
            "bpf": seccomp_bpf.hex(),
            "hostname": spec.get("hostname", "") if flags & L.CLONE_NEWUTS else "",
            "spec": {"root": spec["root"], "mounts": spec.get("mounts", []),
                     "linux": {k: linux[k] for k in ("maskedPaths", "readonlyPaths")
                               if k in linux}},
        }).encode()
        socket.send_fds(stub.sock, [setup], [mnt] if mnt >= 0 else [])
        try:
            cg = manager().create(container_id, _resources(spec))
        except FileExistsError:
            _wait_cgroup_released(container_id)
            cg = manager().create(container_id, _resources(spec))
    except BaseException:
        if pts >= 0:
            os.close(pts)
        discard_stub(stub)
        raise
    finally:
        if mnt >= 0:
            os.close(mnt)  # pid 1 has its own reference, or none is needed any more
    userns = UserNamespace.from_spec(spec.get("linux", {}))
    sb = Sandbox(container_id, cg, stub.pid, stub.sock, cg.join_files(), seccomp_bpf=seccomp_bpf,
                 id_maps=userns.proc_maps() if userns is not None else None, pts_dir=pts,
                 flags=flags)
    try:
        # pid 1 pivots away from the host's cgroupfs meanwhile: it joins through fds
        procs: list[int] = []
        try:
            for f in sb.join_files:
                procs.append(os.open(f, os.O_WRONLY | os.O_CLOEXEC))
            socket.send_fds(stub.sock, [b"cgroup"], procs)
        except (BrokenPipeError, ConnectionResetError):
            pass  # pid 1 failed at its setup: the first process gets its reason
        finally:
            for fd in procs:
                os.close(fd)
    except BaseException:
        with contextlib.suppress(OSError):  # the error to report is the one raised here
            destroy_sandbox(sb)
        raise
    return sb


def _rootfs_namespace(spec: dict[str, Any]) -> tuple[int, int]:
    """A new mount namespace holding the root filesystem's mounts, as an fd, and the fd of
    :func:`_setup_rootfs`; we ourselves are back in our own mount namespace when this
    returns (or raises)."""
    mnt = -1
    try:
        with _switched("mnt", lambda: L.unshare(L.CLONE_NEWNS)):
            mnt = os.open("/proc/self/ns/mnt", os.O_RDONLY | os.O_CLOEXEC)
            pts = _setup_rootfs(spec)
    except BaseException:
        if mnt >= 0:
            os.close(mnt)  # the last reference: the namespace and its mounts go
        raise
    return mnt, pts


def _wait_cgroup_released(container_id: str, timeout: float = 5.0) -> None:
    """Wait for the cgroup of a removed container of the same id to go.

    Its supervisor releases the cgroup after its final record, and remove_container does
    not wait for that, so a container created again at once under the same id can find
    it still there for a few milliseconds. One left behind (nothing in it, nobody
    releasing it) is removed after *timeout*.
    """
    cg = manager().open(container_id)
    deadline = time.monotonic() + timeout
    while any(os.path.isdir(os.path.dirname(f)) for f in cg.procs_files()):
        if time.monotonic() > deadline:
            cg.kill_all()
            cg.remove()
            return
        time.sleep(0.002)


def destroy_sandbox(sb: Sandbox) -> None:
    """Release a sandbox: pid 1 if it never ran a process, namespace fds, processes and
    the cgroup. Raises OSError if the cgroup cannot be removed (the caller reports it)."""
    waiting = sb.init_sock is not None
    sb.close()  # pid 1, still waiting for a process, sees the socket close and exits
    if waiting and sb.init_pid:
        try:
            os.waitpid(sb.init_pid, 0)
        except ChildProcessError:
            pass
    sb.cgroup.kill_all()
    sb.cgroup.remove()


def _init_stub(sock: socket.socket, other: socket.socket, flags: int) -> None:
    """Pid 1 before the first process: makes the uts, ipc and net namespaces of *flags*,
    waits for its container's spec (or its socket's end: no container came), pivots and
    mounts /proc, then goes into the cgroup the supervisor has made meanwhile, mounts
    cgroupfs, loads the seccomp filter, reports ready and execs on request."""
    seccomp_bpf = b""
    try:
        other.close()
        # Non-dumpable from birth (prepare_stub): see _fork_exec.
        L.prctl(L.PR_SET_PDEATHSIG, signal.SIGKILL)  # the supervisor gone: the container too
        _reset_signals()
        # nothing of the supervisor's (client sockets, pipes) may live on in pid 1
        L.close_range_from(3, keep=(sock.fileno(),))
        L.unshare(flags & _PID1_FIRST)
        if flags & L.CLONE_NEWNET:
            _bring_up_loopback()
        sock.send(b"namespaces")
        msg, fds, _, _ = socket.recv_fds(sock, 1 << 20, 1)
        if not msg:
            os._exit(0)  # no container came, or its cgroup could not be made
        setup = json.loads(msg)
        spec = setup["spec"]
        if setup["hostname"]:
            socket.sethostname(setup["hostname"])
        seccomp_bpf = bytes.fromhex(setup["bpf"])
        if fds:  # the mount namespace with the root filesystem's mounts: ours alone
            L.setns(fds[0], L.CLONE_NEWNS)
            os.close(fds[0])
        else:
            # pivot_root must move only us: without a namespace made for us (the
            # supervisor left the one it made, and closes its fd), in a copy of the host's
            L.unshare(L.CLONE_NEWNS)
        _pivot(spec)
        _mount_proc(spec)
        # the cgroup, made meanwhile: an fd of each file to write ourselves to (join_files)
        msg, fds, _, _ = socket.recv_fds(sock, 4096, 64)
        if msg != b"cgroup":
            os._exit(0)  # the cgroup could not be made: no container comes
        _join_fds(fds)
        # the cgroup namespace's root is the cgroup we are in when we make it
        L.unshare(flags & L.CLONE_NEWCGROUP)
        _mount_cgroups(spec)
        if flags & L.CLONE_NEWUSER:
            # Last, once every mount is made with the host's privileges: from here on our
            # capabilities hold only in the new namespace, over what it maps. The
            # supervisor writes its maps when we report ready, before it sends the process
            # (see _spawn_init); _exec then takes the process's ids inside it.
            L.unshare(L.CLONE_NEWUSER)
        with open("/proc/self/comm", "w") as f:  # what process_list shows until exec
            f.write("pyhcs-init")
        if seccomp_bpf:
            # Now, before we report ready, not right before exec: the kernel checks and
            # compiles the filter (0.7 ms here) while the client is still on its way with
            # the process. We hold CAP_SYS_ADMIN, so no no_new_privs is needed yet. What we
            # do after it (take the process's fds, set its ids and capabilities, exec) the
            # profile must allow, as runc requires of a profile for a process without
            # no_new_privs; the default profile does.
            load_bpf(seccomp_bpf)
        sock.send(b"ready")
    except BaseException as e:
        _child_fail(sock.fileno(), e)
    try:
        data, fds, _, _ = socket.recv_fds(sock, 1 << 20, 4)
        if not data:
            os._exit(0)  # the container stopped before it ran anything
        req = json.loads(data)
        console = fds[3] if len(fds) > 3 else -1
        _prepare_exec((fds[0], fds[1], fds[2]), console, sock.fileno())
        _exec(req["process"], b"")  # the filter is in place; the socket closes on exec
    except BaseException as e:
        _child_fail(sock.fileno(), e)


# -- users ----------------------------------------------------------------------------------


def _bounded_lines(path: str) -> list[str]:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return []
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return []  # a FIFO or device planted as /etc/passwd must not hang or feed us
        return os.read(fd, _PASSWD_LIMIT).decode(errors="replace").splitlines()
    finally:
        os.close(fd)


def _is_id(text: str) -> bool:
    return text.isascii() and text.isdigit() and len(text) <= 10


def _parse_id(text: str, what: str) -> int:
    value = int(text) if _is_id(text) else -1
    if not 0 <= value <= _MAX_ID:
        raise OSError(errno.EINVAL, f"{what} {text} is out of range")
    return value


def resolve_user(user: str) -> tuple[int, int, list[int]]:
    """Resolve ``name``, ``uid``, ``name:group`` or ``uid:gid`` against /etc/passwd and
    /etc/group of the current root (the container's, when called inside it)."""
    name, _, group = user.partition(":")
    uid = gid = -1
    home_gid = 0
    if name.isdigit():
        uid = _parse_id(name, "uid")
    for line in _bounded_lines("/etc/passwd"):
        f = line.split(":")
        if len(f) >= 4 and (f[0] == name or (uid >= 0 and f[2] == str(uid))):
            if uid < 0:
                uid = _parse_id(f[2], "uid")
            home_gid = _parse_id(f[3], "gid") if _is_id(f[3]) else 0
            name = f[0]
            break
    if uid < 0:
        raise OSError(errno.ENOENT, f"user {name!r} not found in /etc/passwd")
    gid = home_gid
    groups: list[int] = []
    glines = _bounded_lines("/etc/group")
    if group:
        if group.isdigit():
            gid = _parse_id(group, "gid")
        else:
            for line in glines:
                f = line.split(":")
                if len(f) >= 3 and f[0] == group:
                    gid = _parse_id(f[2], "gid")
                    break
            else:
                raise OSError(errno.ENOENT, f"group {group!r} not found in /etc/group")
    for line in glines:
        f = line.split(":")
        if len(f) >= 4 and name in f[3].split(",") and _is_id(f[2]):
            groups.append(_parse_id(f[2], "gid"))
    return uid, gid, groups


# -- processes ------------------------------------------------------------------------------

_RESET_SIGNALS = (signal.SIGPIPE, signal.SIGXFSZ, signal.SIGINT, signal.SIGTERM,
                  signal.SIGHUP, signal.SIGQUIT, signal.SIGCHLD, signal.SIGUSR1, signal.SIGUSR2)


def spawn(sb: Sandbox, process: dict[str, Any], stdio: tuple[int, int, int], *,
          console: int = -1, meanwhile: Callable[[], None] | None = None) -> SpawnResult:
    """Start *process* (an OCI process object) in the sandbox; return once it has exec'd.

    *stdio* are the fds the process gets as 0, 1 and 2. With *console* >= 0 that fd is a pty
    slave which becomes the controlling terminal. If the program cannot be executed, the
    child exits and the result carries the errno and message. The first process is pid 1;
    later ones join the cgroup and pid 1's namespaces.

    *meanwhile*, if given, is called once while the process gets ready to exec (for pid 1:
    after it has the process, before we wait for its exec), so the caller's own work runs
    alongside the process's instead of after it.
    """
    if sb.init_sock is not None:
        return _spawn_init(sb, process, stdio, console, meanwhile)
    if not sb.ns_fds:
        raise OSError(errno.ESRCH, "the container has stopped")
    join = (sb.join_files, [(sb.ns_fds[n], _NS_FLAGS[n]) for n in _JOINED if n in sb.ns_fds])
    return _fork_exec(process, stdio, console=console, join=join, seccomp_bpf=sb.seccomp_bpf,
                      pid_ns=sb.ns_fds.get("pid", -1), meanwhile=meanwhile)


def _error_reply(msg: bytes) -> OSError:
    code, _, text = msg.decode(errors="replace").partition(":")
    return OSError(int(code) if code.isdigit() else errno.EIO, text or "pid 1 died")


def _spawn_init(sb: Sandbox, process: dict[str, Any], stdio: tuple[int, int, int],
                console: int, meanwhile: Callable[[], None] | None) -> SpawnResult:
    sock = sb.init_sock
    assert sock is not None
    fds = [*stdio, console] if console >= 0 else list(stdio)
    try:
        # Later processes join pid 1's namespaces; it may be gone by the time they come.
        # Those it has made before create_sandbox returned are opened while it finishes
        # its setup (cgroupfs, the filter), the others once it is ready. A pid 1 that
        # failed is gone already: its reason, read next, is the error to report.
        with contextlib.suppress(OSError):
            _open_init_ns(sb, _MADE_FIRST)
        ready = sock.recv(4096)
        if ready != b"ready":
            raise _error_reply(ready)
        if sb.id_maps is not None:  # pid 1 has made its user namespace: give it its ids
            L.write_id_maps(sb.init_pid, *sb.id_maps)
        _open_init_ns(sb, _JOINED)
        socket.send_fds(sock, [json.dumps({"process": process}).encode()], fds)
        if meanwhile is not None:
            meanwhile()  # pid 1 takes milliseconds to exec (capabilities, seccomp, execve)
        msg = sock.recv(1 << 16)  # nothing: it exec'd (the socket was close-on-exec)
    finally:
        sock.close()
        sb.init_sock = None
    if msg:
        err = _error_reply(msg)
        return SpawnResult(sb.init_pid, err.errno or errno.EIO, err.strerror or str(err))
    return SpawnResult(sb.init_pid)


def _open_init_ns(sb: Sandbox, kinds: tuple[str, ...]) -> None:
    """Open pid 1's namespaces of *kinds* not open yet: those of the spec, and always its
    mount namespace (the one it pivots in)."""
    for ns in kinds:
        if ns not in sb.ns_fds and (ns == "mnt" or sb.flags & _NS_FLAGS[ns]):
            sb.ns_fds[ns] = os.open(f"/proc/{sb.init_pid}/ns/{ns}", os.O_RDONLY | os.O_CLOEXEC)


def _reset_signals() -> None:
    for s in _RESET_SIGNALS:
        signal.signal(s, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_SETMASK, set())


#: RLIMIT_NOFILE as this process had it before :func:`raise_fd_limit` (None: not raised)
_nofile: tuple[int, int] | None = None


def raise_fd_limit() -> None:
    """Let this process open as many fds as its hard limit allows: a supervisor holds ~9
    per container, and a soft limit of 1024 (the usual default) would end at ~110
    containers. The processes it starts get the limit it had before (:func:`_prepare_exec`),
    as they would have without it. Idempotent."""
    global _nofile
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if _nofile is None and soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (OSError, ValueError):
            return  # best effort: the limit stays as it was
        _nofile = (soft, hard)


def _prepare_exec(stdio: tuple[int, int, int], console: int, keep: int) -> None:
    """stdio onto 0-2, then every other fd closed but *keep*: nothing of the host survives
    exec. A new session; with a console, the pty becomes the controlling terminal. The
    fd limit is the one the supervisor had before :func:`raise_fd_limit`."""
    if _nofile is not None:
        resource.setrlimit(resource.RLIMIT_NOFILE, _nofile)
    for i, fd in enumerate(stdio):
        if fd == i:
            os.set_inheritable(fd, True)
        elif fd >= 0:
            os.dup2(fd, i)
    L.close_range_from(3, keep=(keep,))
    os.setsid()
    if console >= 0:
        fcntl.ioctl(0, 0x540E, 0)  # TIOCSCTTY


def _fork_exec(process: dict[str, Any], stdio: tuple[int, int, int], *, console: int,
               join: tuple[list[str], list[tuple[int, int]]], seccomp_bpf: bytes,
               pid_ns: int, meanwhile: Callable[[], None] | None = None) -> SpawnResult:
    """Fork a process into the pid namespace *pid_ns* (-1: ours) that joins the container
    (cgroup, then namespaces) and execs."""
    err_r, err_w = os.pipe2(os.O_CLOEXEC)
    # Until exec the child is the host's Python binary inside the container's pid
    # namespace: non-dumpable, its /proc/<pid>/exe is closed to container processes (they
    # lack CAP_SYS_PTRACE). Set here, it is the child's from its first instant (the flag
    # is inherited by fork, and costs the child nothing); exec makes the container's
    # program dumpable again. The supervisor itself needs no core dumps or ptrace access.
    L.prctl(L.PR_SET_DUMPABLE, 0)
    try:
        with (_switched("pid", lambda: L.setns(pid_ns, L.CLONE_NEWPID)) if pid_ns >= 0
              else contextlib.nullcontext()):
            try:
                pid = L.fork_bare()  # the supervisor is single-threaded; the child only execs
            except OSError as e:
                if e.errno == errno.ENOMEM and pid_ns >= 0:  # the namespace's pid 1 is gone
                    raise OSError(errno.ESRCH, "the container has stopped") from None
                raise
            if pid == 0:
                try:
                    _reset_signals()
                    join_files, ns_fds = join
                    _join_cgroup(join_files)
                    for fd, flag in ns_fds:
                        L.setns(fd, flag)
                    _prepare_exec(stdio, console, err_w)
                    _exec(process, seccomp_bpf)
                except BaseException as e:
                    _child_fail(err_w, e)
    except BaseException:
        os.close(err_r)
        os.close(err_w)
        raise
    os.close(err_w)
    try:
        if meanwhile is not None:
            meanwhile()
        msg = b""
        while chunk := os.read(err_r, 4096):
            msg += chunk
    finally:
        os.close(err_r)
    if msg:
        code, _, text = msg.decode(errors="replace").partition(":")
        return SpawnResult(pid, int(code) if code.isdigit() else errno.EIO, text)
    return SpawnResult(pid)


def _exec(process: dict[str, Any], seccomp_bpf: bytes) -> None:
    """Become *process*: user, working directory, capabilities, no_new_privs, seccomp, exec.
    Raises OSError (for _child_fail) if it cannot."""
    env = dict(e.split("=", 1) for e in process.get("env", []) if "=" in e)
    user = process.get("pyhcsUser")
    if user:
        uid, gid, groups = resolve_user(user)
    else:
        u = process.get("user", {})
        uid, gid = u.get("uid", 0), u.get("gid", 0)
        groups = list(u.get("additionalGids", []))
        for v in (uid, gid, *groups):
            if not 0 <= v <= _MAX_ID:
                raise OSError(errno.EINVAL, f"id {v} is out of range")
    cwd = process.get("cwd", "/")
    try:
        os.chdir(cwd)
    except OSError as e:
        raise OSError(e.errno, f"working directory {cwd}: {e.strerror}") from None
    os.umask(0o022)
    caps = process.get("capabilities", {}).get("bounding", [])
    keep = frozenset(CAPABILITY_NUMBERS[c] for c in caps if c in CAPABILITY_NUMBERS)
    L.capbset_drop_except(keep)
    nnp = process.get("noNewPrivileges", True)
    if nnp:
        L.prctl(L.PR_SET_NO_NEW_PRIVS, 1)
    elif seccomp_bpf:
        load_bpf(seccomp_bpf)  # without no_new_privs the kernel wants CAP_SYS_ADMIN: now
    os.setgroups(groups)
    os.setgid(gid)
    os.setuid(uid)
    # In a user namespace we came in as an unmapped id, not as its root, so the kernel's
    # rule that leaving root drops every capability would not apply: drop them here.
    L.capset_drop_to(keep if uid == 0 else frozenset())
    if nnp and seccomp_bpf:
        # last, so the filter need not allow what the steps above use
        load_bpf(seccomp_bpf)
    args = process["args"]
    exe = process.get("pyhcsExecutable") or args[0]
    if "HOME" not in env:
        env["HOME"] = "/root" if uid == 0 else "/"
    try:
        os.execvpe(exe, args, env)
    except FileNotFoundError:
        where = "in $PATH" if "/" not in exe else ""
        raise OSError(errno.ENOENT, f"executable file not found {where}".strip()) from None
    except PermissionError:
        raise OSError(errno.EACCES, "permission denied (not executable)") from None
