"""A streaming, hostile-archive-proof extractor for OCI layer tars.

The archive is read once, front to back (``tarfile`` in ``'r|'`` stream mode over our own
decompressor), and every entry is written through directory file descriptors opened with
``O_NOFOLLOW``, so nothing the archive says can make a write land outside the destination:

* names that are absolute, contain ``..``, exceed PATH_MAX / NAME_MAX, or hold a NUL are
  rejected;
* an entry whose parent path meets a symlink (or a non-directory) is rejected, so
  ``evil -> /victim`` followed by ``evil/pwned`` fails instead of writing into ``/victim``;
* hard links must name an entry already in this archive, reached without symlinks;
* device nodes are rejected, except character 0:0 (an overlay whiteout); FIFOs are allowed;
* OCI whiteouts ``.wh.NAME`` become overlay whiteouts (char 0:0 ``NAME``) and
  ``.wh..wh..opq`` becomes ``trusted.overlay.opaque=y`` on the directory; malformed
  whiteout names (``.wh.``, ``.wh..``, ``.wh...``, unknown ``.wh..wh.*``) are rejected;
* the bytes extracted are bounded by *max_size* (file data plus any bytes after the end
  of the archive), the entry count by :data:`MAX_ENTRIES`, and tar metadata records
  (pax / GNU long names) by :data:`MAX_HEADER_SIZE`, so a compression bomb stops early;
* a stream that ends without the end-of-archive marker, a corrupt header, a short member,
  or a gzip stream that is truncated or fails its CRC is an error, never a silent
  partial layer.

Symlink targets are stored verbatim (an absolute target such as ``/usr/lib`` is resolved
only inside the container's root) and are never followed here. Modes (setuid included),
numeric owners and modification times are kept; xattrs are taken only from the ``user.``
namespace and ``security.capability``: ``trusted.*`` (overlay's own metadata) never comes
from an archive.

Errors are raised as :class:`ArchiveError` (or ``OSError`` from the file system); the
layer store turns both into ``LayerError`` and discards the partial extraction.
"""

from __future__ import annotations

import bz2
import errno
import gzip
import hashlib
import io
import lzma
import os
import stat
import tarfile
import zlib
from dataclasses import dataclass, field
from typing import IO, Any, BinaryIO, Self

from pyhcs._layers._fsops import (
    DIR_FLAGS,
    OPAQUE_XATTR,
    UnsafePathError,
    lstat_at,
    open_dir_beneath,
    remove_entry,
    write_all,
)

__all__ = [
    "DEFAULT_MAX_SIZE",
    "MAX_ENTRIES",
    "MAX_HEADER_SIZE",
    "ArchiveError",
    "ExtractResult",
    "extract_tar",
]

#: Default bound on the bytes one archive may expand to (64 GiB).
DEFAULT_MAX_SIZE = 64 << 30
#: Bound on the entries in one archive; real images have a few hundred thousand at most.
MAX_ENTRIES = 10_000_000
#: Bound on one pax or GNU long-name record, which ``tarfile`` reads into memory whole.
MAX_HEADER_SIZE = 1 << 20

_PATH_MAX = 4096
_NAME_MAX = 255
_CHUNK = 1 << 20
_WH_PREFIX = b".wh."
_WH_OPAQUE = b".wh..wh..opq"
_WH_META = b".wh..wh."
# aufs bookkeeping some old images carry at their root; docker skips them, so do we.
_AUFS_META = (b".wh..wh.plnk", b".wh..wh.aufs", b".wh..wh.orph")
_XATTR_PAX_PREFIX = "SCHILY.xattr."
_KEPT_XATTRS = ("security.capability",)
_KEPT_XATTR_PREFIXES = ("user.",)
_ID_MAX = 0xFFFFFFFE  # (uid_t)-1 means "unchanged" to chown; anything above is invalid
_NS_MAX = (1 << 63) - 1


