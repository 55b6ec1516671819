"""The wire between clients and a container's supervisor.

One request per connection on a SOCK_SEQPACKET unix socket: a JSON object, optionally
with file descriptors (SCM_RIGHTS); one reply the same way. Replies to ``wait`` arrive when
the awaited exit happens, so a waiter only needs its socket to learn about an exit.
"""

from __future__ import annotations

import errno
import json
import os
import socket
from typing import Any

__all__ = ["SupervisorGone", "MAX_MSG", "MAX_FDS", "address", "call", "send", "recv"]

MAX_MSG = 1 << 20
MAX_FDS = 8


class SupervisorGone(Exception):
    """The supervisor is not there (never started, exited, or killed)."""


def address(path: str) -> tuple[str, int]:
    """A socket address for *path*, short enough for sun_path (108 bytes) however deep the
    run root is: long paths go through an O_PATH fd of the directory. Returns the address
    and that fd (or -1), which the caller closes after bind/connect."""
    if len(path.encode()) < 100:
        return path, -1
    dfd = os.open(os.path.dirname(path), os.O_PATH | os.O_CLOEXEC)
    return f"/proc/self/fd/{dfd}/{os.path.basename(path)}", dfd


def send(sock: socket.socket, obj: dict[str, Any], fds: list[int] | None = None) -> None:
    data = json.dumps(obj, separators=(",", ":")).encode()
    if fds:
        socket.send_fds(sock, [data], fds)
    else:
        sock.sendall(data)


def recv(sock: socket.socket) -> tuple[dict[str, Any] | None, list[int]]:
    """One message; ``(None, [])`` at end of stream."""
    data, fds, _flags, _addr = socket.recv_fds(sock, MAX_MSG, MAX_FDS)
    if not data:
        for fd in fds:
            os.close(fd)
        return None, []
    obj = json.loads(data)
    if not isinstance(obj, dict):
        raise ValueError("malformed message")
    return obj, fds


def call(sock_path: str, request: dict[str, Any], timeout: float | None = None,
         fds: list[int] | None = None) -> tuple[dict[str, Any], list[int]]:
    """Send *request* to the supervisor at *sock_path* and return its reply and fds.

    Raises :class:`SupervisorGone` if nobody listens or the supervisor dies before replying,
    and ``TimeoutError`` when *timeout* (seconds) passes first.
    """
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    try:
        try:
            addr, dfd = address(sock_path)
        except FileNotFoundError as e:
            raise SupervisorGone(str(e)) from e
        try:
            sock.connect(addr)
        except OSError as e:
            if e.errno in (errno.ENOENT, errno.ECONNREFUSED, errno.ENOTDIR):
                raise SupervisorGone(str(e)) from e
            raise
        finally:
            if dfd >= 0:
                os.close(dfd)
        sock.settimeout(timeout)
        try:
            send(sock, request, fds)
            reply, rfds = recv(sock)
        except (ConnectionResetError, BrokenPipeError) as e:
            # the supervisor closed its socket between our connect and its accept
            raise SupervisorGone(str(e)) from e
        if reply is None:
            raise SupervisorGone("the supervisor closed the connection")
        return reply, rfds
    finally:
        sock.close()
