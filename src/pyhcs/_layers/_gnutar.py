"""GNU tar as the layer importer's writer: fed only entries pyhcs has checked, confined.

Creating ten thousand files costs GNU tar about 60 us of kernel time each and almost
nothing else; doing the same system calls from Python costs as much again in the
interpreter. So the importer (:mod:`pyhcs._layers._extract`) keeps every decision in
Python (the archive is parsed, every name, link, type and owner checked against the tree
built so far) and hands the writing to ``tar -x``, which runs on the other core while
Python reads on.

``tar`` never sees the archive's own headers. It reads a **canonical stream** that
:func:`header` re-encodes from the checked values: clean relative names (GNU long-name
records when long, raw bytes, no charset conversion), numeric owners, pax records only for
nanosecond times, big numbers and the xattrs the policy keeps. The file data is copied
through unchanged. So no parser difference between pyhcs and tar can matter: what tar
could misread, pyhcs wrote.

It is also confined, in case it ever did something the stream does not say: in a private
mount namespace where every mount is read-only, ``nodev`` and ``nosuid`` except a bind of
the destination, with a capability bounding set of only what extracting needs (chown,
fowner, fsetid, dac_override, mknod for whiteouts, setfcap for file capabilities) and
killed if the importing process dies.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import shutil
import signal
import struct
import zlib
from typing import NoReturn, Protocol

from pyhcs import _linux

__all__ = ["ConfinedTar", "TarError", "block_sum", "header"]

_BLOCK = 512
_MAGIC = b"ustar\x0000"
_MAX_OCTAL_7 = 0o7777777
_MAX_OCTAL_11 = 0o77777777777
_BILLION = 1_000_000_000

# GNU tar flags: numeric owners and exact modes from the stream; -P because every name is
# already a clean relative path (it also makes tar create symlinks at once, not as
# placeholders, which is right since no later entry goes through one); xattrs limited to
# what the import policy keeps, even though the stream carries nothing else.
_TAR_ARGS = (
    "-x", "-f", "-", "-b", "256", "-B", "-P", "--numeric-owner", "--same-owner",
    "--same-permissions", "--xattrs", "--xattrs-include=user.*",
    "--xattrs-include=security.capability", "--no-acls", "--no-selinux",
    "--warning=no-timestamp", "--warning=no-unknown-keyword",
)
_CAP_CHOWN, _CAP_DAC_OVERRIDE, _CAP_FOWNER, _CAP_FSETID = 0, 1, 3, 4
_CAP_MKNOD, _CAP_SETFCAP = 27, 31
_TAR_CAPS = frozenset(
    (_CAP_CHOWN, _CAP_DAC_OVERRIDE, _CAP_FOWNER, _CAP_FSETID, _CAP_MKNOD, _CAP_SETFCAP)
)
_F_SETPIPE_SZ = 1031
# Measured on this project's benchmark (docs/benchmarks.md): a 1 MiB pipe filled in
# writes of 256 KiB keeps tar busiest. With 1 MiB writes tar waits for each one longer;
# with 2 MiB or larger pipes tar itself ran up to twice as slow.
_PIPE_BYTES = 1 << 20
_FLUSH_AT = 256 << 10
_IOV_BATCH = 1000  # below IOV_MAX (1024), the most one writev takes


def block_sum(block: bytes | bytearray) -> int:
    """The sum of a 512-byte header's bytes (what tar checksums are made of).

    zlib.adler32's low half is 1 + the byte sum mod 65521: exact for 256 bytes (at most
    65,280), and ten times faster than ``sum()`` over the header.
    """
    return (zlib.adler32(block[:256]) & 0xFFFF) + (zlib.adler32(block[256:]) & 0xFFFF) - 2


# A header is built as: name, mode + uid + gid, size, mtime, checksum, type, link name
# (_HEAD), then _TAIL, which is the same for every entry pyhcs writes: the ustar magic and
# version, empty user and group names, device 0:0 and no prefix.
_HEAD = struct.Struct("100s24s12s12s8sc100s")
_TAIL = _MAGIC + bytes(64) + b"0000000\x00" * 2 + bytes(167)
#: what _TAIL and the checksum field (counted as eight spaces) add to every checksum
_FIXED_SUM = sum(_TAIL) + 8 * 32
# modes and owners repeat: each combination encoded (with its byte sum) once
_OWNERS: dict[tuple[int, int, int], tuple[bytes, int]] = {}


def _owner(mode: int, uid: int, gid: int) -> tuple[bytes, int]:
    key = (mode, uid, gid)
    got = _OWNERS.get(key)
    if got is None:
        field = b"%07o\x00%07o\x00%07o\x00" % key
        got = (field, sum(field))
        if len(_OWNERS) < 4096:
            _OWNERS[key] = got
    return got


def _ustar(name: bytes, typ: bytes, mode: int, uid: int, gid: int, size: int, mtime: int,
           link: bytes) -> bytes:
    owner, owner_sum = _owner(mode, uid, gid)
    numbers = b"%011o\x00%011o\x00" % (size, mtime)
    # The byte sum of name, link and numbers as block_sum makes it: at most 224 bytes,
    # so one adler32 run over the three gives it exactly.
    chk = ((zlib.adler32(numbers, zlib.adler32(link, zlib.adler32(name))) & 0xFFFF) - 1
           + owner_sum + typ[0] + _FIXED_SUM)
    return _HEAD.pack(name, owner, numbers[:12], numbers[12:], b"%06o\x00 " % chk, typ,
                      link) + _TAIL


# The header of a metadata record depends only on its type and length: each made once.
_RECORD_HEADERS: dict[tuple[bytes, int], bytes] = {}


def _record(typ: bytes, data: bytes) -> bytes:
    """A metadata record (GNU long name ``L``/``K`` or pax ``x``) with its padding."""
    n = len(data)
    head = _RECORD_HEADERS.get((typ, n))
    if head is None:
        head = _ustar(b"././@LongLink", typ, 0o644, 0, 0, n, 0, b"")
        if len(_RECORD_HEADERS) < 4096:
            _RECORD_HEADERS[typ, n] = head
    return head + data + bytes(-n % _BLOCK)


def _pax(key: bytes, value: bytes) -> bytes:
    """One pax record: its length (which counts its own digits), then the key and value."""
    body = b" " + key + b"=" + value + b"\n"
    digits = len(b"%d" % len(body))
    if len(b"%d" % (len(body) + digits)) > digits:
        digits += 1
    return b"%d" % (len(body) + digits) + body


def header(name: bytes, typ: bytes, mode: int, uid: int, gid: int, size: int, mtime_ns: int,
           link: bytes = b"", xattrs: dict[bytes, bytes] | None = None) -> bytes:
    """The canonical tar header (with its long-name and pax records) of one checked entry.

    *name* and *link* are raw bytes without NUL; *mode* holds permission bits only; owners
    are numeric; *mtime_ns* may be negative. Device entries are always 0:0 (whiteouts).
    """
    sec, frac = divmod(mtime_ns, _BILLION)
    if not (frac or xattrs or len(name) > 100 or len(link) > 100 or size > _MAX_OCTAL_11
            or uid > _MAX_OCTAL_7 or gid > _MAX_OCTAL_7 or not 0 <= sec <= _MAX_OCTAL_11):
        return _ustar(name, typ, mode, uid, gid, size, sec, link)  # the usual case
    out = b""
    if len(name) > 100:
        out += _record(b"L", name + b"\x00")
        name = name[:100]
    if len(link) > 100:
        out += _record(b"K", link + b"\x00")
        link = link[:100]
    pax = b""
    if frac or not 0 <= sec <= _MAX_OCTAL_11:
        neg, mag = mtime_ns < 0, abs(mtime_ns)
        text = b"%s%d.%09d" % (b"-" if neg else b"", mag // _BILLION, mag % _BILLION)
        pax += _pax(b"mtime", text)
        sec = min(max(sec, 0), _MAX_OCTAL_11)
    if size > _MAX_OCTAL_11:
        pax += _pax(b"size", b"%d" % size)
    if uid > _MAX_OCTAL_7:
        pax += _pax(b"uid", b"%d" % uid)
        uid = 0
    if gid > _MAX_OCTAL_7:
        pax += _pax(b"gid", b"%d" % gid)
        gid = 0
    if xattrs:
        for k, v in xattrs.items():
            pax += _pax(b"SCHILY.xattr." + k, v)
    if pax:
        out += _record(b"x", pax)
    return out + _ustar(name, typ, mode, uid, gid, min(size, _MAX_OCTAL_11), sec, link)


_STRERROR = {os.strerror(n): n for n in sorted(errno.errorcode, reverse=True)}


class TarError(OSError):
    """tar failed; the message is tar's, the errno the one it names (EIO if none)."""


