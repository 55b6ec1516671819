"""The OCI executor: runs the container spec with an installed OCI runtime (crun, runc).

Choosing the executor
---------------------
``create_container(..., runtime=...)`` or, when that is not given, the environment
variable ``PYHCS_RUNTIME`` chooses who executes a container's spec:

* ``native`` (the default): pyhcs's own executor (:mod:`pyhcs._runtime._native`);
* ``crun`` or ``runc``: that binary, found on ``PATH``;
* an absolute path to any OCI runtime binary with the runc command line.

The choice is made once, when the container is created, and kept with it (the
``io.pyhcs.runtime`` annotation of its ``config.json``, holding the binary's absolute
path): the same container always runs on the same executor, whoever starts it.

How a container runs on an OCI runtime
--------------------------------------
pyhcs's model is unchanged: ``Container.start()`` comes before any process, the first
``create_process`` becomes the container's pid 1, later processes join it. The supervisor:

* at start, becomes a child subreaper (the runtime's container processes are reparented to
  it, so it reaps them and records their exit codes as on the native path), takes a private
  mount namespace in which the hybrid host's cgroup2 mount (``/sys/fs/cgroup/unified``) is
  hidden (crun refuses that layout), and a network namespace of its own which the spec
  names by path (so endpoints attached to the supervisor's netns are the container's, as
  natively); it creates the container's cgroup as the native executor does (the runtime
  is given the same path in ``linux.cgroupsPath``), so statistics, pause, resume and
  process lists work from the start;
* on the first process, writes the bundle (``<run dir>/oci/config.json``: the spec with
  the process) and runs ``<rt> create`` then ``<rt> start``; the process's pipes are the
  runtime's stdin/stdout/stderr, which the container's init inherits; with a console the
  runtime's pty master arrives over ``--console-socket``;
* for later processes runs ``<rt> exec --detach --process``;
* signals the host pids itself, kills through the cgroup, and at the end runs
  ``<rt> delete --force``. The runtime's state (``--root``) lives under the container's run
  directory.

Differences from the native executor
------------------------------------
* ProcessConfig.User names are resolved by the supervisor against the container's
  ``/etc/passwd`` and ``/etc/group`` (in a forked child confined to the container's root),
  then handed to the runtime as numeric ids.
* ApplicationName replaces ``argv[0]`` (OCI has no separate executable path).
* A WorkingDirectory missing from the image is created by the runtime for the first
  process (as crun and runc do); natively, and for later processes, the process fails
  with ``WAIT_ERR_EXEC_FAILED``.
* HOME, when the process's environment has none, is ``/root`` for uid 0 and ``/``
  otherwise, as natively (the runtime would read the container's ``/etc/passwd``).
* A program that cannot be executed still gives a process that exits with
  ``WAIT_ERR_EXEC_FAILED`` and an ``exec_error`` (the runtime's message); its pid is a
  placeholder outside the container, since the runtime made none.
* The runtime's own error messages may also appear on the process's stderr (runc).
* Storage statistics count only I/O the runtime's cgroup setup counts.
* The container's pid 1 does not die with its supervisor (the runtime sets no parent-death
  signal); recovery kills it through the cgroup, as it does natively, but the runtime's
  ``delete`` does not run then.
* On cgroup v1 the runtime also makes cgroups in hierarchies pyhcs does not use (devices,
  name=systemd, ...). ``delete`` removes the container's; the shared parent stays, like
  pyhcs's own.
* In a user namespace, the runtime sets up the mounts as the namespace's root, which
  cannot reach the layer store (0700) and cannot mount sysfs for a network namespace it
  does not own. So the supervisor binds the rootfs at ``<run dir>/rootfs`` and mounts
  the container's sysfs (read-only, its own network namespace's view) itself, both in
  its private mount namespace; the run directory's path must be searchable by others
  (``create_container`` checks).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import signal
import socket
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import _linux as L
from .._errors import InvalidConfigError, NotSupportedError
from ._cgroups import _parent, manager, remove_everywhere
from ._native import (
    Sandbox,
    SpawnResult,
    _bring_up_loopback,
    _resources,
    resolve_user,
    secure_join,
)
from ._spec import UserNamespace

__all__ = ["RUNTIME_ANNOTATION", "RUNTIME_ENV", "OciSandbox", "OciSpawnResult",
           "resolve_runtime", "runtime_of", "create_sandbox", "destroy_sandbox", "spawn"]

#: The spec annotation holding the OCI runtime binary a container runs on (absent: native).
RUNTIME_ANNOTATION = "io.pyhcs.runtime"
#: The environment variable choosing the executor of new containers.
RUNTIME_ENV = "PYHCS_RUNTIME"
_UNIFIED = "/sys/fs/cgroup/unified"
_PYHCS_KEYS = ("pyhcsUser", "pyhcsExecutable")


def resolve_runtime(runtime: str | None = None, operation: str = "CreateContainer"
                    ) -> str | None:
    """The executor for a new container: None for native, else the OCI runtime binary's
    absolute path. *runtime* (or ``$PYHCS_RUNTIME`` when None) is ``native``, ``crun``,
    ``runc`` or an absolute path; an unknown name or a missing binary raises."""
    name = runtime if runtime is not None else os.environ.get(RUNTIME_ENV, "")
    name = name.strip() or "native"
    if name == "native":
        return None
    if name in ("crun", "runc"):
        path = shutil.which(name)
        if path is None:
            raise NotSupportedError(operation, message=f"runtime {name!r}: {name} is not "
                                    "installed (apt-get install " + name + ")")
        return os.path.abspath(path)
    if not name.startswith("/"):
        raise InvalidConfigError(operation, message=f"runtime {name!r}: not 'native', "
                                 "'crun', 'runc' or an absolute path")
    if not (os.path.isfile(name) and os.access(name, os.X_OK)):
        raise InvalidConfigError(operation, message=f"runtime {name!r} is not an "
                                 "executable file")
    return name


def runtime_of(spec: dict[str, Any]) -> str | None:
    """The OCI runtime binary *spec* was created for, or None (the native executor)."""
    value = spec.get("annotations", {}).get(RUNTIME_ANNOTATION)
    return value if isinstance(value, str) and value else None


@dataclass
class OciSandbox(Sandbox):
    """A started container whose processes an OCI runtime makes."""

    runtime: str = ""
    bundle: str = ""  # <run dir>/oci: config.json, process files, the runtime's state
    spec: dict[str, Any] | None = None
    created: bool = False  # the runtime knows the container (create has run)
    execs: int = 0
    #: the container processes spawn returned: the supervisor reaps those itself
    known: set[int] = field(default_factory=set)
    busy: bool = False  # in spawn: a child that exits now may be one of ours

    def close(self) -> None:
        """Nothing to release before the end (see :func:`destroy_sandbox`)."""


@dataclass(frozen=True)
class OciSpawnResult(SpawnResult):
    """A spawn result with the runtime's pty master (-1 without a console)."""

    console_master: int = -1


