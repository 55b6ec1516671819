"""``pyhcs image`` and ``pyhcs layer``, and ``pyhcs run`` applying an image's config,
run as a user would: a separate process per command."""

from __future__ import annotations

import gzip
import io
import json
import os
import pty
import select
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from pyhcs._layers import build_busybox_tar
from pyhcs._paths import Roots

from ..layers.ociarchive import docker_save, manifest_of, oci_layout, replace_blob
from ..layers.tarbuild import build, d, f

PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
ENTRY = b"""#!/bin/sh
echo "greeting=$GREETING foo=$FOO cwd=$(pwd) uid=$(id -u) args=$*"
"""
APP = build([
    d("app"),
    f("app/entry.sh", ENTRY, mode=0o755),
    d("app/work"),
])
APP_CONFIG = {
    "Env": [f"PATH={PATH}", "GREETING=hello", "FOO=image"],
    "Entrypoint": ["/app/entry.sh"],
    "Cmd": ["default", "cmd"],
    "WorkingDir": "/app/work",
    "User": "nobody",
    "ExposedPorts": {"8080/tcp": {}},
}


def pyhcs(*args: str, input: bytes | None = None, timeout: float = 60
          ) -> subprocess.CompletedProcess[str]:
    r = subprocess.run([sys.executable, "-m", "pyhcs", *args], capture_output=True,
                       input=input, timeout=timeout)
    return subprocess.CompletedProcess(r.args, r.returncode, r.stdout.decode(),
                                       r.stderr.decode())


def one_line_error(r: subprocess.CompletedProcess[str]) -> str:
    assert r.returncode == 125, (r.stdout, r.stderr)
    assert r.stderr.startswith("pyhcs: ") and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    return r.stderr


@pytest.fixture
def busybox_tar(tmp_path: Path) -> bytes:
    return build_busybox_tar(tmp_path / "busybox.tar").read_bytes()


def test_run_applies_the_image_config(busybox: list[str], busybox_tar: bytes,
                                      tmp_path: Path, roots: Roots) -> None:
    archive = tmp_path / "app.tar"
    archive.write_bytes(oci_layout([busybox_tar, APP], APP_CONFIG, ref_name="app:1").tar())
    r = pyhcs("image", "import", str(archive))
    assert r.returncode == 0, r.stderr
    assert r.stdout == "app:1\n" and r.stderr == ""  # no progress bar without a terminal
    # The busybox layer is shared with the busybox image: one new layer only.
    assert len(json.loads(pyhcs("layer", "ls", "--json").stdout)) == 2
    listed = json.loads(pyhcs("image", "ls", "--json").stdout)
    app = next(i for i in listed if i["name"] == "app:1")
    assert app["layers"][1] == os.path.basename(busybox[0])
    assert app["config"]["ExposedPorts"] == {"8080/tcp": {}}

    # Entrypoint + the image's Cmd, its Env, WorkingDir and User.
    r = pyhcs("run", "--rm", "app:1")
    assert r.returncode == 0, r.stderr
    assert r.stdout == "greeting=hello foo=image cwd=/app/work uid=65534 args=default cmd\n"
    # Entrypoint + the command line's arguments; -e over the image's Env; -w; -u.
    r = pyhcs("run", "--rm", "-e", "FOO=cli", "-w", "/", "-u", "root", "app:1", "x", "y")
    assert r.returncode == 0, r.stderr
    assert r.stdout == "greeting=hello foo=cli cwd=/ uid=0 args=x y\n"


def test_docker_save_import_ls_and_rm(busybox: list[str], busybox_tar: bytes,
                                      roots: Roots) -> None:
    saved = docker_save([busybox_tar, APP], APP_CONFIG, repo_tags=["saved:latest"]).tar()
    # From stdin, compressed, under another name.
    r = pyhcs("image", "import", "--name", "mine", "-", input=gzip.compress(saved))
    assert r.returncode == 0, r.stderr
    assert r.stdout == "mine\n"
    r = pyhcs("image", "ls")
    assert r.returncode == 0
    lines = r.stdout.splitlines()
    assert lines[0].split() == ["NAME", "LAYERS", "TOP", "LAYER", "CREATED"]
    assert [ln.split()[:2] for ln in lines[1:]] == [["busybox", "1"], ["mine", "2"]]
    r = pyhcs("run", "--rm", "mine", "extra")
    assert r.stdout == "greeting=hello foo=image cwd=/app/work uid=65534 args=extra\n"
    assert pyhcs("image", "rm", "mine").returncode == 0
    # The app layer went with the image; busybox's stays for the busybox image.
    layers = json.loads(pyhcs("layer", "ls", "--json").stdout)
    assert [x["id"] for x in layers] == [os.path.basename(busybox[0])]
    one_line_error(pyhcs("image", "rm", "mine"))


