"""The native executor: runs an OCI runtime spec with namespaces, mounts and cgroups.

A started container is a :class:`Sandbox`: its namespaces, held open by file descriptors
in the supervisor, and its cgroup. A *holder* child makes them (cgroup, unshare, rootfs,
pivot_root) and forks the container's first process, pid 1 of the new pid namespace, which
mounts /proc; the holder then exits and pid 1 passes to the supervisor, a child subreaper.
Later processes are the supervisor's own forks that join with setns(2). So the supervisor
reaps every exit itself; when pid 1 exits the kernel ends the rest of the container.

Everything that runs between fork and exec is careful: no exception may unwind into the
parent's stack, so each child ends in ``os._exit``.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import signal
import socket
import stat
import struct
from dataclasses import dataclass, field
from typing import Any

from .. import _linux as L
from ._cgroups import Cgroup, Resources, manager
from ._spec import CAPABILITY_NUMBERS

__all__ = ["Sandbox", "SpawnResult", "create_sandbox", "destroy_sandbox", "spawn",
           "secure_join", "resolve_user",
           "NATIVE_NAMESPACES"]

# The order nsenter(1) joins them in; mnt last so /proc paths stay the host's until then.
NATIVE_NAMESPACES = ("ipc", "uts", "net", "cgroup", "mnt")
_NS_FLAGS = {"ipc": L.CLONE_NEWIPC, "uts": L.CLONE_NEWUTS, "net": L.CLONE_NEWNET,
             "cgroup": L.CLONE_NEWCGROUP, "mnt": L.CLONE_NEWNS, "pid": L.CLONE_NEWPID}
_MAX_SYMLINKS = 255
_PASSWD_LIMIT = 1 << 20  # bytes of /etc/passwd or /etc/group we are willing to read
_MAX_ID = (1 << 31) - 1  # ids at or past 2**31 are refused, never wrapped


@dataclass
class Sandbox:
    """A started container: its cgroup, namespace fds, and until its first process
    exists, the holder that will fork it."""

    container_id: str
    cgroup: Cgroup
    ns_fds: dict[str, int] = field(default_factory=dict)
    holder_pid: int = 0
    holder_sock: socket.socket | None = None
    init_pid: int = 0  # host pid of the container's pid 1, once known

    def reap_holder(self) -> bool:
        """Wait for the holder to be gone (it exits right after forking pid 1); False if
        there was none."""
        if not self.holder_pid:
            return False
        try:
            os.waitpid(self.holder_pid, 0)
        except ChildProcessError:
            pass
        self.holder_pid = 0
        return True

    def close(self) -> None:
        """Close the namespace fds, and the holder's socket (the holder then exits)."""
        for fd in self.ns_fds.values():
            os.close(fd)
        self.ns_fds.clear()
        if self.holder_sock is not None:
            self.holder_sock.close()
            self.holder_sock = None


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


def _setup_dev(root: str) -> None:
    dev = os.path.join(root, "dev")
    old = os.umask(0)
    try:
        for name, major, minor in _DEVICES:
            os.mknod(os.path.join(dev, name), 0o666 | stat.S_IFCHR, os.makedev(major, minor))
    finally:
        os.umask(old)
    for name, target in _DEV_LINKS:
        os.symlink(target, os.path.join(dev, name))


def _mount_one(root: str, m: dict[str, Any]) -> None:
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
        return
    target = _mkdir_in(root, dest)
    if mtype == "proc":
        return  # mounted by the container's pid 1, which is inside the pid namespace
    L.mount(m.get("source", mtype), target, mtype, flags, data or None)


def _bring_up_loopback() -> None:
    SIOCGIFFLAGS, SIOCSIFFLAGS, IFF_UP = 0x8913, 0x8914, 0x1
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        ifr = struct.pack("16sH14x", b"lo", 0)
        flags = struct.unpack("16sH14x", fcntl.ioctl(s, SIOCGIFFLAGS, ifr))[1]
        fcntl.ioctl(s, SIOCSIFFLAGS, struct.pack("16sH14x", b"lo", flags | IFF_UP))


