"""The layer store on the real kernel: import, sandboxes, overlay and diff preparation."""

from __future__ import annotations

import io
import json
import os
import stat
import subprocess
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from pyhcs._errors import (
    ERR_ALREADY_EXISTS,
    ERR_ELEMENT_NOT_FOUND,
    ERR_VMCOMPUTE_OPERATION_INVALID_STATE,
    InvalidConfigError,
    LayerError,
    NotSupportedError,
    is_not_exist,
)
from pyhcs._guid import name_to_guid
from pyhcs._layers import (
    DriverInfo,
    activate_layer,
    create_layer,
    create_sandbox_layer,
    deactivate_layer,
    destroy_layer,
    get_layer_mount_path,
    get_shared_base_images,
    import_layer_from_tar,
    layer_exists,
    layer_paths_to_descriptors,
    prepare_layer,
    process_base_layer,
    process_utility_vm_image,
    unprepare_layer,
)
from pyhcs._paths import Roots
from pyhcs._registry import Registry

from .tarbuild import build, d, f, hl, mounted, sym, tree_digest

BASE = [
    d("etc"),
    f("etc/hello", b"hello\n"),
    f("etc/gone", b"to be whited out\n"),
    d("opq"),
    f("opq/old", b"old\n"),
    d("usr"),
    d("usr/lib"),
    f("usr/lib/libx.so", b"\x7fELF..."),
    sym("usr/lib64", "/usr/lib"),
    f("bin/suid", b"#!/bin/sh\n", mode=0o4755, uid=0, gid=0),
    f("home/u/file", b"mine\n", uid=1000, gid=1000, mode=0o600, mtime=1_234_567_890),
    hl("etc/hello-link", "etc/hello"),
    f(
        "etc/attr",
        b"x",
        pax={"SCHILY.xattr.user.note": "kept", "SCHILY.xattr.trusted.overlay.redirect": "/etc"},
    ),
]
TOP = [
    f("etc/.wh.gone"),
    f("etc/new", b"new\n"),
    d("opq"),
    f("opq/.wh..wh..opq"),
    f("opq/fresh", b"fresh\n"),
]


@pytest.fixture
def info(roots: Roots) -> DriverInfo:
    return DriverInfo()


@pytest.fixture
def chain(info: DriverInfo) -> list[str]:
    """A base and a top layer; the parent paths of a sandbox on top, topmost first."""
    base = import_layer_from_tar(info, "base", io.BytesIO(build(BASE)))
    top = import_layer_from_tar(info, "top", io.BytesIO(build(TOP, gz=True)), [base])
    return [top, base]


@contextmanager
def prepared(info: DriverInfo, layer_id: str, parents: list[str]) -> Iterator[str]:
    """Prepare the sandbox and always unprepare it (and unmount, whatever happens)."""
    prepare_layer(info, layer_id, parents)
    rootfs = os.path.join(info.home_dir, layer_id, "rootfs")
    try:
        yield get_layer_mount_path(info, layer_id)
    finally:
        try:
            unprepare_layer(info, layer_id)
        finally:
            if mounted(rootfs):
                subprocess.run(["umount", "-l", rootfs], check=False)


# -- import --------------------------------------------------------------------------------


def test_import_reads_back_files_metadata_and_links(info: DriverInfo) -> None:
    path = import_layer_from_tar(info, "base", io.BytesIO(build(BASE)))
    fs = Path(path) / "fs"
    assert path == os.path.join(info.home_dir, "base")
    assert layer_exists(info, "base")
    assert (fs / "etc/hello").read_bytes() == b"hello\n"
    st = os.stat(fs / "bin/suid")
    assert stat.S_IMODE(st.st_mode) == 0o4755
    home = os.stat(fs / "home/u/file")
    assert (home.st_uid, home.st_gid, stat.S_IMODE(home.st_mode)) == (1000, 1000, 0o600)
    assert home.st_mtime == 1_234_567_890
    # Implicit parent directories are created root-owned 0755.
    assert stat.S_IMODE(os.stat(fs / "home/u").st_mode) == 0o755
    assert os.readlink(fs / "usr/lib64") == "/usr/lib"
    assert os.stat(fs / "etc/hello").st_ino == os.stat(fs / "etc/hello-link").st_ino
    assert os.getxattr(fs / "etc/attr", "user.note") == b"kept"
    # overlay's own metadata never comes from an archive
    with pytest.raises(OSError):
        os.getxattr(fs / "etc/attr", "trusted.overlay.redirect")
    assert not [n for n in os.listdir(info.home_dir) if n.startswith(".tmp-")]


