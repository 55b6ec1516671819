"""The registry: WAL, one schema, concurrent writers wait instead of failing."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from pyhcs._paths import Roots
from pyhcs._registry import Registry

WRITER = """
import sys
from pathlib import Path
from pyhcs._registry import Registry
reg = Registry.open(Path(sys.argv[1]))
for i in range(int(sys.argv[3])):
    reg.execute("INSERT INTO images(name, top_layer, created) VALUES (?,?,?)",
                (f"{sys.argv[2]}-{i}", "x", 0.0))
"""


def test_wal_and_concurrent_writers(roots: Roots) -> None:
    reg = Registry.open(roots.db_path)
    assert reg.query_one("PRAGMA journal_mode")[0] == "wal"  # type: ignore[index]
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, str(roots.db_path), f"w{i}", "50"],
                              stderr=subprocess.PIPE) for i in range(8)]
    for p in procs:
        _, err = p.communicate(timeout=60)
        assert p.returncode == 0, err
    assert reg.query_one("SELECT count(*) FROM images")[0] == 400  # type: ignore[index]


def test_env_overrides_roots(roots: Roots) -> None:
    assert Roots.resolve() == roots
    explicit = Roots.resolve("/x", "/y")
    assert str(explicit.db_path) == "/x/registry.db"
    assert str(explicit.container_run_dir("c1")) == "/y/containers/c1"


def test_many_state_roots_do_not_pile_up_descriptors(tmp_path: Path) -> None:
    def open_fds() -> int:
        return len(os.listdir("/proc/self/fd"))

    before = open_fds()
    for i in range(40):
        reg = Registry.open(tmp_path / f"r{i}" / "registry.db")
        reg.execute("INSERT INTO images(name, top_layer, created) VALUES ('a', 'x', 0)")
    del reg
    # the few most recently used stay open (three descriptors each), no more
    assert open_fds() - before <= 3 * Registry._KEEP
    # and an evicted registry still held by a caller keeps working
    held = Registry.open(tmp_path / "held" / "registry.db")
    for i in range(Registry._KEEP + 2):
        Registry.open(tmp_path / f"s{i}" / "registry.db")
    assert held.query_one("SELECT count(*) FROM images")[0] == 0  # type: ignore[index]
