"""The layer store: hcsshim's layer functions over overlayfs (see the package docstring)."""

from __future__ import annotations

import atexit
import collections
import contextlib
import errno
import fcntl
import json
import os
import re
import sqlite3
import stat
import tempfile
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import IO, TYPE_CHECKING, BinaryIO

from pyhcs._errors import (
    ERR_ALREADY_EXISTS,
    ERR_ELEMENT_NOT_FOUND,
    ERR_VMCOMPUTE_OPERATION_INVALID_STATE,
    ErrorCode,
    InvalidConfigError,
    LayerError,
    NotSupportedError,
)
from pyhcs._guid import GUID, name_to_guid
from pyhcs._layers import _sandbox_size  # sandbox size hooks (module import: it imports us)
from pyhcs._layers._extract import DEFAULT_MAX_SIZE, ArchiveError, ExtractResult, extract_tar
from pyhcs._layers._fsops import (
    copy_chain,
    mounts_under,
    open_dir,
    remove_tree,
    rename_noreplace,
)
from pyhcs._layers._overlay import VOLATILE_MARKER, mount_overlay
from pyhcs._linux import umount, user_namespace
from pyhcs._paths import Roots
from pyhcs._registry import Registry

if TYPE_CHECKING:
    from pyhcs._runtime._spec import UserNamespace

__all__ = [
    "DIFF_DRIVER",
    "FILTER_DRIVER",
    "DriverInfo",
    "LayerDescriptor",
    "activate_layer",
    "create_layer",
    "create_sandbox_layer",
    "deactivate_layer",
    "destroy_layer",
    "get_layer_mount_path",
    "get_shared_base_images",
    "import_layer_from_tar",
    "layer_exists",
    "layer_paths_to_descriptors",
    "prepare_layer",
    "process_base_layer",
    "process_utility_vm_image",
    "unprepare_layer",
]

#: ``DriverInfo.flavour``: every layer a full copy, no overlay (hcsshim's DiffDriver).
DIFF_DRIVER = 0
#: ``DriverInfo.flavour``: layers stacked with overlayfs (hcsshim's FilterDriver).
FILTER_DRIVER = 1

# Folder names inside a layer folder.
FS_DIR = "fs"
UPPER_DIR = "upper"
WORK_DIR = "work"
ROOTFS_DIR = "rootfs"
_ACTIVATIONS = ".activations"
_DIFF_POPULATED = ".diff-populated"
_DIFF_TMP = ".rootfs-tmp"

_STATE_READY = "ready"
_STATE_PREPARED = "prepared"
_KIND_BASE = "base"
_KIND_LAYER = "layer"
_KIND_SANDBOX = "sandbox"

# Ids become folder names and appear in overlay mount options: a conservative charset keeps
# them from meaning anything else (no '/', no leading '.', no ',' or ':').
_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
# overlayfs splits its options on ',' and lowerdir on ':'; rather than escape, refuse them.
_OVERLAY_UNSAFE = re.compile(r"[,:\\\n]")
# overlayfs's own limit on lower layers (OVL_MAX_STACK).
_MAX_LOWERS = 500


def _default_home() -> str:
    return str(Roots.resolve().layers_dir)


@dataclass(frozen=True, slots=True)
class DriverInfo:
    """hcsshim's ``DriverInfo``: which graph driver flavour, and the folder layers live in.

    ``flavour`` is :data:`DIFF_DRIVER` (0: full copies, no overlay) or :data:`FILTER_DRIVER`
    (1: overlayfs, the default). ``home_dir`` defaults to the state root's ``layers``
    folder (``$PYHCS_ROOT/layers``, ``/var/lib/pyhcs/layers``) and is made absolute.
    The registry used by the layer functions is the one of ``Roots.resolve()`` (or of the
    ``roots=`` keyword they all accept); ids are unique per registry.
    """

    flavour: int = FILTER_DRIVER
    home_dir: str = field(default_factory=_default_home)

    def __post_init__(self) -> None:
        if self.flavour not in (DIFF_DRIVER, FILTER_DRIVER):
            raise InvalidConfigError(
                "DriverInfo",
                extra_info=f"flavour {self.flavour!r}",
                message="flavour must be 0 (diff) or 1 (filter)",
            )
        if not self.home_dir:
            raise InvalidConfigError("DriverInfo", message="home_dir must not be empty")
        object.__setattr__(self, "home_dir", os.path.abspath(os.fspath(self.home_dir)))


@dataclass(frozen=True, slots=True)
class LayerDescriptor:
    """hcsshim's ``WC_LAYER_DESCRIPTOR``: a parent layer's GUID, flags and folder path.

    ``layer_id`` is ``name_to_guid`` of the folder's name, as hcsshim derives it; ``flags``
    is 0 (hcsshim's only other bit, ``Dirty``, marks snapshots, which pyhcs does not make).
    """

    layer_id: GUID
    flags: int
    path: str


def layer_paths_to_descriptors(parent_layer_paths: Sequence[str]) -> list[LayerDescriptor]:
    """One :class:`LayerDescriptor` per parent layer path, in the order given."""
    out = []
    for p in parent_layer_paths:
        folder = _layer_folder(p)
        out.append(LayerDescriptor(name_to_guid(os.path.basename(folder)), 0, p))
    return out


# -- plumbing ---------------------------------------------------------------------------------


def _roots(roots: Roots | None) -> Roots:
    return roots if roots is not None else Roots.resolve()


def _registry(roots: Roots | None) -> Registry:
    return Registry.open(_roots(roots).db_path)


def _check_id(layer_id: str, op: str) -> None:
    if not isinstance(layer_id, str) or not _ID_RE.fullmatch(layer_id):
        raise InvalidConfigError(
            op,
            extra_info=f"id {layer_id!r}",
            message="a layer id is 1-128 characters of [A-Za-z0-9_.-], starting with a letter "
            "or digit",
        )


