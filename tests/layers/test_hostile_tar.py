"""Hostile and broken archives: each is refused, nothing outside the layer changes, and
nothing is left behind (no registered layer, no folder, no temporary folder)."""

from __future__ import annotations

import gzip
import io
import os
import stat
import tarfile
from collections.abc import Callable
from pathlib import Path

import pytest

from pyhcs._errors import LayerError
from pyhcs._layers import (
    DEFAULT_MAX_SIZE,
    DriverInfo,
    ImageNotFoundError,
    import_image,
    import_layer_from_tar,
    layer_exists,
    list_images,
    resolve_image,
)
from pyhcs._layers._extract import MAX_HEADER_SIZE
from pyhcs._paths import Roots

from .tarbuild import Entry, build, d, dev, f, hl, strip_end_marker, sym, tree_digest


@pytest.fixture
def victim(roots: Roots) -> Path:
    """A directory beside the store that hostile archives aim at."""
    v = roots.root.parent / "victim-dir"
    (v / "sub").mkdir(parents=True)
    (v / "secret").write_text("do not touch")
    (v / "sub" / "file").write_text("nor this")
    return v


def _up_to(victim: Path) -> str:
    """A relative path from a layer's fs/ (<root>/layers/.tmp-x/fs) to the victim."""
    return "../../../../" + victim.name


Case = Callable[[Path], tuple[list[Entry] | bytes, int | None]]

