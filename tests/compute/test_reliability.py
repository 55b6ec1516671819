"""Reliability: killed clients and supervisors, long runs, many containers, many clients.

Every test ends with a zero-leak check against a snapshot taken before it: no container
left running or recorded, no mount under the test's roots, no cgroup under the session's
parent, no supervisor still alive and none that pyhcs cannot reap, this process's open
file descriptors unchanged, the registry's container and process tables empty, and no
sandbox layer or run directory left.

Already covered elsewhere: a creator that exits normally (test_container.py's
test_container_survives_its_creator) and the 255 of a killed supervisor
(test_killed_supervisor_reports_255); here the creator is SIGKILLed mid-run, and the
killed supervisor's container is checked to be cleaned up.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

import pyhcs
from pyhcs._compute._supervisor import close_supervisor, reap_supervisors
from pyhcs._layers import wait_for_trash
from pyhcs._paths import Roots
from pyhcs._registry import Registry
from pyhcs._runtime._cgroups import manager as cgroup_manager

from ..conftest import describe_cgroups

CYCLES = 1000
RUNNING = 100
CREATORS = 20
CYCLES_PER_CREATOR = 5


# -- the leak check ---------------------------------------------------------------------------


def _fds() -> dict[int, str]:
    out = {}
    for name in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            out[int(name)] = os.readlink(f"/proc/self/fd/{name}")
    return out


def _mounts_under(prefix: str) -> list[str]:
    with open("/proc/self/mountinfo") as f:
        targets = [line.split()[4] for line in f]
    return [t for t in targets if t == prefix or t.startswith(prefix + "/")]


def _child_cgroups() -> list[str]:
    out = []
    for parent in cgroup_manager().parent_dirs():
        with contextlib.suppress(FileNotFoundError):
            out += [os.path.join(parent, e.name) for e in os.scandir(parent) if e.is_dir()]
    return out


def _alive(pid: int) -> bool:
    """*pid* exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def _children(parent: int | None = None) -> tuple[list[int], list[int]]:
    """The (live, zombie) children of *parent* (default: this process)."""
    me = str(os.getpid() if parent is None else parent)
    live: list[int] = []
    zombies: list[int] = []
    for p in Path("/proc").iterdir():
        if not p.name.isdigit():
            continue
        try:
            fields = (p / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[1] == me:
            (zombies if fields[0] == "Z" else live).append(int(p.name))
    return live, zombies


def _table_counts(roots: Roots) -> dict[str, int]:
    # the process's own registry connection: a second one would leave SQLite holding a
    # file descriptor open (POSIX locks die with any close of the file in the process)
    reg = Registry.open(roots.db_path)
    return {t: reg.query(f"SELECT count(*) FROM {t}")[0][0] for t in ("containers", "processes")}


def _layer_rows(roots: Roots) -> set[str]:
    return {r[0] for r in Registry.open(roots.db_path).query("SELECT id FROM layers")}


@dataclass
class Baseline:
    roots: Roots
    fds: dict[int, str]
    layers: set[str]
    layer_dirs: set[str]

    def check(self, supervisors: set[int]) -> None:
        """Fail on anything the test left behind. *supervisors*: every supervisor pid the
        test saw; each must have exited once let go of (they release the cgroup after their
        final record, so give them a moment)."""
        close_supervisor()
        deadline = time.monotonic() + 60
        while True:
            alive = sorted(p for p in supervisors if _alive(p))
            cgroups = _child_cgroups()
            if not (alive or cgroups) or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        assert not alive, f"supervisors still running: {alive}"
        assert not cgroups, f"cgroups left: {describe_cgroups(cgroups)}"
        assert pyhcs.get_containers() == []
        _settle()
        # pyhcs reaps finished supervisors on its next start or remove; do that now, so a
        # supervisor it lost track of would show as a zombie
        reap_supervisors()
        live, zombies = _children()
        assert not live, f"child processes left: {live}"
        assert not zombies, f"unreaped children: {zombies}"
        assert _mounts_under(str(self.roots.root.parent)) == []
        assert _fds() == self.fds
        assert _table_counts(self.roots) == {"containers": 0, "processes": 0}
        assert _layer_rows(self.roots) == self.layers
        assert set(os.listdir(self.roots.layers_dir)) == self.layer_dirs
        run = self.roots.run_root / "containers"
        assert not run.exists() or os.listdir(run) == []


def _settle() -> None:
    """End what pyhcs keeps between containers by design: the supervisor process with the
    pid 1 it made ahead for the next start (child processes and a socket) and the
    background removal of deleted sandboxes' files (``.trash-*`` folders for a moment)."""
    close_supervisor()
    wait_for_trash()


@pytest.fixture
def baseline(busybox: list[str], roots: Roots, unique_id: str) -> Iterator[Baseline]:
    """The machine's state before the test, after one warm-up container (which opens the
    registry and compiles the seccomp filter: state a process keeps for good)."""
    sup = _cycle(f"{unique_id}-warm", _layers(busybox))
    deadline = time.monotonic() + 30
    while (_alive(sup) or _child_cgroups()) and time.monotonic() < deadline:
        time.sleep(0.02)
    _settle()
    yield Baseline(roots, _fds(), _layer_rows(roots), set(os.listdir(roots.layers_dir)))


def _layers(busybox: list[str]) -> list[pyhcs.Layer]:
    return [pyhcs.Layer(id=p.rsplit("/", 1)[-1], path=p) for p in busybox]


def _cycle(cid: str, layers: list[pyhcs.Layer]) -> int:
    """create -> start -> /bin/true -> wait -> delete; returns the supervisor's pid."""
    c = pyhcs.create_container(cid, pyhcs.ContainerConfig(layers=layers))
    c.start()
    sup = int(pyhcs.container_state(cid)["supervisor_pid"])
    p = c.create_process(pyhcs.ProcessConfig(command_line="/bin/true"))
    assert p.wait(60) == 0
    c.wait(60)
    p.close()
    c.close()
    pyhcs.remove_container(cid)
    return sup


def _cleanup(ids: list[str]) -> None:
    for cid in ids:
        with contextlib.suppress(pyhcs.HcsError):
            pyhcs.remove_container(cid, force=True)


# -- killed clients and supervisors ----------------------------------------------------------


def test_killed_client_leaves_the_container_running(baseline: Baseline, busybox: list[str],
                                                    unique_id: str, tmp_path: Path) -> None:
    """kill -9 of the creating client mid-run (while it holds the process's stdout and
    waits on the container): the container goes on, and its output and exit code reach
    another client later."""
    cid = f"{unique_id}-c"
    script = textwrap.dedent(f"""
        import pyhcs
        layers = [pyhcs.Layer(id=p.rsplit('/', 1)[-1], path=p) for p in {busybox!r}]
        c = pyhcs.create_container({cid!r}, pyhcs.ContainerConfig(layers=layers,
            mapped_directories=[pyhcs.MappedDir(host_path={str(tmp_path)!r},
                                                container_path='/x')]))
        c.start()
        p = c.create_process(pyhcs.ProcessConfig(create_std_out_pipe=True, command_line=
            "sh -c 'echo before; while [ ! -e /x/go ]; do sleep 0.02; done; echo after; "
            "exit 7'"))
        _, out, _ = p.stdio()
        assert out.readline() == b'before\\n'
        print(pyhcs.container_state({cid!r})['supervisor_pid'], flush=True)
        c.wait()  # killed in here
    """)
    client = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE)
    try:
        assert client.stdout is not None
        line = client.stdout.readline()
        assert line.strip().isdigit(), (line, client.stderr.read() if client.stderr else b"")
        sup = int(line)
        client.send_signal(signal.SIGKILL)
        assert client.wait(30) == -signal.SIGKILL
        assert pyhcs.container_state(cid)["state"] == "running"
        assert _alive(sup)
        c = pyhcs.open_container(cid)
        p = c.open_process(1)
        _, out, _ = p.stdio()
        assert out is not None
        (tmp_path / "go").touch()
        assert out.read() == b"after\n"  # 'before' went to the dead client
        out.close()
        assert p.wait(30) == 7
        c.wait(30)
        state = pyhcs.container_state(cid)
        assert (state["state"], state["exit_code"]) == ("stopped", 7)
        assert pyhcs.open_container(cid).open_process(1).exit_code() == 7
        p.close()
        c.close()
        pyhcs.remove_container(cid)
    finally:
        if client.poll() is None:
            client.kill()
            client.wait()
        for f in (client.stdout, client.stderr):
            if f is not None:
                f.close()
        _cleanup([cid])
    baseline.check({sup})


