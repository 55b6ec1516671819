"""Loop devices through their ioctls (no ``losetup`` process on the container start path).

Devices are attached with ``LO_FLAGS_AUTOCLEAR``: the kernel detaches one by itself when its
last user goes away (the file system mounted on it is unmounted everywhere, or the process
that attached it dies before mounting). That is what makes a killed pyhcs unable to leak a
loop device. Functions raise ``OSError``; callers translate.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import os
from collections.abc import Iterator

__all__ = [
    "attach",
    "backing_devices",
    "detach",
    "device_of_mount",
    "refresh_capacity",
    "size_of",
]

_LOOP_SET_CAPACITY = 0x4C07
_LOOP_CLR_FD = 0x4C01
_LOOP_CONFIGURE = 0x4C0A
_LOOP_CTL_GET_FREE = 0x4C82
_LO_FLAGS_AUTOCLEAR = 4
_LOOP_MAJOR = 7
_SECTOR = 512


class _LoopInfo64(ctypes.Structure):
    _fields_ = [
        ("lo_device", ctypes.c_uint64),
        ("lo_inode", ctypes.c_uint64),
        ("lo_rdevice", ctypes.c_uint64),
        ("lo_offset", ctypes.c_uint64),
        ("lo_sizelimit", ctypes.c_uint64),
        ("lo_number", ctypes.c_uint32),
        ("lo_encrypt_type", ctypes.c_uint32),
        ("lo_encrypt_key_size", ctypes.c_uint32),
        ("lo_flags", ctypes.c_uint32),
        ("lo_file_name", ctypes.c_uint8 * 64),
        ("lo_crypt_name", ctypes.c_uint8 * 64),
        ("lo_encrypt_key", ctypes.c_uint8 * 32),
        ("lo_init", ctypes.c_uint64 * 2),
    ]


class _LoopConfig(ctypes.Structure):
    _fields_ = [
        ("fd", ctypes.c_uint32),
        ("block_size", ctypes.c_uint32),
        ("info", _LoopInfo64),
        ("reserved", ctypes.c_uint64 * 8),
    ]


def _dev_path(name: str) -> str:
    return f"/dev/{name}"


def _open_device(name: str) -> int:
    """Open ``/dev/<name>``; where /dev is not a devtmpfs the node may be missing: make it."""
    path = _dev_path(name)
    try:
        return os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        number = int(name.removeprefix("loop"))
        with contextlib.suppress(FileExistsError):
            os.mknod(path, 0o600 | 0o060000, os.makedev(_LOOP_MAJOR, number))
        return os.open(path, os.O_RDWR | os.O_CLOEXEC)


@contextlib.contextmanager
def attach(image: str) -> Iterator[str]:
    """Attach *image* to a free loop device (autoclear); yield its ``/dev`` path.

    The device stays open for the body of the ``with``: mount it there. Once the body is
    left, the device lives exactly as long as something (a mount) holds it.
    """
    file_fd = os.open(image, os.O_RDWR | os.O_CLOEXEC)
    try:
        ctl = os.open("/dev/loop-control", os.O_RDWR | os.O_CLOEXEC)
        try:
            # Another process may take the free device between the two calls: try again.
            for _ in range(64):
                number = fcntl.ioctl(ctl, _LOOP_CTL_GET_FREE)
                name = f"loop{number}"
                dev_fd = _open_device(name)
                cfg = _LoopConfig()
                cfg.fd = file_fd
                cfg.info.lo_flags = _LO_FLAGS_AUTOCLEAR
                label = os.fsencode(image)[-63:]
                ctypes.memmove(cfg.info.lo_file_name, label, len(label))
                try:
                    fcntl.ioctl(dev_fd, _LOOP_CONFIGURE, bytes(cfg))
                except OSError as e:
                    os.close(dev_fd)
                    if e.errno == errno.EBUSY:
                        continue
                    raise
                break
            else:
                raise OSError(errno.EBUSY, "no free loop device could be configured", image)
        finally:
            os.close(ctl)
        try:
            yield _dev_path(name)
        finally:
            os.close(dev_fd)
    finally:
        os.close(file_fd)


def backing_devices(image: str) -> list[str]:
    """Names (``loopN``) of the loop devices whose backing file is *image*.

    Matched by path, as the kernel reports it in sysfs (a deleted file's path ends in
    `` (deleted)``, which is not a match).
    """
    want = os.path.realpath(image)
    out: list[str] = []
    try:
        names = os.listdir("/sys/block")
    except OSError:
        return out
    for name in names:
        if not name.startswith("loop"):
            continue
        try:
            with open(f"/sys/block/{name}/loop/backing_file") as f:
                backing = f.read().rstrip("\n")
        except OSError:
            continue  # not bound (or detached meanwhile)
        if backing == want:
            out.append(name)
    return out


def detach(name: str) -> None:
    """Detach loop device *name*; if it is in use the kernel detaches it when released."""
    try:
        fd = os.open(_dev_path(name), os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return
    try:
        fcntl.ioctl(fd, _LOOP_CLR_FD)
    except OSError as e:
        if e.errno != errno.ENXIO:  # ENXIO: already unbound
            raise
    finally:
        os.close(fd)


def device_of_mount(path: str) -> str | None:
    """The loop device name (``loopN``) mounted at *path*, or None if it is not a loop."""
    st = os.stat(path)
    if os.major(st.st_dev) != _LOOP_MAJOR:
        return None
    try:
        target = os.readlink(f"/sys/dev/block/{os.major(st.st_dev)}:{os.minor(st.st_dev)}")
    except OSError:
        return None
    return os.path.basename(target)


def size_of(name: str) -> int:
    """The size in bytes the loop device *name* presents."""
    with open(f"/sys/block/{name}/size") as f:
        return int(f.read()) * _SECTOR


def refresh_capacity(name: str) -> None:
    """Make loop device *name* take its backing file's current size (LOOP_SET_CAPACITY)."""
    fd = os.open(_dev_path(name), os.O_RDONLY | os.O_CLOEXEC)
    try:
        fcntl.ioctl(fd, _LOOP_SET_CAPACITY)
    finally:
        os.close(fd)
