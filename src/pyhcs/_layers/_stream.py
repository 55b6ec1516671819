"""Streaming access to one layer's content: :class:`LayerReader` and :class:`LayerWriter`.

hcsshim's ``LayerReader`` / ``LayerWriter`` in Python form. A layer is described as a
sequence of :class:`LayerEntry` values, parents before children, siblings in byte order of
their names; a regular file's data follows its entry. The entry kinds are those of an
overlay layer: files, directories (``opaque=True``: hides what the parents have below),
symlinks, hard links (to an earlier entry), FIFOs, device nodes, and whiteouts (the name
is deleted from the parents' view).

What a reader walks (the layer's *diff* against its parents):

* a read-only layer: its ``fs/`` folder;
* a sandbox of the filter flavour: its overlay ``upper/`` folder (overlay records
  deletions there as whiteouts and opaque directories already);
* a sandbox of the diff flavour, whose ``rootfs/`` is a full copy: the difference between
  ``rootfs/`` and the merged view of the parents, found by comparing type, mode, owner,
  size, mtime, link target and xattrs (as docker's naive differ does: a file rewritten
  with the same size and mtime is not seen).

Every walk goes through directory descriptors with ``O_NOFOLLOW``, so a container that
swaps a directory for a symlink while its sandbox is read cannot make the reader leave
the layer. Every write goes through :class:`~pyhcs._layers._extract.TreeBuilder`, the same
code (and rules) as the tar extractor.
"""

from __future__ import annotations

import contextlib
import enum
import errno
import os
import stat
import weakref
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Self

from pyhcs._layers._extract import (
    ArchiveError,
    Meta,
    TreeBuilder,
    check_entry_name,
    check_ids,
    split,
)
from pyhcs._layers._fsops import (
    DIR_FLAGS,
    OPAQUE_XATTR,
    DirCache,
    UnsafePathError,
    copy_file,
    is_whiteout,
    lstat_at,
    open_dir,
    write_all,
)

__all__ = [
    "EntryType",
    "LayerEntry",
    "LayerReader",
    "LayerWriter",
    "open_tree_reader",
    "walk_tree",
]

_KEPT_XATTRS = (b"security.capability",)
_KEPT_PREFIXES = (b"user.",)


class EntryType(enum.StrEnum):
    """What a :class:`LayerEntry` is."""

    FILE = "file"
    DIR = "dir"
    SYMLINK = "symlink"
    HARDLINK = "hardlink"
    FIFO = "fifo"
    CHAR = "char"
    BLOCK = "block"
    WHITEOUT = "whiteout"


@dataclass(frozen=True, slots=True)
class LayerEntry:
    """One entry of a layer: hcsshim's (name, size, ``FileBasicInfo``) in Linux terms.

    ``path`` is relative, ``/``-separated, ``"."`` for the layer root; ``mode`` holds the
    permission bits (setuid, setgid and sticky included, no type bits); times are
    nanoseconds since the epoch; ``xattrs`` maps names (``user.*``,
    ``security.capability``) to values; ``link_target`` is a symlink's target or, for a
    hard link, the path of the entry it links to; ``size`` is a regular file's length.
    """

    path: str
    type: EntryType
    size: int = 0
    mode: int = 0o644
    uid: int = 0
    gid: int = 0
    mtime_ns: int = 0
    atime_ns: int = 0
    xattrs: Mapping[str, bytes] = field(default_factory=dict, hash=False)
    link_target: str = ""
    devmajor: int = 0
    devminor: int = 0
    opaque: bool = False


# -- reading ----------------------------------------------------------------------------------


def _xattrs_of(fd: int) -> dict[str, bytes]:
    try:
        names = os.listxattr(fd)
    except OSError as e:
        if e.errno in (errno.ENOTSUP, errno.EOPNOTSUPP):
            return {}
        raise
    out = {}
    for n in sorted(names):
        b = os.fsencode(n)
        if b in _KEPT_XATTRS or b.startswith(_KEPT_PREFIXES):
            with contextlib.suppress(FileNotFoundError, OSError):
                out[n] = os.getxattr(fd, n)
    return out


def _is_opaque(fd: int) -> bool:
    try:
        return os.getxattr(fd, OPAQUE_XATTR) == b"y"
    except OSError:
        return False


def _path(parts: tuple[bytes, ...]) -> str:
    return os.fsdecode(b"/".join(parts)) if parts else "."