def test_import_converts_whiteouts_and_opaque_dirs(info: DriverInfo, chain: list[str]) -> None:
    fs = Path(chain[0]) / "fs"
    wh = os.lstat(fs / "etc/gone")
    assert stat.S_ISCHR(wh.st_mode) and wh.st_rdev == 0
    assert not (fs / "etc/.wh.gone").exists()
    assert os.getxattr(fs / "opq", "trusted.overlay.opaque") == b"y"
    assert not (fs / "opq/.wh..wh..opq").exists()


def test_import_from_path_gzip_and_registry_row(info: DriverInfo, roots: Roots) -> None:
    tar = roots.root.parent / "layer.tar.gz"
    tar.write_bytes(build(BASE, gz=True))
    import_layer_from_tar(info, "fromfile", str(tar))
    row = Registry.open(roots.db_path).query_one("SELECT * FROM layers WHERE id = 'fromfile'")
    assert row is not None
    assert row["kind"] == "base" and row["state"] == "ready" and row["flavour"] == 1
    import hashlib

    assert row["digest"] == hashlib.sha256(tar.read_bytes()).hexdigest()


def test_import_from_a_pipe_never_seeks(info: DriverInfo) -> None:
    data = build(BASE, gz=True)
    r, w = os.pipe()

    def feed() -> None:
        with os.fdopen(w, "wb") as out:
            out.write(data)

    t = threading.Thread(target=feed)
    t.start()
    try:
        with os.fdopen(r, "rb", buffering=0) as src:
            import_layer_from_tar(info, "piped", src)
    finally:
        t.join()
    assert (Path(info.home_dir) / "piped/fs/etc/hello").read_bytes() == b"hello\n"


def test_import_twice_is_refused(info: DriverInfo) -> None:
    import_layer_from_tar(info, "dup", io.BytesIO(build(BASE)))
    with pytest.raises(LayerError) as e:
        import_layer_from_tar(info, "dup", io.BytesIO(build(BASE)))
    assert e.value.code is ERR_ALREADY_EXISTS


def test_invalid_ids_and_parents(info: DriverInfo, roots: Roots) -> None:
    for bad in ("", "../x", ".hidden", "a/b", "a,b", "x" * 200):
        with pytest.raises(InvalidConfigError):
            import_layer_from_tar(info, bad, io.BytesIO(build(BASE)))
    with pytest.raises(LayerError) as e:
        import_layer_from_tar(info, "orphan", io.BytesIO(build(BASE)), [str(roots.root)])
    assert e.value.code is ERR_ELEMENT_NOT_FOUND
    assert not layer_exists(info, "orphan")


def test_create_layer_and_parent_links(info: DriverInfo) -> None:
    create_layer(info, "empty", "")
    assert layer_exists(info, "empty")
    assert os.listdir(Path(info.home_dir) / "empty/fs") == []
    create_layer(info, "child", "empty")
    with pytest.raises(LayerError) as e:
        create_layer(info, "lost", "nope")
    assert e.value.code is ERR_ELEMENT_NOT_FOUND
    # A layer another one is built on cannot go first.
    with pytest.raises(LayerError) as e:
        destroy_layer(info, "empty")
    assert e.value.code is ERR_VMCOMPUTE_OPERATION_INVALID_STATE
    destroy_layer(info, "child")
    destroy_layer(info, "empty")
    assert not layer_exists(info, "empty")
    with pytest.raises(LayerError) as e:
        destroy_layer(info, "empty")
    assert is_not_exist(e.value)


# -- sandboxes on overlayfs -----------------------------------------------------------------


def test_overlay_sandbox_writes_go_to_upper(info: DriverInfo, chain: list[str]) -> None:
    base_before = tree_digest(Path(chain[1]))
    top_before = tree_digest(Path(chain[0]))
    create_sandbox_layer(info, "sb", "top", chain)
    folder = Path(info.home_dir) / "sb"
    assert {"fs", "upper", "work", "rootfs"} <= set(os.listdir(folder))
    with pytest.raises(LayerError) as e:
        get_layer_mount_path(info, "sb")
    assert e.value.code is ERR_VMCOMPUTE_OPERATION_INVALID_STATE
    with prepared(info, "sb", chain) as root:
        assert root == str(folder / "rootfs")
        assert mounted(root)
        r = Path(root)
        assert (r / "etc/hello").read_bytes() == b"hello\n"
        (r / "etc/hello").write_bytes(b"changed\n")
        (r / "etc/brand-new").write_bytes(b"x")
        os.unlink(r / "usr/lib/libx.so")
        assert (folder / "upper/etc/hello").read_bytes() == b"changed\n"
        assert (folder / "upper/etc/brand-new").exists()
        wh = os.lstat(folder / "upper/usr/lib/libx.so")
        assert stat.S_ISCHR(wh.st_mode) and wh.st_rdev == 0
        assert os.readlink(r / "usr/lib64") == "/usr/lib"
    assert not mounted(folder / "rootfs")
    assert tree_digest(Path(chain[1])) == base_before
    assert tree_digest(Path(chain[0])) == top_before