class ArchiveError(Exception):
    """The archive is malformed, hostile or over a limit; the message says which entry and why."""


@dataclass(frozen=True, slots=True)
class ExtractResult:
    """What one extraction produced."""

    #: sha256 (hex) of the archive's bytes as read, compressed or not.
    digest: str
    #: Bytes of file data written.
    size: int
    #: Entries processed.
    entries: int


class _HashingRaw(io.RawIOBase):
    """The raw source, hashed and counted byte for byte as it is read.

    ``readinto`` fills the whole buffer unless the source ends, so a peek at the magic
    sees every byte it asks for even when the source is a slow pipe.
    """

    def __init__(self, src: BinaryIO | IO[bytes]) -> None:
        super().__init__()
        self._src = src
        self.hash = hashlib.sha256()
        self.count = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buf: Any) -> int:
        view = memoryview(buf).cast("B")
        n = 0
        while n < len(view):
            data = self._src.read(len(view) - n)
            if not data:
                break
            view[n : n + len(data)] = data
            n += len(data)
        self.hash.update(view[:n])
        self.count += n
        return n


def _decompressor(buffered: io.BufferedReader[_HashingRaw]) -> io.BufferedIOBase:
    """Wrap *buffered* in the decompressor its magic names (gzip, bzip2, xz) or none."""
    magic = buffered.peek(6)[:6]
    # These decompressors read strictly forward, check the stream's own integrity (gzip's
    # CRC and length, xz/bzip2 checks) and raise EOFError on a truncated stream.
    if magic.startswith(b"\x1f\x8b"):
        return gzip.GzipFile(fileobj=buffered, mode="rb")
    if magic.startswith(b"BZh"):
        return bz2.BZ2File(buffered)
    if magic.startswith(b"\xfd7zXZ\x00"):
        return lzma.LZMAFile(buffered)
    if magic.startswith(b"\x28\xb5\x2f\xfd"):
        raise ArchiveError("zstd-compressed layers are not supported; use gzip or plain tar")
    return buffered


class _StrictTarInfo(tarfile.TarInfo):
    """A TarInfo that turns what ``tarfile`` would silently forgive into errors.

    In stream mode ``tarfile`` treats a missing, short or corrupt header after the first as
    the end of the archive: a truncated layer would import as a smaller one. Here such a
    header raises :class:`ArchiveError`, which ``tarfile`` lets through; only the real
    end-of-archive marker (a zero block) ends the iteration. Oversized metadata records are
    refused before ``tarfile`` reads them into memory, and GNU sparse files (whose maps are
    unbounded) are refused outright.
    """

    @classmethod
    def frombuf(cls, buf: bytes | bytearray, encoding: str, errors: str) -> Self:
        if len(buf) == 0:
            raise ArchiveError("archive is truncated: it ends without an end-of-archive marker")
        if len(buf) != tarfile.BLOCKSIZE:
            raise ArchiveError("archive is truncated inside a header")
        if buf.count(0) == tarfile.BLOCKSIZE:
            # The end-of-archive marker: let tarfile see it and end the iteration.
            return super().frombuf(buf, encoding, errors)
        try:
            obj = super().frombuf(buf, encoding, errors)
        except tarfile.HeaderError as e:
            raise ArchiveError(f"corrupt tar header: {e}") from None
        if obj.type in _META_TYPES and obj.size > MAX_HEADER_SIZE:
            raise ArchiveError(
                f"tar metadata record of {obj.size} bytes exceeds the {MAX_HEADER_SIZE}-byte limit"
            )
        return obj

    def _proc_sparse(self, tarfile: tarfile.TarFile) -> _StrictTarInfo:
        raise ArchiveError("GNU sparse files are not supported in layers")

    def _proc_gnusparse_10(self, next: Any, pax_headers: Any, tarfile: Any) -> None:
        raise ArchiveError("GNU sparse files are not supported in layers")


