"""``pyhcs exec``, ``stats``, ``top``, ``pause``, ``resume``, ``stop``, ``kill`` and ``logs``,
run as a user would: a separate process per command, on real containers."""

from __future__ import annotations

import fcntl
import json
import os
import select
import struct
import subprocess
import sys
import termios
from collections.abc import Callable, Iterator

import pytest

from pyhcs._compute._log import LOG_FILE, LOG_MAX_BYTES
from pyhcs._paths import Roots

Run = Callable[..., str]


def pyhcs(*args: str, input: str | None = None, timeout: float = 60
          ) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pyhcs", *args], capture_output=True,
                          text=True, timeout=timeout, input=input)


def ok(*args: str, input: str | None = None) -> str:
    r = pyhcs(*args, input=input)
    assert r.returncode == 0, (args, r.stderr)
    return r.stdout


def one_line_error(r: subprocess.CompletedProcess[str], *words: str) -> None:
    assert r.returncode == 125, (r.returncode, r.stdout, r.stderr)
    assert r.stderr.startswith("pyhcs: ") and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "Traceback" not in r.stderr
    for w in words:
        assert w in r.stderr


def state(cid: str) -> dict[str, object]:
    doc: dict[str, object] = json.loads(ok("inspect", cid))
    return doc


def wait_stopped(cid: str) -> None:
    import pyhcs as api

    api.open_container(cid).wait(60)


def wait_for_log(cid: str, text: str) -> str:
    """The container's log once it contains *text* (bounded by the container's own end)."""
    for _ in range(2000):
        out = ok("logs", cid)
        if text in out:
            return out
        assert state(cid)["state"] != "stopped", out
    raise AssertionError(f"{text!r} never appeared")


@pytest.fixture
def detached(busybox: list[str], roots: Roots) -> Iterator[Run]:
    """Starts containers with ``pyhcs run -d`` and removes them after the test."""
    made: list[str] = []

    def run(*command: str, name: str = "") -> str:
        extra = ["--name", name] if name else []
        cid = ok("run", "-d", *extra, "busybox", "--", *command).strip()
        made.append(cid)
        return cid

    yield run
    for cid in made:
        pyhcs("rm", "-f", cid)


# -- exec ------------------------------------------------------------------------------------


def test_exec_output_exit_codes_and_options(detached: Run) -> None:
    cid = detached("sleep", "600", name="box")
    r = pyhcs("exec", "box", "sh", "-c", "echo out; echo err >&2; exit 7")
    assert (r.returncode, r.stdout, r.stderr) == (7, "out\n", "err\n")
    r = pyhcs("exec", cid[:12], "sh", "-c", "kill -9 $$")
    assert r.returncode == 137
    r = pyhcs("exec", cid, "/no/such/binary")
    assert r.returncode == 127 and "no/such/binary" in r.stderr
    out = ok("exec", "-e", "FOO=bar", "-w", "/tmp", "-u", "nobody", cid,
             "sh", "-c", "echo $FOO $(pwd) $(id -u)")
    assert out == "bar /tmp 65534\n"
    # -i forwards stdin, and its end; without -i the process reads nothing
    assert ok("exec", "-i", cid, "sh", "-c", "cat; echo eof", input="piped\n") == "piped\neof\n"
    assert ok("exec", cid, "cat", input="ignored\n") == ""
    # the exec'd processes did not end the container
    assert state(cid)["state"] == "running"


def test_exec_errors_are_one_line(detached: Run, roots: Roots) -> None:
    one_line_error(pyhcs("exec", "nothing-here", "true"), "no such container")
    cid = detached("true")
    wait_stopped(cid)
    one_line_error(pyhcs("exec", cid, "true"), "not running")
    r = pyhcs("exec", cid)
    assert r.returncode == 2 and "Traceback" not in r.stderr  # usage: no command


def test_exec_tty(detached: Run) -> None:
    cid = detached("sleep", "600")
    r = pyhcs("exec", "-t", cid, "sh", "-c", "test -t 0 && test -t 1 && tty")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("/dev/pts/")
    assert pyhcs("exec", cid, "sh", "-c", "test -t 0 || test -t 1").returncode == 1
    r = pyhcs("exec", "-t", cid, "sh", "-c", "exit 3")
    assert r.returncode == 3


