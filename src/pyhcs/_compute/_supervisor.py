"""The supervisor: one per running container, the parent of all its processes.

It is forked ahead of need (a new session, no inherited fds: it outlives its client): each
client keeps one spare supervisor idle, hands it the next container to start and has the
next spare forked meanwhile, by a forker process of its own (see "the spare supervisor"
below). It owns the
container's namespaces and cgroup, reaps every process it spawns, records exits in the
run directory and serves clients over a unix socket there. Clients
may come and go; nothing is lost when the creating client exits. When the container's
init exits (or the container is terminated) the supervisor records the result, removes the
cgroup, answers every waiter, and exits.

If the supervisor itself is killed, the container's init dies with it (PDEATHSIG) and the
next client to look finds the supervisor gone and runs recovery: exit code 255.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import gc
import io
import json
import os
import selectors
import signal
import socket
import struct
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from .. import _linux as L
from .._errors import WAIT_ERR_EXEC_FAILED
from .._paths import Roots
from .._runtime._cgroups import manager as cgroup_manager
from .._runtime._cgroups import namespace_mounts as cgroup_namespace_mounts
from .._runtime._native import (
    Sandbox,
    Stub,
    create_sandbox,
    destroy_sandbox,
    discard_stub,
    namespace_flags,
    prepare_stub,
    spawn,
)
from .._runtime._seccomp import compile_seccomp
from .._runtime._spec import NAMESPACES
from . import _protocol as P
from ._log import ContainerLog

__all__ = ["close_spare", "keep_spare", "launch", "process_start_time", "read_status",
           "reap_supervisors", "SUPERVISOR_SOCKET", "STATUS_FILE"]

SUPERVISOR_SOCKET = "sup.sock"
#: The supervisor's record of the container, replaced atomically on every change. The
#: supervisor never opens the registry: SQLite's per-process lock state does not survive
#: fork(), so clients fold this file into the registry when they look (``_sync``).
STATUS_FILE = "status.json"
#: _oci.RUNTIME_ANNOTATION, without importing _oci (only an OCI runtime's container needs it)
_RUNTIME_ANNOTATION = "io.pyhcs.runtime"
_TIOCSWINSZ = 0x5414
_TIOCSPTLCK = 0x40045431
_TIOCGPTPEER = 0x5441


def process_start_time(pid: int) -> int | None:
    """The start time (clock ticks since boot) of *pid*, or None if it does not exist or
    has exited (a zombie is not alive)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    fields = data.rsplit(b")", 1)[1].split()
    if fields[0] in (b"Z", b"X"):
        return None
    return int(fields[19])


def read_status(run_dir: Path) -> dict[str, Any] | None:
    """The supervisor's last status record for a container, or None."""
    try:
        data = (run_dir / STATUS_FILE).read_bytes()
    except FileNotFoundError:
        return None
    try:
        status = json.loads(data)
    except ValueError:
        return None
    return status if isinstance(status, dict) else None


