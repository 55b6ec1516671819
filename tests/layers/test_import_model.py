"""The import against a model of what it promises, on random archives.

The importer checks entries in Python and has a confined GNU tar write them
(:mod:`pyhcs._layers._gnutar`); where tar alone would differ (a name taken twice, a
directory described twice or come back to after others, implicit parents, opaque markers)
the importer corrects it. Hypothesis builds archives over a tiny name space, so those cases
are frequent, and the tree on disk must be exactly the model's: types, modes, owners,
nanosecond times (directories included), contents, link targets, hard-link identity,
whiteouts and opacity. An archive the model refuses must be refused.

Also here: the confinement of tar itself, which must hold even for a stream no check has
seen, and the xattr policy through tar.
"""

from __future__ import annotations

import errno
import io
import os
import stat
import struct
import subprocess
import tarfile
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from pyhcs._layers._extract import ArchiveError, extract_tar
from pyhcs._layers._gnutar import ConfinedTar, TarError, header

from .tarbuild import Entry, build

_OPAQUE = "trusted.overlay.opaque"


@dataclass(eq=False)
class _Node:
    kind: str  # "f" file, "d" dir, "l" symlink, "w" whiteout, "p" fifo
    mode: int = 0o755
    uid: int = 0
    gid: int = 0
    mtime_ns: int = 0
    data: bytes = b""
    opaque: bool = False


class _Refused(Exception):
    pass


@dataclass
class _Model:
    """What the import must make of a sequence of entries."""

    tree: dict[tuple[str, ...], _Node] = field(default_factory=dict)
    root: _Node = field(default_factory=lambda: _Node("d"))

    def _parents(self, parts: tuple[str, ...]) -> None:
        for i in range(1, len(parts)):
            node = self.tree.get(parts[:i])
            if node is None:
                self.tree[parts[:i]] = _Node("d")
            elif node.kind != "d":
                raise _Refused

    def _put(self, parts: tuple[str, ...], node: _Node) -> None:
        self._parents(parts)
        old = self.tree.get(parts)
        if old is not None:
            if old.kind == "d" and node.kind == "d":
                old.mode, old.uid, old.gid = node.mode, node.uid, node.gid
                old.mtime_ns = node.mtime_ns
                return
            for k in [k for k in self.tree if k[: len(parts)] == parts]:
                del self.tree[k]
        self.tree[parts] = node

    def apply(self, e: Entry) -> None:
        parts = tuple(e.name.split("/"))
        ns = int(e.pax["mtime"].replace(".", "")) if "mtime" in e.pax else int(e.mtime) * 10**9
        base = parts[-1]
        if base == ".wh..wh..opq":
            self._parents((*parts[:-1], "x"))
            if parts[:-1] in self.tree:
                if self.tree[parts[:-1]].kind != "d":
                    raise _Refused
            elif parts[:-1]:
                self.tree[parts[:-1]] = _Node("d")
            (self.tree[parts[:-1]] if parts[:-1] else self.root).opaque = True
        elif base.startswith(".wh."):
            self._put((*parts[:-1], base[4:]), _Node("w", 0, 0, 0, ns))
        elif e.kind == tarfile.DIRTYPE:
            self._put(parts, _Node("d", e.mode, e.uid, e.gid, ns))
        elif e.kind == tarfile.REGTYPE:
            self._put(parts, _Node("f", e.mode, e.uid, e.gid, ns, e.data))
        elif e.kind == tarfile.SYMTYPE:
            self._put(parts, _Node("l", 0o777, e.uid, e.gid, ns, e.linkname.encode()))
        elif e.kind == tarfile.FIFOTYPE:
            self._put(parts, _Node("p", e.mode, e.uid, e.gid, ns))
        elif e.kind == tarfile.LNKTYPE:
            target = tuple(e.linkname.split("/"))
            node = self.tree.get(target)
            if node is None or node.kind == "d" or target == parts:
                raise _Refused
            self._put(parts, node)
            if target not in self.tree:
                raise _Refused

    def expected(self) -> dict[str, tuple[object, ...]]:
        ids: dict[int, int] = {}
        out = {".": _describe(self.root, ids)}
        for parts, node in self.tree.items():
            out["/".join(parts)] = _describe(node, ids)
        return _name_groups(out)