def test_killed_supervisor_is_recovered_and_cleaned_up(baseline: Baseline,
                                                        busybox: list[str],
                                                        unique_id: str) -> None:
    """kill -9 of a container's supervisor: the container is reported exited with 255, its
    processes die, recovery removes its cgroup, and removal leaves nothing."""
    cid = f"{unique_id}-s"
    c = pyhcs.create_container(cid, pyhcs.ContainerConfig(layers=_layers(busybox)))
    try:
        c.start()
        init = c.create_process(pyhcs.ProcessConfig(command_line="sleep 1000"))
        other = c.create_process(pyhcs.ProcessConfig(command_line="sleep 1000",
                                                     create_std_out_pipe=True))
        host_pids = cgroup_manager().open(cid).pids()
        assert len(host_pids) == 2
        sup = int(pyhcs.container_state(cid)["supervisor_pid"])
        os.kill(sup, signal.SIGKILL)
        c.wait(30)
        state = pyhcs.container_state(cid)
        assert (state["state"], state["exit_code"]) == ("stopped", 255)
        assert [x.stopped for x in pyhcs.get_containers()] == [True]
        assert init.wait(30) == 255
        assert other.wait(30) == 255
        deadline = time.monotonic() + 30
        while any(_alive(p) for p in host_pids) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert not [p for p in host_pids if _alive(p)]
        assert _child_cgroups() == []  # recovery removed it, before any remove_container
        with pytest.raises(pyhcs.ContainerError) as e:
            c.create_process(pyhcs.ProcessConfig(command_line="true"))
        assert pyhcs.is_already_stopped(e.value)
        init.close()
        other.close()
        c.close()
        pyhcs.remove_container(cid)
    finally:
        _cleanup([cid])
    baseline.check({sup})