def _row(reg: Registry, layer_id: str) -> sqlite3.Row | None:
    return reg.query_one("SELECT * FROM layers WHERE id = ?", (layer_id,))


def _require(reg: Registry, layer_id: str, op: str) -> sqlite3.Row:
    _check_id(layer_id, op)
    row = _row(reg, layer_id)
    if row is None:
        raise LayerError(layer_id, op, ERR_ELEMENT_NOT_FOUND, message="no such layer")
    return row


def _os_error(layer_id: str, op: str, e: OSError, what: str) -> LayerError:
    code: ErrorCode | None = None
    if e.errno == errno.ENOENT:
        code = ERR_ELEMENT_NOT_FOUND
    elif e.errno == errno.EEXIST:
        code = ERR_ALREADY_EXISTS
    elif e.errno == errno.EBUSY:
        code = ERR_VMCOMPUTE_OPERATION_INVALID_STATE
    return LayerError(layer_id, op, code, str(e), message=what)


def _invalid_state(layer_id: str, op: str, why: str) -> LayerError:
    return LayerError(layer_id, op, ERR_VMCOMPUTE_OPERATION_INVALID_STATE, message=why)


@contextlib.contextmanager
def _locked(folder: str, layer_id: str, op: str) -> Iterator[int]:
    """Hold an exclusive lock on the layer folder, serialising prepare/unprepare/destroy
    across processes (flock on the directory itself, through the fd yielded; released if
    the holder dies)."""
    try:
        fd = open_dir(folder)
    except OSError as e:
        raise _os_error(layer_id, op, e, "the layer's folder is missing") from e
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield fd
    finally:
        os.close(fd)


def _ensure_home(home: str, layer_id: str, op: str) -> None:
    try:
        # 0700: layers hold setuid binaries and device-free but otherwise arbitrary content
        # that unprivileged users have no business reaching from the host.
        os.makedirs(home, 0o700, exist_ok=True)
    except OSError as e:
        raise _os_error(layer_id, op, e, f"cannot create the layer home {home!r}") from e


# Temporary folders this process is filling, each with an fd holding a flock on it: the
# lock tells recovery (in another process) that the folder's owner is alive.
_TEMP_LOCKS: dict[str, int] = {}


def _hold(path: str) -> None:
    fd = open_dir(path)
    fcntl.flock(fd, fcntl.LOCK_EX)
    _TEMP_LOCKS[path] = fd


def _release(path: str) -> None:
    fd = _TEMP_LOCKS.pop(path, None)
    if fd is not None:
        os.close(fd)


def _discard(path: str) -> None:
    _release(path)
    with contextlib.suppress(OSError):
        remove_tree(path)


def _recover(home: str) -> None:
    """Remove the ``.tmp-*`` / ``.trash-*`` folders of operations whose process died (killed
    mid-import, mid-create or mid-destroy): nobody holds their lock any more."""
    try:
        names = [n for n in os.listdir(home) if n.startswith((".tmp-", ".trash-"))]
    except OSError:
        return
    for name in names:
        path = os.path.join(home, name)
        if path in _TEMP_LOCKS:
            continue
        try:
            fd = open_dir(path)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            continue  # its owner is alive
        try:
            with contextlib.suppress(OSError):
                remove_tree(path)
        finally:
            os.close(fd)


# A layer folder is renamed into place before its registry row is written; until the row is
# committed it holds this (empty) file, and the publishing process holds the flock it held
# on the temporary folder. A folder with the file, no row and no lock is a layer whose
# publisher died in between: recovery removes it.
_UNPUBLISHED = ".unpublished"
# (database, home) pairs whose orphans this process has looked for: once per process.
_ORPHAN_SCANS: set[tuple[str, str]] = set()


def _recover_orphans(reg: Registry, home: str) -> None:
    """Remove, once per process and home, the layer folders of publishers that died between
    renaming the folder into place and registering it (see :func:`_reclaim_orphan`)."""
    key = (str(reg.path), home)
    if key in _ORPHAN_SCANS:
        return
    try:
        names = os.listdir(home)
    except OSError:
        return
    _ORPHAN_SCANS.add(key)
    registered = {r["path"] for r in reg.query("SELECT path FROM layers")}
    for name in names:
        folder = os.path.join(home, name)
        if _ID_RE.fullmatch(name) and folder not in registered:
            _reclaim_orphan(reg, folder)


def _reclaim_orphan(reg: Registry, folder: str) -> bool:
    """Remove *folder* if it is certainly an unpublished layer of a dead pyhcs process: it
    holds the ``.unpublished`` file, nobody holds its lock, and no registry row names it.
    Anything else (a registered layer, a live publisher's folder, a folder pyhcs did not
    make) is left alone. Returns True if it was removed."""
    marker = os.path.join(folder, _UNPUBLISHED)
    if folder in _TEMP_LOCKS or not _is_marker(marker):
        return False
    try:
        fd = open_dir(folder)
    except OSError:
        return False
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return False  # its publisher is alive
        # Checked again under the lock: a live publisher removes the file before unlocking.
        if not _is_marker(marker):
            return False
        layer_id = os.path.basename(folder)
        row = _row(reg, layer_id)
        if row is not None and os.path.realpath(row["path"]) == os.path.realpath(folder):
            # Killed after its row was written: a real layer; only the file is stale.
            with contextlib.suppress(OSError):
                os.unlink(marker)
            return False
        if mounts_under(folder):
            return False
        # Renamed aside first (the id is free at once); a .trash-* folder nobody holds is
        # removed by the next recovery if this one dies before it finishes.
        trash = os.path.join(
            os.path.dirname(folder), f".trash-{layer_id}-orphan-{os.urandom(6).hex()}"
        )
        try:
            rename_noreplace(folder, trash)
        except OSError:
            return False
        with contextlib.suppress(OSError):
            remove_tree(trash)
        return True
    finally:
        os.close(fd)