def _reap_strays(sb: OciSandbox) -> None:
    """Reap the runtime's helpers that were reparented to us (we are the subreaper) and
    exited: a zombie in the container's pid namespace keeps its pid 1 from ever finishing.
    Container processes (``sb.known``) are left to the supervisor."""
    if sb.busy:
        return
    me = os.getpid()
    try:
        with open(f"/proc/{me}/task/{me}/children") as f:
            children = [int(p) for p in f.read().split()]
    except OSError:
        return
    for pid in children:
        if pid not in sb.known:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, os.WNOHANG)


def _hide_unified() -> None:
    L.mount(None, "/", None, L.MS_REC | L.MS_PRIVATE, None)
    try:
        L.umount(_UNIFIED, L.MNT_DETACH)
    except OSError as e:
        if e.errno not in (errno.EINVAL, errno.ENOENT):
            raise
        return
    # An empty tmpfs over the mount point: the runtime (v1 mode) makes a "cgroup" for the
    # unified hierarchy there, which must not land in the host's /sys/fs/cgroup tmpfs.
    L.mount("tmpfs", _UNIFIED, "tmpfs", L.MS_NOSUID | L.MS_NODEV | L.MS_NOEXEC, "mode=755")


def _rootfs_for_userns(spec: dict[str, Any], run_dir: Path) -> None:
    """Give the runtime a rootfs the user namespace's root can reach, with sysfs mounted
    (see the module's docstring); changes *spec* to match. We are in our own mount
    namespace: nothing here is seen by the host, and it all goes with us."""
    rootfs = run_dir / "rootfs"
    rootfs.mkdir(mode=0o755, exist_ok=True)
    L.mount(spec["root"]["path"], str(rootfs), None, L.MS_BIND | L.MS_REC, None)
    spec["root"]["path"] = str(rootfs)
    sysfs = [m for m in spec.get("mounts", []) if m.get("type") == "sysfs"]
    for m in sysfs:
        # resolved inside the rootfs (an image's /sys may be a symlink): never outside it
        target = secure_join(str(rootfs), m["destination"])
        if not os.path.isdir(target) or os.path.islink(target):
            raise OSError(errno.ENOTDIR, f"{m['destination']} is not a directory in the image")
        L.mount("sysfs", target, "sysfs",
                L.MS_RDONLY | L.MS_NOSUID | L.MS_NODEV | L.MS_NOEXEC, None)
        spec["mounts"].remove(m)


