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


# A child that imports 'big' and is killed by SIGKILL exactly between the rename of the
# finished folder to <home>/big and the write of its registry row.
_KILLED_BEFORE_ROW = """
import os, signal, sys
from pyhcs._registry import Registry
from pyhcs._layers import DriverInfo, import_layer_from_tar
execute = Registry.execute
def execute_or_die(self, sql, params=()):
    if sql.lstrip().startswith("INSERT INTO layers"):
        assert os.path.isdir(os.path.join(DriverInfo().home_dir, "big", "fs"))
        os.kill(os.getpid(), signal.SIGKILL)
    return execute(self, sql, params)
Registry.execute = execute_or_die
import_layer_from_tar(DriverInfo(), "big", sys.argv[1])
"""


def _kill_between_rename_and_row(tmp_path: Path) -> tuple[DriverInfo, Path, Path]:
    """Import a small layer in a child killed between the folder's rename and the
    registry row; returns the store, the archive and the orphaned folder."""
    info = DriverInfo()
    tar = tmp_path / "small.tar"
    _big_tar(tar, files=20, size=1000)
    proc = subprocess.run([sys.executable, "-c", _KILLED_BEFORE_ROW, str(tar)], check=False)
    assert proc.returncode == -signal.SIGKILL
    folder = Path(info.home_dir) / "big"
    assert (folder / "fs").is_dir() and (folder / ".unpublished").is_file()
    assert not layer_exists(info, "big")
    return info, tar, folder


def test_kill_9_between_rename_and_row_is_recovered_by_the_next_store_open(
    roots: Roots, tmp_path: Path
) -> None:
    info, tar, folder = _kill_between_rename_and_row(tmp_path)
    # The next process that opens the store to create anything removes the orphan.
    code = (
        "from pyhcs._layers import DriverInfo, create_layer;"
        "create_layer(DriverInfo(), 'other', '')"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
    assert not folder.exists()
    assert layer_exists(info, "other")
    assert _stale(info) == []
    # ... and the same import then succeeds.
    import_layer_from_tar(info, "big", str(tar))
    assert layer_exists(info, "big")
    assert not (folder / ".unpublished").exists()
    assert len(list((folder / "fs").rglob("f*"))) == 20


def test_kill_9_between_rename_and_row_then_the_same_import_succeeds(
    roots: Roots, tmp_path: Path
) -> None:
    info, tar, folder = _kill_between_rename_and_row(tmp_path)
    import_layer_from_tar(info, "big", str(tar))  # in this process, which already scanned
    assert layer_exists(info, "big")
    assert len(list((folder / "fs").rglob("f*"))) == 20
    assert _stale(info) == []


def test_recovery_never_removes_what_is_not_an_orphan(roots: Roots, tmp_path: Path) -> None:
    import fcntl

    from pyhcs._errors import ERR_ALREADY_EXISTS, LayerError
    from pyhcs._layers import create_layer

    info = DriverInfo()
    tar = tmp_path / "small.tar"
    _big_tar(tar, files=3, size=10)
    home = Path(info.home_dir)
    # A registered layer whose process died before removing the file: kept.
    kept = Path(import_layer_from_tar(info, "kept", str(tar)))
    (kept / ".unpublished").touch()
    # A folder someone else put there, without the file: kept.
    (home / "users").mkdir()
    (home / "users" / "data").write_text("mine")
    # An orphan-looking folder whose publisher is alive (holds the lock): kept.
    (home / "live" / "fs").mkdir(parents=True)
    (home / "live" / ".unpublished").touch()
    fd = os.open(home / "live", os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        code = (
            "from pyhcs._layers import DriverInfo, create_layer;"
            "create_layer(DriverInfo(), 'other', '')"
        )
        subprocess.run([sys.executable, "-c", code], check=True)
        for lid in ("users", "live"):
            with pytest.raises(LayerError) as e:
                create_layer(info, lid, "")
            assert e.value.code is ERR_ALREADY_EXISTS
    finally:
        os.close(fd)
    assert layer_exists(info, "kept") and len(list((kept / "fs").rglob("f*"))) == 3
    assert (home / "users" / "data").read_text() == "mine"
    assert (home / "live" / ".unpublished").is_file()
    # Once its publisher is gone, the orphan goes with the next creation of its id.
    create_layer(info, "live", "")
    assert layer_exists(info, "live")
    assert not (home / "live" / ".unpublished").exists()
    assert _stale(info) == []