def _is_marker(path: str) -> bool:
    try:
        return stat.S_ISREG(os.lstat(path).st_mode)
    except OSError:
        return False


def _new_temp(home: str, label: str, layer_id: str, op: str) -> str:
    """A fresh ``<home>/.tmp-<label>-<random>`` folder, locked by this process until
    :func:`_publish` or :func:`_discard`; stale ones of dead processes are removed first."""
    _ensure_home(home, layer_id, op)
    _recover(home)
    try:
        # Made under another name and locked before it is renamed to .tmp-*: recovery
        # never sees a .tmp-* folder that is not locked by a live process.
        new = tempfile.mkdtemp(prefix=f".new-{label}-", dir=home)
        _hold(new)
        path = os.path.join(home, ".tmp-" + os.path.basename(new)[len(".new-") :])
        os.rename(new, path)
        _TEMP_LOCKS[path] = _TEMP_LOCKS.pop(new)
        return path
    except OSError as e:
        raise _os_error(layer_id, op, e, "cannot create a temporary folder") from e


def _layer_folder(path: str) -> str:
    """The layer folder *path* names: the folder itself, or its ``fs`` content folder
    (what :func:`get_layer_mount_path` returns for a read-only layer)."""
    p = os.path.abspath(os.fspath(path))
    if os.path.basename(p) == FS_DIR and not os.path.isdir(os.path.join(p, FS_DIR)):
        return os.path.dirname(p)
    return p


def _check_parent_paths(paths: Sequence[str], layer_id: str, op: str) -> list[str]:
    if isinstance(paths, str):
        raise InvalidConfigError(op, message="parent_layer_paths must be a list of paths")
    out = []
    for p in paths:
        folder = _layer_folder(p)
        if not os.path.isdir(os.path.join(folder, FS_DIR)):
            raise LayerError(
                layer_id,
                op,
                ERR_ELEMENT_NOT_FOUND,
                f"parent {p!r}",
                message="a parent layer path is not a layer folder (no fs/ inside)",
            )
        out.append(folder)
    return out


def _publish(
    reg: Registry,
    tmp: str,
    folder: str,
    *,
    layer_id: str,
    op: str,
    parent: str | None,
    kind: str,
    flavour: int,
    digest: str | None = None,
    size: int = 0,
) -> None:
    """Move the finished *tmp* folder to *folder* and register it; undo the move if the
    registry refuses. Until this returns, no one can see the layer.

    Between the move and the registry row, the folder holds ``.unpublished`` and stays
    locked, so that if this process dies there, recovery knows the folder is an orphan."""
    try:
        os.close(os.open(os.path.join(tmp, _UNPUBLISHED),
                         os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                         0o600))
        _recover_orphans(reg, os.path.dirname(folder))
        try:
            rename_noreplace(tmp, folder)
        except FileExistsError:
            if not _reclaim_orphan(reg, folder):
                raise
            rename_noreplace(tmp, folder)
        lock = _TEMP_LOCKS.pop(tmp, None)
        if lock is not None:
            _TEMP_LOCKS[folder] = lock  # the flock is on the directory: it moved with it
    except FileExistsError as e:
        _discard(tmp)
        raise LayerError(
            layer_id, op, ERR_ALREADY_EXISTS, folder, message="the layer's folder already exists"
        ) from e
    except OSError as e:
        _discard(tmp)
        raise _os_error(layer_id, op, e, "cannot move the layer into place") from e
    try:
        reg.execute(
            "INSERT INTO layers (id, parent, kind, path, flavour, state, digest, size, created)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (layer_id, parent, kind, folder, flavour, _STATE_READY, digest, size, reg.now()),
        )
    except sqlite3.IntegrityError as e:
        _discard(folder)
        raise LayerError(layer_id, op, ERR_ALREADY_EXISTS, message="layer already exists") from e
    except BaseException:
        _discard(folder)
        raise
    with contextlib.suppress(OSError):
        os.unlink(os.path.join(folder, _UNPUBLISHED))
    _release(folder)


def _check_absent(reg: Registry, folder: str, layer_id: str, op: str) -> None:
    if _row(reg, layer_id) is not None:
        raise LayerError(layer_id, op, ERR_ALREADY_EXISTS, message="layer already exists")
    _recover_orphans(reg, os.path.dirname(folder))
    if os.path.lexists(folder) and not _reclaim_orphan(reg, folder):
        raise LayerError(
            layer_id,
            op,
            ERR_ALREADY_EXISTS,
            folder,
            message="a folder with this id exists but is not registered "
            "(left by an interrupted operation?); destroy_layer removes it",
        )


_Source = BinaryIO | IO[bytes] | str | os.PathLike[str]


def _open_source(tar: _Source) -> contextlib.AbstractContextManager[IO[bytes]]:
    if isinstance(tar, (str, os.PathLike)):
        return open(tar, "rb")
    return contextlib.nullcontext(tar)


def _extract_to_temp(
    home: str,
    label: str,
    tar: BinaryIO | IO[bytes] | str | os.PathLike[str],
    max_size: int,
    layer_id: str,
    op: str,
) -> tuple[str, ExtractResult]:
    """Extract *tar* into a fresh ``<home>/.tmp-<label>-<random>/fs``; on any failure the
    temporary folder is removed and a LayerError raised."""
    if max_size < 0:
        raise InvalidConfigError(op, extra_info=f"max_size {max_size}", message="must be >= 0")
    tmp = _new_temp(home, label, layer_id, op)
    try:
        fs = os.path.join(tmp, FS_DIR)
        os.mkdir(fs)
        os.chmod(fs, 0o755)  # the layer root's mode unless the archive sets it ("./")
        try:
            source = _open_source(tar)
        except OSError as e:
            raise LayerError(layer_id, op, None, str(e), message="cannot open the archive") from e
        with source as src:
            result = extract_tar(src, fs, max_size=max_size)
        return tmp, result
    except ArchiveError as e:
        _discard(tmp)
        raise LayerError(layer_id, op, None, message=f"refused archive: {e}") from e
    except OSError as e:
        _discard(tmp)
        raise _os_error(layer_id, op, e, "extraction failed") from e
    except BaseException:
        _discard(tmp)
        raise