def _setup_rootfs(spec: dict[str, Any]) -> None:
    root = spec["root"]["path"]
    L.mount(None, "/", None, L.MS_REC | L.MS_SLAVE, None)
    L.mount(root, root, None, L.MS_BIND | L.MS_REC, None)
    for m in spec.get("mounts", []):
        _mount_one(root, m)
        if m["destination"] == "/dev":
            _setup_dev(root)
    for p in spec.get("linux", {}).get("maskedPaths", []):
        if p.startswith("/sys/"):
            _mask(secure_join(root, p))
    os.chdir(root)
    L.pivot_root(".", ".")
    L.umount(".", L.MNT_DETACH)
    os.chdir("/")
    if spec["root"].get("readonly"):
        L.mount(None, "/", None, L.MS_BIND | L.MS_REMOUNT | L.MS_RDONLY, None)


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
    r = spec.get("linux", {}).get("resources", {})
    mem = r.get("memory", {})
    cpu = r.get("cpu", {})
    return Resources(
        memory_bytes=mem.get("limit"),
        cpu_shares=cpu.get("shares"),
        cpu_quota_us=cpu.get("quota"),
        cpu_period_us=cpu.get("period", 100_000),
        cpuset_cpus=cpu.get("cpus"),
        pids_max=r.get("pids", {}).get("limit"),
    )


def _move_to_cgroup(cg: Cgroup, pid: int) -> None:
    data = str(pid).encode()
    for f in cg.procs_files():
        fd = os.open(f, os.O_WRONLY | os.O_CLOEXEC)
        try:
            os.write(fd, data)
        finally:
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


def create_sandbox(container_id: str, spec: dict[str, Any]) -> Sandbox:
    """Create the namespaces and cgroup of a container and set up its root filesystem.

    The namespaces are made by a *holder* child, which stays until the container's first
    process: that process is the holder's own fork, so it is born in the cgroup and the
    namespaces (pid 1 of the new pid namespace) without joining anything. The caller must
    be a child subreaper (it inherits pid 1 when the holder exits) and must call this once.
    """
    flags = 0
    for ns in spec["linux"]["namespaces"]:
        flags |= _NS_FLAGS[{"network": "net", "mount": "mnt"}.get(ns["type"], ns["type"])]
    cg = manager().create(container_id, _resources(spec))
    sb = Sandbox(container_id, cg)
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        pid = os.fork()
        if pid == 0:
            _holder(theirs, ours, cg, spec, flags)
        theirs.close()
        sb.holder_pid = pid
        sb.holder_sock = ours
        # The first move into a new cgroup waits out an RCU grace period in the kernel
        # (cgroup v1): we pay it here while the holder builds the namespaces beside us.
        _move_to_cgroup(cg, pid)
        ours.send(b"joined")
        msg = ours.recv(4096)
        if msg != b"ok":
            code, _, text = msg.decode(errors="replace").partition(":")
            raise OSError(int(code) if code.isdigit() else errno.EIO,
                          text or "the namespace holder died")
        for ns in NATIVE_NAMESPACES:
            sb.ns_fds[ns] = os.open(f"/proc/{pid}/ns/{ns}", os.O_RDONLY | os.O_CLOEXEC)
        ours.send(b"go")
        return sb
    except BaseException:
        theirs.close()
        destroy_sandbox(sb)
        raise


def destroy_sandbox(sb: Sandbox) -> None:
    """Release a sandbox: the holder (if still there), namespace fds, processes, cgroup."""
    unused_init = 0
    if sb.holder_sock is not None and sb.holder_pid:
        # pid 1 never ran a process: learn its pid so we can reap it once it leaves
        sb.holder_sock.settimeout(5)
        try:
            unused_init = _stub_pid(sb)
        except OSError:
            pass
    sb.close()  # pid 1, still waiting for a process, sees the socket close and exits
    sb.reap_holder()
    if unused_init:
        try:
            os.waitpid(unused_init, 0)
        except ChildProcessError:
            pass
    try:
        sb.cgroup.kill_all()
        sb.cgroup.remove()
    except OSError:
        pass


