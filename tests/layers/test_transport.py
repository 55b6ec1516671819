"""Layers in and out of the store: OCI tars (plain, gzip, zstd), the folder transport
format, the streaming reader and writer, and what a sandbox exports."""

from __future__ import annotations

import gc
import gzip
import hashlib
import io
import json
import os
import stat
from pathlib import Path

import pytest

from pyhcs._errors import (
    ERR_ALREADY_EXISTS,
    ERR_ELEMENT_NOT_FOUND,
    InvalidConfigError,
    LayerError,
)
from pyhcs._layers import (
    DIFF_DRIVER,
    DriverInfo,
    EntryType,
    LayerEntry,
    create_sandbox_layer,
    export_layer,
    export_layer_to_tar,
    get_layer_mount_path,
    import_layer,
    import_layer_from_tar,
    layer_exists,
    new_layer_reader,
    new_layer_writer,
    prepare_layer,
    unprepare_layer,
)
from pyhcs._layers._zstd import ZstdWriter
from pyhcs._paths import Roots

from .tarbuild import Entry, build, d, dev, f, hl, sym

BASE = [
    d("etc", mtime=1_500_000_000.25),
    f("etc/hello", b"hello\n", pax={"SCHILY.xattr.user.note": "kept"}),
    hl("etc/hello-link", "etc/hello"),
    f("etc/gone", b"bye\n"),
    f("etc/nanos", b"n", pax={"mtime": "1600000000.123456789"}),
    d("opq"),
    f("opq/old", b"old\n"),
    d("usr/lib"),
    f("usr/lib/libx.so", b"\x7fELF" + bytes(5000)),
    sym("usr/lib64", "/usr/lib"),
    f("bin/suid", b"#!/bin/sh\n", mode=0o4755),
    f("home/u/file", b"mine\n", uid=1000, gid=1000, mode=0o600),
    Entry("run/fifo", b"6", mode=0o640),
    f("big", os.urandom(300_000)),
    f("caf\u00e9", b"unicode name"),
]
TOP = [
    f("etc/.wh.gone"),
    f("etc/new", b"new\n"),
    d("opq"),
    f("opq/.wh..wh..opq"),
    f("opq/fresh", b"fresh\n"),
    f("usr/.wh.lib64"),
]


@pytest.fixture
def info(roots: Roots) -> DriverInfo:
    return DriverInfo()


@pytest.fixture
def chain(info: DriverInfo) -> list[str]:
    base = import_layer_from_tar(info, "base", io.BytesIO(build(BASE)))
    top = import_layer_from_tar(info, "top", io.BytesIO(build(TOP)), [base])
    return [top, base]


def snapshot(root: Path) -> dict[str, tuple[object, ...]]:
    """Full metadata of every entry below *root* (not the root's atime/ctime): type and
    mode, owner, mtime (ns), size, content hash, link target, device, every xattr, and
    which earlier path it is hard-linked to."""
    out: dict[str, tuple[object, ...]] = {}
    inodes: dict[int, str] = {}
    stack = [root]
    while stack:
        p = stack.pop()
        for name in sorted(os.listdir(p)):
            q = p / name
            st = os.lstat(q)
            rel = str(q.relative_to(root))
            link = inodes.setdefault(st.st_ino, rel) if not stat.S_ISDIR(st.st_mode) else rel
            body = ""
            if stat.S_ISREG(st.st_mode):
                body = hashlib.sha256(q.read_bytes()).hexdigest()
            elif stat.S_ISLNK(st.st_mode):
                body = os.readlink(q)
            xattrs = {}
            if not stat.S_ISLNK(st.st_mode):
                xattrs = {k: os.getxattr(q, k, follow_symlinks=False)
                          for k in os.listxattr(q, follow_symlinks=False)}
            out[rel] = (st.st_mode, st.st_uid, st.st_gid, st.st_mtime_ns, st.st_size, body,
                        st.st_rdev, tuple(sorted(xattrs.items())), link)
            if stat.S_ISDIR(st.st_mode):
                stack.append(q)
    st = os.lstat(root)
    out["."] = (st.st_mode, st.st_uid, st.st_gid, st.st_mtime_ns)
    return out


