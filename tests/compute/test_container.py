"""Containers and processes on the real kernel, through the public API."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path

import pytest

import pyhcs

from .conftest import run

# tests of the native runtime's supervisor itself (one per client, pid 1 made ahead, ...)
NATIVE_SUPERVISOR = pytest.mark.native_only("the native runtime's supervisor")

Make = Callable[..., pyhcs.Container]


@pytest.mark.parametrize(("command", "code"), [
    ("true", 0), ("false", 1), ("sh -c 'exit 7'", 7),
    # pid 1 ignores SIGKILL from inside its own namespace, so a child shell is the victim
    ("sh -c 'sh -c \"kill -9 \\$\\$\"; exit $?'", 137),
])
def test_exit_codes(make_container: Make, command: str, code: int) -> None:
    c = make_container()
    c.start()
    assert run(c, command)[0] == code
    c.wait(10)
    state = pyhcs.container_state(c.id)
    assert state["state"] == "stopped"
    assert state["exit_code"] == code


def test_first_process_is_pid_1_and_host_is_invisible(make_container: Make) -> None:
    c = make_container()
    c.start()
    code, out, _ = run(c, "sh -c 'echo $$; ls /proc'")
    assert code == 0
    lines = out.decode().split()
    assert lines[0] == "1"
    pids = {int(x) for x in lines[1:] if x.isdigit()}
    assert pids <= {1, 2, 3}, pids  # sh, ls and nothing of the host
    assert os.getpid() not in pids or os.getpid() <= 3


def test_hostname(make_container: Make) -> None:
    c = make_container(host_name="pyhcs-box")
    c.start()
    assert run(c, "hostname")[1] == b"pyhcs-box\n"
    assert os.uname().nodename != "pyhcs-box"


def test_memory_limit_kills(make_container: Make) -> None:
    c = make_container(memory_maximum_in_mb=16)
    c.start()
    code, _, _ = run(c, "dd if=/dev/zero of=/dev/null bs=64M count=1")
    assert code == 137
    c.wait(10)
    assert pyhcs.container_state(c.id)["exit_type"] == "OOMKilled"


def test_memory_limit_allows_small(make_container: Make) -> None:
    c = make_container(memory_maximum_in_mb=64)
    c.start()
    assert run(c, "dd if=/dev/zero of=/dev/null bs=4M count=1")[0] == 0


def test_host_fds_are_closed(make_container: Make) -> None:
    leak = os.open("/etc/hostname", os.O_RDONLY)  # inheritable on purpose
    os.set_inheritable(leak, True)
    try:
        c = make_container()
        c.start()
        code, out, _ = run(c, "ls /proc/self/fd")
        assert code == 0
        assert set(out.split()) <= {b"0", b"1", b"2", b"3"}  # 3 is ls's own directory fd
    finally:
        os.close(leak)


def test_stdin_and_close_stdin(make_container: Make) -> None:
    c = make_container()
    c.start()
    p = c.create_process(pyhcs.ProcessConfig(command_line="cat", create_std_in_pipe=True,
                                             create_std_out_pipe=True))
    stdin, stdout, _ = p.stdio()
    assert stdin is not None and stdout is not None
    stdin.write(b"through the pipe\n")
    p.close_stdin()
    assert stdout.read() == b"through the pipe\n"
    assert p.wait(10) == 0
    stdout.close()


def test_second_process_shares_the_container(make_container: Make) -> None:
    c = make_container(host_name="shared")
    c.start()
    init = c.create_process(pyhcs.ProcessConfig(command_line="sleep 30"))
    assert init.pid == 1
    code, out, _ = run(c, "sh -c 'hostname; echo $$'")
    assert code == 0
    host, pid = out.decode().split()
    assert host == "shared" and int(pid) > 1
    init.kill()
    assert init.wait(10) == 128 + signal.SIGKILL
    c.wait(10)


def test_exec_failure_reports_wait_err_exec_failed(make_container: Make) -> None:
    c = make_container()
    c.start()
    p = c.create_process(pyhcs.ProcessConfig(command_line="/no/such/program"))
    assert p.exec_error
    assert p.wait(10) == pyhcs.WAIT_ERR_EXEC_FAILED
    assert p.exit_code() == pyhcs.WAIT_ERR_EXEC_FAILED


def test_wait_timeout_and_terminate(make_container: Make) -> None:
    c = make_container()
    c.start()
    p = c.create_process(pyhcs.ProcessConfig(command_line="sleep 60"))
    with pytest.raises(pyhcs.ContainerTimeoutError) as info:
        c.wait(0.2)
    assert pyhcs.is_timeout(info.value)
    assert isinstance(info.value, TimeoutError)
    with pytest.raises(pyhcs.ProcessError) as pinfo:
        p.exit_code()
    assert pinfo.value.code is pyhcs.ERR_INVALID_PROCESS_STATE
    c.terminate()
    c.wait(10)
    assert p.wait(10) == 137
    with pytest.raises(pyhcs.ContainerError) as again:
        c.terminate()
    assert pyhcs.is_already_stopped(again.value)


def test_shutdown_sends_sigterm(make_container: Make) -> None:
    c = make_container()
    c.start()
    p = c.create_process(pyhcs.ProcessConfig(
        command_line="sh -c 'trap \"exit 42\" TERM; while true; do sleep 0.05; done'"))
    time.sleep(0.2)  # let the shell install its trap
    c.shutdown()
    c.wait(10)
    assert p.wait(10) == 42


def test_closed_handle_and_missing_container(make_container: Make) -> None:
    c = make_container()
    c.close()
    c.close()  # idempotent
    with pytest.raises(pyhcs.ContainerError) as info:
        c.start()
    assert pyhcs.is_already_closed(info.value)
    with pytest.raises(pyhcs.ContainerError) as missing:
        pyhcs.open_container("does-not-exist")
    assert pyhcs.is_not_exist(missing.value)


def test_duplicate_id_refused(make_container: Make) -> None:
    c = make_container()
    with pytest.raises(pyhcs.ContainerError) as info:
        pyhcs.create_container(c.id, pyhcs.ContainerConfig(layers=[]))
    assert info.value.code is pyhcs.ERR_ALREADY_EXISTS


def test_invalid_id_refused() -> None:
    with pytest.raises(pyhcs.InvalidConfigError):
        pyhcs.create_container("../escape", pyhcs.ContainerConfig())


def test_container_survives_its_creator(busybox: list[str], unique_id: str) -> None:
    script = textwrap.dedent(f"""
        import pyhcs
        layers = [pyhcs.Layer(id=p.rsplit('/', 1)[-1], path=p) for p in {busybox!r}]
        c = pyhcs.create_container({unique_id!r}, pyhcs.ContainerConfig(layers=layers))
        c.start()
        c.create_process(pyhcs.ProcessConfig(command_line="sh -c 'sleep 1; exit 3'"))
        print("started", flush=True)
    """)
    try:
        done = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=30)
        assert done.returncode == 0, done.stderr
        assert pyhcs.container_state(unique_id)["state"] == "running"
        c = pyhcs.open_container(unique_id)
        c.wait(30)
        assert pyhcs.container_state(unique_id)["exit_code"] == 3
        assert c.open_process(1).exit_code() == 3
    finally:
        pyhcs.remove_container(unique_id, force=True)


@NATIVE_SUPERVISOR
def test_killed_supervisor_reports_255(make_container: Make) -> None:
    # one supervisor process serves the client's containers: killing it ends them all
    _own_supervisor()
    cs = [make_container() for _ in range(2)]
    for c in cs:
        c.start()
        c.create_process(pyhcs.ProcessConfig(command_line="sleep 60"))
    sup = pyhcs.container_state(cs[0].id)["supervisor_pid"]
    assert pyhcs.container_state(cs[1].id)["supervisor_pid"] == sup
    os.kill(sup, signal.SIGKILL)
    for c in cs:
        c.wait(10)
        state = pyhcs.container_state(c.id)
        assert state["state"] == "stopped"
        assert state["exit_code"] == 255


def test_statistics_and_process_list(make_container: Make) -> None:
    c = make_container()
    c.start()
    p = c.create_process(pyhcs.ProcessConfig(command_line="sleep 30"))
    stats = c.statistics()
    assert stats.memory.usage_commit_bytes > 0
    items = c.process_list()
    assert [i.process_id for i in items] == [1]
    assert items[0].image_name == "sleep"
    p.kill()
    c.wait(10)


def test_pause_stops_processes_and_resume_restarts_them(make_container: Make,
                                                        tmp_path: Path) -> None:
    out = tmp_path
    c = make_container(mapped_directories=[
        pyhcs.MappedDir(host_path=str(out), container_path="/out")])
    c.start()
    p = c.create_process(pyhcs.ProcessConfig(
        command_line="sh -c 'while true; do echo x >> /out/ticks; sleep 0.02; done'"))
    deadline = time.monotonic() + 10
    while not (out / "ticks").exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    c.pause()
    assert pyhcs.container_state(c.id)["state"] == "paused"
    time.sleep(0.1)  # anything in flight lands
    frozen = (out / "ticks").stat().st_size
    time.sleep(0.4)
    assert (out / "ticks").stat().st_size == frozen  # nothing ran while paused
    c.resume()
    assert pyhcs.container_state(c.id)["state"] == "running"
    deadline = time.monotonic() + 20  # a loaded machine may schedule it late
    while (out / "ticks").stat().st_size == frozen:
        assert time.monotonic() < deadline, "the resumed process never ran"
        time.sleep(0.02)
    p.kill()
    c.wait(10)


def test_same_id_again_right_after_remove(busybox: list[str], unique_id: str) -> None:
    layers = [pyhcs.Layer(id=p.rsplit("/", 1)[-1], path=p) for p in busybox]
    for _ in range(3):  # the old supervisor may still be releasing the cgroup
        c = pyhcs.create_container(unique_id, pyhcs.ContainerConfig(layers=layers))
        c.start()
        assert run(c, "true")[0] == 0
        c.wait(10)
        pyhcs.remove_container(unique_id)


# -- the supervisor process -----------------------------------------------------------------


def _own_supervisor() -> None:
    """Let go of the session's supervisor process, so the next start forks one for this
    test alone (it may kill it)."""
    from pyhcs._compute import _supervisor

    _supervisor.close_supervisor()


def _supervisor_pid() -> int:
    from pyhcs._compute import _supervisor

    pid = _supervisor.supervisor_pid()
    assert pid is not None
    return pid


def _ns(pid: int | str, kind: str) -> str:
    return os.readlink(f"/proc/{pid}/ns/{kind}")


@NATIVE_SUPERVISOR
def test_one_supervisor_serves_the_clients_containers(make_container: Make) -> None:
    cs = [make_container() for _ in range(3)]
    for c in cs:
        c.start()
    sup = _supervisor_pid()
    assert {pyhcs.container_state(c.id)["supervisor_pid"] for c in cs} == {sup}
    seen = set()
    for c in cs:
        init = c.create_process(pyhcs.ProcessConfig(command_line="sleep 60"))
        assert init.pid == 1
        # a later process: forked by the supervisor into pid 1's namespaces
        code, out, _ = run(c, "sh -c 'for f in /proc/1/ns/pid /proc/self/ns/pid "
                              "/proc/1/ns/net /proc/self/ns/net; do readlink $f; done'")
        pid_1, pid_self, net_1, net_self = out.decode().split()
        assert code == 0 and pid_1 == pid_self and net_1 == net_self
        seen.add((pid_self, net_self))
    assert len(seen) == 3 and (_ns("self", "pid"), _ns("self", "net")) not in seen
    # it stays in the host's namespaces (once it has answered: between a start's reply and
    # its next request it may be in a new pid namespace for a moment, making pid 1 ahead)
    for kind in ("pid", "pid_for_children", "net", "uts", "ipc", "mnt", "cgroup"):
        assert _ns(sup, kind) == _ns("self", kind), kind
    cs[0].terminate()
    cs[0].wait(10)
    assert run(cs[1], "echo alive")[1] == b"alive\n"  # the others go on


def test_a_running_container_remembers_its_last_exits(make_container: Make,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    from pyhcs._compute import _supervisor

    _own_supervisor()
    monkeypatch.setattr(_supervisor, "KEPT_EXITS", 3)  # in the supervisor forked next
    c = make_container()
    c.start()
    c.create_process(pyhcs.ProcessConfig(command_line="sleep 60")).close()
    pids = []
    for code in range(5):
        p = c.create_process(pyhcs.ProcessConfig(command_line=f"sh -c 'exit {code}'"))
        assert p.wait(10) == code
        pids.append(p.pid)
        p.close()
    for pid in pids[:2]:  # forgotten: exec after exec does not grow the supervisor
        with pytest.raises(pyhcs.ProcessError) as e:
            c.open_process(pid)
        assert pyhcs.is_not_exist(e.value)
    assert [c.open_process(pid).exit_code() for pid in pids[2:]] == [2, 3, 4]
    # a running container's record (written on pause and resume) holds its state only...
    c.pause()
    c.resume()
    status = Path(os.environ["PYHCS_RUN_ROOT"], "containers", c.id, "status.json")
    assert json.loads(status.read_text()).keys() == {"state", "pid", "start", "started",
                                                     "exit_type"}
    c.terminate()
    c.wait(10)
    # ...the final one the remembered exits, which the registry keeps
    assert pyhcs.container_state(c.id)["state"] == "stopped"
    assert [c.open_process(pid).exit_code() for pid in pids[2:]] == [2, 3, 4]


@NATIVE_SUPERVISOR
def test_supervisor_takes_the_environment_at_start(make_container: Make,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    from pyhcs._runtime._cgroups import remove_parent

    first = make_container()
    first.start()  # forks the supervisor, or finds it, with the session's cgroup parent
    sup = _supervisor_pid()
    parent = os.environ["PYHCS_CGROUP_PARENT"] + "-later"
    monkeypatch.setenv("PYHCS_CGROUP_PARENT", parent)
    second = make_container()
    try:
        second.start()
        assert pyhcs.container_state(second.id)["supervisor_pid"] == sup  # the same...
        # ...made the cgroup under the parent set after it was forked
        assert Path("/sys/fs/cgroup/memory", parent, second.id).is_dir()
        code, out, _ = run(second, "echo in")
        assert code == 0 and out == b"in\n"
    finally:
        pyhcs.remove_container(second.id, force=True)
        deadline = time.monotonic() + 10
        while True:
            try:
                remove_parent()
                break
            except OSError:  # the supervisor is still releasing the container's cgroup
                assert time.monotonic() < deadline
                time.sleep(0.05)


@NATIVE_SUPERVISOR
def test_supervisor_makes_the_next_pid_1_ahead(make_container: Make) -> None:
    _own_supervisor()
    first = make_container()
    first.start()
    sup = _supervisor_pid()
    reply, _ = first._call("Test", {"op": "netns"})
    children = Path(f"/proc/{sup}/task/{sup}/children")
    # pid 1 of the next container comes after the reply: wait for it
    deadline = time.monotonic() + 10
    while len(children.read_text().split()) < 2:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    (ahead,) = set(children.read_text().split()) - {str(reply["pid"])}
    # it makes its namespaces right after its fork: wait for the last one
    while _ns(ahead, "net") == _ns(sup, "net"):
        assert time.monotonic() < deadline
        time.sleep(0.01)
    for kind in ("pid", "net", "uts", "ipc"):
        assert _ns(ahead, kind) != _ns(sup, kind), kind
        assert _ns(ahead, kind) != _ns(reply["pid"], kind), kind
    # the mount namespace is made when the container comes (it must see its root mounted)
    assert _ns(ahead, "mnt") == _ns("self", "mnt")
    c = make_container()
    c.start()  # it becomes this container's pid 1
    assert c._call("Test", {"op": "netns"})[0]["pid"] == int(ahead)
    code, out, _ = run(c, "sh -c 'echo $$; hostname'")
    assert code == 0 and out.split()[0] == b"1"


@NATIVE_SUPERVISOR
def test_a_start_job_the_supervisor_cannot_read_is_answered(make_container: Make) -> None:
    """A job the supervisor fails on before it starts anything (here a spec without
    namespaces, compared with those of the pid 1 it has made ahead) gets an error reply:
    the client is never left waiting."""
    import threading

    from pyhcs._compute import _supervisor
    from pyhcs._paths import Roots

    _own_supervisor()
    make_container().start()
    sup = _supervisor_pid()
    children = Path(f"/proc/{sup}/task/{sup}/children")
    deadline = time.monotonic() + 10
    while len(children.read_text().split()) < 2:  # the pid 1 made ahead, once idle
        assert time.monotonic() < deadline
        time.sleep(0.01)
    errors: list[OSError] = []

    def start() -> None:
        try:
            _supervisor.launch("never-made", Roots.resolve(), {"linux": {}})
        except OSError as e:
            errors.append(e)

    t = threading.Thread(target=start, daemon=True)
    t.start()
    t.join(30)
    if t.is_alive():
        os.kill(sup, signal.SIGKILL)  # unblock the client for the tests after this one
        pytest.fail("the supervisor never answered the job")
    assert len(errors) == 1 and "namespaces" in str(errors[0]), errors


@NATIVE_SUPERVISOR
def test_supervisor_makes_the_next_pid_1_while_the_first_process_execs(
        make_container: Make, monkeypatch: pytest.MonkeyPatch) -> None:
    from pyhcs._compute import _supervisor

    _own_supervisor()
    # the supervisor forked for this test never makes it for being idle
    monkeypatch.setattr(_supervisor, "_AHEAD_IDLE", 3600.0)
    c = make_container()
    c.start()
    sup = _supervisor_pid()
    init = c._call("Test", {"op": "netns"})[0]["pid"]
    children = Path(f"/proc/{sup}/task/{sup}/children")
    time.sleep(0.2)
    assert children.read_text().split() == [str(init)]  # nothing ahead before the process
    with c.create_process(pyhcs.ProcessConfig(command_line="sleep 100")):
        # made before the reply came: no waiting here
        (ahead,) = set(children.read_text().split()) - {str(init)}
        assert _ns(ahead, "pid") != _ns(init, "pid")
    d = make_container()
    d.start()  # it becomes this container's pid 1
    assert d._call("Test", {"op": "netns"})[0]["pid"] == int(ahead)
    c.terminate()


@NATIVE_SUPERVISOR
def test_supervisor_raises_its_fd_limit_but_not_its_containers(
        make_container: Make) -> None:
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    _own_supervisor()
    resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))  # the supervisor inherits it
    try:
        c = make_container()
        c.start()
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    sup = _supervisor_pid()
    limits = Path(f"/proc/{sup}/limits").read_text().split("Max open files")[1].split()
    assert limits[:2] == [str(hard), str(hard)]  # ~9 fds per container: room for many
    code, out, _ = run(c, "sh -c 'ulimit -n; ulimit -Hn'")  # pid 1
    assert code == 0 and out.split() == [b"256", str(hard).encode()]
    d = make_container()
    d.start()
    with d.create_process(pyhcs.ProcessConfig(command_line="sleep 100")):
        code, out, _ = run(d, "sh -c 'ulimit -n'")  # a later process
        assert code == 0 and out.split() == [b"256"]
        d.terminate()


@NATIVE_SUPERVISOR
def test_killed_supervisor_is_replaced(make_container: Make) -> None:
    _own_supervisor()
    make_container().start()
    sup = _supervisor_pid()
    os.kill(sup, signal.SIGKILL)
    c = make_container()
    c.start()  # the dead supervisor is noticed and a new one forked
    assert pyhcs.container_state(c.id)["supervisor_pid"] != sup
    code, out, _ = run(c, "echo alive")
    assert code == 0 and out == b"alive\n"


@NATIVE_SUPERVISOR
def test_supervisor_outlives_its_client_until_its_containers_end(busybox: list[str],
                                                                 roots: object) -> None:
    script = (
        "import os, sys, pyhcs\n"
        "from pyhcs._compute import _supervisor\n"
        "layers = [pyhcs.Layer(id=p.rsplit('/', 1)[-1], path=p) for p in sys.argv[1:]]\n"
        "c = pyhcs.create_container('sup-client', pyhcs.ContainerConfig(layers=layers))\n"
        "c.start()\n"
        "print(_supervisor.supervisor_pid(), flush=True)\n"
    )
    out = subprocess.run([sys.executable, "-c", script, *busybox], check=True,
                         capture_output=True, text=True, timeout=60).stdout
    sup = int(out)
    try:
        assert _alive(sup)  # its client has gone; the container still runs
        c = pyhcs.open_container("sup-client")
        assert run(c, "echo served")[1] == b"served\n"  # its first process: then it ends
        c.wait(10)
        deadline = time.monotonic() + 10
        while _alive(sup):  # its last container ended and its client is gone: it exits
            assert time.monotonic() < deadline, "the supervisor outlived its containers"
            time.sleep(0.02)
    finally:
        pyhcs.remove_container("sup-client", force=True)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except FileNotFoundError:
        return False


def test_explicit_roots_hold_the_sandbox(roots: object, tmp_path: Path) -> None:
    other = pyhcs.Roots(tmp_path / "root", tmp_path / "run")
    image = __import__("pyhcs._layers", fromlist=["x"]).ensure_busybox_image(roots=other)
    layers = [pyhcs.Layer(id=p.rsplit("/", 1)[-1], path=p) for p in image.layer_chain]
    c = pyhcs.create_container("elsewhere", pyhcs.ContainerConfig(layers=layers), roots=other)
    try:
        assert (other.layers_dir / "elsewhere" / "rootfs").is_mount()
        assert not (Path(os.environ["PYHCS_ROOT"]) / "layers" / "elsewhere").exists()
        assert not os.path.exists(os.environ["PYHCS_ROOT"] + "/registry.db")
        c.start()
        assert run(c, "true")[0] == 0
        c.wait(30)
    finally:
        c.close()
        pyhcs.remove_container("elsewhere", force=True, roots=other)
    assert not (other.layers_dir / "elsewhere").exists()


@NATIVE_SUPERVISOR
def test_pid_1_killed_before_any_process_ends_the_container(make_container: Make) -> None:
    c = make_container()
    c.start()
    sup = pyhcs.container_state(c.id)["supervisor_pid"]
    init = c._call("Test", {"op": "netns"})[0]["pid"]  # pid 1, waiting for a process
    assert str(init) in Path(f"/proc/{sup}/task/{sup}/children").read_text().split()
    os.kill(init, signal.SIGKILL)
    c.wait(10)  # the supervisor notices at once instead of waiting forever
    state = pyhcs.container_state(c.id)
    assert state["state"] == "stopped" and state["exit_code"] == 137
    # and it reaped pid 1: no zombie left behind
    assert str(init) not in Path(f"/proc/{sup}/task/{sup}/children").read_text().split()



@NATIVE_SUPERVISOR
def test_container_is_released_even_if_its_end_cannot_be_recorded(make_container: Make,
                                                                   tmp_path: Path) -> None:
    """The supervisor answers the container's waiters with the final record, then writes
    it to the run directory, then releases the cgroup. A write that fails there (a client
    with the record removed the run directory at once, say) must not keep the cgroup: it
    is released all the same, and the socket is closed."""
    from pyhcs._compute._supervisor import STATUS_FILE, SUPERVISOR_SOCKET
    from pyhcs._runtime._cgroups import manager

    _own_supervisor()  # killed at the end: how the registry learns of this container's end
    c = make_container(mapped_directories=[pyhcs.MappedDir(host_path=str(tmp_path),
                                                           container_path="/x")])
    c.start()
    sup = _supervisor_pid()
    p = c.create_process(pyhcs.ProcessConfig(
        command_line="sh -c 'while [ ! -e /x/go ]; do sleep 0.02; done; exit 3'"))
    run_dir = pyhcs.Roots.resolve().container_run_dir(c.id)
    (run_dir / f".{STATUS_FILE}.tmp").mkdir()  # the record cannot be written
    folders = [os.path.dirname(f) for f in manager().open(c.id).procs_files()]
    assert all(os.path.isdir(d) for d in folders)
    (tmp_path / "go").touch()
    assert p.wait(30) == 3
    p.close()
    deadline = time.monotonic() + 30  # released after the end is recorded (or not)
    while any(os.path.isdir(d) for d in folders) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert [d for d in folders if os.path.isdir(d)] == []
    assert not (run_dir / SUPERVISOR_SOCKET).exists()
    os.kill(sup, signal.SIGKILL)
    c.wait(30)
    assert pyhcs.container_state(c.id)["state"] == "stopped"
