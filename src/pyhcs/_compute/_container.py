"""Containers and processes: hcsshim's Container and Process, on Linux.

A :class:`Container` or :class:`Process` is a *handle*: cheap, owned by the caller, closed
with ``close()``. The compute system it refers to lives in the registry and, while it runs,
in its supervisor (see ``_supervisor``), so any process on the machine can open it by id.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import signal
import sqlite3
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

from .. import _layers
from .._errors import (
    ERR_ALREADY_CLOSED,
    ERR_ALREADY_EXISTS,
    ERR_COMPUTE_SYSTEM_DOES_NOT_EXIST,
    ERR_ELEMENT_NOT_FOUND,
    ERR_INVALID_PROCESS_STATE,
    ERR_TIMEOUT,
    ERR_UNEXPECTED_PROCESS_ABORT,
    ERR_VMCOMPUTE_ALREADY_STOPPED,
    ERR_VMCOMPUTE_OPERATION_INVALID_STATE,
    ContainerError,
    ContainerTimeoutError,
    ErrorCode,
    HcsError,
    InvalidConfigError,
    NotSupportedError,
    ProcessError,
    ProcessTimeoutError,
)
from .._paths import Roots
from .._registry import Registry
from .._runtime._cgroups import block_device
from .._runtime._cgroups import manager as cgroup_manager
from .._runtime._native import secure_join
from .._runtime._spec import UserNamespace, container_spec, process_spec
from .._schema import (
    ComputeSystemQuery,
    ContainerConfig,
    ContainerProperties,
    NetworkStats,
    ProcessConfig,
    ProcessListItem,
    Statistics,
    from_json,
    to_dict,
    validate,
)
from . import _protocol as P
from ._supervisor import (
    SUPERVISOR_SOCKET,
    launch,
    process_start_time,
    read_status,
    reap_supervisors,
)

__all__ = [
    "Container",
    "Process",
    "create_container",
    "create_container_with_json",
    "open_container",
    "get_containers",
    "remove_container",
    "hot_attach_endpoint",
    "hot_detach_endpoint",
]

_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
#: The exit code reported for a container whose supervisor died (as containerd does).
SUPERVISOR_LOST_EXIT_CODE = 255


def _check_id(container_id: str, op: str) -> None:
    if not isinstance(container_id, str) or not _ID_RE.match(container_id):
        raise InvalidConfigError(
            op, message=f"invalid container id {container_id!r} "
            "(letters, digits, '_', '.', '-'; at most 128; starting with a letter or digit)")


def _registry(roots: Roots) -> Registry:
    return Registry.open(roots.db_path)


def _os_code(e: OSError) -> ErrorCode | None:
    if e.errno == errno.ESRCH:
        return ERR_ELEMENT_NOT_FOUND
    return None


def _reply_error(reply: dict[str, Any]) -> OSError | None:
    if "error" in reply:
        return OSError(int(reply.get("errno", errno.EIO)), reply["error"])
    return None


# -- recovery ------------------------------------------------------------------------------


def _supervisor_alive(row: sqlite3.Row) -> bool:
    reap_supervisors()
    pid = row["supervisor_pid"]
    return bool(pid) and process_start_time(pid) == row["supervisor_start"]


def _fold_final_status(reg: Registry, container_id: str, status: dict[str, Any]) -> None:
    """Write a supervisor's final record (exit codes) into the registry; idempotent. A
    container another client removed meanwhile has nothing left to fold into."""
    with reg.transaction() as c:
        if c.execute("SELECT 1 FROM containers WHERE id=?", (container_id,)).fetchone() is None:
            return
        c.execute(
            "UPDATE containers SET state='stopped', exit_code=?, exit_type=?, finished=? "
            "WHERE id=? AND state IN ('running','paused')",
            (status.get("exit_code"), status.get("exit_type", ""), status.get("finished"),
             container_id))
        for p in status.get("processes", []):
            c.execute(
                "INSERT OR REPLACE INTO processes(container_id, pid, inner_pid, config, "
                "exit_code, created, finished) VALUES (?,?,?,?,?,?,?)",
                (container_id, p["pid"], p["inner_pid"], json.dumps(p["config"]),
                 p["exit_code"], p["created"], p["finished"]))


def _recover(reg: Registry, roots: Roots, container_id: str) -> None:
    """Bring the registry up to date with a running container's supervisor.

    The supervisor's status file is folded in (state, exit codes). A container whose
    supervisor died without a final record is finished here: what is left of it is
    killed and it is reported exited with code 255.
    """
    row = reg.query_one("SELECT * FROM containers WHERE id=?", (container_id,))
    if row is None or row["state"] not in ("running", "paused"):
        return
    status = read_status(roots.container_run_dir(container_id))
    if status is not None and status.get("state") == "stopped":
        _fold_final_status(reg, container_id, status)
        return
    if _supervisor_alive(row):
        if status is not None and status.get("state") in ("running", "paused") and (
                status["state"] != row["state"]):
            reg.execute("UPDATE containers SET state=? WHERE id=? AND state IN "
                        "('running','paused')", (status["state"], container_id))
        return
    try:
        cg = cgroup_manager().open(container_id)
        cg.kill_all()
        cg.remove()
    except OSError:
        pass
    reg.execute(
        "UPDATE containers SET state='stopped', exit_code=?, exit_type='UnexpectedExit', "
        "finished=?, supervisor_pid=NULL WHERE id=? AND state IN ('running','paused')",
        (SUPERVISOR_LOST_EXIT_CODE, time.time(), container_id),
    )
    try:
        os.unlink(roots.container_run_dir(container_id) / SUPERVISOR_SOCKET)
    except OSError:
        pass


# -- containers ----------------------------------------------------------------------------


class Container:
    """A handle to a compute system (hcsshim's ``Container``).

    Obtain one from :func:`create_container` or :func:`open_container`. Methods raise
    :class:`ContainerError` (with ``code`` for the ``is_*`` predicates); after :meth:`close`
    every method raises the already-closed error.
    """

    def __init__(self, container_id: str, roots: Roots) -> None:
        self._id = container_id
        self._roots = roots
        self._closed = False
        self._sock = str(roots.container_run_dir(container_id) / SUPERVISOR_SOCKET)
        self._image_cfg: dict[str, Any] | None = None

    def __repr__(self) -> str:
        return f"<pyhcs.Container {self._id}>"

    def __enter__(self) -> Container:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def id(self) -> str:
        """The container's id."""
        return self._id

    # -- internals ---------------------------------------------------------------------------

    def _check(self, op: str) -> None:
        if self._closed:
            raise ContainerError(self._id, op, ERR_ALREADY_CLOSED)

    def _row(self, op: str) -> sqlite3.Row:
        reg = _registry(self._roots)
        _recover(reg, self._roots, self._id)
        row = reg.query_one("SELECT * FROM containers WHERE id=?", (self._id,))
        if row is None:
            raise ContainerError(self._id, op, ERR_COMPUTE_SYSTEM_DOES_NOT_EXIST)
        return row

    def _image_config(self, op: str) -> dict[str, Any]:
        """The image's config (Env, WorkingDir, User) kept with the container; read once."""
        if self._image_cfg is None:
            row = _registry(self._roots).query_one(
                "SELECT config FROM containers WHERE id=?", (self._id,))
            if row is None:
                raise ContainerError(self._id, op, ERR_COMPUTE_SYSTEM_DOES_NOT_EXIST)
            cfg = json.loads(row["config"]).get("_pyhcs_image", {})
            self._image_cfg = cfg if isinstance(cfg, dict) else {}
        return self._image_cfg

    def _call(self, op: str, request: dict[str, Any], timeout: float | None = None
              ) -> tuple[dict[str, Any], list[int]]:
        """Ask the supervisor; if it is gone, recover and raise the stopped error."""
        try:
            reply, fds = P.call(self._sock, request, timeout)
        except P.SupervisorGone:
            row = self._row(op)
            if row["state"] == "created":
                raise ContainerError(self._id, op, ERR_VMCOMPUTE_OPERATION_INVALID_STATE,
                                     message="the container has not been started") from None
            _recover(_registry(self._roots), self._roots, self._id)
            raise ContainerError(self._id, op, ERR_VMCOMPUTE_ALREADY_STOPPED) from None
        except OSError as e:
            raise ContainerError(self._id, op, _os_code(e), message=str(e)) from e
        err = _reply_error(reply)
        if err is not None:
            for fd in fds:
                os.close(fd)
            raise ContainerError(self._id, op, _os_code(err), message=str(err)) from err
        return reply, fds

    # -- hcsshim's Container -----------------------------------------------------------------

    def start(self) -> None:
        """Start the container: namespaces, cgroup and root filesystem are set up, ready for
        :meth:`create_process`. The first process created becomes the container's pid 1;
        when it exits, the container stops."""
        self._check("Start")
        reg = _registry(self._roots)
        row = self._row("Start")
        if row["state"] != "created":
            raise ContainerError(self._id, "Start", ERR_VMCOMPUTE_OPERATION_INVALID_STATE,
                                 message=f"the container is {row['state']}")
        spec = json.loads((self._roots.container_run_dir(self._id) / "config.json").read_text())
        # claim the start so two clients cannot both start it
        if reg.execute("UPDATE containers SET state='starting' WHERE id=? AND state='created'",
                       (self._id,)) != 1:
            raise ContainerError(self._id, "Start", ERR_VMCOMPUTE_OPERATION_INVALID_STATE)
        try:
            pid, started, netns_pid = launch(self._id, self._roots, spec)
        except BaseException as e:
            reg.execute("UPDATE containers SET state='created' WHERE id=?", (self._id,))
            if isinstance(e, OSError):
                raise ContainerError(self._id, "Start", None, message=str(e)) from e
            raise
        reg.execute(
            "UPDATE containers SET state='running', started=?, supervisor_pid=?, "
            "supervisor_start=? WHERE id=? AND state='starting'",
            (started, pid, process_start_time(pid), self._id))
        endpoints = json.loads(row["config"]).get("EndpointList") or []
        if endpoints:
            try:
                self._attach(endpoints, netns_pid, spec["root"]["path"])
            except BaseException:
                with contextlib.suppress(HcsError):
                    self.terminate()
                    self.wait(30)
                raise

    # -- networking ----------------------------------------------------------------------

    def _attach(self, endpoint_ids: list[str], netns_pid: int, rootfs: str) -> None:
        """Plug endpoints into the container's network namespace (that of *netns_pid*) and
        write the first one's DNS settings to its /etc/resolv.conf."""
        from .. import _network  # pyroute2 is loaded only by containers that network

        netns = f"/proc/{netns_pid}/ns/net"
        done: list[str] = []
        try:
            for ep in endpoint_ids:
                _network.attach_endpoint(ep, netns, container_id=self._id, roots=self._roots)
                done.append(ep)
            for ep in endpoint_ids:
                conf = _network.resolv_conf(ep, roots=self._roots)
                if "nameserver" in conf:
                    _write_in_root(rootfs, "etc/resolv.conf", conf.encode())
                    break
        except BaseException:
            for ep in done:
                with contextlib.suppress(HcsError):
                    _network.detach_endpoint(ep, self._id, roots=self._roots)
            raise

    def _attached_endpoints(self) -> list[str]:
        reg = _registry(self._roots)
        try:
            rows = reg.query("SELECT id FROM endpoints WHERE container_id=? AND "
                             "attach_state='attached' ORDER BY id", (self._id,))
        except sqlite3.OperationalError:
            return []  # a registry without networking tables has no endpoints
        return [r["id"] for r in rows]

    def modify(self, request: dict[str, Any] | str) -> None:
        """hcsshim's Modify for networking: ``{"ResourceType": "Network", "RequestType":
        "Add" | "Remove", "Settings": "<endpoint id>"}`` hot-attaches an endpoint to the
        running container or detaches it. Other resource types raise
        :class:`NotSupportedError`; a malformed request :class:`InvalidConfigError`."""
        self._check("Modify")
        if isinstance(request, str):
            try:
                request = json.loads(request)
            except ValueError as e:
                raise InvalidConfigError("Modify", message=f"request: {e}") from e
        if not isinstance(request, dict):
            raise InvalidConfigError("Modify", message="the request is not an object")
        rtype = request.get("ResourceType")
        kind = request.get("RequestType")
        settings = request.get("Settings")
        if rtype != "Network":
            raise NotSupportedError("Modify", message=f"ResourceType {rtype!r}: only "
                                    "'Network' can be modified")
        if kind not in ("Add", "Remove") or not isinstance(settings, str) or not settings:
            raise InvalidConfigError("Modify", message="a Network request needs RequestType "
                                     "Add or Remove and Settings (the endpoint id)")
        row = self._row("Modify")
        if row["state"] not in ("running", "paused"):
            raise ContainerError(self._id, "Modify", ERR_VMCOMPUTE_OPERATION_INVALID_STATE,
                                 message=f"the container is {row['state']}")
        from .. import _network

        if kind == "Add":
            reply, _ = self._call("Modify", {"op": "netns"})
            self._attach([settings], int(reply["pid"]), self._spec_root())
        else:
            _network.detach_endpoint(settings, self._id, roots=self._roots)

    def _spec_root(self) -> str:
        spec = json.loads((self._roots.container_run_dir(self._id) / "config.json").read_text())
        return str(spec["root"]["path"])

    def shutdown(self) -> None:
        """Ask the container to stop: its init gets SIGTERM. Returns at once; :meth:`wait`
        observes the exit."""
        self._check("Shutdown")
        self._stop("Shutdown", "shutdown")

    def terminate(self) -> None:
        """Kill every process of the container. Returns at once; :meth:`wait` observes it."""
        self._check("Terminate")
        self._stop("Terminate", "terminate")

    def _stop(self, op: str, what: str) -> None:
        row = self._row(op)
        if row["state"] == "stopped":
            raise ContainerError(self._id, op, ERR_VMCOMPUTE_ALREADY_STOPPED)
        if row["state"] == "created":
            _registry(self._roots).execute(
                "UPDATE containers SET state='stopped', exit_code=0, exit_type=?, finished=? "
                "WHERE id=? AND state='created'",
                ("Terminated" if what == "terminate" else "GracefulExit", time.time(),
                 self._id))
            return
        self._call(op, {"op": what})

    def wait(self, timeout: float | None = None) -> None:
        """Block until the container has stopped. *timeout* is a deadline in seconds
        (``None`` waits forever, ``0`` polls); past it :class:`ContainerTimeoutError`."""
        self._check("Wait")
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            row = self._row("Wait")
            if row["state"] == "stopped":
                return
            if row["state"] in ("created", "starting"):
                # nothing runs yet: poll the registry until it starts or stops
                if deadline is not None and time.monotonic() >= deadline:
                    raise ContainerTimeoutError(self._id, "Wait", ERR_TIMEOUT)
                time.sleep(0.01)
                continue
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                reply, _ = P.call(self._sock, {"op": "wait"},
                                  None if left is None else max(left, 1e-3))
                if "status" in reply:
                    _fold_final_status(_registry(self._roots), self._id, reply["status"])
                return
            except TimeoutError:
                raise ContainerTimeoutError(self._id, "Wait", ERR_TIMEOUT) from None
            except P.SupervisorGone:
                _recover(_registry(self._roots), self._roots, self._id)
                row = self._row("Wait")
                if row["state"] == "stopped":
                    return
                if deadline is not None and time.monotonic() >= deadline:
                    raise ContainerTimeoutError(self._id, "Wait", ERR_TIMEOUT) from None
                time.sleep(0.005)  # between the supervisor's socket going and its record

    def wait_timeout(self, timeout: float) -> None:
        """hcsshim's WaitTimeout: :meth:`wait` with a deadline in seconds."""
        self.wait(timeout)

    def pause(self) -> None:
        """Freeze every process of the container (cgroup freezer)."""
        self._check("Pause")
        self._call("Pause", {"op": "pause"})

    def resume(self) -> None:
        """Thaw a paused container."""
        self._check("Resume")
        self._call("Resume", {"op": "resume"})

    def has_pending_updates(self) -> bool:
        """Always False: Linux containers have no Windows servicing updates to install."""
        self._check("HasPendingUpdates")
        self._row("HasPendingUpdates")
        return False

    def statistics(self) -> Statistics:
        """Memory, processor and storage counters of the container's cgroup now."""
        self._check("Statistics")
        row = self._row("Statistics")
        if row["state"] not in ("running", "paused"):
            raise ContainerError(self._id, "Statistics", ERR_VMCOMPUTE_OPERATION_INVALID_STATE,
                                 message=f"the container is {row['state']}")
        st = cgroup_manager().open(self._id).stats()
        now = datetime.now(UTC)
        started = datetime.fromtimestamp(row["started"] or time.time(), UTC)
        return Statistics(
            timestamp=now,
            container_start_time=started,
            uptime_100ns=max(0, int((now - started).total_seconds() * 1e7)),
            memory=st.memory_stats(),
            processor=st.processor_stats(),
            storage=st.storage_stats(),
            network=self._network_stats(),
        )

    def _network_stats(self) -> list[NetworkStats]:
        ids = self._attached_endpoints()
        if not ids:
            return []
        from .. import _network

        return [_network.endpoint_statistics(ep, roots=self._roots) for ep in ids]

    def process_list(self) -> list[ProcessListItem]:
        """The processes in the container now (pids as seen inside it)."""
        self._check("ProcessList")
        self._row("ProcessList")
        items = []
        tick = os.sysconf("SC_CLK_TCK")
        boot = time.time() - float(Path("/proc/uptime").read_text().split()[0])
        page = os.sysconf("SC_PAGE_SIZE")
        for pid in cgroup_manager().open(self._id).pids():
            try:
                stat = Path(f"/proc/{pid}/stat").read_text()
                status = Path(f"/proc/{pid}/status").read_text()
                statm = Path(f"/proc/{pid}/statm").read_text().split()
            except OSError:
                continue
            name = stat[stat.index("(") + 1: stat.rindex(")")]
            f = stat.rsplit(")", 1)[1].split()
            inner = pid
            for line in status.splitlines():
                if line.startswith("NSpid:"):
                    inner = int(line.split()[-1])
            items.append(ProcessListItem(
                process_id=inner,
                image_name=name,
                create_timestamp=datetime.fromtimestamp(boot + int(f[19]) / tick, UTC),
                user_time_100ns=int(f[11]) * 10_000_000 // tick,
                kernel_time_100ns=int(f[12]) * 10_000_000 // tick,
                memory_commit_bytes=int(statm[0]) * page,
                memory_working_set_private_bytes=(int(statm[1]) - int(statm[2])) * page,
                memory_working_set_shared_bytes=int(statm[2]) * page,
            ))
        return items

    def create_process(self, config: ProcessConfig, *, log_output: bool = False) -> Process:
        """Start a process in the running container and return its handle.

        Pipes are created per ``create_std_*_pipe``; get them with :meth:`Process.stdio`.
        The first process becomes the container's pid 1. If the program cannot be executed
        the process exists already exited with ``WAIT_ERR_EXEC_FAILED`` (32767) and
        :attr:`Process.exec_error` says why.

        With *log_output* (a pyhcs extension), the process's stdout and stderr that have no
        pipe go to the container's log instead of ``/dev/null``: the supervisor keeps the
        newest 1 to 2 MiB of it in the run directory until the container is removed
        (``pyhcs logs``). It applies without ``emulate_console`` only.
        """
        self._check("CreateProcess")
        image_cfg = self._image_config("CreateProcess")
        env = dict(e.split("=", 1) for e in image_cfg.get("Env", []) if "=" in e)
        proc = process_spec(config, default_env=env,
                            default_cwd=image_cfg.get("WorkingDir") or "/")
        if not config.user and image_cfg.get("User"):
            proc["pyhcsUser"] = image_cfg["User"]
        reply, fds = self._call("CreateProcess", {
            "op": "exec", "process": proc,
            "stdin": config.create_std_in_pipe, "stdout": config.create_std_out_pipe,
            "stderr": config.create_std_err_pipe,
            **({"log": True} if log_output else {}),
        })
        return Process(self, int(reply["pid"]), _FdSet.from_reply(reply, fds),
                       exec_error=reply.get("exec_error", ""),
                       exec_errno=int(reply.get("exec_errno", 0)))

    def open_process(self, pid: int) -> Process:
        """A handle to the process *pid* (as seen inside the container).

        A running container remembers its last 1,024 ended processes besides pid 1
        (``_supervisor.KEPT_EXITS``); an older one raises the not-found error here, as a
        process that never existed does."""
        self._check("OpenProcess")
        try:
            reply, _ = P.call(self._sock, {"op": "process", "pid": pid})
        except P.SupervisorGone:
            row = _registry(self._roots).query_one(
                "SELECT * FROM processes WHERE container_id=? AND inner_pid=? "
                "ORDER BY created DESC LIMIT 1", (self._id, pid))
            if row is None:
                raise ProcessError(self._id, pid, "OpenProcess", ERR_ELEMENT_NOT_FOUND) from None
            return Process(self, pid, None, exit_code=row["exit_code"])
        if "error" in reply:
            raise ProcessError(self._id, pid, "OpenProcess", ERR_ELEMENT_NOT_FOUND,
                               message=reply["error"])
        return Process(self, pid, None, exec_error=reply.get("exec_error", ""),
                       exit_code=reply.get("exit_code"))

    def properties(self) -> ContainerProperties:
        """What the registry knows of the container (hcsshim's ContainerProperties)."""
        self._check("Properties")
        return _properties(self._row("Properties"))

    def close(self) -> None:
        """Release the handle. The container itself goes on; idempotent."""
        self._closed = True


def _properties(row: sqlite3.Row) -> ContainerProperties:
    return ContainerProperties(
        id=row["id"], name=row["name"], system_type=row["system_type"], owner=row["owner"],
        runtime_id=str(row["supervisor_pid"] or ""), stopped=row["state"] == "stopped",
        exit_type=row["exit_type"],
    )


class _FdSet:
    """The client ends of a process's stdio, as received from the supervisor."""

    def __init__(self, stdin: int, stdout: int, stderr: int) -> None:
        self.fds = (stdin, stdout, stderr)

    @classmethod
    def from_reply(cls, reply: dict[str, Any], fds: list[int]) -> _FdSet:
        which = reply.get("fds", {})
        it = iter(fds)
        got = [next(it) if which.get(n) else -1 for n in ("stdin", "stdout", "stderr")]
        return cls(*got)


class Process:
    """A handle to a process in a container (hcsshim's ``Process``).

    :attr:`pid` is the pid inside the container. Stdio is file-like; :meth:`wait` takes a
    deadline; :meth:`exit_code` is valid once the process has exited.
    """

    def __init__(self, container: Container, pid: int, fds: _FdSet | None, *,
                 exec_error: str = "", exec_errno: int = 0, exit_code: int | None = None
                 ) -> None:
        self._container = container
        self._pid = pid
        self._fds = fds
        self._handed: list[IO[bytes]] = []
        self._exit_code = exit_code
        self._closed = False
        #: why the program could not be executed ('' if it was)
        self.exec_error = exec_error
        #: the errno of that failure (0 if none)
        self.exec_errno = exec_errno

    def __repr__(self) -> str:
        return f"<pyhcs.Process {self._container.id}:{self._pid}>"

    def __enter__(self) -> Process:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def pid(self) -> int:
        """The process id inside the container."""
        return self._pid

    @property
    def container_id(self) -> str:
        return self._container.id

    def _check(self, op: str) -> None:
        if self._closed:
            raise ProcessError(self._container.id, self._pid, op, ERR_ALREADY_CLOSED)

    def _call(self, op: str, request: dict[str, Any], timeout: float | None = None
              ) -> tuple[dict[str, Any], list[int]]:
        request = {**request, "pid": self._pid}
        try:
            reply, fds = P.call(self._container._sock, request, timeout)
        except P.SupervisorGone:
            raise ProcessError(self._container.id, self._pid, op,
                               ERR_ELEMENT_NOT_FOUND) from None
        err = _reply_error(reply)
        if err is not None:
            for fd in fds:
                os.close(fd)
            raise ProcessError(self._container.id, self._pid, op, _os_code(err),
                               message=str(err)) from err
        return reply, fds

    def stdio(self) -> tuple[IO[bytes] | None, IO[bytes] | None, IO[bytes] | None]:
        """Fresh (stdin, stdout, stderr) file objects; ``None`` where no pipe was asked for.

        Closing them does not close the process's pipes: call again for new ones.
        """
        self._check("Stdio")
        if self._fds is not None:
            fds, self._fds = self._fds.fds, None
        else:
            reply, got = self._call("Stdio", {"op": "stdio"})
            fds = _FdSet.from_reply(reply, got).fds
        files: list[IO[bytes] | None] = []
        for i, fd in enumerate(fds):
            if fd < 0:
                files.append(None)
                continue
            f = open(fd, "wb", buffering=0) if i == 0 else open(fd, "rb")  # noqa: SIM115
            self._handed.append(f)
            files.append(f)
        return files[0], files[1], files[2]

    def close_stdin(self) -> None:
        """Close the write side of stdin: the process reads EOF once every copy is closed
        (this closes the ones this handle gave out)."""
        self._check("CloseStdin")
        for f in self._handed:
            if not f.closed and f.writable():  # writable() raises on a closed file
                f.close()
        if self._fds is not None and self._fds.fds[0] >= 0:
            os.close(self._fds.fds[0])
            self._fds = _FdSet(-1, self._fds.fds[1], self._fds.fds[2])
        self._call("CloseStdin", {"op": "close_stdin"})

    def kill(self) -> None:
        """Send SIGKILL; does not wait for the process to end."""
        self._check("Kill")
        self.signal(signal.SIGKILL)

    def signal(self, sig: int) -> None:
        """Send *sig* to the process."""
        self._check("Signal")
        self._call("Signal", {"op": "signal", "signal": int(sig)})

    def wait(self, timeout: float | None = None) -> int:
        """Block until the process exits and return its exit code; *timeout* is a deadline
        in seconds (``0`` polls). Past it :class:`ProcessTimeoutError`."""
        self._check("Wait")
        if self._exit_code is not None:
            return self._exit_code
        try:
            reply, _ = P.call(self._container._sock, {"op": "wait", "pid": self._pid},
                              None if timeout is None else max(timeout, 1e-3))
        except TimeoutError:
            raise ProcessTimeoutError(self._container.id, self._pid, "Wait",
                                      ERR_TIMEOUT) from None
        except P.SupervisorGone:
            code = self._recorded_exit()
            if code is None:
                raise ProcessError(self._container.id, self._pid, "Wait",
                                   ERR_UNEXPECTED_PROCESS_ABORT) from None
            self._exit_code = code
            return code
        if "error" in reply:
            raise ProcessError(self._container.id, self._pid, "Wait", ERR_ELEMENT_NOT_FOUND,
                               message=reply["error"])
        self._exit_code = int(reply["exit_code"])
        return self._exit_code

    def wait_timeout(self, timeout: float) -> int:
        """hcsshim's WaitTimeout: :meth:`wait` with a deadline in seconds."""
        return self.wait(timeout)

    def _recorded_exit(self) -> int | None:
        c = self._container
        reg = _registry(c._roots)
        _recover(reg, c._roots, c.id)
        row = reg.query_one(
            "SELECT exit_code FROM processes WHERE container_id=? AND inner_pid=? "
            "ORDER BY created DESC LIMIT 1", (c.id, self._pid))
        if row is not None and row["exit_code"] is not None:
            return int(row["exit_code"])
        crow = reg.query_one("SELECT state, exit_code FROM containers WHERE id=?", (c.id,))
        if crow is not None and crow["state"] == "stopped":
            # the supervisor died before it could record this process
            return SUPERVISOR_LOST_EXIT_CODE
        return None

    def exit_code(self) -> int:
        """The exit code (128+N after signal N); the invalid-state error while it runs."""
        self._check("ExitCode")
        if self._exit_code is None:
            try:
                reply, _ = self._call("ExitCode", {"op": "process"})
                code = reply.get("exit_code")
            except ProcessError:
                code = self._recorded_exit()
            if code is None:
                raise ProcessError(self._container.id, self._pid, "ExitCode",
                                   ERR_INVALID_PROCESS_STATE)
            self._exit_code = int(code)
        return self._exit_code

    def resize_console(self, width: int, height: int) -> None:
        """Set the size of the process's console (pty)."""
        self._check("ResizeConsole")
        self._call("ResizeConsole", {"op": "resize", "width": width, "height": height})

    def close(self) -> None:
        """Release the handle (and stdio it still holds unused); the process goes on."""
        if self._fds is not None:
            for fd in self._fds.fds:
                if fd >= 0:
                    os.close(fd)
            self._fds = None
        self._closed = True


# -- module functions ---------------------------------------------------------------------


def create_container(container_id: str, config: ContainerConfig, *,
                     roots: Roots | None = None, image_config: dict[str, Any] | None = None,
                     auto_remove: bool = False, runtime: str | None = None,
                     user_namespace: UserNamespace | None = None) -> Container:
    """Create a container (not started) from *config*; return its handle.

    With ``config.layer_folder_path`` the caller's prepared sandbox layer is the root
    filesystem. Otherwise pyhcs makes a sandbox layer over ``config.layers`` (topmost
    first) and removes it with the container.

    *runtime* chooses the executor (``"native"``, ``"crun"``, ``"runc"`` or an absolute
    path to an OCI runtime; None: ``$PYHCS_RUNTIME``, else native). It is kept with the
    container, which always runs on it (see ``pyhcs._runtime._oci``).

    *user_namespace* (pyhcs's own; hcsshim has no such field) runs every process of the
    container in a new user namespace with those id mappings: its root is an unprivileged
    host id, with capabilities only over what the namespace maps. The image's files read
    as owned by root inside (id-mapped layers; Linux >= 6.13). On the native runtime its
    other namespaces (network, hostname, mounts) stay the host's to manage, so even its
    root cannot change them. Needs a sandbox pyhcs makes (``config.layers``), and on crun
    a run root that others can search (runc is refused); otherwise
    :class:`NotSupportedError`.
    """
    op = "CreateContainer"
    _check_id(container_id, op)
    validate(config)
    if user_namespace is not None and not isinstance(user_namespace, UserNamespace):
        raise InvalidConfigError(op, message="user_namespace must be a UserNamespace")
    # executor choice (see _runtime._oci, imported only when an OCI runtime is chosen)
    choice = runtime if runtime is not None else os.environ.get("PYHCS_RUNTIME", "")
    oci_runtime = None
    if choice.strip() not in ("", "native"):
        from .._runtime import _oci

        oci_runtime = _oci.resolve_runtime(choice, op)
    if user_namespace is not None and config.layer_folder_path:
        raise NotSupportedError(
            op, extra_info="user_namespace",
            message="a user namespace needs a sandbox that pyhcs prepares itself "
            "(config.layers, not layer_folder_path)")
    roots = roots or Roots.resolve()
    if config.endpoint_list:
        from .. import _network

        for ep in config.endpoint_list:
            _network.get_endpoint(ep, roots=roots)  # NetworkError (not found) if unknown
    reg = _registry(roots)
    run_dir = roots.container_run_dir(container_id)
    if user_namespace is not None and oci_runtime is not None:
        if os.path.basename(oci_runtime) == "runc":
            # runc exec joins the user namespace before the network namespace, which the
            # host (the supervisor) owns: refused by the kernel
            raise NotSupportedError(
                op, extra_info="user_namespace",
                message="runc cannot start processes in a user namespace whose network "
                "namespace the host owns; use the native runtime or crun")
        _check_searchable(roots.run_root, op)
    doc = to_dict(config)
    if image_config:
        doc["_pyhcs_image"] = image_config
    sandbox = home = ""
    try:
        with reg.transaction() as c:
            c.execute(
                "INSERT INTO containers(id, name, owner, system_type, config, state, created, "
                "auto_remove) VALUES (?,?,?,?,?,?,?,?)",
                (container_id, config.name, config.owner, config.system_type or "Container",
                 json.dumps(doc), "creating", time.time(), int(auto_remove)))
    except sqlite3.IntegrityError:
        raise ContainerError(container_id, op, ERR_ALREADY_EXISTS) from None
    try:
        if config.layer_folder_path:
            folder = os.path.abspath(config.layer_folder_path)
            info = _layers.DriverInfo(1, os.path.dirname(folder))
            rootfs = _layers.get_layer_mount_path(info, os.path.basename(folder), roots=roots)
        elif config.layers:
            # the roots given, not the environment's
            info = _layers.DriverInfo(1, str(roots.layers_dir))
            home, sandbox = info.home_dir, container_id
            parents = [layer.path for layer in config.layers]
            _layers.create_sandbox_layer(info, sandbox, config.layers[0].id, parents,
                                         size_bytes=config.storage_sandbox_size or None,
                                         roots=roots)
            try:
                _layers.prepare_layer(info, sandbox, parents, roots=roots,
                                      userns=user_namespace)
            except BaseException:
                _layers.destroy_layer(info, sandbox, roots=roots)
                raise
            rootfs = _layers.get_layer_mount_path(info, sandbox, roots=roots)
        else:
            raise InvalidConfigError(op, message="Layers is empty and no LayerFolderPath given")
        try:
            upper = os.path.join(home, sandbox, "upper") if sandbox else ""
            spec = container_spec(container_id, config, rootfs, userns=user_namespace,
                                  block_device=_sandbox_device(rootfs, upper, config))
            if oci_runtime is not None:  # executor choice, kept with the container
                spec["annotations"]["io.pyhcs.runtime"] = oci_runtime  # RUNTIME_ANNOTATION
            run_dir.mkdir(parents=True, exist_ok=True)
            (run_dir / "config.json").write_text(json.dumps(spec, separators=(",", ":")))
        except BaseException:
            if sandbox:
                _layers.unprepare_layer(info, sandbox, roots=roots)
                _layers.destroy_layer(info, sandbox, roots=roots)
            raise
    except BaseException as e:
        reg.execute("DELETE FROM containers WHERE id=?", (container_id,))
        shutil.rmtree(run_dir, ignore_errors=True)
        if isinstance(e, HcsError):
            raise
        if isinstance(e, OSError):
            raise ContainerError(container_id, op, None, message=str(e)) from e
        raise
    reg.execute("UPDATE containers SET state='created', sandbox_layer=?, layer_home=? "
                "WHERE id=?", (sandbox, home, container_id))
    return Container(container_id, roots)


def _check_searchable(path: Path, op: str) -> None:
    """An OCI runtime sets up a user namespace's mounts as its root, an unprivileged
    host id: every folder down to the run root must let others search it."""
    for p in (path, *path.parents):
        if p.exists() and not os.stat(p).st_mode & 0o001:
            raise NotSupportedError(
                op, extra_info="user_namespace",
                message=f"{p} is not searchable by others (o+x), so an OCI runtime in a "
                "user namespace cannot reach the container's root; use the native runtime "
                "or a run root whose folders are")


def hot_attach_endpoint(container_id: str, endpoint_id: str, *,
                        roots: Roots | None = None) -> None:
    """hcsshim's HotAttachEndpoint: plug *endpoint_id* into the running container."""
    with open_container(container_id, roots=roots) as c:
        c.modify({"ResourceType": "Network", "RequestType": "Add", "Settings": endpoint_id})


def hot_detach_endpoint(container_id: str, endpoint_id: str, *,
                        roots: Roots | None = None) -> None:
    """hcsshim's HotDetachEndpoint: unplug *endpoint_id* from the container."""
    with open_container(container_id, roots=roots) as c:
        c.modify({"ResourceType": "Network", "RequestType": "Remove", "Settings": endpoint_id})


def _write_in_root(root: str, rel: str, data: bytes) -> None:
    """Write *data* to *rel* inside the root file system *root*: symlinks in the image are
    resolved inside it, never out of it."""
    path = secure_join(root, rel)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC,
                 0o644)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


