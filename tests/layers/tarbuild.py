"""Build layer tars, well-formed or hostile, for the layer-store tests."""

from __future__ import annotations

import hashlib
import io
import os
import stat
import tarfile
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Entry:
    """One tar entry; ``kind`` is a tarfile type constant."""

    name: str
    kind: bytes = tarfile.REGTYPE
    data: bytes = b""
    linkname: str = ""
    mode: int = 0o644
    uid: int = 0
    gid: int = 0
    mtime: float = 1_600_000_000
    devmajor: int = 0
    devminor: int = 0
    pax: dict[str, str] = field(default_factory=dict)


def f(name: str, data: bytes = b"", **kw: object) -> Entry:
    return Entry(name, tarfile.REGTYPE, data, **kw)  # type: ignore[arg-type]


def d(name: str, mode: int = 0o755, **kw: object) -> Entry:
    return Entry(name, tarfile.DIRTYPE, mode=mode, **kw)  # type: ignore[arg-type]


def sym(name: str, target: str) -> Entry:
    return Entry(name, tarfile.SYMTYPE, linkname=target, mode=0o777)


def hl(name: str, target: str) -> Entry:
    return Entry(name, tarfile.LNKTYPE, linkname=target)


def dev(name: str, kind: bytes, major: int, minor: int) -> Entry:
    return Entry(name, kind, devmajor=major, devminor=minor, mode=0o600)


def build(entries: list[Entry], *, gz: bool = False) -> bytes:
    """The archive's bytes (pax format, so long names and xattrs are expressible)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w|gz" if gz else "w|", format=tarfile.PAX_FORMAT) as tf:
        for e in entries:
            ti = tarfile.TarInfo(e.name)
            ti.type = e.kind
            ti.mode = e.mode
            ti.uid, ti.gid = e.uid, e.gid
            ti.mtime = e.mtime
            ti.linkname = e.linkname
            ti.devmajor, ti.devminor = e.devmajor, e.devminor
            ti.pax_headers = dict(e.pax)
            if e.kind in (tarfile.REGTYPE, tarfile.AREGTYPE):
                ti.size = len(e.data)
                tf.addfile(ti, io.BytesIO(e.data))
            else:
                tf.addfile(ti)
    return buf.getvalue()


def strip_end_marker(raw: bytes) -> bytes:
    """The archive without its end-of-archive zero blocks (a truncated stream)."""
    body = raw.rstrip(b"\0")
    return raw[: -(-len(body) // 512) * 512]


def tree_digest(root: Path) -> str:
    """A hash of everything under *root*: names, types, modes, owners, times, content."""
    h = hashlib.sha256()
    for base, dirs, files in os.walk(root, followlinks=False):
        dirs.sort()
        for name in sorted(dirs + files):
            p = os.path.join(base, name)
            st = os.lstat(p)
            h.update(os.path.relpath(p, root).encode())
            h.update(
                f"{st.st_mode}:{st.st_uid}:{st.st_gid}:{st.st_mtime_ns}:{st.st_nlink}".encode()
            )
            if stat.S_ISLNK(st.st_mode):
                h.update(os.readlink(p).encode())
            elif stat.S_ISREG(st.st_mode):
                h.update(Path(p).read_bytes())
    st = os.lstat(root)
    h.update(f"{st.st_mode}:{st.st_mtime_ns}:{st.st_nlink}".encode())
    return h.hexdigest()


def mounted(path: str | os.PathLike[str]) -> bool:
    """True if *path* is a mount point in this mount namespace."""
    real = os.path.realpath(path)
    with open("/proc/self/mountinfo") as fh:
        return any(line.split()[4] == real for line in fh)
