"""File-system primitives that never follow a symlink while writing.

Everything here works on directory file descriptors: a path is walked one component at a
time with ``O_NOFOLLOW | O_DIRECTORY``, so a symlink (or any non-directory) met on the way
stops the walk with :class:`UnsafePathError` instead of being followed. That is what keeps
writes inside a layer even when the layer itself contains hostile symlinks. Functions raise
``OSError`` (or :class:`UnsafePathError`); callers translate them into pyhcs errors.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import os
import stat
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

__all__ = [
    "DIR_FLAGS",
    "OPAQUE_XATTR",
    "DirCache",
    "UnsafePathError",
    "copy_chain",
    "copy_file",
    "is_whiteout",
    "mount_points",
    "mounts_under",
    "open_dir",
    "open_dir_beneath",
    "remove_entry",
    "remove_tree",
    "rename_noreplace",
    "write_all",
]

#: Flags for opening a directory without following a symlink in the last component.
DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
#: The xattr overlayfs reads to hide everything below a directory in the lower layers.
OPAQUE_XATTR = b"trusted.overlay.opaque"
#: xattrs copied between layers: the user namespace and file capabilities. ``trusted.*``
#: (overlay's own metadata) and LSM labels are never taken from layer content.
_COPIED_XATTR_PREFIXES = (b"user.",)
_COPIED_XATTRS = (b"security.capability",)


class UnsafePathError(Exception):
    """A path component is a symlink or not a directory, so it cannot be walked safely."""

    def __init__(self, components: Sequence[bytes], index: int, reason: str) -> None:
        self.path = b"/".join(components[: index + 1]).decode(errors="replace")
        super().__init__(f"{self.path!r} {reason}")


def open_dir(path: str) -> int:
    """Open the directory *path* (its last component must not be a symlink)."""
    return os.open(path, DIR_FLAGS)


def open_dir_beneath(
    root_fd: int,
    components: Sequence[bytes],
    *,
    create: bool = False,
    fresh: int = 0,
) -> int:
    """Open the directory *components* below *root_fd*, never following a symlink.

    With *create*, missing directories are made (mode 0755, owned by the caller); the last
    *fresh* components are known to be missing, so they are made before they are opened
    (one call less each). The caller closes the returned fd.
    Raises :class:`UnsafePathError` if a component exists but is a symlink or not a
    directory, ``FileNotFoundError`` if one is missing and *create* is false.
    """
    fd = os.dup(root_fd)
    try:
        first_fresh = len(components) - fresh if create else len(components)
        for i, name in enumerate(components):
            if i >= first_fresh:
                nfd = _make_child_dir(fd, components, i)
            else:
                try:
                    nfd = os.open(name, DIR_FLAGS, dir_fd=fd)
                except FileNotFoundError:
                    if not create:
                        raise
                    nfd = _make_child_dir(fd, components, i)
                except OSError as e:
                    if e.errno in (errno.ENOTDIR, errno.ELOOP):
                        raise _unsafe(fd, components, i) from None
                    raise
            os.close(fd)
            fd = nfd
        return fd
    except BaseException:
        os.close(fd)
        raise


def _make_child_dir(fd: int, components: Sequence[bytes], i: int) -> int:
    """Make directory *components[i]* below *fd* (mode 0755, whatever the umask) and open
    it; one that appeared meanwhile is opened like any existing directory (a symlink there
    is refused by the open)."""
    try:
        os.mkdir(components[i], 0o700, dir_fd=fd)
        made = True
    except FileExistsError:
        made = False
    nfd = _open_child_dir(fd, components, i)
    if made:
        try:
            os.fchmod(nfd, 0o755)
        except BaseException:
            os.close(nfd)
            raise
    return nfd


def _open_child_dir(fd: int, components: Sequence[bytes], i: int) -> int:
    try:
        return os.open(components[i], DIR_FLAGS, dir_fd=fd)
    except OSError as e:
        if e.errno in (errno.ENOTDIR, errno.ELOOP):
            raise _unsafe(fd, components, i) from None
        raise


def _unsafe(parent_fd: int, components: Sequence[bytes], i: int) -> UnsafePathError:
    try:
        st = os.stat(components[i], dir_fd=parent_fd, follow_symlinks=False)
        what = "is a symlink" if stat.S_ISLNK(st.st_mode) else "is not a directory"
    except OSError:
        what = "is not a directory"
    return UnsafePathError(components, i, f"{what}; refusing to write through it")


def lstat_at(dir_fd: int, name: bytes) -> os.stat_result | None:
    """``lstat`` of *name* in *dir_fd*, or ``None`` if it does not exist."""
    try:
        return os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return None


def remove_entry(dir_fd: int, name: bytes, st: os.stat_result | None = None) -> None:
    """Remove *name* from *dir_fd* whatever it is; a directory goes with its whole tree.

    The tree is walked by descriptors, so a symlink inside it is unlinked, never followed.
    """
    if st is None:
        st = lstat_at(dir_fd, name)
        if st is None:
            return
    if stat.S_ISDIR(st.st_mode):
        _remove_dir_at(dir_fd, name)
    else:
        os.unlink(name, dir_fd=dir_fd)


def _remove_dir_at(dir_fd: int, name: bytes) -> None:
    """Remove the directory *name* in *dir_fd* and everything below it, never following a
    symlink. Iterative (an explicit stack of open directories), so a tree thousands of
    levels deep is removed where ``shutil.rmtree`` would exhaust Python's recursion limit."""
    # Each frame: (fd of the directory, its name in the parent, names left to remove).
    stack: list[tuple[int, bytes, list[tuple[bytes, bool]]]] = []

    def push(parent: int, child: bytes) -> None:
        fd = os.open(child, DIR_FLAGS, dir_fd=parent)
        try:
            with os.scandir(fd) as it:
                names = [(os.fsencode(e.name), e.is_dir(follow_symlinks=False)) for e in it]
        except BaseException:
            os.close(fd)
            raise
        stack.append((fd, child, names))

    push(dir_fd, name)
    try:
        while stack:
            fd, _, names = stack[-1]
            while names:
                child, is_dir = names.pop()
                if is_dir:
                    try:
                        push(fd, child)
                        break
                    except (FileNotFoundError, NotADirectoryError):
                        continue
                    except OSError as e:
                        if e.errno != errno.ELOOP:  # replaced by a symlink meanwhile
                            raise
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(child, dir_fd=fd)
            else:
                fd, child, _ = stack.pop()
                os.close(fd)
                with contextlib.suppress(FileNotFoundError):
                    os.rmdir(child, dir_fd=stack[-1][0] if stack else dir_fd)
    finally:
        for fd, _, _ in stack:
            os.close(fd)