def _inner_pid(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("NSpid:"):
                    return int(line.split()[-1])
    except OSError:
        pass
    return pid


def _exit_code(status: int) -> int:
    if os.WIFSIGNALED(status):
        return 128 + os.WTERMSIG(status)
    return os.waitstatus_to_exitcode(status)


@dataclass
class _Proc:
    pid: int
    inner_pid: int
    pidfd: int
    config: dict[str, Any]
    stdin_w: int = -1
    stdout_r: int = -1
    stderr_r: int = -1
    console: int = -1
    exit_code: int | None = None
    exec_error: str = ""
    created: float = field(default_factory=time.time)
    finished: float | None = None
    waiters: list[socket.socket] = field(default_factory=list)

    def client_fds(self) -> tuple[list[int], dict[str, bool]]:
        fds = []
        which = {}
        for name, fd in (("stdin", self.stdin_w), ("stdout", self.stdout_r),
                         ("stderr", self.stderr_r)):
            which[name] = fd >= 0
            if fd >= 0:
                fds.append(fd)
        return fds, which

    def close_fds(self) -> None:
        for attr in ("stdin_w", "stdout_r", "stderr_r", "console"):
            fd = getattr(self, attr)
            if fd >= 0:
                os.close(fd)
                setattr(self, attr, -1)


class Supervisor:
    def __init__(self, container_id: str, roots: Roots, spec: dict[str, Any],
                 seccomp_bpf: bytes = b"", stub: Stub | None = None) -> None:
        self.id = container_id
        self.stub = stub  # the namespaces and pid 1 made ahead, if any (native only)
        self.seccomp_bpf = seccomp_bpf
        self.roots = roots
        self.spec = spec
        self.run_dir = roots.container_run_dir(container_id)
        self.sel = selectors.DefaultSelector()
        self.procs: dict[int, _Proc] = {}  # by host pid
        self.init_pid = 0
        self.stub_fd = -1  # watches pid 1 until it runs the first process
        self.stub_exit_code = 0  # how pid 1 ended if it never ran one
        self.container_waiters: list[socket.socket] = []
        self.sandbox: Sandbox | None = None
        self.stopping = False
        self.done = False
        self.exit_type = ""
        self.listener: socket.socket | None = None
        self.started = 0.0
        self.paused = False
        self.log: ContainerLog | None = None  # the container log (see _log), once asked for
        # executor choice (see _runtime._oci): native unless the spec names an OCI runtime
        self._spawn = spawn
        self._destroy = destroy_sandbox

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        # the socket first, in the host's mount namespace (create_sandbox makes ours)
        self._listen()
        try:
            # executor choice: the spec names an OCI runtime or not (native); _oci is
            # imported only for the former
            stub, self.stub = self.stub, None
            if _RUNTIME_ANNOTATION not in self.spec.get("annotations", {}):
                self.sandbox = create_sandbox(self.id, self.spec, seccomp_bpf=self.seccomp_bpf,
                                              stub=stub)
            else:
                from .._runtime import _oci

                if stub is not None:  # launch never sends an OCI runtime's container here
                    discard_stub(stub)
                    raise OSError(errno.EINVAL, "an OCI runtime needs the host's namespaces")

                self.sandbox = _oci.create_sandbox(self.id, self.spec, self.run_dir)
                self._spawn, self._destroy = _oci.spawn, _oci.destroy_sandbox
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(self.run_dir / SUPERVISOR_SOCKET)
            raise
        # Pid 1 waits for the first process; if it dies before that (killed from the host,
        # say), the container has ended: watched from now, not from the first process on.
        if self.sandbox.init_pid:
            self.stub_fd = os.pidfd_open(self.sandbox.init_pid)
            self.sel.register(self.stub_fd, selectors.EVENT_READ, ("stub", None))
        # no status file yet: the client records 'running' itself, and a missing file with
        # a live supervisor means just that
        self.started = time.time()

    def _unwatch_stub(self) -> None:
        if self.stub_fd >= 0:
            self.sel.unregister(self.stub_fd)
            os.close(self.stub_fd)
            self.stub_fd = -1

    def _stub_exited(self) -> None:
        """Pid 1 ended before any process ran in the container: the container has ended."""
        self._unwatch_stub()
        if self.init_pid or self.sandbox is None:
            return  # it became the first process, whose own watch reports its exit
        try:
            _, status = os.waitpid(self.sandbox.init_pid, 0)
            self.stub_exit_code = _exit_code(status)
        except ChildProcessError:
            self.stub_exit_code = 255
        if self.sandbox.init_sock is not None:  # nothing left to tell it, nor to reap later
            self.sandbox.init_sock.close()
            self.sandbox.init_sock = None
        self.stopping = True
        self.sandbox.cgroup.kill_all()

    def _listen(self) -> None:
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        path = str(self.run_dir / SUPERVISOR_SOCKET)
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        addr, dfd = P.address(path)
        try:
            self.listener.bind(addr)
        finally:
            if dfd >= 0:
                os.close(dfd)
        os.chmod(path, 0o600)
        self.listener.listen(64)
        self.listener.setblocking(False)
        self.sel.register(self.listener, selectors.EVENT_READ, ("accept", None))

    def _status(self, state: str, **extra: Any) -> dict[str, Any]:
        return {
            "state": state, "pid": os.getpid(), "start": process_start_time(os.getpid()),
            "started": self.started, "exit_type": self.exit_type,
            "processes": [
                {"pid": p.pid, "inner_pid": p.inner_pid, "config": p.config,
                 "exit_code": p.exit_code, "created": p.created, "finished": p.finished}
                for p in self.procs.values() if p.exit_code is not None
            ],
            **extra,
        }

    def _write_status(self, status: dict[str, Any]) -> None:
        tmp = self.run_dir / f".{STATUS_FILE}.tmp"
        tmp.write_text(json.dumps(status))
        os.rename(tmp, self.run_dir / STATUS_FILE)

    def loop(self) -> None:
        while not self.done:
            for key, _ in self.sel.select():
                kind, obj = key.data
                try:
                    if kind == "accept":
                        self._accept()
                    elif kind == "conn":
                        self._serve(key.fileobj)  # type: ignore[arg-type]
                    elif kind == "exit":
                        self._reap(obj)
                    elif kind == "stub":
                        self._stub_exited()
                    elif kind == "log":
                        self._drain_log(obj)
                except Exception:
                    traceback.print_exc()
            if self.stopping and not self.procs_alive():
                self._finish()

    def procs_alive(self) -> bool:
        return any(p.exit_code is None for p in self.procs.values())

    def _finish(self) -> None:
        """Record the container's end, answer waiters, release its kernel state."""
        init = self.procs.get(self.init_pid)
        code = init.exit_code if init and init.exit_code is not None else self.stub_exit_code
        sb = self.sandbox
        self._close_log()  # before any waiter learns of the end: the log is complete
        if not self.exit_type:
            oom = False
            if sb is not None:
                try:
                    oom = sb.cgroup.oom_killed()
                except OSError:
                    pass
            self.exit_type = "OOMKilled" if oom and code == 137 else "Exited"
        status = self._status("stopped", exit_code=code, finished=time.time())
        # Every process is gone, so clients learn the end first: the waiters get the final
        # record itself (they fold it into the registry), the record is written, and the
        # socket goes, so a client that comes later finds no socket and reads the record
        # instead of waiting out the teardown. The cgroup and namespaces are released last
        # (a new container of the same id waits for the cgroup to go: see _native).
        for w in self.container_waiters:
            self._reply(w, {"exit_code": code, "exit_type": self.exit_type, "status": status})
        self.container_waiters.clear()
        self._write_status(status)
        for key in list(self.sel.get_map().values()):
            if key.data[0] == "conn":  # a request we will not serve: the client reads the record
                self._drop(key.fileobj)  # type: ignore[arg-type]
        if self.listener is not None:
            self.sel.unregister(self.listener)
            with contextlib.suppress(OSError):
                os.unlink(self.run_dir / SUPERVISOR_SOCKET)
            self.listener.close()
            self.listener = None
        if sb is not None:
            self._destroy(sb)
            self.sandbox = None
        self.done = True

    # -- connections -------------------------------------------------------------------------

    def _accept(self) -> None:
        if self.listener is None:
            return  # closed by _finish in this same round of events
        try:
            conn, _ = self.listener.accept()
        except BlockingIOError:
            return
        conn.setblocking(True)
        self.sel.register(conn, selectors.EVENT_READ, ("conn", None))

    def _drop(self, conn: socket.socket) -> None:
        try:
            self.sel.unregister(conn)
        except (KeyError, ValueError):
            pass
        conn.close()

    def _reply(self, conn: socket.socket, obj: dict[str, Any], fds: list[int] | None = None
               ) -> None:
        try:
            P.send(conn, obj, fds)
        except OSError:
            pass  # the client went away; its loss
        self._drop(conn)

    def _serve(self, conn: socket.socket) -> None:
        try:
            req, fds = P.recv(conn)
        except (OSError, ValueError):
            self._drop(conn)
            return
        for fd in fds:
            os.close(fd)
        if req is None:
            # a waiter hung up (timeout): forget it
            for p in self.procs.values():
                if conn in p.waiters:
                    p.waiters.remove(conn)
            if conn in self.container_waiters:
                self.container_waiters.remove(conn)
            self._drop(conn)
            return
        op = req.get("op")
        handler = getattr(self, f"_op_{op}", None)
        if handler is None:
            self._reply(conn, {"error": f"unknown operation {op!r}", "errno": errno.EINVAL})
            return
        try:
            handler(conn, req)
        except OSError as e:
            self._reply(conn, {"error": str(e), "errno": e.errno or errno.EIO})
        except Exception as e:
            traceback.print_exc()
            self._reply(conn, {"error": f"{type(e).__name__}: {e}", "errno": errno.EIO})

    def _find(self, req: dict[str, Any]) -> _Proc:
        pid = req.get("pid")
        if pid is None:
            p = self.procs.get(self.init_pid)
        else:
            p = next((q for q in reversed(self.procs.values()) if q.inner_pid == pid), None)
        if p is None:
            raise OSError(errno.ESRCH, f"no process {pid} in the container")
        return p

    # -- operations --------------------------------------------------------------------------

    def _op_exec(self, conn: socket.socket, req: dict[str, Any]) -> None:
        if self.stopping or self.sandbox is None:
            raise OSError(errno.ESRCH, "the container is stopping")
        process = req["process"]
        child_fds: list[int] = []
        ours: dict[str, int] = {}
        console = -1
        try:
            if process.get("terminal"):
                master, slave = self._openpty()
                os.set_blocking(master, True)
                child_fds.append(slave)
                cs = process.get("consoleSize")
                if cs:
                    _resize(master, cs["width"], cs["height"])
                stdio = (slave, slave, slave)
                ours = {"stdin": master, "stdout": os.dup(master)}
                console = slave
            else:
                io = []
                # stdout and stderr that have no pipe go to the container log, if asked
                log_w = self._log_writer(child_fds) if req.get("log") else -1
                for name, want in (("stdin", req.get("stdin")), ("stdout", req.get("stdout")),
                                   ("stderr", req.get("stderr"))):
                    if want:
                        r, w = os.pipe2(os.O_CLOEXEC)
                        if name != "stdin":
                            _widen_pipe(r)
                        theirs, mine = (r, w) if name == "stdin" else (w, r)
                        child_fds.append(theirs)
                        ours[name] = mine
                        io.append(theirs)
                    elif log_w >= 0 and name != "stdin":
                        io.append(log_w)
                    else:
                        fd = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
                        child_fds.append(fd)
                        io.append(fd)
                stdio = (io[0], io[1], io[2])
            result = self._spawn(self.sandbox, process, stdio, console=console)
        except BaseException:
            for fd in [*child_fds, *ours.values()]:
                os.close(fd)
            raise
        for fd in child_fds:
            os.close(fd)
        master = getattr(result, "console_master", -1)
        if master >= 0:
            # executor choice: an OCI runtime made its own pty (_oci.OciSpawnResult); it
            # replaces ours
            for fd in (ours["stdin"], ours["stdout"]):
                os.dup2(master, fd, inheritable=False)
            os.close(master)
        first = not self.init_pid
        if first:
            self.init_pid = result.pid
            self._unwatch_stub()  # the process's own watch below takes over
        pidfd = os.pidfd_open(result.pid)
        p = _Proc(result.pid, _inner_pid(result.pid), pidfd, process,
                  stdin_w=ours.get("stdin", -1), stdout_r=ours.get("stdout", -1),
                  stderr_r=ours.get("stderr", -1), exec_error=result.exec_error)
        if process.get("terminal"):
            p.console = os.dup(ours["stdin"])
        self.procs[result.pid] = p
        self.sel.register(pidfd, selectors.EVENT_READ, ("exit", result.pid))
        fds, which = p.client_fds()
        self._reply(conn, {"pid": p.inner_pid, "host_pid": p.pid, "init": first,
                           "exec_error": result.exec_error, "exec_errno": result.exec_errno,
                           "fds": which}, fds)

    # -- the container log (see _log) -------------------------------------------------------

    def _log_writer(self, child_fds: list[int]) -> int:
        """The write end of a new pipe into the container log, for a process's stdout and
        stderr (added to *child_fds*, which are closed once the process is spawned)."""
        if self.log is None:
            self.log = ContainerLog(self.run_dir)
        r, w = self.log.pipe()
        child_fds.append(w)
        self.sel.register(r, selectors.EVENT_READ, ("log", r))
        return w

    def _drain_log(self, r: int) -> None:
        if self.log is not None and not self.log.drain(r):
            self.sel.unregister(r)
            self.log.release(r)

    def _close_log(self) -> None:
        if self.log is not None:
            for r in self.log.close():
                self.sel.unregister(r)
                self.log.release(r)
            self.log = None

    def _openpty(self) -> tuple[int, int]:
        """A pty from the container's own devpts (so it has a name inside, and the
        container holds nothing of the host's), else from the host's."""
        ptmx = os.path.join(self.spec["root"]["path"], "dev/pts/ptmx")
        if self._spawn is not spawn or not os.path.exists(ptmx):
            return os.openpty()  # an OCI runtime hands back its own console
        master = os.open(ptmx, os.O_RDWR | os.O_NOCTTY | os.O_CLOEXEC)
        try:
            fcntl.ioctl(master, _TIOCSPTLCK, struct.pack("i", 0))  # unlockpt
            # the peer by fd, not by a path the container could have replaced
            slave = fcntl.ioctl(master, _TIOCGPTPEER, os.O_RDWR | os.O_NOCTTY | os.O_CLOEXEC)
        except BaseException:
            os.close(master)
            raise
        return master, slave

    def _op_stdio(self, conn: socket.socket, req: dict[str, Any]) -> None:
        p = self._find(req)
        fds, which = p.client_fds()
        self._reply(conn, {"fds": which}, fds)

    def _op_close_stdin(self, conn: socket.socket, req: dict[str, Any]) -> None:
        p = self._find(req)
        if p.stdin_w >= 0:
            os.close(p.stdin_w)
            p.stdin_w = -1
        self._reply(conn, {})

    def _op_resize(self, conn: socket.socket, req: dict[str, Any]) -> None:
        p = self._find(req)
        if p.console < 0:
            raise OSError(errno.ENOTTY, "the process has no console")
        _resize(p.console, int(req["width"]), int(req["height"]))
        self._reply(conn, {})

    def _op_signal(self, conn: socket.socket, req: dict[str, Any]) -> None:
        p = self._find(req)
        if p.exit_code is not None:
            raise OSError(errno.ESRCH, "the process has already exited")
        os.kill(p.pid, int(req.get("signal", signal.SIGKILL)))
        self._reply(conn, {})

    def _op_wait(self, conn: socket.socket, req: dict[str, Any]) -> None:
        if req.get("pid") is None:  # the container's end
            self.container_waiters.append(conn)
            return
        p = self._find(req)
        if p.exit_code is not None:
            self._reply(conn, {"exit_code": p.exit_code})
        else:
            p.waiters.append(conn)

    def _op_process(self, conn: socket.socket, req: dict[str, Any]) -> None:
        p = self._find(req)
        self._reply(conn, {"pid": p.inner_pid, "host_pid": p.pid, "exit_code": p.exit_code,
                           "exec_error": p.exec_error, "config": p.config})

    def _op_shutdown(self, conn: socket.socket, req: dict[str, Any]) -> None:
        init = self.procs.get(self.init_pid)
        if init is not None and init.exit_code is None:
            os.kill(init.pid, signal.SIGTERM)
            self.exit_type = self.exit_type or "GracefulExit"
        else:
            self.exit_type = self.exit_type or "GracefulExit"
            self.stopping = True
            if self.sandbox is not None:
                self.sandbox.close()
        self._reply(conn, {})

    def _op_terminate(self, conn: socket.socket, req: dict[str, Any]) -> None:
        self.exit_type = self.exit_type or "Terminated"
        self.stopping = True
        if self.sandbox is not None:
            self.sandbox.cgroup.kill_all()
            self.sandbox.close()  # a pid 1 still waiting for its process leaves too
        self._reply(conn, {})

    def _op_pause(self, conn: socket.socket, req: dict[str, Any]) -> None:
        assert self.sandbox is not None
        self.sandbox.cgroup.freeze()
        self.paused = True
        self._write_status(self._status("paused"))
        self._reply(conn, {})

    def _op_resume(self, conn: socket.socket, req: dict[str, Any]) -> None:
        assert self.sandbox is not None
        self.sandbox.cgroup.thaw()
        self.paused = False
        self._write_status(self._status("running"))
        self._reply(conn, {})

    # -- exits -------------------------------------------------------------------------------

    def _reap(self, pid: int) -> None:
        p = self.procs[pid]
        reaped, status = os.waitpid(pid, os.WNOHANG)
        if reaped == 0:
            return  # not yet (a spurious wakeup)
        self.sel.unregister(p.pidfd)
        os.close(p.pidfd)
        p.finished = time.time()
        if p.exec_error:
            p.exit_code = WAIT_ERR_EXEC_FAILED
        else:
            p.exit_code = _exit_code(status) if status >= 0 else 255
        for w in p.waiters:
            self._reply(w, {"exit_code": p.exit_code})
        p.waiters.clear()
        if pid == self.init_pid:
            self.stopping = True
            if self.sandbox is not None:
                self.sandbox.cgroup.kill_all()
        else:
            # an exec'd process: its pipes are the clients' now; record its exit
            p.close_fds()
            self._write_status(self._status("paused" if self.paused else "running"))


def _resize(fd: int, width: int, height: int) -> None:
    fcntl.ioctl(fd, _TIOCSWINSZ, struct.pack("HHHH", height, width, 0, 0))


def _detach(keep: int) -> None:
    """Leave the client behind: new session, no inherited fds but *keep*, /dev/null stdio,
    default signals."""
    os.setsid()
    for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT, signal.SIGCHLD,
              signal.SIGUSR1, signal.SIGUSR2):
        signal.signal(s, signal.SIG_DFL)
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_SETMASK, set())
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    L.close_range_from(3, keep=(keep,))
    os.chdir("/")