# -- long runs and many containers -----------------------------------------------------------


def test_sequential_cycles_leak_nothing(baseline: Baseline, busybox: list[str],
                                        unique_id: str) -> None:
    """1,000 create/start/wait/delete cycles of /bin/true through the public API."""
    layers = _layers(busybox)
    sups = set()
    fds = {}
    for i in range(CYCLES):
        sups.add(_cycle(f"{unique_id}-{i}", layers))
        if i % 100 == 99:
            assert not _children()[1], _children()  # no unreaped supervisor
            (sup,) = sups  # one supervisor process served them all...
            # ...and holds no more fds after 1,000 containers than after 100 (the last
            # container's may still be closing)
            time.sleep(0.2)
            fds[i] = len(os.listdir(f"/proc/{sup}/fd"))
    assert fds[CYCLES - 1] <= fds[99], fds
    baseline.check(sups)


def test_many_running_containers_leak_nothing(baseline: Baseline, busybox: list[str],
                                              unique_id: str) -> None:
    """100 containers running at once: all listed, each serves create_process; then
    terminated and removed."""
    layers = _layers(busybox)
    ids = [f"{unique_id}-{i}" for i in range(RUNNING)]
    sups = set()
    try:
        for cid in ids:
            c = pyhcs.create_container(cid, pyhcs.ContainerConfig(layers=layers, host_name=cid))
            c.start()
            c.create_process(pyhcs.ProcessConfig(command_line="sleep 1000")).close()
            sups.add(int(pyhcs.container_state(cid)["supervisor_pid"]))
            c.close()
        assert len(sups) == 1  # one supervisor process serves them all
        listed = pyhcs.get_containers()
        assert sorted(x.id for x in listed) == sorted(ids)
        assert not any(x.stopped for x in listed)
        # the leak check looks where containers really leave state
        assert len(_child_cgroups()) >= RUNNING
        assert len(_mounts_under(str(baseline.roots.root.parent))) >= RUNNING
        # it is our child, and each container's pid 1 is its child
        (sup,) = sups
        assert sup in _children()[0]
        assert len(_children(sup)[0]) >= RUNNING
        for cid in ids:
            with pyhcs.open_container(cid) as c:
                p = c.create_process(pyhcs.ProcessConfig(command_line="hostname",
                                                         create_std_out_pipe=True))
                _, out, _ = p.stdio()
                assert out is not None
                assert out.read() == f"{cid}\n".encode()
                out.close()
                assert p.wait(60) == 0
                p.close()
        for cid in ids:
            with pyhcs.open_container(cid) as c:
                c.terminate()
        for cid in ids:
            with pyhcs.open_container(cid) as c:
                c.wait(60)
            assert pyhcs.container_state(cid)["exit_code"] == 128 + signal.SIGKILL
            pyhcs.remove_container(cid)
    finally:
        _cleanup(ids)
    baseline.check(sups)


_CREATOR = """
import sys, pyhcs
prefix, n, chain = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
layers = [pyhcs.Layer(id=p.rsplit('/', 1)[-1], path=p) for p in chain]
for i in range(n):
    cid = f'{prefix}-{i}'
    c = pyhcs.create_container(cid, pyhcs.ContainerConfig(layers=layers))
    c.start()
    print(pyhcs.container_state(cid)['supervisor_pid'], flush=True)
    p = c.create_process(pyhcs.ProcessConfig(command_line='sh -c "exit 3"'))
    assert p.wait(120) == 3
    c.wait(120)
    assert pyhcs.container_state(cid)['exit_code'] == 3
    pyhcs.get_containers()  # a reader beside the writers
    pyhcs.remove_container(cid)
"""


def test_parallel_creators(baseline: Baseline, busybox: list[str], unique_id: str) -> None:
    """20 client processes creating, starting, waiting on and removing containers in the
    same roots at once: no "database is locked", no error of any kind."""
    procs = [subprocess.Popen([sys.executable, "-c", _CREATOR, f"{unique_id}-{k}",
                               str(CYCLES_PER_CREATOR), *busybox],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for k in range(CREATORS)]
    sups: set[int] = set()
    failures = []
    try:
        for k, proc in enumerate(procs):
            out, err = proc.communicate(timeout=600)
            sups.update(int(x) for x in out.split())
            if proc.returncode != 0 or err:
                failures.append(f"creator {k}: exit {proc.returncode}\n{err.decode()}")
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
        _cleanup([f"{unique_id}-{k}-{i}" for k in range(CREATORS)
                  for i in range(CYCLES_PER_CREATOR)])
    assert not failures, "\n".join(failures)
    assert len(sups) == CREATORS  # one supervisor process per client
    baseline.check(sups)