CASES: dict[str, Case] = {
    "dotdot": lambda v: ([f("../x", b"pwned")], None),
    "dotdot-to-victim": lambda v: ([f(_up_to(v) + "/pwned", b"pwned")], None),
    "absolute": lambda v: ([f("/abs", b"pwned")], None),
    "absolute-into-victim": lambda v: ([f(str(v / "pwned"), b"pwned")], None),
    "inner-dotdot": lambda v: ([f("a/../../x", b"pwned")], None),
    "symlink-then-write-through": lambda v: (
        [sym("evil", str(v)), f("evil/pwned", b"pwned")],
        None,
    ),
    "symlink-then-overwrite-through": lambda v: (
        [sym("evil", str(v)), f("evil/secret", b"pwned")],
        None,
    ),
    "symlink-then-mkdir-through": lambda v: ([sym("evil", str(v)), d("evil/newdir")], None),
    "relative-symlink-escape": lambda v: (
        [sym("evil", _up_to(v)), f("evil/pwned", b"pwned")],
        None,
    ),
    "symlink-up-dotdot": lambda v: ([sym("up", ".."), f("up/../x", b"pwned")], None),
    "symlink-up-through": lambda v: ([sym("up", ".."), f("up/x", b"pwned")], None),
    "nested-symlink-dir": lambda v: (
        [d("a"), sym("a/b", str(v)), f("a/b/c/pwned", b"pwned")],
        None,
    ),
    "hardlink-absolute": lambda v: ([hl("passwd", "/etc/passwd")], None),
    "hardlink-victim": lambda v: ([hl("s", str(v / "secret"))], None),
    "hardlink-dotdot": lambda v: ([hl("x", "../../x")], None),
    "hardlink-dotdot-victim": lambda v: ([hl("s", _up_to(v) + "/secret")], None),
    "hardlink-through-symlink": lambda v: (
        [sym("evil", str(v)), hl("s", "evil/secret")],
        None,
    ),
    "hardlink-missing-target": lambda v: ([hl("s", "nowhere")], None),
    "block-device": lambda v: ([dev("sda", tarfile.BLKTYPE, 8, 0)], None),
    "char-device": lambda v: ([dev("null", tarfile.CHRTYPE, 1, 3)], None),
    "whiteout-empty": lambda v: ([f(".wh.")], None),
    "whiteout-dot": lambda v: ([f("etc/.wh..")], None),
    "whiteout-dotdot": lambda v: ([f("etc/.wh...")], None),
    "whiteout-meta": lambda v: ([f(".wh..wh.other")], None),
    "whiteout-as-dir": lambda v: ([f(".wh.x/y")], None),
    "whiteout-through-symlink": lambda v: ([sym("evil", str(v)), f("evil/.wh.secret")], None),
    "opaque-through-symlink": lambda v: ([sym("evil", str(v)), f("evil/.wh..wh..opq")], None),
    "whiteout-escaping": lambda v: ([f("../.wh.x")], None),
    "name-beyond-path-max": lambda v: ([f("a/" * 2100 + "x", b"x")], None),
    "component-beyond-name-max": lambda v: ([f("x" * 300, b"x")], None),
    "size-bomb": lambda v: ([f("zeros", bytes(1 << 20))], 64 << 10),
    "many-small-files-over-limit": lambda v: (
        [f(f"f{i}", bytes(1000)) for i in range(100)],
        50_000,
    ),
    "truncated-gzip": lambda v: (
        gzip.compress(build([f("big", os.urandom(100_000))]))[:30_000],
        None,
    ),
    "gzip-bad-crc": lambda v: (_corrupt_crc(gzip.compress(build([f("a", b"abc")]))), None),
    "no-end-marker": lambda v: (strip_end_marker(build([f("a", b"x"), f("b", b"y")])), None),
    "truncated-in-data": lambda v: (build([f("a", bytes(4096))])[:2048], None),
    "corrupt-second-header": lambda v: (_corrupt_second_header(), None),
    "empty-stream": lambda v: (b"", None),
    "not-a-tar": lambda v: (b"hello world, this is no archive" * 40, None),
    "huge-pax-record": lambda v: (
        [f("a", b"x", pax={"comment": "y" * (MAX_HEADER_SIZE + 10)})],
        None,
    ),
    "bad-owner": lambda v: ([f("a", b"x", uid=1 << 40)], None),
    "gnu-sparse": lambda v: (_sparse_tar(), None),
    "whiteout-root-dot": lambda v: ([f(".wh..")], None),
    "whiteout-root-dotdot": lambda v: ([f(".wh...")], None),
    "whiteout-in-dotdot-dir": lambda v: ([f("a/../.wh.x")], None),
    "device-out-of-range": lambda v: ([dev("big", tarfile.CHRTYPE, 0o7777777, 0o7777777)], None),
    "block-device-zero": lambda v: ([dev("b0", tarfile.BLKTYPE, 0, 0)], None),
    "path-4096-bytes": lambda v: ([f("d/" * 2047 + "xx", b"x")], None),
    "size-field-lies": lambda v: (_lying_size(), None),
    "gzip-bomb": lambda v: (gzip.compress(build([f("zeros", bytes(32 << 20))]), 1), 4 << 20),
    "gzip-bomb-after-end": lambda v: (
        gzip.compress(build([f("a", b"x")]) + bytes(32 << 20), 1),
        4 << 20,
    ),
    "zstd-bomb": lambda v: (_zstd(build([f("zeros", bytes(32 << 20))])), 4 << 20),
    "zstd-bomb-after-end": lambda v: (_zstd(build([f("a", b"x")]) + bytes(32 << 20)), 4 << 20),
    "zstd-truncated": lambda v: (_zstd(build([f("a", os.urandom(50_000))]))[:20_000], None),
    "hardlink-to-dir": lambda v: ([d("dir"), hl("x", "dir")], None),
    "hardlink-to-root": lambda v: ([hl("x", ".")], None),
    "hardlink-through-replaced-dir": lambda v: (
        [d("a"), f("a/f", b"x"), sym("a", str(v)), hl("g", "a/secret")],
        None,
    ),
    "symlink-chain-escape": lambda v: (
        [sym("a", "b"), sym("b", str(v)), f("a/pwned", b"pwned")],
        None,
    ),
    "opaque-dotdot": lambda v: ([f("../.wh..wh..opq")], None),
}


def _zstd(raw: bytes) -> bytes:
    from pyhcs._layers._zstd import ZstdWriter

    buf = io.BytesIO()
    w = ZstdWriter(buf, level=1)
    w.write(raw)
    w.close()
    return buf.getvalue()