def _holder(sock: socket.socket, other: socket.socket, cg: Cgroup, spec: dict[str, Any],
            flags: int) -> None:
    """The holder child: build the container, fork its pid 1, and leave."""
    try:
        other.close()
        # nothing of the supervisor's (client sockets, pipes) may live on in the holder
        L.close_range_from(3, keep=(sock.fileno(),))
        L.unshare(flags & ~(L.CLONE_NEWCGROUP | L.CLONE_NEWPID))
        if flags & L.CLONE_NEWUTS and spec.get("hostname"):
            socket.sethostname(spec["hostname"])
        if flags & L.CLONE_NEWNET:
            _bring_up_loopback()
        _setup_rootfs(spec)
        if sock.recv(16) != b"joined":  # the supervisor moved us into the cgroup
            os._exit(1)
        # the cgroup namespace's root is the cgroup we are in when we make it
        L.unshare(flags & (L.CLONE_NEWCGROUP | L.CLONE_NEWPID))
        sock.send(b"ok")
        if sock.recv(16) != b"go":  # the supervisor holds our namespaces now
            os._exit(1)
        # pid 1 is forked now, while the caller goes on: it mounts /proc and then waits
        # for the container's first process, which it becomes by exec.
        pid = os.fork()
        if pid == 0:
            _init_stub(sock, spec)
        sock.send(json.dumps({"pid": pid}).encode())
        os._exit(0)  # pid 1 passes to the supervisor, our subreaper
    except BaseException as e:
        _child_fail(sock.fileno(), e)


def _init_stub(sock: socket.socket, spec: dict[str, Any]) -> None:
    """Pid 1 before the first process: /proc mounted, then exec on request."""
    try:
        L.prctl(L.PR_SET_DUMPABLE, 0)  # see _fork_exec: the host's binary, until exec
        _reset_signals()
        _mount_proc(spec)
        with open("/proc/self/comm", "w") as f:  # what process_list shows until exec
            f.write("pyhcs-init")
    except BaseException as e:
        _child_fail(sock.fileno(), e)
    try:
        data, fds, _, _ = socket.recv_fds(sock, 1 << 20, 4)
        if not data:
            os._exit(0)  # the container stopped before it ran anything
        req = json.loads(data)
        console = fds[3] if len(fds) > 3 else -1
        _prepare_exec((fds[0], fds[1], fds[2]), console, sock.fileno())
        _exec(req["process"], sock.fileno())  # the socket closes on exec: success
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


def _parse_id(text: str, what: str) -> int:
    value = int(text)
    if not 0 <= value <= _MAX_ID - 1:
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
            home_gid = _parse_id(f[3], "gid") if f[3].isdigit() else 0
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
        if len(f) >= 4 and name in f[3].split(",") and f[2].isdigit():
            groups.append(_parse_id(f[2], "gid"))
    return uid, gid, groups


# -- processes ------------------------------------------------------------------------------

_RESET_SIGNALS = (signal.SIGPIPE, signal.SIGXFSZ, signal.SIGINT, signal.SIGTERM,
                  signal.SIGHUP, signal.SIGQUIT, signal.SIGCHLD, signal.SIGUSR1, signal.SIGUSR2)


def spawn(sb: Sandbox, process: dict[str, Any], stdio: tuple[int, int, int], *,
          console: int = -1) -> SpawnResult:
    """Start *process* (an OCI process object) in the sandbox; return once it has exec'd.

    *stdio* are the fds the process gets as 0, 1 and 2. With *console* >= 0 that fd is a pty
    slave which becomes the controlling terminal. If the program cannot be executed, the
    child exits and the result carries the errno and message. The first process is pid 1;
    later ones join the namespaces and the cgroup.
    """
    if sb.holder_sock is not None:
        return _spawn_init(sb, process, stdio, console)
    join = (sb.cgroup.procs_files(),
            [(sb.ns_fds[n], _NS_FLAGS[n]) for n in NATIVE_NAMESPACES if n in sb.ns_fds])
    return _fork_exec(process, stdio, console=console, join=join)


def _stub_pid(sb: Sandbox) -> int:
    """The host pid of the container's pid 1 (the holder sends it after forking it)."""
    if not sb.init_pid:
        assert sb.holder_sock is not None
        msg = sb.holder_sock.recv(4096)
        if not msg.startswith(b"{"):
            code, _, text = msg.decode(errors="replace").partition(":")
            raise OSError(int(code) if code.isdigit() else errno.EIO,
                          text or "the namespace holder died")
        sb.init_pid = int(json.loads(msg)["pid"])
    return sb.init_pid


