"""A streaming, hostile-archive-proof extractor for OCI layer tars.

The archive is read once, front to back (``tarfile`` in ``'r|'`` stream mode over our own
decompressor), and every entry is written by :class:`TreeBuilder` through directory file
descriptors opened with ``O_NOFOLLOW``, so nothing the archive says can make a write land
outside the destination:

* names that are absolute, contain ``..``, reach PATH_MAX (4096 bytes) or exceed NAME_MAX,
  or hold a NUL are rejected;
* an entry whose parent path meets a symlink (or a non-directory) is rejected, so
  ``evil -> /victim`` followed by ``evil/pwned`` fails instead of writing into ``/victim``;
  a later entry of the same name replaces (never follows) an earlier one, whatever the
  types: a directory replacing a symlink is a fresh directory;
* hard links must name an entry already in this archive, reached without symlinks;
* device nodes are rejected, except character 0:0 (an overlay whiteout); FIFOs are allowed;
  containers get their ``/dev`` from the runtime, never from an image;
* OCI whiteouts ``.wh.NAME`` become overlay whiteouts (char 0:0 ``NAME``, which removes
  just that name in the merged view: a whiteout of a symlink hides the link, not its
  target) and ``.wh..wh..opq`` becomes ``trusted.overlay.opaque=y`` on the directory;
  malformed whiteout names (``.wh.``, ``.wh..``, ``.wh...``, unknown ``.wh..wh.*``, a
  whiteout used as a directory) are rejected;
* **expansion limit**: the uncompressed archive stream (headers, data, padding, anything
  after the end marker) may be at most *max_size* bytes (default :data:`DEFAULT_MAX_SIZE`,
  64 GiB), and the file data announced by headers is charged before it is read, so a gzip
  or zstd bomb stops at the limit with only that much work done; entries are bounded by
  :data:`MAX_ENTRIES` and tar metadata records (pax / GNU long names) by
  :data:`MAX_HEADER_SIZE`; zstd frames may not ask for a window over 128 MiB;
* a stream that ends without the end-of-archive marker, a corrupt header, a short member
  (a size field that lies), or a gzip/zstd stream that is truncated or fails its checksum
  is an error, never a silent partial layer.

Symlink targets are stored verbatim (an absolute target such as ``/usr/lib`` is resolved
only inside the container's root) and are never followed here. Modes (setuid included:
the layer home is 0700, so only root reaches them), numeric owners and modification
times (nanoseconds, via pax) are kept; directories no entry describes get 0755, 0:0 and
mtime 0, so one archive always gives one tree.

**xattr policy.** Taken from an archive (pax ``SCHILY.xattr.*``): the ``user.`` namespace
and ``security.capability``. Dropped: everything else, in particular ``trusted.*`` (so an
archive can never forge overlayfs metadata such as ``trusted.overlay.redirect``; opacity
comes only from ``.wh..wh..opq``), LSM labels (``security.selinux``...) and POSIX ACLs.

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
    DirCache,
    UnsafePathError,
    lstat_at,
    open_dir_beneath,
    remove_entry,
    write_all,
)
from pyhcs._layers._zstd import ZstdError, ZstdReader

__all__ = [
    "DEFAULT_MAX_SIZE",
    "MAX_ENTRIES",
    "MAX_HEADER_SIZE",
    "ArchiveError",
    "ExtractResult",
    "Meta",
    "TreeBuilder",
    "check_entry_name",
    "check_ids",
    "extract_tar",
    "split",
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
    #: sha256 (hex) of the uncompressed tar (OCI's "diff id"); the digest for a plain tar.
    diff_id: str = ""


def read_full(src: BinaryIO | IO[bytes], view: memoryview) -> int:
    """Fill *view* from *src* unless it ends first; return the bytes read. A peek at a
    magic number must see every byte it asks for even when the source is a slow pipe."""
    n = 0
    while n < len(view):
        data = src.read(len(view) - n)
        if not data:
            break
        view[n : n + len(data)] = data
        n += len(data)
    return n


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
        n = read_full(self._src, view)
        self.hash.update(view[:n])
        self.count += n
        return n


_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"


def _decompressor(buffered: io.BufferedReader[_HashingRaw]) -> io.BufferedIOBase:
    """Wrap *buffered* in the decompressor its magic names (gzip, zstd, bzip2, xz) or none."""
    magic = buffered.peek(6)[:6]
    # These decompressors read strictly forward, check the stream's own integrity (gzip's
    # CRC and length, xz/bzip2 checks) and raise EOFError on a truncated stream.
    if magic.startswith(b"\x1f\x8b"):
        return gzip.GzipFile(fileobj=buffered, mode="rb")
    if magic.startswith(b"BZh"):
        return bz2.BZ2File(buffered)
    if magic.startswith(b"\xfd7zXZ\x00"):
        return lzma.LZMAFile(buffered)
    if magic.startswith(_ZSTD_MAGIC):
        try:
            return io.BufferedReader(ZstdReader(buffered), _CHUNK)
        except ZstdError as e:
            raise ArchiveError(str(e)) from None
    return buffered


class _Limited(io.RawIOBase):
    """The uncompressed archive stream, counted (and hashed, for the diff id) as ``tarfile``
    reads it: past *limit* bytes it raises, so a compression bomb stops at the limit."""

    def __init__(self, src: io.BufferedIOBase, limit: int, hashed: bool) -> None:
        super().__init__()
        self._src = src
        self._limit = limit
        self.count = 0
        self.hash = hashlib.sha256() if hashed else None

    def readable(self) -> bool:
        return True

    def readinto(self, buf: Any) -> int:
        view = memoryview(buf).cast("B")
        n = self._src.readinto(view)
        if not n:
            return 0
        self.count += n
        if self.count > self._limit:
            raise ArchiveError(
                f"archive expands beyond the {self._limit}-byte limit (max_size)"
            )
        if self.hash is not None:
            self.hash.update(view[:n])
        return n


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


def split(name: str, what: str) -> tuple[bytes, ...]:
    """Split a layer path into components, rejecting anything that could escape: absolute
    names, ``..``, NUL bytes, names of PATH_MAX bytes or more, components over NAME_MAX."""
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
    exact = m.pax_headers.get("mtime")
    if exact is not None:
        # tarfile turns the pax record into a float, which drops nanoseconds.
        ns = _decimal_ns(exact)
        if ns is not None:
            return max(-_NS_MAX, min(_NS_MAX, ns))
    try:
        ns = int(m.mtime * 1_000_000_000)
    except (OverflowError, ValueError):
        return 0
    return max(-_NS_MAX, min(_NS_MAX, ns))


def _decimal_ns(text: str) -> int | None:
    """Nanoseconds from a pax time record (``[-]seconds[.fraction]``), or None."""
    neg = text.startswith("-")
    sec, _, frac = text.removeprefix("-").partition(".")
    if not sec.isdigit() or len(sec) > 12 or (frac and not frac.isdigit()):
        return None
    ns = int(sec) * 1_000_000_000 + int((frac + "000000000")[:9])
    return -ns if neg else ns


@dataclass
class Meta:
    """Owner, permission bits (setuid/setgid/sticky included), mtime and xattrs of an entry."""

    mode: int = 0o755
    uid: int = 0
    gid: int = 0
    mtime_ns: int = 0
    xattrs: dict[bytes, bytes] = field(default_factory=dict)


def check_ids(uid: int, gid: int, what: str) -> None:
    """Refuse an owner ``chown`` would misread (``-1`` means "unchanged" to it)."""
    if not (0 <= uid <= _ID_MAX and 0 <= gid <= _ID_MAX):
        raise ArchiveError(f"{what}: invalid owner {uid}:{gid}")


class TreeBuilder:
    """Writes a layer's entries below *root_fd*, never through a symlink.

    The one place that creates layer content from untrusted descriptions (tar import, the
    streaming layer writer): paths come as components already checked by :func:`split`,
    every parent is opened component by component with ``O_NOFOLLOW``, an existing entry is
    removed (not followed) before a new one takes its name, and directory metadata is
    applied only in :meth:`finish`, so a read-only directory still accepts its children.
    Directories that no entry describes (implicit parents, the root) get mode 0755,
    owner 0:0 and mtime 0, so the same entries always make the same tree.
    """

    def __init__(self, root_fd: int) -> None:
        self.cache = DirCache(root_fd)
        self.dirs: dict[tuple[bytes, ...], Meta] = {(): Meta()}

    def close(self) -> None:
        self.cache.close()

    # -- helpers -----------------------------------------------------------------------------

    def parent(self, parts: tuple[bytes, ...]) -> int:
        """The directory holding *parts*' last component, made if missing (borrowed fd)."""
        anc = parts[:-1]
        if anc not in self.dirs:
            for i in range(1, len(anc) + 1):
                self.dirs.setdefault(anc[:i], Meta())
        return self.cache.get(anc, create=True)

    def lstat(self, parts: tuple[bytes, ...]) -> os.stat_result | None:
        """lstat of *parts*, or None if it (or a parent directory) does not exist."""
        try:
            fd = self.cache.get(parts[:-1])
        except (FileNotFoundError, UnsafePathError):
            return None
        return lstat_at(fd, parts[-1])

    def clear(self, pfd: int, parts: tuple[bytes, ...], keep_dir: bool = False) -> bool:
        """Remove what is at *parts* so a new entry can take its place (tar semantics: the
        later entry wins). Returns True if a directory was kept (when *keep_dir*)."""
        st = lstat_at(pfd, parts[-1])
        if st is None:
            return False
        if keep_dir and stat.S_ISDIR(st.st_mode):
            return True
        if stat.S_ISDIR(st.st_mode):
            n = len(parts)
            for k in [k for k in self.dirs if k[:n] == parts]:
                del self.dirs[k]
            self.cache.forget(parts)
        remove_entry(pfd, parts[-1], st)
        return False

    @staticmethod
    def apply(fd: int, meta: Meta) -> None:
        """Owner, mode, xattrs, times on an open file or directory."""
        # chown clears setuid/setgid and file capabilities, so it comes first.
        os.fchown(fd, meta.uid, meta.gid)
        os.fchmod(fd, meta.mode)
        for k, v in meta.xattrs.items():
            os.setxattr(fd, k, v)
        os.utime(fd, ns=(meta.mtime_ns, meta.mtime_ns))

    # -- entries -----------------------------------------------------------------------------

    def mkdir(self, parts: tuple[bytes, ...], meta: Meta) -> None:
        if not parts:
            self.dirs[()] = meta
            return
        pfd = self.parent(parts)
        if not self.clear(pfd, parts, keep_dir=True):
            os.mkdir(parts[-1], 0o700, dir_fd=pfd)
        self.dirs[parts] = meta

    def create_file(self, parts: tuple[bytes, ...]) -> int:
        """Create the regular file *parts* (empty, 0600) and return its fd (caller closes;
        call :meth:`apply` once its data is written)."""
        pfd = self.parent(parts)
        self.clear(pfd, parts)
        return os.open(
            parts[-1],
            os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
            0o600,
            dir_fd=pfd,
        )

    def symlink(self, parts: tuple[bytes, ...], target: bytes, meta: Meta) -> None:
        if not target or b"\x00" in target or len(target) >= _PATH_MAX:
            raise ArchiveError(f"{_show_parts(parts)}: invalid symlink target")
        pfd = self.parent(parts)
        self.clear(pfd, parts)
        # Stored verbatim, never followed: an absolute target is resolved only inside the
        # container's root.
        os.symlink(target, parts[-1], dir_fd=pfd)
        os.chown(parts[-1], meta.uid, meta.gid, dir_fd=pfd, follow_symlinks=False)
        os.utime(parts[-1], ns=(meta.mtime_ns, meta.mtime_ns), dir_fd=pfd, follow_symlinks=False)

    def hardlink(self, parts: tuple[bytes, ...], target: tuple[bytes, ...]) -> None:
        """Link *parts* to the existing non-directory *target* of this tree."""
        shown = _show_parts(parts)
        if not target:
            raise ArchiveError(f"{shown}: hard link to the layer root")
        if target == parts:
            raise ArchiveError(f"{shown}: hard link to itself")
        missing = f"{shown}: hard link target {_show_parts(target)} is not in this layer"
        try:
            tfd = self.cache.get(target[:-1])
        except FileNotFoundError:
            raise ArchiveError(missing) from None
        tst = lstat_at(tfd, target[-1])
        if tst is None:
            raise ArchiveError(missing)
        if stat.S_ISDIR(tst.st_mode):
            raise ArchiveError(f"{shown}: hard link to a directory")
        if target[:-1] == parts[:-1] or len(target) == 1:
            tfd = os.dup(tfd)
        else:
            tfd = open_dir_beneath(self.cache.root_fd, target[:-1])
        try:
            pfd = self.parent(parts)
            self.clear(pfd, parts)
            # follow_symlinks=False: a link to a symlink links the symlink itself.
            os.link(target[-1], parts[-1], src_dir_fd=tfd, dst_dir_fd=pfd, follow_symlinks=False)
        finally:
            os.close(tfd)

    def mknod(self, parts: tuple[bytes, ...], kind: int, rdev: int, meta: Meta) -> None:
        pfd = self.parent(parts)
        self.clear(pfd, parts)
        os.mknod(parts[-1], kind | 0o600, rdev, dir_fd=pfd)
        os.chown(parts[-1], meta.uid, meta.gid, dir_fd=pfd, follow_symlinks=False)
        # Just made, in a directory no one else writes to: chmod by name cannot be
        # redirected (Linux has no lchmod).
        os.chmod(parts[-1], meta.mode, dir_fd=pfd)
        os.utime(parts[-1], ns=(meta.mtime_ns, meta.mtime_ns), dir_fd=pfd, follow_symlinks=False)

    def whiteout(self, parts: tuple[bytes, ...], mtime_ns: int = 0) -> None:
        """An overlay whiteout (char 0:0, mode 0, owner 0:0) at *parts*."""
        self.mknod(parts, stat.S_IFCHR, os.makedev(0, 0), Meta(0, 0, 0, mtime_ns))

    def opaque(self, parts: tuple[bytes, ...]) -> None:
        """Mark the directory *parts* opaque (made if missing)."""
        if parts:
            self.parent(parts)
            self.dirs.setdefault(parts, Meta())
        fd = self.cache.get(parts, create=True)
        os.setxattr(fd, OPAQUE_XATTR, b"y")

    def finish(self) -> None:
        """Apply directory owners, modes, xattrs and times, now that their children exist."""
        for parts in sorted(self.dirs):
            try:
                fd = self.cache.get(parts)
            except (FileNotFoundError, UnsafePathError):
                continue  # replaced by a later entry
            self.apply(fd, self.dirs[parts])