# Supervisors this process forked. A supervisor is our child (one fork, not two: a fork of
# a Python process costs milliseconds), and leaves its session, signals and fds behind at
# once; when we exit it passes to init. While we live we reap the ones that finished.
_children: set[int] = set()


def reap_supervisors() -> None:
    """Collect the exit of every supervisor this process forked that has finished."""
    for pid in list(_children):
        try:
            done, _ = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            done = pid  # someone else reaped it (a waitpid(-1) in the application)
        if done:
            _children.discard(pid)


# -- the spare supervisor ------------------------------------------------------------------
#
# A forked Python process spends milliseconds copying the pages it writes to before it does
# anything useful, and detaching costs more. So a client keeps one supervisor forked
# ahead of need: detached and idle, it waits on a socket for the container it will
# supervise. Starting a container hands the spare its work and asks for the next spare
# while the container starts. A spare exits when its client closes the socket or exits.
#
# While it waits, a spare also makes what every native container needs and no spec changes:
# the pid, net, ipc and uts namespaces, the loopback device up, and the container's pid 1
# (see _native.prepare_stub). So those are off the start path too. It cannot leave those
# namespaces again: a container on an OCI runtime, or with other namespaces, gets a
# supervisor forked for it instead, and the spare waits for the next one.
#
# Spares are not forked by the client itself but by its forker, a child forked once that
# only forks spares. A fork marks every page of the forking process copy-on-write, so a
# client that forked each spare itself would pay a page fault for every page it wrote to
# afterwards, on its own start path, once per container. The forker writes next to
# nothing between forks. It reaps the supervisors it forked and, once its client has gone,
# stays until they have all ended, so that no finished supervisor is left unreaped.