def _set_size(fd: int, rows: int, cols: int) -> None:
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))


def _read_until(fd: int, proc: subprocess.Popen[bytes], want: bytes, buf: bytearray) -> None:
    while want not in buf:
        ready, _, _ = select.select([fd], [], [], 60)
        assert ready, bytes(buf)
        try:
            chunk = os.read(fd, 4096)
        except OSError:  # EIO: the other side is closed
            chunk = b""
        assert chunk, (bytes(buf), proc.poll())
        buf += chunk


def test_exec_tty_takes_our_size_and_follows_resizes(detached: Run) -> None:
    """On a terminal, ``exec -t`` gives the process our size, and SIGWINCH carries a change."""
    cid = detached("sleep", "600")
    master, slave = os.openpty()
    _set_size(slave, 30, 100)

    def controlling_tty() -> None:
        fcntl.ioctl(0, termios.TIOCSCTTY, 0)

    script = 'stty size; while [ "$(stty size)" = "30 100" ]; do sleep 0.05; done; stty size'
    proc = subprocess.Popen([sys.executable, "-m", "pyhcs", "exec", "-t", cid, "sh", "-c", script],
                            stdin=slave, stdout=slave, stderr=slave, start_new_session=True,
                            preexec_fn=controlling_tty)
    os.close(slave)
    buf = bytearray()
    try:
        _read_until(master, proc, b"30 100", buf)
        _set_size(master, 40, 120)  # the kernel sends SIGWINCH to the pyhcs process
        _read_until(master, proc, b"40 120", buf)
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(master)


def test_exec_interactive_tty(detached: Run) -> None:
    """``exec -i -t`` on a terminal: keys reach the process through its pty, and our
    terminal is raw only while it runs."""
    cid = detached("sleep", "600")
    master, slave = os.openpty()
    cooked = termios.tcgetattr(slave)
    proc = subprocess.Popen(
        [sys.executable, "-m", "pyhcs", "exec", "-i", "-t", cid, "sh", "-c",
         'echo ready; read line; echo "got:$line"; exit 5'],
        stdin=slave, stdout=slave, stderr=slave, start_new_session=True)
    buf = bytearray()
    try:
        _read_until(master, proc, b"ready", buf)
        assert termios.tcgetattr(slave)[3] & termios.ICANON == 0  # raw while it runs
        os.write(master, b"abc\r")
        _read_until(master, proc, b"got:abc", buf)
        assert proc.wait(60) == 5
        assert termios.tcgetattr(slave) == cooked  # and restored after
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(master)
        os.close(slave)


# -- stats and top ---------------------------------------------------------------------------


def _stats(*args: str) -> list[dict[str, object]]:
    doc: list[dict[str, object]] = json.loads(ok("stats", "--json", *args))
    return doc


def _cpu(entry: dict[str, object]) -> int:
    st = entry["statistics"]
    assert isinstance(st, dict)
    return int(st["Processor"]["TotalRuntime100ns"])


def test_stats_figures_present_and_moving(detached: Run) -> None:
    busy = detached("sh", "-c", "while :; do :; done", name="busy")
    idle = detached("sleep", "600", name="idle")
    listed = _stats()  # every running container
    assert sorted(str(e["id"]) for e in listed) == sorted([busy, idle])
    (first,) = _stats("busy")
    assert first["id"] == busy and first["name"] == "busy" and first["pids"] == 1
    st = first["statistics"]
    assert isinstance(st, dict)
    assert set(st) >= {"Timestamp", "Uptime100ns", "Memory", "Processor", "Storage", "Network"}
    assert st["Memory"]["MemoryUsageCommitBytes"] > 0
    assert set(st["Storage"]) == {"ReadCountNormalized", "ReadSizeBytes",
                                  "WriteCountNormalized", "WriteSizeBytes"}
    assert isinstance(first["cpu_percent"], float) and first["cpu_percent"] > 0
    # the busy container's CPU time grows from one look to the next
    assert _cpu(_stats("busy")[0]) > _cpu(first)
    # memory follows what the container holds (its page cache counts)
    before = _stats("idle")[0]["statistics"]
    ok("exec", idle, "sh", "-c", "head -c 20000000 /dev/zero > /tmp/big")
    after = _stats("idle")[0]["statistics"]
    assert isinstance(before, dict) and isinstance(after, dict)
    grown = after["Memory"]["MemoryUsageCommitBytes"] - before["Memory"]["MemoryUsageCommitBytes"]
    assert grown >= 15_000_000
    table = ok("stats", "--no-stream")
    assert busy[:12] in table and idle[:12] in table and "CPU %" in table