def test_whiteouts_and_opaque_dirs_in_the_merged_view(info: DriverInfo, chain: list[str]) -> None:
    create_sandbox_layer(info, "sb", "top", chain)
    with prepared(info, "sb", chain) as root:
        r = Path(root)
        assert not (r / "etc/gone").exists()
        assert sorted(os.listdir(r / "etc")) == ["attr", "hello", "hello-link", "new"]
        assert os.listdir(r / "opq") == ["fresh"]
    # The lower layer still has the file the whiteout hides.
    assert (Path(chain[1]) / "fs/etc/gone").exists()


def test_unprepare_unmounts_and_is_idempotent(info: DriverInfo, chain: list[str]) -> None:
    create_sandbox_layer(info, "sb", "top", chain)
    rootfs = os.path.join(info.home_dir, "sb", "rootfs")
    prepare_layer(info, "sb", chain)
    try:
        assert mounted(rootfs)
        with pytest.raises(LayerError) as e:
            prepare_layer(info, "sb", chain)
        assert e.value.code is ERR_VMCOMPUTE_OPERATION_INVALID_STATE
    finally:
        unprepare_layer(info, "sb")
    assert not mounted(rootfs)
    unprepare_layer(info, "sb")  # nothing to do: no error
    destroy_layer(info, "sb")
    assert not os.path.exists(os.path.dirname(rootfs))


def test_destroy_while_prepared_is_refused_and_changes_nothing(
    info: DriverInfo, roots: Roots, chain: list[str]
) -> None:
    create_sandbox_layer(info, "sb", "top", chain)
    folder = Path(info.home_dir) / "sb"
    with prepared(info, "sb", chain) as root:
        (Path(root) / "etc/kept").write_text("still here")
        before = tree_digest(folder / "upper")
        with pytest.raises(LayerError) as e:
            destroy_layer(info, "sb")
        assert e.value.code is ERR_VMCOMPUTE_OPERATION_INVALID_STATE
        assert mounted(root)
        assert layer_exists(info, "sb")
        assert (Path(root) / "etc/kept").read_text() == "still here"
        assert tree_digest(folder / "upper") == before
        row = Registry.open(roots.db_path).query_one("SELECT state FROM layers WHERE id = 'sb'")
        assert row is not None and row["state"] == "prepared"
    destroy_layer(info, "sb")
    assert not layer_exists(info, "sb")
    assert not [n for n in os.listdir(info.home_dir) if n.startswith((".trash-", ".tmp-"))]


def test_sandbox_without_parents_and_parent_mismatch(info: DriverInfo, chain: list[str]) -> None:
    create_sandbox_layer(info, "alone", "", [])
    with prepared(info, "alone", []) as root:
        (Path(root) / "f").write_text("x")
        assert os.listdir(root) == ["f"]
    with pytest.raises(InvalidConfigError):
        create_sandbox_layer(info, "wrong", "top", [chain[1]])
    assert not layer_exists(info, "wrong")
    with pytest.raises(LayerError) as e:
        prepare_layer(info, "top", [chain[1]])  # a read-only layer is not a sandbox
    assert e.value.code is ERR_VMCOMPUTE_OPERATION_INVALID_STATE


def test_mount_path_of_read_only_layer_is_usable_as_parent(
    info: DriverInfo, chain: list[str]
) -> None:
    content = get_layer_mount_path(info, "top")
    assert content == os.path.join(chain[0], "fs")
    create_sandbox_layer(info, "sb", "top", [content, get_layer_mount_path(info, "base")])
    with prepared(info, "sb", [content, chain[1]]) as root:
        assert (Path(root) / "etc/new").exists()


def test_busybox_runs_in_a_prepared_sandbox(info: DriverInfo, roots: Roots) -> None:
    from pyhcs._layers import build_busybox_tar

    tar = build_busybox_tar(roots.root.parent / "bb.tar")
    base = import_layer_from_tar(info, "bb", str(tar))
    create_sandbox_layer(info, "bbsb", "bb", [base])
    with prepared(info, "bbsb", [base]) as root:
        out = subprocess.run(
            ["chroot", root, "/bin/sh", "-c", "echo hi > /tmp/x; cat /tmp/x; id -u"],
            capture_output=True,
            text=True,
            check=True,
            timeout=30,
        ).stdout
        assert out.split() == ["hi", "0"]
        # upper/ is on the sandbox's own file system (sandbox size): reachable while prepared.
        assert (Path(info.home_dir) / "bbsb/upper/tmp/x").read_text() == "hi\n"
    assert not (Path(base) / "fs/tmp/x").exists()


