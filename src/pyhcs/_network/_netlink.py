"""The netlink side of the network service: bridges, veth pairs, addresses, routes, tc.

Everything here works on the network namespace of the *calling thread* (the "host" of the
service) unless a namespace fd is given. pyroute2's own netns support forks a helper for
every socket; instead a socket is opened while this thread is briefly inside the target
namespace (a netlink socket stays bound to the namespace it was created in), which costs
about a millisecond. Errors are raised as ``OSError`` / pyroute2's ``NetlinkError`` (an
``OSError``); the service translates them.
"""

from __future__ import annotations

import errno
import os
import socket
import struct
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from pyroute2 import IPRoute  # type: ignore[import-untyped]  # pyroute2 ships no types
from pyroute2.netlink.exceptions import NetlinkError  # type: ignore[import-untyped]

from pyhcs._linux import CLONE_NEWNET, setns

__all__ = [
    "NetlinkError",
    "current_netns_ino",
    "host",
    "in_netns",
    "ensure_bridge",
    "delete_link",
    "link_exists",
    "link_names",
    "index",
    "create_veth_into",
    "set_tbf",
    "link_stats",
    "set_ip_forward",
]

_local = threading.local()


def current_netns_ino() -> int:
    """The inode of the calling thread's network namespace (its identity)."""
    return os.stat("/proc/thread-self/ns/net").st_ino


@contextmanager
def host() -> Iterator[IPRoute]:
    """A netlink socket in the calling thread's current network namespace.

    Sockets are cached per thread and namespace: the service is often called repeatedly in
    one namespace (the bench and the CLI), and opening one costs about a millisecond.
    """
    cookie = _netns_cookie()
    if cookie is None:
        ipr = IPRoute()
        try:
            yield ipr
        finally:
            ipr.close()
        return
    key = (os.getpid(), cookie)
    cache: dict[tuple[int, int], IPRoute] = getattr(_local, "sockets", None) or {}
    _local.sockets = cache
    ipr = cache.get(key)
    if ipr is None:
        ipr = cache[key] = IPRoute()
    yield ipr


_SO_NETNS_COOKIE = 71


def _netns_cookie() -> int | None:
    """The calling thread's netns cookie: unlike its inode, never reused by a later netns."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
            raw = s.getsockopt(socket.SOL_SOCKET, _SO_NETNS_COOKIE, 8)
    except OSError:
        return None  # kernels before 5.14
    return int(struct.unpack("Q", raw)[0])


@contextmanager
def in_netns(fd: int) -> Iterator[IPRoute]:
    """A fresh netlink socket inside the namespace *fd*; the thread itself stays where it is."""
    back = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        setns(fd, CLONE_NEWNET)
        try:
            ipr = IPRoute()
        finally:
            setns(back, CLONE_NEWNET)
    finally:
        os.close(back)
    try:
        yield ipr
    finally:
        ipr.close()


def _index(ipr: IPRoute, name: str) -> int | None:
    # one RTM_GETLINK by name: link_lookup dumps every interface, which costs milliseconds
    # on a host with many endpoints
    try:
        (link,) = ipr.link("get", ifname=name)
    except NetlinkError as e:
        if e.code in (errno.ENODEV, errno.ENOENT):
            return None
        raise
    return int(link["index"])


def index(ipr: IPRoute, name: str) -> int | None:
    """The index of interface *name*, or None if it does not exist."""
    return _index(ipr, name)


def link_exists(ipr: IPRoute, name: str) -> bool:
    """True if interface *name* exists in *ipr*'s namespace."""
    return _index(ipr, name) is not None


def link_names(ipr: IPRoute) -> list[str]:
    """The names of every interface in *ipr*'s namespace."""
    return [str(link.get("ifname")) for link in ipr.get_links()]


def ensure_bridge(ipr: IPRoute, name: str, address: str, prefix_len: int) -> int:
    """Bridge *name* up with *address*/*prefix_len* (added if missing); returns its index."""
    idx = _index(ipr, name)
    if idx is None:
        try:
            ipr.link("add", ifname=name, kind="bridge")
        except NetlinkError as e:
            if e.code != errno.EEXIST:
                raise
        idx = _index(ipr, name)
        assert idx is not None
    if address:
        try:
            ipr.addr("add", index=idx, address=address, prefixlen=prefix_len)
        except NetlinkError as e:
            if e.code != errno.EEXIST:
                raise
    ipr.link("set", index=idx, state="up")
    return idx


