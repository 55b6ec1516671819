"""``pyhcs exec``, ``stats``, ``top``, ``pause``, ``resume``, ``stop``, ``kill`` and ``logs``:
a container that runs, from the shell, through the public API."""

from __future__ import annotations

import json
import os
import shlex
import signal
import sys
import time
from datetime import datetime
from typing import Any

import click
import msgspec

from .._compute import Container, container_state, get_containers, open_container
from .._compute._log import LOG_FILE, read_log
from .._errors import ContainerTimeoutError, HcsError, is_already_stopped
from .._paths import Roots
from .._registry import Registry
from .._schema import ProcessConfig, Statistics
from ._common import attach, fail, parse_env, resolve_container, terminal_size

__all__ = ["commands"]

#: What ``pyhcs stop`` waits for the container to end by itself, as docker does.
STOP_TIMEOUT = 10.0
# How long after asking for the end by SIGKILL a container is waited for: the kill itself
# returns once the cgroup is empty, so this is only a bound.
_KILL_WAIT = 30.0


def _open(ref: str, states: tuple[str, ...], doing: str) -> tuple[Container, str, str]:
    """The container *ref*, its id and state; a one-line error unless it is in *states*."""
    cid = resolve_container(ref)
    state = str(container_state(cid)["state"])
    if state not in states:
        if state in ("running", "paused"):
            raise click.ClickException(f"container {ref} is {state}: cannot {doing} it")
        raise click.ClickException(f"container {ref} is not running (it is {state})")
    return open_container(cid), cid, state


def _full(value: Any) -> Any:
    """A document as JSON-shaped data with hcsshim's names and every field (the wire form
    leaves out fields that hold their default; a listing shows all figures)."""
    if isinstance(value, msgspec.Struct):
        return {f.encode_name: _full(getattr(value, f.name))
                for f in msgspec.structs.fields(value)}
    if isinstance(value, list | tuple):
        return [_full(v) for v in value]
    if isinstance(value, datetime):
        return value.isoformat().replace("+00:00", "Z")
    return value


def _size(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f}{unit}" if unit == "B" else f"{value:.1f}{unit}"
        value /= 1024
    raise AssertionError("unreachable")


def _duration(units_100ns: int) -> str:
    seconds = units_100ns / 1e7
    if seconds < 60:
        return f"{seconds:.2f}s"
    minutes, s = divmod(int(seconds), 60)
    hours, m = divmod(minutes, 60)
    return f"{hours}:{m:02d}:{s:02d}"


# -- exec ------------------------------------------------------------------------------------


@click.command("exec", context_settings={"ignore_unknown_options": True,
                                         "allow_interspersed_args": False})
@click.option("-i", "--interactive", is_flag=True, help="Keep stdin open and attached.")
@click.option("-t", "--tty", is_flag=True,
              help="Give the process a pseudo-terminal (the size of ours).")
@click.option("-e", "--env", "env", multiple=True, help="KEY=VALUE for the process.")
@click.option("-w", "--workdir", default="", help="Working directory inside the container.")
@click.option("-u", "--user", default="", help="user[:group] (names or numeric ids).")
@click.argument("container")
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
def exec_(interactive: bool, tty: bool, env: tuple[str, ...], workdir: str, user: str,
          container: str, command: tuple[str, ...]) -> None:
    """Run COMMAND in the running CONTAINER; exit with its exit code (128+N after signal N;
    127 or 126 if it cannot be executed)."""
    argv = list(command)
    if argv[0] == "--":
        argv = argv[1:]
    if not argv:
        raise click.UsageError("no command given")
    c, _cid, _state = _open(container, ("running",), "exec in")
    size = terminal_size() if tty else None
    p = c.create_process(ProcessConfig(
        command_line=shlex.join(argv), environment=parse_env(env),
        working_directory=workdir, user=user,
        emulate_console=tty, console_size=(size[1], size[0]) if size else (0, 0),
        create_std_in_pipe=interactive, create_std_out_pipe=True,
        create_std_err_pipe=not tty))
    if p.exec_error:
        p.close()
        fail(f"{argv[0]}: {p.exec_error}", 127 if p.exec_errno == 2 else 126)
    sys.exit(attach(p, interactive, console=tty))


