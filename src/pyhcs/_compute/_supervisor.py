"""The supervisor: the parent of all of a container's processes.

A client forks one supervisor process and hands it every native container it starts
(see "the supervisor process" below); it outlives its client (a new session, no
inherited fds). For each container it owns the namespaces and cgroup, reaps every
process it spawns, records exits in the run directory and serves clients over a unix
socket there. Clients may come and go; nothing is lost when the creating client exits.
When a container's init exits (or the container is terminated) the supervisor records
the result, removes the cgroup and answers every waiter; once its client has let go of it
and its last container has ended, the process exits.

If the supervisor process itself is killed, its containers' inits die with it (PDEATHSIG)
and the next client to look finds the supervisor gone and runs recovery: exit code 255.
"""

from __future__ import annotations

import collections
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
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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
    raise_fd_limit,
    spawn,
)
from .._runtime._seccomp import compile_seccomp
from .._runtime._spec import NAMESPACES
from . import _protocol as P
from ._log import ContainerLog

__all__ = ["close_supervisor", "launch", "prepare_ahead", "process_start_time", "read_status",
           "reap_supervisors", "supervisor_pid", "SUPERVISOR_SOCKET", "STATUS_FILE"]

SUPERVISOR_SOCKET = "sup.sock"
#: The supervisor's record of the container, replaced atomically on every change. The
#: supervisor never opens the registry: SQLite's per-process lock state does not survive
#: fork(), so clients fold this file into the registry when they look (``_sync``).
STATUS_FILE = "status.json"
#: How many ended processes other than pid 1 a running container remembers (their exit
#: codes, for open_process and the final record); older ones are forgotten, so that a
#: container that runs exec after exec does not grow without bound.
KEPT_EXITS = 1024
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
    """One container: its sandbox, processes and clients, served by the host process's
    event loop (:class:`_Host`) through the selector *sel* it shares with the other
    containers there. Errors that no client can be told of go to *err*."""

    def __init__(self, container_id: str, roots: Roots, spec: dict[str, Any],
                 sel: selectors.BaseSelector, err: io.TextIOBase, seccomp_bpf: bytes = b"",
                 stub: Stub | None = None) -> None:
        self.id = container_id
        self.stub = stub  # the namespaces and pid 1 made ahead, if any (native only)
        self.seccomp_bpf = seccomp_bpf
        self.roots = roots
        self.spec = spec
        self.run_dir = roots.container_run_dir(container_id)
        self.sel = sel
        self.err = err
        self.procs: dict[int, _Proc] = {}  # by host pid
        self.init_pid = 0
        self.stub_fd = -1  # watches pid 1 until it runs the first process
        self.stub_exit_code = 0  # how pid 1 ended if it never ran one
        self.container_waiters: list[socket.socket] = []
        self.exited: collections.deque[_Proc] = collections.deque()  # exec'd, oldest first
        self.sandbox: Sandbox | None = None
        self.stopping = False
        self.done = False
        self.exit_type = ""
        self.listener: socket.socket | None = None
        self.started = 0.0
        self.paused = False
        self.log: ContainerLog | None = None  # the container log (see _log), once asked for
        # the host's work to do while the first process execs (see _Host._make_ahead)
        self.meanwhile: Callable[[], None] | None = None
        # executor choice (see _runtime._oci): native unless the spec names an OCI runtime
        self._spawn = spawn
        self._destroy = destroy_sandbox

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        # the socket first, in the host's mount namespace (an OCI runtime's create_sandbox
        # moves this process out of it)
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

                if stub is not None:  # _Host never gives an OCI runtime's container one
                    discard_stub(stub)
                    raise OSError(errno.EINVAL, "an OCI runtime's container has no stub")

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
            self._watch(self.stub_fd, "stub")
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
        self._watch(self.listener, "accept")

    def _watch(self, fileobj: int | socket.socket, kind: str, obj: Any = None) -> None:
        self.sel.register(fileobj, selectors.EVENT_READ, (self, kind, obj))

    @property
    def netns_pid(self) -> int:
        """A process in the container's network namespace: pid 1 (an OCI runtime's
        container: this process, whose namespace the runtime was given)."""
        if self._spawn is spawn and self.sandbox is not None:
            return self.sandbox.init_pid
        return os.getpid()

    def _status(self, state: str, **extra: Any) -> dict[str, Any]:
        # A running container's record holds its state only: clients read nothing else
        # from it until the final one (which _finish gives the processes' exits), and
        # rewriting every exit into it made each exec cost more than the one before.
        return {
            "state": state, "pid": os.getpid(), "start": process_start_time(os.getpid()),
            "started": self.started, "exit_type": self.exit_type, **extra,
        }

    def _write_status(self, status: dict[str, Any]) -> None:
        tmp = self.run_dir / f".{STATUS_FILE}.tmp"
        try:
            tmp.write_text(json.dumps(status))
            os.rename(tmp, self.run_dir / STATUS_FILE)
        except FileNotFoundError:
            # The run directory is gone: a client that had the final record from us (the
            # waiters get it first, see _record_end) removed the container at once. Nobody
            # will read a record, and the container's kernel state must still be released.
            pass

    def handle(self, kind: str, obj: Any, fileobj: Any) -> None:
        """One event of ours from the host's loop; once the container has ended, release
        it (then :attr:`done`)."""
        if self.done:
            return  # an event of the same round, after the end
        try:
            if kind == "accept":
                self._accept()
            elif kind == "conn":
                self._serve(fileobj)
            elif kind == "exit":
                self._reap(obj)
            elif kind == "stub":
                self._stub_exited()
            elif kind == "log":
                self._drain_log(obj)
        except Exception:
            traceback.print_exc(file=self.err)
        if self.stopping and not self.procs_alive():
            try:
                self._finish()
            except Exception:
                # nothing more can be done for this container; the others go on
                traceback.print_exc(file=self.err)
                for key in [k for k in self.sel.get_map().values() if k.data[0] is self]:
                    self.sel.unregister(key.fileobj)
                self.done = True

    def procs_alive(self) -> bool:
        return any(p.exit_code is None for p in self.procs.values())

    def _finish(self) -> None:
        """Record the container's end, answer waiters, release its kernel state (that
        last even if the rest fails: a cgroup or namespace must not outlive us)."""
        try:
            self._record_end()
        finally:
            self.done = True
            try:
                self._stop_serving()
            finally:
                sb, self.sandbox = self.sandbox, None
                if sb is not None:
                    self._destroy(sb)

    def _record_end(self) -> None:
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
        status = self._status("stopped", exit_code=code, finished=time.time(), processes=[
            {"pid": p.pid, "inner_pid": p.inner_pid, "config": p.config,
             "exit_code": p.exit_code, "created": p.created, "finished": p.finished}
            for p in self.procs.values() if p.exit_code is not None])
        # Every process is gone, so clients learn the end first: the waiters get the final
        # record itself (they fold it into the registry), the record is written, and the
        # socket goes, so a client that comes later finds no socket and reads the record
        # instead of waiting out the teardown. The cgroup and namespaces are released last
        # (a new container of the same id waits for the cgroup to go: see _native).
        for w in self.container_waiters:
            self._reply(w, {"exit_code": code, "exit_type": self.exit_type, "status": status})
        self.container_waiters.clear()
        self._write_status(status)

    def _stop_serving(self) -> None:
        """Close every connection and the listening socket: a client that comes later
        finds no socket and reads the record."""
        for key in list(self.sel.get_map().values()):
            if key.data[:2] == (self, "conn"):
                # a request we will not serve: the client reads the record
                self._drop(key.fileobj)  # type: ignore[arg-type]
        if self.listener is not None:
            self.sel.unregister(self.listener)
            with contextlib.suppress(OSError):
                os.unlink(self.run_dir / SUPERVISOR_SOCKET)
            self.listener.close()
            self.listener = None

    # -- connections -------------------------------------------------------------------------

    def _accept(self) -> None:
        if self.listener is None:
            return  # closed by _finish in this same round of events
        try:
            conn, _ = self.listener.accept()
        except BlockingIOError:
            return
        conn.setblocking(True)
        self._watch(conn, "conn")

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
            traceback.print_exc(file=self.err)
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
            meanwhile, self.meanwhile = self.meanwhile, None
            result = self._spawn(self.sandbox, process, stdio, console=console,
                                 meanwhile=meanwhile)
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
        self._watch(pidfd, "exit", result.pid)
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
        self._watch(r, "log", r)
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
        pts = getattr(self.sandbox, "pts_dir", -1)  # an OCI runtime's sandbox has none
        if self._spawn is not spawn or pts < 0:
            return os.openpty()  # an OCI runtime hands back its own console
        master = os.open("ptmx", os.O_RDWR | os.O_NOCTTY | os.O_NOFOLLOW | os.O_CLOEXEC,
                         dir_fd=pts)
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

    def _op_netns(self, conn: socket.socket, req: dict[str, Any]) -> None:
        self._reply(conn, {"pid": self.netns_pid})

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
            p.close_fds()  # an exec'd process: its pipes are the clients' now
            self.exited.append(p)
            if len(self.exited) > KEPT_EXITS:  # forget the oldest exit
                old = self.exited.popleft()
                if self.procs.get(old.pid) is old:  # (not a newer process of the same pid)
                    del self.procs[old.pid]


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
    # The client's sys.stdout and sys.stderr may be its own objects (pytest's capture on an
    # fd closed just now, a notebook's stream): a traceback printed through them would
    # fail or reach the client's channels. Ours are the fds above.
    sys.stdout = open(1, "w", closefd=False)  # noqa: SIM115 - for the process's life
    sys.stderr = open(2, "w", closefd=False)  # noqa: SIM115
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


