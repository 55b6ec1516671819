"""A streaming, hostile-archive-proof extractor for OCI layer tars.

The archive is read once, front to back (a strict tar reader of our own, over our own
decompressor: see :class:`_TarReader`). Every entry is checked against a map of the tree
made so far, then written by a confined GNU tar from a canonical re-encoding (see
:mod:`pyhcs._layers._gnutar`); the few writes Python makes itself (removing an entry a
later one replaces, opaque markers, directory metadata) go through :class:`TreeBuilder`'s
directory file descriptors opened with ``O_NOFOLLOW``. Nothing the archive says can make
a write land outside the destination:

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
import contextlib
import errno
import gzip
import hashlib
import io
import lzma
import os
import stat
import struct
import zlib
from dataclasses import dataclass, field
from typing import IO, Any, BinaryIO

from pyhcs._layers._fsops import (
    DIR_FLAGS,
    OPAQUE_XATTR,
    DirCache,
    UnsafePathError,
    lstat_at,
    open_dir_beneath,
    remove_entry,
)
from pyhcs._layers._gnutar import ConfinedTar, TarError, block_sum, header
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
#: Bound on one pax or GNU long-name record, which is read into memory whole.
MAX_HEADER_SIZE = 1 << 20

_PATH_MAX = 4096
_CREATE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
_NAME_MAX = 255
_CHUNK = 1 << 20
_WH_PREFIX = b".wh."
_WH_OPAQUE = b".wh..wh..opq"
_WH_META = b".wh..wh."
# aufs bookkeeping some old images carry at their root; docker skips them, so do we.
_AUFS_META = (b".wh..wh.plnk", b".wh..wh.aufs", b".wh..wh.orph")
_XATTR_PAX_PREFIX = b"SCHILY.xattr."
_KEPT_XATTRS = (b"security.capability",)
_KEPT_XATTR_PREFIXES = (b"user.",)
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
        readinto = getattr(self._src, "readinto", None)
        if readinto is None:
            n = read_full(self._src, view)
        else:  # a file: read straight into the buffer, no intermediate bytes
            n = 0
            while n < len(view):
                got = readinto(view[n:])
                if not got:
                    break
                n += got
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


class _Input:
    """The uncompressed archive stream, read in 1 MiB chunks: headers are sliced from the
    chunk in hand and file data goes to tar as views of it, without further copies.

    Every byte read is counted (and, for a compressed archive, hashed for the diff id); past
    *limit* bytes it raises, so a compression bomb stops at the limit.
    """

    def __init__(self, src: io.BufferedIOBase, limit: int, hashed: bool) -> None:
        self._src = src
        self._limit = limit
        self.count = 0
        self.hash = hashlib.sha256() if hashed else None
        # Chunks are immutable bytes: a header is one slice of the chunk (no buffer
        # management per header), and file data goes out as memoryview slices of it.
        self._data = b""
        self._view = memoryview(self._data)
        self._pos = 0

    def _more(self) -> bool:
        """Read the next chunk into hand (the rest of the current one is dropped)."""
        chunk = self._src.read(_CHUNK)
        self._data, self._view, self._pos = chunk, memoryview(chunk), 0
        if not chunk:
            return False
        self.count += len(chunk)
        if self.count > self._limit:
            raise ArchiveError(f"archive expands beyond the {self._limit}-byte limit (max_size)")
        if self.hash is not None:
            self.hash.update(chunk)
        return True

    def take(self, n: int) -> bytes:
        """The next *n* bytes; fewer only at the end."""
        pos, data = self._pos, self._data
        end = pos + n
        if end <= len(data):
            self._pos = end
            return data[pos:end]
        parts = [data[pos:]]
        have = len(data) - pos
        while have < n and self._more():
            k = min(n - have, len(self._data))
            parts.append(self._data[:k])
            self._pos = k
            have += k
        return b"".join(parts)

    def skip(self, n: int) -> int:
        """Pass over the next *n* bytes; returns how many there were."""
        left = n
        while left and (view := self.view(left)):
            left -= len(view)
        return n - left

    def view(self, n: int) -> memoryview:
        """The next bytes, at most *n*, as a view of the chunk in hand (no copy); empty at
        the end. Chunks are immutable, so the view stays valid after the next read."""
        pos = self._pos
        if pos == len(self._data):
            if not self._more():
                return memoryview(b"")
            pos = 0
        k = min(n, len(self._data) - pos)
        self._pos = pos + k
        return self._view[pos : pos + k]

    def drain(self) -> None:
        """Read on to the end of the stream."""
        while self._more():
            pass


_BLOCKSIZE = 512
_ZERO_BLOCK = bytes(_BLOCKSIZE)
_POSIX_MAGIC = b"ustar\x00"
_REG_TYPES = (b"0", b"\x00", b"7")  # regular, old regular, contiguous: all carry data
_OTHER_TYPES = (b"1", b"2", b"3", b"4", b"5", b"6")
_PAX_TYPES = (b"x", b"X")  # X: Solaris's name for the same record
_GLOBAL_TYPE = b"g"
_LONGNAME_TYPE = b"L"
_LONGLINK_TYPE = b"K"
_META_TYPE_SET = frozenset((*_PAX_TYPES, _GLOBAL_TYPE, _LONGNAME_TYPE, _LONGLINK_TYPE))
_CHECKSUM = struct.Struct("148b8x356b")


def _nts(field: bytes) -> bytes:
    """A NUL-terminated header string."""
    p = field.find(b"\x00")
    return field if p < 0 else field[:p]


def _nti(field: bytes) -> int:
    """A header number: octal text, or GNU's base-256 (first byte 0x80 or 0xff)."""
    text = field.partition(b"\x00")[0]
    if text.isdigit():  # the common case, zero-padded octal digits (ASCII: field is bytes)
        try:
            return int(text, 8)
        except ValueError:  # an 8 or a 9
            raise ArchiveError("corrupt tar header: invalid number field") from None
    if field[0] & 0x80:
        if field[0] not in (0o200, 0o377):
            raise ArchiveError("corrupt tar header: invalid number field")
        n = int.from_bytes(field[1:], "big")
        return n - 256 ** (len(field) - 1) if field[0] == 0o377 else n
    text = text.strip()
    if not text:
        return 0
    if text.isdigit():
        with contextlib.suppress(ValueError):
            return int(text, 8)
    raise ArchiveError("corrupt tar header: invalid number field")