def create_sandbox(container_id: str, spec: dict[str, Any], run_dir: Path) -> OciSandbox:
    """Prepare the container for its first process (the caller is its supervisor, which
    this moves into a private mount namespace and a new network namespace)."""
    runtime = runtime_of(spec)
    if runtime is None:
        raise InvalidConfigError("Start", message="the spec names no OCI runtime")
    L.prctl(L.PR_SET_CHILD_SUBREAPER, 1)
    net = any(ns.get("type") == "network" and not ns.get("path")
              for ns in spec["linux"]["namespaces"])
    L.unshare(L.CLONE_NEWNS | (L.CLONE_NEWNET if net else 0))
    _hide_unified()
    if net:
        _bring_up_loopback()
    spec = json.loads(json.dumps(spec))  # our own copy
    linux = spec["linux"]
    for ns in linux["namespaces"]:
        if ns["type"] == "network" and net:
            ns["path"] = f"/proc/{os.getpid()}/ns/net"
    linux["cgroupsPath"] = "/" + "/".join([*(p for p in _parent().split("/") if p),
                                           container_id])
    bundle = run_dir / "oci"
    bundle.mkdir(mode=0o700, exist_ok=True)
    if UserNamespace.from_spec(linux) is not None:
        _rootfs_for_userns(spec, run_dir)
    cg = manager().create(container_id, _resources(spec))
    sb = OciSandbox(container_id, cg, runtime=runtime, bundle=str(bundle), spec=spec)
    # between bytecodes, even while the supervisor waits in select()
    signal.signal(signal.SIGCHLD, lambda _sig, _frame: _reap_strays(sb))
    return sb


def _run(sb: OciSandbox, args: list[str], stdio: tuple[int, int, int] | None = None
         ) -> tuple[int, str]:
    """Run the runtime; its exit status and what it logged."""
    log = os.path.join(sb.bundle, "runtime.log")
    with contextlib.suppress(FileNotFoundError):
        os.unlink(log)
    cmd = [sb.runtime, "--root", os.path.join(sb.bundle, "state"), "--log", log,
           "--log-format", "json", *args]
    if stdio is None:
        r = subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                           stderr=subprocess.PIPE, check=False)
        text = r.stderr.decode(errors="replace")
    else:
        r = subprocess.run(cmd, stdin=stdio[0], stdout=stdio[1], stderr=stdio[2],
                           check=False)
        text = ""
    try:
        with open(log, "rb") as f:
            text = (f.read(65536).decode(errors="replace") + "\n" + text).strip()
    except FileNotFoundError:
        pass
    return r.returncode, text


def _message(log: str) -> str:
    """The last error the runtime logged (runc logs JSON or text, crun plain text)."""
    lines = [ln for ln in log.splitlines() if ln.strip()]
    for line in reversed(lines):
        try:
            entry = json.loads(line)
        except ValueError:
            return line.strip()
        if isinstance(entry, dict) and entry.get("level") in ("error", "fatal"):
            return str(entry.get("msg", line))
    return lines[-1].strip() if lines else "the runtime failed"