def remove_tree(path: str) -> None:
    """Remove *path* (a directory tree, a file or a symlink) if it exists, never following
    a symlink inside it; deep trees are fine (see :func:`remove_entry`)."""
    parent, name = os.path.split(os.path.abspath(path))
    try:
        pfd = os.open(parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except FileNotFoundError:
        return
    try:
        remove_entry(pfd, os.fsencode(name))
    finally:
        os.close(pfd)


class DirCache:
    """Open directory descriptors below one root, reused between nearby lookups.

    Streams (tar archives, layer walks) visit paths in tree order, so most lookups share a
    long prefix with a recent one; opening from the deepest cached ancestor keeps a walk of
    a tree thousands of levels deep linear instead of quadratic, while every component is
    still opened with ``O_NOFOLLOW``. At most *size* descriptors stay open. Descriptors
    handed out are borrowed: valid until the next call, never closed by the caller.
    """

    def __init__(self, root_fd: int, size: int = 64) -> None:
        self.root_fd = root_fd
        self._size = size
        self._fds: dict[tuple[bytes, ...], int] = {}

    def get(self, parts: tuple[bytes, ...], *, create: bool = False, fresh: int = 0) -> int:
        """The directory *parts* (``()`` is the root), made if *create* (see
        :func:`open_dir_beneath` for the rules, errors and *fresh*)."""
        if not parts:
            return self.root_fd
        fd = self._fds.get(parts)
        if fd is not None:
            self._fds[parts] = self._fds.pop(parts)  # most recently used goes last
            return fd
        base_fd, k = self.root_fd, 0
        for i in range(len(parts) - 1, 0, -1):
            cached = self._fds.get(parts[:i])
            if cached is not None:
                base_fd, k = cached, i
                break
        nfd = open_dir_beneath(base_fd, parts[k:], create=create, fresh=min(fresh, len(parts) - k))
        self._fds[parts] = nfd
        while len(self._fds) > self._size:
            oldest = next(iter(self._fds))
            os.close(self._fds.pop(oldest))
        return nfd

    def forget(self, parts: tuple[bytes, ...]) -> None:
        """Drop *parts* and everything below it (it was removed or replaced)."""
        n = len(parts)
        for k in [k for k in self._fds if k[:n] == parts]:
            os.close(self._fds.pop(k))

    def close(self) -> None:
        """Close every cached descriptor (not the root)."""
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()


def write_all(fd: int, data: bytes | memoryview) -> None:
    """Write all of *data* to *fd* (``os.write`` may write less than asked)."""
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


def is_whiteout(st: os.stat_result) -> bool:
    """True for an overlay whiteout: a character device 0:0."""
    return stat.S_ISCHR(st.st_mode) and st.st_rdev == 0


_libc_renameat2: Callable[[int, bytes, int, bytes, int], int] | None = None


def rename_noreplace(src: str, dst: str) -> None:
    """Rename *src* to *dst* atomically, failing with ``FileExistsError`` if *dst* exists.

    ``os.rename`` would silently replace an empty directory at *dst*; ``renameat2`` with
    ``RENAME_NOREPLACE`` makes two concurrent importers of one id race safely.
    """
    global _libc_renameat2
    if _libc_renameat2 is None:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        fn = libc.renameat2
        fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
        fn.restype = ctypes.c_int
        _libc_renameat2 = fn
    at_fdcwd = -100
    rename_noreplace_flag = 1
    if _libc_renameat2(
        at_fdcwd, os.fsencode(src), at_fdcwd, os.fsencode(dst), rename_noreplace_flag
    ):
        e = ctypes.get_errno()
        if e == errno.EEXIST or e == errno.ENOTEMPTY:
            raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), dst)
        raise OSError(e, os.strerror(e), src, None, dst)