# Modes and owners repeat from entry to entry: the 24 bytes of the three fields are parsed
# once for each combination met (a bounded cache).
_OWNERS: dict[bytes, tuple[int, int, int]] = {}


def _mode_owner(fields: bytes) -> tuple[int, int, int]:
    """Permission bits, uid and gid from a header's mode, uid and gid fields."""
    got = _OWNERS.get(fields)
    if got is None:
        got = (_nti(fields[:8]) & 0o7777, _nti(fields[8:16]), _nti(fields[16:]))
        if len(_OWNERS) < 4096:
            _OWNERS[fields] = got
    return got


# Times repeat too (the files of one package, of one build step): each parsed once.
_MTIMES: dict[bytes, int] = {}


def _parse_pax(data: bytes) -> dict[bytes, bytes]:
    """The ``length keyword=value\\n`` records of a pax header (values as raw bytes)."""
    out: dict[bytes, bytes] = {}
    pos, n = 0, len(data)
    while pos < n:
        sp = data.find(b" ", pos, pos + 21)
        if sp < 0:
            if not data[pos:].strip(b"\x00"):
                break  # NUL padding after the last record
            raise ArchiveError("corrupt pax header: malformed record")
        digits = data[pos:sp]
        if not digits.isdigit():  # bytes.isdigit() is ASCII digits only
            raise ArchiveError("corrupt pax header: malformed record length")
        end = pos + int(digits)
        eq = data.find(b"=", sp + 1, end)
        if end > n or end <= sp + 1 or eq <= sp + 1 or data[end - 1] != 0x0A:
            raise ArchiveError("corrupt pax header: malformed record")
        out[data[sp + 1 : eq]] = data[eq + 1 : end - 1]
        pos = end
    return out


class _Member:
    """One archive entry as the extractor needs it; names are the archive's raw bytes."""

    __slots__ = (
        "devmajor",
        "devminor",
        "gid",
        "linkname",
        "mode",
        "mtime_ns",
        "name",
        "size",
        "type",
        "uid",
        "xattrs",
    )

    def __init__(self, name: bytes, typ: bytes, size: int, mode: int, uid: int, gid: int,
                 mtime_ns: int, linkname: bytes) -> None:
        self.name = name
        self.type = typ
        self.size = size
        self.mode = mode
        self.uid = uid
        self.gid = gid
        self.mtime_ns = mtime_ns
        self.linkname = linkname
        self.devmajor = 0
        self.devminor = 0
        self.xattrs: dict[bytes, bytes] = {}


