"""Build image archives for the tests: OCI image layouts and ``docker save`` tars.

An :class:`Archive` is a list of files (archive path -> bytes, in tar order) that tests
may tamper with before :meth:`Archive.tar` writes it out.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gzip
import hashlib
import io
import json
import tarfile
from dataclasses import dataclass, field
from typing import Any

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
LAYER_MEDIA = {
    "none": "application/vnd.oci.image.layer.v1.tar",
    "gzip": "application/vnd.oci.image.layer.v1.tar+gzip",
    "zstd": "application/vnd.oci.image.layer.v1.tar+zstd",
}
REF_NAME = "org.opencontainers.image.ref.name"


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def digest(data: bytes) -> str:
    return "sha256:" + sha(data)


def jbytes(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True).encode()


def zstd_compress(data: bytes) -> bytes:
    """zstd through the system's libzstd (Debian's libzstd1), as the tests' compressor."""
    lib = ctypes.CDLL(ctypes.util.find_library("zstd") or "libzstd.so.1")
    lib.ZSTD_compressBound.restype = ctypes.c_size_t
    lib.ZSTD_compressBound.argtypes = [ctypes.c_size_t]
    lib.ZSTD_compress.restype = ctypes.c_size_t
    lib.ZSTD_compress.argtypes = [
        ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p, ctypes.c_size_t, ctypes.c_int
    ]
    lib.ZSTD_isError.argtypes = [ctypes.c_size_t]
    cap = lib.ZSTD_compressBound(len(data))
    out = ctypes.create_string_buffer(cap)
    n = lib.ZSTD_compress(out, cap, data, len(data), 3)
    assert not lib.ZSTD_isError(n)
    return out.raw[:n]


def compress(data: bytes, how: str) -> bytes:
    if how == "gzip":
        return gzip.compress(data, mtime=0)
    if how == "zstd":
        return zstd_compress(data)
    assert how == "none"
    return data


@dataclass
class Archive:
    """The files of an image archive, in order; ``tar()`` writes them as a plain tar."""

    files: dict[str, bytes] = field(default_factory=dict)
    #: Symlinks to add: archive path -> target.
    links: dict[str, str] = field(default_factory=dict)

    def add_blob(self, data: bytes) -> str:
        self.files[f"blobs/sha256/{sha(data)}"] = data
        return digest(data)

    def blob(self, d: str) -> bytes:
        return self.files[f"blobs/sha256/{d.split(':', 1)[1]}"]

    def json(self, path: str) -> Any:
        return json.loads(self.files[path])

    def set_json(self, path: str, obj: Any) -> None:
        self.files[path] = jbytes(obj)

    def tar(self) -> bytes:
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
            dirs: set[str] = set()
            for path, data in self.files.items():
                parts = path.split("/")
                for i in range(1, len(parts)):
                    d = "/".join(parts[:i])
                    if d not in dirs:
                        dirs.add(d)
                        ti = tarfile.TarInfo(d)
                        ti.type = tarfile.DIRTYPE
                        ti.mode = 0o755
                        tf.addfile(ti)
                ti = tarfile.TarInfo(path)
                ti.size = len(data)
                ti.mode = 0o644
                tf.addfile(ti, io.BytesIO(data))
            for path, target in self.links.items():
                ti = tarfile.TarInfo(path)
                ti.type = tarfile.SYMTYPE
                ti.linkname = target
                tf.addfile(ti)
        return buf.getvalue()


def config_doc(layers: list[bytes], config: dict[str, Any] | None = None,
               arch: str = "amd64") -> dict[str, Any]:
    return {
        "architecture": arch,
        "os": "linux",
        "config": config or {},
        "rootfs": {"type": "layers", "diff_ids": [digest(t) for t in layers]},
    }


def add_oci_manifest(a: Archive, layers: list[bytes], config: dict[str, Any] | None = None,
                     *, compression: str = "gzip", arch: str = "amd64") -> dict[str, Any]:
    """Add one image's blobs (layers, config, manifest); return its manifest descriptor."""
    descs = []
    for t in layers:
        blob = compress(t, compression)
        descs.append({"mediaType": LAYER_MEDIA[compression], "digest": a.add_blob(blob),
                      "size": len(blob)})
    cfg = jbytes(config_doc(layers, config, arch))
    manifest = jbytes({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": OCI_CONFIG, "digest": a.add_blob(cfg), "size": len(cfg)},
        "layers": descs,
    })
    return {"mediaType": OCI_MANIFEST, "digest": a.add_blob(manifest), "size": len(manifest),
            "platform": {"os": "linux", "architecture": arch}}


def oci_layout(layers: list[bytes], config: dict[str, Any] | None = None, *,
               ref_name: str | None = "test:1", compression: str = "gzip") -> Archive:
    """An OCI image layout holding one image of *layers* (uncompressed tars, base first)."""
    a = Archive()
    desc = add_oci_manifest(a, layers, config, compression=compression)
    if ref_name is not None:
        desc["annotations"] = {REF_NAME: ref_name}
    a.set_json("index.json", {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [desc]})
    a.set_json("oci-layout", {"imageLayoutVersion": "1.0.0"})
    return a


def manifest_of(a: Archive, index_entry: int = 0) -> dict[str, Any]:
    d = a.json("index.json")["manifests"][index_entry]["digest"]
    return dict(json.loads(a.blob(d)))


def replace_blob(a: Archive, old_digest: str, data: bytes) -> None:
    """Put *data* where the blob *old_digest* was, under the old name (a corrupt blob)."""
    a.files[f"blobs/sha256/{old_digest.split(':', 1)[1]}"] = data


def docker_save(layers: list[bytes], config: dict[str, Any] | None = None, *,
                repo_tags: list[str] | None = None) -> Archive:
    """A legacy ``docker save`` archive: ``<id>/layer.tar`` per layer, ``<hex>.json``
    config, ``manifest.json`` last (as docker writes it)."""
    a = Archive()
    paths = []
    for i, t in enumerate(layers):
        layer_dir = sha(f"{i}:{sha(t)}".encode())
        a.files[f"{layer_dir}/VERSION"] = b"1.0"
        a.files[f"{layer_dir}/layer.tar"] = t
        paths.append(f"{layer_dir}/layer.tar")
    cfg = jbytes(config_doc(layers, config))
    a.files[f"{sha(cfg)}.json"] = cfg
    a.set_json("manifest.json", [{
        "Config": f"{sha(cfg)}.json",
        "RepoTags": ["test:1"] if repo_tags is None else repo_tags,
        "Layers": paths,
    }])
    return a