def delete_link(ipr: IPRoute, name: str) -> bool:
    """Delete interface *name* (a veth takes its peer with it); False if it did not exist."""
    idx = _index(ipr, name)
    if idx is None:
        return False
    try:
        ipr.link("del", index=idx)
    except NetlinkError as e:
        if e.code in (errno.ENODEV, errno.ENOENT):
            return False
        raise
    return True


def create_veth_into(ipr: IPRoute, host_name: str, master: int | None, netns_fd: int,
                     peer_names: list[str], mac: str) -> str:
    """A veth pair: *host_name* here (enslaved to *master*, up), its peer inside *netns_fd*.

    The peer takes the first free name of *peer_names* (``eth0``, ``eth1``...) and *mac*;
    returns the name it got. If none is free, raises ``NetlinkError(EEXIST)``.
    """
    last: NetlinkError | None = None
    for name in peer_names:
        try:
            ipr.link("add", ifname=host_name, kind="veth",
                     peer={"ifname": name, "address": mac, "net_ns_fd": netns_fd})
        except NetlinkError as e:
            # EEXIST names the peer when the host name is free (the host name is ours)
            if e.code != errno.EEXIST or link_exists(ipr, host_name):
                raise
            last = e
            continue
        idx = _index(ipr, host_name)
        assert idx is not None
        if master is not None:
            ipr.link("set", index=idx, master=master, state="up")
        else:
            ipr.link("set", index=idx, state="up")
        return name
    assert last is not None
    raise last


def configure_inside(ipr: IPRoute, name: str, address: str, prefix_len: int,
                     gateway: str) -> None:
    """Inside a container's namespace: *name* up with its address, ``lo`` up, default route."""
    idx = _index(ipr, name)
    if idx is None:
        raise NetlinkError(errno.ENODEV, f"no interface {name}")
    if address:
        ipr.addr("add", index=idx, address=address, prefixlen=prefix_len)
    ipr.link("set", index=idx, state="up")
    lo = _index(ipr, "lo")
    if lo is not None:
        ipr.link("set", index=lo, state="up")
    if gateway:
        try:
            ipr.route("add", dst="0.0.0.0/0", gateway=gateway, oif=idx)
        except NetlinkError as e:
            # a second endpoint in the same namespace: the first one keeps the default route
            if e.code != errno.EEXIST:
                raise


def set_tbf(ipr: IPRoute, name: str, bytes_per_second: int) -> None:
    """Shape *name*'s egress to *bytes_per_second* with a token bucket (tbf) root qdisc."""
    idx = _index(ipr, name)
    if idx is None:
        raise NetlinkError(errno.ENODEV, f"no interface {name}")
    # burst must hold at least one timer tick of traffic at the rate (and one MTU-size
    # packet), or tbf cannot reach the rate; 10 ms of traffic is what tc's docs suggest.
    burst = max(bytes_per_second // 100, 16 * 1024)
    ipr.tc("replace", kind="tbf", index=idx, handle="1:", rate=bytes_per_second,
           burst=burst, latency=50_000)


def link_stats(ipr: IPRoute, name: str) -> dict[str, int] | None:
    """The 64-bit counters of *name* (rx/tx bytes, packets, dropped), or None if it is gone."""
    idx = _index(ipr, name)
    if idx is None:
        return None
    (link,) = ipr.get_links(idx)
    stats: Any = link.get("IFLA_STATS64") or link.get("IFLA_STATS") or {}
    keys = ("rx_bytes", "tx_bytes", "rx_packets", "tx_packets", "rx_dropped", "tx_dropped")
    return {k: int(stats.get(k, 0)) for k in keys}


def set_ip_forward() -> None:
    """Turn on IPv4 forwarding in the calling thread's namespace (the sysctl is per netns)."""
    path = "/proc/sys/net/ipv4/ip_forward"
    with open(path) as f:
        if f.read().strip() == "1":
            return
    with open(path, "w") as f:
        f.write("1")
