"""The pyhcs command line, run as a user would: a separate process per command."""

from __future__ import annotations

import json
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from pyhcs._paths import Roots


def pyhcs(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pyhcs", *args], capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture
def image(busybox: list[str]) -> str:
    return "busybox"


def test_run_streams_output_and_exit_code(image: str, roots: Roots) -> None:
    r = pyhcs("run", "--rm", image, "--", "echo", "hello")
    assert r.returncode == 0, r.stderr
    assert r.stdout == "hello\n"
    r = pyhcs("run", "--rm", image, "sh", "-c", "echo err >&2; exit 7")
    assert r.returncode == 7
    assert r.stderr == "err\n"
    r = pyhcs("run", "--rm", image, "sh", "-c", "sh -c 'kill -9 $$'; exit $?")
    assert r.returncode == 137
    assert json.loads(pyhcs("ps", "-a", "--json").stdout) == []  # --rm removed them


def test_run_in_a_user_namespace(image: str, roots: Roots) -> None:
    r = pyhcs("run", "--rm", "--userns", "0:100000:65536", image, "sh", "-c",
              "cat /proc/self/uid_map; id -u; touch /etc/made && echo wrote")
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["0", "100000", "65536", "0", "wrote"]
    for bad in ("0:100000", "a:b:c", "0:4294967290:65536"):
        r = pyhcs("run", "--rm", "--userns", bad, image, "true")
        assert r.returncode != 0
        assert "--userns" in r.stderr or "user namespace" in r.stderr
    assert json.loads(pyhcs("ps", "-a", "--json").stdout) == []


def test_run_memory_limit(image: str, roots: Roots) -> None:
    r = pyhcs("run", "--rm", "--memory", "16", image, "dd", "if=/dev/zero", "of=/dev/null",
              "bs=64M", "count=1")
    assert r.returncode == 137


def test_detached_ps_inspect_rm(image: str, roots: Roots) -> None:
    # it runs until the test lets it go, however slowly the commands start
    script = "while [ ! -e /tmp/go ]; do sleep 0.02; done; exit 5"
    r = pyhcs("run", "-d", "--name", "sleeper", image, "sh", "-c", script)
    assert r.returncode == 0, r.stderr
    cid = r.stdout.strip()
    assert len(cid) == 64
    listed = json.loads(pyhcs("ps", "--json").stdout)
    assert [c["id"] for c in listed] == [cid]
    import pyhcs as api

    c = api.open_container(cid)
    c.create_process(api.ProcessConfig(command_line="touch /tmp/go")).wait(10)
    c.wait(10)
    doc = json.loads(pyhcs("inspect", "sleeper").stdout)
    assert doc["state"] == "stopped" and doc["exit_code"] == 5
    assert pyhcs("rm", cid[:12]).returncode == 0
    assert json.loads(pyhcs("ps", "-a", "--json").stdout) == []


def test_rm_force_running(image: str, roots: Roots) -> None:
    cid = pyhcs("run", "-d", image, "sleep", "60").stdout.strip()
    r = pyhcs("rm", cid)
    assert r.returncode == 125 and "running" in r.stderr
    assert pyhcs("rm", "-f", cid).returncode == 0


def test_errors_are_one_line(roots: Roots) -> None:
    r = pyhcs("run", "--rm", "no-such-image", "true")
    assert r.returncode != 0
    assert r.stderr.startswith("pyhcs: ")
    assert len(r.stderr.strip().splitlines()) == 1
    assert "Traceback" not in r.stderr
    r = pyhcs("inspect", "nothing-here")
    assert r.returncode != 0 and len(r.stderr.strip().splitlines()) == 1


def test_exec_failure_exit_127(image: str, roots: Roots) -> None:
    r = pyhcs("run", "--rm", image, "/no/such/binary")
    assert r.returncode == 127
    assert "no/such/binary" in r.stderr


def test_layer_and_image_commands(tmp_path: Path, roots: Roots) -> None:
    tar_path = tmp_path / "layer.tar"
    data = tmp_path / "hello.txt"
    data.write_text("hi\n")
    with tarfile.open(tar_path, "w") as t:
        t.add(data, arcname="hello.txt")
    r = pyhcs("layer", "import", str(tar_path))
    assert r.returncode == 0, r.stderr
    layer_id = r.stdout.strip()
    assert len(layer_id) == 64
    assert layer_id in pyhcs("layer", "ls").stdout
    assert pyhcs("image", "build-busybox").returncode == 0
    assert "busybox" in pyhcs("image", "ls").stdout


def test_detached_auto_remove(image: str, roots: Roots) -> None:
    r = pyhcs("run", "-d", "--rm", image, "true")
    assert r.returncode == 0, r.stderr
    import pyhcs as api

    api.open_container(r.stdout.strip()).wait(10)
    # the first look after it stopped removes it
    assert json.loads(pyhcs("ps", "-a", "--json").stdout) == []