def _name_groups(tree: Mapping[str, tuple[object, ...]]) -> dict[str, tuple[object, ...]]:
    """Hard-link groups named by their first path, so numbering order does not matter."""
    first: dict[object, str] = {}
    for path in sorted(tree):
        group = tree[path][-1]
        if group is not None:
            first.setdefault(group, path)
    return {p: (*v[:-1], first.get(v[-1])) for p, v in tree.items()}


def _describe(node: _Node, ids: dict[int, int]) -> tuple[object, ...]:
    group = ids.setdefault(id(node), len(ids)) if node.kind in "fp" else None
    mode = 0 if node.kind == "w" else node.mode & 0o7777
    if node.kind == "l":
        mode = 0o777
    return (node.kind, mode, node.uid, node.gid, node.mtime_ns, node.data, node.opaque, group)


def _actual(root: Path) -> dict[str, tuple[object, ...]]:
    ids: dict[int, int] = {}
    out = {}
    for path in [root, *sorted(root.rglob("*"))]:
        s = os.lstat(path)
        rel = os.path.relpath(path, root)
        if stat.S_ISDIR(s.st_mode):
            kind, data = "d", b""
        elif stat.S_ISREG(s.st_mode):
            kind, data = "f", path.read_bytes()
        elif stat.S_ISLNK(s.st_mode):
            kind, data = "l", os.fsencode(os.readlink(path))
        elif stat.S_ISCHR(s.st_mode) and s.st_rdev == 0:
            kind, data = "w", b""
        elif stat.S_ISFIFO(s.st_mode):
            kind, data = "p", b""
        else:
            raise AssertionError(f"{rel}: unexpected file type {s.st_mode:o}")
        try:
            opaque = os.getxattr(path, _OPAQUE, follow_symlinks=False) == b"y"
        except OSError:
            opaque = False
        group = ids.setdefault(s.st_ino, len(ids)) if kind in "fp" else None
        out[rel] = (kind, stat.S_IMODE(s.st_mode), s.st_uid, s.st_gid, s.st_mtime_ns, data,
                    opaque, group)
    return _name_groups(out)


_NAMES = st.lists(st.sampled_from(["a", "b", "c"]), min_size=1, max_size=3).map("/".join)
_MODES = st.sampled_from([0o755, 0o644, 0o600, 0o555, 0o4755, 0o1777])
_UIDS = st.sampled_from([0, 1000])
_GIDS = st.sampled_from([0, 100])
_MTIMES = st.sampled_from([1_000_000_000, 1_600_000_000])
_NANOS = st.sampled_from([{}, {"mtime": "1500000000.123456789"}])


@st.composite
def _entry(draw: st.DrawFn) -> Entry:
    name = draw(_NAMES)
    kind = draw(st.sampled_from(["f", "d", "l", "h", "p", "wh", "opq"]))
    base = Entry(name, mode=draw(_MODES), uid=draw(_UIDS), gid=draw(_GIDS),
                 mtime=draw(_MTIMES), pax=draw(_NANOS))
    if kind == "f":
        return replace(base, data=draw(st.binary(max_size=20)))
    if kind == "d":
        return replace(base, kind=tarfile.DIRTYPE)
    if kind == "l":
        return replace(base, kind=tarfile.SYMTYPE, mode=0o644,
                       linkname=draw(st.sampled_from(["a", "/etc", "../b"])))
    if kind == "h":
        return Entry(name, tarfile.LNKTYPE, linkname=draw(_NAMES))
    if kind == "p":
        return replace(base, kind=tarfile.FIFOTYPE)
    head, _, tail = name.rpartition("/")
    wh = ".wh..wh..opq" if kind == "opq" else ".wh." + tail
    return Entry(f"{head}/{wh}" if head else wh, tarfile.REGTYPE, mtime=base.mtime)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(entries=st.lists(_entry(), min_size=1, max_size=12))