def _spawn_init(sb: Sandbox, process: dict[str, Any], stdio: tuple[int, int, int],
                console: int) -> SpawnResult:
    sock = sb.holder_sock
    assert sock is not None
    fds = [*stdio, console] if console >= 0 else list(stdio)
    try:
        pid = _stub_pid(sb)
        socket.send_fds(sock, [json.dumps({"process": process}).encode()], fds)
        msg = sock.recv(1 << 16)  # nothing: it exec'd (the socket was close-on-exec)
    finally:
        sock.close()
        sb.holder_sock = None
    try:
        # later processes are forked by us: into the container's pid namespace
        pidns = os.open(f"/proc/{pid}/ns/pid", os.O_RDONLY | os.O_CLOEXEC)
        try:
            L.setns(pidns, L.CLONE_NEWPID)
        finally:
            os.close(pidns)
    except OSError:
        pass  # pid 1 is already gone: the container is stopping, nothing more will run
    if msg:
        code, _, text = msg.decode(errors="replace").partition(":")
        return SpawnResult(pid, int(code) if code.isdigit() else errno.EIO, text)
    return SpawnResult(pid)


def _reset_signals() -> None:
    for s in _RESET_SIGNALS:
        signal.signal(s, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_SETMASK, set())


def _prepare_exec(stdio: tuple[int, int, int], console: int, keep: int) -> None:
    """stdio onto 0-2, then every other fd closed but *keep*: nothing of the host survives
    exec. A new session; with a console, the pty becomes the controlling terminal."""
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
               join: tuple[list[str], list[tuple[int, int]]]) -> SpawnResult:
    """Fork a process that joins the container (cgroup, then namespaces) and execs."""
    err_r, err_w = os.pipe2(os.O_CLOEXEC)
    try:
        pid = os.fork()
    except BaseException:
        os.close(err_r)
        os.close(err_w)
        raise
    if pid == 0:
        try:
            # Until exec this process is the host's Python binary inside the container's pid
            # namespace: non-dumpable, its /proc/<pid>/exe is closed to container processes
            # (they lack CAP_SYS_PTRACE). exec makes the container's program dumpable again.
            L.prctl(L.PR_SET_DUMPABLE, 0)
            _reset_signals()
            cg_files, ns_fds = join
            for f in cg_files:
                fd = os.open(f, os.O_WRONLY)
                os.write(fd, b"0")
                os.close(fd)
            for fd, flag in ns_fds:
                L.setns(fd, flag)
            _prepare_exec(stdio, console, err_w)
            _exec(process, err_w)
        except BaseException as e:
            _child_fail(err_w, e)
    os.close(err_w)
    try:
        msg = b""
        while chunk := os.read(err_r, 4096):
            msg += chunk
    finally:
        os.close(err_r)
    if msg:
        code, _, text = msg.decode(errors="replace").partition(":")
        return SpawnResult(pid, int(code) if code.isdigit() else errno.EIO, text)
    return SpawnResult(pid)


def _exec(process: dict[str, Any], err_w: int) -> None:
    env = dict(e.split("=", 1) for e in process.get("env", []) if "=" in e)
    user = process.get("pyhcsUser")
    if user:
        uid, gid, groups = resolve_user(user)
    else:
        u = process.get("user", {})
        uid, gid = u.get("uid", 0), u.get("gid", 0)
        groups = list(u.get("additionalGids", []))
        for v in (uid, gid, *groups):
            if not 0 <= v < _MAX_ID:
                raise OSError(errno.EINVAL, f"id {v} is out of range")
    cwd = process.get("cwd", "/")
    try:
        os.chdir(cwd)
    except OSError as e:
        raise OSError(e.errno, f"working directory {cwd}: {e.strerror}") from None
    os.umask(0o022)
    caps = process.get("capabilities", {}).get("bounding", [])
    keep = frozenset(CAPABILITY_NUMBERS[c] for c in caps if c in CAPABILITY_NUMBERS)
    for cap in range(L.CAP_LAST_CAP + 1):
        if cap not in keep:
            L.prctl(L.PR_CAPBSET_DROP, cap)
    if process.get("noNewPrivileges", True):
        L.prctl(L.PR_SET_NO_NEW_PRIVS, 1)
    os.setgroups(groups)
    os.setgid(gid)
    os.setuid(uid)
    if uid == 0:
        L.capset_drop_to(keep)
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
    del err_w