def _lying_size() -> bytes:
    """A member whose size field says 1 MiB with only 100 bytes of data before the next
    header: the next header is read as data, and the stream ends inside the member."""
    raw = bytearray(build([f("a", bytes(100)), f("b", b"y" * 100)]))
    off = raw.find(b"a\x00")
    raw[off + 124 : off + 136] = b"%011o\x00" % (1 << 20)
    raw[off + 148 : off + 156] = b" " * 8
    raw[off + 148 : off + 156] = b"%06o\x00 " % sum(raw[off : off + 512])
    return bytes(raw)


def _corrupt_crc(gz: bytes) -> bytes:
    b = bytearray(gz)
    b[-8] ^= 0xFF  # the CRC32 in the gzip trailer
    return bytes(b)


def _corrupt_second_header() -> bytes:
    raw = bytearray(build([f("a", b"x"), f("b", b"y"), f("c", b"z")], gz=False))
    # With pax format every member has one header and one data block; find "b"'s header.
    off = raw.find(b"b\x00", 512)
    assert off > 0
    raw[off] = ord("q")  # the checksum no longer matches
    return bytes(raw)


def _sparse_tar() -> bytes:
    raw = bytearray(build([f("s", b"x" * 10)]))
    # Retype the member as an old-GNU sparse file ('S') and fix its checksum.
    hdr = 0
    while raw[hdr : hdr + 1] != b"s":
        hdr += 512
    raw[hdr + 156] = ord("S")
    raw[hdr + 148 : hdr + 156] = b" " * 8
    chk = sum(raw[hdr : hdr + 512])
    raw[hdr + 148 : hdr + 156] = b"%06o\x00 " % chk
    return bytes(raw)


def _leftovers(info: DriverInfo) -> list[str]:
    try:
        return [n for n in os.listdir(info.home_dir) if n.startswith((".tmp-", ".trash-"))]
    except FileNotFoundError:
        return []


@pytest.mark.parametrize("case", sorted(CASES))
def test_hostile_archive_is_refused(case: str, roots: Roots, victim: Path) -> None:
    info = DriverInfo()
    spec, max_size = CASES[case](victim)
    data = spec if isinstance(spec, bytes) else build(spec, gz=case.startswith("size"))
    before = tree_digest(victim)
    passwd = os.stat("/etc/passwd")
    sibling_before = set(os.listdir(roots.root.parent)) - {"root"}
    limit = DEFAULT_MAX_SIZE if max_size is None else max_size
    with pytest.raises(LayerError) as e:
        import_layer_from_tar(info, "hostile", io.BytesIO(data), max_size=limit)
    assert e.value.operation == "ImportLayer"
    assert tree_digest(victim) == before
    assert os.stat("/etc/passwd").st_nlink == passwd.st_nlink
    assert not layer_exists(info, "hostile")
    assert not os.path.exists(os.path.join(info.home_dir, "hostile"))
    assert _leftovers(info) == []
    assert set(os.listdir(roots.root.parent)) - {"root"} == sibling_before
    assert not (Path(info.home_dir) / "x").exists()


def test_hostile_image_is_refused_too(roots: Roots, victim: Path) -> None:
    before = tree_digest(victim)
    data = build([sym("evil", str(victim)), f("evil/pwned", b"pwned")])
    with pytest.raises(LayerError):
        import_image("evil", io.BytesIO(data))
    assert tree_digest(victim) == before
    assert list_images() == []
    with pytest.raises(ImageNotFoundError):
        resolve_image("evil")
    assert _leftovers(DriverInfo()) == []


# -- what looks dangerous but is legitimate ----------------------------------------------------


def test_absolute_symlinks_are_kept_verbatim(roots: Roots, victim: Path) -> None:
    info = DriverInfo()
    data = build(
        [
            d("usr"),
            d("usr/lib"),
            f("usr/lib/libc.so", b"c"),
            sym("usr/lib64", "/usr/lib"),
            sym("etc-link", "/etc"),
            sym("v", str(victim)),
        ]
    )
    path = Path(import_layer_from_tar(info, "abs", io.BytesIO(data))) / "fs"
    assert os.readlink(path / "usr/lib64") == "/usr/lib"
    assert os.readlink(path / "etc-link") == "/etc"
    assert os.readlink(path / "v") == str(victim)


