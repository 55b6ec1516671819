"""The netlink side of the network service: bridges, veths, macvlans, VXLAN, addresses, routes, tc.

Everything here works on the network namespace of the *calling thread* (the "host" of the
service) unless a namespace fd is given. pyroute2's own netns support forks a helper for
every socket; instead a socket is opened while this thread is briefly inside the target
namespace (a netlink socket stays bound to the namespace it was created in), which costs
about a millisecond. Errors are raised as ``OSError`` / pyroute2's ``NetlinkError`` (an
``OSError``); the service translates them.
"""

from __future__ import annotations

import errno
import json
import os
import socket
import struct
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
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
    "LinkInfo",
    "link_info",
    "UplinkState",
    "capture_uplink",
    "take_uplink",
    "give_back_uplink",
    "set_link_up",
    "create_macvlan_into",
    "delete_links_with_mac",
    "ensure_vxlan",
    "add_remote",
    "delete_remote",
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


def _get_link(ipr: IPRoute, name: str) -> Any | None:
    # one RTM_GETLINK by name: link_lookup dumps every interface, which costs milliseconds
    # on a host with many endpoints
    try:
        (link,) = ipr.link("get", ifname=name)
    except NetlinkError as e:
        if e.code in (errno.ENODEV, errno.ENOENT):
            return None
        raise
    return link


