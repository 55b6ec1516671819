"""Images: names for layer chains, with an image config.

An image is a row of the registry's ``images`` table: a *name*, the id of its topmost
layer (the chain below follows the layers' ``parent`` links) and the image config
(``Env``, ``Entrypoint``, ``Cmd``, ``WorkingDir``, ``User``, ``ExposedPorts``, ``Labels``,
``StopSignal``) as JSON.

:func:`import_image` reads three kinds of archive, told apart by their content:

* an **OCI image layout** tar (``oci-layout``, ``index.json``, ``blobs/sha256/...``);
* a **docker save** tar (``manifest.json`` naming ``Config``, ``RepoTags`` and ``Layers``);
* a **root file system** tar (anything else): a single-layer image.

Layers are content-addressed. A layer's id is its OCI *chain id*: for the base layer its
diff id (the sha256 of its uncompressed tar), above it ``sha256("sha256:<parent chain id>
sha256:<diff id>")``. Two images that share base layers therefore share the stored layers,
and a layer is imported only if its chain id is not in the store yet. Every blob read is
checked against its digest and every layer against the diff id its config declares, so a
stored layer's id always matches its content; any mismatch refuses the whole import and
leaves nothing behind (no layer, no name, no temporary folder).

The archive is read in place: a seekable plain tar (a file, ``io.BytesIO``) is indexed by
its headers and each layer is streamed from it straight into the layer store. Only a
compressed archive (``docker save | gzip``) or a pipe is first copied to an anonymous
temporary file beside the store, which the kernel removes even if pyhcs is killed.
"""

from __future__ import annotations

import contextlib
import fcntl
import gzip
import hashlib
import io
import json
import lzma
import os
import platform
import posixpath
import re
import sqlite3
import tarfile
import tempfile
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import IO, Any, BinaryIO, cast

from pyhcs._errors import ERR_ELEMENT_NOT_FOUND, InvalidConfigError, LayerError
from pyhcs._layers import _extract
from pyhcs._layers._extract import DEFAULT_MAX_SIZE, MAX_HEADER_SIZE, ArchiveError
from pyhcs._layers._store import (
    _ID_RE,
    _KIND_BASE,
    _KIND_LAYER,
    FILTER_DRIVER,
    DriverInfo,
    _check_id,
    _discard,
    _extract_to_temp,
    _publish,
    _registry,
    _roots,
    _row,
    destroy_layer,
)
from pyhcs._layers._zstd import ZstdError
from pyhcs._paths import Roots
from pyhcs._registry import Registry

__all__ = [
    "IMAGE_CONFIG_KEYS",
    "ImageArchiveError",
    "ImageInfo",
    "ImageNotFoundError",
    "ProgressCallback",
    "import_image",
    "list_images",
    "remove_image",
    "resolve_image",
]

#: The image-config fields :func:`import_image` keeps (OCI image-config names).
IMAGE_CONFIG_KEYS = (
    "Env",
    "Entrypoint",
    "Cmd",
    "WorkingDir",
    "User",
    "ExposedPorts",
    "Labels",
    "StopSignal",
)

#: ``progress(done, total)``: bytes of the archive read so far, and the bytes to read.
ProgressCallback = Callable[[int, int], None]

_MAX_CHAIN = 128  # deeper than any real image; stops a corrupt parent cycle
_MAX_JSON = 4 << 20  # index, manifests and configs are kilobytes; refuse absurd ones
_MAX_INDEX_DEPTH = 4  # index -> index -> manifest is the deepest seen in practice
_MAX_MANIFESTS = 1024  # descriptors read from indexes; each costs a blob read
_MAX_LINK_HOPS = 8  # docker save links duplicate layer.tar files to each other
_MAX_ARCHIVE_MEMBERS = 100_000  # image archives hold a few files per layer
_MAX_PATH = 4096
_CHUNK = 1 << 20
_DIGEST_RE = re.compile(r"sha256:([0-9a-f]{64})")
# docker save names the config "<hex>.json" (legacy) or "blobs/sha256/<hex>" (docker 25+).
_CONFIG_PATH_RE = re.compile(r"(?:^|/)([0-9a-f]{64})(?:\.json)?$")
_BLOB_PATH_RE = re.compile(r"blobs/sha256/([0-9a-f]{64})")
_COMPRESSED_MAGIC = (b"\x1f\x8b", b"BZh", b"\xfd7zXZ\x00", b"\x28\xb5\x2f\xfd")
_META_TYPES = (
    tarfile.XHDTYPE,
    tarfile.XGLTYPE,
    tarfile.SOLARIS_XHDTYPE,
    tarfile.GNUTYPE_LONGNAME,
    tarfile.GNUTYPE_LONGLINK,
)
_OCI_LAYOUT = "oci-layout"
_OCI_INDEX = "index.json"
_DOCKER_MANIFEST = "manifest.json"
_NAME_ANNOTATIONS = ("io.containerd.image.name", "org.opencontainers.image.ref.name")
_GOARCH = {"x86_64": "amd64", "aarch64": "arm64", "armv7l": "arm", "i686": "386"}


