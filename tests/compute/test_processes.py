"""hcsshim's Process on the real kernel: consoles, stdio, signals, exit codes, waiters,
users, environment and command lines."""

from __future__ import annotations

import errno
import fcntl
import hashlib
import os
import shlex
import signal
import subprocess
import sys
import textwrap
import threading
from collections.abc import Callable

import pytest

import pyhcs

from .conftest import run

Make = Callable[..., pyhcs.Container]

_GO = "sh -c 'while [ ! -e /go ]; do sleep 0.02; done; exit {code}'"


def _with_init(c: pyhcs.Container) -> pyhcs.Process:
    """Start *c* with a long-lived pid 1, so that several processes can run in it."""
    c.start()
    return c.create_process(pyhcs.ProcessConfig(command_line="sleep 300"))


def _read_console(fd: int, until: bytes | None = None) -> bytes:
    """Read a pty master until *until* shows up, or to its end (EIO once the slave side
    is closed everywhere)."""
    data = b""
    while until is None or until not in data:
        try:
            chunk = os.read(fd, 65536)
        except OSError as e:
            if e.errno != errno.EIO:
                raise
            break
        if not chunk:
            break
        data += chunk
    return data


# -- consoles -------------------------------------------------------------------------------


def test_console_is_a_tty_of_the_given_size_and_resizes(make_container: Make) -> None:
    c = make_container()
    c.start()
    p = c.create_process(pyhcs.ProcessConfig(
        command_line="sh -c 'test -t 0 && test -t 1 && test -t 2 && echo is-a-tty; "
                     "stty size; read x; stty size'",
        emulate_console=True, console_size=(33, 101),
        create_std_in_pipe=True, create_std_out_pipe=True))
    stdin, stdout, stderr = p.stdio()
    assert stdin is not None and stdout is not None and stderr is None
    first = _read_console(stdout.fileno(), b"33 101")
    assert b"is-a-tty" in first and b"33 101" in first
    p.resize_console(120, 40)  # width, height
    stdin.write(b"go\n")
    rest = _read_console(stdout.fileno())
    assert rest.split()[-1:] == [b"120"] and b"40 120" in rest, rest
    assert p.wait(10) == 0
    stdin.close()
    stdout.close()


def test_console_is_named_in_the_containers_devpts(make_container: Make) -> None:
    c = make_container()
    c.start()
    p = c.create_process(pyhcs.ProcessConfig(command_line="tty", emulate_console=True,
                                             create_std_out_pipe=True))
    _, stdout, _ = p.stdio()
    assert stdout is not None
    out = _read_console(stdout.fileno())
    stdout.close()
    assert p.wait(10) == 0, out
    assert out.strip().startswith(b"/dev/pts/")


def test_resize_without_console_is_refused(make_container: Make) -> None:
    c = make_container()
    init = _with_init(c)
    with pytest.raises(pyhcs.ProcessError):
        init.resize_console(80, 24)
    init.kill()
    init.wait(10)


# -- stdio ----------------------------------------------------------------------------------


def test_stdio_again_gives_fresh_working_fds(make_container: Make) -> None:
    c = make_container()
    init = _with_init(c)
    p = c.create_process(pyhcs.ProcessConfig(command_line="cat", create_std_in_pipe=True,
                                             create_std_out_pipe=True,
                                             create_std_err_pipe=True))
    first = p.stdio()
    for f in first:
        assert f is not None
        f.close()
    stdin, stdout, stderr = p.stdio()
    assert stdin is not None and stdout is not None and stderr is not None
    assert stdin.fileno() not in [f.fileno() for f in first if f is not None and not f.closed]
    stdin.write(b"second set\n")
    stdin.close()
    _, stdout2, _ = p.stdio()  # a third set while the process runs
    assert stdout2 is not None
    p.close_stdin()
    assert stdout.read() == b"second set\n"
    assert stdout2.read() == b""  # the same pipe: the data went to the first reader
    assert p.wait(10) == 0
    for f in (stdout, stderr, stdout2):
        f.close()
    init.kill()
    init.wait(10)