def _sandbox_device(rootfs: str, upper: str, config: ContainerConfig
                    ) -> tuple[int, int] | None:
    """The block device the container writes to (for storage limits and statistics), or
    None if it cannot be found and no storage limit needs it. *upper* is where its writes
    land (the sandbox's upper directory), *rootfs* what it sees."""
    try:
        st_dev = os.stat(upper or rootfs).st_dev
        dev = _devices.get(st_dev)
        if dev is None:
            dev = _devices[st_dev] = tuple(block_device(upper or rootfs))  # type: ignore[assignment]
        return dev
    except (HcsError, OSError):
        if config.storage_iops_maximum or config.storage_bandwidth_maximum:
            raise
        return None


#: st_dev -> its block device: reading mountinfo for every container costs a millisecond
_devices: dict[int, tuple[int, int]] = {}


def create_container_with_json(container_id: str, config: ContainerConfig, extra_json: str,
                               *, roots: Roots | None = None) -> Container:
    """hcsshim's CreateContainerWithJSON: *extra_json* (an object in hcsshim's names) is
    merged over the config document before the container is created."""
    try:
        extra = json.loads(extra_json) if extra_json else {}
    except ValueError as e:
        raise InvalidConfigError("CreateContainer", message=f"extra JSON: {e}") from e
    if not isinstance(extra, dict):
        raise InvalidConfigError("CreateContainer", message="extra JSON is not an object")
    merged = {**to_dict(config), **extra}
    return create_container(container_id, from_json(ContainerConfig, json.dumps(merged)),
                            roots=roots)


