"""What the ``pyhcs`` commands share: failing in one line, finding a container by what the
user typed, and attaching the terminal to a process (stdio, signals, console size)."""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import sys
import termios
import threading
import tty
from collections.abc import Callable, Iterator
from typing import IO

import click

from .._compute import Process
from .._errors import HcsError
from .._paths import Roots
from .._registry import Registry

__all__ = ["EXIT_PYHCS_ERROR", "attach", "fail", "parse_env", "pump", "resolve_container",
           "terminal_size"]

EXIT_PYHCS_ERROR = 125


def fail(message: str, code: int = EXIT_PYHCS_ERROR) -> None:
    """Print ``pyhcs: message`` on stderr and exit with *code*."""
    click.echo(f"pyhcs: {message}", err=True)
    sys.exit(code)


def resolve_container(ref: str) -> str:
    """A container id from an id, a unique id prefix, or a name."""
    reg = Registry.open(Roots.resolve().db_path)
    rows = reg.query("SELECT id FROM containers WHERE id=? OR name=?", (ref, ref))
    if not rows and len(ref) >= 3:
        rows = reg.query("SELECT id FROM containers WHERE id LIKE ? ESCAPE '\\'",
                         (ref.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
                          + "%",))
    if not rows:
        raise click.ClickException(f"no such container: {ref}")
    if len(rows) > 1:
        raise click.ClickException(f"{ref} matches {len(rows)} containers; be more specific")
    return str(rows[0]["id"])


def parse_env(items: tuple[str, ...]) -> dict[str, str]:
    """``-e`` options as an environment: ``K=V``, or ``K`` alone for our own value of K."""
    environment = {}
    for item in items:
        k, sep, v = item.partition("=")
        if not sep:
            v = os.environ.get(k, "")
        environment[k] = v
    return environment


def pump(src: IO[bytes], dst: IO[bytes]) -> None:
    """Copy *src* to *dst* until *src* ends, then close *src*. A pty's end (EIO) is an end;
    if *dst* goes away (a closed pipe) the rest is dropped."""
    fd = src.fileno()
    out = dst.fileno()
    try:
        while True:
            try:
                chunk = os.read(fd, 1 << 16)
            except OSError as e:
                if e.errno == errno.EIO:  # the last holder of the pty's other side left
                    break
                raise
            if not chunk:
                break
            view = memoryview(chunk)
            try:
                while view:
                    n = os.write(out, view)
                    view = view[n:]
            except OSError:
                break
    finally:
        src.close()


def terminal_size() -> tuple[int, int] | None:
    """(columns, lines) of the terminal on stdout, else stdin; None if neither is one."""
    for f in (sys.stdout, sys.stdin):
        try:
            size = os.get_terminal_size(f.fileno())
        except (OSError, ValueError):
            continue
        return size.columns, size.lines
    return None


@contextlib.contextmanager
def _raw_stdin(wanted: bool) -> Iterator[None]:
    """The local terminal in raw mode for the block (keys go to the container's pty as
    typed, ^C included), if *wanted* and stdin is a terminal."""
    if not wanted or not sys.stdin.isatty():
        yield
        return
    fd = sys.stdin.fileno()
    saved = termios.tcgetattr(fd)
    tty.setraw(fd)
    try:
        yield
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


def attach(p: Process, interactive: bool, console: bool = False) -> int:
    """Stream *p*'s output to ours (and, if *interactive*, our stdin to it) until it exits;
    return its exit code. SIGINT, SIGTERM and SIGHUP are forwarded to it; with *console*
    (a pty) so is every change of our terminal's size (SIGWINCH), and a terminal on our
    stdin is raw while it runs (keys reach the process as typed)."""

    def forward(signum: int, _frame: object) -> None:
        try:
            p.signal(signum)
        except HcsError:
            pass

    def resize(_signum: int, _frame: object) -> None:
        size = terminal_size()
        if size is not None:
            try:
                p.resize_console(*size)
            except HcsError:
                pass

    handlers: dict[signal.Signals, Callable[[int, object], None]] = {
        signal.SIGINT: forward, signal.SIGTERM: forward, signal.SIGHUP: forward}
    if console:
        handlers[signal.SIGWINCH] = resize
    stdin, stdout, stderr = p.stdio()
    threads = []
    with _raw_stdin(console and interactive):
        # The copying threads start with these signals blocked (threads inherit the mask),
        # so the kernel delivers them to the main thread: a Python handler runs only there,
        # and a signal that woke another thread would wait until the process ends.
        old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, handlers)
        try:
            for s, handler in handlers.items():
                signal.signal(s, handler)
            for src, dst in ((stdout, sys.stdout.buffer), (stderr, sys.stderr.buffer)):
                if src is not None:
                    t = threading.Thread(target=pump, args=(src, dst), daemon=True)
                    t.start()
                    threads.append(t)
            if interactive and stdin is not None:
                def feed() -> None:
                    try:
                        pump(sys.stdin.buffer, stdin)
                    except OSError:
                        pass
                    try:
                        p.close_stdin()
                    except HcsError:
                        pass
                threading.Thread(target=feed, daemon=True).start()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
        code = p.wait()
        for t in threads:
            t.join()
    p.close()
    return code