# -- stats and top ---------------------------------------------------------------------------


def _running() -> list[str]:
    get_containers()  # runs recovery for supervisors that died
    reg = Registry.open(Roots.resolve().db_path)
    return [str(r["id"]) for r in reg.query(
        "SELECT id FROM containers WHERE state IN ('running','paused') ORDER BY created")]


def _names(ids: list[str]) -> dict[str, str]:
    reg = Registry.open(Roots.resolve().db_path)
    return {cid: str(r["name"]) for cid in ids
            if (r := reg.query_one("SELECT name FROM containers WHERE id=?", (cid,)))}


def _sample(ids: list[str]) -> dict[str, tuple[Statistics, int]]:
    """Statistics and the number of processes of each container that still runs."""
    out = {}
    for cid in ids:
        try:
            c = open_container(cid)
            out[cid] = (c.statistics(), len(c.process_list()))
        except HcsError:
            continue  # it stopped (or went) since it was listed
    return out


def _cpu_percent(now: Statistics, before: Statistics | None) -> float | None:
    """CPU use between two samples, in percent of one CPU."""
    if before is None or now.timestamp is None or before.timestamp is None:
        return None
    wall = (now.timestamp - before.timestamp).total_seconds() * 1e7
    if wall <= 0:
        return None
    used = now.processor.total_runtime_100ns - before.processor.total_runtime_100ns
    return max(0.0, used / wall * 100)


def _stats_rows(ids: list[str], names: dict[str, str], now: dict[str, tuple[Statistics, int]],
                before: dict[str, tuple[Statistics, int]]) -> list[dict[str, Any]]:
    rows = []
    for cid in ids:
        if cid not in now:
            continue
        st, pids = now[cid]
        prev = before.get(cid)
        rows.append({"id": cid, "name": names.get(cid, ""),
                     "cpu_percent": _cpu_percent(st, prev[0] if prev else None),
                     "pids": pids, "statistics": st})
    return rows


def _stats_table(rows: list[dict[str, Any]]) -> Any:
    from rich.table import Table  # rich is imported only by the commands that draw

    table = Table(box=None, pad_edge=False)
    for title in ("CONTAINER ID", "NAME", "CPU %", "CPU TIME", "MEM USAGE", "MEM PEAK",
                  "BLOCK I/O", "NET I/O", "PIDS"):
        table.add_column(title, no_wrap=True)
    for r in rows:
        st: Statistics = r["statistics"]
        rx = sum(n.bytes_received for n in st.network)
        tx = sum(n.bytes_sent for n in st.network)
        cpu = "--" if r["cpu_percent"] is None else f"{r['cpu_percent']:.2f}%"
        table.add_row(
            r["id"][:12], r["name"][:19], cpu, _duration(st.processor.total_runtime_100ns),
            _size(st.memory.usage_commit_bytes), _size(st.memory.usage_commit_peak_bytes),
            f"{_size(st.storage.read_size_bytes)} / {_size(st.storage.write_size_bytes)}",
            f"{_size(rx)} / {_size(tx)}", str(r["pids"]))
    return table


def _stats_json(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{**r, "statistics": _full(r["statistics"])} for r in rows]


@click.command()
@click.option("--json", "as_json", is_flag=True,
              help="JSON output (with --stream: one array per line).")
@click.option("--stream/--no-stream", default=False,
              help="Refresh every second until interrupted (default: one snapshot).")