_META_TYPES = (
    tarfile.XHDTYPE,
    tarfile.XGLTYPE,
    tarfile.SOLARIS_XHDTYPE,
    tarfile.GNUTYPE_LONGNAME,
    tarfile.GNUTYPE_LONGLINK,
)


def _show(name: str) -> str:
    """*name* for an error message: quoted, and cut short if it is huge."""
    return repr(name if len(name) <= 120 else name[:100] + "...")


def _split(name: str, what: str) -> tuple[bytes, ...]:
    """Split an archive path into components, rejecting anything that could escape."""
    raw = os.fsencode(name)
    if b"\x00" in raw:
        raise ArchiveError(f"{what} {_show(name)} contains a NUL byte")
    if len(raw) >= _PATH_MAX:
        raise ArchiveError(f"{what} is longer than PATH_MAX ({len(raw)} bytes)")
    if raw.startswith(b"/"):
        raise ArchiveError(f"{what} {_show(name)} is absolute")
    parts = tuple(p for p in raw.split(b"/") if p not in (b"", b"."))
    for p in parts:
        if p == b"..":
            raise ArchiveError(f"{what} {_show(name)} contains '..'")
        if len(p) > _NAME_MAX:
            raise ArchiveError(f"{what} {_show(name)} has a component longer than NAME_MAX")
    return parts


def _mtime_ns(m: tarfile.TarInfo) -> int:
    try:
        ns = int(m.mtime * 1_000_000_000)
    except (OverflowError, ValueError):
        return 0
    return max(-_NS_MAX, min(_NS_MAX, ns))


@dataclass
class _DirMeta:
    mode: int
    uid: int
    gid: int
    mtime_ns: int
    xattrs: dict[bytes, bytes] = field(default_factory=dict)


