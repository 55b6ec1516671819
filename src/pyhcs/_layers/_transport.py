"""Moving layers in and out of the store: streaming readers/writers, OCI tars, folders.

OCI layer tars (:func:`export_layer_to_tar`) are written deterministically, so the same
layer content always gives the same bytes and digest:

* entries in the reader's order: the root ``./`` first, then depth first, siblings in
  byte order of their names; an opaque directory is followed by its ``.wh..wh..opq``;
  a whiteout becomes an empty ``.wh.<name>`` file (mode 0644, owner 0:0, its mtime);
* pax format; headers carry numeric owners only (no user/group names), the mode, the
  mtime (a pax ``mtime`` record with nanoseconds when it has a fraction), never atime or
  ctime; xattrs as ``SCHILY.xattr.*`` under the extractor's policy (``user.*``,
  ``security.capability``);
* a hard link is a link entry to the first path (in that order) of its inode;
* gzip: level 6, header mtime 0, no file name; zstd: level 3, one frame, checksum on;
* the archive ends with two zero blocks, padded to a 10240-byte record, as GNU tar does.

Folder transport format (:func:`export_layer` / :func:`import_layer`), version 1::

    <folder>/
      layer.json    {"MediaType": "application/vnd.pyhcs.layer.v1.folder",
                     "Version": 1, "LayerId": ..., "LayerGuid": ...,
                     "Parents": [ids of the parent layers, direct parent first],
                     "Tar": "layer.tar", "DiffId": "sha256:...", "Size": bytes}
      layer.tar     the layer as a plain (uncompressed) OCI layer tar, as above

Import checks the version, the number of parents against the parent layer paths given,
and the tar's sha256 against ``DiffId`` (nothing is imported on a mismatch); the tar is
extracted with every safety rule of :mod:`pyhcs._layers._extract`. Neither file may be a
symlink.
"""

from __future__ import annotations

import contextlib
import fcntl
import gzip
import hashlib
import json
import os
import stat
import tarfile
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from typing import IO, Any, BinaryIO, Literal

from pyhcs._errors import (
    ERR_ALREADY_EXISTS,
    ERR_ELEMENT_NOT_FOUND,
    InvalidConfigError,
    LayerError,
)
from pyhcs._guid import name_to_guid
from pyhcs._layers import _sandbox_size, _store
from pyhcs._layers._extract import DEFAULT_MAX_SIZE
from pyhcs._layers._fsops import open_dir, remove_tree, rename_noreplace
from pyhcs._layers._stream import (
    EntryType,
    LayerEntry,
    LayerReader,
    LayerWriter,
    open_tree_reader,
    walk_tree,
)
from pyhcs._paths import Roots

__all__ = [
    "TarExport",
    "export_layer",
    "export_layer_to_tar",
    "import_layer",
    "new_layer_reader",
    "new_layer_writer",
]

Compression = Literal["none", "gzip", "zstd"]

_FOLDER_MEDIA_TYPE = "application/vnd.pyhcs.layer.v1.folder"
_MANIFEST = "layer.json"
_TAR = "layer.tar"
_MANIFEST_MAX = 1 << 20
_RECORD = 10240
_BUF = 1 << 20


@dataclass(frozen=True, slots=True)
class TarExport:
    """What :func:`export_layer_to_tar` wrote."""

    #: ``sha256:<hex>`` of the bytes written (compressed if asked): the OCI blob digest.
    digest: str
    #: ``sha256:<hex>`` of the uncompressed tar: the OCI diff id.
    diff_id: str
    #: Bytes written.
    size: int


class _Sink:
    """Buffers, hashes and counts what is written, then passes it on."""

    def __init__(self, dest: Any) -> None:
        self._dest = dest
        self.hash = hashlib.sha256()
        self.count = 0
        self._buf = bytearray()

    def write(self, data: bytes | bytearray | memoryview) -> int:
        self._buf += data
        if len(self._buf) >= _BUF:
            self.flush()
        return len(data)

    def flush(self) -> None:
        if self._buf:
            self.hash.update(self._buf)
            self.count += len(self._buf)
            self._dest.write(bytes(self._buf))
            self._buf.clear()