def open_container(container_id: str, *, roots: Roots | None = None) -> Container:
    """A handle to an existing container, created by any process."""
    _check_id(container_id, "OpenContainer")
    roots = roots or Roots.resolve()
    reg = _registry(roots)
    row = reg.query_one("SELECT state FROM containers WHERE id=?", (container_id,))
    if row is None or row["state"] == "creating":
        raise ContainerError(container_id, "OpenContainer", ERR_COMPUTE_SYSTEM_DOES_NOT_EXIST)
    _recover(reg, roots, container_id)
    return Container(container_id, roots)


def get_containers(query: ComputeSystemQuery | None = None, *, roots: Roots | None = None
                   ) -> list[ContainerProperties]:
    """The containers matching *query* (every list given must contain the value)."""
    roots = roots or Roots.resolve()
    q = query or ComputeSystemQuery()
    reg = _registry(roots)
    out = []
    for row in reg.query("SELECT * FROM containers WHERE state != 'creating' ORDER BY created"):
        if row["state"] in ("running", "paused") and not _supervisor_alive(row):
            _recover(reg, roots, row["id"])
            fresh = reg.query_one("SELECT * FROM containers WHERE id=?", (row["id"],))
            if fresh is None:
                continue
            row = fresh
        if row["state"] == "stopped" and row["auto_remove"]:
            # created with auto_remove (``run -d --rm``): nobody waited, so whoever looks
            # first after it stopped removes it
            with contextlib.suppress(HcsError):
                remove_container(row["id"], roots=roots)
            continue
        if q.ids and row["id"] not in q.ids:
            continue
        if q.names and row["name"] not in q.names:
            continue
        if q.types and row["system_type"] not in q.types:
            continue
        if q.owners and row["owner"] not in q.owners:
            continue
        out.append(_properties(row))
    return out