# -- hcsshim's layer functions ------------------------------------------------------------------


def import_layer_from_tar(
    info: DriverInfo,
    layer_id: str,
    tar: BinaryIO | IO[bytes] | str | os.PathLike[str],
    parent_layer_paths: Sequence[str] = (),
    *,
    max_size: int = DEFAULT_MAX_SIZE,
    roots: Roots | None = None,
    expected_digest: str | None = None,
) -> str:
    """Import an OCI layer tar (plain, gzip, zstd, bzip2 or xz; detected by magic) as *layer_id*.

    *tar* is a readable binary stream (read once, to its end, never seeked) or a path.
    *parent_layer_paths* are the folders of the layers below, direct parent first; the
    layer records the first as its parent and is a base layer when there is none.
    The archive is extracted safely (see :mod:`pyhcs._layers._extract`) into a temporary
    folder that becomes ``<home_dir>/<layer_id>`` only when everything succeeded; the
    registry row is written last. *max_size* bounds the uncompressed archive's length.
    With *expected_digest* (``sha256:<hex>`` or hex) the archive's bytes must have that
    sha256, else nothing is imported.

    Returns the layer's folder. Raises :class:`LayerError`: ``ERR_ALREADY_EXISTS`` if the id
    is taken, no code for a refused archive (nothing is left behind), a parent that is not
    a layer folder is ``ERR_ELEMENT_NOT_FOUND``.
    """
    op = "ImportLayer"
    _check_id(layer_id, op)
    parents = _check_parent_paths(parent_layer_paths, layer_id, op)
    reg = _registry(roots)
    parent = os.path.basename(parents[0]) if parents else None
    if parent is not None and _row(reg, parent) is None:
        # The registry's parent links must name real layers: images, pruning and
        # destroy_layer's "something is built on it" check follow them.
        raise LayerError(
            layer_id,
            op,
            ERR_ELEMENT_NOT_FOUND,
            f"parent {parents[0]!r}",
            message="the direct parent is not a registered layer",
        )
    folder = os.path.join(info.home_dir, layer_id)
    _check_absent(reg, folder, layer_id, op)
    tmp, result = _extract_to_temp(info.home_dir, layer_id, tar, max_size, layer_id, op)
    if expected_digest is not None and expected_digest.removeprefix("sha256:") != result.digest:
        _discard(tmp)
        raise LayerError(
            layer_id,
            op,
            None,
            f"sha256:{result.digest}",
            message=f"the archive's digest is not the expected {expected_digest}",
        )
    _publish(
        reg,
        tmp,
        folder,
        layer_id=layer_id,
        op=op,
        parent=parent,
        kind=_KIND_LAYER if parents else _KIND_BASE,
        flavour=info.flavour,
        digest=result.digest,
        size=result.size,
    )
    return folder


def layer_exists(info: DriverInfo, id: str, *, roots: Roots | None = None) -> bool:
    """True if a layer *id* is registered and its folder is present."""
    _check_id(id, "LayerExists")
    row = _row(_registry(roots), id)
    return row is not None and os.path.isdir(row["path"])


def create_layer(info: DriverInfo, id: str, parent: str, *, roots: Roots | None = None) -> None:
    """Create an empty read-only layer *id* on top of *parent* (``""``: a base layer).

    The parent, if named, must exist. Raises :class:`LayerError` (``ERR_ALREADY_EXISTS``,
    ``ERR_ELEMENT_NOT_FOUND`` for a missing parent).
    """
    op = "CreateLayer"
    _check_id(id, op)
    reg = _registry(roots)
    if parent:
        _require(reg, parent, op)
    folder = os.path.join(info.home_dir, id)
    _check_absent(reg, folder, id, op)
    tmp = _new_temp(info.home_dir, id, id, op)
    try:
        os.mkdir(os.path.join(tmp, FS_DIR))
        os.chmod(os.path.join(tmp, FS_DIR), 0o755)
    except OSError as e:
        _discard(tmp)
        raise _os_error(id, op, e, "cannot create the layer") from e
    _publish(
        reg,
        tmp,
        folder,
        layer_id=id,
        op=op,
        parent=parent or None,
        kind=_KIND_LAYER if parent else _KIND_BASE,
        flavour=info.flavour,
    )