_OCT7 = 8**7  # numbers that fit a ustar header's 8-byte fields (7 octal digits)...
_OCT11 = 8**11  # ...and its 12-byte ones


def _header(e: LayerEntry, name: str, kind: bytes, size: int = 0) -> bytes:
    """The tar header(s) of entry *e*: what ``tarfile``'s pax format writes, byte for byte.

    The common entry (owners, size and time that fit their ustar fields; names, link
    target and xattrs in UTF-8) is built here directly: a ustar header, after a pax header
    for a sub-second time, xattrs and a name or link target that does not fit. Anything
    else goes through ``tarfile``.
    """
    sec, frac = divmod(e.mtime_ns, 1_000_000_000)
    path = name + "/" if kind == tarfile.DIRTYPE and not name.endswith("/") else name
    link = e.link_target if e.type in (EntryType.SYMLINK, EntryType.HARDLINK) else ""
    dev = kind in (tarfile.CHRTYPE, tarfile.BLKTYPE)
    if not (
        0 <= e.uid < _OCT7
        and 0 <= e.gid < _OCT7
        and 0 <= size < _OCT11
        and 0 <= sec < _OCT11
        and (not dev or (0 <= e.devmajor < _OCT7 and 0 <= e.devminor < _OCT7))
    ):
        return _tarfile_header(e, name, kind, size)
    records = b""
    if frac:
        records = _pax_record(b"mtime", f"{sec}.{frac:09d}".rstrip("0").encode())
    try:
        for k, v in sorted(e.xattrs.items()):
            v.decode("utf-8")
            records += _pax_record(("SCHILY.xattr." + k).encode("utf-8"), v)
        # Names that do not fit (or are not ASCII) go into records; the ustar fields keep
        # their first 100 characters, non-ASCII ones as '?'.
        if len(path) > 100 or not path.isascii():
            records += _pax_record(b"path", path.encode("utf-8"))
        if len(link) > 100 or not link.isascii():
            records += _pax_record(b"linkpath", link.encode("utf-8"))
    except UnicodeError:  # tarfile then marks the records binary: leave it to tarfile
        return _tarfile_header(e, name, kind, size)
    devices = (e.devmajor, e.devminor) if dev else None
    head = _ustar(
        path.encode("ascii", "replace")[:100],
        link.encode("ascii", "replace")[:100],
        kind, e.mode, e.uid, e.gid, size, sec, devices,
    )
    if not records:
        return head
    pax = _ustar(b"././@PaxHeader", b"", tarfile.XHDTYPE, 0, 0, 0, len(records), 0, None)
    return pax + records + bytes(-len(records) % 512) + head


def _pax_record(key: bytes, value: bytes) -> bytes:
    """``"<length> <key>=<value>\\n"``, the length counting its own digits."""
    n = len(key) + len(value) + 3
    p = n + len(str(n))
    if len(str(p)) != len(str(n)):
        p = n + len(str(p))
    return b"%d %s=%s\n" % (p, key, value)


def _ustar(
    path: bytes,
    link: bytes,
    kind: bytes,
    mode: int,
    uid: int,
    gid: int,
    size: int,
    mtime: int,
    devices: tuple[int, int] | None,
) -> bytes:
    """One ustar header block, as ``tarfile`` lays it out (no user or group names)."""
    hdr = b"".join((
        path.ljust(100, b"\0"),
        b"%07o\0%07o\0%07o\0%011o\0%011o\0" % (mode & 0o7777, uid, gid, size, mtime),
        b"        ",  # the checksum, counted as spaces
        kind,
        link.ljust(100, b"\0"),
        tarfile.POSIX_MAGIC,
        bytes(64),
        b"%07o\0%07o\0" % devices if devices is not None else bytes(16),
        bytes(167),  # no prefix, padding
    ))
    return b"%s%06o\0%s" % (hdr[:148], sum(hdr), hdr[155:])


