"""The host network service: networks, endpoints, IPAM and attachments, kept in the registry.

The registry is the truth; kernel objects (bridges, veths, nftables tables) are derived
from it and named after the ids they belong to, so recovery and :func:`restore` can
rebuild or remove them. Every change follows one order: the registry row first, marked
as in progress with its owner (pid and start time), then the kernel objects, then the row
marked done. A creator killed half way leaves a row whose owner is dead, and
:func:`recover` finishes the job by undoing it. IP and MAC allocations are made inside
one ``BEGIN IMMEDIATE`` transaction, so concurrent creators (threads or processes) never
hand out the same address.

Kernel objects are made in the network namespace of the calling thread: that namespace is
the "host" of the networks (tests run the service inside a namespace of their own).

How each HNS network type is made on Linux (HNS's own drivers are Hyper-V switch modes):

* ``nat``: bridge ``phbr<id>`` holding the gateway address, masquerade and port mappings
  in nftables.
* ``l2bridge``: HNS puts containers on the uplink's segment with addresses of the host's
  subnet. Here bridge ``phbr<id>`` takes the uplink (``NetworkAdapterName``) as its port,
  with the uplink's MAC, addresses and routes, so the host keeps its connectivity through
  the bridge (what CNI's bridge plugin with an enslaved uplink does); endpoints' veths
  join the bridge. No NAT, no address on the bridge but the host's. HNS rewrites the
  containers' MACs to the host's on the wire; a Linux bridge does not, so the segment
  sees the containers' MACs (from the network's MacPools).
* ``transparent``: HNS gives each container its own MAC on the uplink's segment. Here
  each endpoint is a macvlan in bridge mode of the uplink (CNI's macvlan plugin), made
  on the host as ``phv<id>`` and moved into the container's namespace as ``eth0``; the
  network itself only sets the uplink up. The host cannot reach its own macvlans through
  the uplink (a macvlan property) and no ACL can be enforced on a host bridge, so ACL
  policies are refused on these networks.
* ``overlay``: bridge ``phbr<id>`` with VXLAN device ``phvx<id>`` (VNI = the ``VSID``
  policy, UDP 4789, bound to the uplink if one is named, learning off, ARP proxy on). A
  remote endpoint (``IsRemoteEndpoint`` with a ``PA`` policy) is a static FDB entry
  (its MAC -> its host's provider address) and a neighbour entry (its IP -> its MAC) on
  the VXLAN device, as Docker's overlay driver does; local endpoints are veths on the
  bridge whose MTU leaves room for the VXLAN header.

Before an ``l2bridge`` or ``transparent`` network touches its uplink, the uplink's state
(admin state, addresses, routes) is saved in the run root (``networks/<id>/uplink.json``):
deleting the network, recovery after a killed creator and restore all give the uplink
back, or take it again, from that file.
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import json
import os
import socket
import sqlite3
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pyhcs._errors import (
    ERR_ALREADY_EXISTS,
    ERR_ELEMENT_NOT_FOUND,
    ERR_VMCOMPUTE_OPERATION_INVALID_STATE,
    HcsError,
)
from pyhcs._network import _netlink as nl
from pyhcs._network import _nft as nft
from pyhcs._network import _rtnl  # attach's fast path (policy/speed helper)
from pyhcs._network._errors import (
    InvalidNetworkRequestError,
    NetworkError,
    NetworkNotSupportedError,
)
from pyhcs._network._nft import LoadBalancer
from pyhcs._network._policy import (  # apply/remove_endpoint: ACLs, VLAN (policy helper)
    EndpointPolicies,
    apply_endpoint,
    apply_policy_list,
    endpoint_policies,
    load_balancers,
    network_policies,
    remove_endpoint,
)
from pyhcs._paths import Roots
from pyhcs._registry import Registry
from pyhcs._schema import HNSEndpoint, HNSNetwork, MacPool, NetworkStats, Subnet
from pyhcs._schema import from_json as _from_json
from pyhcs._schema import to_json as _to_json

__all__ = [
    "NETWORK_TYPES",
    "bridge_name",
    "vxlan_name",
    "host_ifname",
    "registry",
    "create_network",
    "delete_network",
    "get_network",
    "list_networks",
    "create_endpoint",
    "update_endpoint",
    "delete_endpoint",
    "get_endpoint",
    "list_endpoints",
    "attach_endpoint",
    "detach_endpoint",
    "endpoint_statistics",
    "endpoint_compartment_id",
    "resolv_conf",
    "recover",
    "restore",
]

#: The network types pyhcs realizes.
NETWORK_TYPES = ("nat", "l2bridge", "transparent", "overlay")

#: The types that sit on a host interface (``NetworkAdapterName``), one network per uplink.
_UPLINK_TYPES = ("l2bridge", "transparent")

#: Where pyhcs picks a subnet for a ``nat`` network created without one: the first free
#: /24 of this range (HNS picks from 172.16.0.0/12 likewise).
_DEFAULT_POOL = ipaddress.IPv4Network("172.28.0.0/14")


def registry(roots: Roots | None = None) -> Registry:
    """The registry of *roots* (default: resolved from the environment)."""
    return Registry.open((roots or Roots.resolve()).db_path)


# --------------------------------------------------------------------------- names


def _hex(id_: str) -> str:
    return id_.replace("-", "").lower()


def bridge_name(network_id: str) -> str:
    """The bridge interface of a network (``phbr`` + 10 hex digits of its id)."""
    return "phbr" + _hex(network_id)[:10]


def vxlan_name(network_id: str) -> str:
    """The VXLAN device of an overlay network (``phvx`` + 10 hex digits of its id)."""
    return "phvx" + _hex(network_id)[:10]


def host_ifname(endpoint_id: str) -> str:
    """The host-side veth of an endpoint (``phv`` + 10 hex digits of its id)."""
    return "phv" + _hex(endpoint_id)[:10]


def _new_id() -> str:
    return str(uuid.uuid4()).upper()


def _norm_id(id_: str) -> str:
    return id_.strip().strip("{}").upper()


# --------------------------------------------------------------------------- owners


def _start_time(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def _me() -> tuple[int, int | None]:
    pid = os.getpid()
    return pid, _start_time(pid)


def _owner_alive(pid: int | None, start: int | None) -> bool:
    return bool(pid) and _start_time(int(pid or 0)) == start


# --------------------------------------------------------------------------- MACs


def _mac_int(text: str) -> int:
    parts = text.replace(":", "-").split("-")
    if len(parts) != 6 or not all(len(p) == 2 for p in parts):
        raise ValueError(text)
    return int("".join(parts), 16)


def _mac_text(value: int) -> str:
    raw = f"{value:012X}"
    return "-".join(raw[i:i + 2] for i in range(0, 12, 2))


def _default_mac_pool(network_id: str) -> MacPool:
    # HNS hands out 00-15-5D-xx-xY-00.. ranges of 4096; one per network, from its id
    h = _hex(network_id)
    base = (0x00155D << 24) | (int(h[:2], 16) << 16) | ((int(h[2], 16) << 12) & 0xF000)
    return MacPool(start_mac_address=_mac_text(base), end_mac_address=_mac_text(base + 0xFFF))


# --------------------------------------------------------------------------- errors


def _not_found(kind: str, ref: str, op: str) -> NetworkError:
    return NetworkError(ref, op, ERR_ELEMENT_NOT_FOUND,
                        message=f"{kind} {ref!r} not found")


def _os_error(id_: str, op: str, e: OSError) -> NetworkError:
    return NetworkError(id_, op, message=f"{e.strerror or e}")


# --------------------------------------------------------------------------- rows


def _network_row(reg: Registry, ref: str, op: str) -> sqlite3.Row:
    row = reg.query_one("SELECT * FROM networks WHERE id=?", (_norm_id(ref),))
    if row is None:
        row = reg.query_one("SELECT * FROM networks WHERE name=?", (ref,))
    if row is None or row["state"] != "ready":
        raise _not_found("network", ref, op)
    return row


def _endpoint_row(reg: Registry, ref: str, op: str) -> sqlite3.Row:
    row = reg.query_one("SELECT * FROM endpoints WHERE id=?", (_norm_id(ref),))
    if row is None:
        rows = reg.query("SELECT * FROM endpoints WHERE name=? AND name!=''", (ref,))
        row = rows[0] if len(rows) == 1 else None
    if row is None or row["state"] != "ready":
        raise _not_found("endpoint", ref, op)
    return row


def _network_doc(row: sqlite3.Row) -> HNSNetwork:
    return _from_json(HNSNetwork, row["doc"])


def _endpoint_doc(row: sqlite3.Row) -> HNSEndpoint:
    return _from_json(HNSEndpoint, row["doc"])


# --------------------------------------------------------------------------- networks


def get_network(ref: str, *, roots: Roots | None = None) -> HNSNetwork:
    """The network whose id (any case, braces allowed) or name is *ref*.

    Raises :class:`NetworkError` with ``ERR_ELEMENT_NOT_FOUND`` if there is none.
    """
    return _network_doc(_network_row(registry(roots), ref, "GetNetwork"))


def list_networks(*, roots: Roots | None = None) -> list[HNSNetwork]:
    """Every network, oldest first."""
    rows = registry(roots).query(
        "SELECT doc FROM networks WHERE state='ready' ORDER BY created")
    return [_network_doc(r) for r in rows]


def _check_subnets(net: HNSNetwork, op: str) -> list[tuple[ipaddress.IPv4Network, str]]:
    out = []
    for s in net.subnets:
        try:
            prefix = ipaddress.IPv4Network(s.address_prefix, strict=False)
        except ValueError as e:
            raise InvalidNetworkRequestError(
                net.name, op, message=f"AddressPrefix {s.address_prefix!r} is not an IPv4 "
                "prefix") from e
        if prefix.num_addresses < 4:
            raise InvalidNetworkRequestError(
                net.name, op, message=f"subnet {prefix} is too small (at least a /30)")
        gw = s.gateway_address or str(next(prefix.hosts()))
        try:
            gw_addr = ipaddress.IPv4Address(gw)
        except ValueError as e:
            raise InvalidNetworkRequestError(
                net.name, op, message=f"GatewayAddress {gw!r} is not an IPv4 address") from e
        if gw_addr not in prefix or gw_addr in (prefix.network_address,
                                                prefix.broadcast_address):
            raise InvalidNetworkRequestError(
                net.name, op, message=f"GatewayAddress {gw} is not a host of {prefix}")
        network_policies(s.policies, net.name, op)
        out.append((prefix, str(gw_addr)))
    for i, (a, _) in enumerate(out):
        for b, _ in out[i + 1:]:
            if a.overlaps(b):
                raise InvalidNetworkRequestError(
                    net.name, op, message=f"subnets {a} and {b} overlap")
    return out


def _check_mac_pools(net: HNSNetwork, op: str) -> None:
    for p in net.mac_pools:
        try:
            lo, hi = _mac_int(p.start_mac_address), _mac_int(p.end_mac_address)
        except ValueError as e:
            raise InvalidNetworkRequestError(
                net.name, op, message=f"MacPool {p.start_mac_address!r}..{p.end_mac_address!r}"
                " is not a range of MAC addresses") from e
        if lo > hi or lo & (1 << 40):
            raise InvalidNetworkRequestError(
                net.name, op, message="MacPool: start after end, or a multicast address")


def create_network(request: HNSNetwork, *, roots: Roots | None = None) -> HNSNetwork:
    """Create the network *request* describes and return it as stored (with its new ``id``).

    ``nat``: a bridge holding each subnet's gateway address, IPv4 forwarding on, and an
    nftables table masquerading the subnets' outgoing traffic (except to the
    ``OutBoundNAT`` exception list). With no subnet, the first free /24 of 172.28.0.0/14
    is used. Without MacPools, the network gets a 4096-address pool of its own.

    ``l2bridge`` (``NetworkAdapterName`` names the uplink): a bridge that takes the
    uplink as its port, and the uplink's addresses and routes, so endpoints sit on the
    uplink's segment with addresses of the subnet; no NAT. ``transparent`` (uplink
    too): each endpoint is a macvlan of the uplink; the uplink is only set up. Deleting
    either gives the uplink back as it was. ``overlay``: a bridge with a VXLAN device
    whose VNI is the network's (or its subnets') ``VSID`` policy; remote endpoints
    (``IsRemoteEndpoint`` with a ``PA`` policy) are reached through their host's
    provider address. ``l2bridge`` and ``overlay`` need a subnet; ``transparent``
    without one leaves addressing to the containers (DHCP).

    Raises :class:`InvalidNetworkRequestError` for an invalid request, a subnet that
    overlaps another network's, a missing or busy uplink; :class:`NetworkError`
    (``ERR_ALREADY_EXISTS``) for a name or VSID in use; nothing is changed then.
    """
    op = "CreateNetwork"
    net = HNSNetwork(**{f: getattr(request, f) for f in request.__struct_fields__})
    if not net.name:
        raise InvalidNetworkRequestError("", op, message="a network needs a Name")
    net.type = (net.type or "nat").lower()
    if net.type not in NETWORK_TYPES:
        if net.type in ("l2tunnel", "ics", "private", "internal"):
            raise NetworkNotSupportedError(net.name, op, message=f"network Type {net.type!r} "
                                           "is not supported yet on Linux")
        raise InvalidNetworkRequestError(net.name, op, message=f"unknown network Type "
                                         f"{net.type!r}")
    policies = network_policies(net.policies, net.name, op)
    vni = _network_vni(net, op)
    _check_mac_pools(net, op)
    subnets = _check_subnets(net, op)
    if net.type in ("l2bridge", "overlay") and not subnets:
        raise InvalidNetworkRequestError(net.name, op, message=f"an {net.type} network needs "
                                         "a subnet (its endpoints' addresses)")
    _check_uplink(net, op)
    net.id = _new_id()
    if not net.mac_pools:
        net.mac_pools = [_default_mac_pool(net.id)]
    reg = registry(roots)
    pid, start = _me()
    with reg.transaction() as c:
        if c.execute("SELECT 1 FROM networks WHERE name=?", (net.name,)).fetchone():
            raise NetworkError(net.name, op, ERR_ALREADY_EXISTS,
                               message=f"a network named {net.name!r} already exists")
        for other in c.execute("SELECT doc FROM networks").fetchall():
            _check_clash(net, vni, _network_doc(other), op)
        taken = [ipaddress.IPv4Network(r[0]) for r in
                 c.execute("SELECT prefix FROM net_subnets").fetchall()]
        if not subnets and net.type == "nat":
            for candidate in _DEFAULT_POOL.subnets(new_prefix=24):
                if not any(candidate.overlaps(t) for t in taken):
                    subnets = [(candidate, str(next(candidate.hosts())))]
                    break
            else:
                raise NetworkError(net.name, op, message="no free subnet in 172.28.0.0/14")
        for prefix, _ in subnets:
            clash = next((t for t in taken if prefix.overlaps(t)), None)
            if clash is not None:
                raise InvalidNetworkRequestError(
                    net.name, op, message=f"subnet {prefix} overlaps {clash} of another network")
        old = {str(s.address_prefix): s for s in net.subnets}
        net.subnets = [
            Subnet(address_prefix=str(p), gateway_address=gw,
                   policies=old[k].policies if (k := _orig_key(old, p)) else [])
            for p, gw in subnets
        ]
        c.execute("INSERT INTO networks (id, name, type, doc, state, owner_pid, owner_start, "
                  "created) VALUES (?,?,?,?,?,?,?,?)",
                  (net.id, net.name, net.type, _to_json(net).decode(), "creating", pid, start,
                   Registry.now()))
        c.executemany("INSERT INTO net_subnets (network_id, prefix) VALUES (?,?)",
                      [(net.id, str(p)) for p, _ in subnets])
    try:
        _realize_network(net, policies.outbound_exceptions, roots)
    except BaseException as e:
        _teardown_network(net, roots)
        reg.execute("DELETE FROM networks WHERE id=?", (net.id,))
        if isinstance(e, OSError):
            raise _os_error(net.id, op, e) from e
        raise
    reg.execute("UPDATE networks SET state='ready', owner_pid=NULL, owner_start=NULL "
                "WHERE id=?", (net.id,))
    return net


def _network_vni(net: HNSNetwork, op: str) -> int:
    """The VXLAN VNI of an overlay network (0 for other types, which refuse VSIDs)."""
    found = {network_policies(net.policies, net.name, op).vsid}
    found |= {network_policies(s.policies, net.name, op).vsid for s in net.subnets}
    found.discard(0)
    if net.type != "overlay":
        if found:
            raise InvalidNetworkRequestError(net.name, op, message="VSID policies need an "
                                             "overlay network")
        return 0
    if not found:
        raise InvalidNetworkRequestError(net.name, op, message="an overlay network needs a "
                                         "VSID policy (its VXLAN VNI)")
    if len(found) > 1:
        raise InvalidNetworkRequestError(net.name, op, message="an overlay network has one "
                                         f"VSID, not {sorted(found)}")
    return found.pop()


def _check_uplink(net: HNSNetwork, op: str) -> None:
    uplink = net.network_adapter_name
    if net.type not in _UPLINK_TYPES and not (net.type == "overlay" and uplink):
        return
    if not uplink:
        raise InvalidNetworkRequestError(net.name, op, message=f"an {net.type} network needs "
                                         "NetworkAdapterName (its uplink interface)")
    if uplink == "lo" or uplink.startswith("ph"):
        raise InvalidNetworkRequestError(net.name, op, message=f"{uplink!r} cannot be an "
                                         "uplink")
    with nl.host() as ipr:
        info = nl.link_info(ipr, uplink)
    if info is None:
        raise InvalidNetworkRequestError(net.name, op, message=f"no interface {uplink!r} "
                                         "(NetworkAdapterName) on this host")
    if net.type == "l2bridge" and (info.master is not None or info.kind == "bridge"):
        raise InvalidNetworkRequestError(net.name, op, message=f"uplink {uplink!r} is a "
                                         "bridge or a bridge's port already")


def _check_clash(net: HNSNetwork, vni: int, other: HNSNetwork, op: str) -> None:
    """Refuse what *net* cannot share with the existing network *other*."""
    if (net.type in _UPLINK_TYPES and other.type in _UPLINK_TYPES
            and net.network_adapter_name == other.network_adapter_name):
        raise InvalidNetworkRequestError(
            net.name, op, message=f"uplink {net.network_adapter_name!r} already serves "
            f"network {other.name!r}")
    if vni and other.type == "overlay" and _network_vni(other, op) == vni:
        raise NetworkError(net.name, op, ERR_ALREADY_EXISTS,
                           message=f"VSID {vni} is already network {other.name!r}'s")


def _orig_key(old: dict[str, Subnet], prefix: ipaddress.IPv4Network) -> str | None:
    for k in old:
        try:
            if ipaddress.IPv4Network(k, strict=False) == prefix:
                return k
        except ValueError:
            continue
    return None


def _uplink_file(roots: Roots | None, network_id: str) -> Path:
    return (roots or Roots.resolve()).run_root / "networks" / network_id / "uplink.json"


def _uplink_state(net: HNSNetwork, roots: Roots | None, ipr: Any) -> nl.UplinkState:
    """The uplink as it was before the network took it, saved before anything changes.

    Kept in the run root: it lives exactly as long as the kernel state it describes (a
    reboot clears both). A saved state is reused, so a network rebuilt by restore after
    its bridge vanished (with the addresses it held) still gives back the original ones.
    """
    path = _uplink_file(roots, net.id)
    try:
        return nl.UplinkState.from_json(path.read_text())
    except (OSError, ValueError, KeyError):
        pass
    state = nl.capture_uplink(ipr, net.network_adapter_name)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(state.to_json())
    with open(tmp) as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return state


def _realize_network(net: HNSNetwork, exceptions: list[str], roots: Roots | None) -> None:
    br = bridge_name(net.id)
    if net.type == "nat":
        with nl.host() as ipr:
            for s in net.subnets:
                prefix = ipaddress.IPv4Network(s.address_prefix)
                nl.ensure_bridge(ipr, br, s.gateway_address, prefix.prefixlen)
        nl.set_ip_forward()
        nft.network_tables(net.id, br, [s.address_prefix for s in net.subnets], exceptions)
        return
    with nl.host() as ipr:
        if net.type == "l2bridge":
            nl.take_uplink(ipr, _uplink_state(net, roots, ipr), br)
        elif net.type == "transparent":
            _uplink_state(net, roots, ipr)
            nl.set_link_up(ipr, net.network_adapter_name)
        else:
            nl.ensure_vxlan(ipr, vxlan_name(net.id), _network_vni(net, ""), br,
                            net.network_adapter_name)
    if net.type != "transparent":
        # no NAT: the tables only carry the endpoints' ACLs (the bridge family)
        nft.network_tables(net.id, br, [], [])


def _teardown_network(net: HNSNetwork, roots: Roots | None) -> None:
    path = _uplink_file(roots, net.id)
    with nl.host() as ipr:
        if net.type in _UPLINK_TYPES and path.exists():
            state = nl.UplinkState.from_json(path.read_text())
            nl.give_back_uplink(ipr, state, bridge_name(net.id) if net.type == "l2bridge"
                                else "")
        nl.delete_link(ipr, vxlan_name(net.id))
        nl.delete_link(ipr, bridge_name(net.id))
    if net.type != "transparent":
        nft.delete_network_tables(net.id)
    path.unlink(missing_ok=True)
    with contextlib.suppress(OSError):
        path.parent.rmdir()


def _network_intact(net: HNSNetwork, tables: set[tuple[str, str]]) -> bool | None:
    """True if the kernel holds all of *net*; None if it cannot be rebuilt (no uplink)."""
    t = nft.table_name(net.id)
    has_tables = ("ip", t) in tables and ("bridge", t) in tables
    name = net.network_adapter_name if net.type != "nat" else ""  # nat has no uplink
    with nl.host() as ipr:
        uplink = nl.link_info(ipr, name) if name else None
        if name and uplink is None:
            return None
        br = nl.link_info(ipr, bridge_name(net.id))
        if net.type == "nat":
            return br is not None and has_tables
        if net.type == "transparent":
            return uplink is not None and uplink.up
        if net.type == "l2bridge":
            return (br is not None and uplink is not None and uplink.master == br.index
                    and has_tables)
        return br is not None and nl.link_exists(ipr, vxlan_name(net.id)) and has_tables


def delete_network(ref: str, *, roots: Roots | None = None) -> HNSNetwork:
    """Delete a network (its bridge and tables); return it as it was.

    Refused with :class:`NetworkError` (``ERR_VMCOMPUTE_OPERATION_INVALID_STATE``) while
    endpoints remain on it: delete them first.
    """
    op = "DeleteNetwork"
    reg = registry(roots)

    def no_endpoints(c: sqlite3.Connection, row: sqlite3.Row) -> None:
        (n,) = c.execute("SELECT count(*) FROM endpoints WHERE network_id=?",
                         (row["id"],)).fetchone()
        if n:
            raise NetworkError(row["id"], op, ERR_VMCOMPUTE_OPERATION_INVALID_STATE,
                               message=f"network {row['name']!r} still has {n} endpoint(s)")

    row = _claim_for_delete(reg, "network", ref, op, check=no_endpoints)
    try:
        _teardown_network(_network_doc(row), roots)
    except OSError as e:
        raise _os_error(row["id"], op, e) from e
    reg.execute("DELETE FROM networks WHERE id=?", (row["id"],))
    return _network_doc(row)


# Per kind: its table, and how a reference (an id, or a name) finds its row.
_DELETE_LOOKUP = {
    "network": ("networks", "id=? OR name=?"),
    "endpoint": ("endpoints", "id=? OR (name=? AND name!='')"),
}


def _claim_for_delete(reg: Registry, kind: str, ref: str, op: str,
                      check: Callable[[sqlite3.Connection, sqlite3.Row], None] | None = None
                      ) -> sqlite3.Row:
    """Mark the ready network or endpoint *ref* as being deleted by this process, in one
    transaction (after *check*, which may refuse), and return its row: no other client
    can use or delete it meanwhile, and recovery finishes the deletion if we die."""
    table, match = _DELETE_LOOKUP[kind]
    pid, start = _me()
    with reg.transaction() as c:
        row: sqlite3.Row | None = c.execute(f"SELECT * FROM {table} WHERE {match}",
                                            (_norm_id(ref), ref)).fetchone()
        if row is None or row["state"] != "ready":
            raise _not_found(kind, ref, op)
        if check is not None:
            check(c, row)
        c.execute(f"UPDATE {table} SET state='deleting', owner_pid=?, owner_start=? "
                  "WHERE id=?", (pid, start, row["id"]))
    return row


# --------------------------------------------------------------------------- endpoints


def get_endpoint(ref: str, *, roots: Roots | None = None) -> HNSEndpoint:
    """The endpoint whose id or (unique) name is *ref*; ``ERR_ELEMENT_NOT_FOUND`` if none."""
    return _endpoint_doc(_endpoint_row(registry(roots), ref, "GetEndpoint"))


def list_endpoints(*, network: str = "", roots: Roots | None = None) -> list[HNSEndpoint]:
    """Every endpoint (of *network*, an id or name, if given), oldest first."""
    reg = registry(roots)
    if network:
        nid = _network_row(reg, network, "ListEndpoints")["id"]
        rows = reg.query("SELECT doc FROM endpoints WHERE state='ready' AND network_id=? "
                         "ORDER BY created", (nid,))
    else:
        rows = reg.query("SELECT doc FROM endpoints WHERE state='ready' ORDER BY created")
    return [_endpoint_doc(r) for r in rows]


def _pick_ip(c: sqlite3.Connection, net: HNSNetwork, want: str, op: str,
             host_addresses: frozenset[str] = frozenset()) -> tuple[str, str, int]:
    """(address, gateway, prefix length) for a new endpoint; inside the caller's transaction.

    *host_addresses* are the host's own on the segment (an uplink's): never handed out.
    """
    used = {r[0] for r in c.execute("SELECT address FROM ip_allocations WHERE network_id=?",
                                    (net.id,))} | host_addresses
    subnets = [(ipaddress.IPv4Network(s.address_prefix), s.gateway_address)
               for s in net.subnets]
    if want:
        try:
            addr = ipaddress.IPv4Address(want)
        except ValueError as e:
            raise InvalidNetworkRequestError(
                want, op, message=f"IPAddress {want!r} is not an IPv4 address") from e
        if not subnets:
            # a transparent network without subnets: the address is the caller's business
            if str(addr) in used:
                raise NetworkError(want, op, ERR_ALREADY_EXISTS,
                                   message=f"IPAddress {addr} is already in use")
            return str(addr), "", 0
        for prefix, gw in subnets:
            if addr in prefix:
                if addr in (prefix.network_address, prefix.broadcast_address) or str(addr) == gw:
                    raise InvalidNetworkRequestError(
                        want, op, message=f"IPAddress {addr} is reserved in {prefix}")
                if str(addr) in used:
                    raise NetworkError(want, op, ERR_ALREADY_EXISTS,
                                       message=f"IPAddress {addr} is already in use")
                return str(addr), gw, prefix.prefixlen
        raise InvalidNetworkRequestError(
            want, op, message=f"IPAddress {addr} is in no subnet of network {net.name!r}")
    for prefix, gw in subnets:
        for host in prefix.hosts():
            text = str(host)
            if text != gw and text not in used:
                return text, gw, prefix.prefixlen
    if not subnets:
        return "", "", 0  # addressed from outside (DHCP on the uplink's segment)
    raise NetworkError(net.id, op, message=f"network {net.name!r} has no free address")


def _pick_mac(c: sqlite3.Connection, net: HNSNetwork, want: str, op: str) -> str:
    used = {r[0] for r in c.execute("SELECT mac FROM mac_allocations WHERE network_id=?",
                                    (net.id,))}
    if want:
        try:
            value = _mac_int(want)
        except ValueError as e:
            raise InvalidNetworkRequestError(
                want, op, message=f"MacAddress {want!r} is not a MAC address") from e
        if value & (1 << 40) or value == 0:
            raise InvalidNetworkRequestError(want, op, message="MacAddress is not unicast")
        text = _mac_text(value)
        if text in used:
            raise NetworkError(want, op, ERR_ALREADY_EXISTS,
                               message=f"MacAddress {text} is already in use")
        return text
    for pool in net.mac_pools:
        lo, hi = _mac_int(pool.start_mac_address), _mac_int(pool.end_mac_address)
        for value in range(lo, hi + 1):
            if _mac_text(value) not in used:
                return _mac_text(value)
    raise NetworkError(net.id, op, message=f"network {net.name!r} has no free MAC address")


def _port_free(proto: str, port: int) -> bool:
    """True if nothing on the host (this namespace) is bound to *proto*/*port*."""
    kind = socket.SOCK_STREAM if proto == "tcp" else socket.SOCK_DGRAM
    with socket.socket(socket.AF_INET, kind) as s:
        try:
            s.bind(("0.0.0.0", port))
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                return False
            raise
    return True


def create_endpoint(request: HNSEndpoint, *, network: str = "",
                    roots: Roots | None = None) -> HNSEndpoint:
    """Create an endpoint on *network* (or the request's ``VirtualNetwork`` / ``...Name``).

    The endpoint gets the requested ``IPAddress`` and ``MacAddress`` or the lowest free
    ones of the network's subnets and MAC pools; ``GatewayAddress``, ``PrefixLength`` and
    the DNS fields (from the network when not given) are filled in. ``NAT`` policies take
    their host ports at once (DNAT to the endpoint's address); the interface itself is
    made by :func:`attach_endpoint`.

    Raises :class:`InvalidNetworkRequestError` for an invalid request, and
    :class:`NetworkError` with ``ERR_ALREADY_EXISTS`` for a name, address, MAC or host
    port in use (a host port is in use if another mapping or a socket of the host holds
    it) or ``ERR_ELEMENT_NOT_FOUND`` for an unknown network; nothing is changed then.
    """
    op = "CreateEndpoint"
    ep = HNSEndpoint(**{f: getattr(request, f) for f in request.__struct_fields__})
    reg = registry(roots)
    ref = network or ep.virtual_network or ep.virtual_network_name
    if not ref:
        raise InvalidNetworkRequestError(ep.name, op, message="an endpoint needs a "
                                         "VirtualNetwork (or VirtualNetworkName)")
    pol = endpoint_policies(ep.policies, ep.name, op)
    for proto, port, _ in pol.port_mappings:
        if not _port_free(proto, port):
            raise NetworkError(ep.name, op, ERR_ALREADY_EXISTS,
                               message=f"host port {proto}/{port} is already in use")
    ep.id = _new_id()
    pid, start = _me()
    with reg.transaction() as c:
        row = c.execute("SELECT * FROM networks WHERE id=? OR name=?",
                        (_norm_id(ref), ref)).fetchone()
        if row is None or row["state"] != "ready":
            raise _not_found("network", ref, op)
        net = _network_doc(row)
        if ep.name and c.execute("SELECT 1 FROM endpoints WHERE name=?", (ep.name,)).fetchone():
            raise NetworkError(ep.name, op, ERR_ALREADY_EXISTS,
                               message=f"an endpoint named {ep.name!r} already exists")
        if pol.port_mappings and net.type != "nat":
            raise InvalidNetworkRequestError(ep.name, op, message="NAT policies need a nat "
                                             "network")
        _refuse_unsupported(pol, net, ep.name, op)
        if ep.is_remote_endpoint:
            _check_remote(ep, pol, net, op)
        for proto, port, _ in pol.port_mappings:
            if c.execute("SELECT 1 FROM port_mappings WHERE protocol=? AND external_port=?",
                         (proto, port)).fetchone():
                raise NetworkError(ep.name, op, ERR_ALREADY_EXISTS,
                                   message=f"host port {proto}/{port} is already in use")
        ip, gw, plen = _pick_ip(c, net, ep.ip_address, op, _host_addresses(net, roots))
        if net.subnets:
            ep.ip_address, ep.gateway_address, ep.prefix_length = ip, gw, plen
        else:
            ep.ip_address = ip
            ep.prefix_length = ep.prefix_length or (32 if ip else 0)
        ep.mac_address = _pick_mac(c, net, ep.mac_address, op)
        ep.virtual_network, ep.virtual_network_name = net.id, net.name
        ep.dns_server_list = ep.dns_server_list or net.dns_server_list
        ep.dns_suffix = ep.dns_suffix or net.dns_suffix
        c.execute("INSERT INTO endpoints (id, name, network_id, doc, state, owner_pid, "
                  "owner_start, created) VALUES (?,?,?,?,?,?,?,?)",
                  (ep.id, ep.name, net.id, _to_json(ep).decode(), "creating", pid, start,
                   Registry.now()))
        if ep.ip_address:
            c.execute("INSERT INTO ip_allocations VALUES (?,?,?)",
                      (net.id, ep.ip_address, ep.id))
        c.execute("INSERT INTO mac_allocations VALUES (?,?,?)", (net.id, ep.mac_address, ep.id))
        c.executemany("INSERT INTO port_mappings VALUES (?,?,?,?)",
                      [(p, ext, ep.id, internal) for p, ext, internal in pol.port_mappings])
    try:
        _realize_endpoint(net, ep, pol, reg)
    except BaseException as e:
        _teardown_endpoint(net, ep, pol)
        reg.execute("DELETE FROM endpoints WHERE id=?", (ep.id,))
        if isinstance(e, OSError):
            raise _os_error(ep.id, op, e) from e
        raise
    reg.execute("UPDATE endpoints SET state='ready', owner_pid=NULL, owner_start=NULL "
                "WHERE id=?", (ep.id,))
    return ep


def _host_addresses(net: HNSNetwork, roots: Roots | None) -> frozenset[str]:
    """The host's IPv4 addresses on an uplink network's segment (as the uplink had them)."""
    if net.type not in _UPLINK_TYPES:
        return frozenset()
    try:
        state = nl.UplinkState.from_json(_uplink_file(roots, net.id).read_text())
    except (OSError, ValueError, KeyError):
        return frozenset()
    return frozenset(str(a["address"]) for a in state.addresses
                     if a.get("family") == socket.AF_INET)


def _refuse_unsupported(pol: EndpointPolicies, net: HNSNetwork, where: str, op: str) -> None:
    # refused rather than accepted and silently not enforced
    if pol.vlan and net.type in ("transparent", "overlay"):  # VLANs: bridge ports (policy)
        raise NetworkNotSupportedError(where, op, message="VLAN policies are not supported "
                                       f"on {net.type} networks")
    if (pol.vsid or pol.provider_address) and net.type != "overlay":
        raise InvalidNetworkRequestError(where, op, message="VSID and PA policies need an "
                                         "overlay network")
    if pol.vsid and pol.vsid != _network_vni(net, op):
        raise InvalidNetworkRequestError(where, op, message=f"VSID {pol.vsid} is not the "
                                         f"network's ({_network_vni(net, op)})")
    if pol.acls and net.type == "transparent":
        # a macvlan's traffic never crosses a bridge of the host, where ACLs are enforced
        raise NetworkNotSupportedError(where, op, message="ACL policies are not supported "
                                       "on transparent networks")


def _check_remote(ep: HNSEndpoint, pol: EndpointPolicies, net: HNSNetwork, op: str) -> None:
    if net.type != "overlay":
        raise InvalidNetworkRequestError(ep.name, op, message="remote endpoints need an "
                                         "overlay network")
    if not pol.provider_address or not ep.ip_address or not ep.mac_address:
        raise InvalidNetworkRequestError(ep.name, op, message="a remote endpoint needs its "
                                         "IPAddress, MacAddress and a PA policy (its host)")
    if pol.acls or pol.max_egress_bytes:
        raise InvalidNetworkRequestError(ep.name, op, message="a remote endpoint takes no "
                                         "ACL or QOS policy (its own host enforces them)")


def _colon_mac(mac: str) -> str:
    return mac.replace("-", ":").lower()


def _realize_endpoint(net: HNSNetwork, ep: HNSEndpoint, pol: EndpointPolicies,
                      reg: Registry) -> None:
    if ep.is_remote_endpoint:
        with nl.host() as ipr:
            nl.add_remote(ipr, vxlan_name(net.id), _colon_mac(ep.mac_address), ep.ip_address,
                          pol.provider_address)
        return
    nft.add_port_mappings(net.id, [(p, ext, ep.ip_address, internal)
                                   for p, ext, internal in pol.port_mappings])
    apply_endpoint(net.id, host_ifname(ep.id), ep.ip_address, pol)  # ACLs, VLAN (policy)
    if pol.outbound_exceptions and net.type == "nat":
        _refresh_outbound_exceptions(net, reg)


def _refresh_outbound_exceptions(net: HNSNetwork, reg: Registry) -> None:
    prefixes: list[str | tuple[str, str]] = list(
        network_policies(net.policies, net.name, "").outbound_exceptions)
    for r in reg.query("SELECT doc FROM endpoints WHERE network_id=? AND state!='deleting'",
                       (net.id,)):
        doc = _endpoint_doc(r)
        prefixes += [(doc.ip_address, p) for p in  # an endpoint's own (policy helper)
                     endpoint_policies(doc.policies, doc.id, "").outbound_exceptions]
    nft.set_outbound_exceptions(net.id, prefixes)


def _teardown_endpoint(net: HNSNetwork | None, ep: HNSEndpoint, pol: EndpointPolicies) -> None:
    if net is None:
        return  # its network is gone, and every kernel object of it
    if ep.is_remote_endpoint:
        with nl.host() as ipr:
            nl.delete_remote(ipr, vxlan_name(net.id), _colon_mac(ep.mac_address),
                             ep.ip_address)
        return
    nft.delete_port_mappings(net.id, [(p, ext) for p, ext, _ in pol.port_mappings])
    remove_endpoint(net.id, host_ifname(ep.id), ep.ip_address, pol)  # ACLs, VLAN (policy)


def update_endpoint(ref: str, request: HNSEndpoint, *,
                    roots: Roots | None = None) -> HNSEndpoint:
    """Change an endpoint's ``Policies``, ``DNSServerList`` or ``DNSSuffix``; return it.

    Port mappings, ACLs and the bandwidth limit take effect at once (an attached
    endpoint's limit included). Address, MAC and network cannot change: asking for a
    different one raises :class:`InvalidNetworkRequestError`, as does an invalid policy;
    a host port in use raises ``ERR_ALREADY_EXISTS``; nothing changes on error.
    """
    op = "UpdateEndpoint"
    reg = registry(roots)
    row = _endpoint_row(reg, ref, op)
    old = _endpoint_doc(row)
    for field_, new_v, old_v in (("IPAddress", request.ip_address, old.ip_address),
                                 ("MacAddress", request.mac_address, old.mac_address),
                                 ("VirtualNetwork", request.virtual_network,
                                  old.virtual_network)):
        if new_v and _norm(new_v) != _norm(old_v):
            raise InvalidNetworkRequestError(old.id, op, message=f"{field_} cannot change")
    old_pol = endpoint_policies(old.policies, old.id, op)
    new_pol = endpoint_policies(request.policies, old.id, op)
    net = _network_doc(_network_row(reg, old.virtual_network, op))
    _refuse_unsupported(new_pol, net, old.id, op)
    if new_pol.port_mappings and net.type != "nat":
        raise InvalidNetworkRequestError(old.id, op, message="NAT policies need a nat network")
    if old.is_remote_endpoint:
        _check_remote(old, new_pol, net, op)
    old_ports = {(p, e): i for p, e, i in old_pol.port_mappings}
    new_ports = {(p, e): i for p, e, i in new_pol.port_mappings}
    added = [(p, e, i) for (p, e), i in new_ports.items() if old_ports.get((p, e)) != i]
    removed = [k for k, i in old_ports.items() if new_ports.get(k) != i]
    for p, e, _ in added:
        if (p, e) not in old_ports and not _port_free(p, e):
            raise NetworkError(old.id, op, ERR_ALREADY_EXISTS,
                               message=f"host port {p}/{e} is already in use")
    doc = HNSEndpoint(**{f: getattr(old, f) for f in old.__struct_fields__})
    doc.policies = request.policies
    doc.dns_server_list = request.dns_server_list or old.dns_server_list
    doc.dns_suffix = request.dns_suffix or old.dns_suffix
    with reg.transaction() as c:
        c.executemany("DELETE FROM port_mappings WHERE protocol=? AND external_port=?",
                      removed)
        for p, e, i in added:
            if c.execute("SELECT 1 FROM port_mappings WHERE protocol=? AND external_port=?",
                         (p, e)).fetchone():
                raise NetworkError(old.id, op, ERR_ALREADY_EXISTS,
                                   message=f"host port {p}/{e} is already in use")
            c.execute("INSERT INTO port_mappings VALUES (?,?,?,?)", (p, e, old.id, i))
        c.execute("UPDATE endpoints SET doc=? WHERE id=?", (_to_json(doc).decode(), old.id))
    try:
        if old.is_remote_endpoint:
            _realize_endpoint(net, doc, new_pol, reg)  # its provider address may move
            return doc
        nft.delete_port_mappings(net.id, removed)
        nft.add_port_mappings(net.id, [(p, e, old.ip_address, i) for p, e, i in added])
        if net.type != "transparent":
            apply_endpoint(net.id, host_ifname(old.id), old.ip_address, new_pol,  # (policy)
                           old_pol)
        if (old_pol.outbound_exceptions or new_pol.outbound_exceptions) and net.type == "nat":
            _refresh_outbound_exceptions(net, reg)
        if row["attach_state"] == "attached" and new_pol.max_egress_bytes:
            _apply_inside(row, lambda ipr: nl.set_tbf(ipr, row["ifname"],
                                                      new_pol.max_egress_bytes))
    except OSError as e:
        raise _os_error(old.id, op, e) from e
    return doc


def _norm(value: str) -> str:
    return value.replace(":", "-").upper()


def delete_endpoint(ref: str, *, roots: Roots | None = None) -> HNSEndpoint:
    """Delete an endpoint: detach it if attached, drop its port mappings and ACLs, and
    release its address and MAC. Returns it as it was."""
    op = "DeleteEndpoint"
    reg = registry(roots)
    row = _claim_for_delete(reg, "endpoint", ref, op)
    try:
        _finish_delete(reg, row)
    except OSError as e:
        raise _os_error(row["id"], op, e) from e
    return _endpoint_doc(row)


def _finish_delete(reg: Registry, row: sqlite3.Row) -> None:
    doc = _endpoint_doc(row)
    nrow = reg.query_one("SELECT * FROM networks WHERE id=?", (row["network_id"],))
    net = _network_doc(nrow) if nrow is not None else None
    _unplug(row, net)
    pol = endpoint_policies(doc.policies, doc.id, "DeleteEndpoint")
    _teardown_endpoint(net, doc, pol)
    reg.execute("DELETE FROM endpoints WHERE id=?", (row["id"],))
    if pol.outbound_exceptions and net is not None and net.type == "nat":
        _refresh_outbound_exceptions(net, reg)


def _unplug(row: sqlite3.Row, net: HNSNetwork | None) -> None:
    """Remove an endpoint's interface: the host-side veth (its peer goes with it), or for
    a transparent network the macvlan, which lives in the container's namespace only."""
    with nl.host() as ipr:
        nl.delete_link(ipr, host_ifname(row["id"]))
    if net is None or net.type != "transparent" or not row["netns_path"]:
        return
    mac = _colon_mac(_endpoint_doc(row).mac_address)
    try:
        fd = os.open(row["netns_path"], os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return  # the namespace is gone, and the macvlan with it
    try:
        if os.fstat(fd).st_ino != row["netns_ino"]:
            return
        with nl.in_netns(fd) as inner:
            nl.delete_links_with_mac(inner, mac)
    finally:
        os.close(fd)


# --------------------------------------------------------------------------- attachments


def _open_netns(path: str, id_: str, op: str) -> int:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as e:
        raise NetworkError(id_, op, ERR_ELEMENT_NOT_FOUND,
                           message=f"network namespace {path}: {e.strerror}") from e
    return fd


def _apply_inside(row: sqlite3.Row, action: Any) -> None:
    fd = os.open(row["netns_path"], os.O_RDONLY | os.O_CLOEXEC)
    try:
        if os.fstat(fd).st_ino != row["netns_ino"]:
            return  # the namespace it was attached to is gone
        with nl.in_netns(fd) as ipr:
            action(ipr)
    finally:
        os.close(fd)


def attach_endpoint(endpoint_id: str, netns_path: str, *, container_id: str = "",
                    roots: Roots | None = None) -> str:
    """Plug an endpoint into the network namespace at *netns_path*; return its interface name.

    *netns_path* is any path to a network namespace, typically ``/proc/<pid>/ns/net`` of
    a container's init. A veth pair is made: ``phv<id>`` stays on the host, in the
    network's bridge; its peer appears inside as ``eth0`` (``eth1``... if taken) with the
    endpoint's MAC and ``IPAddress/PrefixLength``, up, with ``lo`` up and a default route
    via ``GatewayAddress`` (unless the namespace has one already). On a transparent
    network the interface inside is a macvlan of the uplink instead (nothing stays on the
    host); on an overlay network its MTU is the VXLAN device's. A ``QOS`` policy shapes
    the interface's egress (tbf inside the namespace, where the container without
    CAP_NET_ADMIN cannot lift it). The attachment is recorded with *container_id* and the
    namespace's inode, which is the endpoint's compartment id
    (:func:`endpoint_compartment_id`).

    An endpoint is attached to one namespace at a time: attaching it again raises
    :class:`NetworkError` (``ERR_VMCOMPUTE_OPERATION_INVALID_STATE``); an unknown endpoint
    ``ERR_ELEMENT_NOT_FOUND``; a remote endpoint :class:`InvalidNetworkRequestError`. On
    any error nothing is left behind.
    """
    op = "AttachEndpoint"
    reg = registry(roots)
    fd = _open_netns(netns_path, endpoint_id, op)
    try:
        ino = os.fstat(fd).st_ino
        if ino == os.stat("/proc/thread-self/ns/net").st_ino:
            raise InvalidNetworkRequestError(
                endpoint_id, op, message="cannot attach an endpoint to the host's namespace")
        pid, start = _me()
        with reg.transaction() as c:
            row = c.execute("SELECT * FROM endpoints WHERE id=?",
                            (_norm_id(endpoint_id),)).fetchone()
            if row is None or row["state"] != "ready":
                raise _not_found("endpoint", endpoint_id, op)
            if row["attach_state"]:
                raise NetworkError(row["id"], op, ERR_VMCOMPUTE_OPERATION_INVALID_STATE,
                                   message=f"endpoint is already attached to "
                                   f"{row['container_id'] or row['netns_path']}")
            if _endpoint_doc(row).is_remote_endpoint:
                raise InvalidNetworkRequestError(row["id"], op, message="a remote endpoint "
                                                 "lives on another host: it cannot be attached")
            nrow = c.execute("SELECT * FROM networks WHERE id=?",
                             (row["network_id"],)).fetchone()
            c.execute("UPDATE endpoints SET attach_state='attaching', container_id=?, "
                      "netns_path=?, netns_ino=?, owner_pid=?, owner_start=? WHERE id=?",
                      (container_id, netns_path, ino, pid, start, row["id"]))
        ep = _endpoint_doc(row)
        net = _network_doc(nrow)
        pol = endpoint_policies(ep.policies, ep.id, op)
        try:
            ifname = _plug(net, ep, pol, fd)
        except BaseException as e:
            with nl.host() as ipr:
                nl.delete_link(ipr, host_ifname(ep.id))
            if net.type == "transparent":
                with nl.in_netns(fd) as inner:
                    nl.delete_links_with_mac(inner, _colon_mac(ep.mac_address))
            _clear_attachment(reg, ep.id)
            if isinstance(e, HcsError):
                raise
            if isinstance(e, OSError):
                raise _os_error(ep.id, op, e) from e
            raise
        reg.execute("UPDATE endpoints SET attach_state='attached', ifname=?, owner_pid=NULL, "
                    "owner_start=NULL WHERE id=?", (ifname, ep.id))
        return ifname
    finally:
        os.close(fd)


def _plug(net: HNSNetwork, ep: HNSEndpoint, pol: EndpointPolicies, fd: int) -> str:
    names = [f"eth{i}" for i in range(16)]
    host = host_ifname(ep.id)
    if net.type in ("nat", "l2bridge"):  # fast path: raw rtnetlink (policy/speed helper)
        ifname = _rtnl.plug_veth(bridge_name(net.id), host, fd, names,
                                 _colon_mac(ep.mac_address), ep.ip_address,
                                 ep.prefix_length, ep.gateway_address)
        if pol.max_egress_bytes:
            with nl.in_netns(fd) as inner:
                nl.set_tbf(inner, ifname, pol.max_egress_bytes)
        return ifname
    with nl.host() as ipr:
        if net.type == "transparent":
            if not nl.link_exists(ipr, net.network_adapter_name):
                raise NetworkError(ep.id, "AttachEndpoint", message="the network's uplink "
                                   f"{net.network_adapter_name!r} is missing")
            ifname = nl.create_macvlan_into(ipr, host, net.network_adapter_name, fd, names,
                                            _colon_mac(ep.mac_address))
        else:
            br = nl.index(ipr, bridge_name(net.id))
            if br is None:
                raise NetworkError(ep.id, "AttachEndpoint", message="the network's bridge is "
                                   "missing (run pyhcs network restore)")
            mtu = 0
            if net.type == "overlay":
                vx = nl.link_info(ipr, vxlan_name(net.id))
                mtu = vx.mtu if vx is not None else 0
            # the peer is made inside the namespace directly, MAC set: no rename, no move
            ifname = nl.create_veth_into(ipr, host, None, fd, names,
                                         _colon_mac(ep.mac_address), mtu)
            ipr.link("set", ifname=host, master=br, state="up")
    with nl.in_netns(fd) as inner:
        nl.configure_inside(inner, ifname, ep.ip_address, ep.prefix_length, ep.gateway_address)
        if pol.max_egress_bytes:
            nl.set_tbf(inner, ifname, pol.max_egress_bytes)
    return ifname


def _clear_attachment(reg: Registry, endpoint_id: str) -> None:
    reg.execute("UPDATE endpoints SET attach_state='', container_id='', netns_path='', "
                "netns_ino=0, ifname='', owner_pid=NULL, owner_start=NULL WHERE id=?",
                (endpoint_id,))


def detach_endpoint(endpoint_id: str, container_id: str = "", *,
                    roots: Roots | None = None) -> None:
    """Unplug an endpoint from the namespace it is attached to (its veth pair is deleted).

    If *container_id* is given it must be the one the endpoint was attached for. Detaching
    an endpoint that is not attached raises :class:`NetworkError`
    (``ERR_VMCOMPUTE_OPERATION_INVALID_STATE``). The endpoint itself, its address and port
    mappings stay: attach it again or delete it.
    """
    op = "DetachEndpoint"
    reg = registry(roots)
    pid, start = _me()
    with reg.transaction() as c:
        row = c.execute("SELECT * FROM endpoints WHERE id=?",
                        (_norm_id(endpoint_id),)).fetchone()
        if row is None or row["state"] != "ready":
            raise _not_found("endpoint", endpoint_id, op)
        if row["attach_state"] != "attached" or (container_id and
                                                 row["container_id"] != container_id):
            raise NetworkError(row["id"], op, ERR_VMCOMPUTE_OPERATION_INVALID_STATE,
                               message="endpoint is not attached"
                               + (f" to {container_id}" if container_id else ""))
        c.execute("UPDATE endpoints SET attach_state='detaching', owner_pid=?, owner_start=? "
                  "WHERE id=?", (pid, start, row["id"]))
        nrow = c.execute("SELECT * FROM networks WHERE id=?", (row["network_id"],)).fetchone()
    try:
        _unplug(row, _network_doc(nrow) if nrow is not None else None)
    except OSError as e:
        raise _os_error(row["id"], op, e) from e
    _clear_attachment(reg, row["id"])


def endpoint_statistics(endpoint_id: str, *, roots: Roots | None = None) -> NetworkStats:
    """The endpoint's traffic counters, as the container sees them.

    Read from the host side of its veth: what the host side receives the container sent
    (on a transparent network, from the macvlan inside the container's namespace). An
    endpoint that is not attached reports zeros. ``instance_id`` is the container id the
    endpoint is attached for.
    """
    reg = registry(roots)
    row = _endpoint_row(reg, endpoint_id, "EndpointStatistics")
    stats = None
    if row["attach_state"] == "attached":
        nrow = reg.query_one("SELECT type FROM networks WHERE id=?", (row["network_id"],))
        if nrow is not None and nrow["type"] == "transparent":
            inside: list[dict[str, int] | None] = []
            with contextlib.suppress(OSError):
                _apply_inside(row, lambda ipr: inside.append(nl.link_stats(ipr, row["ifname"])))
            # seen from inside: swap, so the keys read as from the host side below
            stats = {k.replace("rx_", "@").replace("tx_", "rx_").replace("@", "tx_"): v
                     for k, v in (inside[0] or {}).items()} if inside else None
        else:
            with nl.host() as ipr:
                stats = nl.link_stats(ipr, host_ifname(row["id"]))
    stats = stats or {}
    return NetworkStats(
        bytes_received=stats.get("tx_bytes", 0),
        bytes_sent=stats.get("rx_bytes", 0),
        packets_received=stats.get("tx_packets", 0),
        packets_sent=stats.get("rx_packets", 0),
        dropped_packets_incoming=stats.get("tx_dropped", 0),
        dropped_packets_outgoing=stats.get("rx_dropped", 0),
        endpoint_id=row["id"],
        instance_id=row["container_id"],
    )


def endpoint_compartment_id(endpoint_id: str, *, roots: Roots | None = None) -> int:
    """The compartment id of the namespace the endpoint is attached to (0 if not attached).

    A compartment id is the inode number of a network namespace (what ``ls -iL
    /proc/<pid>/ns/net`` shows): stable while the namespace lives, and a 32-bit value as
    Windows compartment ids are. :func:`set_current_thread_compartment_id` takes it.
    """
    row = _endpoint_row(registry(roots), endpoint_id, "EndpointCompartmentId")
    return int(row["netns_ino"]) if row["attach_state"] == "attached" else 0


def resolv_conf(endpoint: HNSEndpoint | str, *, search: list[str] | None = None,
                roots: Roots | None = None) -> str:
    """The ``/etc/resolv.conf`` content for a container using *endpoint* (a document or id).

    ``nameserver`` lines come from ``DNSServerList`` (comma-separated, as HNS writes it),
    ``search`` from ``DNSSuffix`` followed by *search* (a ContainerConfig's search list).
    Without DNS servers there are no ``nameserver`` lines (a caller may then fall back on
    the host's file).
    """
    ep = endpoint if isinstance(endpoint, HNSEndpoint) else get_endpoint(endpoint, roots=roots)
    lines = []
    domains = [d.strip() for d in ep.dns_suffix.split(",") if d.strip()] + list(search or [])
    if domains:
        lines.append("search " + " ".join(dict.fromkeys(domains)))
    for server in ep.dns_server_list.split(","):
        server = server.strip()
        if server:
            try:
                ipaddress.ip_address(server)
            except ValueError:
                continue  # never write a line the resolver would misread
            lines.append(f"nameserver {server}")
    return "".join(line + "\n" for line in lines)


# --------------------------------------------------------------------------- recovery


def recover(*, roots: Roots | None = None) -> list[str]:
    """Finish or undo what killed creators left half done; return the ids it cleaned.

    A network or endpoint row still ``creating`` / ``deleting`` whose owner process is dead
    is removed together with its kernel objects (bridge, veth, macvlan, VXLAN device, FDB
    and neighbour entries, nftables tables and elements) and allocations, and an uplink
    it had taken is given back as it was; an attachment left ``attaching`` /
    ``detaching`` is undone. Work of live owners is left alone, so this is safe to run at
    any time.
    """
    reg = registry(roots)
    cleaned: list[str] = []
    for row in reg.query("SELECT * FROM endpoints WHERE state!='ready' OR "
                         "attach_state IN ('attaching','detaching')"):
        if _owner_alive(row["owner_pid"], row["owner_start"]):
            continue
        if row["state"] == "ready":
            nrow = reg.query_one("SELECT * FROM networks WHERE id=?", (row["network_id"],))
            _unplug(row, _network_doc(nrow) if nrow is not None else None)
            _clear_attachment(reg, row["id"])
        else:
            _finish_delete(reg, row)
        cleaned.append(row["id"])
    for row in reg.query("SELECT * FROM networks WHERE state!='ready'"):
        if _owner_alive(row["owner_pid"], row["owner_start"]):
            continue
        _teardown_network(_network_doc(row), roots)
        reg.execute("DELETE FROM endpoints WHERE network_id=? AND state!='ready'",
                    (row["id"],))
        reg.execute("DELETE FROM networks WHERE id=?", (row["id"],))
        cleaned.append(row["id"])
    return cleaned


def restore(*, roots: Roots | None = None) -> list[str]:
    """Recreate what the registry holds but the kernel lost (e.g. after a reboot).

    Runs :func:`recover` first. Then every network whose kernel objects are missing (its
    bridge or tables; an l2bridge's hold on its uplink; an overlay's VXLAN device; a
    transparent network's uplink being up) is rebuilt with its endpoints' port mappings,
    ACLs, outbound-NAT exceptions and remote endpoints; an attachment whose namespace is
    gone (its container died with the reboot) is cleared, so the endpoint can be attached
    again. Networks that are intact are not touched, nor those whose uplink does not
    exist (there is nothing to rebuild them on; attaching to them says so). Returns the
    ids of the networks rebuilt.
    """
    recover(roots=roots)
    reg = registry(roots)
    rebuilt = []
    tables = set(nft.list_pyhcs_tables())
    for row in reg.query("SELECT * FROM networks WHERE state='ready' ORDER BY created"):
        net = _network_doc(row)
        if _network_intact(net, tables) is not False:
            continue
        try:
            _realize_network(net, network_policies(net.policies, net.id, "").outbound_exceptions,
                             roots)
            for erow in reg.query("SELECT * FROM endpoints WHERE network_id=? AND "
                                  "state='ready'", (net.id,)):
                ep = _endpoint_doc(erow)
                _realize_endpoint(net, ep, endpoint_policies(ep.policies, ep.id, ""), reg)
        except OSError as e:
            raise _os_error(net.id, "Restore", e) from e
        rebuilt.append(net.id)
    for erow in reg.query("SELECT * FROM endpoints WHERE attach_state='attached'"):
        if not _attachment_alive(erow, reg):
            with nl.host() as ipr:
                nl.delete_link(ipr, host_ifname(erow["id"]))
            _clear_attachment(reg, erow["id"])
    for prow in reg.query("SELECT id, doc FROM policy_lists ORDER BY created"):
        try:
            apply_policy_list(prow["id"], policy_list_balancers(json.loads(prow["doc"]),
                                                                "Restore", roots=roots))
        except OSError as e:
            raise _os_error(prow["id"], "Restore", e) from e
    return rebuilt


def policy_list_balancers(doc: dict[str, Any], op: str, *, roots: Roots | None = None
                          ) -> list[LoadBalancer]:
    """The load balancers of the policy list *doc* (hcsshim's JSON), over the current
    addresses of the endpoints it references (``/endpoints/<id>``; those that no longer
    exist are left out). Raises NetworkError for a bad policy."""
    backends = []
    for reference in doc.get("References", []):
        try:
            backends.append(get_endpoint(str(reference).rsplit("/", 1)[-1],
                                         roots=roots).ip_address)
        except NetworkError:
            continue
    return load_balancers(doc.get("Policies", []), backends, "", op)


def _attachment_alive(row: sqlite3.Row, reg: Registry) -> bool:
    try:
        if os.stat(row["netns_path"]).st_ino != row["netns_ino"]:
            return False
    except OSError:
        return False
    nrow = reg.query_one("SELECT type FROM networks WHERE id=?", (row["network_id"],))
    if nrow is None or nrow["type"] != "transparent":
        with nl.host() as ipr:
            return nl.link_exists(ipr, host_ifname(row["id"]))
    # a macvlan lives in the container's namespace only
    alive: list[bool] = []
    with contextlib.suppress(OSError):
        _apply_inside(row, lambda ipr: alive.append(nl.link_exists(ipr, row["ifname"])))
    return bool(alive and alive[0])