#: the namespaces a spare makes ahead: those of every container pyhcs specifies
_SPARE_FLAGS = namespace_flags({"linux": {"namespaces": [{"type": t} for t in NAMESPACES]}})


@dataclass
class _Spare:
    pid: int
    sock: socket.socket
    flags: int  #: the namespaces it made ahead (0: none, it can start any container)
    ours: bool = True  #: our child (forked here), not the forker's


@dataclass
class _Forker:
    pid: int
    sock: socket.socket
    pending: bool = False  #: a spare was asked for and its reply not read yet


_spare: _Spare | None = None
_forker: _Forker | None = None
_keep_spare = True


def keep_spare(enabled: bool) -> None:
    """Whether this process keeps a spare supervisor forked ahead (the default). A program
    that starts one container and exits (the CLI) gains nothing from one."""
    global _keep_spare
    _keep_spare = enabled
    if not enabled:
        close_spare()


def close_spare() -> None:
    """End this process's spare supervisor and its forker, if any, and wait for them to
    go (the forker stays while supervisors of running containers that it forked live)."""
    global _spare, _forker
    spare, _spare = _spare, None
    forker, _forker = _forker, None
    if forker is not None and forker.pending and spare is None:
        spare = _receive_spare(forker)
    if spare is not None:
        _end_spare(spare)
    if forker is not None:
        forker.sock.close()  # it sees end of file and exits, once its supervisors have
        deadline = time.monotonic() + 1
        while time.monotonic() < deadline:
            with contextlib.suppress(ChildProcessError):
                if os.waitpid(forker.pid, os.WNOHANG)[0]:
                    _children.discard(forker.pid)
                    break
            time.sleep(0.002)


