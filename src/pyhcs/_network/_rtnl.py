"""A few rtnetlink requests on a raw socket: the fast path of plugging in a veth endpoint.

pyroute2 spends about a millisecond of Python per request (it runs an asyncio loop for
each, and building an ``IPRoute`` costs more); attaching an endpoint takes a dozen of
them. The handful of messages attach needs are simple to build with :mod:`struct`, and
on a plain ``AF_NETLINK`` socket one costs tens of microseconds. They are also fewer: the
veth pair is created with its master, MAC, namespace and the host end up in one request.

Errors are ``OSError`` with the kernel's errno, for the service to translate.
"""

from __future__ import annotations

import errno
import ipaddress
import os
import socket
import struct
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

from pyhcs._linux import CLONE_NEWNET, setns

__all__ = ["plug_veth", "bridge_nf_call_iptables"]

# <linux/netlink.h>, <linux/rtnetlink.h>, <linux/if_link.h>, <linux/veth.h>
_NLMSG_ERROR = 2
_NLM_F_REQUEST, _NLM_F_ACK, _NLM_F_EXCL, _NLM_F_CREATE = 0x1, 0x4, 0x200, 0x400
_RTM_NEWLINK, _RTM_GETLINK, _RTM_NEWADDR, _RTM_NEWROUTE = 16, 18, 20, 24
_IFLA_ADDRESS, _IFLA_IFNAME, _IFLA_MTU, _IFLA_MASTER = 1, 3, 4, 10
_IFLA_OPERSTATE, _IFLA_LINKINFO, _IFLA_NET_NS_FD = 16, 18, 28
_IF_OPER_UP = 6
_IFLA_INFO_KIND, _IFLA_INFO_DATA, _VETH_INFO_PEER = 1, 2, 1
_IFLA_BR_NF_CALL_IPTABLES = 36
_IFA_ADDRESS, _IFA_LOCAL, _IFA_BROADCAST = 1, 2, 4
_RTA_OIF, _RTA_GATEWAY = 4, 5
_IFF_UP = 0x1
_NLA_F_NESTED = 0x8000
_LOOPBACK_IFINDEX = 1  # lo is interface 1 in every network namespace
_CARRIER_WAIT = 1.0  # seconds; the kernel takes microseconds unless badly overloaded

_NLMSGHDR = struct.Struct("=IHHII")
_IFINFOMSG = struct.Struct("=BxHiII")
_IFADDRMSG = struct.Struct("=BBBBi")
_RTMSG = struct.Struct("=BBBBBBBBI")


def _attr(kind: int, data: bytes) -> bytes:
    length = 4 + len(data)
    return struct.pack("=HH", length, kind) + data + b"\0" * (-length % 4)


def _nested(kind: int, *attrs: bytes) -> bytes:
    return _attr(kind | _NLA_F_NESTED, b"".join(attrs))


def _name(name: str) -> bytes:
    return name.encode() + b"\0"


def _ifinfo(index: int = 0, up: bool = False) -> bytes:
    return _IFINFOMSG.pack(socket.AF_UNSPEC, 0, index, _IFF_UP if up else 0,
                           _IFF_UP if up else 0)