def _tarfile_header(e: LayerEntry, name: str, kind: bytes, size: int = 0) -> bytes:
    ti = tarfile.TarInfo(name)
    ti.type = kind
    ti.mode = e.mode
    ti.uid, ti.gid = e.uid, e.gid
    ti.uname = ti.gname = ""
    ti.size = size
    sec, frac = divmod(e.mtime_ns, 1_000_000_000)
    ti.mtime = sec
    pax: dict[str, str] = {}
    if frac:
        pax["mtime"] = f"{sec}.{frac:09d}".rstrip("0")
        ti.mtime = float(sec)  # makes tarfile keep our record instead of its own
    for k, v in sorted(e.xattrs.items()):
        pax["SCHILY.xattr." + k] = v.decode("utf-8", "surrogateescape")
    ti.pax_headers = pax
    if kind in (tarfile.CHRTYPE, tarfile.BLKTYPE):
        ti.devmajor, ti.devminor = e.devmajor, e.devminor
    if e.type in (EntryType.SYMLINK, EntryType.HARDLINK):
        ti.linkname = e.link_target
    return ti.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")


_KINDS = {
    EntryType.DIR: tarfile.DIRTYPE,
    EntryType.SYMLINK: tarfile.SYMTYPE,
    EntryType.HARDLINK: tarfile.LNKTYPE,
    EntryType.FIFO: tarfile.FIFOTYPE,
    EntryType.CHAR: tarfile.CHRTYPE,
    EntryType.BLOCK: tarfile.BLKTYPE,
}


def write_tar(reader: LayerReader, out: _Sink) -> None:
    """Write the layer *reader* yields as an OCI layer tar (see the module docstring)."""
    for e in reader:
        name = "." if e.path == "." else e.path
        if e.type == EntryType.WHITEOUT:
            head, _, base = name.rpartition("/")
            wh = f"{head}/.wh.{base}" if head else f".wh.{base}"
            out.write(_header(LayerEntry(wh, EntryType.FILE, mode=0o644,
                                         mtime_ns=e.mtime_ns), wh, tarfile.REGTYPE))
            continue
        if e.type == EntryType.FILE:
            out.write(_header(e, name, tarfile.REGTYPE, e.size))
            left = e.size
            while left > 0:
                chunk = reader.read(min(left, _BUF))
                if not chunk:
                    raise OSError(f"{e.path!r} shrank while it was being exported")
                out.write(chunk)
                left -= len(chunk)
            if e.size % 512:
                out.write(bytes(512 - e.size % 512))
            continue
        out.write(_header(e, name, _KINDS[e.type]))
        if e.type == EntryType.DIR and e.opaque:
            opq = ".wh..wh..opq" if name == "." else f"{name}/.wh..wh..opq"
            out.write(_header(LayerEntry(opq, EntryType.FILE, mode=0o644,
                                         mtime_ns=e.mtime_ns), opq, tarfile.REGTYPE))
    out.write(bytes(1024))
    total = out.count + len(out._buf)
    if total % _RECORD:
        out.write(bytes(_RECORD - total % _RECORD))


def _parent_fs(parents: list[str]) -> list[str]:
    return [os.path.join(p, _store.FS_DIR) for p in parents]


@contextlib.contextmanager
def _open_reader(folder: str, parents: list[str], layer_id: str, op: str) -> Any:
    """A reader of the layer in *folder*, holding the layer's lock; a sized sandbox's
    file system is mounted for the read if it is not (and unmounted after)."""
    try:
        lock = open_dir(folder)
    except OSError as e:
        raise _store._os_error(layer_id, op, e, "the layer's folder is missing") from e
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
        sized = _sandbox_size.is_sized(folder)
        mounted_here = False
        if sized and not os.path.ismount(os.path.join(folder, _sandbox_size.SCRATCH_DIR)):
            with _sandbox_size.volume_for_overlay(folder, layer_id, op):
                mounted_here = True
        try:
            if sized:
                upper = os.path.join(folder, _sandbox_size.SCRATCH_DIR, "upper")
                reader = LayerReader(walk_tree(upper))
            else:
                reader = open_tree_reader(folder, _parent_fs(parents))
            with reader:
                yield reader
        finally:
            if mounted_here:
                _sandbox_size.unmount_volume(folder, layer_id, op)
    finally:
        os.close(lock)


