"""The system-call wrappers of pyhcs._linux that are not covered through the runtime."""

from __future__ import annotations

import os

import pytest

from pyhcs import _linux as L


def _run_forked(fork: object) -> tuple[int, bytes]:
    """Fork with *fork*; the child reports whether the at-fork callback ran and exits 7."""
    r, w = os.pipe()
    pid = fork()  # type: ignore[operator]
    if pid == 0:
        try:
            os.write(w, b"ran" if _ran else b"skipped")
        finally:
            os._exit(7)
    os.close(w)
    try:
        data = os.read(r, 16)
    finally:
        os.close(r)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status), data


_ran = False


def _mark_ran() -> None:
    global _ran
    _ran = True


os.register_at_fork(after_in_child=_mark_ran)


@pytest.mark.parametrize(("fork", "callbacks"), [(os.fork, b"ran"), (L.fork_bare, b"skipped")])
def test_fork_bare_skips_the_after_fork_callbacks(fork: object, callbacks: bytes) -> None:
    # the child runs Python and exits with its code either way; only os.fork runs the
    # interpreter's after-fork work (which is what makes it cost copy-on-write faults)
    assert _run_forked(fork) == (7, callbacks)