# -- OCI tars ---------------------------------------------------------------------------------


@pytest.mark.parametrize("compression", ["none", "gzip", "zstd"])
def test_round_trip_gives_an_identical_tree_and_the_same_bytes(
    info: DriverInfo, chain: list[str], compression: str
) -> None:
    top, base = chain
    for layer, parents in ((base, []), (top, [base])):
        first = io.BytesIO()
        r1 = export_layer_to_tar(first, layer, parents, compression=compression)  # type: ignore[arg-type]
        copy = import_layer_from_tar(
            info, f"copy-{os.path.basename(layer)}", io.BytesIO(first.getvalue()), parents
        )
        assert snapshot(Path(copy) / "fs") == snapshot(Path(layer) / "fs")
        second = io.BytesIO()
        r2 = export_layer_to_tar(second, copy, parents, compression=compression)  # type: ignore[arg-type]
        assert second.getvalue() == first.getvalue()
        assert r1 == r2
        assert r1.digest == "sha256:" + hashlib.sha256(first.getvalue()).hexdigest()
        assert r1.size == len(first.getvalue())


def test_export_format_is_oci(info: DriverInfo, chain: list[str]) -> None:
    out = io.BytesIO()
    res = export_layer_to_tar(out, chain[0], [chain[1]], compression="gzip")
    raw = out.getvalue()
    assert raw[:2] == b"\x1f\x8b" and raw[4:8] == bytes(4)  # gzip, header mtime 0
    plain = gzip.decompress(raw)
    assert res.diff_id == "sha256:" + hashlib.sha256(plain).hexdigest()
    import tarfile

    with tarfile.open(fileobj=io.BytesIO(plain)) as tf:
        names = tf.getnames()
        assert names[0] == "."
        assert "etc/.wh.gone" in names and "usr/.wh.lib64" in names
        assert names.index("opq/.wh..wh..opq") == names.index("opq") + 1
        assert all(m.uname == "" and m.gname == "" for m in tf.getmembers())
    assert len(plain) % 10240 == 0


def test_export_keeps_nanoseconds_xattrs_links_and_never_trusted(
    info: DriverInfo, chain: list[str]
) -> None:
    base = chain[1]
    fs = Path(base) / "fs"
    assert os.lstat(fs / "etc/nanos").st_mtime_ns == 1_600_000_000_123_456_789
    os.setxattr(fs / "etc/hello", "trusted.overlay.redirect", b"/x")
    out = io.BytesIO()
    export_layer_to_tar(out, base)
    data = out.getvalue()
    assert b"trusted.overlay" not in data
    assert b"SCHILY.xattr.user.note" in data
    copy = Path(import_layer_from_tar(info, "copy", io.BytesIO(data))) / "fs"
    assert os.lstat(copy / "etc/nanos").st_mtime_ns == 1_600_000_000_123_456_789
    assert os.getxattr(copy / "etc/hello", "user.note") == b"kept"
    assert os.stat(copy / "etc/hello").st_ino == os.stat(copy / "etc/hello-link").st_ino
    assert stat.S_IMODE(os.stat(copy / "bin/suid").st_mode) == 0o4755


