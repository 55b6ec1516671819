"""Mounting overlayfs over parent chains of any length.

``mount(2)`` takes overlay's options as one page (4095 bytes), so a chain of 128 layers
under ``/var/lib/pyhcs/layers/<64-hex id>/fs`` (about 100 bytes each) does not fit. Longer
chains use the new mount API: ``fsopen("overlay")`` and one ``fsconfig`` call per lower
directory with ``lowerdir+`` (Linux >= 6.8), then ``fsmount`` and ``move_mount``. On older
kernels (``lowerdir+`` refused with EINVAL) the lowers are named through short
``/proc/self/fd/N`` links to directory descriptors held open for the mount call, which fits
about 250 layers in a page. overlayfs itself allows 500 lower layers.

Sandboxes are mounted ``volatile`` (Linux >= 5.10), as CRI-O mounts every container's and
podman every ``--rm`` container's: overlayfs then skips the syncs it would otherwise make
(an fsync per copy-up, and a sync of the whole upper file system when the mount goes). A
container's writes reach the disk as the kernel writes back, like any unsynced file; what a
host crash catches unwritten is lost. Overlayfs marks such a mount with
:data:`VOLATILE_MARKER` in the work folder and refuses to mount it again while the marker
is there; pyhcs removes it before each mount (see ``_store.prepare_layer``).

**Id-mapped lowers** (a container in a user namespace): each lower folder is cloned as a
detached mount seen through the namespace's mappings (:func:`pyhcs._linux.idmapped_clone`)
and handed to overlayfs as a file descriptor (``fsconfig(FSCONFIG_SET_FD, "lowerdir+")``,
Linux >= 6.13), so the image's files, stored as owned by 0, read as owned by the host id
that the namespace's root maps to, and no mount is left behind but the overlay. The upper
folder is not id-mapped: overlayfs writes there with the mounter's credentials, which an
id-mapped mount would refuse (host root is not in the mapping); what the container writes
is stored with its host ids.
"""

from __future__ import annotations

import ctypes
import errno
import os
from collections.abc import Sequence

from pyhcs._linux import idmapped_clone, mount

__all__ = ["MOUNT_DATA_MAX", "VOLATILE_MARKER", "mount_overlay"]

#: The mount(2) data argument is one page.
MOUNT_DATA_MAX = 4095

#: What a volatile mount leaves in its work folder, relative to it (Documentation/
#: filesystems/overlayfs.rst, "Volatile mount").
VOLATILE_MARKER = ("work", "incompat", "volatile")

# Same numbers on every architecture (added after the syscall tables were unified).
_SYS_MOVE_MOUNT = 429
_SYS_FSOPEN = 430
_SYS_FSCONFIG = 431
_SYS_FSMOUNT = 432
_FSOPEN_CLOEXEC = 1
_FSMOUNT_CLOEXEC = 1
_FSCONFIG_SET_FLAG = 0
_FSCONFIG_SET_STRING = 1
_FSCONFIG_SET_FD = 5
_FSCONFIG_CMD_CREATE = 6
_MOVE_MOUNT_F_EMPTY_PATH = 4
_AT_FDCWD = -100

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


def _sys(nr: int, *args: object, what: str) -> int:
    ret = int(_libc.syscall(nr, *args))
    if ret < 0:
        e = ctypes.get_errno()
        raise OSError(e, f"{what}: {os.strerror(e)}")
    return ret


def _set(fd: int, key: str, value: str) -> None:
    _sys(
        _SYS_FSCONFIG,
        ctypes.c_int(fd),
        ctypes.c_uint(_FSCONFIG_SET_STRING),
        ctypes.c_char_p(key.encode()),
        ctypes.c_char_p(os.fsencode(value)),
        ctypes.c_int(0),
        what=f"fsconfig {key}",
    )


def _set_fd(fd: int, key: str, value: int) -> None:
    _sys(_SYS_FSCONFIG, ctypes.c_int(fd), ctypes.c_uint(_FSCONFIG_SET_FD),
         ctypes.c_char_p(key.encode()), None, ctypes.c_int(value), what=f"fsconfig {key}")