def _exec_errno(msg: str) -> int:
    low = msg.lower()
    if "permission denied" in low:
        return errno.EACCES
    if "not found" in low or "no such file" in low:
        return errno.ENOENT
    return errno.EIO


def _failed(msg: str) -> SpawnResult:
    """A process that could not start: a placeholder child that exits at once, so the
    supervisor reaps and records it like a native exec failure."""
    pid = os.fork()
    if pid == 0:
        os._exit(127)
    return SpawnResult(pid, _exec_errno(msg), msg)


def _resolve_user(sb: OciSandbox, user: str) -> tuple[int, int, list[int]]:
    """Resolve a user name inside the container's root: a forked child confined to it
    (chroot before pid 1 exists, pid 1's mount namespace after) reads the files."""
    r, w = os.pipe2(os.O_CLOEXEC)
    pid = os.fork()
    if pid == 0:
        try:
            os.close(r)
            if sb.init_pid:
                fd = os.open(f"/proc/{sb.init_pid}/ns/mnt", os.O_RDONLY | os.O_CLOEXEC)
                L.setns(fd, L.CLONE_NEWNS)  # also sets our root to the container's
            else:
                assert sb.spec is not None
                os.chroot(sb.spec["root"]["path"])
            os.chdir("/")
            uid, gid, groups = resolve_user(user)
            os.write(w, json.dumps([uid, gid, groups]).encode())
            os._exit(0)
        except BaseException as e:
            with contextlib.suppress(BaseException):
                code = e.errno if isinstance(e, OSError) and e.errno else errno.EINVAL
                os.write(w, json.dumps({"errno": code, "error": str(e)}).encode())
            os._exit(1)
    os.close(w)
    try:
        data = os.read(r, 1 << 16)
    finally:
        os.close(r)
        os.waitpid(pid, 0)
    out = json.loads(data) if data else {"errno": errno.EIO, "error": "user lookup failed"}
    if isinstance(out, dict):
        raise OSError(int(out["errno"]), str(out["error"]))
    return int(out[0]), int(out[1]), [int(g) for g in out[2]]


def _oci_process(sb: OciSandbox, process: dict[str, Any]) -> dict[str, Any]:
    """*process* without pyhcs's own keys, which OCI runtimes do not know."""
    proc = {k: v for k, v in process.items() if k not in _PYHCS_KEYS}
    exe = process.get("pyhcsExecutable")
    if exe:
        proc["args"] = [exe, *process["args"][1:]]
    user = process.get("pyhcsUser")
    if user:
        uid, gid, groups = _resolve_user(sb, user)
        proc["user"] = {"uid": uid, "gid": gid, **({"additionalGids": groups} if groups
                                                     else {})}
    env = list(proc.get("env", []))
    if not any(e.startswith("HOME=") for e in env):
        # as the native runtime; left unset, crun and runc would look HOME up in the
        # container's /etc/passwd themselves, which its root may have made a FIFO
        uid = int(proc.get("user", {}).get("uid", 0))
        proc["env"] = [*env, "HOME=/root" if uid == 0 else "HOME=/"]
    return proc


def _read_pid(path: str) -> int:
    with open(path) as f:
        return int(f.read().strip())


def _console_listener(sb: OciSandbox, n: int) -> tuple[socket.socket, str, int]:
    path = os.path.join(sb.bundle, f"console-{n}.sock")
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    dfd = os.open(sb.bundle, os.O_PATH | os.O_CLOEXEC)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    # the bundle's path may be too long for sun_path: address it through our fd
    addr = f"/proc/{os.getpid()}/fd/{dfd}/console-{n}.sock"
    sock.bind(addr)
    sock.listen(1)
    return sock, addr, dfd


def _receive_console(sock: socket.socket) -> int:
    sock.setblocking(False)
    try:
        conn, _ = sock.accept()
    except BlockingIOError:
        raise OSError(errno.EIO, "the runtime sent no console") from None
    with conn:
        conn.setblocking(True)
        _, fds, _, _ = socket.recv_fds(conn, 4096, 1)
    if not fds:
        raise OSError(errno.EIO, "the runtime sent no console")
    os.set_inheritable(fds[0], False)
    return fds[0]


