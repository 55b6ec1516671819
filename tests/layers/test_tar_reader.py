"""The import's own tar reader: every header flavour GNU tar and Python write (GNU long
names and base-256 numbers, ustar prefixes, pax records, global pax headers, old V7
directories) gives the tree GNU tar gives, and what it must not forgive is refused."""

from __future__ import annotations

import hashlib
import io
import os
import stat
import subprocess
import tarfile
from collections.abc import Callable
from pathlib import Path

import pytest

from pyhcs._errors import LayerError
from pyhcs._layers import DriverInfo, import_layer_from_tar, layer_exists
from pyhcs._paths import Roots

LONG_DIR = "a-rather-long-directory-name-" + "x" * 40
LONG_NAME = f"{LONG_DIR}/{LONG_DIR}/file-with-a-long-name-" + "y" * 40  # > 100 bytes
BIG = os.urandom((3 << 19) + 123)  # 1.5 MiB and a bit: crosses the reader's buffer


def _add(
    tf: tarfile.TarFile, name: str, kind: bytes = tarfile.REGTYPE, data: bytes = b"", **kw: object
) -> None:
    ti = tarfile.TarInfo(name)
    ti.type = kind
    ti.mtime = 1_500_000_000
    ti.mode = 0o644
    for k, v in kw.items():
        setattr(ti, k, v)
    if kind == tarfile.REGTYPE:
        ti.size = len(data)
        tf.addfile(ti, io.BytesIO(data))
    else:
        tf.addfile(ti)


def _archive(fmt: int) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tf:
        _add(tf, "d", tarfile.DIRTYPE, mode=0o750, uid=1000, gid=1000)
        _add(tf, "d/small", data=b"hello\n", uid=1000, gid=100)
        _add(tf, "d/exact", data=bytes(range(256)) * 2)  # exactly one block
        _add(tf, "d/empty")
        _add(tf, "d/big", data=BIG, mode=0o755)
        _add(tf, "d/setuid", data=b"#!/bin/sh\n", mode=0o4755)
        _add(tf, LONG_NAME, data=b"long\n")  # ustar: prefix + name; GNU: 'L'; pax: path
        _add(tf, "d/link", tarfile.SYMTYPE, linkname="small", mode=0o777)
        _add(tf, "d/hard", tarfile.LNKTYPE, linkname="d/small")
        _add(tf, "d/fifo", tarfile.FIFOTYPE, mode=0o600)
        # Owners beyond 7 octal digits: base-256 (GNU) or a pax record; ustar cannot.
        big_uid = 3_000_000 if fmt != tarfile.USTAR_FORMAT else 2_000_000
        _add(tf, "d/owned", data=b"x", uid=big_uid, gid=big_uid)
        if fmt != tarfile.USTAR_FORMAT:  # a symlink target over 100 bytes: 'K' or pax
            _add(tf, "d/longlink", tarfile.SYMTYPE, linkname="../" + LONG_NAME, mode=0o777)
    return buf.getvalue()


def _describe(root: Path, names: list[str]) -> dict[str, tuple[object, ...]]:
    out: dict[str, tuple[object, ...]] = {}
    for name in names:
        st = os.lstat(root / name)
        body: object = None
        if stat.S_ISREG(st.st_mode):
            body = hashlib.sha256((root / name).read_bytes()).hexdigest()
        elif stat.S_ISLNK(st.st_mode):
            body = os.readlink(root / name)
        mode = st.st_mode if not stat.S_ISLNK(st.st_mode) else stat.S_IFLNK
        # GNU tar puts a symlink with a '..' target in place last, after it has set its
        # directory's time: directory times are compared on the import alone.
        mtime = int(st.st_mtime) if not stat.S_ISDIR(st.st_mode) else None
        out[name] = (mode, st.st_uid, st.st_gid, mtime, st.st_size, body)
    # Hard links: the same file twice.
    small, hard = os.lstat(root / "d/small"), os.lstat(root / "d/hard")
    out["hardlinked"] = (small.st_ino == hard.st_ino, small.st_nlink)
    return out