def test_stats_stream(detached: Run) -> None:
    """--stream --json: one array per line, until the container asked for stops."""
    cid = detached("sh", "-c", "while :; do :; done")
    proc = subprocess.Popen([sys.executable, "-m", "pyhcs", "stats", "--stream", "--json", cid],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert proc.stdout is not None
        first = json.loads(proc.stdout.readline())
        second = json.loads(proc.stdout.readline())
        assert [e["id"] for e in first] == [cid] == [e["id"] for e in second]
        assert _cpu(second[0]) > _cpu(first[0])
        ok("kill", cid)
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
        rounds = [json.loads(line) for line in out.decode().splitlines()]
        assert rounds[-1] == []  # the round that found it stopped, and the last
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_stats_and_top_errors(roots: Roots, detached: Run) -> None:
    assert _stats() == []
    one_line_error(pyhcs("stats", "nothing-here"), "no such container")
    one_line_error(pyhcs("top", "nothing-here"), "no such container")
    cid = detached("true")
    wait_stopped(cid)
    one_line_error(pyhcs("stats", cid), "not running")
    one_line_error(pyhcs("top", cid), "not running")


def test_top_lists_the_processes(detached: Run) -> None:
    cid = detached("sh", "-c", "sleep 600 & sleep 601 & echo ready; wait")
    wait_for_log(cid, "ready")
    items = json.loads(ok("top", "--json", cid))
    names = sorted((i["ProcessId"], i["ImageName"]) for i in items)
    assert names[0] == (1, "sh")
    assert [n for _, n in names[1:]] == ["sleep", "sleep"]
    assert all(i["MemoryCommitBytes"] > 0 for i in items)
    table = ok("top", cid).splitlines()
    assert table[0].split()[:2] == ["PID", "NAME"]
    assert sorted(line.split()[1] for line in table[1:]) == ["sh", "sleep", "sleep"]


# -- state -----------------------------------------------------------------------------------


def test_pause_and_resume(detached: Run) -> None:
    cid = detached("sleep", "600", name="frozen")
    assert ok("pause", "frozen") == "frozen\n"
    assert state(cid)["state"] == "paused"
    assert json.loads(ok("ps", "--json"))[0]["state"] == "paused"
    one_line_error(pyhcs("pause", cid), "paused")
    one_line_error(pyhcs("exec", cid, "true"), "paused")
    assert ok("resume", cid) == f"{cid}\n"
    assert state(cid)["state"] == "running"
    assert json.loads(ok("ps", "--json"))[0]["state"] == "running"
    one_line_error(pyhcs("resume", cid), "running")
    assert ok("exec", cid, "echo", "thawed") == "thawed\n"


def test_stop_graceful(detached: Run) -> None:
    cid = detached("sh", "-c", 'trap "echo got-term; exit 3" TERM; echo ready; '
                               "while :; do sleep 0.05; done")
    wait_for_log(cid, "ready")
    assert ok("stop", "-t", "60", cid) == f"{cid}\n"
    doc = state(cid)
    assert (doc["state"], doc["exit_code"]) == ("stopped", 3)
    assert ok("logs", cid) == "ready\ngot-term\n"
    assert ok("stop", cid) == f"{cid}\n"  # a stopped container is left as it is


def test_stop_escalates_when_sigterm_is_ignored(detached: Run) -> None:
    cid = detached("sh", "-c", 'trap "" TERM; echo ready; while :; do sleep 0.05; done')
    wait_for_log(cid, "ready")
    assert ok("stop", "-t", "0.5", cid) == f"{cid}\n"
    doc = state(cid)
    assert (doc["state"], doc["exit_code"]) == ("stopped", 137)


def test_stop_a_paused_container(detached: Run) -> None:
    cid = detached("sh", "-c", 'trap "exit 4" TERM; echo ready; while :; do sleep 0.05; done')
    wait_for_log(cid, "ready")
    ok("pause", cid)
    ok("stop", "-t", "60", cid)
    assert state(cid)["exit_code"] == 4


def test_kill(detached: Run) -> None:
    cid = detached("sh", "-c", 'trap "echo usr1" USR1; echo ready; '
                               "while :; do sleep 0.05; done")
    wait_for_log(cid, "ready")
    assert ok("kill", "-s", "USR1", cid) == f"{cid}\n"  # to init, which handles it
    wait_for_log(cid, "usr1")
    assert state(cid)["state"] == "running"
    r = pyhcs("kill", "-s", "NOSUCH", cid)
    assert r.returncode == 2 and "not a signal" in r.stderr and "Traceback" not in r.stderr
    ok("pause", cid)
    assert ok("kill", cid) == f"{cid}\n"  # SIGKILL to every process, paused or not
    doc = state(cid)
    assert (doc["state"], doc["exit_code"]) == ("stopped", 137)
    one_line_error(pyhcs("kill", cid), "not running")
    one_line_error(pyhcs("kill", "nothing-here"), "no such container")


# -- logs ------------------------------------------------------------------------------------


def test_logs_keep_what_a_detached_container_wrote(detached: Run, roots: Roots) -> None:
    cid = detached("sh", "-c", "echo out; echo err >&2; echo last")
    wait_stopped(cid)
    assert ok("logs", cid) == "out\nerr\nlast\n"  # stdout and stderr, in the order written
    log = roots.container_run_dir(cid) / LOG_FILE
    assert log.exists()
    assert oct(log.stat().st_mode & 0o777) == "0o600"
    ok("rm", cid)
    assert not log.exists()  # removed with the container
    one_line_error(pyhcs("logs", cid), "no such container")


def test_logs_are_bounded(detached: Run, roots: Roots) -> None:
    total = 3 * LOG_MAX_BYTES
    cid = detached("sh", "-c", f"yes 0123456789abcde | head -c {total}; echo END")
    wait_stopped(cid)
    out = ok("logs", cid)
    assert out.endswith("0123456789abcde\nEND\n")  # the newest output is kept
    assert LOG_MAX_BYTES < len(out) <= 2 * LOG_MAX_BYTES
    run_dir = roots.container_run_dir(cid)
    assert (run_dir / LOG_FILE).stat().st_size <= LOG_MAX_BYTES
    assert (run_dir / (LOG_FILE + ".1")).stat().st_size <= LOG_MAX_BYTES


def test_logs_follow(detached: Run) -> None:
    cid = detached("sh", "-c", "echo one; while [ ! -e /tmp/go ]; do sleep 0.05; done; echo two")
    wait_for_log(cid, "one")
    follower = subprocess.Popen([sys.executable, "-m", "pyhcs", "logs", "-f", cid],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert follower.stdout is not None
        assert follower.stdout.readline() == b"one\n"
        ok("exec", cid, "touch", "/tmp/go")
        out, err = follower.communicate(timeout=60)
        assert follower.returncode == 0, err
        assert out == b"two\n"
    finally:
        if follower.poll() is None:
            follower.kill()
            follower.wait()


def test_logs_of_a_foreground_container(busybox: list[str], roots: Roots) -> None:
    r = pyhcs("run", "--name", "fg", "busybox", "echo", "hi")
    assert r.stdout == "hi\n"  # it went to the terminal, not to a log
    one_line_error(pyhcs("logs", "fg"), "keeps no log")
    ok("rm", "fg")


# -- JSON ------------------------------------------------------------------------------------


def test_every_listing_has_json(detached: Run) -> None:
    cid = detached("sleep", "600")
    assert [c["id"] for c in json.loads(ok("ps", "--json"))] == [cid]
    assert [i["name"] for i in json.loads(ok("image", "ls", "--json"))] == ["busybox"]
    layers = json.loads(ok("layer", "ls", "--json"))
    assert {layer["kind"] for layer in layers} >= {"sandbox"}
    assert json.loads(ok("top", "--json", cid))[0]["ProcessId"] == 1
    assert json.loads(ok("stats", "--json", cid))[0]["id"] == cid
