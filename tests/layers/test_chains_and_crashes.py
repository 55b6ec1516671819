"""Deep parent chains (longer than one overlay mount's options allow) and kill -9 in the
middle of an import or an export."""

from __future__ import annotations

import hashlib
import io
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

from pyhcs._layers import (
    DriverInfo,
    create_sandbox_layer,
    export_layer_to_tar,
    get_layer_mount_path,
    import_layer_from_tar,
    layer_exists,
    prepare_layer,
    unprepare_layer,
)
from pyhcs._layers._fsops import mounts_under
from pyhcs._paths import Roots
from pyhcs._registry import Registry

from .tarbuild import build, f, mounted


@pytest.mark.parametrize("flavour", [1, 0])
def test_a_chain_of_128_layers_prepares_and_reads(roots: Roots, flavour: int) -> None:
    info = DriverInfo(flavour=flavour)
    chain: list[str] = []  # topmost first
    for i in range(128):
        entries = [f(f"layer{i:03d}", f"{i}".encode()), f("common", f"from {i}".encode())]
        if i == 100:
            entries.append(f(".wh.layer005"))
        lid = f"chain-{i:03d}-" + hashlib.sha256(str(i).encode()).hexdigest()
        chain.insert(0, import_layer_from_tar(info, lid, io.BytesIO(build(entries)), chain))
    lowers = ":".join(os.path.join(p, "fs") for p in chain)
    assert len(lowers) > 4096  # too long for mount(2)'s one page of options
    top_id = os.path.basename(chain[0])
    create_sandbox_layer(info, "deep", top_id, chain)
    prepare_layer(info, "deep", chain)
    rootfs = os.path.join(info.home_dir, "deep", "rootfs")
    try:
        root = Path(get_layer_mount_path(info, "deep"))
        names = set(os.listdir(root))
        assert {f"layer{i:03d}" for i in range(128) if i != 5} <= names
        assert "layer005" not in names
        assert (root / "common").read_text() == "from 127"
        assert (root / "layer000").read_text() == "0"
        assert (root / "layer064").read_text() == "64"
        (root / "written").write_text("x")
        assert (root / "written").read_text() == "x"
    finally:
        unprepare_layer(info, "deep")
        if mounted(rootfs):
            subprocess.run(["umount", "-l", rootfs], check=False)
    assert not mounted(rootfs)


def _big_tar(path: Path, files: int = 1500, size: int = 64 << 10) -> None:
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tf:
        blob = os.urandom(size)
        for i in range(files):
            ti = tarfile.TarInfo(f"d{i % 50}/f{i}")
            ti.size = size
            tf.addfile(ti, io.BytesIO(blob))


def _stale(info: DriverInfo) -> list[str]:
    try:
        return [n for n in os.listdir(info.home_dir) if n.startswith((".tmp-", ".trash-"))]
    except FileNotFoundError:
        return []


def _kill_when(proc: subprocess.Popen[bytes], started: object) -> None:
    deadline = time.monotonic() + 60
    while not started():  # type: ignore[operator]
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "the child never started"
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()


def test_kill_9_during_import_leaves_nothing_and_the_import_then_succeeds(
    roots: Roots, tmp_path: Path
) -> None:
    info = DriverInfo()
    tar = tmp_path / "big.tar"
    _big_tar(tar)
    code = (
        "import sys; from pyhcs._layers import DriverInfo, import_layer_from_tar;"
        "import_layer_from_tar(DriverInfo(), 'big', sys.argv[1])"
    )
    proc = subprocess.Popen([sys.executable, "-c", code, str(tar)])

    def started() -> bool:
        # Some files extracted into the temporary folder.
        for n in _stale(info):
            d = Path(info.home_dir) / n / "fs"
            if d.is_dir() and len(os.listdir(d)) > 5:
                return True
        return False

    _kill_when(proc, started)
    assert not layer_exists(info, "big")
    assert Registry.open(roots.db_path).query_one("SELECT id FROM layers WHERE id='big'") is None
    assert not os.path.exists(os.path.join(info.home_dir, "big"))
    assert mounts_under(info.home_dir) == []
    # The next store operation recovers the dead import's folder; the import then works.
    import_layer_from_tar(info, "big", str(tar))
    assert layer_exists(info, "big")
    assert _stale(info) == []
    assert len(list((Path(info.home_dir) / "big/fs").rglob("f*"))) == 1500


def test_kill_9_during_export_leaves_nothing(roots: Roots, tmp_path: Path) -> None:
    info = DriverInfo()
    tar = tmp_path / "big.tar"
    _big_tar(tar)
    layer = import_layer_from_tar(info, "big", str(tar))
    out = tmp_path / "out.tar.gz"
    code = (
        "import sys; from pyhcs._layers import export_layer_to_tar;"
        "export_layer_to_tar(open(sys.argv[2], 'wb'), sys.argv[1], compression='gzip')"
    )
    proc = subprocess.Popen([sys.executable, "-c", code, layer, str(out)])
    _kill_when(proc, lambda: out.exists() and out.stat().st_size > 0)
    assert layer_exists(info, "big")
    assert _stale(info) == []
    assert mounts_under(info.home_dir) == []
    # The layer is intact: exporting it works and is deterministic.
    a, b = io.BytesIO(), io.BytesIO()
    assert export_layer_to_tar(a, layer, compression="gzip") == export_layer_to_tar(
        b, layer, compression="gzip"
    )
    import_layer_from_tar(info, "again", io.BytesIO(a.getvalue()))
    assert layer_exists(info, "again")