class _Rtnl:
    """A ``NETLINK_ROUTE`` socket in the namespace it was opened in."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC,
                                  socket.NETLINK_ROUTE)
        self.sock.bind((0, 0))
        self.seq = 0

    def close(self) -> None:
        self.sock.close()

    def request(self, kind: int, flags: int, body: bytes) -> bytes:
        """Send one request and wait for its acknowledgement; the reply's payload, if any."""
        self.seq += 1
        seq = self.seq
        msg = _NLMSGHDR.pack(_NLMSGHDR.size + len(body), kind,
                             _NLM_F_REQUEST | _NLM_F_ACK | flags, seq, 0) + body
        self.sock.send(msg)
        payload = b""
        while True:
            data = self.sock.recv(65536)
            offset = 0
            while offset + _NLMSGHDR.size <= len(data):
                length, mtype, _, mseq, _ = _NLMSGHDR.unpack_from(data, offset)
                if length < _NLMSGHDR.size:
                    raise OSError(errno.EPROTO, "truncated netlink message")
                if mseq == seq:
                    if mtype == _NLMSG_ERROR:
                        (code,) = struct.unpack_from("=i", data, offset + _NLMSGHDR.size)
                        if code:
                            raise OSError(-code, os.strerror(-code))
                        return payload
                    payload = data[offset + _NLMSGHDR.size:offset + length]
                offset += (length + 3) & ~3

    def _getlink(self, body: bytes) -> bytes | None:
        try:
            return self.request(_RTM_GETLINK, 0, body)
        except OSError as e:
            if e.errno in (errno.ENODEV, errno.ENOENT):
                return None
            raise

    def index(self, name: str) -> int | None:
        """The index of interface *name*, or None if there is none."""
        reply = self._getlink(_ifinfo() + _attr(_IFLA_IFNAME, _name(name)))
        return None if reply is None else int(_IFINFOMSG.unpack_from(reply)[2])

    def operstate(self, index: int) -> int | None:
        """The RFC 2863 operational state of interface *index* (None if it is gone)."""
        reply = self._getlink(_ifinfo(index))
        if reply is None:
            return None
        offset = _IFINFOMSG.size
        while offset + 4 <= len(reply):
            length, kind = struct.unpack_from("=HH", reply, offset)
            if length < 4:
                break
            if kind & ~_NLA_F_NESTED == _IFLA_OPERSTATE:
                return int(reply[offset + 4])
            offset += (length + 3) & ~3
        return None

    def wait_running(self, index: int, deadline: float) -> None:
        """Wait until the kernel has processed interface *index*'s carrier (until then its
        queue drops packets and a bridge port forwards nothing), or *deadline* passes."""
        while self.operstate(index) not in (_IF_OPER_UP, None):
            if time.monotonic() > deadline:
                return
            time.sleep(0.0002)


@contextmanager
def _socket_in(netns_fd: int) -> Iterator[_Rtnl]:
    """A socket opened inside *netns_fd* (the calling thread returns at once)."""
    back = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        setns(netns_fd, CLONE_NEWNET)
        try:
            rt = _Rtnl()
        finally:
            setns(back, CLONE_NEWNET)
    finally:
        os.close(back)
    try:
        yield rt
    finally:
        rt.close()


def _create_veth(rt: _Rtnl, host_name: str, master: int, netns_fd: int,
                 peer_names: Sequence[str], mac: bytes, mtu: int) -> str:
    mtu_attr = _attr(_IFLA_MTU, struct.pack("=I", mtu)) if mtu else b""
    for name in peer_names:
        # the peer cannot be made up here: veth refuses to open before both ends exist
        peer = (_ifinfo() + _attr(_IFLA_IFNAME, _name(name)) + _attr(_IFLA_ADDRESS, mac)
                + _attr(_IFLA_NET_NS_FD, struct.pack("=I", netns_fd)) + mtu_attr)
        body = (_ifinfo(up=True) + _attr(_IFLA_IFNAME, _name(host_name)) + mtu_attr
                + _attr(_IFLA_MASTER, struct.pack("=I", master))
                + _nested(_IFLA_LINKINFO, _attr(_IFLA_INFO_KIND, _name("veth")),
                          _nested(_IFLA_INFO_DATA, _attr(_VETH_INFO_PEER, peer))))
        try:
            rt.request(_RTM_NEWLINK, _NLM_F_CREATE | _NLM_F_EXCL, body)
        except OSError as e:
            # EEXIST names the peer when the host name is free (the host name is ours)
            if e.errno != errno.EEXIST or rt.index(host_name) is not None:
                raise
            continue
        return name
    raise OSError(errno.EEXIST, f"no free interface name ({peer_names[0]}...) in the namespace")