# -- the supervisor process -----------------------------------------------------------------
#
# A client forks one supervisor process, the first time it starts a native container, and
# hands it every native container it starts after that over one socket (the link). That
# process serves all of them from one event loop (_Host), so a running container costs a
# few objects and fds, not a Python process (conmon and containerd's shim are the
# anchors: well under a MiB each). It leaves the host's namespaces only for a moment, to
# set up a root filesystem's mounts or to fork into a container's pid namespace.
#
# After each container it starts it also makes what the next native container needs and
# no spec changes: pid 1 in new pid, net, ipc and uts namespaces with loopback up (see
# _native.prepare_stub). So those are off the start path too. It makes them while the
# container's first process execs (or once nothing has come for a moment), not at once:
# the client asks for that process next, and the fork (milliseconds) would hold it up,
# while during the exec both the client and we would only wait.
#
# When the client closes the link (close_supervisor, or its exit) the process stays until
# its containers have ended, then exits. If it is killed, its containers' pid 1s die with
# it (PDEATHSIG) and the next client to look reports each one exited with 255.
#
# A container on an OCI runtime gets a supervisor process of its own instead: the runtime
# needs the process's mount and network namespaces, its SIGCHLD handler and its
# subreaper bit (see _runtime._oci).

#: the namespaces made ahead: those of every container pyhcs specifies
_AHEAD_FLAGS = namespace_flags({"linux": {"namespaces": [{"type": t} for t in NAMESPACES]}})
#: seconds with nothing to do after which the next pid 1 is made ahead, even though the
#: container started last has no process yet
_AHEAD_IDLE = 0.05


