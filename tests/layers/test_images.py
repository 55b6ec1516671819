"""Images (names for layer chains) and the busybox image builder."""

from __future__ import annotations

import hashlib
import io
import json
import os
import stat
import tarfile
from pathlib import Path

import pytest

from pyhcs._errors import (
    ERR_VMCOMPUTE_OPERATION_INVALID_STATE,
    InvalidConfigError,
    LayerError,
    is_not_exist,
)
from pyhcs._layers import (
    BUSYBOX_CONFIG,
    DriverInfo,
    ImageNotFoundError,
    build_busybox_tar,
    create_sandbox_layer,
    destroy_layer,
    ensure_busybox_image,
    get_shared_base_images,
    import_image,
    import_layer_from_tar,
    layer_exists,
    list_images,
    remove_image,
    resolve_image,
)
from pyhcs._paths import Roots

from .tarbuild import build, d, f, sym

ROOTFS = [d("etc"), f("etc/os-release", b"ID=test\n"), sym("bin", "usr/bin"), d("usr/bin")]


def test_import_image_uses_the_archive_digest_and_shares_layers(roots: Roots) -> None:
    data = build(ROOTFS, gz=True)
    digest = hashlib.sha256(data).hexdigest()
    img = import_image("test:1", io.BytesIO(data), config={"Cmd": ["/bin/sh"]})
    assert img.name == "test:1" and img.top_layer == digest
    assert img.layer_chain == [os.path.join(str(roots.layers_dir), digest)]
    assert img.config == {"Cmd": ["/bin/sh"]}
    assert (Path(img.layer_chain[0]) / "fs/etc/os-release").read_bytes() == b"ID=test\n"
    again = import_image("test:2", io.BytesIO(data))
    assert again.top_layer == digest
    assert [i.name for i in list_images()] == ["test:1", "test:2"]
    assert [n for n in os.listdir(roots.layers_dir) if not n.startswith(".")] == [digest]
    listed = json.loads(get_shared_base_images())["Images"]
    assert [(i["ID"], i["Name"]) for i in listed] == [(digest, "test:1")]


def test_resolve_by_name_or_layer_id(roots: Roots) -> None:
    info = DriverInfo()
    base = import_layer_from_tar(info, "b0", io.BytesIO(build(ROOTFS)))
    import_layer_from_tar(info, "l1", io.BytesIO(build([f("x", b"1")])), [base])
    chain = resolve_image("l1")
    assert chain.name == "l1" and chain.config == {}
    assert chain.layer_chain == [os.path.join(info.home_dir, "l1"), base]
    with pytest.raises(ImageNotFoundError) as e:
        resolve_image("nothing")
    assert is_not_exist(e.value)
    assert "image nothing" in str(e.value)


def test_remove_image_prunes_unused_layers_only(roots: Roots) -> None:
    data = build(ROOTFS)
    img = import_image("a", io.BytesIO(data))
    import_image("b", io.BytesIO(data))
    remove_image("a")
    assert layer_exists(DriverInfo(), img.top_layer)  # still named by "b"
    create_sandbox_layer(DriverInfo(), "sb", img.top_layer, img.layer_chain)
    remove_image("b")
    assert layer_exists(DriverInfo(), img.top_layer)  # the sandbox is built on it
    destroy_layer(DriverInfo(), "sb")
    import_image("c", io.BytesIO(data))
    remove_image("c")
    assert not layer_exists(DriverInfo(), img.top_layer)
    with pytest.raises(ImageNotFoundError):
        remove_image("c")


def test_an_image_layer_cannot_be_destroyed_under_its_name(roots: Roots) -> None:
    img = import_image("keep", io.BytesIO(build(ROOTFS)))
    with pytest.raises(LayerError) as e:
        destroy_layer(DriverInfo(), img.top_layer)
    assert e.value.code is ERR_VMCOMPUTE_OPERATION_INVALID_STATE


def test_image_names_are_validated(roots: Roots) -> None:
    for bad in ("", "with space", "tab\tname", "x" * 300):
        with pytest.raises(InvalidConfigError):
            import_image(bad, io.BytesIO(build(ROOTFS)))


# -- busybox ----------------------------------------------------------------------------------


def test_busybox_tar_is_deterministic_and_complete(roots: Roots) -> None:
    out = roots.root.parent
    a = build_busybox_tar(out / "a.tar")
    b = build_busybox_tar(out / "b.tar")
    assert a.read_bytes() == b.read_bytes()
    with tarfile.open(a) as tf:
        members = {m.name: m for m in tf.getmembers()}
    names = [m for m in members]
    assert names == sorted(names)
    bb = members["bin/busybox"]
    assert bb.isreg() and stat.S_IMODE(bb.mode) == 0o755
    assert members["bin/sh"].issym() and members["bin/sh"].linkname == "busybox"
    assert stat.S_IMODE(members["tmp"].mode) == 0o1777
    assert all(m.mtime == 0 and m.uid == 0 and m.gid == 0 for m in members.values())
    for dname in ("dev", "proc", "sys", "etc", "root", "home", "var/tmp", "usr/bin"):
        assert members[dname].isdir(), dname
    with tarfile.open(a) as tf:
        passwd = tf.extractfile("etc/passwd")
        assert passwd is not None
        assert passwd.read().splitlines()[0] == b"root:x:0:0:root:/root:/bin/sh"


def test_busybox_rejects_a_dynamic_binary(roots: Roots) -> None:
    with pytest.raises(InvalidConfigError):
        build_busybox_tar(roots.root.parent / "x.tar", busybox="/bin/ls")
    with pytest.raises(InvalidConfigError):
        build_busybox_tar(roots.root.parent / "x.tar", busybox="/nonexistent")
    assert not (roots.root.parent / "x.tar").exists()


def test_ensure_busybox_image_imports_once(roots: Roots) -> None:
    img = ensure_busybox_image()
    assert img.name == "busybox" and img.config == BUSYBOX_CONFIG
    fs = Path(img.layer_chain[0]) / "fs"
    assert os.readlink(fs / "bin/sh") == "busybox"
    assert os.access(fs / "bin/busybox", os.X_OK)
    again = ensure_busybox_image()
    assert again.top_layer == img.top_layer and again.created == img.created
    # Same busybox, same bytes, same layer id: a second name shares the layer.
    other = ensure_busybox_image("bb2")
    assert other.top_layer == img.top_layer