def test_refused_archive_is_one_line_and_stores_nothing(busybox_tar: bytes, tmp_path: Path,
                                                        roots: Roots) -> None:
    a = oci_layout([busybox_tar, APP], APP_CONFIG, compression="none")
    d = manifest_of(a)["layers"][1]["digest"]
    # Same size, still a valid tar: only the digest can tell.
    replace_blob(a, d, APP.replace(b"greeting", b"GREETING"))
    path = tmp_path / "bad.tar"
    path.write_bytes(a.tar())
    err = one_line_error(pyhcs("image", "import", str(path)))
    assert "does not match its digest" in err
    assert json.loads(pyhcs("image", "ls", "--json").stdout) == []
    assert json.loads(pyhcs("layer", "ls", "--json").stdout) == []
    hostile = docker_save([APP])
    m = hostile.json("manifest.json")
    m[0]["Layers"] = ["../../etc/passwd"]
    hostile.set_json("manifest.json", m)
    path.write_bytes(hostile.tar())
    assert "unsafe path" in one_line_error(pyhcs("image", "import", "--name", "x", str(path)))
    assert json.loads(pyhcs("layer", "ls", "--json").stdout) == []


def test_layer_rm_is_refused_while_in_use(busybox_tar: bytes, tmp_path: Path,
                                          roots: Roots) -> None:
    tar = tmp_path / "busybox.tar"
    tar.write_bytes(busybox_tar)
    r = pyhcs("layer", "import", str(tar))
    assert r.returncode == 0, r.stderr
    layer_id = r.stdout.strip()
    cid = pyhcs("run", "-d", layer_id, "sleep", "60").stdout.strip()
    assert len(cid) == 64
    try:
        assert "container" in one_line_error(pyhcs("layer", "rm", layer_id))
        assert "container" in one_line_error(pyhcs("layer", "rm", cid))  # its sandbox
    finally:
        assert pyhcs("rm", "-f", cid).returncode == 0
    r = pyhcs("image", "import", "--name", "named", str(tar))
    assert r.returncode == 0, r.stderr
    assert "image 'named' uses it" in one_line_error(pyhcs("layer", "rm", layer_id))
    assert pyhcs("image", "rm", "named").returncode == 0  # prunes the layer too
    assert json.loads(pyhcs("layer", "ls", "--json").stdout) == []
    r = pyhcs("layer", "import", str(tar))
    assert pyhcs("layer", "rm", layer_id).stdout == f"{layer_id}\n"
    assert json.loads(pyhcs("layer", "ls", "--json").stdout) == []
    assert "no such layer" in one_line_error(pyhcs("layer", "rm", layer_id))


def test_layer_export(busybox: list[str], tmp_path: Path, roots: Roots) -> None:
    layer_id = os.path.basename(busybox[0])
    magic = {"none": b"", "gzip": b"\x1f\x8b", "zstd": b"\x28\xb5\x2f\xfd"}
    for compression, start in magic.items():
        out = tmp_path / f"layer-{compression}.tar"
        r = pyhcs("layer", "export", "--compression", compression, layer_id, str(out))
        assert r.returncode == 0, r.stderr
        data = out.read_bytes()
        assert data.startswith(start)
        r = pyhcs("layer", "import", str(out))  # the store reads what it wrote
        assert r.returncode == 0, r.stderr
    with tarfile.open(fileobj=io.BytesIO((tmp_path / "layer-none.tar").read_bytes())) as tf:
        names = set(tf.getnames())
    assert {"bin/busybox", "etc/passwd"} <= {n.removeprefix("./") for n in names}
    assert not list(tmp_path.glob(".layer-*"))  # no temporary file left
    one_line_error(pyhcs("layer", "export", "nothere", str(tmp_path / "x.tar")))
    assert not (tmp_path / "x.tar").exists()


def test_progress_bar_only_on_a_terminal(busybox_tar: bytes, tmp_path: Path,
                                         roots: Roots) -> None:
    archive = tmp_path / "app.tar"
    archive.write_bytes(oci_layout([busybox_tar, APP], APP_CONFIG, ref_name="tty").tar())
    master, slave = pty.openpty()
    try:
        p = subprocess.Popen([sys.executable, "-m", "pyhcs", "image", "import", str(archive)],
                             stdout=subprocess.PIPE, stderr=slave,
                             env={**os.environ, "TERM": "xterm", "COLUMNS": "100"})
        os.close(slave)
        slave = -1
        shown = b""
        while True:
            ready, _, _ = select.select([master], [], [], 60)
            assert ready, "no output and no end from the import"
            try:
                chunk = os.read(master, 1 << 16)
            except OSError:  # EIO: the child closed its end
                break
            if not chunk:
                break
            shown += chunk
        assert p.stdout is not None
        assert p.stdout.read() == b"tty\n"
        assert p.wait(60) == 0
    finally:
        os.close(master)
        if slave >= 0:
            os.close(slave)
    assert b"importing image" in shown