@dataclass
class _Link:
    """The client's end of its supervisor process."""

    pid: int
    sock: socket.socket


_link: _Link | None = None
_link_lock = threading.Lock()  # one container at a time on the link: request, then reply
_ahead = True


def prepare_ahead(enabled: bool) -> None:
    """Whether this process's supervisor prepares the next container's namespaces and pid 1
    ahead, while each container's first process execs (the default). A program that
    starts one container and exits (the CLI) gains nothing from it."""
    global _ahead
    _ahead = enabled


def close_supervisor() -> None:
    """Let go of this process's supervisor: it exits once its running containers have
    ended; if it has none, this returns once it has exited (or after a second). The next
    start forks a new one."""
    global _link
    with _link_lock:
        link, _link = _link, None
    if link is None:
        return
    try:
        link.sock.shutdown(socket.SHUT_WR)  # it sees end of file, and answers if it stays
        link.sock.settimeout(1)
        staying = link.sock.recv(1)
    except OSError:
        staying = b""
    link.sock.close()
    if staying:
        return  # it has containers still running
    deadline = time.monotonic() + 1
    while time.monotonic() < deadline:
        with contextlib.suppress(ChildProcessError):
            if os.waitpid(link.pid, os.WNOHANG)[0]:
                _children.discard(link.pid)
                return
        time.sleep(0.002)


def supervisor_pid() -> int | None:
    """The pid of this process's supervisor, if it has one (for tests and diagnostics)."""
    link = _link
    return link.pid if link is not None else None


def _forget_link_after_fork() -> None:
    # A child of this process (the application's fork, a supervisor) must not hand work to
    # our supervisor: drop its copy of the link.
    global _link, _link_lock
    if _link is not None:
        with contextlib.suppress(OSError):
            _link.sock.close()
    _link = None
    _link_lock = threading.Lock()  # another thread may have held it at the fork


