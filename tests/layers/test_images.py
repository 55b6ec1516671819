"""Images (names for layer chains) and the busybox image builder."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import stat
import tarfile
from pathlib import Path
from typing import Any

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
    ImageArchiveError,
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

from .ociarchive import (
    OCI_CONFIG,
    OCI_INDEX,
    OCI_MANIFEST,
    REF_NAME,
    Archive,
    add_oci_manifest,
    docker_save,
    jbytes,
    manifest_of,
    oci_layout,
    replace_blob,
    zstd_compress,
)
from .tarbuild import build, d, f, sym

ROOTFS = [d("etc"), f("etc/os-release", b"ID=test\n"), sym("bin", "usr/bin"), d("usr/bin")]


def test_rootfs_image_is_named_by_its_diff_id_and_shares_layers(roots: Roots) -> None:
    data = build(ROOTFS, gz=True)
    # The layer id is the diff id: the sha256 of the uncompressed tar.
    digest = hashlib.sha256(gzip.decompress(data)).hexdigest()
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


# -- image archives: OCI image layouts and docker save ---------------------------------------

BASE = build([d("etc"), f("etc/os-release", b"ID=base\n"), d("usr"), f("usr/base", b"b")])
APP_A = build([d("app"), f("app/name", b"a\n"), f(".wh.usr", b"")])
APP_B = build([d("app"), f("app/name", b"b\n")])
CONFIG = {
    "Env": ["PATH=/bin", "A=1"],
    "Entrypoint": ["/bin/sh", "-c"],
    "Cmd": ["echo hi"],
    "WorkingDir": "app",
    "User": "nobody",
    "ExposedPorts": {"80/tcp": {}},
    "Labels": {"l": "v"},
    "Volumes": {"/data": {}},  # not kept
}


def _chain_ids(*tars: bytes) -> list[str]:
    """OCI chain ids, base first."""
    out: list[str] = []
    for t in tars:
        diff = hashlib.sha256(t).hexdigest()
        parent = f"sha256:{out[-1]} " if out else ""
        out.append(hashlib.sha256(f"{parent}sha256:{diff}".encode()).hexdigest() if out else diff)
    return out


def _stored(roots: Roots) -> list[str]:
    """Every entry of the layer home: layer folders and any leftover."""
    try:
        return sorted(os.listdir(roots.layers_dir))
    except FileNotFoundError:
        return []


def _layer_rows(roots: Roots) -> list[tuple[str, str | None]]:
    from pyhcs._registry import Registry

    reg = Registry.open(roots.db_path)
    return sorted((r["id"], r["parent"]) for r in reg.query("SELECT id, parent FROM layers"))


def _assert_nothing_stored(roots: Roots) -> None:
    assert list_images() == []
    assert _layer_rows(roots) == []
    assert _stored(roots) == []


def test_oci_layout_import_keeps_chain_config_and_name(roots: Roots) -> None:
    a = oci_layout([BASE, APP_A], CONFIG, ref_name="app:1")
    img = import_image(None, io.BytesIO(a.tar()))
    base_id, top_id = _chain_ids(BASE, APP_A)
    assert img.name == "app:1" and img.top_layer == top_id
    assert [os.path.basename(p) for p in img.layer_chain] == [top_id, base_id]
    assert _layer_rows(roots) == sorted([(base_id, None), (top_id, base_id)])
    assert img.config == {
        "Env": ["PATH=/bin", "A=1"],
        "Entrypoint": ["/bin/sh", "-c"],
        "Cmd": ["echo hi"],
        "WorkingDir": "/app",  # relative in the archive: resolved against /
        "User": "nobody",
        "ExposedPorts": {"80/tcp": {}},
        "Labels": {"l": "v"},
    }
    top = Path(img.layer_chain[0]) / "fs"
    assert (top / "app/name").read_bytes() == b"a\n"
    assert os.stat(top / "usr").st_rdev == 0 and stat.S_ISCHR(os.stat(top / "usr").st_mode)
    assert (Path(img.layer_chain[1]) / "fs/etc/os-release").read_bytes() == b"ID=base\n"
    assert not [n for n in _stored(roots) if n.startswith(".")]
    # An explicit name wins over the annotation; config is merged over the image's.
    again = import_image("renamed", io.BytesIO(a.tar()), config={"User": "root"})
    assert again.top_layer == top_id and again.config["User"] == "root"
    assert again.config["Cmd"] == ["echo hi"]


def test_docker_save_import_and_cross_format_sharing(roots: Roots, tmp_path: Path) -> None:
    a = docker_save([BASE, APP_A, APP_A], CONFIG, repo_tags=["repo/app:2", "other:tag"])
    # docker save links a layer.tar it already wrote instead of writing it twice.
    paths = a.json("manifest.json")[0]["Layers"]
    del a.files[paths[2]]
    a.links[paths[2]] = f"../{paths[1]}"
    path = tmp_path / "saved.tar"
    path.write_bytes(a.tar())
    img = import_image(None, path)
    ids = _chain_ids(BASE, APP_A, APP_A)
    assert img.name == "repo/app:2" and img.top_layer == ids[2]
    assert [os.path.basename(p) for p in img.layer_chain] == ids[::-1]
    assert img.config["Entrypoint"] == ["/bin/sh", "-c"]
    # The same image from an OCI layout has the same chain ids: nothing new is stored.
    before = _stored(roots)
    oci = import_image("oci", io.BytesIO(oci_layout([BASE, APP_A, APP_A], CONFIG).tar()))
    assert oci.layer_chain == img.layer_chain
    assert _stored(roots) == before


def test_images_share_base_layers_and_removal_keeps_what_is_used(roots: Roots) -> None:
    base_id, a_id = _chain_ids(BASE, APP_A)
    _, b_id = _chain_ids(BASE, APP_B)
    import_image("a", io.BytesIO(oci_layout([BASE, APP_A]).tar()))
    seen: list[tuple[int, int]] = []
    b = import_image("b", io.BytesIO(oci_layout([BASE, APP_B]).tar()),
                     progress=lambda done, total: seen.append((done, total)))
    assert b.layer_chain[1] == os.path.join(str(roots.layers_dir), base_id)
    assert _stored(roots) == sorted([base_id, a_id, b_id])
    # Only the new layer's blob was read (the shared base was not).
    app_b_blob = len(gzip.compress(APP_B, mtime=0))
    assert seen[0] == (0, app_b_blob) and seen[-1] == (app_b_blob, app_b_blob)
    remove_image("a")
    assert _stored(roots) == sorted([base_id, b_id])
    assert resolve_image("b").layer_chain == b.layer_chain
    remove_image("b")
    assert _stored(roots) == []


def test_compressed_and_piped_archives(roots: Roots) -> None:
    data = oci_layout([BASE, APP_A], compression="none").tar()
    top = _chain_ids(BASE, APP_A)[-1]
    # `docker save | gzip`: the outer archive is compressed.
    assert import_image("gz", io.BytesIO(gzip.compress(data))).top_layer == top

    class Pipe(io.RawIOBase):
        """A stream that cannot seek, as stdin from a pipe."""

        def __init__(self, raw: bytes) -> None:
            self._src = io.BytesIO(raw)

        def readable(self) -> bool:
            return True

        def readinto(self, buf: Any) -> int:
            n = self._src.readinto(buf)
            return n

    pipe = io.BufferedReader(Pipe(docker_save([BASE, APP_A]).tar()))
    assert not pipe.seekable()
    assert import_image("pipe", pipe).top_layer == top
    assert not [n for n in _stored(roots) if n.startswith(".")]


def test_zstd_layers(roots: Roots) -> None:
    from pyhcs._layers import _extract

    probe: Any = io.BufferedReader(io.BytesIO(zstd_compress(b"x")))
    try:
        _extract._decompressor(probe)
    except _extract.ArchiveError:
        pytest.skip("the layer extractor does not read zstd yet (layers-core work)")
    img = import_image("z", io.BytesIO(oci_layout([BASE, APP_A], compression="zstd").tar()))
    assert img.top_layer == _chain_ids(BASE, APP_A)[-1]
    assert (Path(img.layer_chain[0]) / "fs/app/name").read_bytes() == b"a\n"


def test_the_host_platform_is_chosen_from_a_multi_platform_index(roots: Roots) -> None:
    a = Archive()
    arm = add_oci_manifest(a, [APP_B], arch="arm64")
    amd = add_oci_manifest(a, [APP_A], arch="amd64")
    inner = jbytes({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [arm, amd]})
    a.set_json("index.json", {"schemaVersion": 2, "manifests": [
        {"mediaType": OCI_INDEX, "digest": a.add_blob(inner), "size": len(inner),
         "annotations": {REF_NAME: "multi"}},
    ]})
    a.set_json("oci-layout", {"imageLayoutVersion": "1.0.0"})
    img = import_image(None, io.BytesIO(a.tar()))
    assert img.name == "multi"
    assert (Path(img.layer_chain[0]) / "fs/app/name").read_bytes() == b"a\n"


def test_an_archive_of_several_images_needs_a_name(roots: Roots) -> None:
    a = oci_layout([APP_A], ref_name="one")
    two = add_oci_manifest(a, [APP_B])
    two["annotations"] = {REF_NAME: "two"}
    index = a.json("index.json")
    index["manifests"].append(two)
    a.set_json("index.json", index)
    with pytest.raises(ImageArchiveError, match="holds 2 images"):
        import_image(None, io.BytesIO(a.tar()))
    img = import_image("two", io.BytesIO(a.tar()))
    assert (Path(img.layer_chain[0]) / "fs/app/name").read_bytes() == b"b\n"
    assert [i.name for i in list_images()] == ["two"]


def test_a_rootfs_tar_needs_a_name(roots: Roots) -> None:
    with pytest.raises(InvalidConfigError):
        import_image(None, io.BytesIO(BASE))
    _assert_nothing_stored(roots)


# -- refused archives: nothing is left behind --------------------------------------------------


def _corrupt_layer_blob(a: Archive) -> None:
    # The second layer: the first is new too, and must not stay behind.
    d = manifest_of(a)["layers"][1]["digest"]
    other = gzip.compress(APP_B, mtime=0)
    # Smaller than the real blob: zero padding after a gzip stream is allowed, so this is
    # a valid blob of the right size whose only fault is its digest.
    assert len(other) < len(a.blob(d))
    replace_blob(a, d, other.ljust(len(a.blob(d)), b"\0"))


def _wrong_diff_id(a: Archive) -> None:
    # A consistent archive (every blob matches its digest) whose config lies about the
    # content of a layer: storing it under that diff id would poison the shared store.
    m = manifest_of(a)
    config = json.loads(a.blob(m["config"]["digest"]))
    config["rootfs"]["diff_ids"][1] = "sha256:" + hashlib.sha256(APP_B).hexdigest()
    cfg = jbytes(config)
    m["config"] = {"mediaType": OCI_CONFIG, "digest": a.add_blob(cfg), "size": len(cfg)}
    mb = jbytes(m)
    a.set_json("index.json", {"schemaVersion": 2, "manifests": [
        {"mediaType": OCI_MANIFEST, "digest": a.add_blob(mb), "size": len(mb)}]})


def _corrupt_config(a: Archive) -> None:
    d = manifest_of(a)["config"]["digest"]
    config = json.loads(a.blob(d))
    config["config"]["User"] = "root00"  # same size as "nobody": only the digest tells
    replace_blob(a, d, jbytes(config))


def _corrupt_manifest(a: Archive) -> None:
    d = a.json("index.json")["manifests"][0]["digest"]
    m = json.loads(a.blob(d))
    m["layers"].reverse()
    replace_blob(a, d, jbytes(m))


def _missing_blob(a: Archive) -> None:
    d = manifest_of(a)["layers"][1]["digest"]
    del a.files[f"blobs/sha256/{d.split(':')[1]}"]


def _set_layer_digest(value: str) -> Any:
    def tamper(a: Archive) -> None:
        m = manifest_of(a)
        m["layers"][1]["digest"] = value
        mb = jbytes(m)
        a.set_json("index.json", {"schemaVersion": 2, "manifests": [
            {"mediaType": OCI_MANIFEST, "digest": a.add_blob(mb), "size": len(mb)}]})

    return tamper


def _wrong_size(a: Archive) -> None:
    m = manifest_of(a)
    m["layers"][1]["size"] += 1
    mb = jbytes(m)
    a.set_json("index.json", {"schemaVersion": 2, "manifests": [
        {"mediaType": OCI_MANIFEST, "digest": a.add_blob(mb), "size": len(mb)}]})


def _blob_links_out(a: Archive) -> None:
    d = manifest_of(a)["layers"][1]["digest"]
    path = f"blobs/sha256/{d.split(':')[1]}"
    del a.files[path]
    a.links[path] = "../../../../etc/passwd"


def _index_not_json(a: Archive) -> None:
    a.files["index.json"] = b"{not json"


OCI_CASES: dict[str, tuple[Any, str]] = {
    "corrupt layer blob": (_corrupt_layer_blob, "does not match its digest"),
    "wrong diff id": (_wrong_diff_id, "does not match its diff id"),
    "corrupt config": (_corrupt_config, "does not match its digest"),
    "corrupt manifest": (_corrupt_manifest, "does not match its digest"),
    "missing blob": (_missing_blob, "missing from the archive"),
    "digest with ..": (_set_layer_digest("sha256:../../../../etc/passwd"), "malformed"),
    "sha512 digest": (_set_layer_digest("sha512:" + "0" * 128), "unsupported"),
    "descriptor size lies": (_wrong_size, "size"),
    "blob links outside": (_blob_links_out, "links outside the archive"),
    "index not json": (_index_not_json, "not valid JSON"),
}


@pytest.mark.parametrize("case", sorted(OCI_CASES))
def test_refused_oci_archive_leaves_nothing(case: str, roots: Roots) -> None:
    tamper, why = OCI_CASES[case]
    a = oci_layout([BASE, APP_A], CONFIG)
    tamper(a)
    with pytest.raises(LayerError, match=why) as e:
        import_image("x", io.BytesIO(a.tar()))
    assert isinstance(e.value, ImageArchiveError)
    assert e.value.operation == "ImportImage"
    _assert_nothing_stored(roots)


def _docker_layer_path(value: str) -> Any:
    def tamper(a: Archive) -> None:
        m = a.json("manifest.json")
        m[0]["Layers"][1] = value
        a.set_json("manifest.json", m)

    return tamper


def _docker_config_path(value: str) -> Any:
    def tamper(a: Archive) -> None:
        m = a.json("manifest.json")
        m[0]["Config"] = value
        a.set_json("manifest.json", m)

    return tamper


def _docker_corrupt_layer(a: Archive) -> None:
    path = a.json("manifest.json")[0]["Layers"][1]
    a.files[path] = APP_B


def _docker_corrupt_config(a: Archive) -> None:
    path = a.json("manifest.json")[0]["Config"]
    a.files[path] = a.files[path].replace(b'"nobody"', b'"root"')


DOCKER_CASES: dict[str, tuple[Any, str]] = {
    "layer path ../../etc/passwd": (_docker_layer_path("../../etc/passwd"), "unsafe path"),
    "absolute layer path": (_docker_layer_path("/etc/passwd"), "unsafe path"),
    "config path with ..": (_docker_config_path("../" + "a" * 64 + ".json"), "unsafe path"),
    "config path without digest": (_docker_config_path("config.json"), "digest"),
    "corrupt layer": (_docker_corrupt_layer, "does not match its diff id"),
    "corrupt config": (_docker_corrupt_config, "does not match its digest"),
    "missing layer": (_docker_layer_path("nothere/layer.tar"), "missing"),
}


@pytest.mark.parametrize("case", sorted(DOCKER_CASES))
def test_refused_docker_archive_leaves_nothing(case: str, roots: Roots) -> None:
    tamper, why = DOCKER_CASES[case]
    a = docker_save([BASE, APP_A], CONFIG)
    tamper(a)
    with pytest.raises(ImageArchiveError, match=why):
        import_image(None, io.BytesIO(a.tar()))
    _assert_nothing_stored(roots)


def test_refused_import_keeps_shared_layers(roots: Roots) -> None:
    import_image("base", io.BytesIO(oci_layout([BASE]).tar()))
    before = _stored(roots)
    a = oci_layout([BASE, APP_A])
    _corrupt_layer_blob(a)
    with pytest.raises(ImageArchiveError):
        import_image("x", io.BytesIO(a.tar()))
    assert _stored(roots) == before
    assert [i.name for i in list_images()] == ["base"]


def test_hostile_layer_in_an_image_is_refused(roots: Roots, tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.mkdir()
    evil = build([sym("evil", str(victim)), f("evil/pwned", b"pwned")])
    with pytest.raises(LayerError):
        import_image("x", io.BytesIO(oci_layout([BASE, evil]).tar()))
    assert os.listdir(victim) == []
    _assert_nothing_stored(roots)


def test_max_size_bounds_the_whole_import(roots: Roots) -> None:
    big = build([f("big", b"x" * 100_000)])
    with pytest.raises(LayerError, match="max_size"):
        import_image("x", io.BytesIO(oci_layout([BASE, big]).tar()), max_size=50_000)
    _assert_nothing_stored(roots)
    with pytest.raises(LayerError, match="max_size"):
        import_image("x", io.BytesIO(gzip.compress(oci_layout([big]).tar())), max_size=50_000)
    _assert_nothing_stored(roots)


def test_malformed_config_fields_are_refused(roots: Roots) -> None:
    for bad in ({"Env": "A=1"}, {"Cmd": [1]}, {"Labels": {"a": 1}}, {"User": 0}):
        with pytest.raises(ImageArchiveError, match="malformed image config"):
            import_image("x", io.BytesIO(oci_layout([BASE], bad).tar()))
    _assert_nothing_stored(roots)


def test_docker_archive_with_blob_paths(roots: Roots) -> None:
    # docker 25+ writes layers and config as blobs/sha256/<hex>, named by their digest.
    a = Archive()
    layer_paths = []
    for t in (BASE, APP_A):
        a.add_blob(t)
        layer_paths.append(f"blobs/sha256/{hashlib.sha256(t).hexdigest()}")
    cfg = jbytes({"os": "linux", "config": {"Cmd": ["x"]},
                  "rootfs": {"type": "layers", "diff_ids": [
                      "sha256:" + hashlib.sha256(t).hexdigest() for t in (BASE, APP_A)]}})
    cfg_digest = a.add_blob(cfg)
    a.set_json("manifest.json", [{"Config": f"blobs/sha256/{cfg_digest[7:]}",
                                  "RepoTags": ["new:style"], "Layers": layer_paths}])
    img = import_image(None, io.BytesIO(a.tar()))
    assert img.name == "new:style" and img.config == {"Cmd": ["x"]}
    assert img.top_layer == _chain_ids(BASE, APP_A)[-1]
    # A blob path is checked against the digest it names, besides the diff id.
    remove_image("new:style")
    a.files[layer_paths[1]] = a.files[layer_paths[1]] + b"\0" * 1024
    with pytest.raises(ImageArchiveError, match="blob does not match its digest"):
        import_image(None, io.BytesIO(a.tar()))
    _assert_nothing_stored(roots)


def test_an_index_listing_too_many_manifests_is_refused(roots: Roots) -> None:
    a = oci_layout([BASE])
    index = a.json("index.json")
    index["manifests"] = index["manifests"] * 2000
    a.set_json("index.json", index)
    with pytest.raises(ImageArchiveError, match="more than 1024 manifests"):
        import_image(None, io.BytesIO(a.tar()))
    _assert_nothing_stored(roots)