def test_import_makes_exactly_the_models_tree(
    entries: list[Entry], tmp_path_factory: pytest.TempPathFactory
) -> None:
    model = _Model()
    try:
        for e in entries:
            model.apply(e)
        refused = False
    except _Refused:
        refused = True
    event("refused" if refused else "imported")
    names = [e.name for e in entries]
    event("a name taken twice" if len(set(names)) < len(names) else "names unique")
    dest = tmp_path_factory.mktemp("fs")
    os.chmod(dest, 0o755)
    if refused:
        with pytest.raises(ArchiveError):
            extract_tar(_stream(build(entries)), str(dest))
        return
    extract_tar(_stream(build(entries)), str(dest))
    assert _actual(dest) == model.expected()


def _stream(data: bytes) -> io.BytesIO:
    return io.BytesIO(data)


def _raw(*entries: tuple[bytes, bytes]) -> bytes:
    """A tar of (header, data) pairs in the canonical encoding, with its end marker."""
    out = b""
    for head, data in entries:
        out += head + data + bytes(-len(data) % 512)
    return out + bytes(1024)


@pytest.mark.parametrize("name", ["absolute", "dotdot"])
def test_tar_is_confined_even_for_a_stream_no_check_has_seen(
    name: str, tmp_path: Path
) -> None:
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "secret").write_text("do not touch")
    dest = tmp_path / "dest"
    dest.mkdir()
    target = str(victim / "pwned") if name == "absolute" else "../victim/pwned"
    tar = ConfinedTar(str(dest))
    try:
        tar.add(_raw((header(b"inside", b"0", 0o644, 0, 0, 2, 0), b"ok"),
                     (header(os.fsencode(target), b"0", 0o644, 0, 0, 6, 0), b"pwned!"),
                     (header(b"secret-link", b"1", 0o644, 0, 0, 0, 0,
                             link=os.fsencode(victim / "secret")), b"")))
        with pytest.raises(TarError) as e:
            tar.finish()
    finally:
        tar.abort()
    assert e.value.errno == errno.EROFS, e.value
    assert sorted(os.listdir(victim)) == ["secret"]
    assert (victim / "secret").read_text() == "do not touch"
    assert os.stat(victim / "secret").st_nlink == 1
    assert (dest / "inside").read_bytes() == b"ok"  # the destination itself is writable


def test_file_capabilities_survive_the_owner_change(tmp_path: Path) -> None:
    # VFS_CAP_REVISION_2 with the effective flag, permitted: cap_net_bind_service (10).
    cap = struct.pack("<5I", 0x02000001, 1 << 10, 0, 0, 0)
    data = b"\x7fELF"
    archive = _raw((header(b"bin/ping", b"0", 0o755, 1000, 1000, len(data), 0,
                           xattrs={b"security.capability": cap, b"user.note": b"\xff\x00raw"}),
                    data))
    dest = tmp_path / "fs"
    dest.mkdir()
    extract_tar(_stream(archive), str(dest))
    ping = dest / "bin" / "ping"
    assert (os.stat(ping).st_uid, os.stat(ping).st_gid) == (1000, 1000)
    assert os.getxattr(ping, "security.capability") == cap
    assert os.getxattr(ping, "user.note") == b"\xff\x00raw"  # binary values stay binary


def test_a_failed_import_leaves_no_tar_running(tmp_path: Path) -> None:
    dest = tmp_path / "fs"
    dest.mkdir()
    big = Entry("big", tarfile.REGTYPE, b"x" * (1 << 20))
    archive = build([big, Entry("evil", tarfile.CHRTYPE, devmajor=1, devminor=3)])
    with pytest.raises(ArchiveError, match="not allowed"):
        extract_tar(_stream(archive), str(dest))
    children = subprocess.run(["pgrep", "-P", str(os.getpid()), "-x", "tar"],
                              capture_output=True, text=True).stdout
    assert children == ""
