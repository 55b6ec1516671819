"""Network compartments: Windows' name for what Linux calls network namespaces.

A compartment id is the inode number of a network namespace that has an endpoint attached
(:func:`endpoint_compartment_id` reports it). Id 0 is the host's: the namespace the
process was in the first time it entered a compartment. pyhcs keeps a descriptor of that
namespace open so the thread can always come back.
"""

from __future__ import annotations

import os
import threading

from pyhcs._errors import ERR_ELEMENT_NOT_FOUND
from pyhcs._linux import CLONE_NEWNET, setns
from pyhcs._network._errors import NetworkError
from pyhcs._network._service import registry
from pyhcs._paths import Roots

__all__ = ["set_current_thread_compartment_id", "get_current_thread_compartment_id"]

_lock = threading.Lock()
_host: tuple[int, int] | None = None  # (pid, fd): re-taken after fork


def _host_fd() -> int:
    global _host
    with _lock:
        if _host is None or _host[0] != os.getpid():
            # inherited across fork it would still point at the parent's host namespace,
            # which may not be this process's: take this process's own
            fd = os.open("/proc/self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
            _host = (os.getpid(), fd)
        return _host[1]


def get_current_thread_compartment_id() -> int:
    """The compartment id of the calling thread: 0 on the host, else its namespace's inode."""
    ino = os.stat("/proc/thread-self/ns/net").st_ino
    return 0 if ino == os.fstat(_host_fd()).st_ino else ino


def set_current_thread_compartment_id(compartment_id: int, *,
                                      roots: Roots | None = None) -> None:
    """hcsshim's ``SetCurrentThreadCompartmentId``: move the calling thread's networking.

    ``0`` returns the thread to the host's network namespace; any other id must be a
    compartment pyhcs reported (an attached endpoint's :func:`endpoint_compartment_id`),
    and the thread joins that namespace: sockets it opens afterwards live there. Only
    the calling thread moves (threads it starts later inherit its namespace).

    Raises :class:`NetworkError` with ``ERR_ELEMENT_NOT_FOUND`` for an unknown id or a
    namespace that no longer exists.
    """
    op = "SetCurrentThreadCompartmentId"
    host = _host_fd()
    if compartment_id == 0:
        setns(host, CLONE_NEWNET)
        return
    rows = registry(roots).query(
        "SELECT netns_path FROM endpoints WHERE netns_ino=? AND attach_state='attached'",
        (compartment_id,))
    for row in rows:
        try:
            fd = os.open(row["netns_path"], os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            continue
        try:
            # the path may name another namespace by now (e.g. a reused pid)
            if os.fstat(fd).st_ino == compartment_id:
                setns(fd, CLONE_NEWNET)
                return
        finally:
            os.close(fd)
    raise NetworkError(str(compartment_id), op, ERR_ELEMENT_NOT_FOUND,
                       message=f"compartment {compartment_id} not found")
