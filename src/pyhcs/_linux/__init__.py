"""Thin, typed wrappers over the Linux system calls Python's ``os`` module lacks.

Each wrapper raises ``OSError`` with the real errno and the path involved; the services
above translate those into pyhcs errors. Nothing here knows about containers.
"""

from __future__ import annotations

import ctypes
import errno
import os

__all__ = [
    "CLONE_NEWNS", "CLONE_NEWUTS", "CLONE_NEWIPC", "CLONE_NEWPID", "CLONE_NEWNET",
    "CLONE_NEWCGROUP", "CLONE_NEWUSER",
    "MS_RDONLY", "MS_NOSUID", "MS_NODEV", "MS_NOEXEC", "MS_REMOUNT", "MS_BIND", "MS_REC",
    "MS_PRIVATE", "MS_SLAVE", "MS_STRICTATIME", "MS_RELATIME", "MNT_DETACH",
    "mount", "umount", "unshare", "setns", "pivot_root", "prctl", "capbset_drop_except",
    "capset_drop_to",
    "close_range_from", "PR_SET_PDEATHSIG", "PR_SET_NO_NEW_PRIVS", "PR_SET_DUMPABLE",
    "PR_CAPBSET_DROP", "PR_SET_CHILD_SUBREAPER", "PR_SET_NAME", "CAP_LAST_CAP",
    "user_namespace", "write_id_maps", "idmapped_clone", "fork_bare", "mount_setattr",
    "MOUNT_ATTR_RDONLY", "MOUNT_ATTR_NOSUID", "MOUNT_ATTR_NODEV",
]

CLONE_NEWNS = 0x00020000
CLONE_NEWCGROUP = 0x02000000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000

MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MS_NOEXEC = 8
MS_REMOUNT = 32
MS_BIND = 4096
MS_REC = 16384
MS_PRIVATE = 1 << 18
MS_SLAVE = 1 << 19
MS_RELATIME = 1 << 21
MS_STRICTATIME = 1 << 24
MNT_DETACH = 2

PR_SET_PDEATHSIG = 1
PR_SET_DUMPABLE = 4
PR_SET_NAME = 15
PR_CAPBSET_DROP = 24
PR_SET_NO_NEW_PRIVS = 38
PR_SET_CHILD_SUBREAPER = 36

_SYS_PIVOT_ROOT = 155
_SYS_CAPSET = 126
_SYS_SETNS = 308
_SYS_CLOSE_RANGE = 436
_SYS_OPEN_TREE = 428  # these four: one number on every architecture
_SYS_MOUNT_SETATTR = 442
_OPEN_TREE_CLONE = 1
_AT_FDCWD = -100
_AT_EMPTY_PATH = 0x1000
_MOUNT_ATTR_IDMAP = 0x00100000
_AT_RECURSIVE = 0x8000
MOUNT_ATTR_RDONLY = 0x1
MOUNT_ATTR_NOSUID = 0x2
MOUNT_ATTR_NODEV = 0x4

_libc = ctypes.CDLL("libc.so.6", use_errno=True)  # glibc; find_library runs ldconfig
_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong,
                        ctypes.c_char_p]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
_libc.unshare.argtypes = [ctypes.c_int]
_libc.setns.argtypes = [ctypes.c_int, ctypes.c_int]
_libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong,
                        ctypes.c_ulong]
_libc.syscall.restype = ctypes.c_long
# The same library through the Python-aware loader: calls keep the GIL (see fork_bare).
_pylibc = ctypes.PyDLL("libc.so.6", use_errno=True)


def _check(ret: int, what: str, path: str | None = None) -> None:
    if ret < 0:
        e = ctypes.get_errno()
        raise OSError(e, f"{what}: {os.strerror(e)}", path)


def _b(s: str | None) -> bytes | None:
    return None if s is None else os.fsencode(s)


def mount(source: str | None, target: str, fstype: str | None = None, flags: int = 0,
          data: str | None = None) -> None:
    """mount(2)."""
    _check(_libc.mount(_b(source), _b(target), _b(fstype), flags, _b(data)), "mount", target)