class _Source(Protocol):
    def view(self, n: int) -> memoryview: ...


class ConfinedTar:
    """One ``tar -x`` into *dest_dir*, confined (see the module's text), fed by the caller.

    :meth:`add` and :meth:`add_file` queue header bytes and file data (as they are: the
    queue is written with one ``writev``, no copy is made); :meth:`finish` ends the
    archive and waits, raising :class:`TarError` (with the errno tar's message names) if
    tar failed; :meth:`abort` kills it. Nothing of the parent but the pipe reaches tar.
    """

    def __init__(self, dest_dir: str) -> None:
        tar = shutil.which("tar", path="/usr/bin:/bin")
        if tar is None:
            raise OSError(errno.ENOENT, "GNU tar (/usr/bin/tar) is needed to import layers")
        # What waits to be written: header bytes and views of the input's chunks, written
        # by one writev once 1 MiB (or _IOV_BATCH buffers) wait. Copying them into one
        # buffer first would copy every small file's data twice.
        self._bufs: list[bytes | memoryview] = []
        self._n = 0
        r, w = os.pipe2(os.O_CLOEXEC)
        err = os.memfd_create("pyhcs-tar-stderr", os.MFD_CLOEXEC)
        with contextlib.suppress(OSError):
            fcntl.fcntl(w, _F_SETPIPE_SZ, _PIPE_BYTES)  # fewer switches between us and tar
        dest = os.path.abspath(dest_dir)
        argv = [tar, *_TAR_ARGS]
        env = {"LC_ALL": "C", "PATH": "/usr/bin:/bin"}
        parent = os.getpid()
        try:
            pid = os.fork()
        except BaseException:
            for fd in (r, w, err):
                os.close(fd)
            raise
        if pid == 0:  # only system calls, then exec: the parent may have had threads
            try:
                os.dup2(r, 0)
                os.dup2(err, 1)
                os.dup2(err, 2)
                _linux.close_range_from(3)
                _linux.prctl(_linux.PR_SET_PDEATHSIG, signal.SIGKILL)
                if os.getppid() != parent:
                    os._exit(1)
                _confine(dest)
                os.execve(tar, argv, env)
            except BaseException as e:  # reported through stderr, then exit 127
                with contextlib.suppress(BaseException):
                    os.write(2, f"tar: cannot start: {e}\n".encode())
            finally:
                os._exit(127)
        os.close(r)
        self.pid: int | None = pid
        self._w: int | None = w
        self._err = err

    @property
    def fd(self) -> int:
        """The write end of tar's input (valid until :meth:`finish` or :meth:`abort`)."""
        assert self._w is not None
        return self._w

    def add(self, data: bytes) -> None:
        """Queue *data* (not copied: it must not change); written once 1 MiB is queued (or
        by :meth:`flush`)."""
        self._bufs.append(data)
        self._n += len(data)
        if self._n >= _FLUSH_AT or len(self._bufs) >= _IOV_BATCH:
            self.flush()

    def add_file(self, head: bytes, src: _Source, n: int) -> int:
        """Queue *head* (a file's header) and the next *n* bytes of *src* (views of its
        buffers, which it must not change); returns how many of the *n* there were."""
        bufs = self._bufs
        bufs.append(head)
        self._n += len(head)
        left = n
        while left:
            view = src.view(left)
            if not view:
                break
            bufs.append(view)
            left -= len(view)
            self._n += len(view)
            if self._n >= _FLUSH_AT or len(bufs) >= _IOV_BATCH:
                self.flush()
                bufs = self._bufs
        return n - left

    def flush(self) -> None:
        """Write what is queued."""
        bufs = self._bufs
        if not bufs:
            return
        self._bufs, self._n = [], 0
        while bufs:
            try:
                k = os.writev(self.fd, bufs)
            except BrokenPipeError:
                self.raise_failure()
            # a pipe takes it all unless a signal interrupts: then go on from where it was
            i = 0
            while i < len(bufs) and k >= len(bufs[i]):
                k -= len(bufs[i])
                i += 1
            bufs = bufs[i:]
            if k:
                bufs[0] = memoryview(bufs[0])[k:]

    def finish(self) -> None:
        """End the archive, let tar finish, and raise ``OSError`` if it did not succeed."""
        self.add(bytes(2 * _BLOCK))
        try:
            self.flush()
        finally:
            self._w_close()
        self._reap(expect_success=True)

    def abort(self) -> None:
        """Kill tar (if it runs) and reap it; idempotent."""
        self._w_close()
        if self.pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)
            os.waitpid(self.pid, 0)
            self.pid = None
        self._close_err()

    def _w_close(self) -> None:
        if self._w is not None:
            os.close(self._w)
            self._w = None

    def _close_err(self) -> None:
        if self._err >= 0:
            os.close(self._err)
            self._err = -1

    def raise_failure(self) -> NoReturn:
        """tar stopped reading: reap it and raise its error."""
        self._w_close()
        self._reap()
        raise AssertionError("unreachable")

    def _reap(self, expect_success: bool = False) -> None:
        assert self.pid is not None
        _, status = os.waitpid(self.pid, 0)
        self.pid = None
        try:
            if expect_success and os.waitstatus_to_exitcode(status) == 0:
                return
            message = os.pread(self._err, 4096, 0).decode(errors="replace").strip()
        finally:
            self._close_err()
        raise _tar_error(message, os.waitstatus_to_exitcode(status))


def _tar_error(message: str, code: int) -> TarError:
    """tar's first error line as a TarError, with the errno its text names if any."""
    lines = [ln for ln in message.splitlines() if ln and "Exiting with failure" not in ln]
    first = lines[0] if lines else f"tar exited with status {code}"
    for text, number in _STRERROR.items():
        if first.endswith(": " + text):
            return TarError(number, first)
    return TarError(errno.EIO, first)


def _confine(dest: str) -> None:
    """Make every mount but *dest* read-only (and all of them nodev, nosuid) in a private
    mount namespace, and keep only the capabilities extraction needs."""
    _linux.unshare(_linux.CLONE_NEWNS)
    _linux.mount(None, "/", None, _linux.MS_REC | _linux.MS_PRIVATE)
    _linux.mount(dest, dest, None, _linux.MS_BIND)
    _linux.mount_setattr(
        "/",
        attr_set=_linux.MOUNT_ATTR_RDONLY | _linux.MOUNT_ATTR_NODEV | _linux.MOUNT_ATTR_NOSUID,
        recursive=True,
    )
    _linux.mount_setattr(dest, attr_clr=_linux.MOUNT_ATTR_RDONLY)
    os.chdir(dest)
    _linux.capbset_drop_except(_TAR_CAPS)