class ImageNotFoundError(LayerError):
    """No image (and, where a layer id is accepted, no layer) has this name.

    ``code`` is ``ERR_ELEMENT_NOT_FOUND``, so :func:`pyhcs.is_not_exist` is true.
    """

    def _subject(self) -> str:
        return f"image {self.id}"


class ImageArchiveError(LayerError):
    """An image archive was refused: malformed, incomplete, hostile, over a limit, or a
    blob or layer did not match its digest. ``id`` names the archive. Nothing was stored.
    """

    def _subject(self) -> str:
        return f"image archive {self.id}" if self.id else "image archive"


@dataclass(frozen=True, slots=True)
class ImageInfo:
    """An image: its name, top layer, layer folders (topmost first) and config."""

    name: str
    #: Id of the topmost layer.
    top_layer: str
    #: Folders of the image's layers, topmost first: the ``parent_layer_paths`` a sandbox
    #: built on this image takes.
    layer_chain: list[str]
    #: The image config (``Env``, ``Cmd``, ``WorkingDir``...), ``{}`` if none was given.
    config: dict[str, Any]
    #: When the name was recorded (seconds since the epoch).
    created: float


def _check_name(name: str, op: str) -> None:
    if (
        not isinstance(name, str)
        or not 0 < len(name) <= 255
        or any(c.isspace() or not c.isprintable() for c in name)
    ):
        raise InvalidConfigError(
            op,
            extra_info=f"name {name!r}",
            message="an image name is 1-255 printable characters without whitespace",
        )