def _end_spare(spare: _Spare) -> None:
    spare.sock.close()  # the spare sees end of file and exits
    if spare.ours:
        with contextlib.suppress(ChildProcessError):
            os.waitpid(spare.pid, 0)
        _children.discard(spare.pid)
        return
    try:  # the forker's child: wait for its end without reaping it
        fd = os.pidfd_open(spare.pid)
    except ProcessLookupError:
        return
    try:
        with selectors.DefaultSelector() as sel:
            sel.register(fd, selectors.EVENT_READ)
            sel.select(10)
    finally:
        os.close(fd)


def _forget_spare_after_fork() -> None:
    # A child of this process (the application's fork, a supervisor, the forker) must not
    # hand work to our spare or ask our forker for one: drop its copies of the sockets.
    global _spare, _forker
    for held in (_spare, _forker):
        if held is not None:
            with contextlib.suppress(OSError):
                held.sock.close()
    _spare = _forker = None


os.register_at_fork(after_in_child=_forget_spare_after_fork)


def _ask_forker() -> None:
    """Ask the forker (forked now if there is none) for the next spare; its reply is read
    when the spare is needed (:func:`_take_spare`)."""
    global _forker
    if _forker is None:
        _before_fork()
        ours, theirs = socket.socketpair(socket.AF_UNIX,
                                         socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        pid = _fork_child(_forker_main, theirs, close=(ours,))
        theirs.close()
        _children.add(pid)
        _forker = _Forker(pid, ours)
    try:
        _forker.sock.send(b"%d" % _SPARE_FLAGS, socket.MSG_NOSIGNAL)
        _forker.pending = True
    except OSError:  # it died (killed by someone): the next start forks its own
        _drop_forker()


def _drop_forker() -> None:
    global _forker
    if _forker is not None:
        _forker.sock.close()
        _forker = None


def _receive_spare(forker: _Forker) -> _Spare | None:
    forker.pending = False
    try:
        msg, fds, _, _ = socket.recv_fds(forker.sock, 64, 1)
    except OSError:
        msg, fds = b"", []
    if not msg or not fds:
        for fd in fds:
            os.close(fd)
        _drop_forker()
        return None
    pid, flags = struct.unpack("<ii", msg)
    return _Spare(pid, socket.socket(fileno=fds[0]), flags, ours=False)


def spare_pid() -> int | None:
    """The pid of this process's spare supervisor, if it has one (for tests and
    diagnostics; a spare asked of the forker is received first)."""
    global _spare
    if _spare is None:
        _spare = _take_spare()
    return _spare.pid if _spare is not None else None


def _take_spare() -> _Spare | None:
    """The spare to start the next container: the one at hand, or the forker's reply."""
    global _spare
    spare, _spare = _spare, None
    if spare is None and _forker is not None and _forker.pending:
        spare = _receive_spare(_forker)
    return spare


def _forker_main(sock: socket.socket) -> int:
    """Fork a spare for each request on *sock* and send back its socket, until the client
    closes *sock*; then wait for every supervisor forked here to end."""
    _detach(sock.fileno())
    gc.freeze()  # the inherited heap stays shared with the client (no GC writes)
    # Supervisors end at any time: reap them as they do (SIGCHLD interrupts recv, which
    # Python resumes after the handler).
    signal.signal(signal.SIGCHLD, lambda *_: _reap_any())
    while data := sock.recv(64):
        flags = int(data)
        ours, theirs = socket.socketpair(socket.AF_UNIX,
                                         socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        # (the child's SIGCHLD goes back to the default in _spare_main's _detach; the
        # forker is single-threaded, so the spare can skip Python's after-fork work)
        pid = _fork_child(_spare_main, theirs, flags, close=(sock, ours), bare=True)
        theirs.close()
        try:
            socket.send_fds(sock, [struct.pack("<ii", pid, flags)], [ours.fileno()])
        except OSError:
            break
        finally:
            ours.close()
    sock.close()
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    while True:
        try:
            os.waitpid(-1, 0)
        except ChildProcessError:
            return 0


def _reap_any() -> None:
    while True:
        try:
            if os.waitpid(-1, os.WNOHANG)[0] == 0:
                return
        except ChildProcessError:
            return


def _send_frame(sock: socket.socket, data: bytes) -> None:
    # no SIGPIPE if the peer is gone (an application may not ignore it as Python does)
    sock.sendall(struct.pack("<Q", len(data)) + data, socket.MSG_NOSIGNAL)


def _recv_frame(sock: socket.socket) -> bytes:
    """One length-prefixed message, or b"" if the peer closed the socket before sending."""
    head = _recv_exactly(sock, 8)
    if not head:
        return b""
    (size,) = struct.unpack("<Q", head)
    body = _recv_exactly(sock, size)
    if len(body) != size:
        raise OSError(errno.EPROTO, "truncated message from the supervisor's peer")
    return body


def _recv_exactly(sock: socket.socket, size: int) -> bytes:
    chunks = []
    while size:
        chunk = sock.recv(min(size, 1 << 20))
        if not chunk:
            break
        chunks.append(chunk)
        size -= len(chunk)
    return b"".join(chunks)


def _before_fork() -> None:
    # chosen and read here, once, not in every forked supervisor
    cgroup_manager()
    cgroup_namespace_mounts()


def _fork_spare(flags: int) -> _Spare:
    _before_fork()
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    pid = _fork_child(_spare_main, theirs, flags, close=(ours,))
    theirs.close()
    _children.add(pid)
    return _Spare(pid, ours, flags)


_OUTPUT_PIPE_BYTES = 1 << 20


def _widen_pipe(fd: int) -> None:
    """Give an output pipe 1 MiB (the default pipe-max-size) instead of 64 KiB: a writer
    then blocks 16x less often, which is 20-45% more throughput here (docs/benchmarks.md).
    The pages are only allocated as data waits in the pipe. Refused (EPERM: an
    unprivileged user over its pipe quota) it stays as it was."""
    with contextlib.suppress(OSError):
        fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, _OUTPUT_PIPE_BYTES)


def _fork_child(main: Callable[..., int], *args: Any,
                close: tuple[socket.socket, ...] = (), bare: bool = False) -> int:
    """Fork a child that closes *close* (the parent's ends of its sockets), runs
    ``main(*args)`` and exits with its code (1 if it raises): no exception may unwind into
    the parent's stack in the child. Returns the child's pid. *bare*: this process is
    single-threaded, so the child can skip Python's after-fork work
    (:func:`pyhcs._linux.fork_bare`)."""
    pid = L.fork_bare() if bare else os.fork()
    if pid == 0:
        code = 1
        try:
            for end in close:
                end.close()
            code = main(*args)
        except BaseException:
            with contextlib.suppress(BaseException):
                traceback.print_exc()
        finally:
            os._exit(code)
    return pid


def _spare_main(sock: socket.socket, flags: int) -> int:
    """Make the namespaces *flags* and pid 1 ahead, wait for a container to supervise,
    start it, report, and supervise it to the end."""
    _children.clear()
    _detach(sock.fileno())
    gc.freeze()  # the inherited heap stays shared with the client (no GC writes)
    # If this fails the spare just exits: its client then forks a supervisor for the
    # container, which makes the namespaces itself and reports what went wrong.
    stub = prepare_stub(flags) if flags else None
    try:
        data = _recv_frame(sock)
    except OSError:
        data = b""
    if not data:
        if stub is not None:
            discard_stub(stub)
        return 0  # our client closed us or exited: never needed
    job = json.loads(data)
    # the client's environment now, not when we were forked (PYHCS_* settings)
    if os.environ != job["env"]:
        os.environ.clear()
        os.environ.update(job["env"])
    roots = Roots(Path(job["root"]), Path(job["run_root"]))
    container_id = job["id"]
    sys.stdout = sys.stderr = _LazyLog(roots.container_run_dir(container_id) / "supervisor.log")
    try:
        sup = Supervisor(container_id, roots, job["spec"], bytes.fromhex(job["bpf"]), stub)
        sup.start()
    except BaseException as e:
        traceback.print_exc()
        code = e.errno if isinstance(e, OSError) and e.errno else errno.EIO
        _send_frame(sock, json.dumps({"errno": code, "error": str(e)[:2000]}).encode())
        return 1
    _send_frame(sock, json.dumps({"pid": os.getpid(), "started": sup.started}).encode())
    sock.close()  # the client's; the container is served through the supervisor's socket
    sup.loop()
    return 0


class _LazyLog(io.TextIOBase):
    """The supervisor's stderr: ``supervisor.log`` in the run directory, made at the first
    write (most supervisors never write one), and then fd 2 as well."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self._file: TextIO | None = None

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        if self._file is None:
            try:
                fd = os.open(self._path,
                             os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
            except OSError:
                return len(text)  # the run directory is gone (the container was removed)
            os.dup2(fd, 2)
            os.close(fd)
            self._file = open(2, "w", closefd=False)  # noqa: SIM115
        n = self._file.write(text)
        self._file.flush()
        return n


def _hand_over(sup: _Spare, job: bytes, *, ask_next: bool) -> bytes | None:
    """Give *sup* the container to start and return its report (b"" if it died while
    starting it), or None if it died before it took the work: nothing was started."""
    try:
        try:
            _send_frame(sup.sock, job)
        except (BrokenPipeError, ConnectionResetError):
            return None
        if ask_next:
            _ask_forker()  # the next container's supervisor, forked while this one starts
        try:
            return _recv_frame(sup.sock)
        except ConnectionResetError:
            return None  # closed with our work unread in its socket: it never started
    finally:
        sup.sock.close()


def launch(container_id: str, roots: Roots, spec: dict[str, Any]) -> tuple[int, float]:
    """Start the container *container_id* under a supervisor of its own (this process's
    spare, or one forked now).

    Returns the supervisor's pid and the time the container started.

    Raises ``OSError`` with the supervisor's reason if the container could not start.
    """
    global _spare
    reap_supervisors()
    profile = spec.get("linux", {}).get("seccomp")
    # compiled here, where the result is remembered for the next container
    bpf = compile_seccomp(profile, cache_dir=roots.run_root) if profile else b""
    job = json.dumps({"id": container_id, "root": str(roots.root),
                      "run_root": str(roots.run_root), "spec": spec,
                      "env": dict(os.environ), "bpf": bpf.hex()}).encode()
    # executor choice: an OCI runtime's container needs a supervisor in the host's
    # namespaces, a native one a supervisor that made the spec's
    native = _RUNTIME_ANNOTATION not in spec.get("annotations", {})
    flags = namespace_flags(spec) if native else 0
    spare = _take_spare()
    if spare is not None and spare.flags != flags:
        _spare = spare  # not made for this container: it waits for the next one
        data = _hand_over(_fork_spare(flags), job, ask_next=False)
    elif spare is not None:
        data = _hand_over(spare, job, ask_next=_keep_spare)
        if data is None:  # it died (killed by someone) before it read its work
            data = _hand_over(_fork_spare(flags), job, ask_next=False)
    else:
        data = _hand_over(_fork_spare(flags), job, ask_next=_keep_spare)
    if not data:
        raise OSError(errno.EIO, "the supervisor died while starting the container")
    msg = json.loads(data)
    if "error" in msg:
        raise OSError(msg["errno"], msg["error"])
    return int(msg["pid"]), float(msg["started"])