def create_sandbox_layer(
    info: DriverInfo,
    layer_id: str,
    parent_id: str,
    parent_layer_paths: Sequence[str],
    *,
    roots: Roots | None = None,
    size_bytes: int | None = None,
) -> None:
    """Create the read-write (sandbox) layer *layer_id* for a container.

    *parent_id* is the direct parent (``""`` for none) and *parent_layer_paths* the folders
    of all parent layers, direct parent first: when both are given the first path must be
    the parent's folder. The sandbox gets ``upper/`` and ``work/`` (overlay's upper and work
    directories) and ``rootfs/``, where :func:`prepare_layer` makes the container's root.
    Its flavour is ``info.flavour`` and stays fixed. Raises :class:`LayerError`.

    Filter flavour: the container can write *size_bytes* in total (None or 0: the default,
    20 GiB; at least 32 MiB); see :mod:`pyhcs._layers._sandbox_size`. A size for a diff
    flavour sandbox raises :class:`NotSupportedError`.
    """
    op = "CreateSandboxLayer"
    _check_id(layer_id, op)
    # -- sandbox size hook: validate before anything is made.
    if info.flavour == DIFF_DRIVER and size_bytes:
        raise NotSupportedError(op, extra_info=layer_id, message="a diff sandbox has no size")
    size = _sandbox_size.resolve_size(size_bytes, op)
    reg = _registry(roots)
    parents = _check_parent_paths(parent_layer_paths, layer_id, op)
    if parent_id:
        prow = _require(reg, parent_id, op)
        if parents and os.path.realpath(parents[0]) != os.path.realpath(prow["path"]):
            raise InvalidConfigError(
                op,
                extra_info=f"{parents[0]!r} is not {prow['path']!r}",
                message="the first parent layer path must be the folder of parent_id",
            )
    folder = os.path.join(info.home_dir, layer_id)
    _check_absent(reg, folder, layer_id, op)
    tmp = _new_temp(info.home_dir, layer_id, layer_id, op)
    try:
        for name, mode in (
            (FS_DIR, 0o755),
            (UPPER_DIR, 0o755),
            (WORK_DIR, 0o700),
            (ROOTFS_DIR, 0o755),
        ):
            os.mkdir(os.path.join(tmp, name), mode)
            # The upper root becomes the container's "/": its mode must not depend on umask.
            os.chmod(os.path.join(tmp, name), mode)
        if info.flavour == FILTER_DRIVER and size:
            _sandbox_size.create_volume(tmp, size)  # sandbox size hook: the sized image
    except OSError as e:
        _discard(tmp)
        raise _os_error(layer_id, op, e, "cannot create the sandbox") from e
    _publish(
        reg,
        tmp,
        folder,
        layer_id=layer_id,
        op=op,
        parent=parent_id or None,
        kind=_KIND_SANDBOX,
        flavour=info.flavour,
    )


def _is_mounted(path: str) -> bool:
    # An overlay mount point has its own device number, so the stat-based check is exact
    # for what pyhcs mounts there, and far cheaper than parsing /proc/self/mountinfo.
    return os.path.ismount(path)


def _prepared(row: sqlite3.Row) -> bool:
    rootfs = os.path.join(row["path"], ROOTFS_DIR)
    return bool(row["state"] == _STATE_PREPARED or _is_mounted(rootfs))


def prepare_layer(
    info: DriverInfo,
    layer_id: str,
    parent_layer_paths: Sequence[str],
    *,
    roots: Roots | None = None,
    userns: UserNamespace | None = None,
) -> None:
    """Make the sandbox *layer_id* usable as a file system at its ``rootfs/``.

    Filter flavour: mount overlayfs there with the parents' ``fs/`` folders as lowerdirs
    (in the order given: direct parent first, base last) and the sandbox's ``upper/`` and
    ``work/``; the mount is made in the caller's mount namespace. Diff flavour: the first
    prepare copies the whole chain, whiteouts applied, into ``rootfs/``, which then *is* the
    sandbox's content; later prepares keep it. Undo with :func:`unprepare_layer`.

    With *userns* (pyhcs's own; filter flavour), the rootfs is for a container in that
    user namespace: the parents are seen through id-mapped mounts (a file stored as owned
    by 0 reads as owned by the host id the namespace's root maps to), and the upper's root
    is given to the namespace's root. Files the container writes are stored with their
    host ids, so such a sandbox is prepared again with the same mappings (Linux >= 6.13).

    Raises :class:`LayerError`: ``ERR_VMCOMPUTE_OPERATION_INVALID_STATE`` if the layer is
    not a sandbox, is already prepared, or was created for the other flavour;
    :class:`NotSupportedError` for *userns* with the diff flavour or on an older kernel.
    """
    op = "PrepareLayer"
    if userns is not None and info.flavour != FILTER_DRIVER:
        raise NotSupportedError(
            op, extra_info=layer_id, message="a user namespace needs the filter flavour")
    reg = _registry(roots)
    row = _require(reg, layer_id, op)
    if row["kind"] != _KIND_SANDBOX:
        raise _invalid_state(layer_id, op, "only a sandbox layer can be prepared")
    if row["flavour"] != info.flavour:
        raise _invalid_state(
            layer_id,
            op,
            f"the sandbox was created for flavour {row['flavour']}, not {info.flavour}",
        )
    parents = _check_parent_paths(parent_layer_paths, layer_id, op)
    folder = row["path"]
    for p in parents:
        if os.path.realpath(p) == os.path.realpath(folder):
            raise InvalidConfigError(op, message="a sandbox cannot be its own parent")
    with _locked(folder, layer_id, op):
        row = _require(reg, layer_id, op)
        if _prepared(row):
            raise _invalid_state(
                layer_id,
                op,
                "the layer is already prepared (if a reboot unmounted it, unprepare_layer "
                "clears the stale state)",
            )
        if info.flavour == FILTER_DRIVER:
            # sandbox size hook: upper/work live on the sandbox's own file system.
            with _sandbox_size.volume_for_overlay(folder, layer_id, op):
                _mount_overlay(folder, parents, layer_id, op, userns)
        else:
            _populate_diff(folder, parents, layer_id, op)
        try:
            reg.execute("UPDATE layers SET state = ? WHERE id = ?", (_STATE_PREPARED, layer_id))
        except BaseException:
            if info.flavour == FILTER_DRIVER:
                umount(os.path.join(folder, ROOTFS_DIR))
                _sandbox_size.unmount_volume(folder, layer_id, op)  # sandbox size hook
            raise