def _mount_new_api(lowers: Sequence[str | int], upper: str, work: str, target: str,
                   volatile: bool) -> None:
    fs_fd = _sys(_SYS_FSOPEN, ctypes.c_char_p(b"overlay"), ctypes.c_uint(_FSOPEN_CLOEXEC),
                 what="fsopen overlay")
    try:
        for lower in lowers:
            if isinstance(lower, int):
                _set_fd(fs_fd, "lowerdir+", lower)
            else:
                _set(fs_fd, "lowerdir+", lower)
        _set(fs_fd, "upperdir", upper)
        _set(fs_fd, "workdir", work)
        if volatile:
            _sys(_SYS_FSCONFIG, ctypes.c_int(fs_fd), ctypes.c_uint(_FSCONFIG_SET_FLAG),
                 ctypes.c_char_p(b"volatile"), None, ctypes.c_int(0), what="fsconfig volatile")
        _sys(_SYS_FSCONFIG, ctypes.c_int(fs_fd), ctypes.c_uint(_FSCONFIG_CMD_CREATE), None,
             None, ctypes.c_int(0), what="create the overlay")
        mnt_fd = _sys(_SYS_FSMOUNT, ctypes.c_int(fs_fd), ctypes.c_uint(_FSMOUNT_CLOEXEC),
                      ctypes.c_uint(0), what="fsmount")
        try:
            _sys(_SYS_MOVE_MOUNT, ctypes.c_int(mnt_fd), ctypes.c_char_p(b""),
                 ctypes.c_int(_AT_FDCWD), ctypes.c_char_p(os.fsencode(target)),
                 ctypes.c_uint(_MOVE_MOUNT_F_EMPTY_PATH), what="move_mount")
        finally:
            os.close(mnt_fd)
    finally:
        os.close(fs_fd)


def _mount_via_fds(lowers: Sequence[str], upper: str, work: str, target: str,
                   volatile: bool) -> None:
    fds: list[int] = []
    try:
        for lower in lowers:
            fds.append(os.open(lower, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC))
        names = ":".join(f"/proc/self/fd/{fd}" for fd in fds)
        data = f"lowerdir={names},upperdir={upper},workdir={work}" + _flags(volatile)
        if len(data.encode()) > MOUNT_DATA_MAX:
            raise OSError(errno.E2BIG, "too many lower layers for one overlay mount")
        mount("overlay", target, "overlay", 0, data)
    finally:
        for fd in fds:
            os.close(fd)


def _flags(volatile: bool) -> str:
    return ",volatile" if volatile else ""


def _mount_idmapped(lowers: Sequence[str], upper: str, work: str, target: str,
                    volatile: bool, userns_fd: int) -> None:
    fds: list[int] = []
    try:
        for lower in lowers:
            fds.append(idmapped_clone(lower, userns_fd))
        _mount_new_api(fds, upper, work, target, volatile)
    finally:
        for fd in fds:
            os.close(fd)


def mount_overlay(lowers: Sequence[str], upper: str, work: str, target: str, *,
                  volatile: bool = False, userns_fd: int = -1) -> None:
    """Mount overlayfs at *target*: *lowers* (topmost first), *upper*, *work*; *volatile*
    where the kernel has it (Linux >= 5.10; older kernels get an ordinary mount). With
    *userns_fd* (a user namespace), the lowers are id-mapped through its mappings.

    The paths must not contain ``,``, ``:`` or ``\\`` (the caller checks). Raises
    ``OSError`` (EINVAL from ``fsconfig lowerdir+`` for id-mapped lowers: Linux < 6.13).
    """
    if userns_fd >= 0:
        _mount_idmapped(lowers, upper, work, target, volatile, userns_fd)
        return
    try:
        _mount(lowers, upper, work, target, volatile)
    except OSError as e:
        if not volatile or e.errno != errno.EINVAL:
            raise
        _mount(lowers, upper, work, target, False)  # a kernel without "volatile"


def _mount(lowers: Sequence[str], upper: str, work: str, target: str, volatile: bool) -> None:
    data = f"lowerdir={':'.join(lowers)},upperdir={upper},workdir={work}" + _flags(volatile)
    if len(data.encode()) <= MOUNT_DATA_MAX:
        mount("overlay", target, "overlay", 0, data)
        return
    try:
        _mount_new_api(lowers, upper, work, target, volatile)
    except OSError as e:
        # EINVAL: no "lowerdir+" (Linux < 6.8) or a path over fsconfig's 256 bytes;
        # ENOSYS: no new mount API at all.
        if e.errno not in (errno.EINVAL, errno.ENOSYS):
            raise
        _mount_via_fds(lowers, upper, work, target, volatile)