def spawn(sb: Sandbox, process: dict[str, Any], stdio: tuple[int, int, int], *,
          console: int = -1, meanwhile: Callable[[], None] | None = None) -> SpawnResult:
    """Start *process* through the OCI runtime (see :func:`pyhcs._runtime._native.spawn`
    for the contract; *meanwhile* is called before the runtime runs, which cannot be
    interleaved with). With *console* >= 0 the result is an :class:`OciSpawnResult`
    whose ``console_master`` is the runtime's pty master, to be used instead of the
    caller's."""
    assert isinstance(sb, OciSandbox) and sb.spec is not None
    if sb.created and not sb.init_pid:
        raise OSError(errno.ESRCH, "the container has stopped")
    if meanwhile is not None:
        meanwhile()
    sb.busy = True
    try:
        result = _spawn(sb, process, stdio)
        sb.known.add(result.pid)
        return result
    finally:
        sb.busy = False
        _reap_strays(sb)


def _spawn(sb: OciSandbox, process: dict[str, Any], stdio: tuple[int, int, int]
           ) -> SpawnResult:
    try:
        proc = _oci_process(sb, process)
    except OSError as e:
        return _failed(e.strerror or str(e))
    sb.execs += 1
    n = sb.execs
    pid_file = os.path.join(sb.bundle, f"pid-{n}")
    terminal = bool(proc.get("terminal"))
    listener: socket.socket | None = None
    dfd = -1
    args: list[str] = []
    try:
        if terminal:
            listener, addr, dfd = _console_listener(sb, n)
            args = ["--console-socket", addr]
            null = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
            try:
                return _start(sb, proc, n, pid_file, args, (null, null, null), listener)
            finally:
                os.close(null)
        return _start(sb, proc, n, pid_file, args, stdio, None)
    finally:
        if listener is not None:
            listener.close()
            os.close(dfd)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(sb.bundle, f"console-{n}.sock"))


def _start(sb: OciSandbox, proc: dict[str, Any], n: int, pid_file: str, extra: list[str],
           stdio: tuple[int, int, int], listener: socket.socket | None) -> SpawnResult:
    assert sb.spec is not None
    first = not sb.created
    if first:
        with open(os.path.join(sb.bundle, "config.json"), "w") as f:
            json.dump({**sb.spec, "process": proc}, f)
        sb.created = True
        code, log = _run(sb, ["create", "--bundle", sb.bundle, "--pid-file", pid_file,
                              *extra, sb.container_id], stdio)
    else:
        proc_file = os.path.join(sb.bundle, f"process-{n}.json")
        with open(proc_file, "w") as f:
            json.dump(proc, f)
        code, log = _run(sb, ["exec", "--detach", "--pid-file", pid_file,
                              "--process", proc_file, *extra, sb.container_id], stdio)
        os.unlink(proc_file)
    if code != 0:
        return _failed(_message(log))
    try:
        pid = _read_pid(pid_file)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(pid_file)
    master = _receive_console(listener) if listener is not None else -1
    if first:
        sb.init_pid = pid
        code, log = _run(sb, ["start", sb.container_id])
        if code != 0:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, 9)
            if master >= 0:
                os.close(master)
            # the init is reaped by the supervisor: report it as failed to execute
            msg = _message(log)
            return SpawnResult(pid, _exec_errno(msg), msg)
    return OciSpawnResult(pid, console_master=master)


def destroy_sandbox(sb: Sandbox) -> None:
    """Release the container: the runtime's record of it, its processes, its cgroup.
    Raises OSError if the cgroup cannot be removed (the caller reports it)."""
    assert isinstance(sb, OciSandbox)
    if sb.created:
        sb.busy = True  # the runtime's exit is subprocess's to collect, not the reaper's
        try:
            _run(sb, ["delete", "--force", sb.container_id])
        finally:
            sb.busy = False
    sb.init_pid = 0
    try:
        sb.cgroup.kill_all()
        sb.cgroup.remove()
    finally:
        remove_everywhere(sb.container_id)  # what the runtime made in other hierarchies