def _mount_overlay(folder: str, parents: list[str], layer_id: str, op: str,
                   userns: UserNamespace | None = None) -> None:
    lowers = [os.path.join(p, FS_DIR) for p in parents] or [os.path.join(folder, FS_DIR)]
    upper = os.path.join(folder, UPPER_DIR)
    work = os.path.join(folder, WORK_DIR)
    target = os.path.join(folder, ROOTFS_DIR)
    for p in (*lowers, upper, work):
        if _OVERLAY_UNSAFE.search(p):
            raise InvalidConfigError(
                op, extra_info=p, message="overlayfs cannot take a path with ',', ':' or '\\'"
            )
    if len(lowers) > _MAX_LOWERS:
        raise LayerError(
            layer_id,
            op,
            None,
            f"{len(parents)} parents",
            message=f"overlayfs stacks at most {_MAX_LOWERS} parent layers",
        )
    try:
        _clear_volatile_marker(work)
        if userns is None:
            # Chains whose options exceed a page are mounted through the new mount API.
            # Volatile: no syncs (see _overlay); a sandbox is a container's scratch space.
            mount_overlay(lowers, upper, work, target, volatile=True)
            return
        _mount_overlay_idmapped(lowers, upper, work, target, userns)
    except OSError as e:
        if userns is not None and e.errno in (errno.EINVAL, errno.ENOSYS):
            raise NotSupportedError(
                op, extra_info=layer_id,
                message=f"cannot mount id-mapped layers ({e.strerror}): a user namespace "
                "needs Linux >= 6.13 and layers on a file system that can be id-mapped",
            ) from e
        raise _os_error(layer_id, op, e, "cannot mount the overlay") from e


def _mount_overlay_idmapped(lowers: list[str], upper: str, work: str, target: str,
                            userns: UserNamespace) -> None:
    owner = userns.host_root()
    if owner is not None:  # the container's "/" is the upper's root: its root owns it
        os.chown(upper, *owner)
    ns = user_namespace(*userns.proc_maps())
    try:
        mount_overlay(lowers, upper, work, target, volatile=True, userns_fd=ns)
    finally:
        os.close(ns)


def _clear_volatile_marker(work: str) -> None:
    # Left by the sandbox's last volatile mount, overlayfs refuses to mount over it. It
    # lives in the work folder's own scratch folder, which overlayfs empties at every mount
    # anyway, so removing that folder is all it takes. Whether the last mount ended cleanly
    # or with a host crash, the upper folder keeps what reached the disk, as a non-volatile
    # mount would have kept of a container's unsynced writes.
    remove_tree(os.path.join(work, VOLATILE_MARKER[0]))


def _populate_diff(folder: str, parents: list[str], layer_id: str, op: str) -> None:
    marker = os.path.join(folder, _DIFF_POPULATED)
    if os.path.exists(marker):
        return
    tmp = os.path.join(folder, _DIFF_TMP)
    rootfs = os.path.join(folder, ROOTFS_DIR)
    try:
        if os.path.lexists(tmp):
            remove_tree(tmp)  # left by an interrupted prepare
        os.mkdir(tmp, 0o755)
        fd = open_dir(tmp)
        try:
            copy_chain([os.path.join(p, FS_DIR) for p in reversed(parents)], fd)
        finally:
            os.close(fd)
        # rootfs/ is an empty directory until now; rename replaces it in one step.
        os.rename(tmp, rootfs)
        with open(marker, "x"):
            pass
    except OSError as e:
        _discard(tmp)
        raise _os_error(layer_id, op, e, "cannot copy the parent layers") from e


def get_layer_mount_path(info: DriverInfo, id: str, *, roots: Roots | None = None) -> str:
    """Where the layer's files can be accessed.

    A sandbox: its ``rootfs/`` once prepared (``ERR_VMCOMPUTE_OPERATION_INVALID_STATE``
    before). A read-only layer: its content folder ``fs/``, which is also accepted wherever
    a parent layer path is expected.
    """
    op = "GetLayerMountPath"
    row = _require(_registry(roots), id, op)
    if row["kind"] != _KIND_SANDBOX:
        return os.path.join(row["path"], FS_DIR)
    rootfs = os.path.join(row["path"], ROOTFS_DIR)
    if row["state"] != _STATE_PREPARED:
        raise _invalid_state(id, op, "the sandbox is not prepared")
    if row["flavour"] == FILTER_DRIVER and not _is_mounted(rootfs):
        # Never hand out an empty mount point as a container's root.
        raise _invalid_state(
            id,
            op,
            "the sandbox is recorded as prepared but its overlay is not mounted in this "
            "mount namespace (stale after a reboot? unprepare_layer, then prepare_layer)",
        )
    return str(rootfs)


def unprepare_layer(info: DriverInfo, layer_id: str, *, roots: Roots | None = None) -> None:
    """Undo :func:`prepare_layer`: unmount the overlay at ``rootfs/`` (diff flavour: nothing
    to unmount; the copied content stays). Unpreparing an unprepared layer does nothing,
    which also clears a stale state left by a reboot. A busy mount raises
    :class:`LayerError` (``ERR_VMCOMPUTE_OPERATION_INVALID_STATE``) and stays prepared.
    """
    op = "UnprepareLayer"
    reg = _registry(roots)
    row = _require(reg, layer_id, op)
    folder = row["path"]
    with _locked(folder, layer_id, op):
        rootfs = os.path.join(folder, ROOTFS_DIR)
        if _is_mounted(rootfs):
            try:
                umount(rootfs)
            except OSError as e:
                if e.errno != errno.EINVAL:  # EINVAL: unmounted meanwhile
                    raise _os_error(layer_id, op, e, "cannot unmount the sandbox") from e
        _sandbox_size.unmount_volume(folder, layer_id, op)  # sandbox size hook
        reg.execute("UPDATE layers SET state = ? WHERE id = ?", (_STATE_READY, layer_id))


def destroy_layer(info: DriverInfo, id: str, *, roots: Roots | None = None) -> None:
    """Remove layer *id*: its folder and its registry row.

    Refused with :class:`LayerError` (``ERR_VMCOMPUTE_OPERATION_INVALID_STATE``, nothing
    changed) while the layer is prepared or anything is mounted inside its folder, while
    another layer has it as parent, or while an image names it as its top layer. A folder
    under ``info.home_dir`` without a registry row (left by a crash) is removed too.
    ``ERR_ELEMENT_NOT_FOUND`` if there is neither.
    """
    found = _destroy(info, id, "DestroyLayer", roots)
    if found is None:
        return
    trash, lock = found
    try:
        remove_tree(trash)
    except OSError as e:
        raise _os_error(id, "DestroyLayer", e,
                        f"the layer is gone but {trash!r} could not be removed") from e
    finally:
        os.close(lock)