# -- mount table ------------------------------------------------------------------------------


def _unescape_mountinfo(field: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as \ooo octal.
    out = []
    i = 0
    while i < len(field):
        c = field[i]
        if c == "\\" and i + 3 < len(field) and field[i + 1 : i + 4].isdigit():
            out.append(chr(int(field[i + 1 : i + 4], 8)))
            i += 4
        else:
            out.append(c)
            i += 1
    return "".join(out)


def mount_points() -> list[str]:
    """Every mount point of the calling process's mount namespace."""
    with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
        return [_unescape_mountinfo(line.split(" ")[4]) for line in f if line.strip()]


def _escape_mountinfo(path: bytes) -> bytes:
    for c in b"\\ \t\n":
        path = path.replace(bytes([c]), b"\\%03o" % c)
    return path


def mounts_under(path: str) -> list[str]:
    """Mount points at *path* or below it (symlinks in *path* resolved, as the kernel shows)."""
    real = os.path.realpath(path)
    with open("/proc/self/mountinfo", "rb") as f:
        table = f.read()
    # The common answer, none, without parsing: the path appears nowhere in the table.
    if _escape_mountinfo(os.fsencode(real)) not in table:
        return []
    prefix = real.rstrip("/") + "/"
    return [m for m in mount_points() if m == real or m.startswith(prefix)]


# -- copying layers (the diff flavour) --------------------------------------------------------


def _copyable_xattr(name: bytes) -> bool:
    return name in _COPIED_XATTRS or name.startswith(_COPIED_XATTR_PREFIXES)


def _copy_xattrs(src_fd: int, dst_fd: int) -> None:
    try:
        names = os.listxattr(src_fd)
    except OSError as e:
        if e.errno in (errno.ENOTSUP, errno.EOPNOTSUPP):
            return
        raise
    for name in names:
        bname = os.fsencode(name)
        if _copyable_xattr(bname):
            os.setxattr(dst_fd, bname, os.getxattr(src_fd, bname))


def _is_opaque(dir_fd: int) -> bool:
    try:
        return os.getxattr(dir_fd, OPAQUE_XATTR) == b"y"
    except OSError:
        return False


def _ns(st: os.stat_result) -> tuple[int, int]:
    return (st.st_atime_ns, st.st_mtime_ns)


@dataclass
class _CopyState:
    """Hard-link identities seen while copying one layer: (dev, ino) -> destination path."""

    links: dict[tuple[int, int], tuple[bytes, ...]] = field(default_factory=dict)
    dir_times: list[tuple[tuple[bytes, ...], tuple[int, int]]] = field(default_factory=list)


def copy_chain(layer_fs_dirs: Iterable[str], dest_root_fd: int) -> None:
    """Merge the layers *layer_fs_dirs* (base first) into *dest_root_fd*, overlay-style.

    This is what overlayfs would show, materialised as full copies: a later layer's entry
    replaces an earlier one, a whiteout (char 0:0) deletes the name, an opaque directory
    hides everything the earlier layers had below it. Whiteouts and the opaque xattr are
    consumed, not copied. Hard links inside one layer stay hard links. Nothing is followed:
    sources are read and destinations written through directory descriptors.
    """
    for fs_dir in layer_fs_dirs:
        src_fd = open_dir(fs_dir)
        try:
            state = _CopyState()
            _copy_dir(src_fd, dest_root_fd, (), state, dest_root_fd)
            st = os.fstat(src_fd)
            os.fchown(dest_root_fd, st.st_uid, st.st_gid)
            os.fchmod(dest_root_fd, stat.S_IMODE(st.st_mode))
            for rel, times in reversed(state.dir_times):
                # Directory times last: creating children changes a directory's mtime.
                fd = open_dir_beneath(dest_root_fd, rel)
                try:
                    os.utime(fd, ns=times)
                finally:
                    os.close(fd)
            os.utime(dest_root_fd, ns=_ns(st))
        finally:
            os.close(src_fd)


def _copy_dir(
    src_fd: int, dst_fd: int, rel: tuple[bytes, ...], state: _CopyState, root_fd: int
) -> None:
    with os.scandir(src_fd) as it:
        names = sorted(os.fsencode(e.name) for e in it)
    for name in names:
        st = os.stat(name, dir_fd=src_fd, follow_symlinks=False)
        existing = lstat_at(dst_fd, name)
        mode = st.st_mode
        if is_whiteout(st):
            if existing is not None:
                remove_entry(dst_fd, name, existing)
            continue
        if stat.S_ISDIR(mode):
            child_src = os.open(name, DIR_FLAGS, dir_fd=src_fd)
            try:
                if existing is not None and (
                    not stat.S_ISDIR(existing.st_mode) or _is_opaque(child_src)
                ):
                    remove_entry(dst_fd, name, existing)
                    existing = None
                if existing is None:
                    os.mkdir(name, 0o700, dir_fd=dst_fd)
                child_dst = os.open(name, DIR_FLAGS, dir_fd=dst_fd)
                try:
                    os.fchown(child_dst, st.st_uid, st.st_gid)
                    os.fchmod(child_dst, stat.S_IMODE(mode))
                    _copy_xattrs(child_src, child_dst)
                    _copy_dir(child_src, child_dst, (*rel, name), state, root_fd)
                finally:
                    os.close(child_dst)
            finally:
                os.close(child_src)
            state.dir_times.append(((*rel, name), _ns(st)))
            continue
        if existing is not None:
            remove_entry(dst_fd, name, existing)
        if stat.S_ISREG(mode):
            key = (st.st_dev, st.st_ino)
            first = state.links.get(key) if st.st_nlink > 1 else None
            if first is not None:
                src_parent = open_dir_beneath(root_fd, first[:-1])
                try:
                    os.link(
                        first[-1],
                        name,
                        src_dir_fd=src_parent,
                        dst_dir_fd=dst_fd,
                        follow_symlinks=False,
                    )
                finally:
                    os.close(src_parent)
                continue
            _copy_file(src_fd, dst_fd, name, st)
            if st.st_nlink > 1:
                state.links[key] = (*rel, name)
        elif stat.S_ISLNK(mode):
            target = os.readlink(name, dir_fd=src_fd)
            os.symlink(target, name, dir_fd=dst_fd)
            os.chown(name, st.st_uid, st.st_gid, dir_fd=dst_fd, follow_symlinks=False)
            os.utime(name, ns=_ns(st), dir_fd=dst_fd, follow_symlinks=False)
        elif stat.S_ISFIFO(mode):
            os.mknod(name, stat.S_IFIFO | 0o600, dir_fd=dst_fd)
            os.chown(name, st.st_uid, st.st_gid, dir_fd=dst_fd, follow_symlinks=False)
            # The fifo was just made in a directory only we write to; chmod by name is safe.
            os.chmod(name, stat.S_IMODE(mode), dir_fd=dst_fd)
            os.utime(name, ns=_ns(st), dir_fd=dst_fd, follow_symlinks=False)
        else:
            shown = b"/".join((*rel, name)).decode(errors="replace")
            raise OSError(errno.EPERM, f"refusing to copy device node or socket {shown!r}")


def _copy_file(src_dir: int, dst_dir: int, name: bytes, st: os.stat_result) -> None:
    copy_file(src_dir, name, dst_dir, name, st)


def copy_file(
    src_dir: int, src_name: bytes, dst_dir: int, dst_name: bytes, st: os.stat_result
) -> None:
    """Copy the regular file *src_name* (whose lstat is *st*) to the new *dst_name*, with
    its owner, mode, copyable xattrs and times; neither name is followed if a symlink."""
    src = os.open(src_name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=src_dir)
    try:
        dst = os.open(
            dst_name,
            os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
            0o600,
            dir_fd=dst_dir,
        )
        try:
            remaining = st.st_size
            while remaining > 0:
                try:
                    n = os.copy_file_range(src, dst, min(remaining, 1 << 30))
                except OSError as e:
                    if e.errno not in (errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL):
                        raise
                    n = _copy_by_read(src, dst, remaining)
                if n == 0:
                    break  # the source shrank under us; copy what there is
                remaining -= n
            # chown first: it clears setuid/setgid and file capabilities, which come after.
            os.fchown(dst, st.st_uid, st.st_gid)
            os.fchmod(dst, stat.S_IMODE(st.st_mode))
            _copy_xattrs(src, dst)
            os.utime(dst, ns=_ns(st))
        finally:
            os.close(dst)
    finally:
        os.close(src)


def _copy_by_read(src: int, dst: int, limit: int) -> int:
    data = os.read(src, min(limit, 1 << 20))
    write_all(dst, data)
    return len(data)