# -- the diff flavour -------------------------------------------------------------------------


def _listing(root: Path) -> dict[str, tuple[int, bytes]]:
    out = {}
    for base, dirs, files in os.walk(root):
        for name in dirs + files:
            p = Path(base) / name
            st = os.lstat(p)
            body = (
                p.read_bytes()
                if stat.S_ISREG(st.st_mode)
                else os.readlink(p).encode()
                if stat.S_ISLNK(st.st_mode)
                else b""
            )
            out[str(p.relative_to(root))] = (st.st_mode, body)
    return out


def test_diff_flavour_copies_the_chain_without_overlay(roots: Roots) -> None:
    diff = DriverInfo(flavour=0)
    base = import_layer_from_tar(diff, "base", io.BytesIO(build(BASE)))
    top = import_layer_from_tar(diff, "top", io.BytesIO(build(TOP)), [base])
    base_before = tree_digest(Path(base))
    create_sandbox_layer(diff, "dsb", "top", [top, base])
    with pytest.raises(LayerError):
        prepare_layer(DriverInfo(flavour=1), "dsb", [top, base])  # made for flavour 0
    prepare_layer(diff, "dsb", [top, base])
    rootfs = Path(diff.home_dir) / "dsb/rootfs"
    try:
        assert not mounted(rootfs)
        assert get_layer_mount_path(diff, "dsb") == str(rootfs)
        assert (rootfs / "etc/hello").read_bytes() == b"hello\n"
        assert not (rootfs / "etc/gone").exists()
        assert os.listdir(rootfs / "opq") == ["fresh"]
        assert os.readlink(rootfs / "usr/lib64") == "/usr/lib"
        assert stat.S_IMODE(os.stat(rootfs / "bin/suid").st_mode) == 0o4755
        assert os.stat(rootfs / "etc/hello").st_ino == os.stat(rootfs / "etc/hello-link").st_ino
        (rootfs / "etc/hello").write_text("changed")
        with pytest.raises(LayerError):
            destroy_layer(diff, "dsb")
    finally:
        unprepare_layer(diff, "dsb")
    # Preparing again keeps what the container wrote.
    prepare_layer(diff, "dsb", [top, base])
    try:
        assert (rootfs / "etc/hello").read_text() == "changed"
    finally:
        unprepare_layer(diff, "dsb")
    assert tree_digest(Path(base)) == base_before
    destroy_layer(diff, "dsb")


def test_diff_and_filter_flavours_show_the_same_tree(roots: Roots, chain: list[str]) -> None:
    filt, diff = DriverInfo(flavour=1), DriverInfo(flavour=0)
    create_sandbox_layer(filt, "f1", "top", chain)
    create_sandbox_layer(diff, "d0", "top", chain)
    prepare_layer(diff, "d0", chain)
    try:
        with prepared(filt, "f1", chain) as root:
            assert _listing(Path(root)) == _listing(Path(get_layer_mount_path(diff, "d0")))
    finally:
        unprepare_layer(diff, "d0")


# -- the rest of the hcsshim surface -----------------------------------------------------------


def test_activate_and_deactivate_count(info: DriverInfo, chain: list[str]) -> None:
    create_sandbox_layer(info, "sb", "top", chain)
    activate_layer(info, "sb")
    activate_layer(info, "sb")
    deactivate_layer(info, "sb")
    deactivate_layer(info, "sb")
    with pytest.raises(LayerError) as e:
        deactivate_layer(info, "sb")
    assert e.value.code is ERR_VMCOMPUTE_OPERATION_INVALID_STATE
    with pytest.raises(LayerError) as e:
        activate_layer(info, "missing")
    assert e.value.code is ERR_ELEMENT_NOT_FOUND


def test_shared_base_images_lists_base_layers(info: DriverInfo, chain: list[str]) -> None:
    doc = json.loads(get_shared_base_images())
    assert [i["ID"] for i in doc["Images"]] == ["base"]
    img = doc["Images"][0]
    assert img["Path"] == chain[1] and img["Name"] == "base"
    assert img["CreatedTime"].endswith("Z") and img["Size"] > 0