os.register_at_fork(after_in_child=_forget_link_after_fork)


class _Host:
    """The supervisor process's event loop: the jobs from its client's link and the events
    of every container it supervises, in one selector."""

    def __init__(self, link: socket.socket) -> None:
        self.sel = selectors.DefaultSelector()
        self.link: socket.socket | None = link
        self.sel.register(link, selectors.EVENT_READ, (None, "job", None))
        self.containers: set[Supervisor] = set()
        self.stub: Stub | None = None  # the next container's pid 1, made ahead
        # a container has started and the next pid 1 is not made yet (see above)
        self.ahead_due = False

    def run(self) -> None:
        while self.link is not None or self.containers:
            events = self.sel.select(_AHEAD_IDLE if self.ahead_due else None)
            for key, _ in events:
                sup, kind, obj = key.data
                if sup is None:
                    try:
                        self._job()
                    except Exception:  # never at the cost of the containers running here
                        traceback.print_exc()
                    continue
                sup.handle(kind, obj, key.fileobj)
                if sup.done and sup in self.containers:
                    self.containers.discard(sup)
                    sup.err.close()
            if self.ahead_due and not events:
                self._make_ahead()  # idle: the started container's process has not come
        if self.stub is not None:
            discard_stub(self.stub)

    def _make_ahead(self) -> None:
        """Make the next container's pid 1 ahead, if none is waiting. Never raises: it runs
        in the middle of a container's exec too."""
        self.ahead_due = False
        if self.stub is None and self.link is not None:
            try:
                self.stub = prepare_stub(_AHEAD_FLAGS)
            except Exception:
                traceback.print_exc()  # the next start makes its own

    def _close_link(self) -> None:
        if self.link is not None:
            self.sel.unregister(self.link)
            self.link.close()
            self.link = None

    def _job(self) -> None:
        assert self.link is not None
        try:
            data = _recv_frame(self.link)
        except OSError:
            data = b""
        if not data:  # our client let go of us, or exited
            if self.containers:
                with contextlib.suppress(OSError):
                    self.link.send(b"s", socket.MSG_NOSIGNAL)  # staying (close_supervisor)
            self._close_link()
            if self.stub is not None:
                discard_stub(self.stub)
                self.stub = None
            return
        native = True
        try:
            job = json.loads(data)
            native = bool(job["native"])
            reply = self._start(job)
        except Exception as e:
            # _start reports what goes wrong in starting the container; anything before
            # that (a malformed job) must still be answered, or the client waits forever
            traceback.print_exc()
            reply = {"errno": errno.EINVAL, "error": f"bad start job: {type(e).__name__}: {e}"}
        try:
            _send_frame(self.link, json.dumps(reply).encode())
        except OSError:
            self._close_link()  # the client is gone; its container runs on
            return
        if not native:
            self._close_link()  # an OCI runtime's container has this process to itself

    def _start(self, job: dict[str, Any]) -> dict[str, Any]:
        # the client's environment now, not when we were forked (PYHCS_* settings)
        if os.environ != job["env"]:
            os.environ.clear()
            os.environ.update(job["env"])
        roots = Roots(Path(job["root"]), Path(job["run_root"]))
        container_id, spec = job["id"], job["spec"]
        err = _LazyLog(roots.container_run_dir(container_id) / "supervisor.log")
        stub = None
        if job["native"]:
            raise_fd_limit()  # this process serves any number of native containers
        if job["native"] and self.stub is not None \
                and self.stub.flags == namespace_flags(spec):
            stub, self.stub = self.stub, None
        try:
            if not job["native"] and self.containers:
                raise OSError(errno.EINVAL, "an OCI runtime's container needs its own "
                              "supervisor process")
            sup = Supervisor(container_id, roots, spec, self.sel, err,
                             bytes.fromhex(job["bpf"]), stub)
            sup.start()
        except BaseException as e:
            traceback.print_exc(file=err)
            err.close()
            code = e.errno if isinstance(e, OSError) and e.errno else errno.EIO
            return {"errno": code, "error": str(e)[:2000]}
        self.containers.add(sup)
        if job["native"] and job["ahead"]:
            self.ahead_due = True
            sup.meanwhile = self._make_ahead
        return {"pid": os.getpid(), "started": sup.started, "netns_pid": sup.netns_pid}