def umount(target: str, flags: int = 0) -> None:
    """umount2(2)."""
    _check(_libc.umount2(_b(target), flags), "umount", target)


def unshare(flags: int) -> None:
    """unshare(2)."""
    _check(_libc.unshare(flags), "unshare")


def setns(fd: int, nstype: int = 0) -> None:
    """setns(2) into the namespace *fd* refers to."""
    _check(_libc.setns(fd, nstype), "setns")


def pivot_root(new_root: str, put_old: str) -> None:
    """pivot_root(2)."""
    _check(_libc.syscall(_SYS_PIVOT_ROOT, _b(new_root), _b(put_old)), "pivot_root", new_root)


def prctl(option: int, arg2: int = 0, arg3: int = 0, arg4: int = 0, arg5: int = 0) -> int:
    """prctl(2); returns its result."""
    ret = _libc.prctl(option, arg2, arg3, arg4, arg5)
    _check(ret, "prctl")
    return int(ret)


def _cap_last_cap() -> int:
    try:
        with open("/proc/sys/kernel/cap_last_cap") as f:
            return int(f.read())
    except OSError:
        return 40


CAP_LAST_CAP = _cap_last_cap()


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32),
                ("inheritable", ctypes.c_uint32)]


def capbset_drop_except(keep: frozenset[int]) -> None:
    """Drop every capability but *keep* from this thread's bounding set (needs
    CAP_SETPCAP, so before :func:`capset_drop_to` and before a change of uid)."""
    for cap in range(CAP_LAST_CAP + 1):
        if cap not in keep:
            try:
                prctl(PR_CAPBSET_DROP, cap)
            except OSError as e:
                if e.errno != errno.EINVAL:  # EINVAL: a capability the kernel does not know
                    raise


def capset_drop_to(keep: frozenset[int]) -> None:
    """Set this thread's effective and permitted sets to exactly *keep*; the inheritable
    set ends empty, and so the ambient set, as containerd's defaults have them."""
    mask = 0
    for cap in keep:
        mask |= 1 << cap
    hdr = _CapHeader(0x20080522, 0)  # _LINUX_CAPABILITY_VERSION_3
    data = (_CapData * 2)()
    data[0].effective = data[0].permitted = mask & 0xFFFFFFFF
    data[1].effective = data[1].permitted = mask >> 32
    _check(_libc.syscall(_SYS_CAPSET, ctypes.byref(hdr), ctypes.byref(data)), "capset")


def close_range_from(first: int, keep: tuple[int, ...] = ()) -> None:
    """Close every fd >= *first* except those in *keep* (close_range(2) when it exists)."""
    start = first
    bounds = [k for k in sorted(keep) if k >= first]
    for fd in [*bounds, None]:
        end = (fd - 1) if fd is not None else 0xFFFFFFFF
        if end >= start and _libc.syscall(_SYS_CLOSE_RANGE, start, end, 0) < 0:
            os.closerange(start, min(end + 1, 65536))
        if fd is not None:
            start = fd + 1


def fork_bare() -> int:
    """``fork(2)`` without Python's after-fork bookkeeping; returns 0 in the child and its
    pid in the parent.

    :func:`os.fork` re-initialises the interpreter's thread state in the child and runs
    the ``register_at_fork`` callbacks (threading, random, logging...). That writes to
    100-230 pages of the inherited heap, each a copy-on-write fault (about 9 us on this
    kind of nested VM while the parent lives): about a tenth of the time of starting a
    process in a container. Only correct in a **single-threaded parent** (no lock can be
    held by a thread that does not exist in the child) whose child does not rely on what
    those callbacks reset (its random numbers, thread objects or logging handlers are the
    parent's). The GIL is held across the call (PyDLL), so the child owns it. Raises
    ``OSError``.
    """
    pid = int(_pylibc.fork())
    if pid < 0:
        e = ctypes.get_errno()
        raise OSError(e, f"fork: {os.strerror(e)}")
    return pid