@dataclass
class _Extractor:
    root_fd: int
    max_size: int
    size: int = 0
    entries: int = 0
    dirs: dict[tuple[bytes, ...], _DirMeta] = field(default_factory=dict)

    # -- accounting ------------------------------------------------------------------------

    def charge(self, n: int) -> None:
        self.size += n
        if self.size > self.max_size:
            raise ArchiveError(f"archive expands beyond the {self.max_size}-byte limit (max_size)")

    # -- entries -----------------------------------------------------------------------------

    def entry(self, tf: tarfile.TarFile, m: tarfile.TarInfo) -> None:
        self.entries += 1
        if self.entries > MAX_ENTRIES:
            raise ArchiveError(f"archive has more than {MAX_ENTRIES} entries")
        if m.isreg() or m.type not in tarfile.SUPPORTED_TYPES:
            # tarfile stores (and skips) data only for these; charge it before reading any.
            self.charge(max(0, m.size))
        if m.sparse is not None or m.type == tarfile.GNUTYPE_SPARSE:
            raise ArchiveError(f"{_show(m.name)}: GNU sparse files are not supported in layers")
        parts = _split(m.name, "entry name")
        if not parts:
            if not m.isdir():
                raise ArchiveError(
                    f"entry {_show(m.name)} names the layer root but is not a directory"
                )
            self.dirs[()] = self._dir_meta(m)
            return
        if parts[0] in _AUFS_META:
            return  # aufs bookkeeping: skipped, as docker does
        for p in parts[:-1]:
            if p.startswith(_WH_PREFIX):
                raise ArchiveError(f"entry {_show(m.name)}: a whiteout name cannot be a directory")
        base = parts[-1]
        if base == _WH_OPAQUE:
            self._opaque(parts[:-1])
            return
        if base.startswith(_WH_META):
            raise ArchiveError(f"entry {_show(m.name)}: unknown whiteout metadata name")
        if base.startswith(_WH_PREFIX):
            target = base[len(_WH_PREFIX) :]
            if target in (b"", b".", b".."):
                raise ArchiveError(f"entry {_show(m.name)}: malformed whiteout name")
            self._whiteout(parts[:-1], target)
            return
        self._check_ids(m)
        if m.isdir():
            self._dir(parts, m)
        elif m.isreg():
            self._file(tf, parts, m)
        elif m.issym():
            self._symlink(parts, m)
        elif m.islnk():
            self._hardlink(parts, m)
        elif m.ischr() and m.devmajor == 0 and m.devminor == 0:
            self._mknod(parts, stat.S_IFCHR, 0, m)
        elif m.isfifo():
            self._mknod(parts, stat.S_IFIFO, stat.S_IMODE(m.mode), m)
        elif m.ischr() or m.isblk():
            kind = "block" if m.isblk() else "character"
            raise ArchiveError(
                f"entry {_show(m.name)}: {kind} device {m.devmajor}:{m.devminor} is not allowed "
                "in a layer (only the 0:0 whiteout is)"
            )
        else:
            raise ArchiveError(f"entry {_show(m.name)}: unsupported tar entry type {m.type!r}")

    @staticmethod
    def _check_ids(m: tarfile.TarInfo) -> None:
        if not (0 <= m.uid <= _ID_MAX and 0 <= m.gid <= _ID_MAX):
            raise ArchiveError(f"entry {_show(m.name)}: invalid owner {m.uid}:{m.gid}")

    def _dir_meta(self, m: tarfile.TarInfo) -> _DirMeta:
        self._check_ids(m)
        return _DirMeta(stat.S_IMODE(m.mode), m.uid, m.gid, _mtime_ns(m), _xattrs(m))

    def _parent(self, parts: tuple[bytes, ...]) -> int:
        """Open (creating as needed) the directory holding *parts*' last component."""
        return open_dir_beneath(self.root_fd, parts[:-1], create=True)

    def _clear(self, parent_fd: int, parts: tuple[bytes, ...], keep_dir: bool = False) -> bool:
        """Remove what is at *parts* so a new entry can take its place (tar semantics: the
        later entry wins). Returns True if a directory was kept (when *keep_dir*)."""
        st = lstat_at(parent_fd, parts[-1])
        if st is None:
            return False
        if keep_dir and stat.S_ISDIR(st.st_mode):
            return True
        if stat.S_ISDIR(st.st_mode):
            n = len(parts)
            for k in [k for k in self.dirs if k[:n] == parts]:
                del self.dirs[k]
        remove_entry(parent_fd, parts[-1], st)
        return False

    def _dir(self, parts: tuple[bytes, ...], m: tarfile.TarInfo) -> None:
        pfd = self._parent(parts)
        try:
            if not self._clear(pfd, parts, keep_dir=True):
                # Final mode, owner and times are applied at the end (see finish): a
                # read-only directory must still accept its children.
                os.mkdir(parts[-1], 0o700, dir_fd=pfd)
        finally:
            os.close(pfd)
        self.dirs[parts] = self._dir_meta(m)

    def _file(self, tf: tarfile.TarFile, parts: tuple[bytes, ...], m: tarfile.TarInfo) -> None:
        pfd = self._parent(parts)
        try:
            self._clear(pfd, parts)
            fd = os.open(
                parts[-1],
                os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                0o600,
                dir_fd=pfd,
            )
        finally:
            os.close(pfd)
        try:
            src = tf.extractfile(m)
            if src is None:  # pragma: no cover - isreg() members always have data
                raise ArchiveError(f"entry {_show(m.name)}: no data")
            written = 0
            while True:
                chunk = src.read(_CHUNK)
                if not chunk:
                    break
                write_all(fd, chunk)
                written += len(chunk)
                if written > m.size:  # pragma: no cover - tarfile bounds the member
                    raise ArchiveError(f"entry {_show(m.name)}: more data than its header says")
            if written != m.size:
                raise ArchiveError(f"entry {_show(m.name)}: archive is truncated inside its data")
            # chown clears setuid/setgid and file capabilities, so it comes first.
            os.fchown(fd, m.uid, m.gid)
            os.fchmod(fd, stat.S_IMODE(m.mode))
            for k, v in _xattrs(m).items():
                os.setxattr(fd, k, v)
            mt = _mtime_ns(m)
            os.utime(fd, ns=(mt, mt))
        finally:
            os.close(fd)

    def _symlink(self, parts: tuple[bytes, ...], m: tarfile.TarInfo) -> None:
        target = os.fsencode(m.linkname)
        if not target or b"\x00" in target or len(target) >= _PATH_MAX:
            raise ArchiveError(f"entry {_show(m.name)}: invalid symlink target")
        pfd = self._parent(parts)
        try:
            self._clear(pfd, parts)
            # Stored verbatim, never followed: an absolute target is resolved only inside
            # the container's root.
            os.symlink(target, parts[-1], dir_fd=pfd)
            os.chown(parts[-1], m.uid, m.gid, dir_fd=pfd, follow_symlinks=False)
            mt = _mtime_ns(m)
            os.utime(parts[-1], ns=(mt, mt), dir_fd=pfd, follow_symlinks=False)
        finally:
            os.close(pfd)

    def _hardlink(self, parts: tuple[bytes, ...], m: tarfile.TarInfo) -> None:
        target = _split(m.linkname, f"hard link target of {_show(m.name)}")
        if not target:
            raise ArchiveError(f"entry {_show(m.name)}: hard link to the layer root")
        if target == parts:
            raise ArchiveError(f"entry {_show(m.name)}: hard link to itself")
        try:
            tfd = open_dir_beneath(self.root_fd, target[:-1])
        except FileNotFoundError:
            raise ArchiveError(
                f"entry {_show(m.name)}: hard link target {m.linkname!r} is not in this layer"
            ) from None
        try:
            tst = lstat_at(tfd, target[-1])
            if tst is None:
                raise ArchiveError(
                    f"entry {_show(m.name)}: hard link target {m.linkname!r} is not in this layer"
                )
            if stat.S_ISDIR(tst.st_mode):
                raise ArchiveError(f"entry {_show(m.name)}: hard link to a directory")
            pfd = self._parent(parts)
            try:
                self._clear(pfd, parts)
                # follow_symlinks=False: a link to a symlink links the symlink itself.
                os.link(
                    target[-1], parts[-1], src_dir_fd=tfd, dst_dir_fd=pfd, follow_symlinks=False
                )
            finally:
                os.close(pfd)
        finally:
            os.close(tfd)

    def _mknod(self, parts: tuple[bytes, ...], kind: int, mode: int, m: tarfile.TarInfo) -> None:
        pfd = self._parent(parts)
        try:
            self._clear(pfd, parts)
            os.mknod(parts[-1], kind | 0o600, 0, dir_fd=pfd)
            os.chown(parts[-1], m.uid, m.gid, dir_fd=pfd, follow_symlinks=False)
            # Just made, in a directory no one else writes to: chmod by name cannot be
            # redirected (Linux has no lchmod).
            os.chmod(parts[-1], mode, dir_fd=pfd)
            mt = _mtime_ns(m)
            os.utime(parts[-1], ns=(mt, mt), dir_fd=pfd, follow_symlinks=False)
        finally:
            os.close(pfd)

    def _whiteout(self, parent: tuple[bytes, ...], name: bytes) -> None:
        parts = (*parent, name)
        pfd = open_dir_beneath(self.root_fd, parent, create=True)
        try:
            self._clear(pfd, parts)
            os.mknod(name, stat.S_IFCHR | 0o000, os.makedev(0, 0), dir_fd=pfd)
            os.chown(name, 0, 0, dir_fd=pfd, follow_symlinks=False)
        finally:
            os.close(pfd)

    def _opaque(self, parts: tuple[bytes, ...]) -> None:
        fd = open_dir_beneath(self.root_fd, parts, create=True)
        try:
            os.setxattr(fd, OPAQUE_XATTR, b"y")
        finally:
            os.close(fd)

    # -- the end -----------------------------------------------------------------------------

    def finish(self) -> None:
        """Apply directory owners, modes, xattrs and times, now that their children exist."""
        for parts, meta in self.dirs.items():
            try:
                fd = open_dir_beneath(self.root_fd, parts)
            except (FileNotFoundError, UnsafePathError):
                continue  # replaced by a later entry
            try:
                os.fchown(fd, meta.uid, meta.gid)
                os.fchmod(fd, meta.mode)
                for k, v in meta.xattrs.items():
                    os.setxattr(fd, k, v)
                os.utime(fd, ns=(meta.mtime_ns, meta.mtime_ns))
            finally:
                os.close(fd)


