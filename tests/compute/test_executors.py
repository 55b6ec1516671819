"""The same compute tests on every executor: native, crun and runc (see _runtime._oci).

A runtime whose binary is not installed is skipped.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import signal
from collections.abc import Callable, Iterator

import pytest

import pyhcs
from pyhcs._paths import Roots
from pyhcs._runtime._oci import RUNTIME_ENV, resolve_runtime, runtime_of

from .conftest import run

RUNTIMES = ["native", "crun", "runc"]
# hierarchies the OCI runtimes make cgroups in that pyhcs itself leaves alone: the parent
# they leave there is removed at the end of the module, as pyhcs's own is by the session
_FOREIGN_HIERARCHIES = ("devices", "systemd", "net_cls", "net_prio", "net_cls,net_prio",
                        "perf_event", "rdma", "misc", "hugetlb")


@pytest.fixture(scope="module", autouse=True)
def _foreign_parents() -> Iterator[None]:
    yield
    parent = os.environ.get("PYHCS_CGROUP_PARENT") or "pyhcs"
    for h in _FOREIGN_HIERARCHIES:
        with contextlib.suppress(OSError):
            os.rmdir(os.path.join("/sys/fs/cgroup", h, parent))


@pytest.fixture(params=RUNTIMES)
def runtime(request: pytest.FixtureRequest) -> str:
    name: str = request.param
    if name != "native" and shutil.which(name) is None:
        pytest.skip(f"{name} is not installed")
    return name


@pytest.fixture
def container(make_container: Callable[..., pyhcs.Container], runtime: str
              ) -> Callable[..., pyhcs.Container]:
    """make_container on the runtime under test, started."""
    def make(**fields: object) -> pyhcs.Container:
        mp = pytest.MonkeyPatch()
        mp.setenv(RUNTIME_ENV, runtime)
        try:
            c = make_container(**fields)
        finally:
            mp.undo()
        c.start()
        return c

    return make


def test_runtime_option() -> None:
    assert resolve_runtime("native") is None
    with pytest.raises(pyhcs.InvalidConfigError):
        resolve_runtime("no-such-runtime")
    with pytest.raises(pyhcs.InvalidConfigError):
        resolve_runtime("/nonexistent/crun")
    with pytest.raises(pyhcs.InvalidConfigError):
        resolve_runtime("/etc/passwd")  # not executable
    crun = shutil.which("crun")
    if crun is not None:
        assert resolve_runtime(crun) == crun
        assert resolve_runtime("crun") == crun


def test_runtime_is_kept_with_the_container(make_container: Callable[..., pyhcs.Container],
                                            runtime: str, roots: Roots,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(RUNTIME_ENV, runtime)
    c = make_container()
    run_dir = roots.container_run_dir(c.id)
    spec = json.loads((run_dir / "config.json").read_text())
    assert runtime_of(spec) == resolve_runtime(runtime)
    # a different choice when it starts does not change the container's executor
    monkeypatch.setenv(RUNTIME_ENV, "native" if runtime != "native" else "crun")
    c.start()
    code, out, _ = run(c, "cat /proc/1/cmdline")
    assert code == 0
    assert out == b"cat\0/proc/1/cmdline\0"
    # the OCI runtime's bundle and state exist for OCI runtimes only
    assert (run_dir / "oci" / "config.json").exists() == (runtime != "native")
    c.wait(30)


def test_create_container_runtime_argument(busybox: list[str], unique_id: str,
                                           roots: Roots) -> None:
    if shutil.which("crun") is None:
        pytest.skip("crun is not installed")
    layers = [pyhcs.Layer(id=p.rsplit("/", 1)[-1], path=p) for p in busybox]
    cid = unique_id + "-arg"
    c = pyhcs.create_container(cid, pyhcs.ContainerConfig(layers=layers), runtime="crun")
    try:
        spec = json.loads((roots.container_run_dir(cid) / "config.json").read_text())
        assert runtime_of(spec) == shutil.which("crun")
        c.start()
        assert run(c, "true")[0] == 0
        c.wait(30)
    finally:
        pyhcs.remove_container(cid, force=True)
    with pytest.raises(pyhcs.InvalidConfigError):
        pyhcs.create_container(cid, pyhcs.ContainerConfig(layers=layers), runtime="bogus")


@pytest.mark.parametrize("code", [0, 1, 7])
def test_exit_codes(container: Callable[..., pyhcs.Container], code: int) -> None:
    c = container()
    got, _, _ = run(c, f"sh -c 'exit {code}'")
    assert got == code
    c.wait(30)


def test_pid_1_and_hostname(container: Callable[..., pyhcs.Container]) -> None:
    c = container(host_name="exec-host")
    code, out, _ = run(c, "sh -c 'echo $$; hostname'")
    assert code == 0
    assert out.split() == [b"1", b"exec-host"]
    c.wait(30)


def test_stdin_and_stdout_pipes(container: Callable[..., pyhcs.Container]) -> None:
    c = container()
    p = c.create_process(pyhcs.ProcessConfig(command_line="tr a-z A-Z", create_std_in_pipe=True,
                                             create_std_out_pipe=True))
    stdin, stdout, _ = p.stdio()
    assert stdin is not None and stdout is not None
    stdin.write(b"hello executor\n")
    p.close_stdin()
    assert stdout.read() == b"HELLO EXECUTOR\n"
    assert p.wait(30) == 0
    stdout.close()
    p.close()
    c.wait(30)


def test_second_process_shares_the_container(container: Callable[..., pyhcs.Container]
                                              ) -> None:
    c = container()
    init = c.create_process(pyhcs.ProcessConfig(
        command_line="sh -c 'touch /shared; exec sleep 60'"))
    code, out, _ = run(c, "sh -c 'while [ ! -e /shared ]; do sleep 0.01; done; "
                          "cat /proc/1/cmdline; echo; echo $$'")
    assert code == 0
    lines = out.split(b"\n")
    assert lines[0] == b"sleep\x0060\x00"  # sh exec'd its last command
    assert int(lines[1]) > 1
    code, _, _ = run(c, "sh -c 'exit 5'")
    assert code == 5
    init.kill()
    assert init.wait(30) == 128 + signal.SIGKILL
    init.close()
    c.wait(30)


def test_missing_program_is_exec_failed(container: Callable[..., pyhcs.Container]) -> None:
    c = container()
    init = c.create_process(pyhcs.ProcessConfig(command_line="sleep 60"))
    p = c.create_process(pyhcs.ProcessConfig(command_line="/no/such/program"))
    assert p.wait(30) == pyhcs.WAIT_ERR_EXEC_FAILED
    assert p.exec_error
    assert p.exec_errno == errno.ENOENT
    p.close()
    init.kill()
    init.wait(30)
    init.close()
    c.wait(30)


def test_missing_program_as_init_stops_the_container(
        container: Callable[..., pyhcs.Container]) -> None:
    c = container()
    p = c.create_process(pyhcs.ProcessConfig(command_line="no-such-program"))
    assert p.wait(30) == pyhcs.WAIT_ERR_EXEC_FAILED
    assert "not found" in p.exec_error
    p.close()
    c.wait(30)
    assert c.properties().stopped


def test_memory_limit_oom(container: Callable[..., pyhcs.Container]) -> None:
    c = container(memory_maximum_in_mb=32)
    # a shell variable that doubles until it exceeds the limit
    code, _, _ = run(c, "sh -c 'a=xxxxxxxxxxxxxxxx; while true; do a=$a$a; done'")
    assert code == 137
    c.wait(30)
    assert c.properties().exit_type == "OOMKilled"


def test_terminate(container: Callable[..., pyhcs.Container]) -> None:
    c = container()
    init = c.create_process(pyhcs.ProcessConfig(command_line="sleep 600"))
    other = c.create_process(pyhcs.ProcessConfig(command_line="sleep 600"))
    c.terminate()
    c.wait(30)
    assert init.wait(30) == 128 + signal.SIGKILL
    assert other.wait(30) == 128 + signal.SIGKILL
    assert c.properties().stopped
    init.close()
    other.close()


def test_statistics_pause_resume(container: Callable[..., pyhcs.Container]) -> None:
    c = container()
    p = c.create_process(pyhcs.ProcessConfig(
        command_line="sh -c 'while true; do echo x; done'", create_std_out_pipe=True))
    _, out, _ = p.stdio()
    assert out is not None
    assert out.read(2) == b"x\n"
    st = c.statistics()
    assert st.memory.usage_commit_bytes > 0
    assert st.processor.total_runtime_100ns > 0
    assert len(c.process_list()) == 1
    c.pause()
    frozen = c.statistics().processor.total_runtime_100ns
    # paused: the loop does not run, so the cgroup's CPU time stands still
    assert c.statistics().processor.total_runtime_100ns == frozen
    c.resume()
    assert out.read(2) == b"x\n"
    c.terminate()
    c.wait(30)
    out.close()
    p.close()


def test_network_namespace_is_the_one_endpoints_join(container: Callable[..., pyhcs.Container]
                                                     ) -> None:
    # endpoints are attached to the network namespace of the process the supervisor names
    # (native: pid 1; an OCI runtime: the supervisor): it must be the container's
    c = container()
    reply, _ = c._call("Test", {"op": "netns"})
    netns = os.readlink(f"/proc/{reply['pid']}/ns/net")
    code, out, _ = run(c, "readlink /proc/self/ns/net")
    assert code == 0
    assert out.strip().decode() == netns
    assert netns != os.readlink("/proc/self/ns/net")
    c.wait(30)


def test_seccomp_applied(container: Callable[..., pyhcs.Container]) -> None:
    c = container()
    code, out, _ = run(c, "grep ^Seccomp: /proc/self/status")
    assert code == 0
    assert out.split() == [b"Seccomp:", b"2"]
    c.wait(30)


def test_named_user(container: Callable[..., pyhcs.Container]) -> None:
    c = container()
    init = c.create_process(pyhcs.ProcessConfig(command_line="sleep 60"))
    code, out, _ = run(c, "id -u", user="nobody")
    assert code == 0
    assert out.strip() == b"65534"
    init.kill()
    init.wait(30)
    init.close()
    c.wait(30)


@pytest.mark.parametrize("as_init", [True, False], ids=["init", "exec"])
def test_console_and_resize(container: Callable[..., pyhcs.Container], as_init: bool) -> None:
    c = container()
    init = None
    if not as_init:
        init = c.create_process(pyhcs.ProcessConfig(command_line="sleep 60"))
    p = c.create_process(pyhcs.ProcessConfig(
        command_line="sh -c 'test -t 0 && echo is-a-tty; stty size; read x; stty size'",
        emulate_console=True, console_size=(30, 100),
        create_std_in_pipe=True, create_std_out_pipe=True))
    stdin, out, _ = p.stdio()
    assert stdin is not None and out is not None

    def read_until(marker: bytes) -> bytes:
        data = b""
        while marker not in data:
            chunk = os.read(out.fileno(), 4096)
            assert chunk, data
            data += chunk
        return data

    assert b"is-a-tty" in read_until(b"30 100")
    p.resize_console(120, 40)  # width, height
    stdin.write(b"go\n")
    read_until(b"40 120")
    assert p.wait(30) == 0
    stdin.close()
    out.close()
    p.close()
    if init is not None:
        init.kill()
        init.wait(30)
        init.close()
    c.wait(30)