def test_layer_descriptors_use_name_to_guid(chain: list[str]) -> None:
    descs = layer_paths_to_descriptors(chain)
    assert [x.layer_id for x in descs] == [name_to_guid("top"), name_to_guid("base")]
    assert [x.path for x in descs] == chain and all(x.flags == 0 for x in descs)


def test_process_base_layer_and_utility_vm(info: DriverInfo, roots: Roots) -> None:
    folder = Path(info.home_dir) / "winbase"
    (folder / "Files" / "etc").mkdir(parents=True)
    (folder / "Files" / "etc" / "os-release").write_text("x")
    process_base_layer(str(folder))
    assert (folder / "fs/etc/os-release").exists() and not (folder / "Files").exists()
    assert layer_exists(info, "winbase")
    with pytest.raises(LayerError) as e:
        process_base_layer(str(folder))
    assert e.value.code is ERR_ELEMENT_NOT_FOUND
    uvm = roots.root.parent / "uvm"
    with pytest.raises(LayerError):
        process_utility_vm_image(str(uvm))
    (uvm / "Files").mkdir(parents=True)
    with pytest.raises(NotSupportedError):
        process_utility_vm_image(str(uvm))


def test_driver_info_defaults_to_the_state_root(roots: Roots) -> None:
    assert DriverInfo().home_dir == str(roots.layers_dir)
    assert DriverInfo().flavour == 1
    with pytest.raises(InvalidConfigError):
        DriverInfo(flavour=2)


def test_explicit_roots_win(roots: Roots) -> None:
    other = Roots(roots.root.parent / "other", roots.root.parent / "otherrun")
    info = DriverInfo(home_dir=str(other.layers_dir))
    import_layer_from_tar(info, "elsewhere", io.BytesIO(build(BASE)), roots=other)
    assert layer_exists(info, "elsewhere", roots=other)
    assert not layer_exists(info, "elsewhere")  # not in the env's registry
    destroy_layer(info, "elsewhere", roots=other)


def test_hard_link_replaced_by_a_file_leaves_its_twin(info: DriverInfo) -> None:
    entries = [f("a", b"original"), hl("b", "a"), f("b", b"replacement")]
    path = import_layer_from_tar(info, "twins", io.BytesIO(build(entries)))
    assert (Path(path) / "fs/a").read_bytes() == b"original"
    assert (Path(path) / "fs/b").read_bytes() == b"replacement"


def test_xz_and_bzip2_archives(info: DriverInfo) -> None:
    import bz2
    import lzma

    raw = build(BASE)
    for i, packed in enumerate((lzma.compress(raw), bz2.compress(raw))):
        path = import_layer_from_tar(info, f"c{i}", io.BytesIO(packed))
        assert (Path(path) / "fs/etc/hello").read_bytes() == b"hello\n"


def test_concurrent_imports_of_one_id_leave_one_layer(info: DriverInfo) -> None:
    data = build(BASE, gz=True)
    results: list[str] = []

    def attempt() -> None:
        try:
            import_layer_from_tar(info, "race", io.BytesIO(data))
            results.append("ok")
        except LayerError as e:
            assert e.code is ERR_ALREADY_EXISTS
            results.append("exists")

    threads = [threading.Thread(target=attempt) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results.count("ok") == 1 and results.count("exists") == 5
    assert layer_exists(info, "race")
    assert not [n for n in os.listdir(info.home_dir) if n.startswith(".tmp-")]


def test_prepare_for_a_user_namespace_maps_the_parents_ids(
    info: DriverInfo, chain: list[str]
) -> None:
    from pyhcs import IdMapping, UserNamespace

    ns = UserNamespace(uid_map=(IdMapping(0, 100000, 65536),),
                       gid_map=(IdMapping(0, 200000, 65536),))
    create_sandbox_layer(info, "sb", "top", chain)
    rootfs = os.path.join(info.home_dir, "sb", "rootfs")
    prepare_layer(info, "sb", chain, userns=ns)
    try:
        # stored as 0:0 in the parents, seen through the mappings in the rootfs; the
        # upper's root (the container's "/") belongs to the namespace's root
        assert os.stat(Path(chain[1]) / "fs/etc/hello").st_uid == 0
        st = os.stat(os.path.join(rootfs, "etc/hello"))
        assert (st.st_uid, st.st_gid) == (100000, 200000)
        assert (os.stat(rootfs).st_uid, os.stat(rootfs).st_gid) == (100000, 200000)
    finally:
        unprepare_layer(info, "sb")
    assert not mounted(rootfs)
    destroy_layer(info, "sb")
    with pytest.raises(NotSupportedError, match="filter flavour"):
        prepare_layer(DriverInfo(0, info.home_dir), "sb", chain, userns=ns)