@click.argument("containers", nargs=-1)
def stats(as_json: bool, stream: bool, containers: tuple[str, ...]) -> None:
    """Resource use of CONTAINERS (default: every running one): CPU (percent of one CPU
    over the last interval, and total time), memory (now and peak), storage I/O (read /
    written), network I/O (received / sent) and the number of processes."""
    if containers:
        ids = [_open(ref, ("running", "paused"), "")[1] for ref in containers]
    else:
        ids = _running()
    before = _sample(ids)
    interval = 1.0 if stream else 0.5
    console = None
    live = None
    try:
        while True:
            if ids or stream:  # CPU use is measured over the interval
                time.sleep(interval)
            now = _sample(ids)
            rows = _stats_rows(ids, _names(ids), now, before)
            if as_json:
                if stream:
                    click.echo(json.dumps(_stats_json(rows)))
                else:
                    click.echo(json.dumps(_stats_json(rows), indent=2))
            elif not stream or not sys.stdout.isatty():
                console = console or _console()
                console.print(_stats_table(rows))  # a pipe gets one table per round
            else:
                if live is None:
                    from rich.live import Live

                    console = _console()
                    live = Live(_stats_table(rows), console=console, auto_refresh=False)
                    live.start()
                live.update(_stats_table(rows), refresh=True)
            if not stream or (containers and not now):
                return
            before = now
            if not containers:
                ids = _running()
    except KeyboardInterrupt:
        return
    finally:
        if live is not None:
            live.stop()


def _console() -> Any:
    from rich.console import Console

    # a pipe gets full rows, not rows folded to 80 columns
    return Console(width=None if sys.stdout.isatty() else 200, highlight=False)


@click.command()
@click.option("--json", "as_json", is_flag=True, help="JSON output.")
@click.argument("container")
def top(as_json: bool, container: str) -> None:
    """The processes of CONTAINER: pid (inside it), name, CPU time, memory, start time."""
    c, _cid, _state = _open(container, ("running", "paused"), "")
    items = sorted(c.process_list(), key=lambda i: i.process_id)
    if as_json:
        click.echo(json.dumps([_full(i) for i in items], indent=2))
        return
    click.echo(f"{'PID':<8}{'NAME':<17}{'TIME':<11}{'MEMORY':<11}{'PRIVATE':<11}STARTED")
    for i in items:
        started = "" if i.create_timestamp is None else (
            i.create_timestamp.astimezone().strftime("%Y-%m-%d %H:%M:%S"))
        click.echo(f"{i.process_id:<8}{i.image_name[:16]:<17}"
                   f"{_duration(i.user_time_100ns + i.kernel_time_100ns):<11}"
                   f"{_size(i.memory_commit_bytes):<11}"
                   f"{_size(i.memory_working_set_private_bytes):<11}{started}")


# -- state -----------------------------------------------------------------------------------


@click.command()
@click.argument("containers", nargs=-1, required=True)
def pause(containers: tuple[str, ...]) -> None:
    """Freeze every process of CONTAINERS (cgroup freezer)."""
    for ref in containers:
        c, _cid, _state = _open(ref, ("running",), "pause")
        c.pause()
        click.echo(ref)


@click.command()
@click.argument("containers", nargs=-1, required=True)
def resume(containers: tuple[str, ...]) -> None:
    """Thaw paused CONTAINERS."""
    for ref in containers:
        c, _cid, _state = _open(ref, ("paused",), "resume")
        c.resume()
        click.echo(ref)


@click.command()
@click.option("-t", "--time", "timeout", type=click.FloatRange(min=0), default=STOP_TIMEOUT,
              show_default=True, help="Seconds to wait before killing it.")