def test_close_stdin_gives_eof(make_container: Make) -> None:
    c = make_container()
    init = _with_init(c)
    p = c.create_process(pyhcs.ProcessConfig(command_line="sh -c 'cat; echo eof-seen'",
                                             create_std_in_pipe=True,
                                             create_std_out_pipe=True))
    _, stdout, _ = p.stdio()
    assert stdout is not None
    p.close_stdin()
    assert stdout.read() == b"eof-seen\n"
    assert p.wait(10) == 0
    stdout.close()
    init.kill()
    init.wait(10)


_100MB = 100 * 1024 * 1024


def _expected_digest() -> str:
    line = b"abcdefghijklmnopqrstuvwxyz\n"
    whole, part = divmod(_100MB, len(line))
    h = hashlib.sha256()
    block = line * 4096
    for _ in range(whole // 4096):
        h.update(block)
    h.update(line * (whole % 4096) + line[:part])
    return h.hexdigest()


@pytest.mark.parametrize("as_init", [True, False], ids=["pid1", "exec"])
def test_100_mb_of_output_arrives_whole(make_container: Make, as_init: bool) -> None:
    c = make_container()
    init = None
    if as_init:
        c.start()
    else:
        init = _with_init(c)
    p = c.create_process(pyhcs.ProcessConfig(
        command_line=f"sh -c 'yes abcdefghijklmnopqrstuvwxyz | head -c {_100MB}'",
        create_std_out_pipe=True))
    _, stdout, _ = p.stdio()
    assert stdout is not None
    # output pipes are made 1 MiB wide (fewer blocked writes), not the kernel's 64 KiB
    assert fcntl.fcntl(stdout.fileno(), fcntl.F_GETPIPE_SZ) == 1 << 20
    h = hashlib.sha256()
    n = 0
    while chunk := stdout.read(1 << 20):
        h.update(chunk)
        n += len(chunk)
    stdout.close()
    assert p.wait(30) == 0
    assert n == _100MB
    assert h.hexdigest() == _expected_digest()
    if init is not None:
        init.kill()
        init.wait(10)
    c.wait(30)


# -- kill, wait, exit codes -----------------------------------------------------------------


@pytest.mark.parametrize("as_init", [True, False], ids=["pid1", "exec"])
def test_kill_reports_137(make_container: Make, as_init: bool) -> None:
    c = make_container()
    init = None if as_init else _with_init(c)
    if as_init:
        c.start()
    p = c.create_process(pyhcs.ProcessConfig(command_line="sleep 300"))
    with pytest.raises(pyhcs.ProcessError) as info:
        p.exit_code()
    assert info.value.code is pyhcs.ERR_INVALID_PROCESS_STATE
    with pytest.raises(pyhcs.ProcessTimeoutError) as timeout:
        p.wait(0.2)
    assert pyhcs.is_timeout(timeout.value) and isinstance(timeout.value, TimeoutError)
    p.kill()
    assert p.wait(10) == 137
    assert p.exit_code() == 137
    with pytest.raises(pyhcs.ProcessError):
        p.kill()  # it has exited
    if init is not None:
        init.kill()
        init.wait(10)
    c.wait(10)


@pytest.mark.parametrize("sig", [signal.SIGHUP, signal.SIGUSR1, signal.SIGTERM],
                         ids=lambda s: s.name)
def test_a_signal_death_is_128_plus_its_number(make_container: Make,
                                                sig: signal.Signals) -> None:
    c = make_container()
    init = _with_init(c)
    p = c.create_process(pyhcs.ProcessConfig(command_line=f"sh -c 'kill -{int(sig)} $$'"))
    assert p.wait(10) == 128 + int(sig)
    assert p.exit_code() == 128 + int(sig)
    p.close()
    init.kill()
    init.wait(10)


def test_wait_without_a_timeout_returns_at_the_exit(make_container: Make) -> None:
    c = make_container()
    c.start()
    p = c.create_process(pyhcs.ProcessConfig(command_line="sh -c 'sleep 0.3; exit 3'"))
    assert p.wait() == 3
    c.wait()  # the container ended with its pid 1; no deadline was needed
    assert pyhcs.container_state(c.id)["state"] == "stopped"
    p.close()


@pytest.mark.native_only("OCI has no program path apart from argv[0]: "
                         "ApplicationName replaces argv[0] there")
def test_application_name_is_the_program_and_the_command_line_its_argv(
        make_container: Make) -> None:
    """As Windows's CreateProcess: ApplicationName is what runs, CommandLine its argv.
    busybox picks the applet by argv[0], so it shows both."""
    c = make_container()
    init = _with_init(c)
    code, out, _ = run(c, "echo from-argv", application_name="/bin/busybox")
    assert (code, out) == (0, b"from-argv\n")
    code, out, _ = run(c, "", application_name="/bin/hostname")
    assert code == 0 and out.strip() == c.id[:12].encode()
    p = c.create_process(pyhcs.ProcessConfig(command_line="echo x",
                                             application_name="/bin/no-such-program"))
    assert p.wait(10) == pyhcs.WAIT_ERR_EXEC_FAILED
    p.close()
    init.kill()
    init.wait(10)


@pytest.mark.parametrize("as_init", [True, False], ids=["pid1", "exec"])
def test_missing_program_is_exec_failed(make_container: Make, as_init: bool) -> None:
    c = make_container()
    init = None if as_init else _with_init(c)
    if as_init:
        c.start()
    p = c.create_process(pyhcs.ProcessConfig(command_line="no-such-program --flag"))
    assert "not found" in p.exec_error
    assert p.wait(10) == pyhcs.WAIT_ERR_EXEC_FAILED == 32767
    assert p.exit_code() == pyhcs.WAIT_ERR_EXEC_FAILED
    if init is not None:
        assert run(c, "true")[0] == 0  # the container is unharmed
        init.kill()
        init.wait(10)
    c.wait(10)


def _waiter_script(container_id: str, pid: int) -> str:
    return textwrap.dedent(f"""
        import pyhcs
        c = pyhcs.open_container({container_id!r})
        p = c.open_process({pid})
        print("ready", flush=True)
        code = p.wait(60)
        c.wait(60)
        print(code, c.open_process({pid}).exit_code(), flush=True)
    """)


def test_open_process_from_other_handles_and_processes(make_container: Make) -> None:
    c = make_container()
    init = _with_init(c)
    p = c.create_process(pyhcs.ProcessConfig(command_line=_GO.format(code=5)))
    other = pyhcs.open_container(c.id).open_process(p.pid)
    assert other.pid == p.pid
    with pytest.raises(pyhcs.ProcessError) as info:
        other.exit_code()
    assert info.value.code is pyhcs.ERR_INVALID_PROCESS_STATE
    waiter = subprocess.Popen([sys.executable, "-c", _waiter_script(c.id, p.pid)],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert waiter.stdout is not None and waiter.stdout.readline() == "ready\n"
        assert run(c, "touch /go")[0] == 0
        assert other.wait(30) == 5
        assert p.wait(30) == 5
        late = pyhcs.open_container(c.id).open_process(p.pid)  # opened after the exit
        assert late.exit_code() == 5
        init.kill()
        init.wait(10)
        out, _ = waiter.communicate(timeout=60)
        assert waiter.returncode == 0
        assert out.split() == ["5", "5"]
    finally:
        if waiter.poll() is None:
            waiter.kill()
            waiter.wait()
    with pytest.raises(pyhcs.ProcessError) as missing:
        pyhcs.open_container(c.id).open_process(4242)
    assert missing.value.code is pyhcs.ERR_ELEMENT_NOT_FOUND


def test_many_waiters_in_threads_and_processes(make_container: Make) -> None:
    c = make_container()
    c.start()
    init = c.create_process(pyhcs.ProcessConfig(command_line=_GO.format(code=9)))
    results: list[object] = []
    lock = threading.Lock()

    def wait_process() -> None:
        h = pyhcs.open_container(c.id).open_process(1)
        code = h.wait(60)
        with lock:
            results.append(code)

    def wait_container() -> None:
        pyhcs.open_container(c.id).wait(60)
        with lock:
            results.append("stopped")

    threads = [threading.Thread(target=t) for t in [wait_process, wait_container] * 10]
    for t in threads:
        t.start()
    waiters = [subprocess.Popen([sys.executable, "-c", _waiter_script(c.id, 1)],
                                stdout=subprocess.PIPE, text=True) for _ in range(3)]
    try:
        for w in waiters:
            assert w.stdout is not None and w.stdout.readline() == "ready\n"
        assert run(c, "touch /go")[0] == 0
        assert init.wait(30) == 9
        c.wait(30)
        for t in threads:
            t.join(60)
            assert not t.is_alive()
        assert sorted(map(str, results)) == ["9"] * 10 + ["stopped"] * 10
        for w in waiters:
            out, _ = w.communicate(timeout=60)
            assert w.returncode == 0 and out.split() == ["9", "9"]
    finally:
        for w in waiters:
            if w.poll() is None:
                w.kill()
                w.wait()


# -- container handles ----------------------------------------------------------------------


def test_close_is_idempotent_and_final(make_container: Make) -> None:
    c = make_container()
    init = _with_init(c)
    p = c.create_process(pyhcs.ProcessConfig(command_line="sleep 300"))
    c.close()
    c.close()
    calls: list[Callable[[], object]] = [
        c.start, c.shutdown, c.terminate, c.wait, c.pause, c.resume, c.statistics,
        c.process_list, c.has_pending_updates, c.properties,
        lambda: c.create_process(pyhcs.ProcessConfig(command_line="true")),
        lambda: c.open_process(1),
        lambda: c.modify({"ResourceType": "Network", "RequestType": "Add", "Settings": "x"}),
    ]
    for call in calls:
        with pytest.raises(pyhcs.ContainerError) as info:
            call()
        assert pyhcs.is_already_closed(info.value), call
    p.close()
    p.close()
    for pcall in (p.wait, p.kill, p.exit_code, p.stdio, p.close_stdin):
        with pytest.raises(pyhcs.ProcessError) as pinfo:
            pcall()
        assert pyhcs.is_already_closed(pinfo.value), pcall
    # the container went on: a new handle still reaches it
    again = pyhcs.open_container(c.id)
    assert sorted(i.process_id for i in again.process_list()) == [1, p.pid]
    init.kill()
    again.wait(10)


def test_shutdown_delivers_sigterm_to_init(make_container: Make) -> None:
    c = make_container()
    c.start()
    p = c.create_process(pyhcs.ProcessConfig(
        command_line="sh -c 'trap \"echo got-term; exit 0\" TERM; echo ready; "
                     "while true; do sleep 0.02; done'",
        create_std_out_pipe=True))
    _, stdout, _ = p.stdio()
    assert stdout is not None
    assert stdout.readline() == b"ready\n"
    c.shutdown()  # returns at once
    c.wait(30)
    assert stdout.read() == b"got-term\n"
    assert p.wait(10) == 0
    stdout.close()
    assert pyhcs.container_state(c.id)["exit_type"] == "GracefulExit"


# -- users, environment, working directory, command lines -----------------------------------


@pytest.mark.parametrize(("user", "ids"), [
    ("1000", "1000 0"), ("nobody", "65534 65534"), ("0:0", "0 0"), ("root", "0 0"),
    ("nobody:root", "65534 0"), ("1000:65534", "1000 65534"),
])
def test_user_resolves(make_container: Make, user: str, ids: str) -> None:
    c = make_container()
    c.start()
    code, out, err = run(c, "sh -c 'echo $(id -u) $(id -g)'", user=user)
    assert code == 0, err
    assert out.decode().strip() == ids


@pytest.mark.parametrize("user", ["2147483648", "4294967296", "4294967295", "0:2147483648",
                                  "99999999999", "-1"])
def test_out_of_range_user_is_refused(make_container: Make, user: str) -> None:
    c = make_container()
    init = _with_init(c)
    with pytest.raises(pyhcs.InvalidConfigError):
        c.create_process(pyhcs.ProcessConfig(command_line="id", user=user))
    init.kill()
    init.wait(10)


def test_unknown_user_name_is_exec_failed(make_container: Make) -> None:
    c = make_container()
    c.start()
    p = c.create_process(pyhcs.ProcessConfig(command_line="id", user="no-such-user"))
    assert "no-such-user" in p.exec_error
    assert p.wait(10) == pyhcs.WAIT_ERR_EXEC_FAILED


@pytest.mark.parametrize("planted", ["fifo", "symlink", "huge"])
def test_user_lookup_reads_only_a_bounded_regular_passwd(make_container: Make,
                                                         planted: str) -> None:
    """The container's own root may replace /etc/passwd: a FIFO must not hang the lookup,
    a symlink is not followed, and no more than the first MiB is read."""
    c = make_container()
    init = _with_init(c)
    late = "late:x:4242:4242::/:/bin/sh"
    plant = {
        "fifo": "rm /etc/passwd && mkfifo /etc/passwd",
        "symlink": f"echo {late} > /etc/passwd.real && ln -sf /etc/passwd.real /etc/passwd",
        # root's line first, then 2 MiB of comment lines, then late's
        "huge": "{ echo root:x:0:0::/root:/bin/sh; head -c 2097152 /dev/zero | "
                f"tr '\\0' '#' | fold -w 1023; echo; echo {late}; }} > /etc/passwd.new "
                "&& mv /etc/passwd.new /etc/passwd",
    }[planted]
    code, _, err = run(c, "sh -c " + shlex.quote(plant))
    assert code == 0, err
    if planted == "huge":
        size = int(run(c, "stat -c %s /etc/passwd")[1])
        assert size > 2 << 20
        assert run(c, "grep -o '^Uid:[[:space:]]*[0-9]*' /proc/self/status", user="root"
                   )[1].split() == [b"Uid:", b"0"]
    p = c.create_process(pyhcs.ProcessConfig(command_line="id", user="late"))
    assert "late" in p.exec_error
    assert p.wait(10) == pyhcs.WAIT_ERR_EXEC_FAILED
    p.close()
    # numeric ids need no file (and no program here reads it: busybox's id would open the FIFO)
    assert run(c, "grep -o '^Uid:[[:space:]]*[0-9]*' /proc/self/status", user="4242"
               )[1].split() == [b"Uid:", b"4242"]
    init.kill()
    init.wait(10)


def test_environment_and_working_directory(make_container: Make) -> None:
    c = make_container()
    c.start()
    code, out, _ = run(c, "sh -c 'echo \"$FOO|$EMPTY|$PATH\"; pwd'",
                       environment={"FOO": "bar baz", "EMPTY": ""}, working_directory="/tmp")
    assert code == 0
    env, cwd = out.decode().splitlines()
    foo, empty, path = env.split("|")
    assert (foo, empty, cwd) == ("bar baz", "", "/tmp")
    assert "/bin" in path.split(":")


@pytest.mark.native_only("crun and runc create a missing working directory of the "
                         "first process")
def test_missing_working_directory_is_exec_failed(make_container: Make) -> None:
    c = make_container()
    c.start()
    p = c.create_process(pyhcs.ProcessConfig(command_line="pwd",
                                             working_directory="/does/not/exist"))
    assert "/does/not/exist" in p.exec_error
    assert p.wait(10) == pyhcs.WAIT_ERR_EXEC_FAILED


@pytest.mark.parametrize(("command", "output"), [
    ("sh -c \"echo 'a b' \\\"c d\\\"\"", b"a b c d\n"),
    ("sh -c 'for a; do echo \"[$a]\"; done' x 'a b' \"c d\" e\\ f '' \"g'h\"",
     b"[a b]\n[c d]\n[e f]\n[]\n[g'h]\n"),
    ("echo $HOME '*' \"$PATH\"", b"$HOME * $PATH\n"),  # no expansion: quoting only
])
def test_command_line_is_split_like_a_shell(make_container: Make, command: str,
                                            output: bytes) -> None:
    c = make_container()
    c.start()
    code, out, _ = run(c, command)
    assert code == 0
    assert out == output


def test_unbalanced_quote_is_refused(make_container: Make) -> None:
    c = make_container()
    init = _with_init(c)
    with pytest.raises(pyhcs.InvalidConfigError):
        c.create_process(pyhcs.ProcessConfig(command_line="echo 'unterminated"))
    init.kill()
    init.wait(10)
