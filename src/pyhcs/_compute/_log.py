"""The container log: what a process created with ``log_output=True`` writes, kept by the
supervisor in the container's run directory (as conmon keeps ``ctr.log``).

The process's stdout and stderr are one pipe (so their order is kept) that the supervisor,
which outlives every client, drains into ``ctr.log``. The log is bounded: when a write
would take ``ctr.log`` past :data:`LOG_MAX_BYTES`, it becomes ``ctr.log.1`` (replacing the
previous one) and a new ``ctr.log`` starts. So at most ``2 * LOG_MAX_BYTES`` bytes are kept,
always the newest output. The files are removed with the run directory, that is with the
container.

Nothing here blocks the container: if the log cannot be written (a full disk), the output
is dropped rather than left in the pipe.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

__all__ = ["LOG_FILE", "LOG_MAX_BYTES", "ContainerLog", "read_log"]

LOG_FILE = "ctr.log"
#: The size at which ``ctr.log`` is rotated to ``ctr.log.1``; two files are kept.
LOG_MAX_BYTES = 1 << 20
_CHUNK = 1 << 16
# Reads per wakeup: a process that writes without pause cannot hold the supervisor here.
_READS_PER_DRAIN = 16


class ContainerLog:
    """The supervisor's side of the log: the open file and the pipes feeding it."""

    def __init__(self, run_dir: Path) -> None:
        self._path = run_dir / LOG_FILE
        self._fd = self._open()
        self._size = os.fstat(self._fd).st_size
        self._readers: set[int] = set()

    def _open(self) -> int:
        # the run directory is the host's and root's: no symlink is followed into it
        return os.open(self._path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW
                       | os.O_CLOEXEC, 0o600)

    def pipe(self) -> tuple[int, int]:
        """A new pipe into the log: ``(read end, write end)``. The read end (non-blocking)
        is the supervisor's, to :meth:`drain` when readable; the write end is the
        process's stdout and stderr."""
        r, w = os.pipe2(os.O_CLOEXEC)
        os.set_blocking(r, False)  # the read end only: the process's end stays blocking
        self._readers.add(r)
        return r, w

    def drain(self, r: int, limit: int = _READS_PER_DRAIN) -> bool:
        """Move what pipe *r* holds into the log (at most *limit* reads); False once every
        writer has closed it (the caller then stops watching it and calls :meth:`release`)."""
        for _ in range(limit):
            try:
                chunk = os.read(r, _CHUNK)
            except BlockingIOError:
                return True
            except OSError:
                return False
            if not chunk:
                return False
            self._write(chunk)
        return True

    def release(self, r: int) -> None:
        """Close the read end *r* of a pipe from :meth:`pipe`."""
        if r in self._readers:
            self._readers.discard(r)
            os.close(r)

    def close(self) -> list[int]:
        """Drain what the pipes still hold, close the file; returns the read ends, which the
        caller stops watching and then passes to :meth:`release`."""
        for r in self._readers:
            # every process is gone: this ends at the pipe's end or when it is empty
            self.drain(r, limit=1024)
        os.close(self._fd)
        self._fd = -1
        return list(self._readers)

    def _write(self, data: bytes) -> None:
        if self._fd < 0:
            return
        try:
            if self._size and self._size + len(data) > LOG_MAX_BYTES:
                os.rename(self._path, self._path.with_name(LOG_FILE + ".1"))
                os.close(self._fd)
                self._fd = -1
                self._fd = self._open()
                self._size = 0
            view = memoryview(data)
            while view:
                n = os.write(self._fd, view)
                view = view[n:]
                self._size += n
        except OSError:
            pass  # dropped: the container must never wait for its log


def read_log(run_dir: Path) -> Iterator[bytes]:
    """The kept log of the container whose run directory is *run_dir*, oldest first, in
    chunks. Raises ``FileNotFoundError`` if the container keeps no log."""
    files = []
    with contextlib.suppress(FileNotFoundError):
        files.append(open(run_dir / (LOG_FILE + ".1"), "rb"))  # noqa: SIM115
    try:
        files.append(open(run_dir / LOG_FILE, "rb"))  # noqa: SIM115
    except BaseException:
        for f in files:
            f.close()
        raise
    for f in files:
        with f:
            while chunk := f.read(_CHUNK):
                yield chunk