def _show_parts(parts: tuple[bytes, ...]) -> str:
    return _show(os.fsdecode(b"/".join(parts)) or ".")


def check_entry_name(parts: tuple[bytes, ...], name: str) -> None:
    """Refuse whiteout-looking names for real entries (they mean deletions, not files)."""
    for p in parts:
        if p.startswith(_WH_PREFIX):
            raise ArchiveError(f"entry {_show(name)}: a name starting with '.wh.' is reserved "
                               "for whiteouts")


@dataclass
class _Extractor:
    builder: TreeBuilder
    max_size: int
    size: int = 0
    entries: int = 0

    def charge(self, n: int) -> None:
        self.size += n
        if self.size > self.max_size:
            raise ArchiveError(f"archive expands beyond the {self.max_size}-byte limit (max_size)")

    def entry(self, tf: tarfile.TarFile, m: tarfile.TarInfo) -> None:
        self.entries += 1
        if self.entries > MAX_ENTRIES:
            raise ArchiveError(f"archive has more than {MAX_ENTRIES} entries")
        if m.isreg() or m.type not in tarfile.SUPPORTED_TYPES:
            # tarfile stores (and skips) data only for these; charge it before reading any.
            self.charge(max(0, m.size))
        if m.sparse is not None or m.type == tarfile.GNUTYPE_SPARSE:
            raise ArchiveError(f"{_show(m.name)}: GNU sparse files are not supported in layers")
        parts = split(m.name, "entry name")
        b = self.builder
        if not parts:
            if not m.isdir():
                raise ArchiveError(
                    f"entry {_show(m.name)} names the layer root but is not a directory"
                )
            b.mkdir((), self._meta(m))
            return
        if parts[0] in _AUFS_META:
            return  # aufs bookkeeping: skipped, as docker does
        for p in parts[:-1]:
            if p.startswith(_WH_PREFIX):
                raise ArchiveError(f"entry {_show(m.name)}: a whiteout name cannot be a directory")
        base = parts[-1]
        if base == _WH_OPAQUE:
            b.opaque(parts[:-1])
            return
        if base.startswith(_WH_META):
            raise ArchiveError(f"entry {_show(m.name)}: unknown whiteout metadata name")
        if base.startswith(_WH_PREFIX):
            target = base[len(_WH_PREFIX) :]
            if target in (b"", b".", b".."):
                raise ArchiveError(f"entry {_show(m.name)}: malformed whiteout name")
            b.whiteout((*parts[:-1], target), _mtime_ns(m))
            return
        meta = self._meta(m)
        if m.isdir():
            b.mkdir(parts, meta)
        elif m.isreg():
            self._file(tf, parts, m, meta)
        elif m.issym():
            b.symlink(parts, os.fsencode(m.linkname), meta)
        elif m.islnk():
            b.hardlink(parts, split(m.linkname, f"hard link target of {_show(m.name)}"))
        elif m.ischr() and m.devmajor == 0 and m.devminor == 0:
            b.whiteout(parts, meta.mtime_ns)
        elif m.isfifo():
            b.mknod(parts, stat.S_IFIFO, 0, meta)
        elif m.ischr() or m.isblk():
            kind = "block" if m.isblk() else "character"
            raise ArchiveError(
                f"entry {_show(m.name)}: {kind} device {m.devmajor}:{m.devminor} is not allowed "
                "in a layer (only the 0:0 whiteout is)"
            )
        else:
            raise ArchiveError(f"entry {_show(m.name)}: unsupported tar entry type {m.type!r}")

    @staticmethod
    def _meta(m: tarfile.TarInfo) -> Meta:
        check_ids(m.uid, m.gid, f"entry {_show(m.name)}")
        return Meta(stat.S_IMODE(m.mode), m.uid, m.gid, _mtime_ns(m), _xattrs(m))

    def _file(
        self, tf: tarfile.TarFile, parts: tuple[bytes, ...], m: tarfile.TarInfo, meta: Meta
    ) -> None:
        fd = self.builder.create_file(parts)
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
            if written != m.size:
                raise ArchiveError(f"entry {_show(m.name)}: archive is truncated inside its data")
            TreeBuilder.apply(fd, meta)
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
    builder = TreeBuilder(root_fd)
    try:
        raw = _HashingRaw(source)
        buffered = io.BufferedReader(raw, _CHUNK)
        ex = _Extractor(builder, max_size)
        try:
            stream = _decompressor(buffered)
            limited = _Limited(stream, max_size, hashed=stream is not buffered)
            with tarfile.open(
                fileobj=io.BufferedReader(limited, _CHUNK),
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
                builder.finish()
                # Read on to the end: it makes gzip/zstd/xz/bzip2 verify their checksums,
                # and the digests must cover the whole archive, trailing padding included.
                fileobj = tf.fileobj
                while fileobj.read(_CHUNK):
                    pass
            if stream is not buffered:
                while buffered.read(_CHUNK):
                    pass
        except ArchiveError:
            raise
        except (tarfile.TarError, EOFError, zlib.error, lzma.LZMAError, ZstdError) as e:
            raise ArchiveError(f"corrupt or truncated archive: {e}") from e
        except gzip.BadGzipFile as e:
            raise ArchiveError(f"corrupt gzip stream: {e}") from e
        except ValueError as e:
            raise ArchiveError(f"malformed archive: {e}") from e
        digest = raw.hash.hexdigest()
        diff_id = limited.hash.hexdigest() if limited.hash is not None else digest
        return ExtractResult(digest, ex.size, ex.entries, diff_id)
    finally:
        builder.close()
        os.close(root_fd)