def _index(ipr: IPRoute, name: str) -> int | None:
    link = _get_link(ipr, name)
    return None if link is None else int(link["index"])


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
                     peer_names: list[str], mac: str, mtu: int = 0) -> str:
    """A veth pair: *host_name* here (enslaved to *master*, up), its peer inside *netns_fd*.

    The peer takes the first free name of *peer_names* (``eth0``, ``eth1``...) and *mac*;
    returns the name it got. If none is free, raises ``NetlinkError(EEXIST)``. A nonzero
    *mtu* is set on both ends (an overlay's bridge carries smaller frames than 1500).
    """
    last: NetlinkError | None = None
    extra: dict[str, Any] = {"mtu": mtu} if mtu else {}
    for name in peer_names:
        try:
            ipr.link("add", ifname=host_name, kind="veth", **extra,
                     peer={"ifname": name, "address": mac, "net_ns_fd": netns_fd, **extra})
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
    # burst must hold at least one timer tick of traffic at the rate and one whole packet
    # (a veth sends TCP as GSO packets of up to 64 KiB), or tbf cannot reach the rate.
    # 50 ms of traffic: tokens that accumulate while a busy machine delays the qdisc's
    # dequeues are then spent, not lost, so the rate holds; what the endpoint can send
    # above the rate is one such burst, a 5% excess over a second.
    burst = max(bytes_per_second // 20, 96 * 1024)
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


# --------------------------------------------------------------------------- uplinks

_IFF_UP = 0x1
_RT_TABLE_LOCAL = 255
_RTPROT_KERNEL = 2
_RT_SCOPE_LINK = 253
# the address flags a user sets: nodad, homeaddress, mngtmpaddr, noprefixroute, autojoin
# (not secondary, tentative, permanent..., which the kernel decides)
_IFA_USER_FLAGS = 0x02 | 0x10 | 0x100 | 0x200 | 0x400


@dataclass
class LinkInfo:
    """What the service needs to know of an interface."""

    index: int
    up: bool
    mac: str
    mtu: int
    master: int | None
    kind: str


def link_info(ipr: IPRoute, name: str) -> LinkInfo | None:
    """The interface *name*'s index, admin state, MAC, MTU, master and kind; None if absent."""
    link = _get_link(ipr, name)
    if link is None:
        return None
    info = link.get_attr("IFLA_LINKINFO")
    kind = str(info.get_attr("IFLA_INFO_KIND") or "") if info is not None else ""
    return LinkInfo(index=int(link["index"]), up=bool(link["flags"] & _IFF_UP),
                    mac=str(link.get_attr("IFLA_ADDRESS") or ""),
                    mtu=int(link.get_attr("IFLA_MTU") or 0),
                    master=link.get_attr("IFLA_MASTER"), kind=kind)


@dataclass
class UplinkState:
    """An uplink as it was before a network took it: what giving it back restores.

    ``addresses`` are the IPv4 addresses and the IPv6 ones that are not link-local (the
    kernel makes those itself); ``routes`` are the routes through it that the kernel does
    not derive from an address (static, boot, DHCP...), in every table but ``local``.
    Each is a dict of pyroute2 arguments, so it round-trips through JSON.
    """

    name: str
    up: bool
    addresses: list[dict[str, Any]] = field(default_factory=list)
    routes: list[dict[str, Any]] = field(default_factory=list)

    def to_json(self) -> str:
        """The state as JSON (what the service keeps in the network's run directory)."""
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> UplinkState:
        """The state :meth:`to_json` wrote."""
        d = json.loads(text)
        return cls(name=str(d["name"]), up=bool(d["up"]), addresses=list(d["addresses"]),
                   routes=list(d["routes"]))


def capture_uplink(ipr: IPRoute, name: str) -> UplinkState:
    """The current state of uplink *name*; ``NetlinkError(ENODEV)`` if it does not exist."""
    info = link_info(ipr, name)
    if info is None:
        raise NetlinkError(errno.ENODEV, f"no interface {name}")
    addresses = []
    for a in ipr.addr("dump", index=info.index):
        if a["family"] == socket.AF_INET6 and a["scope"] == _RT_SCOPE_LINK:
            continue
        entry: dict[str, Any] = {"address": a.get_attr("IFA_LOCAL") or a.get_attr("IFA_ADDRESS"),
                                 "prefixlen": int(a["prefixlen"]), "family": int(a["family"])}
        if a.get_attr("IFA_BROADCAST"):
            entry["broadcast"] = a.get_attr("IFA_BROADCAST")
        label = a.get_attr("IFA_LABEL")
        if label and label != name:
            entry["label"] = label  # an alias ("eth0:1") keeps its label when given back
        flags = a.get_attr("IFA_FLAGS")
        if flags and int(flags) & _IFA_USER_FLAGS:
            entry["IFA_FLAGS"] = int(flags) & _IFA_USER_FLAGS
        if a["scope"]:
            entry["scope"] = int(a["scope"])
        addresses.append(entry)
    routes = []
    for family in (socket.AF_INET, socket.AF_INET6):
        for r in ipr.route("dump", family=family):
            if (r.get_attr("RTA_OIF") != info.index or r["proto"] == _RTPROT_KERNEL
                    or r.get_attr("RTA_TABLE") == _RT_TABLE_LOCAL or r["type"] != 1):
                continue
            dst = r.get_attr("RTA_DST")
            route: dict[str, Any] = {
                "family": family,
                "dst": f"{dst}/{r['dst_len']}" if dst else
                ("0.0.0.0/0" if family == socket.AF_INET else "::/0"),
                "table": int(r.get_attr("RTA_TABLE") or r["table"]),
                "proto": int(r["proto"]), "scope": int(r["scope"]),
            }
            for attr, key in (("RTA_GATEWAY", "gateway"), ("RTA_PRIORITY", "priority"),
                              ("RTA_PREFSRC", "prefsrc")):
                if r.get_attr(attr) is not None:
                    route[key] = r.get_attr(attr)
            routes.append(route)
    return UplinkState(name=name, up=info.up, addresses=addresses, routes=routes)


def _ignore(codes: tuple[int, ...], call: Any, *args: Any, **kwargs: Any) -> None:
    try:
        call(*args, **kwargs)
    except NetlinkError as e:
        if e.code not in codes:
            raise


def _add_addresses(ipr: IPRoute, index: int, state: UplinkState, keep_labels: bool) -> None:
    for a in state.addresses:
        args = dict(a)
        if not keep_labels:
            args.pop("label", None)
        _ignore((errno.EEXIST,), ipr.addr, "add", index=index, **args)


def _add_routes(ipr: IPRoute, index: int, state: UplinkState) -> None:
    for r in state.routes:
        # a route whose gateway went away with the host's other changes is not worth failing
        # the whole operation for; everything else is
        _ignore((errno.EEXIST, errno.ENETUNREACH), ipr.route, "add", oif=index, **r)


def take_uplink(ipr: IPRoute, state: UplinkState, bridge: str) -> int:
    """Make *bridge* (created if missing) the uplink's master and move *state*'s addresses
    and routes to it, so the host keeps its connectivity through the bridge.

    The bridge takes the uplink's MAC (the host's neighbours keep a valid ARP entry) and
    the uplink is set up. Safe to repeat. Returns the bridge's index.
    """
    info = link_info(ipr, state.name)
    if info is None:
        raise NetlinkError(errno.ENODEV, f"no interface {state.name}")
    br = link_info(ipr, bridge)
    if br is None:
        _ignore((errno.EEXIST,), ipr.link, "add", ifname=bridge, kind="bridge",
                address=info.mac)
        br = link_info(ipr, bridge)
        assert br is not None
    for a in state.addresses:
        _ignore((errno.EADDRNOTAVAIL, errno.ENOENT, errno.ESRCH), ipr.addr, "del",
                index=info.index, address=a["address"], prefixlen=a["prefixlen"])
    for r in state.routes:
        # IPv4 drops these with the addresses, IPv6 keeps them on the port
        _ignore((errno.ESRCH, errno.ENOENT), ipr.route, "del", oif=info.index, **r)
    if info.master != br.index:
        ipr.link("set", index=info.index, master=br.index)
    ipr.link("set", index=info.index, state="up")
    ipr.link("set", index=br.index, state="up")
    _add_addresses(ipr, br.index, state, keep_labels=False)
    _add_routes(ipr, br.index, state)
    return br.index


def give_back_uplink(ipr: IPRoute, state: UplinkState, bridge: str = "") -> None:
    """Undo :func:`take_uplink` (or :func:`set_link_up`): delete *bridge* if given, then put
    *state*'s addresses, routes and admin state back on the uplink. Safe to repeat; an
    uplink that is gone is left alone."""
    if bridge:
        delete_link(ipr, bridge)
    info = link_info(ipr, state.name)
    if info is None:
        return
    if info.master is not None and bridge:
        ipr.link("set", index=info.index, master=0)
    # IPv4 drops an interface's routes when it goes down: up first when it was up, and
    # a down uplink had no routes to give back
    if state.up:
        ipr.link("set", index=info.index, state="up")
        _add_addresses(ipr, info.index, state, keep_labels=True)
        _add_routes(ipr, info.index, state)
    else:
        _add_addresses(ipr, info.index, state, keep_labels=True)
        ipr.link("set", index=info.index, state="down")


def set_link_up(ipr: IPRoute, name: str) -> None:
    """Set interface *name* up (``NetlinkError(ENODEV)`` if it does not exist)."""
    idx = _index(ipr, name)
    if idx is None:
        raise NetlinkError(errno.ENODEV, f"no interface {name}")
    ipr.link("set", index=idx, state="up")


# --------------------------------------------------------------------------- macvlan


def create_macvlan_into(ipr: IPRoute, host_name: str, uplink: str, netns_fd: int,
                        names: list[str], mac: str) -> str:
    """A macvlan (bridge mode) of *uplink* with *mac*, moved into *netns_fd*.

    It is made here as *host_name* first, so a creator killed half way leaves a name
    recovery knows, then moved and renamed in one step to the first free name of *names*;
    returns the name it got (``NetlinkError(EEXIST)`` if none is free).
    """
    up = _index(ipr, uplink)
    if up is None:
        raise NetlinkError(errno.ENODEV, f"the uplink {uplink} is missing")
    ipr.link("add", ifname=host_name, kind="macvlan", link=up, macvlan_mode="bridge",
             address=mac)
    idx = _index(ipr, host_name)
    assert idx is not None
    last: NetlinkError | None = None
    for name in names:
        try:
            ipr.link("set", index=idx, net_ns_fd=netns_fd, ifname=name)
        except NetlinkError as e:
            if e.code != errno.EEXIST:
                raise
            last = e
            continue
        return name
    assert last is not None
    raise last


def delete_links_with_mac(ipr: IPRoute, mac: str) -> int:
    """Delete every interface of *ipr*'s namespace whose MAC is *mac*; returns how many."""
    n = 0
    for link in ipr.get_links():
        if str(link.get_attr("IFLA_ADDRESS") or "").lower() == mac.lower():
            _ignore((errno.ENODEV, errno.ENOENT), ipr.link, "del", index=link["index"])
            n += 1
    return n


# --------------------------------------------------------------------------- VXLAN

#: The IANA port of VXLAN.
VXLAN_PORT = 4789
_NTF_SELF = 0x02


def ensure_vxlan(ipr: IPRoute, name: str, vni: int, bridge: str, uplink: str = "") -> int:
    """VXLAN device *name* for *vni* (UDP 4789) up in *bridge* (both created if missing).

    Learning is off and ARP proxying on: remote endpoints are static FDB and neighbour
    entries (:func:`add_remote`), so nothing is flooded to the underlay. With *uplink*
    the tunnel is bound to it (and its MTU follows it). Returns the VXLAN device's MTU.
    """
    br = ensure_bridge(ipr, bridge, "", 0)
    info = link_info(ipr, name)
    if info is None:
        extra: dict[str, Any] = {}
        if uplink:
            up = _index(ipr, uplink)
            if up is None:
                raise NetlinkError(errno.ENODEV, f"the uplink {uplink} is missing")
            extra["vxlan_link"] = up
        _ignore((errno.EEXIST,), ipr.link, "add", ifname=name, kind="vxlan", vxlan_id=vni,
                vxlan_port=VXLAN_PORT, vxlan_learning=0, vxlan_proxy=1, **extra)
        info = link_info(ipr, name)
        assert info is not None
    ipr.link("set", index=info.index, master=br, state="up")
    return info.mtu


def add_remote(ipr: IPRoute, vxlan: str, mac: str, ip: str, provider_address: str) -> None:
    """A remote endpoint: frames for *mac* go to the host at *provider_address*, and ARP
    requests for *ip* are answered with *mac* by the VXLAN device itself."""
    idx = _index(ipr, vxlan)
    if idx is None:
        raise NetlinkError(errno.ENODEV, f"no interface {vxlan}")
    # NTF_SELF: the VXLAN device's own table (where dst lives), not the bridge's
    ipr.fdb("replace", ifindex=idx, lladdr=mac, dst=provider_address, state="permanent",
            flags=_NTF_SELF)
    if ip:
        ipr.neigh("replace", dst=ip, lladdr=mac, ifindex=idx, state="permanent")


def delete_remote(ipr: IPRoute, vxlan: str, mac: str, ip: str) -> None:
    """Remove what :func:`add_remote` added (nothing happens for what is gone)."""
    idx = _index(ipr, vxlan)
    if idx is None:
        return
    gone = (errno.ENOENT, errno.ENODEV, errno.ESRCH)
    _ignore(gone, ipr.fdb, "del", ifindex=idx, lladdr=mac, flags=_NTF_SELF)
    if ip:
        _ignore(gone, ipr.neigh, "del", dst=ip, lladdr=mac, ifindex=idx)