# An item a source yields: the entry, and for a regular file a function opening its data.
_Item = tuple[LayerEntry, Callable[[], int] | None]


def _describe(
    dir_fd: int,
    parts: tuple[bytes, ...],
    st: os.stat_result,
    links: dict[tuple[int, int], str],
) -> tuple[_Item, bool] | None:
    """The item for *parts* (lstat *st*, in *dir_fd*), and whether it is a directory to
    descend into; None for what a layer cannot hold (sockets)."""
    name = parts[-1] if parts else b"."
    path = _path(parts)
    mode = st.st_mode
    base: dict[str, Any] = {
        "mode": stat.S_IMODE(mode),
        "uid": st.st_uid,
        "gid": st.st_gid,
        "mtime_ns": st.st_mtime_ns,
        "atime_ns": st.st_atime_ns,
    }
    if stat.S_ISDIR(mode):
        fd = os.open(name, DIR_FLAGS, dir_fd=dir_fd) if parts else os.dup(dir_fd)
        try:
            e = LayerEntry(path, EntryType.DIR, xattrs=_xattrs_of(fd), opaque=_is_opaque(fd),
                           **base)
        finally:
            os.close(fd)
        return (e, None), True
    if stat.S_ISREG(mode):
        if st.st_nlink > 1:
            key = (st.st_dev, st.st_ino)
            first = links.get(key)
            if first is not None:
                e = LayerEntry(path, EntryType.HARDLINK, link_target=first, **base)
                return (e, None), False
            links[key] = path
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK,
                     dir_fd=dir_fd)
        try:
            xattrs = _xattrs_of(fd)
        except BaseException:
            os.close(fd)
            raise
        e = LayerEntry(path, EntryType.FILE, size=st.st_size, xattrs=xattrs, **base)
        return (e, lambda: fd), False
    if stat.S_ISLNK(mode):
        target = os.fsdecode(os.readlink(name, dir_fd=dir_fd))
        return (LayerEntry(path, EntryType.SYMLINK, link_target=target, **base), None), False
    if is_whiteout(st):
        return (LayerEntry(path, EntryType.WHITEOUT, **base), None), False
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        kind = EntryType.CHAR if stat.S_ISCHR(mode) else EntryType.BLOCK
        return (LayerEntry(path, kind, devmajor=os.major(st.st_rdev),
                           devminor=os.minor(st.st_rdev), **base), None), False
    if stat.S_ISFIFO(mode):
        return (LayerEntry(path, EntryType.FIFO, **base), None), False
    return None


def _listdir(fd: int) -> list[bytes]:
    with os.scandir(fd) as it:
        return sorted(os.fsencode(e.name) for e in it)


def walk_tree(root: str) -> Iterator[_Item]:
    """Every entry below *root* (itself first), pre-order, siblings sorted."""
    root_fd = open_dir(root)
    cache = DirCache(root_fd)
    links: dict[tuple[int, int], str] = {}
    try:
        item = _describe(root_fd, (), os.fstat(root_fd), links)
        assert item is not None
        yield item[0]
        stack: list[tuple[tuple[bytes, ...], Iterator[bytes]]] = [((), iter(_listdir(root_fd)))]
        while stack:
            parts, names = stack[-1]
            name = next(names, None)
            if name is None:
                stack.pop()
                continue
            dfd = cache.get(parts)
            st = lstat_at(dfd, name)
            if st is None:
                continue  # removed meanwhile (a running container's sandbox)
            child = (*parts, name)
            found = _describe(dfd, child, st, links)
            if found is None:
                continue
            yield found[0]
            if found[1]:
                try:
                    cfd = cache.get(child)
                except (FileNotFoundError, UnsafePathError):
                    continue  # replaced meanwhile; never followed
                stack.append((child, iter(_listdir(cfd))))
    finally:
        cache.close()
        os.close(root_fd)


def _same(a: os.stat_result, b: os.stat_result, a_fd: int, b_fd: int, name: bytes) -> bool:
    """Whether two non-directory entries look unchanged (type, mode, owner, size, mtime,
    link target)."""
    if (a.st_mode, a.st_uid, a.st_gid, a.st_mtime_ns) != (b.st_mode, b.st_uid, b.st_gid,
                                                          b.st_mtime_ns):
        return False
    if stat.S_ISREG(a.st_mode):
        return a.st_size == b.st_size
    if stat.S_ISLNK(a.st_mode):
        return os.readlink(name, dir_fd=a_fd) == os.readlink(name, dir_fd=b_fd)
    if stat.S_ISCHR(a.st_mode) or stat.S_ISBLK(a.st_mode):
        return a.st_rdev == b.st_rdev
    return True