class _TarReader:
    """A strict, forward-only reader of ustar / pax / GNU tar headers.

    ``tarfile`` forgives what a layer must not: in stream mode a missing, short or corrupt
    header after the first reads as the end of the archive, so a truncated layer would
    import as a smaller one. Here only a real end-of-archive marker (a zero block) ends the
    archive; a bad checksum, a short header, a metadata record (pax, GNU long name) over
    :data:`MAX_HEADER_SIZE`, a dangling metadata record, GNU sparse files and unknown entry
    types are errors. File data is left in the input for the caller to copy or skip.
    """

    def __init__(self, src: _Input) -> None:
        self._src = src
        self._global: dict[bytes, bytes] = {}

    @staticmethod
    def _odd_header(hdr: bytes, unsigned: int) -> bool:
        """A header whose checksum field is not as GNU tar and Python write it (*unsigned*:
        its checksum as computed): False for the end-of-archive marker, True if the
        checksum holds, else ArchiveError."""
        if len(hdr) == 0:
            raise ArchiveError("archive is truncated: it ends without an end-of-archive marker")
        if len(hdr) != _BLOCKSIZE:
            raise ArchiveError("archive is truncated inside a header")
        if hdr == _ZERO_BLOCK:
            return False
        chk = _nti(hdr[148:156])
        if chk != unsigned and chk != 256 + sum(_CHECKSUM.unpack(hdr)):
            raise ArchiveError("corrupt tar header: bad checksum")
        return True

    def _record(self, size: int) -> bytes:
        if not 0 <= size <= MAX_HEADER_SIZE:
            raise ArchiveError(
                f"tar metadata record of {size} bytes exceeds the {MAX_HEADER_SIZE}-byte limit"
            )
        padded = size + (-size % _BLOCKSIZE)
        if padded <= _CHUNK:  # the usual case: record and padding in one take
            data = self._src.take(padded)
            if len(data) != padded:
                raise ArchiveError("archive is truncated inside a metadata record")
            return data[:size]
        data = self._src.take(size)
        if len(data) != size or self._src.skip(padded - size) != padded - size:
            raise ArchiveError("archive is truncated inside a metadata record")
        return data

    def next(self) -> _Member | None:
        """The next entry, or None after the end-of-archive marker."""
        take = self._src.take
        longname = longlink = None
        pax: dict[bytes, bytes] | None = None
        while True:
            hdr = take(_BLOCKSIZE)
            field = hdr[148:156]
            # The checksum (the field counts as spaces), in the form GNU tar and Python
            # write it; anything else (the end marker too) takes the slow path.
            unsigned = block_sum(hdr) - sum(field) + 256
            if (field != b"%06o\x00 " % unsigned
                    or len(hdr) != _BLOCKSIZE) and not self._odd_header(hdr, unsigned):
                if longname is not None or longlink is not None or pax is not None:
                    raise ArchiveError("archive ends right after a metadata record")
                return None
            typ = hdr[156:157]
            if typ not in _META_TYPE_SET:
                break
            data = self._record(_nti(hdr[124:136]))
            if typ == _LONGNAME_TYPE:
                longname = _nts(data)
            elif typ == _LONGLINK_TYPE:
                longlink = _nts(data)
            elif typ == _GLOBAL_TYPE:
                self._global.update(_parse_pax(data))
            else:
                pax = _parse_pax(data) if pax is None else {**pax, **_parse_pax(data)}
        if self._global:
            pax = {**self._global, **(pax or {})}
        if longname is None:
            name = _nts(hdr[0:100])
            if hdr[257:263] == _POSIX_MAGIC and hdr[345] != 0:
                name = _nts(hdr[345:500]) + b"/" + name
        else:
            name = longname
        mode, uid, gid = _mode_owner(hdr[100:124])
        mtime_ns = _nti(hdr[136:148]) * 1_000_000_000
        if not -_NS_MAX <= mtime_ns <= _NS_MAX:  # only a base-256 field gets here
            mtime_ns = max(-_NS_MAX, min(_NS_MAX, mtime_ns))
        m = _Member(name, typ, _nti(hdr[124:136]), mode, uid, gid, mtime_ns,
                    _nts(hdr[157:257]) if longlink is None else longlink)
        if typ in (b"3", b"4"):
            m.devmajor = _nti(hdr[329:337])
            m.devminor = _nti(hdr[337:345])
        if pax:
            self._apply_pax(m, pax)
        if typ not in _REG_TYPES and typ not in _OTHER_TYPES:
            if typ == b"S":
                raise ArchiveError(
                    f"{_show_bytes(m.name)}: GNU sparse files are not supported in layers"
                )
            raise ArchiveError(
                f"entry {_show_bytes(m.name)}: unsupported tar entry type {typ!r}"
            )
        if typ == b"\x00" and m.name.endswith(b"/"):
            m.type = b"5"  # old V7 archives mark directories by a trailing slash only
        if m.size < 0:
            raise ArchiveError(f"entry {_show_bytes(m.name)}: negative size")
        return m

    @staticmethod
    def _apply_pax(m: _Member, pax: dict[bytes, bytes]) -> None:
        for key, value in pax.items():  # the most frequent keys first
            if key == b"mtime":
                ns = _MTIMES.get(value)
                if ns is None:
                    ns = _decimal_ns(value)
                    if ns is None:
                        continue  # not a time: the header's stands
                    ns = max(-_NS_MAX, min(_NS_MAX, ns))
                    if len(_MTIMES) < 4096:
                        _MTIMES[value] = ns
                m.mtime_ns = ns
            elif key == b"path":
                m.name = value
            elif key == b"linkpath":
                m.linkname = value
            elif key in (b"size", b"uid", b"gid"):
                if not value.isdigit():  # ASCII digits only (bytes)
                    raise ArchiveError(f"corrupt pax header: invalid {key.decode()} {value!r}")
                setattr(m, key.decode(), int(value))
            elif key.startswith(_XATTR_PAX_PREFIX):
                name = key[len(_XATTR_PAX_PREFIX) :]
                if name in _KEPT_XATTRS or name.startswith(_KEPT_XATTR_PREFIXES):
                    m.xattrs[name] = value
            elif key.startswith(b"GNU.sparse."):
                raise ArchiveError(
                    f"{_show_bytes(m.name)}: GNU sparse files are not supported in layers"
                )