def test_import_accepts_zstd_and_refuses_a_corrupt_or_truncated_one(info: DriverInfo) -> None:
    raw = build(BASE)
    buf = io.BytesIO()
    w = ZstdWriter(buf)
    w.write(raw)
    w.close()
    z = buf.getvalue()
    path = import_layer_from_tar(info, "z", io.BytesIO(z))
    assert (Path(path) / "fs/etc/hello").read_bytes() == b"hello\n"
    for i, bad in enumerate((z[: len(z) // 2], z[:-4] + b"\0\0\0\0")):
        with pytest.raises(LayerError):
            import_layer_from_tar(info, f"bad{i}", io.BytesIO(bad))
        assert not layer_exists(info, f"bad{i}")


def test_expected_digest_is_checked(info: DriverInfo) -> None:
    raw = build(BASE)
    digest = "sha256:" + hashlib.sha256(raw).hexdigest()
    with pytest.raises(LayerError):
        import_layer_from_tar(info, "x", io.BytesIO(raw), expected_digest="sha256:" + "0" * 64)
    assert not layer_exists(info, "x")
    import_layer_from_tar(info, "x", io.BytesIO(raw), expected_digest=digest)
    assert layer_exists(info, "x")


# -- sandboxes: what a container changed -------------------------------------------------------


def _changes(info: DriverInfo, layer_id: str, parents: list[str]) -> dict[str, EntryType]:
    with new_layer_reader(info, layer_id, parents) as r:
        return {e.path: e.type for e in r}


@pytest.mark.parametrize("flavour", [1, 0])
def test_sandbox_changes_export_and_reimport(
    roots: Roots, chain: list[str], flavour: int
) -> None:
    info = DriverInfo(flavour=flavour)
    create_sandbox_layer(info, "sb", "top", chain)
    prepare_layer(info, "sb", chain)
    try:
        root = Path(get_layer_mount_path(info, "sb"))
        (root / "etc/hello").write_text("changed\n")
        (root / "etc/added").write_text("added\n")
        os.unlink(root / "etc/new")
        os.unlink(root / "usr/lib/libx.so")
        (root / "newdir/sub").mkdir(parents=True)
        (root / "newdir/sub/f").write_bytes(b"deep")
        expected_view = snapshot(root)
    finally:
        unprepare_layer(info, "sb")
    changes = _changes(info, "sb", chain)
    assert changes["etc/hello"] == EntryType.FILE
    assert changes["etc/added"] == EntryType.FILE
    assert changes["etc/new"] == EntryType.WHITEOUT
    assert changes["usr/lib/libx.so"] == EntryType.WHITEOUT
    assert changes["newdir/sub/f"] == EntryType.FILE
    assert "opq/fresh" not in changes and "big" not in changes
    # Parents before children.
    paths = list(changes)
    for p in paths[1:]:
        parent = os.path.dirname(p) or "."
        assert paths.index(parent) < paths.index(p)
    # Export, import as a layer on the same parents: a sandbox over it shows the same tree.
    out = io.BytesIO()
    export_layer_to_tar(out, str(Path(info.home_dir) / "sb"), chain)
    filt = DriverInfo()
    layer = import_layer_from_tar(filt, "committed", io.BytesIO(out.getvalue()), chain)
    create_sandbox_layer(filt, "check", "committed", [layer, *chain])
    prepare_layer(filt, "check", [layer, *chain])
    try:
        view = snapshot(Path(get_layer_mount_path(filt, "check")))
    finally:
        unprepare_layer(filt, "check")
    for rel in ("etc/hello", "etc/added", "newdir/sub/f", "etc/hello-link", "opq/fresh"):
        assert view[rel][5] == expected_view[rel][5], rel
    assert "etc/new" not in view and "usr/lib/libx.so" not in view
    assert view.keys() == expected_view.keys()


# -- the streaming reader and writer --------------------------------------------------------------


def test_reader_entries_metadata_and_data(info: DriverInfo, chain: list[str]) -> None:
    with new_layer_reader(info, "base", []) as r:
        seen = {}
        for e in r:
            seen[e.path] = (e, r.read())
    e, data = seen["etc/hello"]
    assert e.type == EntryType.FILE and e.size == 6 and data == b"hello\n"
    assert e.xattrs == {"user.note": b"kept"}
    link, data = seen["etc/hello-link"]
    assert link.type == EntryType.HARDLINK and link.link_target == "etc/hello" and data == b""
    assert seen["usr/lib64"][0].link_target == "/usr/lib"
    home = seen["home/u/file"][0]
    assert (home.uid, home.gid, home.mode) == (1000, 1000, 0o600)
    assert seen["bin/suid"][0].mode == 0o4755
    assert seen["run/fifo"][0].type == EntryType.FIFO
    assert seen["."][0].type == EntryType.DIR
    with new_layer_reader(info, "top", [chain[1]]) as r:
        entries = {e.path: e for e in r}
    assert entries["etc/gone"].type == EntryType.WHITEOUT
    assert entries["opq"].opaque
    with pytest.raises(LayerError) as err:
        new_layer_reader(info, "missing", [])
    assert err.value.code is ERR_ELEMENT_NOT_FOUND


def test_writer_copies_a_layer_exactly(info: DriverInfo, chain: list[str]) -> None:
    top, base = chain
    with new_layer_reader(info, "top", [base]) as r, new_layer_writer(
        info, "copy", [base]
    ) as w:
        for e in r:
            if e.type == EntryType.HARDLINK:
                w.add_link(e.path, e.link_target)
            elif e.type == EntryType.WHITEOUT and e.path == "etc/gone":
                w.remove(e.path)
                w.add(e.path, e)  # a whiteout entry: the same, keeping its mtime
            else:
                w.add(e.path, e)
                while chunk := r.read(1000):
                    w.write(chunk)
    copy = Path(info.home_dir) / "copy"
    assert snapshot(copy / "fs") == snapshot(Path(top) / "fs")
    with new_layer_reader(info, "base", []) as r, new_layer_writer(info, "copy2", []) as w:
        for e in r:
            if e.type == EntryType.HARDLINK:
                w.add_link(e.path, e.link_target)
            else:
                w.add(e.path, e)
                w.write(r.read())
    assert snapshot(Path(info.home_dir) / "copy2/fs") == snapshot(Path(base) / "fs")


def test_writer_is_invisible_until_close_and_leaves_nothing_on_failure(
    info: DriverInfo, chain: list[str]
) -> None:
    def leftovers() -> list[str]:
        return [n for n in os.listdir(info.home_dir) if n.startswith((".tmp-", ".new-"))]

    w = new_layer_writer(info, "w", [chain[0], chain[1]])
    w.add("a", LayerEntry("a", EntryType.FILE, size=3))
    w.write(b"abc")
    assert not layer_exists(info, "w") and len(leftovers()) == 1
    w.close()
    assert layer_exists(info, "w") and leftovers() == []
    assert (Path(info.home_dir) / "w/fs/a").read_bytes() == b"abc"
    # Leaving the with block with an exception.
    with pytest.raises(RuntimeError), new_layer_writer(info, "w2", []) as w2:
        w2.add("x", LayerEntry("x", EntryType.DIR))
        raise RuntimeError("caller failed")
    assert not layer_exists(info, "w2") and leftovers() == []
    # Dropped without close.
    w3 = new_layer_writer(info, "w3", [])
    w3.add("x", LayerEntry("x", EntryType.FILE, size=10))
    w3.write(b"12")
    del w3
    gc.collect()
    assert not layer_exists(info, "w3") and leftovers() == []
    # A refused call poisons nothing already published, and close after an abort fails.
    w4 = new_layer_writer(info, "w4", [])
    w4.add("f", LayerEntry("f", EntryType.FILE, size=2))
    with pytest.raises(LayerError):
        w4.write(b"too long")
    w4.abort()
    with pytest.raises(LayerError):
        w4.close()
    assert not layer_exists(info, "w4") and leftovers() == []
    # An id in use.
    with pytest.raises(LayerError) as e:
        new_layer_writer(info, "w", [])
    assert e.value.code is ERR_ALREADY_EXISTS


def test_writer_applies_the_extractor_safety_rules(
    info: DriverInfo, chain: list[str], tmp_path: Path
) -> None:
    victim = tmp_path / "victim"
    victim.mkdir()
    with new_layer_writer(info, "evil", [chain[1]]) as w:
        w.add("link", LayerEntry("link", EntryType.SYMLINK, link_target=str(victim)))
        for bad in ("link/pwned", "../x", "/abs", "a/../../x", ".wh.x", "x" * 300):
            with pytest.raises(LayerError):
                w.add(bad, LayerEntry(bad, EntryType.FILE))
        with pytest.raises(LayerError):
            w.add_link("l2", "/etc/passwd")
        with pytest.raises(LayerError):
            w.add_link("l3", "link/secret")
        with pytest.raises(LayerError):
            w.add("dev", LayerEntry("dev", EntryType.CHAR, devmajor=1, devminor=3))
        with pytest.raises(LayerError):
            w.remove("not/in/parent")
        with pytest.raises(LayerError):
            w.write(b"no file added")
        w.remove("etc/hello")  # present in the parent: a whiteout
        w.add_link("lib-copy", "usr/lib/libx.so")  # a parent's file: copied up, then linked
    assert os.listdir(victim) == []
    fs = Path(info.home_dir) / "evil/fs"
    wh = os.lstat(fs / "etc/hello")
    assert stat.S_ISCHR(wh.st_mode) and wh.st_rdev == 0
    assert os.stat(fs / "lib-copy").st_ino == os.stat(fs / "usr/lib/libx.so").st_ino


# -- the folder transport format ----------------------------------------------------------------


def test_folder_transport_round_trip(
    info: DriverInfo, chain: list[str], tmp_path: Path
) -> None:
    top, base = chain
    target = tmp_path / "exported"
    export_layer(info, "top", str(target), [base])
    manifest = json.loads((target / "layer.json").read_text())
    assert manifest["Version"] == 1 and manifest["Parents"] == ["base"]
    assert manifest["DiffId"] == "sha256:" + hashlib.sha256(
        (target / "layer.tar").read_bytes()).hexdigest()
    import_layer(info, "again", str(target), [base])
    assert snapshot(Path(info.home_dir) / "again/fs") == snapshot(Path(top) / "fs")
    # Not over an existing non-empty folder; no temporary folder left beside it.
    with pytest.raises(LayerError):
        export_layer(info, "top", str(target), [base])
    assert sorted(os.listdir(tmp_path)) == ["exported"]
    # Wrong number of parents.
    with pytest.raises(InvalidConfigError):
        import_layer(info, "nope", str(target), [])


def test_folder_import_refuses_tampering_and_symlinks(
    info: DriverInfo, chain: list[str], tmp_path: Path
) -> None:
    target = tmp_path / "exported"
    export_layer(info, "base", str(target), [])
    tar = target / "layer.tar"
    good = tar.read_bytes()
    tar.write_bytes(good.replace(b"hello\n", b"HELLO\n"))
    with pytest.raises(LayerError):
        import_layer(info, "tampered", str(target), [])
    assert not layer_exists(info, "tampered")
    tar.unlink()
    (tmp_path / "elsewhere.tar").write_bytes(good)
    tar.symlink_to(tmp_path / "elsewhere.tar")
    with pytest.raises(LayerError):
        import_layer(info, "linked", str(target), [])
    assert not layer_exists(info, "linked")
    with pytest.raises(LayerError):
        import_layer(info, "empty", str(tmp_path), [])


def test_diff_flavour_layers_round_trip_too(roots: Roots) -> None:
    diff = DriverInfo(flavour=DIFF_DRIVER)
    base = import_layer_from_tar(diff, "dbase", io.BytesIO(build(BASE)))
    out = io.BytesIO()
    export_layer_to_tar(out, base)
    copy = import_layer_from_tar(diff, "dcopy", io.BytesIO(out.getvalue()))
    assert snapshot(Path(copy) / "fs") == snapshot(Path(base) / "fs")


def test_whiteout_of_a_symlink_removes_only_the_link(roots: Roots, tmp_path: Path) -> None:
    for flavour in (1, 0):
        info = DriverInfo(flavour=flavour)
        lower = import_layer_from_tar(
            info, f"l{flavour}", io.BytesIO(build([d("real"), f("real/keep", b"k"),
                                                   sym("link", "real")])))
        upper = import_layer_from_tar(
            info, f"u{flavour}", io.BytesIO(build([f(".wh.link")])), [lower])
        create_sandbox_layer(info, f"s{flavour}", f"u{flavour}", [upper, lower])
        prepare_layer(info, f"s{flavour}", [upper, lower])
        try:
            root = Path(get_layer_mount_path(info, f"s{flavour}"))
            assert not os.path.lexists(root / "link")
            assert (root / "real/keep").read_bytes() == b"k"
        finally:
            unprepare_layer(info, f"s{flavour}")


def test_device_whiteout_entries_keep_their_time(info: DriverInfo) -> None:
    data = build([dev("gone", b"3", 0, 0), f(".wh.other", mtime=1_234)])
    fs = Path(import_layer_from_tar(info, "wh", io.BytesIO(data))) / "fs"
    assert os.lstat(fs / "other").st_mtime_ns == 1_234 * 10**9