def _configure_inside(rt: _Rtnl, name: str, address: str, prefix_len: int,
                      gateway: str) -> int:
    idx = rt.index(name)
    if idx is None:
        raise OSError(errno.ENODEV, f"no interface {name}")
    if address:
        addr = ipaddress.IPv4Address(address)
        iface = ipaddress.IPv4Interface(f"{address}/{prefix_len}")
        attrs = _attr(_IFA_LOCAL, addr.packed) + _attr(_IFA_ADDRESS, addr.packed)
        if prefix_len < 31:
            attrs += _attr(_IFA_BROADCAST, iface.network.broadcast_address.packed)
        rt.request(_RTM_NEWADDR, _NLM_F_CREATE | _NLM_F_EXCL,
                   _IFADDRMSG.pack(socket.AF_INET, prefix_len, 0, 0, idx) + attrs)
    rt.request(_RTM_NEWLINK, 0, _ifinfo(idx, up=True))
    rt.request(_RTM_NEWLINK, 0, _ifinfo(_LOOPBACK_IFINDEX, up=True))
    if gateway:
        body = (_RTMSG.pack(socket.AF_INET, 0, 0, 0, 254, 3, 0, 1, 0)  # main, boot, unicast
                + _attr(_RTA_GATEWAY, ipaddress.IPv4Address(gateway).packed)
                + _attr(_RTA_OIF, struct.pack("=I", idx)))
        try:
            rt.request(_RTM_NEWROUTE, _NLM_F_CREATE | _NLM_F_EXCL, body)
        except OSError as e:
            # a second endpoint in the same namespace: the first one keeps the default route
            if e.errno != errno.EEXIST:
                raise
    return idx


def plug_veth(bridge: str, host_name: str, netns_fd: int, peer_names: Sequence[str],
              mac: str, address: str, prefix_len: int, gateway: str, mtu: int = 0) -> str:
    """Plug a veth pair between *bridge* (here) and the namespace *netns_fd*.

    ``host_name`` joins *bridge*, up; its peer appears inside under the first free name of
    *peer_names*, with *mac* (``aa:bb:..``), up, with *address*/*prefix_len*, ``lo`` up and
    a default route via *gateway* (unless the namespace has one). Returns the peer's name.
    Raises ``OSError`` (``ENODEV`` if *bridge* is missing); the caller removes the pair
    (deleting ``host_name``) if anything after its creation failed.
    """
    mac_bytes = bytes.fromhex(mac.replace(":", "").replace("-", ""))
    rt = _Rtnl()
    try:
        master = rt.index(bridge)
        if master is None:
            raise OSError(errno.ENODEV, f"the network's bridge {bridge} is missing "
                          "(run pyhcs network restore)")
        name = _create_veth(rt, host_name, master, netns_fd, peer_names, mac_bytes, mtu)
        with _socket_in(netns_fd) as inner:
            idx = _configure_inside(inner, name, address, prefix_len, gateway)
            # the carrier of a new veth is taken into account by the kernel's linkwatch
            # worker, asynchronously: a container's first packets would otherwise be lost
            # now and then (a TCP connect then takes a second, its SYN retransmitted)
            deadline = time.monotonic() + _CARRIER_WAIT
            inner.wait_running(idx, deadline)
        host_idx = rt.index(host_name)
        if host_idx is not None:
            rt.wait_running(host_idx, deadline)
    finally:
        rt.close()
    return name


def bridge_nf_call_iptables(bridge: str) -> bool:
    """Send *bridge*'s bridged IPv4 through the ``ip`` netfilter hooks (and conntrack).

    The per-bridge form of ``net.bridge.bridge-nf-call-iptables``. Returns False if the
    bridge does not exist.
    """
    rt = _Rtnl()
    try:
        idx = rt.index(bridge)
        if idx is None:
            return False
        rt.request(_RTM_NEWLINK, 0, _ifinfo(idx) + _nested(
            _IFLA_LINKINFO, _attr(_IFLA_INFO_KIND, _name("bridge")),
            _nested(_IFLA_INFO_DATA, _attr(_IFLA_BR_NF_CALL_IPTABLES, b"\x01"))))
        return True
    finally:
        rt.close()