def _show(name: str) -> str:
    """*name* for an error message: quoted, and cut short if it is huge."""
    return repr(name if len(name) <= 120 else name[:100] + "...")


def _show_bytes(name: bytes) -> str:
    return _show(os.fsdecode(name))


def split(name: str, what: str) -> tuple[bytes, ...]:
    """Split a layer path into components, rejecting anything that could escape: absolute
    names, ``..``, NUL bytes, names of PATH_MAX bytes or more, components over NAME_MAX."""
    return split_bytes(os.fsencode(name), what)


def split_bytes(raw: bytes, what: str) -> tuple[bytes, ...]:
    """:func:`split` for a name in the file system's bytes."""
    if b"\x00" in raw:
        raise ArchiveError(f"{what} {_show_bytes(raw)} contains a NUL byte")
    if len(raw) >= _PATH_MAX:
        raise ArchiveError(f"{what} is longer than PATH_MAX ({len(raw)} bytes)")
    if raw.startswith(b"/"):
        raise ArchiveError(f"{what} {_show_bytes(raw)} is absolute")
    parts = raw.split(b"/")
    if b"" in parts or b"." in parts:
        parts = [p for p in parts if p and p != b"."]
    if b".." in parts:
        raise ArchiveError(f"{what} {_show_bytes(raw)} contains '..'")
    if len(raw) > _NAME_MAX and max(map(len, parts)) > _NAME_MAX:
        raise ArchiveError(f"{what} {_show_bytes(raw)} has a component longer than NAME_MAX")
    return tuple(parts)