def discard_sandbox(info: DriverInfo, id: str, *, roots: Roots | None = None) -> None:
    """Unprepare and destroy a container's sandbox layer, as :func:`unprepare_layer` then
    :func:`destroy_layer`, except that the removed folder's files are deleted on a
    background thread: the layer is gone when this returns (no id, no row, no folder under
    its name), its disk space a moment later. A process that exits first leaves a
    ``.trash-*`` folder, which the next store operation removes (see :func:`_recover`)."""
    try:
        unprepare_layer(info, id, roots=roots)
    except LayerError as e:
        if e.code != ERR_ELEMENT_NOT_FOUND:
            raise
    found = _destroy(info, id, "DestroyLayer", roots)
    if found is not None:
        _remove_in_background(*found)


def _destroy(info: DriverInfo, id: str, op: str, roots: Roots | None
             ) -> tuple[str, int] | None:
    """Check, unregister and rename layer *id*'s folder to a ``.trash-*`` folder; return it
    and an fd holding its lock (recovery leaves a locked trash folder alone), or None if
    the layer had no folder left."""
    _check_id(id, op)
    reg = _registry(roots)
    row = _row(reg, id)
    folder = row["path"] if row is not None else os.path.join(info.home_dir, id)
    if not os.path.isdir(folder):
        if row is None:
            raise LayerError(id, op, ERR_ELEMENT_NOT_FOUND, message="no such layer")
        # Registered but its folder is gone (removed by hand): forget it.
        reg.execute("DELETE FROM layers WHERE id = ?", (id,))
        return None
    with _locked(folder, id, op) as lock:
        row = _row(reg, id)
        _sandbox_size.clear_stale(folder, id, op)  # sandbox size hook: a killed prepare's mount
        if mounts_under(folder):
            raise _invalid_state(id, op, "the layer is prepared (mounted); unprepare it first")
        if row is not None:
            if row["state"] == _STATE_PREPARED:
                raise _invalid_state(id, op, "the layer is prepared; unprepare it first")
            child = reg.query_one("SELECT id FROM layers WHERE parent = ? LIMIT 1", (id,))
            if child is not None:
                raise _invalid_state(id, op, f"layer {child['id']} is built on it")
            image = reg.query_one("SELECT name FROM images WHERE top_layer = ? LIMIT 1", (id,))
            if image is not None:
                raise _invalid_state(id, op, f"image {image['name']!r} uses it")
            user = _container_using(reg, id, folder)
            if user is not None:
                raise _invalid_state(id, op, f"container {user} uses it")
        # One rename frees the id and the name at once, however long removing the tree
        # takes. The folder's lock goes with it: recovery in another process leaves a
        # locked .trash-* folder alone, and we hold the lock until the tree is gone.
        trash = os.path.join(os.path.dirname(folder), f".trash-{id}-{os.urandom(4).hex()}")
        try:
            os.rename(folder, trash)
        except OSError as e:
            raise _os_error(id, op, e, "cannot remove the layer's folder") from e
        kept = os.dup(lock)
        try:
            if row is not None:
                reg.execute("DELETE FROM layers WHERE id = ?", (id,))
        except BaseException:
            os.close(kept)  # the .trash-* folder goes with the next recovery
            raise
    return trash, kept


# -- removing trash in the background ---------------------------------------------------------

_trash_queue: collections.deque[tuple[str, int]] = collections.deque()
_trash_mutex = threading.Lock()
_trash_thread: threading.Thread | None = None


def _remove_in_background(path: str, lock: int) -> None:
    global _trash_thread
    with _trash_mutex:
        _trash_queue.append((path, lock))
        if _trash_thread is None:  # the thread exits when the queue is empty
            _trash_thread = threading.Thread(target=_remove_queued, name="pyhcs-trash",
                                             daemon=True)
            _trash_thread.start()


def _remove_queued() -> None:
    global _trash_thread
    while True:
        with _trash_mutex:
            if not _trash_queue:
                _trash_thread = None
                return
            path, lock = _trash_queue.popleft()
        try:
            remove_tree(path)
        except OSError:
            pass  # left for recovery, like a folder of a process that died
        finally:
            os.close(lock)


def wait_for_trash(timeout: float | None = None) -> None:
    """Wait until the folders :func:`discard_sandbox` handed to the background are gone
    (also run at interpreter exit, for up to 10 seconds)."""
    thread = _trash_thread
    if thread is not None:
        thread.join(timeout)


def _reset_trash_after_fork() -> None:
    # A forked child has none of the parent's threads; the queue is the parent's to finish.
    global _trash_thread, _trash_mutex
    _trash_mutex = threading.Lock()
    _trash_queue.clear()
    _trash_thread = None


os.register_at_fork(after_in_child=_reset_trash_after_fork)
atexit.register(wait_for_trash, 10.0)


def _container_using(reg: Registry, layer_id: str, folder: str) -> str | None:
    """A live container whose layers include *folder*, or that runs on sandbox *layer_id*."""
    real = os.path.realpath(folder)
    rows = reg.query(
        "SELECT id, config, state, sandbox_layer, layer_home FROM containers"
        " WHERE state IN ('creating', 'created', 'running', 'paused')"
    )
    for r in rows:
        if (
            r["sandbox_layer"] == layer_id
            and r["state"] in ("running", "paused")
            and os.path.realpath(os.path.join(r["layer_home"], layer_id)) == real
        ):
            return str(r["id"])
        try:
            layers = json.loads(r["config"]).get("Layers") or []
        except (ValueError, AttributeError):
            continue
        for layer in layers:
            path = layer.get("Path") if isinstance(layer, dict) else None
            if isinstance(path, str) and path and os.path.realpath(_layer_folder(path)) == real:
                return str(r["id"])
    return None


