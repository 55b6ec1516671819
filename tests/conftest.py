"""Shared fixtures: private state roots per test, and a session-end leak check.

Tests run as root on the real kernel. Each test gets its own state root and run root
(``PYHCS_ROOT`` / ``PYHCS_RUN_ROOT``) and its cgroups live under a private parent
(``PYHCS_CGROUP_PARENT``), so nothing touches a real installation. When the session ends,
the leak check compares the machine against what it was when the session began and fails
on any mount, cgroup, network namespace, interface, loop device or process left behind.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from pyhcs._paths import Roots

CGROUP_PARENT = f"pyhcs-test-{os.getpid()}"
os.environ["PYHCS_CGROUP_PARENT"] = CGROUP_PARENT


def _mounts() -> set[str]:
    with open("/proc/self/mountinfo") as f:
        return {" ".join(line.split()[3:5]) for line in f}


def _cgroups() -> set[str]:
    found = set()
    for base, dirs, _ in os.walk("/sys/fs/cgroup"):
        if base.count("/") > 6:
            dirs[:] = []
            continue
        for d in dirs:
            if "pyhcs" in d:
                found.add(os.path.join(base, d))
    return found


def _netns() -> set[str]:
    try:
        return set(os.listdir("/run/netns"))
    except FileNotFoundError:
        return set()


def _interfaces() -> set[str]:
    return set(os.listdir("/sys/class/net"))


def _loops() -> set[str]:
    out = set()
    for dev in Path("/sys/block").glob("loop*"):
        if (dev / "loop" / "backing_file").exists():
            out.add(dev.name)
    return out


def _descendants() -> set[int]:
    """Processes whose ancestry reaches this pytest process, or that run from a pyhcs test root."""
    me = os.getpid()
    parents: dict[int, int] = {}
    for p in Path("/proc").iterdir():
        if not p.name.isdigit():
            continue
        try:
            stat = (p / "stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if fields[0] == "Z":
            continue  # a zombie holds nothing but its pid; reaping it is its parent's job
        parents[int(p.name)] = int(fields[1])
    out = set()
    for pid in parents:
        q = pid
        while q > 1 and q != me:
            q = parents.get(q, 0)
        if q == me and pid != me:
            out.add(pid)
    return out


def _supervisors() -> set[int]:
    """pyhcs supervisors started by this session (they are re-parented away from pytest)."""
    out = set()
    for p in Path("/proc").iterdir():
        if not p.name.isdigit():
            continue
        try:
            env = (p / "environ").read_bytes()
        except OSError:
            continue
        mine = f"PYHCS_CGROUP_PARENT={CGROUP_PARENT}".encode() in env
        if mine and int(p.name) != os.getpid():
            out.add(int(p.name))
    return out


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return "?"


def describe_cgroups(dirs: list[str]) -> str:
    """*dirs* (cgroup folders left behind) with what keeps each: its processes (pid, state,
    command line) and, for a freezer, its state; what a leak report needs to be acted on."""
    out = []
    for d in dirs:
        try:
            pids = Path(d, "cgroup.procs").read_text().split()
        except OSError as e:
            pids = [f"({e.strerror})"]
        what = []
        for pid in pids:
            try:
                state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
            except OSError:
                state = "?"
            what.append(f"{pid} {state} {_cmdline(int(pid)) if pid.isdigit() else ''!r}")
        freezer = Path(d, "freezer.state")
        if freezer.exists():
            what.append(f"freezer {freezer.read_text().strip()}")
        out.append(f"{d} [{'; '.join(what) or 'empty'}]")
    return ", ".join(out)


def _snapshot() -> dict[str, set[object]]:
    return {
        "mounts": set(_mounts()),
        "cgroups": set(_cgroups()),
        "netns": set(_netns()),
        "interfaces": set(_interfaces()),
        "loop devices": set(_loops()),
    }


@pytest.fixture(scope="session", autouse=True)
def leak_check() -> Iterator[None]:
    """Fail the session if it leaves kernel state behind."""
    before = _snapshot()
    yield
    from pyhcs._compute._supervisor import close_supervisor
    from pyhcs._runtime._cgroups import remove_parent

    close_supervisor()  # the session's supervisor process goes once its containers have
    leaks = []
    # Processes first: a supervisor still running would explain every other leak.
    deadline = time.monotonic() + 10
    while True:
        procs = (_descendants() | _supervisors())
        if not procs or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    try:
        remove_parent()  # pyhcs keeps it between containers; the session made it
    except OSError as e:
        children = [os.path.join(d, c) for d in sorted(_cgroups() - before["cgroups"])
                    if os.path.isdir(d) for c in os.listdir(d)
                    if os.path.isdir(os.path.join(d, c))]
        leaks.append(f"cgroup parent {CGROUP_PARENT} still in use ({e}): "
                     f"{describe_cgroups(children)}")
    if procs:
        leaks.append("processes: " + ", ".join(f"{p} {_cmdline(p)!r}" for p in sorted(procs)))
    after = _snapshot()
    for kind, items in after.items():
        extra = items - before[kind]
        if extra:
            leaks.append(f"{kind}: {sorted(map(str, extra))}")
    if leaks:
        pytest.fail("the test session leaked kernel state:\n  " + "\n  ".join(leaks))


@pytest.fixture
def roots(monkeypatch: pytest.MonkeyPatch) -> Iterator[Roots]:
    """A private state root and run root for one test, exported in the environment."""
    base = Path(tempfile.mkdtemp(prefix="pyhcs-test-"))
    r = Roots(base / "root", base / "run")
    monkeypatch.setenv("PYHCS_ROOT", str(r.root))
    monkeypatch.setenv("PYHCS_RUN_ROOT", str(r.run_root))
    try:
        yield r
    finally:
        _cleanup_root(r)
        shutil.rmtree(base, ignore_errors=True)


def _cleanup_root(r: Roots) -> None:
    """Unmount anything still mounted under the test's roots, so one failure cannot cascade."""
    prefix = str(r.root.parent)
    mounted = [m.split()[1] for m in _mounts() if m.split()[1].startswith(prefix)]
    for target in sorted(mounted, key=len, reverse=True):
        subprocess.run(["umount", "-l", target], check=False)


@pytest.fixture
def unique_id() -> str:
    return "t" + uuid.uuid4().hex[:12]


@pytest.fixture
def busybox(roots: Roots) -> list[str]:
    """The busybox image in the test's store; returns its layer chain (paths, topmost first)."""
    from pyhcs._layers import ensure_busybox_image

    return list(ensure_busybox_image().layer_chain)