def _walk_diff(rootfs: str, parent_fs: list[str]) -> Iterator[_Item]:
    """What *rootfs* (a full copy) changes relative to the merged view of *parent_fs*
    (direct parent first): new or changed entries, whiteouts for deleted names."""
    root_fd = open_dir(rootfs)
    cache = DirCache(root_fd)
    pfds = [open_dir(p) for p in parent_fs]
    pcaches = [DirCache(fd, 16) for fd in pfds]
    links: dict[tuple[int, int], str] = {}

    def pdir(layer: int, parts: tuple[bytes, ...]) -> int | None:
        try:
            return pcaches[layer].get(parts)
        except (FileNotFoundError, UnsafePathError):
            return None

    def merged(parts: tuple[bytes, ...], contrib: list[int]) -> dict[bytes, tuple[int, list[int]]]:
        """name -> (layer it comes from, layers contributing to it if a directory)."""
        out: dict[bytes, tuple[int, list[int]]] = {}
        closed: set[bytes] = set()
        for layer in contrib:
            fd = pdir(layer, parts)
            if fd is None:
                continue
            for name in _listdir(fd):
                st = lstat_at(fd, name)
                if st is None or name in closed:
                    continue
                is_dir = stat.S_ISDIR(st.st_mode)
                opaque = False
                if is_dir:
                    cfd = os.open(name, DIR_FLAGS, dir_fd=fd)
                    try:
                        opaque = _is_opaque(cfd)
                    finally:
                        os.close(cfd)
                if name in out:
                    if is_dir:
                        out[name][1].append(layer)
                    if not is_dir or opaque:
                        closed.add(name)
                    continue
                if is_whiteout(st):
                    closed.add(name)
                    continue
                out[name] = (layer, [layer] if is_dir else [])
                if not is_dir or opaque:
                    closed.add(name)
        return out

    root_contrib: list[int] = []
    for i, fd in enumerate(pfds):
        root_contrib.append(i)
        if _is_opaque(fd):
            break
    try:
        top = _describe(root_fd, (), os.fstat(root_fd), links)
        assert top is not None
        yield top[0]
        # Frames: (parts, sorted names of the union, merged parents' view, pending dir
        # entry not yet emitted, or None once emitted).
        Frame = tuple[tuple[bytes, ...], Iterator[bytes], dict[bytes, tuple[int, list[int]]]]
        stack: list[Frame] = []
        pending: list[_Item | None] = []

        def push(parts: tuple[bytes, ...], contrib: list[int], entry: _Item | None) -> None:
            view = merged(parts, contrib) if contrib else {}
            names = set(view)
            with contextlib.suppress(FileNotFoundError, UnsafePathError):
                names.update(_listdir(cache.get(parts)))
            stack.append((parts, iter(sorted(names)), view))
            pending.append(entry)

        def flush() -> Iterator[_Item]:
            for i, p in enumerate(pending):
                if p is not None:
                    yield p
                    pending[i] = None

        push((), root_contrib, None)
        while stack:
            parts, names, view = stack[-1]
            name = next(names, None)
            if name is None:
                stack.pop()
                pending.pop()
                continue
            child = (*parts, name)
            try:
                dfd = cache.get(parts)
            except (FileNotFoundError, UnsafePathError):
                continue
            st = lstat_at(dfd, name)
            below = view.get(name)
            if st is None:
                if below is not None:
                    yield from flush()
                    yield LayerEntry(_path(child), EntryType.WHITEOUT), None
                continue
            found = _describe(dfd, child, st, links)
            if found is None:
                continue
            item, is_dir = found
            pst = None
            pfd = None
            if below is not None:
                pfd = pdir(below[0], parts)
                pst = lstat_at(pfd, name) if pfd is not None else None
            if is_dir:
                if pst is not None and stat.S_ISDIR(pst.st_mode):
                    same = (st.st_mode, st.st_uid, st.st_gid, st.st_mtime_ns) == (
                        pst.st_mode, pst.st_uid, pst.st_gid, pst.st_mtime_ns)
                    assert below is not None
                    # Unchanged: emitted only if something below it is.
                    push(child, below[1], item)
                    if not same:
                        yield from flush()
                else:
                    yield from flush()
                    yield item
                    push(child, [], None)
                continue
            if pst is not None and pfd is not None and _same(st, pst, dfd, pfd, name):
                opener = item[1]
                if opener is not None:
                    os.close(opener())
                if links.get((st.st_dev, st.st_ino)) == item[0].path:
                    del links[(st.st_dev, st.st_ino)]  # not emitted: cannot be linked to
                continue
            yield from flush()
            yield item
    finally:
        cache.close()
        for c in pcaches:
            c.close()
        os.close(root_fd)
        for fd in pfds:
            os.close(fd)