def export_layer_to_tar(
    writer: BinaryIO | IO[bytes],
    path: str,
    parent_layer_paths: Sequence[str] = (),
    *,
    compression: Compression = "none",
) -> TarExport:
    """Write the layer in folder *path* to *writer* as an OCI layer tar.

    *path* is a layer folder of the store (or its ``fs/``); *parent_layer_paths* (direct
    parent first) matter only for a diff-flavour sandbox, whose changes are found by
    comparing with them. *compression* is ``"none"``, ``"gzip"`` or ``"zstd"``. The
    output is deterministic (see :mod:`pyhcs._layers._transport`). Returns the digests and
    size written; raises :class:`LayerError` (op ``ExportLayer``).
    """
    op = "ExportLayer"
    folder = _store._layer_folder(path)
    layer_id = os.path.basename(folder)
    if compression not in ("none", "gzip", "zstd"):
        raise InvalidConfigError(op, extra_info=str(compression),
                                 message="compression is 'none', 'gzip' or 'zstd'")
    parents = _store._check_parent_paths(parent_layer_paths, layer_id, op)
    if not os.path.isdir(folder):
        raise LayerError(layer_id, op, None, folder, message="not a layer folder")
    outer = _Sink(writer)
    comp: Any
    if compression == "gzip":
        comp = gzip.GzipFile(filename="", mode="wb", fileobj=outer, compresslevel=6, mtime=0)
    elif compression == "zstd":
        from pyhcs._layers._zstd import ZstdWriter

        comp = ZstdWriter(outer)  # type: ignore[arg-type]
    else:
        comp = outer
    inner = _Sink(comp) if comp is not outer else outer
    try:
        with _open_reader(folder, parents, layer_id, op) as reader:
            write_tar(reader, inner)
        inner.flush()
        if comp is not outer:
            comp.close()
            outer.flush()
        if hasattr(writer, "flush"):
            writer.flush()
    except LayerError:
        raise
    except Exception as e:
        if isinstance(e, OSError):
            raise _store._os_error(layer_id, op, e, "export failed") from e
        raise LayerError(layer_id, op, None, str(e), message="export failed") from e
    return TarExport(
        "sha256:" + outer.hash.hexdigest(), "sha256:" + inner.hash.hexdigest(), outer.count
    )


# -- hcsshim's functions ------------------------------------------------------------------------


def new_layer_reader(
    info: _store.DriverInfo,
    layer_id: str,
    parent_layer_paths: Sequence[str],
    *,
    roots: Roots | None = None,
) -> contextlib.AbstractContextManager[LayerReader]:
    """hcsshim's ``NewLayerReader``: a context manager giving a :class:`LayerReader` of
    layer *layer_id*'s content (a read-only layer's files, or what a sandbox changed
    relative to *parent_layer_paths*), parents before children.

    While it is open the layer is locked: prepare/unprepare/destroy wait. Raises
    :class:`LayerError` (``ERR_ELEMENT_NOT_FOUND`` for a missing layer).
    """
    op = "NewLayerReader"
    row = _store._require(_store._registry(roots), layer_id, op)
    parents = _store._check_parent_paths(parent_layer_paths, layer_id, op)

    @contextlib.contextmanager
    def opened() -> Any:
        try:
            with _open_reader(row["path"], parents, layer_id, op) as reader:
                yield reader
        except OSError as e:
            raise _store._os_error(layer_id, op, e, "cannot read the layer") from e

    return opened()


