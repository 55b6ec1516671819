"""Sandbox size: a sized filter-flavour sandbox writes to a file system of its own.

By default a sandbox has no size of its own: its writes go to the layer store's file system
and are bounded by that file system's free space. That costs nothing when a container is
created, where a sized sandbox costs a file system of its own (~50 ms to make, ~20-80 ms
to remove, mostly mkfs and the host giving back the image's blocks). A size is asked for
with ``size_bytes`` (``ContainerConfig.storage_sandbox_size``); such a sandbox gets, as
hcsshim's gets a volume of ``StorageSandboxSize`` bytes, an ext4 file system in a sparse
image file inside the layer folder::

    <home_dir>/<id>/
      sandbox.img          sparse ext4 image (larger than the size: see "headroom")
      sandbox.size         the sandbox's size in bytes (decimal text)
      scratch/             where prepare_layer mounts the image (loop device, nosuid,nodev)
        upper/  work/      overlayfs's upper and work directories (made on first prepare)
      upper -> scratch/upper,  work -> scratch/work
                           the overlay's upper/work paths as the rest of the store knows
                           them; they resolve only while the sandbox is prepared

Writing past the size fails with ``ENOSPC`` in the sandbox's file system only. The host's
file system holds just the blocks actually written: the image is sparse, and mounted with
``discard`` so that deleted files give their blocks back.

How the size is enforced (headroom). Growing an ext4 file system while it is mounted
(``EXT4_IOC_RESIZE_FS``) needs ``CAP_SYS_RESOURCE``, which root in a container or a
confined service often lacks. So the file system is made larger than the size, at least
4x and 64 GiB (sparse: ~5 MiB of metadata, ~25 ms of mkfs), and the size is enforced by
ext4's *reserved clusters* (``/sys/fs/ext4/<dev>/reserved_clusters``), space that no
writer, root included, may allocate. Growing within the headroom only lowers that
reservation: instant, online, no capability needed. Beyond it the file system itself is
grown (online when mounted, which needs ``CAP_SYS_RESOURCE``; offline with ``resize2fs``
when not). ``statvfs`` on the rootfs reports the size as ``f_bavail`` (free space left for
the container); ``f_blocks`` is the file system's, headroom included.

* :func:`pyhcs._layers.create_sandbox_layer` with ``size_bytes`` makes the image with one
  ``mkfs.ext4``.
* ``prepare_layer`` attaches the image to a loop device (with the kernel's autoclear flag:
  the device disappears by itself when the file system is unmounted, or when the process
  dies before mounting it), mounts it at ``scratch/``, sets the reservation from
  ``sandbox.size``, then mounts the overlay. ``unprepare_layer`` unmounts both;
  ``destroy_layer`` removes the image with the folder.
* :func:`expand_sandbox_size` grows the size, also while the container runs.
* Crash safety: a ``scratch/`` mount left by a killed prepare/unprepare (the overlay is
  not mounted) is reused by the next prepare and removed by the next unprepare or destroy;
  a loop device still bound to the image is reused rather than a second one attached, so
  one image is never mounted as two file systems. ``sandbox.size`` is replaced
  atomically, after the file system has room for it.

The diff flavour (``DriverInfo.flavour == 0``) is not sized: its rootfs is a full copy of
the parent chain made by a rename into ``rootfs/``, with no mount to put a volume under.
Sandboxes made before sizing existed (no ``sandbox.img``) keep working unsized.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import struct
import subprocess
from collections.abc import Iterator

from pyhcs._errors import (
    InvalidConfigError,
    LayerError,
    NotSupportedError,
)

# _store calls this module's hooks and this module calls _store's helpers: importing the
# module (not names from it) lets either be imported first.
from pyhcs._layers import _loopdev, _store
from pyhcs._linux import MS_NODEV, MS_NOSUID, mount, umount
from pyhcs._paths import Roots

__all__ = [
    "MIN_SANDBOX_SIZE",
    "expand_sandbox_size",
    "get_sandbox_size",
]

_MIB = 1 << 20
#: The smallest sandbox size accepted (bytes).
MIN_SANDBOX_SIZE = 32 * _MIB

IMAGE = "sandbox.img"
SIZE_FILE = "sandbox.size"
SCRATCH_DIR = "scratch"
_UPPER = "upper"
_WORK = "work"
_ROOTFS = "rootfs"
_BLOCK = 4096
# Headroom: the file system is at least this much larger than the size (see the docstring)...
_HEADROOM_FACTOR = 4
_HEADROOM_MIN = 64 << 30
# ...but no larger than an ext4 host with 4 KiB blocks can hold in one file (16 TiB).
_FS_MAX = (16 << 40) - (1 << 30)

_EXT4_IOC_RESIZE_FS = 0x40086610  # _IOW('f', 16, __u64)
_EXT4_MAGIC = 0xEF53
_INCOMPAT_64BIT = 0x80


def _round_up(size: int) -> int:
    return -(-size // _MIB) * _MIB


def _fs_bytes(size: int) -> int:
    """The file system size that gives a sandbox of *size* its headroom."""
    return max(size, min(max(_HEADROOM_FACTOR * size, _HEADROOM_MIN), _FS_MAX))


def _usable(fs_bytes: int) -> int:
    """A safe lower bound of what a file system of *fs_bytes* can store: ext4 keeps about
    1.6% for inode tables (one 256-byte inode per 16 KiB), its journal and bitmaps."""
    return fs_bytes - fs_bytes // 32 - 64 * _MIB


# -- hooks called by _store -------------------------------------------------------------------


def resolve_size(size_bytes: int | None, op: str) -> int:
    """The sandbox size for *size_bytes*, rounded up to a MiB; 0 (None or 0 given) for a
    sandbox without a size of its own."""
    if size_bytes is None or size_bytes == 0:
        return 0
    if not isinstance(size_bytes, int) or isinstance(size_bytes, bool) or size_bytes < 0:
        raise InvalidConfigError(
            op, extra_info=f"size_bytes {size_bytes!r}", message="must be a byte count >= 0"
        )
    if size_bytes < MIN_SANDBOX_SIZE:
        raise InvalidConfigError(
            op,
            extra_info=f"size_bytes {size_bytes}",
            message=f"a sandbox needs at least {MIN_SANDBOX_SIZE} bytes",
        )
    return _round_up(size_bytes)


def create_volume(folder: str, size: int) -> None:
    """Give the new sandbox in *folder* (not yet published) its image for *size* bytes.

    Raises ``OSError``.
    """
    image = os.path.join(folder, IMAGE)
    with open(image, "xb") as f:
        os.ftruncate(f.fileno(), _fs_bytes(size))
    _mkfs(image)
    _write_size(folder, size)
    os.mkdir(os.path.join(folder, SCRATCH_DIR), 0o700)
    # The overlay's upper and work directories must share one mount: they live on the image,
    # and the names the store uses for them become links into it.
    for name in (_UPPER, _WORK):
        path = os.path.join(folder, name)
        with contextlib.suppress(FileNotFoundError):
            os.rmdir(path)
        os.symlink(f"{SCRATCH_DIR}/{name}", path)


def is_sized(folder: str) -> bool:
    """True if the sandbox in *folder* has an image (was created with a size)."""
    return os.path.isfile(os.path.join(folder, IMAGE))


@contextlib.contextmanager
def volume_for_overlay(folder: str, layer_id: str, op: str) -> Iterator[None]:
    """Mount the sandbox's image at ``scratch/`` for the overlay mounted in the body;
    if the body fails, unmount it again. Nothing to do for an unsized sandbox."""
    if not is_sized(folder):
        yield
        return
    _mount_volume(folder, layer_id, op)
    try:
        yield
    except BaseException:
        with contextlib.suppress(LayerError):
            unmount_volume(folder, layer_id, op)
        raise


def unmount_volume(folder: str, layer_id: str, op: str) -> None:
    """Unmount ``scratch/`` (its loop device then detaches itself), unless the overlay
    on top of it is still mounted. Nothing to do if it is not mounted."""
    if not is_sized(folder) or os.path.ismount(os.path.join(folder, _ROOTFS)):
        return
    scratch = os.path.join(folder, SCRATCH_DIR)
    while os.path.ismount(scratch):  # a crash between two prepares can stack two mounts
        try:
            umount(scratch)
        except OSError as e:
            if e.errno == errno.EINVAL:  # unmounted meanwhile
                continue
            raise _store._os_error(
                layer_id, op, e, "cannot unmount the sandbox's file system"
            ) from e


def clear_stale(folder: str, layer_id: str, op: str) -> None:
    """Before destroying: remove a ``scratch/`` mount a killed process left (the overlay
    is not mounted), and detach any loop device still bound to the image."""
    if not is_sized(folder):
        return
    unmount_volume(folder, layer_id, op)
    if os.path.ismount(os.path.join(folder, SCRATCH_DIR)):
        return  # still in use: destroy_layer refuses it
    for name in _loopdev.backing_devices(os.path.join(folder, IMAGE)):
        try:
            _loopdev.detach(name)
        except OSError as e:
            raise _store._os_error(layer_id, op, e, f"cannot detach /dev/{name}") from e


# -- the file system ----------------------------------------------------------------------------


def _run(args: list[str], path: str, ok: tuple[int, ...] = (0,)) -> None:
    try:
        done = subprocess.run(args, capture_output=True, text=True, check=False)
    except FileNotFoundError as e:
        raise OSError(errno.ENOENT, f"{args[0]} not found (install e2fsprogs)", args[0]) from e
    if done.returncode not in ok:
        raise OSError(errno.EIO, f"{args[0]} failed: {done.stderr.strip()}", path)


def _mkfs(image: str) -> None:
    _run(
        [
            "mkfs.ext4", "-q", "-F",
            "-b", str(_BLOCK), "-I", "256", "-i", "16384", "-J", "size=32",
            # No blocks reserved for root: the reservation pyhcs sets applies to everyone.
            "-m", "0",
            # The file is fresh and sparse, so it reads as zeros: nothing needs zeroing or
            # discarding, and the kernel has no inode tables to initialise in the background.
            "-E", "lazy_itable_init=1,lazy_journal_init=1,nodiscard,assume_storage_prezeroed=1",
            image,
        ],
        image,
    )


def _read_size(folder: str) -> int:
    with open(os.path.join(folder, SIZE_FILE)) as f:
        return int(f.read().strip())


def _write_size(folder: str, size: int) -> None:
    path = os.path.join(folder, SIZE_FILE)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(f"{size}\n")
    os.replace(tmp, path)


def _mount_volume(folder: str, layer_id: str, op: str) -> None:
    image = os.path.join(folder, IMAGE)
    scratch = os.path.join(folder, SCRATCH_DIR)
    try:
        if not os.path.ismount(scratch):
            bound = _loopdev.backing_devices(image)
            if bound:
                # Still bound (its file system may live on in another mount namespace):
                # mounting that device again gives the same file system; a second device
                # on the same image would give a second, corrupting one.
                _mount_device(f"/dev/{bound[0]}", scratch)
            else:
                with _loopdev.attach(image) as dev:
                    _mount_device(dev, scratch)
        for name, mode in ((_UPPER, 0o755), (_WORK, 0o700)):
            path = os.path.join(scratch, name)
            if not os.path.isdir(path):
                os.mkdir(path, mode)
                os.chmod(path, mode)  # the upper root is the container's "/": not umask's
        _limit(scratch, _read_size(folder))
    except (OSError, ValueError) as e:
        with contextlib.suppress(OSError):
            if os.path.ismount(scratch):
                umount(scratch)
        raise LayerError(
            layer_id, op, None, str(e), message="cannot mount the sandbox's file system"
        ) from e


def _mount_device(dev: str, scratch: str) -> None:
    # nosuid,nodev: the host-side path needs neither (containers see the files through the
    # overlay, whose own mount decides); discard returns deleted blocks to the host.
    mount(dev, scratch, "ext4", MS_NOSUID | MS_NODEV, "discard")


def _device(scratch: str) -> str:
    dev = _loopdev.device_of_mount(scratch)
    if dev is None:
        raise OSError(errno.ENXIO, "the sandbox's file system is not on a loop device", scratch)
    return dev


def _limit(scratch: str, size: int) -> None:
    """Let writers on the mounted file system at *scratch* use *size* bytes in total."""
    st = os.statvfs(scratch)
    blocks = st.f_blocks  # the file system's size less its own metadata
    # Never below ext4's own default (2%, at most 4096 clusters), which keeps room for the
    # allocations it must make even when full (converting unwritten extents).
    reserve = max(blocks - -(-size // st.f_frsize), min(blocks // 50, 4096))
    with open(f"/sys/fs/ext4/{_device(scratch)}/reserved_clusters", "w") as f:
        f.write(str(reserve))


def _fs_size(path: str) -> int:
    """The size in bytes of the ext4 in *path* (image or device), from its superblock; for
    a mounted device, as the kernel holds it (the device's cache is the superblock buffer)."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        sb = os.pread(fd, 1024, 1024)
    finally:
        os.close(fd)
    if len(sb) < 0x154 or struct.unpack_from("<H", sb, 0x38)[0] != _EXT4_MAGIC:
        raise OSError(errno.EUCLEAN, "not an ext4 file system", path)
    lo: int = struct.unpack_from("<I", sb, 0x4)[0]
    log_size: int = struct.unpack_from("<I", sb, 0x18)[0]
    incompat: int = struct.unpack_from("<I", sb, 0x60)[0]
    hi: int = struct.unpack_from("<I", sb, 0x150)[0]
    count = lo | (hi << 32 if incompat & _INCOMPAT_64BIT else 0)
    return count * (1024 << log_size)


def _grow_mounted(image: str, scratch: str, fs_bytes: int) -> None:
    """Grow the image, its loop device and the mounted file system to *fs_bytes*."""
    old = os.stat(image).st_size
    dev = _device(scratch)
    if fs_bytes > old:
        os.truncate(image, fs_bytes)
        _loopdev.refresh_capacity(dev)
    fd = os.open(scratch, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        fcntl.ioctl(fd, _EXT4_IOC_RESIZE_FS, struct.pack("<Q", fs_bytes // _BLOCK))
    except OSError as e:
        if e.errno == errno.EPERM and fs_bytes > old:
            # Refused before it began (no CAP_SYS_RESOURCE): nothing grew, undo the file.
            os.truncate(image, old)
            _loopdev.refresh_capacity(dev)
        raise
    finally:
        os.close(fd)


def _grow_offline(image: str, fs_bytes: int) -> None:
    """Grow the unmounted image and its file system to *fs_bytes* (no capability needed)."""
    if fs_bytes > os.stat(image).st_size:
        os.truncate(image, fs_bytes)
    # resize2fs insists on a freshly checked file system; -p repairs nothing unsafe.
    _run(["e2fsck", "-f", "-p", image], image, ok=(0, 1))
    _run(["resize2fs", image, f"{fs_bytes // 1024}K"], image)


# -- public API ---------------------------------------------------------------------------------


def _sandbox_folder(
    info: _store.DriverInfo, layer_id: str, op: str, roots: Roots | None
) -> str:
    row = _store._require(_store._registry(roots), layer_id, op)
    if row["kind"] != _store._KIND_SANDBOX:
        raise _store._invalid_state(layer_id, op, "only a sandbox layer has a size")
    folder = str(row["path"])
    if not is_sized(folder):
        raise NotSupportedError(
            op,
            extra_info=layer_id,
            message="this sandbox has no size of its own (diff flavour, or created before "
            "sandbox sizes existed)",
        )
    return folder


def get_sandbox_size(
    info: _store.DriverInfo, layer_id: str, *, roots: Roots | None = None
) -> int:
    """The size in bytes of sandbox *layer_id*: what its container can write in total.

    Raises :class:`LayerError` (``ERR_ELEMENT_NOT_FOUND``;
    ``ERR_VMCOMPUTE_OPERATION_INVALID_STATE`` for a layer that is not a sandbox),
    :class:`NotSupportedError` for an unsized sandbox.
    """
    op = "GetSandboxSize"
    folder = _sandbox_folder(info, layer_id, op, roots)
    try:
        return _read_size(folder)
    except (OSError, ValueError) as e:
        raise LayerError(layer_id, op, None, str(e), message="cannot read the size") from e


def expand_sandbox_size(
    info: _store.DriverInfo, layer_id: str, size: int, *, roots: Roots | None = None
) -> None:
    """hcsshim's ``ExpandSandboxSize``: grow sandbox *layer_id* to at least *size* bytes.

    Works while the sandbox is prepared (its container running): the container can use
    the new space at once. A *size* at or below the current size changes nothing (the
    sandbox already has at least that much); sizes are rounded up to a MiB. Never shrinks.
    Up to 4x the size the sandbox was last grown from (at least 64 GiB) this is instant;
    beyond, the file system itself grows, which while prepared needs ``CAP_SYS_RESOURCE``.

    Raises :class:`InvalidConfigError` for a negative or non-integer size,
    :class:`LayerError` (``ERR_ELEMENT_NOT_FOUND``; ``ERR_VMCOMPUTE_OPERATION_INVALID_STATE``
    for a layer that is not a sandbox; no code if the host cannot hold a file that large or
    the file system cannot grow: the size is then unchanged), :class:`NotSupportedError`
    for an unsized sandbox.
    """
    op = "ExpandSandboxSize"
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise InvalidConfigError(
            op, extra_info=f"size {size!r}", message="must be a byte count >= 0"
        )
    folder = _sandbox_folder(info, layer_id, op, roots)
    image = os.path.join(folder, IMAGE)
    scratch = os.path.join(folder, SCRATCH_DIR)
    want = _round_up(size)
    with _store._locked(folder, layer_id, op):
        try:
            if want <= _read_size(folder):
                return
            mounted = os.path.ismount(scratch)
            on = f"/dev/{_device(scratch)}" if mounted else image
            if want > _usable(_fs_size(on)):
                target = max(_fs_bytes(want), os.stat(image).st_size)
                if mounted:
                    _grow_mounted(image, scratch, target)
                else:
                    _grow_offline(image, target)
            # Recorded once the file system has the room; then handed to the writers.
            _write_size(folder, want)
            if mounted:
                _limit(scratch, want)
        except (OSError, ValueError) as e:
            hint = ""
            if isinstance(e, OSError) and e.errno == errno.EPERM:
                hint = " (growing a mounted file system needs CAP_SYS_RESOURCE)"
            raise LayerError(
                layer_id, op, None, str(e), message=f"cannot grow the sandbox to {want} bytes{hint}"
            ) from e