class LayerReader:
    """Reads one layer entry by entry (hcsshim's ``LayerReader``); a context manager and
    an iterator of :class:`LayerEntry`.

    ``next()`` returns the next entry (``None`` at the end); while the current entry is a
    regular file, :meth:`read` / :meth:`readinto` return its data. Parents come before
    their children. Made by :func:`pyhcs._layers.new_layer_reader`.
    """

    def __init__(self, items: Iterator[_Item]) -> None:
        self._items = items
        self._fd: int | None = None
        self._left = 0
        self._closed = False

    def __iter__(self) -> Self:
        return self

    def __next__(self) -> LayerEntry:
        e = self.next()
        if e is None:
            raise StopIteration
        return e

    def next(self) -> LayerEntry | None:
        """The next entry, or ``None`` when the layer has been read."""
        if self._closed:
            raise ValueError("the layer reader is closed")
        self._close_file()
        item = next(self._items, None)
        if item is None:
            return None
        entry, opener = item
        if opener is not None:
            self._fd = opener()
            self._left = entry.size
        return entry

    def read(self, size: int = -1) -> bytes:
        """Up to *size* bytes (all that is left if negative) of the current file's data;
        ``b""`` at its end or if the current entry has no data."""
        if self._fd is None or self._left <= 0:
            return b""
        want = self._left if size < 0 else min(size, self._left)
        chunks = []
        while want > 0:
            b = os.read(self._fd, min(want, 1 << 20))
            if not b:
                break
            chunks.append(b)
            want -= len(b)
            self._left -= len(b)
        return b"".join(chunks)

    def readinto(self, buf: Any) -> int:
        """Read the current file's data into *buf*; 0 at its end."""
        if self._fd is None or self._left <= 0:
            return 0
        view = memoryview(buf).cast("B")[: self._left]
        n = os.readv(self._fd, [view])
        self._left -= n
        return n

    def _close_file(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
            self._left = 0

    def close(self) -> None:
        """Release the reader's descriptors (reading may stop early)."""
        if not self._closed:
            self._closed = True
            self._close_file()
            close = getattr(self._items, "close", None)
            if close is not None:
                close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_tree_reader(folder: str, parent_fs: list[str]) -> LayerReader:
    """A reader of the layer in *folder* (a layer folder of the store): ``upper/`` for a
    filter sandbox, the diff of ``rootfs/`` against *parent_fs* for a populated diff
    sandbox, else ``fs/``."""
    if os.path.isdir(os.path.join(folder, "upper")) and not os.path.exists(
        os.path.join(folder, ".diff-populated")
    ):
        return LayerReader(walk_tree(os.path.join(folder, "upper")))
    if os.path.exists(os.path.join(folder, ".diff-populated")):
        return LayerReader(_walk_diff(os.path.join(folder, "rootfs"), parent_fs))
    return LayerReader(walk_tree(os.path.join(folder, "fs")))


# -- writing ----------------------------------------------------------------------------------


class WriterError(Exception):
    """A writer call was refused (the message says why); the store raises LayerError."""


def _parent_lookup(
    parent_fs: list[str], parts: tuple[bytes, ...]
) -> tuple[int, os.stat_result] | None:
    """(layer index, lstat) of *parts* in the merged view of *parent_fs* (top first), or
    None if it is not there (absent, whited out, or hidden by an opaque directory)."""
    for i, root in enumerate(parent_fs):
        st, stop = _lookup_in(root, parts)
        if st is not None:
            return i, st
        if stop:
            return None
    return None


def _lookup_in(root: str, parts: tuple[bytes, ...]) -> tuple[os.stat_result | None, bool]:
    """lstat of *parts* in one layer, and whether the layers below are hidden there."""
    try:
        fd = open_dir(root)
    except OSError:
        return None, False
    try:
        hidden_below = _is_opaque(fd)
        for k, comp in enumerate(parts):
            st = lstat_at(fd, comp)
            if st is None:
                return None, hidden_below
            if is_whiteout(st):
                return None, True
            if k == len(parts) - 1:
                return st, True
            if not stat.S_ISDIR(st.st_mode):
                return None, True
            nfd = os.open(comp, DIR_FLAGS, dir_fd=fd)
            os.close(fd)
            fd = nfd
            hidden_below = hidden_below or _is_opaque(fd)
        return None, False
    finally:
        os.close(fd)


class LayerWriter:
    """Builds a new layer entry by entry (hcsshim's ``LayerWriter``); a context manager.

    :meth:`add` adds a file, directory, symlink, FIFO or device (a regular file's data
    follows with :meth:`write`), :meth:`add_link` a hard link, :meth:`remove` a deletion of
    something the parents have (``add`` of a whiteout entry does the same, keeping its
    mtime). Nothing is visible until :meth:`close` succeeds; leaving the
    ``with`` block with an exception, calling :meth:`abort`, or dropping the writer leaves
    no layer and no temporary folder. Paths follow the tar extractor's rules (relative, no
    ``..``, never through a symlink; ``.wh.`` names are reserved). Made by
    :func:`pyhcs._layers.new_layer_writer`; errors are :class:`~pyhcs.LayerError`.
    """

    def __init__(
        self,
        tmp: str,
        parent_fs: list[str],
        publish: Callable[[str], None],
        discard: Callable[[str], None],
        fail: Callable[[Exception, str], Exception],
    ) -> None:
        self._tmp = tmp
        self._parent_fs = parent_fs
        self._publish = publish
        self._fail = fail
        self._root_fd = open_dir(os.path.join(tmp, "fs"))
        self._builder = TreeBuilder(self._root_fd)
        self._pending: tuple[int, Meta, int] | None = None  # fd, meta, bytes still expected
        # Descriptors the finalizer must close if the writer is dropped unfinished.
        self._fds: list[int] = [self._root_fd]
        self._done = False
        self._finalizer = weakref.finalize(
            self, _abandon, tmp, self._fds, self._builder, discard
        )

    # -- helpers -------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._done:
            raise self._fail(ValueError("the layer writer is closed"), "")

    def _finish_file(self) -> None:
        if self._pending is None:
            return
        fd, meta, left = self._pending
        self._pending = None
        self._fds.remove(fd)
        try:
            if left:
                raise WriterError(f"{left} bytes of the previous file's data were not written")
            TreeBuilder.apply(fd, meta)
        finally:
            os.close(fd)

    def _parts(self, path: str) -> tuple[bytes, ...]:
        parts = split(path, "path")
        check_entry_name(parts, path)
        return parts

    def _guard(self, what: str, fn: Callable[[], None]) -> None:
        self._check_open()
        try:
            fn()
        except (ArchiveError, WriterError, UnsafePathError, OSError, ValueError) as e:
            raise self._fail(e, what) from e

    # -- the API -------------------------------------------------------------------------

    def add(self, path: str, info: LayerEntry) -> None:
        """Add *path* as described by *info* (``info.path`` is ignored); for a regular file
        the next :meth:`write` calls supply its ``info.size`` bytes. A directory's parent
        need not be added first: missing parents are made (0755, 0:0)."""

        def run() -> None:
            self._finish_file()
            parts = self._parts(path)
            check_ids(info.uid, info.gid, f"{path!r}")
            meta = Meta(
                stat.S_IMODE(info.mode),
                info.uid,
                info.gid,
                info.mtime_ns,
                {os.fsencode(k): bytes(v) for k, v in info.xattrs.items()
                 if os.fsencode(k) in _KEPT_XATTRS or os.fsencode(k).startswith(_KEPT_PREFIXES)},
            )
            b = self._builder
            t = info.type
            if t == EntryType.DIR:
                b.mkdir(parts, meta)
                if info.opaque:
                    b.opaque(parts)
                return
            if not parts:
                raise WriterError("only a directory can be the layer root")
            if t == EntryType.FILE:
                if info.size < 0:
                    raise WriterError("negative size")
                fd = b.create_file(parts)
                self._fds.append(fd)
                self._pending = (fd, meta, info.size)
                if info.size == 0:
                    self._finish_file()
            elif t == EntryType.SYMLINK:
                b.symlink(parts, os.fsencode(info.link_target), meta)
            elif t == EntryType.FIFO:
                b.mknod(parts, stat.S_IFIFO, 0, meta)
            elif t in (EntryType.CHAR, EntryType.BLOCK):
                if info.devmajor == 0 and info.devminor == 0 and t == EntryType.CHAR:
                    raise WriterError("a 0:0 character device is a whiteout: use remove()")
                raise WriterError("device nodes are not allowed in a layer")
            elif t == EntryType.HARDLINK:
                self._link(parts, info.link_target)
            elif t == EntryType.WHITEOUT:
                self._remove(parts, info.mtime_ns)
            else:  # pragma: no cover - the enum is closed
                raise WriterError(f"unknown entry type {t!r}")

        self._guard(f"add {path!r}", run)

    def write(self, data: bytes | bytearray | memoryview) -> int:
        """Append *data* to the file last added; more than its size is an error."""

        def run() -> None:
            if not data:
                return
            if self._pending is None:
                raise WriterError("write() without a regular file being added")
            fd, meta, left = self._pending
            if len(data) > left:
                raise WriterError(f"{len(data)} bytes written where {left} were left")
            write_all(fd, memoryview(data))
            left -= len(data)
            self._pending = (fd, meta, left)
            if left == 0:
                self._finish_file()

        self._guard("write", run)
        return len(data)

    def add_link(self, path: str, target: str) -> None:
        """Add *path* as a hard link to *target*: an entry already added, or a file of a
        parent layer (then copied up into this layer first, as overlayfs would)."""

        def run() -> None:
            self._finish_file()
            self._link(self._parts(path), target)

        self._guard(f"add_link {path!r}", run)

    def _link(self, parts: tuple[bytes, ...], target: str) -> None:
        tparts = self._parts(target)
        if self._builder.lstat(tparts) is None:
            found = _parent_lookup(self._parent_fs, tparts) if tparts else None
            if found is None or not stat.S_ISREG(found[1].st_mode):
                raise WriterError(
                    f"hard link target {target!r} is neither added nor a file of a parent"
                )
            src = open_dir(self._parent_fs[found[0]])
            try:
                sfd = os.dup(src)
                try:
                    for comp in tparts[:-1]:
                        nfd = os.open(comp, DIR_FLAGS, dir_fd=sfd)
                        os.close(sfd)
                        sfd = nfd
                    dfd = self._builder.parent(tparts)
                    copy_file(sfd, tparts[-1], dfd, tparts[-1], found[1])
                finally:
                    os.close(sfd)
            finally:
                os.close(src)
        self._builder.hardlink(parts, tparts)

    def remove(self, path: str) -> None:
        """Record the deletion of *path*, which must be present in a parent layer (an
        overlay whiteout; anything this writer added there is dropped)."""

        def run() -> None:
            self._finish_file()
            self._remove(self._parts(path))

        self._guard(f"remove {path!r}", run)

    def _remove(self, parts: tuple[bytes, ...], mtime_ns: int = 0) -> None:
        if not parts or _parent_lookup(self._parent_fs, parts) is None:
            raise WriterError(f"{_path(parts)!r} is not present in a parent layer")
        self._builder.whiteout(parts, mtime_ns)

    def close(self) -> None:
        """Finish the layer and make it visible (register it). On failure nothing is left."""
        self._check_open()
        try:
            self._finish_file()
            self._builder.finish()
        except (WriterError, OSError) as e:
            self.abort()
            raise self._fail(e, "close") from e
        except BaseException:
            self.abort()
            raise
        self._done = True
        self._finalizer.detach()
        self._builder.close()
        os.close(self._root_fd)
        self._publish(self._tmp)  # moves it into place, or discards it and raises

    def abort(self) -> None:
        """Drop everything written; the layer is not created."""
        self._done = True
        self._pending = None
        self._finalizer()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is None:
            if not self._done:
                self.close()
        else:
            self.abort()


def _abandon(
    tmp: str, fds: list[int], builder: TreeBuilder, discard: Callable[[str], None]
) -> None:
    builder.close()
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)
    fds.clear()
    discard(tmp)