def new_layer_writer(
    info: _store.DriverInfo,
    layer_id: str,
    parent_layer_paths: Sequence[str],
    *,
    roots: Roots | None = None,
) -> LayerWriter:
    """hcsshim's ``NewLayerWriter``: a :class:`LayerWriter` that builds the new read-only
    layer *layer_id* on top of *parent_layer_paths* (direct parent first; none: a base
    layer). The layer exists only once ``close()`` succeeds. Raises :class:`LayerError`
    (``ERR_ALREADY_EXISTS`` if the id is taken).
    """
    op = "NewLayerWriter"
    _store._check_id(layer_id, op)
    parents = _store._check_parent_paths(parent_layer_paths, layer_id, op)
    reg = _store._registry(roots)
    parent = os.path.basename(parents[0]) if parents else None
    if parent is not None and _store._row(reg, parent) is None:
        raise LayerError(layer_id, op, ERR_ELEMENT_NOT_FOUND, f"parent {parents[0]!r}",
                         message="the direct parent is not a registered layer")
    folder = os.path.join(info.home_dir, layer_id)
    _store._check_absent(reg, folder, layer_id, op)
    tmp = _store._new_temp(info.home_dir, layer_id, layer_id, op)
    try:
        os.mkdir(os.path.join(tmp, _store.FS_DIR), 0o755)
    except OSError as e:
        _store._discard(tmp)
        raise _store._os_error(layer_id, op, e, "cannot create the layer") from e

    def publish(path: str) -> None:
        size = 0
        for base, _dirs, files in os.walk(os.path.join(path, _store.FS_DIR)):
            for name in files:
                with contextlib.suppress(OSError):
                    st = os.lstat(os.path.join(base, name))
                    if stat.S_ISREG(st.st_mode):
                        size += st.st_size
        _store._publish(reg, path, folder, layer_id=layer_id, op=op, parent=parent,
                        kind=_store._KIND_LAYER if parents else _store._KIND_BASE,
                        flavour=info.flavour, size=size)

    def fail(e: Exception, what: str) -> Exception:
        return LayerError(layer_id, op, None, str(e), message=f"{what}: refused" if what
                          else "refused")

    try:
        return LayerWriter(tmp, _parent_fs(parents), publish, _store._discard, fail)
    except BaseException:
        _store._discard(tmp)
        raise


def export_layer(
    info: _store.DriverInfo,
    layer_id: str,
    export_folder_path: str,
    parent_layer_paths: Sequence[str],
    *,
    roots: Roots | None = None,
) -> None:
    """hcsshim's ``ExportLayer``: create the folder *export_folder_path* (absent, or an
    empty directory) holding layer *layer_id* in the folder transport format (module
    docstring). The folder appears complete or not at all. Raises :class:`LayerError`.
    """
    op = "ExportLayer"
    row = _store._require(_store._registry(roots), layer_id, op)
    parents = _store._check_parent_paths(parent_layer_paths, layer_id, op)
    target = os.path.abspath(os.fspath(export_folder_path))
    if os.path.lexists(target) and (
        os.path.islink(target) or not os.path.isdir(target) or os.listdir(target)
    ):
        raise LayerError(layer_id, op, ERR_ALREADY_EXISTS, target,
                         message="the export folder exists and is not an empty directory")
    parent_dir = os.path.dirname(target)
    _recover_exports(parent_dir)
    try:
        tmp = tempfile.mkdtemp(prefix=".pyhcs-export-", dir=parent_dir)
        lock = open_dir(tmp)
    except OSError as e:
        raise _store._os_error(layer_id, op, e, "cannot create the export folder") from e
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
        with open(os.path.join(tmp, _TAR), "xb") as f:
            result = export_layer_to_tar(f, row["path"], parents)
            os.fsync(f.fileno())
        manifest = {
            "MediaType": _FOLDER_MEDIA_TYPE,
            "Version": 1,
            "LayerId": layer_id,
            "LayerGuid": str(name_to_guid(layer_id)),
            "Parents": [os.path.basename(p) for p in parents],
            "Tar": _TAR,
            "DiffId": result.diff_id,
            "Size": result.size,
        }
        with open(os.path.join(tmp, _MANIFEST), "x") as m:
            json.dump(manifest, m, indent=1, sort_keys=True)
            m.write("\n")
        os.chmod(tmp, 0o755)
        if os.path.isdir(target):
            os.rmdir(target)  # empty, checked above
        rename_noreplace(tmp, target)
    except LayerError:
        remove_tree(tmp)
        raise
    except OSError as e:
        remove_tree(tmp)
        raise _store._os_error(layer_id, op, e, "cannot write the export folder") from e
    except BaseException:
        remove_tree(tmp)
        raise
    finally:
        os.close(lock)