@pytest.mark.parametrize(
    "fmt",
    [tarfile.GNU_FORMAT, tarfile.USTAR_FORMAT, tarfile.PAX_FORMAT],
    ids=["gnu", "ustar", "pax"],
)
def test_every_header_flavour_gives_what_gnu_tar_gives(
    roots: Roots, tmp_path: Path, fmt: int
) -> None:
    raw = _archive(fmt)
    with tarfile.open(fileobj=io.BytesIO(raw)) as tf:
        names = [m.name for m in tf.getmembers()]
    archive = tmp_path / "a.tar"
    archive.write_bytes(raw)
    expected_dir = tmp_path / "gnu"
    expected_dir.mkdir()
    subprocess.run(["tar", "-xf", str(archive), "-C", str(expected_dir)], check=True)
    fs = Path(import_layer_from_tar(DriverInfo(), "t", str(archive))) / "fs"
    assert _describe(fs, names) == _describe(expected_dir, names)
    assert os.lstat(fs / "d").st_mtime == 1_500_000_000
    assert os.lstat(fs / "d/setuid").st_mode & stat.S_ISUID
    assert (fs / "d/big").read_bytes() == BIG
    big_uid = 2_000_000 if fmt == tarfile.USTAR_FORMAT else 3_000_000
    assert os.lstat(fs / "d/owned").st_uid == big_uid


def test_global_pax_headers_apply_to_the_entries_after_them(roots: Roots) -> None:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT,
                      pax_headers={"uid": "4321", "comment": "global"}) as tf:
        _add(tf, "a", data=b"a")
        _add(tf, "b", data=b"b", pax_headers={"uid": "7"})  # a per-entry record wins
    fs = Path(import_layer_from_tar(DriverInfo(), "g", io.BytesIO(buf.getvalue()))) / "fs"
    assert os.lstat(fs / "a").st_uid == 4321
    assert os.lstat(fs / "b").st_uid == 7


def test_an_old_v7_directory_is_a_directory(roots: Roots) -> None:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tf:
        _add(tf, "old/", tarfile.AREGTYPE, mode=0o700)
        _add(tf, "old/f", data=b"x")
    fs = Path(import_layer_from_tar(DriverInfo(), "v7", io.BytesIO(buf.getvalue()))) / "fs"
    assert stat.S_ISDIR(os.lstat(fs / "old").st_mode)
    assert stat.S_IMODE(os.lstat(fs / "old").st_mode) == 0o700
    assert (fs / "old/f").read_bytes() == b"x"


def _with_header(raw: bytearray, name: bytes, edit: dict[int, bytes]) -> bytes:
    """*raw* with the header of member *name* changed at the given offsets, re-checksummed."""
    off = 0
    while raw[off : off + len(name) + 1] != name + b"\0":
        off += 512
    for at, value in edit.items():
        raw[off + at : off + at + len(value)] = value
    raw[off + 148 : off + 156] = b" " * 8
    raw[off + 148 : off + 156] = b"%06o\0 " % sum(raw[off : off + 512])
    return bytes(raw)