def _host_main(sock: socket.socket) -> int:
    """The supervisor process: serve the containers the client hands over on *sock*."""
    _children.clear()
    _detach(sock.fileno())
    gc.freeze()  # the inherited heap stays shared with the client (no GC writes)
    _Host(sock).run()
    return 0


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


def _fork_host() -> _Link:
    # chosen and read here, once, not in every forked supervisor
    cgroup_manager()
    cgroup_namespace_mounts()
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    pid = _fork_child(_host_main, theirs, close=(ours,))
    theirs.close()
    _children.add(pid)
    return _Link(pid, ours)


_OUTPUT_PIPE_BYTES = 1 << 20


def _widen_pipe(fd: int) -> None:
    """Give an output pipe 1 MiB (the default pipe-max-size) instead of 64 KiB: a writer
    then blocks 16x less often, which is 20-45% more throughput here (docs/benchmarks.md).
    The pages are only allocated as data waits in the pipe. Refused (EPERM: an
    unprivileged user over its pipe quota) it stays as it was."""
    with contextlib.suppress(OSError):
        fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, _OUTPUT_PIPE_BYTES)


def _fork_child(main: Callable[..., int], *args: Any,
                close: tuple[socket.socket, ...] = ()) -> int:
    """Fork a child that closes *close* (the parent's ends of its sockets), runs
    ``main(*args)`` and exits with its code (1 if it raises): no exception may unwind into
    the parent's stack in the child. Returns the child's pid."""
    pid = os.fork()
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


class _LazyLog(io.TextIOBase):
    """A container's supervisor errors: ``supervisor.log`` in its run directory, made at
    the first write (most containers never have one)."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self._fd = -1

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        if self._fd < 0:
            try:
                self._fd = os.open(self._path, os.O_WRONLY | os.O_CREAT | os.O_APPEND
                                   | os.O_CLOEXEC, 0o600)
            except OSError:
                return len(text)  # the run directory is gone (the container was removed)
        with contextlib.suppress(OSError):
            os.write(self._fd, text.encode(errors="replace"))
        return len(text)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        super().close()


def _exchange(link: _Link, job: bytes) -> bytes | None:
    """Give *link*'s supervisor the container to start and return its report (b"" if it
    died while starting it), or None if it died before it took the work: nothing was
    started."""
    try:
        _send_frame(link.sock, job)
    except (BrokenPipeError, ConnectionResetError):
        return None
    try:
        return _recv_frame(link.sock)
    except ConnectionResetError:
        return None  # closed with our work unread in its socket: it never started


def launch(container_id: str, roots: Roots, spec: dict[str, Any]) -> tuple[int, float, int]:
    """Start the container *container_id* under this process's supervisor (forked now if
    there is none; an OCI runtime's container gets one of its own).

    Returns the supervisor's pid, the time the container started, and the pid of a process
    in the container's network namespace.

    Raises ``OSError`` with the supervisor's reason if the container could not start.
    """
    global _link
    reap_supervisors()
    profile = spec.get("linux", {}).get("seccomp")
    # compiled here, where the result is remembered for the next container
    bpf = compile_seccomp(profile, cache_dir=roots.run_root) if profile else b""
    # executor choice: an OCI runtime's container needs a supervisor process of its own
    native = _RUNTIME_ANNOTATION not in spec.get("annotations", {})
    job = json.dumps({"id": container_id, "root": str(roots.root),
                      "run_root": str(roots.run_root), "spec": spec,
                      "env": dict(os.environ), "bpf": bpf.hex(), "native": native,
                      "ahead": _ahead}).encode()
    data: bytes | None
    if not native:
        link = _fork_host()
        try:
            data = _exchange(link, job)
        finally:
            link.sock.close()
    else:
        with _link_lock:
            data = _exchange(_link, job) if _link is not None else None
            if data is None:  # none yet, or it died (killed by someone) before it read this
                if _link is not None:
                    _link.sock.close()
                _link = _fork_host()
                data = _exchange(_link, job)
            if not data and _link is not None:
                _link.sock.close()  # it died while starting the container
                _link = None
    if not data:
        raise OSError(errno.EIO, "the supervisor died while starting the container")
    msg = json.loads(data)
    if "error" in msg:
        raise OSError(msg["errno"], msg["error"])
    return int(msg["pid"]), float(msg["started"]), int(msg["netns_pid"])