def _xattrs(m: tarfile.TarInfo) -> dict[bytes, bytes]:
    out: dict[bytes, bytes] = {}
    for key, value in m.pax_headers.items():
        if not key.startswith(_XATTR_PAX_PREFIX):
            continue
        name = key[len(_XATTR_PAX_PREFIX) :]
        if name in _KEPT_XATTRS or name.startswith(_KEPT_XATTR_PREFIXES):
            out[name.encode("utf-8", "surrogateescape")] = value.encode("utf-8", "surrogateescape")
    return out


def _drain(r: io.BufferedIOBase, ex: _Extractor) -> None:
    while True:
        b = r.read(_CHUNK)
        if not b:
            return
        ex.charge(len(b))


def extract_tar(
    source: BinaryIO | IO[bytes], dest_dir: str, *, max_size: int = DEFAULT_MAX_SIZE
) -> ExtractResult:
    """Extract the layer tar read from *source* into the existing, empty *dest_dir*.

    Reads *source* to its end (so the digest covers every byte) and never seeks. Raises
    :class:`ArchiveError` for a hostile, malformed, truncated or oversized archive and
    ``OSError`` for a file-system failure; *dest_dir* is then left partially written and the
    caller discards it.
    """
    if max_size < 0:
        raise ValueError("max_size must not be negative")
    root_fd = os.open(dest_dir, DIR_FLAGS)
    try:
        raw = _HashingRaw(source)
        buffered = io.BufferedReader(raw, _CHUNK)
        ex = _Extractor(root_fd, max_size)
        try:
            stream = _decompressor(buffered)
            with tarfile.open(
                fileobj=stream,
                mode="r|",
                tarinfo=_StrictTarInfo,
            ) as tf:
                while True:
                    m = tf.next()
                    if m is None:
                        break
                    # In stream mode tarfile keeps every member it has seen; we do not
                    # need them, and a huge archive would otherwise pin them all in memory.
                    tf.members.clear()  # type: ignore[attr-defined]
                    try:
                        ex.entry(tf, m)
                    except UnsafePathError as e:
                        raise ArchiveError(f"entry {_show(m.name)}: {e}") from None
                    except OSError as e:
                        if e.errno == errno.ENAMETOOLONG:
                            raise ArchiveError(f"entry {_show(m.name)}: name too long") from None
                        raise
            ex.finish()
            # Read on to the end: it makes gzip/xz/bzip2 verify their checksums, and the
            # digest must cover the whole archive, trailing padding included.
            _drain(stream, ex)
            if stream is not buffered:
                _drain(buffered, ex)
        except ArchiveError:
            raise
        except (tarfile.TarError, EOFError, zlib.error, lzma.LZMAError) as e:
            raise ArchiveError(f"corrupt or truncated archive: {e}") from e
        except gzip.BadGzipFile as e:
            raise ArchiveError(f"corrupt gzip stream: {e}") from e
        except ValueError as e:
            raise ArchiveError(f"malformed archive: {e}") from e
        return ExtractResult(raw.hash.hexdigest(), ex.size, ex.entries)
    finally:
        os.close(root_fd)