def _dangling_pax() -> bytes:
    """A pax record followed directly by the end-of-archive marker."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        _add(tf, "a", data=b"x", pax_headers={"comment": "c"})
    raw = buf.getvalue()
    # Drop the member's ustar header and data (the two blocks after the pax record).
    return raw[:1024] + raw[2048:]


def _bad_pax_size() -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        _add(tf, "a", data=b"x", pax_headers={"size": "12x"})
    return buf.getvalue()


def _plain() -> bytearray:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tf:
        _add(tf, "a", data=b"x")
        _add(tf, "b", data=b"y")
    return bytearray(buf.getvalue())


REFUSED: dict[str, Callable[[], bytes]] = {
    "dangling-pax-record": _dangling_pax,
    "non-numeric-pax-size": _bad_pax_size,
    "volume-header-type": lambda: _with_header(_plain(), b"b", {156: b"V"}),
    "digit-9-in-octal-size": lambda: _with_header(_plain(), b"b", {124: b"00000000009\0"}),
    "negative-base-256-size": lambda: _with_header(_plain(), b"b", {124: b"\xff" * 12}),
    "bad-base-256-marker": lambda: _with_header(_plain(), b"b", {108: b"\x81" + bytes(7)}),
}


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_what_the_reader_must_not_forgive_is_refused(roots: Roots, case: str) -> None:
    info = DriverInfo()
    with pytest.raises(LayerError):
        import_layer_from_tar(info, "bad", io.BytesIO(REFUSED[case]()))
    assert not layer_exists(info, "bad")
    assert not os.path.exists(os.path.join(info.home_dir, "bad"))
    assert [n for n in os.listdir(info.home_dir) if n.startswith((".tmp-", ".trash-"))] == []


def test_export_headers_are_what_tarfile_writes_byte_for_byte() -> None:
    from pyhcs._layers._stream import EntryType, LayerEntry
    from pyhcs._layers._transport import _KINDS, _header, _tarfile_header

    entries = [
        LayerEntry("f", EntryType.FILE, size=5, mode=0o4755, uid=1, gid=2, mtime_ns=10**18),
        LayerEntry("n" * 100, EntryType.FILE, size=8**11 - 1),
        LayerEntry("n" * 101, EntryType.FILE),
        LayerEntry("d" * 99, EntryType.DIR, mode=0o1777),  # 100 bytes with its slash
        LayerEntry("d" * 100, EntryType.DIR),  # 101: a pax path record
        LayerEntry(".", EntryType.DIR, mode=0o755),
        LayerEntry("big", EntryType.FILE, size=8**11),
        LayerEntry("owners", EntryType.FILE, uid=8**7 - 1, gid=8**7 - 1),
        LayerEntry("owners2", EntryType.FILE, uid=8**7, gid=5),
        LayerEntry("frac", EntryType.FILE, mtime_ns=1_600_000_000_123_456_789),
        LayerEntry("old", EntryType.FILE, mtime_ns=-(10**9)),
        LayerEntry("x", EntryType.FILE, xattrs={"user.a": b"b"}),
        LayerEntry("caf\u00e9", EntryType.FILE),
        LayerEntry("l", EntryType.SYMLINK, mode=0o777, link_target="t" * 100),
        LayerEntry("l2", EntryType.SYMLINK, mode=0o777, link_target="t" * 101),
        LayerEntry("h", EntryType.HARDLINK, link_target="f"),
        LayerEntry("p", EntryType.FIFO, mode=0o600),
        LayerEntry("c", EntryType.CHAR, devmajor=0, devminor=0),
        LayerEntry("b", EntryType.BLOCK, devmajor=8, devminor=1),
        LayerEntry("s", EntryType.SYMLINK, link_target="f", mtime_ns=5 * 10**9 + 1),
        LayerEntry("d2", EntryType.DIR, mtime_ns=10**9 + 500, xattrs={"user.k": b"v" * 90}),
        LayerEntry("cap", EntryType.FILE, xattrs={"security.capability": bytes(range(20))}),
        LayerEntry("bin", EntryType.FILE, xattrs={"user.b": b"\xff\xfe"}),
        LayerEntry("p/" * 60 + "f", EntryType.FILE, mtime_ns=3 * 10**9 + 3, size=3),
        LayerEntry("q/" * 60, EntryType.DIR, xattrs={"user.x": b"1"}),
        LayerEntry("\u00e9t\u00e9/" * 30 + "x", EntryType.FILE),
        LayerEntry("surrogate-\udcff", EntryType.FILE),
        LayerEntry("ll", EntryType.SYMLINK, link_target="../" * 50, mtime_ns=1),
        LayerEntry("lu", EntryType.SYMLINK, link_target="caf\u00e9"),
        LayerEntry("many", EntryType.FILE, mtime_ns=7, xattrs={f"user.{i}": b"x" * i
                                                              for i in range(0, 120, 7)}),
    ]
    for e in entries:
        kind = _KINDS.get(e.type, tarfile.REGTYPE)
        size = e.size if e.type == EntryType.FILE else 0
        got = _header(e, e.path, kind, size)
        assert got == _tarfile_header(e, e.path, kind, size), e
