"""Fixtures for the network service: every test runs in network namespaces of its own.

The ``host`` fixture (autouse: no test here can forget it) moves the test's thread into a
fresh, unnamed network namespace that plays the host, so the service's bridges, veths and
nftables tables never touch the real machine's. ``make_ns`` makes more namespaces playing
containers or other machines. All of them are held by file descriptors only: closing the
descriptors at the end destroys them with everything in them.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import pytest
from pyroute2 import IPRoute  # type: ignore[import-untyped]

from pyhcs._linux import CLONE_NEWNET, setns, unshare
from pyhcs._paths import Roots


@dataclass
class Netns:
    """A network namespace held open by ``fd``; ``path`` names it for the service."""

    fd: int

    @property
    def path(self) -> str:
        return f"/proc/{os.getpid()}/fd/{self.fd}"

    @property
    def ino(self) -> int:
        return os.fstat(self.fd).st_ino


def _self_ns() -> int:
    return os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)


def _new_ns() -> Netns:
    back = _self_ns()
    try:
        unshare(CLONE_NEWNET)
        ns = Netns(_self_ns())
        with IPRoute() as ipr:
            ipr.link("set", index=ipr.link_lookup(ifname="lo")[0], state="up")
    finally:
        setns(back, CLONE_NEWNET)
        os.close(back)
    return ns


@contextmanager
def inside(ns: Netns) -> Iterator[None]:
    """Run the block with this thread in *ns* (sockets made there stay there)."""
    back = _self_ns()
    setns(ns.fd, CLONE_NEWNET)
    try:
        yield
    finally:
        setns(back, CLONE_NEWNET)
        os.close(back)


def run_in(ns: Netns, *argv: str, timeout: float = 20) -> subprocess.CompletedProcess[str]:
    """Run a command inside *ns*."""
    return subprocess.run(["nsenter", f"--net={ns.path}", *argv], capture_output=True,
                          text=True, timeout=timeout, check=False)


@pytest.fixture(autouse=True)
def host(roots: Roots) -> Iterator[Netns]:
    """A fresh network namespace playing the host; the test runs in it."""
    real = _self_ns()
    ns = _new_ns()
    assert ns.ino != os.fstat(real).st_ino
    setns(ns.fd, CLONE_NEWNET)
    try:
        yield ns
    finally:
        setns(real, CLONE_NEWNET)
        os.close(real)
        os.close(ns.fd)


@pytest.fixture
def make_ns(host: Netns) -> Iterator[Callable[[], Netns]]:
    """A factory of extra namespaces (containers, other machines), all closed at the end."""
    made: list[Netns] = []

    def make() -> Netns:
        ns = _new_ns()
        made.append(ns)
        return ns

    yield make
    for ns in made:
        os.close(ns.fd)


@dataclass
class Wire:
    """An "outside" machine joined to the host by a veth: ``outside`` is 192.0.2.2/24."""

    outside: Netns
    host_address: str = "192.0.2.1"
    outside_address: str = "192.0.2.2"


@pytest.fixture
def wire(make_ns: Callable[[], Netns]) -> Wire:
    """A namespace reachable from the host over a veth "wire" (TEST-NET-1 addresses)."""
    w = Wire(make_ns())
    with IPRoute() as ipr:
        ipr.link("add", ifname="wire0", kind="veth",
                 peer={"ifname": "wire0", "net_ns_fd": w.outside.fd})
        idx = ipr.link_lookup(ifname="wire0")[0]
        ipr.addr("add", index=idx, address=w.host_address, prefixlen=24)
        ipr.link("set", index=idx, state="up")
    with inside(w.outside), IPRoute() as ipr:
        idx = ipr.link_lookup(ifname="wire0")[0]
        ipr.addr("add", index=idx, address=w.outside_address, prefixlen=24)
        ipr.link("set", index=idx, state="up")
        ipr.route("add", dst="0.0.0.0/0", gateway=w.host_address)
    return w


def tcp_server(ns: Netns, port: int, address: str = "0.0.0.0") -> socket.socket:
    """A listening TCP socket inside *ns* (close it when done)."""
    with inside(ns):
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((address, port))
    s.listen(8)
    s.settimeout(10)
    return s


def udp_socket(ns: Netns) -> socket.socket:
    with inside(ns):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.settimeout(10)
    return s


def tcp_client(ns: Netns) -> socket.socket:
    with inside(ns):
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.settimeout(10)
    return s


def interface_names() -> set[str]:
    """The names of the current namespace's interfaces."""
    with IPRoute() as ipr:
        return {str(link.get("ifname")) for link in ipr.get_links()}


def nft_table_names() -> set[str]:
    """The names of the current namespace's nftables tables."""
    out = subprocess.run(["nft", "list", "tables"], capture_output=True, text=True, check=True)
    return {line.split()[-1] for line in out.stdout.splitlines() if line.strip()}


def killed_in(monkeypatch: pytest.MonkeyPatch, module: Any, name: str,
              action: Callable[[], Any]) -> None:
    """Run *action* in a child that is SIGKILLed right after *module.name* has run."""
    real = getattr(module, name)

    def then_die(*a: Any, **kw: Any) -> Any:
        real(*a, **kw)
        os.kill(os.getpid(), signal.SIGKILL)

    pid = os.fork()
    if pid == 0:
        try:
            monkeypatch.setattr(module, name, then_die)
            action()
        finally:
            os._exit(0)
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """``pyhcs ARGV...`` in this process: its exit code, stdout and stderr."""
    from pyhcs._cli import main

    try:
        main(list(argv))
        code = 0
    except SystemExit as e:
        code = int(e.code or 0)
    out, err = capsys.readouterr()
    return code, out, err