def container_state(container_id: str, *, roots: Roots | None = None) -> dict[str, Any]:
    """The registry's record of a container: state, exit code, times (for inspect)."""
    roots = roots or Roots.resolve()
    reg = _registry(roots)
    _recover(reg, roots, container_id)
    row = reg.query_one("SELECT * FROM containers WHERE id=?", (container_id,))
    if row is None:
        raise ContainerError(container_id, "Inspect", ERR_COMPUTE_SYSTEM_DOES_NOT_EXIST)
    return dict(row)


def remove_container(container_id: str, *, force: bool = False,
                     roots: Roots | None = None) -> None:
    """Delete a stopped container: its record, run directory and the sandbox pyhcs made.

    A running container is refused unless *force*, which terminates it first.
    """
    op = "RemoveContainer"
    _check_id(container_id, op)
    roots = roots or Roots.resolve()
    reg = _registry(roots)
    _recover(reg, roots, container_id)
    row = reg.query_one("SELECT * FROM containers WHERE id=?", (container_id,))
    if row is None:
        raise ContainerError(container_id, op, ERR_COMPUTE_SYSTEM_DOES_NOT_EXIST)
    if row["state"] in ("running", "paused", "starting"):
        if not force:
            raise ContainerError(container_id, op, ERR_VMCOMPUTE_OPERATION_INVALID_STATE,
                                 message="the container is running (use force)")
        c = Container(container_id, roots)
        try:
            if row["state"] == "paused":
                c.resume()
            c.terminate()
        except ContainerError:
            pass
        c.wait(30)
    reap_supervisors()
    if row["sandbox_layer"]:
        # the sandbox's files are deleted in the background: nothing waits on them
        _layers.discard_sandbox(_layers.DriverInfo(1, row["layer_home"]), row["sandbox_layer"],
                                roots=roots)
    # The supervisor may still be releasing the cgroup (it does so after its final
    # record); a new container of the same id waits for that (see _native), not us.
    c = Container(container_id, roots)
    attached = c._attached_endpoints()
    if attached:
        from .. import _network

        for ep in attached:
            with contextlib.suppress(HcsError):
                _network.detach_endpoint(ep, container_id, roots=roots)
    reg.execute("DELETE FROM containers WHERE id=?", (container_id,))
    shutil.rmtree(roots.container_run_dir(container_id), ignore_errors=True)