def _recover_exports(parent_dir: str) -> None:
    """Remove ``.pyhcs-export-*`` folders whose exporting process died."""
    try:
        names = [n for n in os.listdir(parent_dir) if n.startswith(".pyhcs-export-")]
    except OSError:
        return
    for name in names:
        path = os.path.join(parent_dir, name)
        try:
            fd = open_dir(path)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            remove_tree(path)
        except OSError:
            pass
        finally:
            os.close(fd)


def import_layer(
    info: _store.DriverInfo,
    layer_id: str,
    import_folder_path: str,
    parent_layer_paths: Sequence[str],
    *,
    max_size: int = DEFAULT_MAX_SIZE,
    roots: Roots | None = None,
) -> None:
    """hcsshim's ``ImportLayer``: import the folder transport format at
    *import_folder_path* (see the module docstring) as layer *layer_id* on top of
    *parent_layer_paths*. Raises :class:`LayerError` (nothing is imported on any error).
    """
    op = "ImportLayer"
    _store._check_id(layer_id, op)
    folder = os.path.abspath(os.fspath(import_folder_path))
    try:
        dfd = open_dir(folder)
    except OSError as e:
        raise _store._os_error(layer_id, op, e, "cannot open the import folder") from e
    try:
        try:
            mfd = os.open(_MANIFEST, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dfd)
            with os.fdopen(mfd, "rb") as m:
                raw = m.read(_MANIFEST_MAX + 1)
            if len(raw) > _MANIFEST_MAX:
                raise ValueError("layer.json is too large")
            manifest = json.loads(raw)
            if not isinstance(manifest, dict):
                raise ValueError("layer.json is not an object")
        except (OSError, ValueError) as e:
            raise LayerError(layer_id, op, None, str(e),
                             message="not a pyhcs layer folder (layer.json)") from e
        if manifest.get("Version") != 1 or manifest.get("Tar") != _TAR:
            raise LayerError(layer_id, op, None, f"version {manifest.get('Version')!r}",
                             message="unsupported layer folder format")
        listed = manifest.get("Parents")
        if isinstance(listed, list) and len(listed) != len(parent_layer_paths):
            raise InvalidConfigError(
                op, extra_info=f"{len(listed)} parents in layer.json",
                message=f"the layer was exported with {len(listed)} parent layers, "
                f"{len(parent_layer_paths)} parent layer paths given",
            )
        diff_id = manifest.get("DiffId")
        if not isinstance(diff_id, str) or not diff_id.startswith("sha256:"):
            raise LayerError(layer_id, op, None, message="layer.json has no DiffId")
        try:
            tfd = os.open(_TAR, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dfd)
        except OSError as e:
            raise LayerError(layer_id, op, None, str(e), message="cannot open layer.tar") from e
        with os.fdopen(tfd, "rb") as tar:
            if not stat.S_ISREG(os.fstat(tar.fileno()).st_mode):
                raise LayerError(layer_id, op, None, message="layer.tar is not a regular file")
            _store.import_layer_from_tar(info, layer_id, tar, parent_layer_paths,
                                         max_size=max_size, roots=roots,
                                         expected_digest=diff_id)
    finally:
        os.close(dfd)