@click.argument("containers", nargs=-1, required=True)
def stop(timeout: float, containers: tuple[str, ...]) -> None:
    """Stop CONTAINERS: SIGTERM to the init process; after the timeout, SIGKILL to every
    process. Returns once each has stopped; a stopped one is left as it is."""
    for ref in containers:
        cid = resolve_container(ref)
        state = container_state(cid)["state"]
        c = open_container(cid)
        if state in ("running", "paused"):
            try:
                if state == "paused":
                    c.resume()  # a frozen init could not act on its SIGTERM
                c.shutdown()
                try:
                    c.wait(timeout)
                except ContainerTimeoutError:
                    c.terminate()
                    c.wait(_KILL_WAIT)
            except HcsError as e:
                if not is_already_stopped(e):
                    raise
        elif state == "created":
            c.shutdown()  # never started: recorded as stopped
        click.echo(ref)


def _signal_number(name: str) -> int:
    spec = name.strip().upper()
    if spec.isdigit():
        number = int(spec)
        if 0 < number < signal.NSIG:
            return number
    else:
        try:
            return int(signal.Signals[spec if spec.startswith("SIG") else "SIG" + spec])
        except KeyError:
            pass
    raise click.BadParameter(f"{name!r} is not a signal", param_hint="-s/--signal")


@click.command()
@click.option("-s", "--signal", "sig", default="KILL", show_default=True,
              help="Signal name or number.")
@click.argument("containers", nargs=-1, required=True)
def kill(sig: str, containers: tuple[str, ...]) -> None:
    """Send a signal to CONTAINERS. SIGKILL (the default) terminates every process of the
    container and returns once it has stopped; another signal goes to its init process
    only (pid 1, which the kernel shields from signals it has no handler for; a paused
    container receives it when resumed)."""
    signum = _signal_number(sig)
    for ref in containers:
        c, _cid, state = _open(ref, ("running", "paused"), "")
        try:
            if signum == signal.SIGKILL:
                if state == "paused":
                    c.resume()  # frozen processes would not die until thawed
                c.terminate()
                c.wait(_KILL_WAIT)
            else:
                c.open_process(1).signal(signum)
        except HcsError as e:
            if not is_already_stopped(e):
                raise
            raise click.ClickException(f"container {ref} is not running") from None
        click.echo(ref)


# -- logs ------------------------------------------------------------------------------------


@click.command()
@click.option("-f", "--follow", is_flag=True, help="Keep printing until the container stops.")
@click.argument("container")
def logs(follow: bool, container: str) -> None:
    """Print what CONTAINER's process wrote (stdout and stderr, in order) when it was started
    with ``pyhcs run -d``. The newest 1 to 2 MiB are kept, until the container is removed."""
    cid = resolve_container(container)
    run_dir = Roots.resolve().container_run_dir(cid)
    out = sys.stdout.buffer
    try:
        for chunk in read_log(run_dir):
            out.write(chunk)
    except FileNotFoundError:
        raise click.ClickException(
            f"container {container} keeps no log (`pyhcs run -d` starts containers that do)"
        ) from None
    out.flush()
    if follow:
        _follow(cid, run_dir / LOG_FILE)


def _follow(cid: str, path: os.PathLike[str]) -> None:
    """Print what is added to the log at *path* until the container stops (the supervisor
    completes the log before it records the end)."""
    out = sys.stdout.buffer
    f = open(path, "rb")  # noqa: SIM115
    try:
        f.seek(0, os.SEEK_END)
        while True:
            chunk = f.read(1 << 16)
            if chunk:
                out.write(chunk)
                out.flush()
                continue
            try:
                rotated = os.stat(path).st_ino != os.fstat(f.fileno()).st_ino
            except FileNotFoundError:
                rotated = False  # between the rename and the new file: the next look sees it
            if rotated:
                if chunk := f.read():  # written just before the rename
                    out.write(chunk)
                    out.flush()
                f.close()
                f = open(path, "rb")  # noqa: SIM115
                continue
            if container_state(cid)["state"] == "stopped":
                if chunk := f.read():
                    out.write(chunk)
                    out.flush()
                return
            time.sleep(0.1)
    except KeyboardInterrupt:
        return
    finally:
        f.close()


commands = [exec_, stats, top, pause, resume, stop, kill, logs]