def _decimal_ns(text: bytes) -> int | None:
    """Nanoseconds from a pax time record (``[-]seconds[.fraction]``), or None."""
    neg = text[:1] == b"-"
    sec, _, frac = (text[1:] if neg else text).partition(b".")
    # bytes.isdigit() is ASCII-only: no other digits get through to int().
    if not sec.isdigit() or len(sec) > 12 or (frac and not frac.isdigit()):
        return None
    ns = int(sec) * 1_000_000_000 + int((frac + b"000000000")[:9])
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
        self.cache = DirCache(root_fd, size=128)
        self.dirs: dict[tuple[bytes, ...], Meta] = {(): Meta()}
        # What this root creates is then owned by 0:0 already (no parent is ever setgid
        # while entries are written: directory modes come last, in finish()).
        root = os.fstat(root_fd)
        self.creator_is_root = (
            os.geteuid() == 0 and os.getegid() == 0 and not root.st_mode & stat.S_ISGID
        )

    def close(self) -> None:
        self.cache.close()

    # -- helpers -----------------------------------------------------------------------------

    def parent(self, parts: tuple[bytes, ...]) -> int:
        """The directory holding *parts*' last component, made if missing (borrowed fd)."""
        anc = parts[:-1]
        if anc not in self.dirs:
            # Every directory this builder made is in self.dirs: those not there are new.
            fresh = 0
            for i in range(len(anc), 0, -1):
                if anc[:i] in self.dirs:
                    break
                self.dirs[anc[:i]] = _IMPLICIT
                fresh += 1
            return self.cache.get(anc, create=True, fresh=fresh)
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
        try:
            os.mkdir(parts[-1], 0o700, dir_fd=pfd)
        except FileExistsError:
            if not self.clear(pfd, parts, keep_dir=True):
                os.mkdir(parts[-1], 0o700, dir_fd=pfd)
        self.dirs[parts] = meta

    def create_file(self, parts: tuple[bytes, ...]) -> int:
        """Create the regular file *parts* (empty, 0600) and return its fd (caller closes;
        call :meth:`apply` once its data is written)."""
        pfd = self.parent(parts)
        # O_EXCL never follows a symlink; a name already taken (a later entry wins) is
        # removed, not followed, and the create tried once more.
        try:
            return os.open(parts[-1], _CREATE_FLAGS, 0o600, dir_fd=pfd)
        except FileExistsError:
            self.clear(pfd, parts)
        return os.open(parts[-1], _CREATE_FLAGS, 0o600, dir_fd=pfd)

    def symlink(self, parts: tuple[bytes, ...], target: bytes, meta: Meta) -> None:
        _check_symlink_target(parts, target)
        pfd = self.parent(parts)
        # Stored verbatim, never followed: an absolute target is resolved only inside the
        # container's root.
        try:
            os.symlink(target, parts[-1], dir_fd=pfd)
        except FileExistsError:
            self.clear(pfd, parts)
            os.symlink(target, parts[-1], dir_fd=pfd)
        os.chown(parts[-1], meta.uid, meta.gid, dir_fd=pfd, follow_symlinks=False)
        os.utime(parts[-1], ns=(meta.mtime_ns, meta.mtime_ns), dir_fd=pfd, follow_symlinks=False)

    def hardlink(self, parts: tuple[bytes, ...], target: tuple[bytes, ...]) -> None:
        """Link *parts* to the existing non-directory *target* of this tree."""
        shown, missing = _check_link(parts, target)
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
            self.dirs.setdefault(parts, _IMPLICIT)
        fd = self.cache.get(parts, create=True)
        os.setxattr(fd, OPAQUE_XATTR, b"y")

    def finish(self) -> None:
        """Apply directory owners, modes, xattrs and times, now that their children exist."""
        for parts in sorted(self.dirs):
            meta = self.dirs[parts]
            if meta is _IMPLICIT and parts and self.creator_is_root:
                # Made by open_dir_beneath as 0755, owned by us (root): only the time
                # is left, set by name (AT_SYMLINK_NOFOLLOW: never through a symlink).
                try:
                    pfd = self.cache.get(parts[:-1])
                except (FileNotFoundError, UnsafePathError):
                    continue
                with contextlib.suppress(FileNotFoundError):
                    os.utime(parts[-1], ns=(0, 0), dir_fd=pfd, follow_symlinks=False)
                continue
            try:
                fd = self.cache.get(parts)
            except (FileNotFoundError, UnsafePathError):
                continue  # replaced by a later entry
            self.apply(fd, meta)


#: The metadata of directories no entry describes (implicit parents): 0755, 0:0, mtime 0.
#: Compared by identity: an entry that describes the same metadata is applied in full.
_IMPLICIT = Meta()


def _show_parts(parts: tuple[bytes, ...]) -> str:
    return _show(os.fsdecode(b"/".join(parts)) or ".")


def _check_symlink_target(parts: tuple[bytes, ...], target: bytes) -> None:
    """Refuse an empty symlink target, one with a NUL, or one of PATH_MAX bytes or more."""
    if not target or b"\x00" in target or len(target) >= _PATH_MAX:
        raise ArchiveError(f"{_show_parts(parts)}: invalid symlink target")


def _check_link(parts: tuple[bytes, ...], target: tuple[bytes, ...]) -> tuple[str, str]:
    """Refuse a hard link to the layer root or to itself; returns the entry as shown in
    messages and the message for a target that is not in the layer."""
    shown = _show_parts(parts)
    if not target:
        raise ArchiveError(f"{shown}: hard link to the layer root")
    if target == parts:
        raise ArchiveError(f"{shown}: hard link to itself")
    return shown, f"{shown}: hard link target {_show_parts(target)} is not in this layer"


def check_entry_name(parts: tuple[bytes, ...], name: str) -> None:
    """Refuse whiteout-looking names for real entries (they mean deletions, not files)."""
    for p in parts:
        if p.startswith(_WH_PREFIX):
            raise ArchiveError(f"entry {_show(name)}: a name starting with '.wh.' is reserved "
                               "for whiteouts")