def _adjust_activations(folder: str, delta: int, layer_id: str, op: str) -> int:
    path = os.path.join(folder, _ACTIVATIONS)
    with _locked(folder, layer_id, op):
        try:
            with open(path) as f:
                count = int(f.read().strip() or 0)
        except (OSError, ValueError):
            count = 0  # never activated (or an unreadable count: start over)
        count += delta
        if count < 0:
            raise _invalid_state(layer_id, op, "the layer is not activated")
        try:
            tmp = path + ".tmp"
            with open(tmp, "w") as f:
                f.write(f"{count}\n")
            os.replace(tmp, path)
        except OSError as e:
            raise _os_error(layer_id, op, e, "cannot record the activation") from e
    return count


def activate_layer(info: DriverInfo, id: str, *, roots: Roots | None = None) -> None:
    """hcsshim's ``ActivateLayer``: check the layer exists and count one activation.

    On Windows this mounts a sandbox's volume. Here a sandbox is a plain directory (no
    separate volume yet: ``StorageSandboxSize`` is not enforced), so there is nothing to
    mount; the count is kept in the layer folder so :func:`deactivate_layer` can check
    pairing. Raises :class:`LayerError` (``ERR_ELEMENT_NOT_FOUND``).
    """
    op = "ActivateLayer"
    row = _require(_registry(roots), id, op)
    _adjust_activations(row["path"], 1, id, op)


def deactivate_layer(info: DriverInfo, id: str, *, roots: Roots | None = None) -> None:
    """hcsshim's ``DeactivateLayer``: undo one :func:`activate_layer`.

    Raises :class:`LayerError`: ``ERR_ELEMENT_NOT_FOUND``, or
    ``ERR_VMCOMPUTE_OPERATION_INVALID_STATE`` if the layer is not activated.
    """
    op = "DeactivateLayer"
    row = _require(_registry(roots), id, op)
    _adjust_activations(row["path"], -1, id, op)


def get_shared_base_images(*, roots: Roots | None = None) -> str:
    """JSON describing the base layers in the store, as hcsshim's ``GetSharedBaseImages``.

    ``{"Images": [{"ID", "Name", "Path", "Size", "CreatedTime"}]}``, sorted by id. ``Name``
    is the name of an image whose top layer it is, else the id; ``CreatedTime`` is RFC 3339
    UTC; ``Size`` the bytes of file data imported.
    """
    reg = _registry(roots)
    rows = reg.query("SELECT * FROM layers WHERE kind = ? ORDER BY id", (_KIND_BASE,))
    images = []
    for r in rows:
        named = reg.query_one(
            "SELECT name FROM images WHERE top_layer = ? ORDER BY name LIMIT 1", (r["id"],)
        )
        created = datetime.fromtimestamp(r["created"], UTC).isoformat().replace("+00:00", "Z")
        images.append(
            {
                "ID": r["id"],
                "Name": named["name"] if named is not None else r["id"],
                "Path": r["path"],
                "Size": r["size"],
                "CreatedTime": created,
            }
        )
    return json.dumps({"Images": images})


def process_base_layer(path: str, *, roots: Roots | None = None) -> None:
    """Post-process a base layer whose files were extracted to ``<path>/Files``.

    pyhcs keeps a layer's files in ``fs/``, so ``Files`` is renamed to ``fs``. If the folder's
    name is a valid layer id not yet registered, the folder is registered as a base layer
    (filter flavour) so the layer functions find it. Raises :class:`LayerError`
    (``ERR_ELEMENT_NOT_FOUND`` without ``Files``, ``ERR_ALREADY_EXISTS`` if ``fs`` exists).
    """
    op = "ProcessBaseLayer"
    folder = os.path.abspath(os.fspath(path))
    layer_id = os.path.basename(folder)
    files = os.path.join(folder, "Files")
    fs = os.path.join(folder, FS_DIR)
    if not os.path.isdir(files) or os.path.islink(files):
        raise LayerError(layer_id, op, ERR_ELEMENT_NOT_FOUND, files, message="no Files folder")
    if os.path.lexists(fs):
        raise LayerError(layer_id, op, ERR_ALREADY_EXISTS, fs, message="already processed")
    try:
        os.rename(files, fs)
    except OSError as e:
        raise _os_error(layer_id, op, e, "cannot move Files into place") from e
    if _ID_RE.fullmatch(layer_id):
        reg = _registry(roots)
        with contextlib.suppress(sqlite3.IntegrityError):
            reg.execute(
                "INSERT INTO layers (id, parent, kind, path, flavour, state, digest, size, created)"
                " VALUES (?, NULL, ?, ?, ?, ?, NULL, 0, ?)",
                (layer_id, _KIND_BASE, folder, FILTER_DRIVER, _STATE_READY, reg.now()),
            )


def process_utility_vm_image(path: str) -> None:
    """Post-process a utility VM image extracted to ``<path>/Files``: not supported.

    A utility VM image is only used by VM-isolated (Hyper-V) containers, which pyhcs does
    not provide yet. Raises :class:`LayerError` (``ERR_ELEMENT_NOT_FOUND``) without
    ``Files``, else :class:`NotSupportedError`.
    """
    op = "ProcessUtilityVMImage"
    files = os.path.join(os.path.abspath(os.fspath(path)), "Files")
    if not os.path.isdir(files):
        raise LayerError(
            os.path.basename(os.path.abspath(path)),
            op,
            ERR_ELEMENT_NOT_FOUND,
            files,
            message="no Files folder",
        )
    raise NotSupportedError(
        op,
        extra_info=os.fspath(path),
        message="utility VM images need VM isolation (HvPartition), which pyhcs does not "
        "provide yet",
    )