def user_namespace(uid_map: str, gid_map: str) -> int:
    """A new user namespace with these ``/proc/<pid>/uid_map`` and ``gid_map`` contents,
    as an fd (``O_CLOEXEC``) that keeps it alive: what :func:`idmapped_clone` needs.

    A child is forked to make it (a namespace needs a process to be born in); it has
    exited when this returns. Raises ``OSError``.
    """
    r, w = os.pipe2(os.O_CLOEXEC)
    go_r, go_w = os.pipe2(os.O_CLOEXEC)
    try:
        pid = os.fork()
    except BaseException:
        for fd in (r, w, go_r, go_w):
            os.close(fd)
        raise
    if pid == 0:  # only system calls here: the parent may have had threads
        code = 0
        try:
            os.close(r)
            os.close(go_w)
            if _libc.unshare(CLONE_NEWUSER) != 0:
                code = 1
            else:
                os.write(w, b"x")
                os.read(go_r, 1)  # until the parent has the namespace's fd
        finally:
            os._exit(code)
    os.close(w)
    os.close(go_r)
    try:
        if os.read(r, 1) != b"x":
            raise OSError(errno.EPERM, "cannot create a user namespace")
        write_id_maps(pid, uid_map, gid_map)
        return os.open(f"/proc/{pid}/ns/user", os.O_RDONLY | os.O_CLOEXEC)
    finally:
        os.close(r)
        os.close(go_w)
        os.waitpid(pid, 0)


def write_id_maps(pid: int, uid_map: str, gid_map: str) -> None:
    """Give the user namespace of *pid* its ``uid_map`` and ``gid_map`` (once, as the
    kernel allows). Raises ``OSError``."""
    for name, text in (("uid_map", uid_map), ("gid_map", gid_map)):
        with open(f"/proc/{pid}/{name}", "w") as f:
            f.write(text)


class _MountAttr(ctypes.Structure):
    _fields_ = [("attr_set", ctypes.c_uint64), ("attr_clr", ctypes.c_uint64),
                ("propagation", ctypes.c_uint64), ("userns_fd", ctypes.c_uint64)]


def idmapped_clone(path: str, userns_fd: int) -> int:
    """A detached copy of the mount at *path* (``open_tree(OPEN_TREE_CLONE)``) whose file
    owners are seen through the mappings of the user namespace *userns_fd*: an id the
    file system stores as *n* reads as the host id that *n* maps to in that namespace.
    Returns its fd (``O_CLOEXEC``); the copy goes with the last reference to it.

    Raises ``OSError`` (EINVAL: the file system cannot be id-mapped; ENOSYS: Linux < 5.12).
    """
    fd = int(_libc.syscall(_SYS_OPEN_TREE, ctypes.c_int(_AT_FDCWD), _b(path),
                           ctypes.c_uint(_OPEN_TREE_CLONE | os.O_CLOEXEC)))
    _check(fd, "open_tree", path)
    ret = _mount_setattr(fd, b"", _AT_EMPTY_PATH, _MountAttr(_MOUNT_ATTR_IDMAP, 0, 0, userns_fd))
    if ret < 0:
        err = ctypes.get_errno()
        os.close(fd)
        raise OSError(err, f"id-mapping a mount: {os.strerror(err)}", path)
    return fd


def mount_setattr(path: str, *, attr_set: int = 0, attr_clr: int = 0,
                  recursive: bool = False) -> None:
    """mount_setattr(2): set and clear ``MOUNT_ATTR_*`` flags of the mount at *path* (and,
    with *recursive*, of every mount below it) in one call, as ``mount -o remount,bind``
    cannot do for a whole tree. Raises ``OSError``."""
    ret = _mount_setattr(_AT_FDCWD, _b(path), _AT_RECURSIVE if recursive else 0,
                         _MountAttr(attr_set, attr_clr, 0, 0))
    _check(ret, "mount_setattr", path)


def _mount_setattr(dirfd: int, path: bytes | None, flags: int, attr: _MountAttr) -> int:
    """The raw mount_setattr(2) call; returns its result (errno left in ctypes)."""
    return int(_libc.syscall(_SYS_MOUNT_SETATTR, ctypes.c_int(dirfd), path, ctypes.c_uint(flags),
                             ctypes.byref(attr), ctypes.c_size_t(ctypes.sizeof(attr))))