def test_later_entries_replace_symlinks_instead_of_following_them(
    roots: Roots, victim: Path
) -> None:
    info = DriverInfo()
    before = tree_digest(victim)
    data = build(
        [
            sym("evil", str(victim)),
            d("evil"),  # replaces the symlink with a real directory
            f("evil/pwned", b"stays in the layer"),
            sym("file", str(victim / "secret")),
            f("file", b"replaces the symlink"),
        ]
    )
    fs = Path(import_layer_from_tar(info, "replace", io.BytesIO(data))) / "fs"
    assert tree_digest(victim) == before
    assert stat.S_ISDIR(os.lstat(fs / "evil").st_mode)
    assert (fs / "evil/pwned").read_bytes() == b"stays in the layer"
    assert (fs / "file").read_bytes() == b"replaces the symlink"
    assert not (victim / "pwned").exists()


def test_fifo_and_whiteout_device_are_allowed(roots: Roots) -> None:
    info = DriverInfo()
    data = build([Entry("pipe", tarfile.FIFOTYPE, mode=0o640), dev("gone", tarfile.CHRTYPE, 0, 0)])
    fs = Path(import_layer_from_tar(info, "nodes", io.BytesIO(data))) / "fs"
    st = os.lstat(fs / "pipe")
    assert stat.S_ISFIFO(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o640
    wh = os.lstat(fs / "gone")
    assert stat.S_ISCHR(wh.st_mode) and wh.st_rdev == 0


def test_hostile_corpus_is_large_enough() -> None:
    assert len(CASES) >= 30


def test_contained_archives_stay_inside(roots: Roots, victim: Path) -> None:
    """Archives that are odd but harmless import, and nothing outside the layer changes."""
    info = DriverInfo()
    before = tree_digest(victim)
    # Duplicate names changing type: the last entry wins, nothing is followed.
    data = build(
        [
            f("x", b"file"),
            d("x"),
            f("x/inner", b"in"),
            sym("x", str(victim)),
            f("x", b"last"),
            sym("y", str(victim)),
            d("y"),
            hl("z", "x"),
            f("z", b"replaced hard link"),
        ]
    )
    fs = Path(import_layer_from_tar(info, "dups", io.BytesIO(data))) / "fs"
    assert (fs / "x").read_bytes() == b"last" and os.lstat(fs / "x").st_nlink == 1
    assert stat.S_ISDIR(os.lstat(fs / "y").st_mode)
    assert (fs / "z").read_bytes() == b"replaced hard link"
    # setuid/setgid files are kept (the layer home is 0700: only root reaches them).
    data = build([f("suid", b"x", mode=0o6755), f("sticky-dir/.keep"), d("sticky-dir", 0o1777)])
    fs = Path(import_layer_from_tar(info, "suid", io.BytesIO(data))) / "fs"
    assert stat.S_IMODE(os.stat(fs / "suid").st_mode) == 0o6755
    assert stat.S_IMODE(os.stat(fs / "sticky-dir").st_mode) == 0o1777
    assert stat.S_IMODE(os.stat(info.home_dir).st_mode) == 0o700
    # 2,000 nested directories (a 4,000-byte path): imported, and destroyed again.
    deep = "/".join(["d"] * 2000)
    fs = Path(import_layer_from_tar(info, "deep", io.BytesIO(build([f(deep + "/x", b"x")]))))
    from pyhcs._layers import destroy_layer

    destroy_layer(info, "deep")
    assert not fs.exists()
    assert tree_digest(victim) == before
    assert _leftovers(info) == []


def test_max_size_boundary(roots: Roots) -> None:
    info = DriverInfo()
    data = build([f("a", bytes(1000))])
    # The limit counts file data plus the archive's trailing padding (read to verify it).
    import_layer_from_tar(info, "fits", io.BytesIO(data), max_size=len(data))
    with pytest.raises(LayerError):
        import_layer_from_tar(info, "over", io.BytesIO(data), max_size=999)
    assert not layer_exists(info, "over")