@contextlib.contextmanager
def _images_lock(roots: Roots) -> Iterator[None]:
    """Serialise image bookkeeping (share-or-publish a layer, name it, prune it) across
    processes, so a removal cannot prune a layer an import has just decided to share."""
    os.makedirs(roots.root, 0o700, exist_ok=True)
    fd = os.open(roots.root / ".images.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _chain(reg: Registry, top: str, op: str, name: str) -> list[str]:
    chain: list[str] = []
    layer: str | None = top
    while layer:
        if len(chain) >= _MAX_CHAIN:
            raise LayerError(top, op, None, message="layer chain too deep (a parent cycle?)")
        row = _row(reg, layer)
        if row is None:
            raise LayerError(
                layer,
                op,
                ERR_ELEMENT_NOT_FOUND,
                f"image {name!r}",
                message="a layer of the image is missing",
            )
        chain.append(str(row["path"]))
        layer = row["parent"]
    return chain


def _info(reg: Registry, row: sqlite3.Row, op: str) -> ImageInfo:
    config = json.loads(row["config"] or "{}")
    return ImageInfo(
        name=row["name"],
        top_layer=row["top_layer"],
        layer_chain=_chain(reg, row["top_layer"], op, row["name"]),
        config=config if isinstance(config, dict) else {},
        created=float(row["created"]),
    )


# -- reading archives -------------------------------------------------------------------------


class _Oversized(Exception):
    """A tar metadata record too large to read into memory."""


class _ScanInfo(tarfile.TarInfo):
    """A TarInfo that refuses huge pax / long-name records before tarfile reads them."""

    @classmethod
    def frombuf(cls, buf: bytes | bytearray, encoding: str, errors: str) -> _ScanInfo:
        obj = super().frombuf(buf, encoding, errors)
        if obj.type in _META_TYPES and obj.size > MAX_HEADER_SIZE:
            raise _Oversized(f"tar metadata record of {obj.size} bytes")
        return obj


class _ProgressReader(io.RawIOBase):
    """A source read forward once, reporting the bytes read as it goes."""

    def __init__(
        self, src: IO[bytes], progress: Callable[[int], None] | None = None
    ) -> None:
        super().__init__()
        self._src = src
        self._progress = progress

    def readable(self) -> bool:
        return True

    def readinto(self, buf: Any) -> int:
        n = _extract.read_full(self._src, memoryview(buf).cast("B"))
        if self._progress is not None and n:
            self._progress(n)
        return n


@dataclass
class _Progress:
    callback: ProgressCallback | None
    total: int = 0
    done: int = 0

    def start(self, total: int) -> None:
        self.total = total
        if self.callback is not None:
            self.callback(0, total)

    def add(self, n: int) -> None:
        self.done += n
        if self.callback is not None:
            self.callback(self.done, self.total)


@dataclass
class _Scan:
    """A plain, seekable tar indexed by its headers (the data is not read)."""

    tf: tarfile.TarFile
    #: Regular files and links up to three levels deep, by normalised name.
    members: dict[str, tarfile.TarInfo]
    #: Which of ``oci-layout``, ``index.json``, ``manifest.json`` are at the top level.
    markers: set[str]
    overflow: bool


def _norm(name: str) -> str | None:
    """The archive name as a clean relative path, or None if it is absolute or has '..'."""
    if "\x00" in name or name.startswith("/") or len(name) > _MAX_PATH:
        return None
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if not parts or ".." in parts:
        return None
    return "/".join(parts)


def _scan(f: IO[bytes], label: str) -> _Scan | None:
    """Index the tar *f*; None if it is not a tar ``tarfile`` can walk (an image archive
    that breaks off after its index files were seen raises :class:`ImageArchiveError`)."""
    try:
        # Kept open past this function: the caller reads members through it, then closes.
        tf = tarfile.open(fileobj=f, mode="r:", tarinfo=_ScanInfo)  # noqa: SIM115
    except (tarfile.TarError, _Oversized, EOFError, zlib.error):
        return None
    scan = _Scan(tf, {}, set(), False)
    try:
        while (m := tf.next()) is not None:
            # tarfile keeps every member it has seen; only the few we need are kept here.
            tf.members.clear()  # type: ignore[attr-defined]
            name = _norm(m.name)
            if name is None:
                continue
            if name in (_OCI_LAYOUT, _OCI_INDEX, _DOCKER_MANIFEST):
                scan.markers.add(name)
            if name.count("/") < 3 and (m.isreg() or m.issym() or m.islnk()):
                if len(scan.members) < _MAX_ARCHIVE_MEMBERS or name in scan.members:
                    scan.members[name] = m  # a later entry of the same name wins, as in tar
                else:
                    scan.overflow = True
    except (tarfile.TarError, _Oversized, EOFError, zlib.error) as e:
        if scan.markers:
            raise _fail(label, "corrupt or truncated archive", str(e)) from None
        tf.close()
        return None  # not an image archive: the layer extractor reports what is wrong
    return scan


def _fail(archive: str, why: str, detail: str = "") -> ImageArchiveError:
    return ImageArchiveError(archive, "ImportImage", None, detail, message=why)


@dataclass
class _Archive:
    """An indexed image archive and the name it is reported under."""

    label: str
    scan: _Scan

    def member(self, path: str, what: str) -> tarfile.TarInfo:
        """The regular-file member *path* names, following links inside the archive."""
        name = self.safe_path(path, what)
        for _ in range(_MAX_LINK_HOPS):
            m = self.scan.members.get(name)
            if m is None:
                raise _fail(self.label, f"{what} is missing from the archive", repr(path))
            if m.isreg():
                return m
            if m.issym():
                target = posixpath.normpath(posixpath.join(posixpath.dirname(name), m.linkname))
            else:  # a hard link names another member by its archive path
                target = m.linkname
            resolved = _norm(target)
            if resolved is None or m.linkname.startswith("/"):
                raise _fail(self.label, f"{what} links outside the archive", repr(m.linkname))
            name = resolved
        raise _fail(self.label, f"{what}: too many links", repr(path))

    def safe_path(self, path: object, what: str) -> str:
        if not isinstance(path, str):
            raise _fail(self.label, f"{what}: a path must be a string", repr(path))
        name = _norm(path)
        if name is None or path.startswith("/"):
            raise _fail(self.label, f"{what}: unsafe path (absolute or with '..')", repr(path))
        return name

    def blob(self, digest: object, what: str) -> tuple[str, tarfile.TarInfo]:
        """The hex digest and member of the OCI blob *digest* (``sha256:<64 hex>``)."""
        hexd = _digest_hex(self.label, digest, what)
        return hexd, self.member(f"blobs/sha256/{hexd}", f"{what} blob {digest}")

    def read_json(self, m: tarfile.TarInfo, expected_hex: str | None, what: str) -> Any:
        if m.size > _MAX_JSON:
            raise _fail(self.label, f"{what} is larger than {_MAX_JSON} bytes", str(m.size))
        src = self.scan.tf.extractfile(m)
        if src is None:  # pragma: no cover - regular members always have data
            raise _fail(self.label, f"{what} has no data")
        data = src.read()
        if expected_hex is not None and hashlib.sha256(data).hexdigest() != expected_hex:
            raise _fail(self.label, f"{what} does not match its digest", f"sha256:{expected_hex}")
        try:
            return json.loads(data)
        except (ValueError, UnicodeDecodeError) as e:
            raise _fail(self.label, f"{what} is not valid JSON", str(e)) from None


def _digest_hex(label: str, digest: object, what: str) -> str:
    if not isinstance(digest, str):
        raise _fail(label, f"{what}: malformed digest", repr(digest))
    match = _DIGEST_RE.fullmatch(digest)
    if match is None:
        raise _fail(label, f"{what}: malformed or unsupported digest (sha256 only)", repr(digest))
    return match.group(1)


@dataclass(frozen=True, slots=True)
class _LayerSpec:
    member: tarfile.TarInfo
    #: sha256 of the blob as stored in the archive, when the archive names it.
    blob_hex: str | None
    #: sha256 of the uncompressed layer tar, from the image config.
    diff_hex: str


@dataclass(frozen=True, slots=True)
class _ImageSpec:
    default_name: str | None
    config: dict[str, Any]
    layers: list[_LayerSpec]


def _obj(label: str, value: object, what: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise _fail(label, f"{what} is not a JSON object")
    return cast(dict[str, Any], value)


def _host_platform() -> tuple[str, str]:
    machine = platform.machine()
    return "linux", _GOARCH.get(machine, machine)


def _platform_matches(desc: dict[str, Any]) -> bool | None:
    """True/False if the descriptor names a platform matching this host or not; None if
    it names none."""
    plat = desc.get("platform")
    if not isinstance(plat, dict):
        return None
    return (plat.get("os"), plat.get("architecture")) == _host_platform()


def _oci_spec(a: _Archive, name: str | None) -> _ImageSpec:
    layout = a.read_json(a.member(_OCI_LAYOUT, _OCI_LAYOUT), None, _OCI_LAYOUT)
    if not isinstance(layout, dict) or not isinstance(layout.get("imageLayoutVersion"), str):
        raise _fail(a.label, "oci-layout has no imageLayoutVersion")
    index = _obj(a.label, a.read_json(a.member(_OCI_INDEX, _OCI_INDEX), None, _OCI_INDEX),
                 _OCI_INDEX)
    # Leaf manifests: (descriptor, its document, the top-level descriptor's annotations).
    found: list[tuple[dict[str, Any], dict[str, Any], dict[str, Any]]] = []
    seen = 0

    def walk(idx: dict[str, Any], depth: int, annotations: dict[str, Any] | None) -> None:
        nonlocal seen
        manifests = idx.get("manifests")
        if not isinstance(manifests, list):
            raise _fail(a.label, "an image index has no manifests list")
        for raw in manifests:
            seen += 1
            if seen > _MAX_MANIFESTS:
                raise _fail(a.label, f"the image indexes list more than {_MAX_MANIFESTS} "
                            "manifests")
            desc = _obj(a.label, raw, "a manifest descriptor")
            hexd, m = a.blob(desc.get("digest"), "manifest")
            doc = _obj(a.label, a.read_json(m, hexd, f"manifest sha256:{hexd}"), "a manifest")
            ann = desc.get("annotations") if annotations is None else annotations
            ann = ann if isinstance(ann, dict) else {}
            if "manifests" in doc:
                if depth >= _MAX_INDEX_DEPTH:
                    raise _fail(a.label, "image indexes are nested too deep")
                walk(doc, depth + 1, ann)
            elif "layers" in doc:
                found.append((desc, doc, ann))
            # Anything else (an artifact, a signature) is not an image: skipped.

    walk(index, 0, None)

    def names(ann: dict[str, Any]) -> list[str]:
        return [v for k in _NAME_ANNOTATIONS if isinstance(v := ann.get(k), str) and v]

    if name is not None and any(name in names(ann) for _, _, ann in found):
        found = [c for c in found if name in names(c[2])]
    if len(found) > 1:
        exact = [c for c in found if _platform_matches(c[0]) is True]
        unnamed = [c for c in found if _platform_matches(c[0]) is None]
        found = exact or unnamed
    if not found:
        os_, arch = _host_platform()
        raise _fail(a.label, f"the archive has no image manifest for {os_}/{arch}")
    if len(found) > 1:
        listed = sorted({n for _, _, ann in found for n in names(ann)})
        raise _fail(
            a.label,
            f"the archive holds {len(found)} images; name the one to import",
            ", ".join(listed),
        )
    _, manifest, ann = found[0]
    config_desc = _obj(a.label, manifest.get("config"), "the manifest's config descriptor")
    config_hex, config_member = a.blob(config_desc.get("digest"), "config")
    _check_size(a, config_desc, config_member, "config")
    config = _obj(
        a.label, a.read_json(config_member, config_hex, f"config sha256:{config_hex}"), "config"
    )
    layer_descs = manifest.get("layers")
    if not isinstance(layer_descs, list):
        raise _fail(a.label, "the manifest has no layers list")
    diff_ids = _diff_ids(a, config, len(layer_descs))
    layers = []
    for raw, diff_hex in zip(layer_descs, diff_ids, strict=True):
        desc = _obj(a.label, raw, "a layer descriptor")
        blob_hex, member = a.blob(desc.get("digest"), "layer")
        _check_size(a, desc, member, f"layer sha256:{blob_hex}")
        layers.append(_LayerSpec(member, blob_hex, diff_hex))
    default = names(ann)[0] if names(ann) else None
    return _ImageSpec(default, _image_config(a.label, config), layers)


def _check_size(a: _Archive, desc: dict[str, Any], m: tarfile.TarInfo, what: str) -> None:
    size = desc.get("size")
    if size is not None and (not isinstance(size, int) or size != m.size):
        raise _fail(a.label, f"{what} is not the size its descriptor says",
                    f"{m.size} != {size!r}")


def _diff_ids(a: _Archive, config: dict[str, Any], count: int) -> list[str]:
    rootfs = _obj(a.label, config.get("rootfs"), "the config's rootfs")
    diff_ids = rootfs.get("diff_ids")
    if not isinstance(diff_ids, list) or len(diff_ids) != count:
        raise _fail(a.label, "the config's rootfs.diff_ids do not match the layers",
                    f"{count} layers")
    if count == 0:
        raise _fail(a.label, "the image has no layers")
    if count > _MAX_CHAIN:
        raise _fail(a.label, f"the image has more than {_MAX_CHAIN} layers")
    return [_digest_hex(a.label, d, "diff id") for d in diff_ids]


def _docker_spec(a: _Archive, name: str | None) -> _ImageSpec:
    entries = a.read_json(a.member(_DOCKER_MANIFEST, _DOCKER_MANIFEST), None, _DOCKER_MANIFEST)
    if not isinstance(entries, list) or not entries:
        raise _fail(a.label, "manifest.json is not a non-empty list")
    docs = [_obj(a.label, e, "a manifest.json entry") for e in entries]

    def tags(e: dict[str, Any]) -> list[str]:
        t = e.get("RepoTags")
        return [x for x in t if isinstance(x, str) and x] if isinstance(t, list) else []

    if name is not None and any(name in tags(e) for e in docs):
        docs = [e for e in docs if name in tags(e)]
    if len(docs) > 1:
        listed = sorted({t for e in docs for t in tags(e)})
        raise _fail(
            a.label, f"the archive holds {len(docs)} images; name the one to import",
            ", ".join(listed),
        )
    entry = docs[0]
    config_path = a.safe_path(entry.get("Config"), "Config")
    match = _CONFIG_PATH_RE.search(config_path)
    if match is None:
        raise _fail(a.label, "the Config path does not name the config's digest",
                    repr(config_path))
    config_hex = match.group(1)
    config = _obj(
        a.label,
        a.read_json(a.member(config_path, "config"), config_hex, f"config sha256:{config_hex}"),
        "config",
    )
    paths = entry.get("Layers")
    if not isinstance(paths, list):
        raise _fail(a.label, "the manifest.json entry has no Layers list")
    diff_ids = _diff_ids(a, config, len(paths))
    layers = []
    for path, diff_hex in zip(paths, diff_ids, strict=True):
        clean = a.safe_path(path, "layer")
        member = a.member(clean, f"layer {clean}")
        blob = _BLOB_PATH_RE.fullmatch(clean)
        # A legacy "<id>/layer.tar" is checked through its diff id only.
        layers.append(_LayerSpec(member, blob.group(1) if blob else None, diff_hex))
    t = tags(entry)
    return _ImageSpec(t[0] if t else None, _image_config(a.label, config), layers)


def _image_config(label: str, doc: dict[str, Any]) -> dict[str, Any]:
    """The kept fields of an image config document, type-checked."""
    os_ = doc.get("os")
    if os_ not in (None, "", "linux"):
        raise _fail(label, f"the image is for {os_!r}, not linux")
    raw = doc.get("config")
    if raw is None:
        return {}
    cfg = _obj(label, raw, "the config's config object")
    out: dict[str, Any] = {}
    for key in IMAGE_CONFIG_KEYS:
        value = cfg.get(key)
        if value is None:
            continue
        if key in ("Env", "Entrypoint", "Cmd"):
            ok = isinstance(value, list) and all(isinstance(v, str) for v in value)
        elif key in ("WorkingDir", "User", "StopSignal"):
            ok = isinstance(value, str)
        elif key == "Labels":
            ok = isinstance(value, dict) and all(isinstance(v, str) for v in value.values())
        else:  # ExposedPorts: {"80/tcp": {}}
            ok = isinstance(value, dict) and all(isinstance(v, dict) for v in value.values())
        if not ok:
            raise _fail(label, f"malformed image config: {key}", repr(value)[:100])
        if key == "WorkingDir" and value and not value.startswith("/"):
            value = "/" + value  # docker resolves a relative WorkingDir against "/"
        out[key] = value
    return out


# -- importing ------------------------------------------------------------------------------

_Source = BinaryIO | IO[bytes] | str | os.PathLike[str]


def _seekable(f: object) -> bool:
    try:
        return bool(f.seekable())  # type: ignore[attr-defined]
    except (AttributeError, OSError, ValueError):
        return False


@contextlib.contextmanager
def _spool(
    src: IO[bytes], home: str, limit: int, label: str, *, decompress: bool
) -> Iterator[IO[bytes]]:
    """*src* copied (and decompressed, with *decompress*) to an anonymous temporary file
    in *home*, rewound. At most *limit* bytes are written."""
    try:
        os.makedirs(home, 0o700, exist_ok=True)
        tmp = tempfile.TemporaryFile(dir=home)  # noqa: SIM115 - closed by the with below
    except OSError as e:
        raise _fail(label, "cannot create a temporary file", str(e)) from e
    with tmp:
        try:
            reader: IO[bytes] = src
            if decompress:
                buffered = io.BufferedReader(_ProgressReader(src), _CHUNK)
                reader = cast(IO[bytes], _extract._decompressor(cast(Any, buffered)))
            n = 0
            while chunk := reader.read(_CHUNK):
                n += len(chunk)
                if n > limit:
                    raise _fail(label, f"the archive expands beyond the {limit}-byte limit "
                                "(max_size)")
                tmp.write(chunk)
            tmp.seek(0)
        except ArchiveError as e:
            raise _fail(label, str(e)) from None
        except (EOFError, zlib.error, lzma.LZMAError, gzip.BadGzipFile, ZstdError) as e:
            raise _fail(label, "corrupt or truncated compressed archive", str(e)) from None
        except OSError as e:
            raise _fail(label, "cannot read the archive", str(e)) from e
        yield tmp


@contextlib.contextmanager
def _plain_seekable(source: _Source, home: str, max_size: int, label: str
                    ) -> Iterator[IO[bytes]]:
    """*source* as a seekable, uncompressed stream positioned at the archive's start."""
    with contextlib.ExitStack() as stack:
        f: IO[bytes]
        if isinstance(source, (str, os.PathLike)):
            try:
                f = stack.enter_context(open(source, "rb"))
            except OSError as e:
                raise _fail(label, "cannot open the archive", str(e)) from e
        elif _seekable(source):
            f = source
        else:
            # A pipe's bytes are bounded too (tar headers and padding add to the content:
            # twice the content bound leaves room for any honest archive).
            limit = 2 * max_size + (1 << 20)
            f = stack.enter_context(_spool(source, home, limit, label, decompress=False))
        try:
            start = f.tell()
            magic = f.read(6)
            f.seek(start)
        except OSError as e:
            raise _fail(label, "cannot read the archive", str(e)) from e
        if magic.startswith(_COMPRESSED_MAGIC):
            f = stack.enter_context(_spool(f, home, max_size, label, decompress=True))
        yield f


@dataclass
class _Staged:
    """One layer of the image being imported."""

    layer_id: str
    parent: str | None
    #: sha256 of the uncompressed layer tar (recorded as the layer's digest).
    digest: str
    #: The temporary folder it was extracted to; None if the store already has it.
    tmp: str | None = None
    size: int = 0
    #: Registered by this import (removed again if the import fails later).
    published: bool = False


def _stage_layer(
    a: _Archive, spec: _LayerSpec, s: _Staged, home: str, budget: int, progress: _Progress
) -> None:
    """Extract one layer blob to a temporary folder and check both its digests; on any
    failure nothing is left."""
    src = a.scan.tf.extractfile(spec.member)
    if src is None:  # pragma: no cover - regular members always have data
        raise _fail(a.label, "a layer blob has no data")
    stream = io.BufferedReader(_ProgressReader(src, progress.add), _CHUNK)
    # The extractor reads the blob to its end and reports both the sha256 of its bytes
    # (the blob digest) and of the uncompressed tar (the diff id).
    tmp, result = _extract_to_temp(home, "image", stream, budget, s.layer_id, "ImportImage")
    try:
        if spec.blob_hex is not None and result.digest != spec.blob_hex:
            raise _fail(a.label, "a layer blob does not match its digest",
                        f"sha256:{spec.blob_hex}")
        if result.diff_id != spec.diff_hex:
            raise _fail(a.label, "a layer does not match its diff id", f"sha256:{spec.diff_hex}")
    except BaseException:
        _discard(tmp)
        raise
    s.tmp, s.size = tmp, result.size


def _chain_id(parent: str | None, diff_hex: str) -> str:
    """The OCI chain id (hex) of a layer with diff id *diff_hex* over chain *parent*."""
    if parent is None:
        return diff_hex
    return hashlib.sha256(f"sha256:{parent} sha256:{diff_hex}".encode()).hexdigest()


def _usable(reg: Registry, layer_id: str) -> bool:
    row = _row(reg, layer_id)
    return row is not None and os.path.isdir(row["path"])


def _commit(
    reg: Registry, r: Roots, staged: list[_Staged], name: str, config: dict[str, Any],
    label: str,
) -> None:
    """Register the staged layers in chain order (sharing any the store has by now) and
    name the top one; all or nothing. Temporary folders are gone when this returns."""
    op = "ImportImage"
    home = str(r.layers_dir)
    try:
        with _images_lock(r):
            try:
                for s in staged:
                    _publish_one(reg, s, home, label, op)
                reg.execute(
                    "INSERT OR REPLACE INTO images (name, top_layer, config, created) "
                    "VALUES (?, ?, ?, ?)",
                    (name, staged[-1].layer_id, reg.dumps(config), reg.now()),
                )
            except BaseException:
                for s in reversed(staged):
                    if s.published:
                        with contextlib.suppress(LayerError):
                            destroy_layer(DriverInfo(FILTER_DRIVER, home), s.layer_id, roots=r)
                raise
    finally:
        for s in staged:
            if s.tmp is not None:
                _discard(s.tmp)


def _publish_one(reg: Registry, s: _Staged, home: str, label: str, op: str) -> None:
    if _usable(reg, s.layer_id):
        return  # shared: in the store already (perhaps published by a concurrent import)
    if s.tmp is None:
        raise _fail(label, "a shared layer was removed during the import; import again",
                    s.layer_id)
    if _row(reg, s.layer_id) is not None:
        # Registered but its folder was removed by hand: replace the stale row.
        reg.execute("DELETE FROM layers WHERE id = ?", (s.layer_id,))
    tmp, s.tmp = s.tmp, None  # _publish consumes it, on success and on failure
    _publish(
        reg,
        tmp,
        os.path.join(home, s.layer_id),
        layer_id=s.layer_id,
        op=op,
        parent=s.parent,
        kind=_KIND_LAYER if s.parent else _KIND_BASE,
        flavour=FILTER_DRIVER,
        digest=s.digest,
        size=s.size,
    )
    s.published = True


def _import_archive(
    a: _Archive,
    name: str | None,
    config: dict[str, Any] | None,
    max_size: int,
    progress: _Progress,
    r: Roots,
) -> str:
    op = "ImportImage"
    if a.scan.overflow:
        raise _fail(a.label, f"the archive has more than {_MAX_ARCHIVE_MEMBERS} files")
    markers = a.scan.markers
    if _OCI_LAYOUT in markers or _OCI_INDEX in markers:
        spec = _oci_spec(a, name)
    else:
        spec = _docker_spec(a, name)
    image_name = name if name is not None else spec.default_name
    if image_name is None:
        raise InvalidConfigError(op, message="the archive names no image; give it a name")
    _check_name(image_name, op)
    reg = _registry(r)
    home = str(r.layers_dir)
    staged: list[_Staged] = []
    parent: str | None = None
    for layer in spec.layers:
        staged.append(_Staged(_chain_id(parent, layer.diff_hex), parent, layer.diff_hex))
        parent = staged[-1].layer_id
    todo = [
        (s, layer)
        for s, layer in zip(staged, spec.layers, strict=True)
        if not _usable(reg, s.layer_id)
    ]
    progress.start(sum(layer.member.size for _, layer in todo))
    try:
        used = 0
        for s, layer in todo:
            _stage_layer(a, layer, s, home, max_size - used, progress)
            used += s.size
    except BaseException:
        for s in staged:
            if s.tmp is not None:
                _discard(s.tmp)
        raise
    _commit(reg, r, staged, image_name, {**spec.config, **(config or {})}, a.label)
    return image_name


def _import_rootfs(
    f: IO[bytes],
    name: str | None,
    config: dict[str, Any] | None,
    max_size: int,
    progress: _Progress,
    r: Roots,
    label: str,
) -> str:
    op = "ImportImage"
    if name is None:
        raise InvalidConfigError(
            op, message="the archive is a root file system tar, not an image; give it a name"
        )
    start = f.tell()
    total = f.seek(0, os.SEEK_END) - start
    f.seek(start)
    progress.start(total)
    raw = _ProgressReader(f, progress.add)
    tmp, result = _extract_to_temp(
        str(r.layers_dir), "image", io.BufferedReader(raw, _CHUNK), max_size, name, op
    )
    staged = [_Staged(result.diff_id, None, result.diff_id, tmp, result.size)]
    _commit(_registry(r), r, staged, name, dict(config or {}), label)
    return name


def import_image(
    name: str | None,
    archive: _Source,
    *,
    config: dict[str, Any] | None = None,
    max_size: int = DEFAULT_MAX_SIZE,
    progress: ProgressCallback | None = None,
    roots: Roots | None = None,
) -> ImageInfo:
    """Import the image in *archive* (a path or a readable binary stream) as *name*.

    *archive* is an OCI image layout tar, a ``docker save`` tar, or a root file system tar
    (a single-layer image), told apart by content: a top-level ``oci-layout`` or
    ``index.json`` makes it an OCI layout, else a top-level ``manifest.json`` a docker
    archive, else it is a root file system. Any of them may be compressed (gzip, and what
    else the layer extractor accepts). Layer blobs may be plain or compressed likewise.

    *name* ``None`` takes the archive's own name: the ``io.containerd.image.name`` or else
    ``org.opencontainers.image.ref.name`` annotation of an OCI layout, the first
    ``RepoTags`` entry of a docker archive. It also chooses among several images in one
    archive (by those names); otherwise the manifest for this host's platform
    (``linux/amd64`` here) or the only one is taken. An existing image of the same name is
    re-pointed (as ``docker load`` retags); its old layers stay.

    Each layer is stored once under its chain id and shared with every image that has it
    (see the module docs); the image records the top layer, the chain follows. The image
    config's :data:`IMAGE_CONFIG_KEYS` are kept, *config* merged over them (for a root
    file system tar, *config* is the whole config). Layers are extracted as by
    :func:`~pyhcs._layers.import_layer_from_tar` (same safety); *max_size* bounds the
    bytes the whole import may write. *progress*, if given, is called as
    ``progress(done, total)`` with bytes of the archive read.

    Raises :class:`ImageArchiveError` (a :class:`LayerError`) for a malformed or hostile
    archive, a missing blob, a digest or diff-id mismatch; :class:`LayerError` for a layer
    the extractor refuses; :class:`InvalidConfigError` for a bad or missing name. On any
    error nothing is stored.
    """
    op = "ImportImage"
    if name is not None:
        _check_name(name, op)
    if max_size < 0:
        raise InvalidConfigError(op, extra_info=f"max_size {max_size}", message="must be >= 0")
    r = _roots(roots)
    label = os.fspath(archive) if isinstance(archive, (str, os.PathLike)) else "<stream>"
    prog = _Progress(progress)
    home = str(r.layers_dir)
    with _plain_seekable(archive, home, max_size, label) as f:
        start = f.tell()
        scan = _scan(f, label)
        if scan is not None and scan.markers:
            with contextlib.closing(scan.tf):
                image_name = _import_archive(_Archive(label, scan), name, config, max_size,
                                             prog, r)
        else:
            if scan is not None:
                scan.tf.close()
            f.seek(start)
            image_name = _import_rootfs(f, name, config, max_size, prog, r, label)
    return resolve_image(image_name, roots=r)


def list_images(*, roots: Roots | None = None) -> list[ImageInfo]:
    """Every image, sorted by name."""
    reg = _registry(roots)
    rows = reg.query("SELECT * FROM images ORDER BY name")
    return [_info(reg, row, "ListImages") for row in rows]


def resolve_image(name_or_layer_id: str, *, roots: Roots | None = None) -> ImageInfo:
    """The image named *name_or_layer_id*, or else the chain whose top is that layer.

    For a bare layer the result's name is the layer id and its config ``{}``. Raises
    :class:`ImageNotFoundError` if neither exists, :class:`LayerError` if a layer of the
    chain is missing.
    """
    op = "ResolveImage"
    reg = _registry(roots)
    row = reg.query_one("SELECT * FROM images WHERE name = ?", (name_or_layer_id,))
    if row is not None:
        return _info(reg, row, op)
    if isinstance(name_or_layer_id, str) and _ID_RE.fullmatch(name_or_layer_id):
        layer = _row(reg, name_or_layer_id)
        if layer is not None:
            return ImageInfo(
                name=name_or_layer_id,
                top_layer=name_or_layer_id,
                layer_chain=_chain(reg, name_or_layer_id, op, name_or_layer_id),
                config={},
                created=float(layer["created"]),
            )
    raise ImageNotFoundError(
        str(name_or_layer_id), op, ERR_ELEMENT_NOT_FOUND, message="no such image or layer"
    )


def remove_image(name: str, *, prune_layers: bool = True, roots: Roots | None = None) -> None:
    """Forget the image *name*; with *prune_layers*, also destroy its layers that nothing
    else uses (no other image's top layer, no other layer's parent, e.g. no sandbox), from
    the top down to the first layer still in use: layers shared with another image stay.

    Raises :class:`ImageNotFoundError` for an unknown name; a layer that cannot be
    destroyed raises :class:`LayerError` after the name is gone.
    """
    op = "RemoveImage"
    r = _roots(roots)
    reg = _registry(r)
    with _images_lock(r):
        row = reg.query_one("SELECT * FROM images WHERE name = ?", (name,))
        if row is None:
            raise ImageNotFoundError(name, op, ERR_ELEMENT_NOT_FOUND, message="no such image")
        reg.execute("DELETE FROM images WHERE name = ?", (name,))
        if not prune_layers:
            return
        layer: str | None = row["top_layer"]
        for _ in range(_MAX_CHAIN):
            if not layer:
                break
            lrow = _row(reg, layer)
            if lrow is None:
                break
            used = reg.query_one(
                "SELECT 1 FROM images WHERE top_layer = ? UNION ALL "
                "SELECT 1 FROM layers WHERE parent = ? LIMIT 1",
                (layer, layer),
            )
            if used is not None:
                break
            _check_id(layer, op)
            info = DriverInfo(int(lrow["flavour"]), os.path.dirname(lrow["path"]))
            destroy_layer(info, layer, roots=r)
            layer = lrow["parent"]