class _Extractor:
    """Checks each entry against the tree made so far and has GNU tar write it.

    The tree's shape lives here (every path and whether it is a directory), so every check
    :class:`TreeBuilder` makes on the disk is made here on that map, before tar sees the
    entry, in the canonical form of :mod:`pyhcs._layers._gnutar`. Differences from a plain
    ``tar -x`` are settled here too:

    * an entry that takes the name of an earlier one (other than a directory over a
      directory) ends the running tar; Python removes the earlier entry (never following
      it) and a new tar goes on with the rest, so tar never meets an existing name;
    * implicit parents are sent as directories 0755, 0:0, mtime 0;
    * tar sets a directory's metadata when it leaves the directory; where the archive comes
      back into one (or describes it twice, or the root), Python sets the metadata once
      more at the end, with the opaque markers.
    """

    def __init__(self, root_fd: int, dest_dir: str, src: _Input, max_size: int) -> None:
        self.root_fd = root_fd
        self.dest_dir = dest_dir
        self.src = src
        self.max_size = max_size
        self.size = 0
        self.entries = 0
        #: Everything in the tree: components -> is it a directory.
        self.kinds: dict[tuple[bytes, ...], bool] = {}
        #: Every directory's metadata (_IMPLICIT for those no entry describes), root included.
        self.dirs: dict[tuple[bytes, ...], Meta] = {(): Meta()}
        self.opaque: set[tuple[bytes, ...]] = set()
        #: Directories whose metadata Python sets at the end.
        self.reapply: set[tuple[bytes, ...]] = {()}
        #: tar's stack of directories whose metadata it has yet to set (see _enter).
        self.pending: list[tuple[bytes, ...]] = []
        self.tar: ConfinedTar | None = None
        self.builder: TreeBuilder | None = None

    def entry(self, m: _Member) -> None:
        self.entries += 1
        if self.entries > MAX_ENTRIES:
            raise ArchiveError(f"archive has more than {MAX_ENTRIES} entries")
        typ = m.type
        if typ in _REG_TYPES:
            # Charged before any of it is read: a bomb stops at the limit.
            self.size += m.size
            if self.size > self.max_size:
                raise ArchiveError(
                    f"archive expands beyond the {self.max_size}-byte limit (max_size)"
                )
        parts = split_bytes(m.name, "entry name")
        if not parts:
            if typ != b"5":
                raise ArchiveError(
                    f"entry {_show_bytes(m.name)} names the layer root but is not a directory"
                )
            self.dirs[()] = self._meta(m)
            return
        if _WH_PREFIX in m.name:
            if parts[0] in _AUFS_META:
                if typ in _REG_TYPES:
                    self._skip(m)
                return  # aufs bookkeeping: skipped, as docker does
            for p in parts[:-1]:
                if p.startswith(_WH_PREFIX):
                    raise ArchiveError(
                        f"entry {_show_bytes(m.name)}: a whiteout name cannot be a directory"
                    )
            base = parts[-1]
            if base == _WH_OPAQUE:
                self._ensure_dirs(parts[:-1], parts)
                self.opaque.add(parts[:-1])
                self._skip(m)
                return
            if base.startswith(_WH_META):
                raise ArchiveError(f"entry {_show_bytes(m.name)}: unknown whiteout metadata name")
            if base.startswith(_WH_PREFIX):
                target = base[len(_WH_PREFIX) :]
                if target in (b"", b".", b".."):
                    raise ArchiveError(f"entry {_show_bytes(m.name)}: malformed whiteout name")
                self._whiteout((*parts[:-1], target), m.mtime_ns)
                self._skip(m)
                return
        if typ in _REG_TYPES:
            self._file(parts, m)
        elif typ == b"5":
            self._mkdir(parts, self._meta(m))
        elif typ == b"2":
            self._symlink(parts, m.linkname, self._meta(m))
        elif typ == b"1":
            self._hardlink(
                parts, split_bytes(m.linkname, f"hard link target of {_show_bytes(m.name)}")
            )
        elif typ == b"3" and m.devmajor == 0 and m.devminor == 0:
            self._whiteout(parts, self._meta(m).mtime_ns)
        elif typ == b"6":
            meta = self._meta(m)
            self._place(parts, False)
            self._emit(header(b"/".join(parts), b"6", meta.mode, meta.uid, meta.gid, 0,
                              meta.mtime_ns))
        else:
            kind = "block" if typ == b"4" else "character"
            raise ArchiveError(
                f"entry {_show_bytes(m.name)}: {kind} device {m.devmajor}:{m.devminor} is not "
                "allowed in a layer (only the 0:0 whiteout is)"
            )

    @staticmethod
    def _check_owner(m: _Member) -> None:
        # the message only when it fails: this runs for every entry
        if not (0 <= m.uid <= _ID_MAX and 0 <= m.gid <= _ID_MAX):
            check_ids(m.uid, m.gid, f"entry {_show_bytes(m.name)}")

    def _meta(self, m: _Member) -> Meta:
        self._check_owner(m)
        return Meta(m.mode, m.uid, m.gid, m.mtime_ns, m.xattrs)

    def _skip(self, m: _Member) -> None:
        """Skip the data (and padding) of a regular-file entry that is not written."""
        if m.type in _REG_TYPES:
            n = m.size + (-m.size % _BLOCKSIZE)
            if self.src.skip(n) != n:
                raise ArchiveError(
                    f"entry {_show_bytes(m.name)}: archive is truncated inside its data"
                )

    # -- the tree's shape --------------------------------------------------------------------

    def _tar(self) -> ConfinedTar:
        if self.tar is None:
            self.tar = ConfinedTar(self.dest_dir)
        return self.tar

    def _emit(self, data: bytes) -> ConfinedTar:
        tar = self._tar()
        tar.add(data)
        return tar

    def _enter(self, parts: tuple[bytes, ...]) -> None:
        """Follow what tar does on each entry it reads: it sets the metadata of the pending
        directories that are not ancestors of the entry (innermost first). If the entry's
        parent was set already, its time is about to change: it is set again at the end."""
        stack, n = self.pending, len(parts)
        while stack and not (len(stack[-1]) < n and parts[: len(stack[-1])] == stack[-1]):
            stack.pop()
        parent = parts[:-1]
        if parent and not (stack and stack[-1] == parent):
            self.reapply.add(parent)

    def _ensure_dirs(self, anc: tuple[bytes, ...], parts: tuple[bytes, ...]) -> None:
        """Make every directory of *anc* exist (implicit ones as 0755, 0:0, mtime 0); an
        existing non-directory on the way (a symlink, a file) refuses the entry *parts*."""
        # The map holds every parent of what it holds, as directories (an entry replaced
        # takes its whole subtree with it): so the deepest ancestor there is the one to
        # check, and the missing ones are all below it.
        kinds = self.kinds
        i = len(anc)
        while i and (k := kinds.get(anc[:i])) is None:
            i -= 1
        if i and not k:
            raise ArchiveError(
                f"entry {_show_parts(parts)}: {_show_parts(anc[:i])} is not a directory (a "
                "symlink or a file): nothing is written through it"
            )
        for j in range(i + 1, len(anc) + 1):
            p = anc[:j]
            self._enter(p)
            kinds[p] = True
            self.dirs[p] = _IMPLICIT
            self._emit(header(b"/".join(p), b"5", 0o755, 0, 0, 0, 0))
            self.pending.append(p)

    def _place(self, parts: tuple[bytes, ...], is_dir: bool) -> bool:
        """Make room for a new entry at *parts*: parents made, an earlier entry of that name
        removed. True (and nothing done) when a directory is already there for a directory."""
        anc = parts[:-1]
        if anc and not self.kinds.get(anc):
            self._ensure_dirs(anc, parts)
        k = self.kinds.get(parts)
        if k is not None:
            if is_dir and k:
                return True
            self._replace(parts)
        self._enter(parts)
        self.kinds[parts] = is_dir
        return False

    def _replace(self, parts: tuple[bytes, ...]) -> None:
        """Remove the earlier entry at *parts*: tar is finished first (it never meets an
        existing name), the removal never follows a symlink, and a new tar goes on."""
        if self.tar is not None:
            self.tar.finish()
            self.tar = None
        self.pending.clear()
        b = self._builder()
        b.clear(b.cache.get(parts[:-1]), parts)
        if self.kinds[parts]:
            n = len(parts)
            for table in (self.kinds, self.dirs):
                for k in [k for k in table if k[:n] == parts]:
                    del table[k]
            self.opaque = {k for k in self.opaque if k[:n] != parts}
        else:
            del self.kinds[parts]
        self.reapply.add(parts[:-1])

    def _builder(self) -> TreeBuilder:
        if self.builder is None:
            self.builder = TreeBuilder(self.root_fd)
        return self.builder

    # -- entries -----------------------------------------------------------------------------

    def _mkdir(self, parts: tuple[bytes, ...], meta: Meta) -> None:
        self.dirs[parts] = meta
        if self._place(parts, True):
            self.reapply.add(parts)  # described again: the last description wins
            return
        self._emit(header(b"/".join(parts), b"5", meta.mode, meta.uid, meta.gid, 0,
                          meta.mtime_ns, xattrs=meta.xattrs))
        self.pending.append(parts)

    def _file(self, parts: tuple[bytes, ...], m: _Member) -> None:
        # the most common entry by far: no Meta made for it
        self._check_owner(m)
        self._place(parts, False)
        size = m.size
        n = size + (-size % _BLOCKSIZE)
        head = header(b"/".join(parts), b"0", m.mode, m.uid, m.gid, size, m.mtime_ns,
                      xattrs=m.xattrs)
        if self._tar().add_file(head, self.src, n) != n:
            raise ArchiveError(f"entry {_show_bytes(m.name)}: archive is truncated inside its data")

    def _symlink(self, parts: tuple[bytes, ...], target: bytes, meta: Meta) -> None:
        _check_symlink_target(parts, target)
        self._place(parts, False)
        # Stored verbatim, never followed: an absolute target is resolved only inside the
        # container's root.
        self._emit(header(b"/".join(parts), b"2", 0o777, meta.uid, meta.gid, 0, meta.mtime_ns,
                          link=target))

    def _hardlink(self, parts: tuple[bytes, ...], target: tuple[bytes, ...]) -> None:
        """Link *parts* to the existing non-directory *target* of this tree."""
        shown, missing = _check_link(parts, target)
        k = self.kinds.get(target)
        if k is None:
            raise ArchiveError(missing)
        if k:
            raise ArchiveError(f"{shown}: hard link to a directory")
        self._place(parts, False)
        if target not in self.kinds:  # it was below what this entry replaced
            raise ArchiveError(missing)
        # A link to a symlink links the symlink itself (tar's link(2) does not follow).
        self._emit(header(b"/".join(parts), b"1", 0o644, 0, 0, 0, 0, link=b"/".join(target)))

    def _whiteout(self, parts: tuple[bytes, ...], mtime_ns: int = 0) -> None:
        """An overlay whiteout (char 0:0, mode 0, owner 0:0) at *parts*."""
        self._place(parts, False)
        self._emit(header(b"/".join(parts), b"3", 0, 0, 0, 0, mtime_ns))

    def finish(self) -> None:
        """Let tar finish, then mark the opaque directories and set the metadata of the
        directories changed after tar set it (the root always)."""
        if self.tar is not None:
            self.tar.finish()
            self.tar = None
        b = self._builder()
        for parts in sorted(self.opaque):
            os.setxattr(b.cache.get(parts), OPAQUE_XATTR, b"y")
        b.dirs = {p: self.dirs[p] for p in self.reapply if p in self.dirs}
        b.finish()

    def close(self) -> None:
        """Kill a tar still running (after a failure) and release the directory fds."""
        if self.tar is not None:
            self.tar.abort()
            self.tar = None
        if self.builder is not None:
            self.builder.close()
            self.builder = None


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
    ex: _Extractor | None = None
    try:
        raw = _HashingRaw(source)
        buffered = io.BufferedReader(raw, _CHUNK)
        try:
            stream = _decompressor(buffered)
            src = _Input(stream, max_size, hashed=stream is not buffered)
            reader = _TarReader(src)
            ex = _Extractor(root_fd, dest_dir, src, max_size)
            while True:
                m = reader.next()
                if m is None:
                    break
                try:
                    ex.entry(m)
                except UnsafePathError as e:
                    raise ArchiveError(f"entry {_show_bytes(m.name)}: {e}") from None
            ex.finish()
            # Read on to the end: it makes gzip/zstd/xz/bzip2 verify their checksums, and
            # the digests must cover the whole archive, trailing padding included.
            src.drain()
            if stream is not buffered:
                while buffered.read(_CHUNK):
                    pass
        except ArchiveError:
            raise
        except TarError as e:
            if e.errno == errno.ENAMETOOLONG:
                raise ArchiveError(str(e)) from None
            raise
        except gzip.BadGzipFile as e:
            raise ArchiveError(f"corrupt gzip stream: {e}") from e
        except (EOFError, zlib.error, lzma.LZMAError, ZstdError) as e:
            raise ArchiveError(f"corrupt or truncated archive: {e}") from e
        except ValueError as e:
            raise ArchiveError(f"malformed archive: {e}") from e
        digest = raw.hash.hexdigest()
        diff_id = src.hash.hexdigest() if src.hash is not None else digest
        return ExtractResult(digest, ex.size, ex.entries, diff_id)
    finally:
        if ex is not None:
            ex.close()
        os.close(root_fd)
