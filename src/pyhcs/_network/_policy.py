"""HNS policies: each ``Policies`` entry checked, and the nftables side of enforcing them.

Policy entries are JSON objects told apart by ``"Type"`` (matched case-insensitively, as
HNS does). An unknown type, a missing or invalid field raises
:class:`InvalidNetworkRequestError`: a request with a policy pyhcs cannot enforce is
refused rather than half applied.

How each is enforced (the rules themselves are in :mod:`._nft`):

* ``NAT``: a port-map element of the network's ``ip`` table (DNAT of the host's ports);
* ``QOS``: a tbf qdisc on the endpoint's interface inside the container (the service);
* ``ACL``: a chain per endpoint and direction in the network's ``ip`` table, reached by
  the endpoint's address; stateful (conntrack); traffic between endpoints of one bridge
  goes through it by br_netfilter, which :func:`apply_endpoint` turns on for the bridge;
* ``VLAN``: isolation between the bridge's ports by nftables in the ``bridge`` family
  (this kernel has no bridge VLAN filtering and no 802.1Q): frames never cross from a
  port of one VLAN to a port of another, or between tagged and untagged ports;
* ``OutBoundNAT``: its ``ExceptionList`` prefixes are destinations the endpoint reaches
  without masquerade (its own source address kept);
* policy lists' ``ELB``: a table per policy list DNATing the VIPs round robin to the
  referenced endpoints (:func:`apply_policy_list`).
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from typing import Any

from pyhcs._errors import InvalidConfigError
from pyhcs._network import _nft as nft
from pyhcs._network import _rtnl
from pyhcs._network._errors import InvalidNetworkRequestError
from pyhcs._network._nft import Acl, LoadBalancer
from pyhcs._schema import NatPolicy, PaPolicy, QosPolicy, VlanPolicy, VsidPolicy, from_dict

__all__ = [
    "EndpointPolicies",
    "NetworkPolicies",
    "endpoint_policies",
    "network_policies",
    "apply_endpoint",
    "remove_endpoint",
    "load_balancers",
    "apply_policy_list",
    "remove_policy_list",
]

#: Endpoint policy types pyhcs enforces (upper case).
ENDPOINT_TYPES = frozenset({"NAT", "QOS", "ACL", "OUTBOUNDNAT", "VLAN", "VSID", "PA"})
#: Network (and subnet) policy types pyhcs enforces.
NETWORK_TYPES = frozenset({"VLAN", "VSID", "OUTBOUNDNAT"})

_PROTOCOLS = {"tcp": 6, "udp": 17, "icmp": 1}


@dataclass
class EndpointPolicies:
    """An endpoint's policies, checked: what attach and the NAT tables need."""

    port_mappings: list[tuple[str, int, int]] = field(default_factory=list)  # proto, ext, int
    max_egress_bytes: int = 0          # 0: no limit
    acls: list[Acl] = field(default_factory=list)
    outbound_exceptions: list[str] = field(default_factory=list)
    vlan: int = 0
    vsid: int = 0
    provider_address: str = ""


@dataclass
class NetworkPolicies:
    """A network's policies, checked."""

    vlan: int = 0
    vsid: int = 0
    outbound_exceptions: list[str] = field(default_factory=list)


def _lower_keys(entry: dict[str, Any]) -> dict[str, Any]:
    return {str(k).lower(): v for k, v in entry.items()}


def _type(entry: object, where: str, allowed: frozenset[str], op: str) -> str:
    if not isinstance(entry, dict):
        raise InvalidNetworkRequestError(where, op, message="a policy must be a JSON object")
    t = _lower_keys(entry).get("type")
    if not isinstance(t, str) or t.upper() not in allowed:
        raise InvalidNetworkRequestError(
            where, op, message=f"unknown policy type {t!r} (expected one of "
            f"{', '.join(sorted(allowed))})")
    return t.upper()


def _load(cls: Any, entry: dict[str, Any], where: str, op: str) -> Any:
    try:
        return from_dict(cls, entry)
    except InvalidConfigError as e:
        raise InvalidNetworkRequestError(where, op, message=e._message or str(e)) from e


def _csv(value: object, where: str, what: str, op: str) -> list[str]:
    if value is None or value == "":
        return []
    if isinstance(value, list):
        items = [str(v).strip() for v in value]
    elif isinstance(value, str):
        items = [v.strip() for v in value.split(",")]
    else:
        raise InvalidNetworkRequestError(where, op, message=f"{what}: expected a string")
    return [i for i in items if i]


def _prefixes(value: object, where: str, what: str, op: str) -> list[str]:
    out = []
    for item in _csv(value, where, what, op):
        try:
            net = ipaddress.IPv4Network(item, strict=False)
        except ValueError as e:
            raise InvalidNetworkRequestError(
                where, op, message=f"{what}: {item!r} is not an IPv4 address or prefix") from e
        out.append(str(net))
    return out


def _ports(value: object, where: str, what: str, op: str) -> list[int]:
    out = []
    for item in _csv(value, where, what, op):
        if not item.isdigit() or not 0 < int(item) <= 0xFFFF:
            raise InvalidNetworkRequestError(where, op, message=f"{what}: bad port {item!r}")
        out.append(int(item))
    return out


def _acl(entry: dict[str, Any], where: str, op: str) -> Acl:
    e = _lower_keys(entry)
    action = str(e.get("action", "")).lower()
    if action not in ("allow", "block"):
        raise InvalidNetworkRequestError(where, op, message="ACL Action must be Allow or Block")
    direction = str(e.get("direction", "")).lower()
    if direction not in ("in", "out"):
        raise InvalidNetworkRequestError(where, op, message="ACL Direction must be In or Out")
    protocols: list[int] = []
    # hcsshim has both Protocols (a list in a string) and Protocol (one number); 256 is
    # HNS's "any protocol"
    single = e.get("protocol")
    items = _csv(e.get("protocols"), where, "ACL Protocols", op)
    if single not in (None, 0, ""):
        items.append(str(single))
    for p in items:
        if p == "256":
            protocols = []
            break
        if p.isdigit() and int(p) <= 255:
            protocols.append(int(p))
        elif p.lower() in _PROTOCOLS:
            protocols.append(_PROTOCOLS[p.lower()])
        else:
            raise InvalidNetworkRequestError(where, op, message=f"ACL Protocols: bad {p!r}")
    protocols = list(dict.fromkeys(protocols))
    local_ports = _ports(e.get("localports"), where, "ACL LocalPorts", op)
    remote_ports = _ports(e.get("remoteports"), where, "ACL RemotePorts", op)
    for key, ports in (("localport", local_ports), ("remoteport", remote_ports)):
        one = e.get(key)
        if one not in (None, 0, ""):
            ports += _ports(str(one), where, f"ACL {key}", op)
    if (local_ports or remote_ports) and (not protocols or set(protocols) - {6, 17}):
        raise InvalidNetworkRequestError(
            where, op, message="ACL ports need Protocols of TCP (6) and/or UDP (17) only")
    priority = e.get("priority", 0)
    if not isinstance(priority, int) or isinstance(priority, bool) or not 0 <= priority <= 0xFFFF:
        raise InvalidNetworkRequestError(where, op, message="ACL Priority must be 0..65535")
    return Acl(
        action="accept" if action == "allow" else "drop",
        direction=direction,
        protocols=tuple(protocols),
        local_addresses=tuple(_prefixes(e.get("localaddresses"), where, "ACL LocalAddresses",
                                        op)),
        remote_addresses=tuple(_prefixes(e.get("remoteaddresses"), where,
                                         "ACL RemoteAddresses", op)),
        local_ports=tuple(local_ports),
        remote_ports=tuple(remote_ports),
        priority=priority,
    )


def endpoint_policies(policies: list[dict[str, Any]], where: str, op: str) -> EndpointPolicies:
    """Check an endpoint's ``Policies``; raises :class:`InvalidNetworkRequestError`."""
    out = EndpointPolicies()
    seen: set[tuple[str, int]] = set()
    for entry in policies:
        t = _type(entry, where, ENDPOINT_TYPES, op)
        if t == "NAT":
            nat: NatPolicy = _load(NatPolicy, entry, where, op)
            proto = (nat.protocol or "TCP").lower()
            if proto not in ("tcp", "udp"):
                raise InvalidNetworkRequestError(
                    where, op, message=f"NAT Protocol must be TCP or UDP, not {nat.protocol!r}")
            if not nat.external_port or not nat.internal_port:
                raise InvalidNetworkRequestError(
                    where, op, message="NAT needs ExternalPort and InternalPort (1..65535)")
            if (proto, nat.external_port) in seen:
                raise InvalidNetworkRequestError(
                    where, op, message=f"host port {proto}/{nat.external_port} mapped twice")
            seen.add((proto, nat.external_port))
            out.port_mappings.append((proto, nat.external_port, nat.internal_port))
        elif t == "QOS":
            qos: QosPolicy = _load(QosPolicy, entry, where, op)
            # tc's rate is 32-bit bytes/s in its classic form; beyond ~4 GB/s is no limit
            if not 0 < qos.maximum_outgoing_bandwidth_in_bytes < 2**32:
                raise InvalidNetworkRequestError(
                    where, op, message="QOS MaximumOutgoingBandwidthInBytes must be 1..2^32-1")
            out.max_egress_bytes = qos.maximum_outgoing_bandwidth_in_bytes
        elif t == "ACL":
            out.acls.append(_acl(entry, where, op))
        elif t == "OUTBOUNDNAT":
            out.outbound_exceptions += _nat_exceptions(entry, where, op)
        elif t == "VLAN":
            out.vlan = _vlan(entry, where, op)
        elif t == "VSID":
            out.vsid = _vsid(entry, where, op)
        elif t == "PA":
            pa: PaPolicy = _load(PaPolicy, entry, where, op)
            try:
                out.provider_address = str(ipaddress.IPv4Address(pa.pa))
            except ValueError as e:
                raise InvalidNetworkRequestError(
                    where, op, message=f"PA {pa.pa!r} is not an IPv4 address") from e
    return out


def _vlan(entry: dict[str, Any], where: str, op: str) -> int:
    vlan: VlanPolicy = _load(VlanPolicy, entry, where, op)
    if not 1 <= vlan.vlan <= 4094:
        raise InvalidNetworkRequestError(where, op, message="VLAN must be 1..4094")
    return vlan.vlan


def _vsid(entry: dict[str, Any], where: str, op: str) -> int:
    vsid: VsidPolicy = _load(VsidPolicy, entry, where, op)
    if not 1 <= vsid.vsid < 2**24:
        raise InvalidNetworkRequestError(where, op, message="VSID must be 1..2^24-1")
    return vsid.vsid


def _nat_exceptions(entry: dict[str, Any], where: str, op: str) -> list[str]:
    return _prefixes(_lower_keys(entry).get("exceptionlist"), where,
                     "OutBoundNAT ExceptionList", op)


def network_policies(policies: list[dict[str, Any]], where: str, op: str) -> NetworkPolicies:
    """Check a network's (or a subnet's) ``Policies``."""
    out = NetworkPolicies()
    for entry in policies:
        t = _type(entry, where, NETWORK_TYPES, op)
        if t == "VLAN":
            out.vlan = _vlan(entry, where, op)
        elif t == "VSID":
            out.vsid = _vsid(entry, where, op)
        elif t == "OUTBOUNDNAT":
            out.outbound_exceptions += _nat_exceptions(entry, where, op)
    return out


# --------------------------------------------------------------------------- enforcing


def _bridge_name(network_id: str) -> str:
    # the service's naming (not imported: the service imports this module)
    return "phbr" + network_id.replace("-", "").lower()[:10]


def _bridge_through_conntrack(network_id: str) -> None:
    """Make the network's bridged IPv4 go through the ``ip`` hooks (and conntrack).

    The per-bridge form of ``net.bridge.bridge-nf-call-iptables``: ACLs live in the
    ``ip`` family, where conntrack makes them stateful, and must also see what one
    endpoint sends another over the bridge. Nothing to do if the bridge does not exist
    (a network without one has no bridged traffic).
    """
    _rtnl.bridge_nf_call_iptables(_bridge_name(network_id))


def apply_endpoint(network_id: str, host_ifname: str, address: str, pol: EndpointPolicies,
                   old: EndpointPolicies | None = None) -> None:
    """Enforce an endpoint's ACLs and VLAN, replacing those of *old* (an update).

    *host_ifname* is the endpoint's bridge port (it need not exist yet: rules are keyed by
    its name), *address* its IPv4 address. Raises ``OSError`` (:class:`~._nft.NftError`,
    netlink errors) for the service to translate.
    """
    # what is no longer wanted is removed, not left empty: remove_endpoint only knows the
    # endpoint's current policies
    if pol.acls:
        _bridge_through_conntrack(network_id)
        nft.set_endpoint_acls(network_id, host_ifname, pol.acls, address)
    elif old is not None and old.acls:
        nft.delete_endpoint_acls(network_id, host_ifname, address)
    old_vlan = old.vlan if old is not None else 0
    if pol.vlan:
        nft.set_endpoint_vlan(network_id, host_ifname, pol.vlan, old_vlan)
    elif old_vlan:
        nft.delete_endpoint_vlan(network_id, host_ifname, old_vlan)


def remove_endpoint(network_id: str, host_ifname: str, address: str,
                    pol: EndpointPolicies) -> None:
    """Undo :func:`apply_endpoint` (what is already gone is skipped)."""
    if pol.acls:
        nft.delete_endpoint_acls(network_id, host_ifname, address)
    if pol.vlan:
        nft.delete_endpoint_vlan(network_id, host_ifname, pol.vlan)


def _ipv4(value: object, where: str, what: str, op: str) -> str:
    try:
        return str(ipaddress.IPv4Address(str(value).strip()))
    except ValueError as e:
        raise InvalidNetworkRequestError(
            where, op, message=f"{what}: {value!r} is not an IPv4 address") from e


def load_balancers(policies: list[dict[str, Any]], backends: list[str], where: str,
                   op: str) -> list[LoadBalancer]:
    """Check a policy list's ``Policies``; return its ``ELB`` policies over *backends*.

    *backends* are the addresses of the endpoints the list references. An ``ELB``
    (hcsshim's ``ELBPolicy``: ``Protocol`` 6 or 17, ``InternalPort``, ``ExternalPort``,
    ``VIPs``, ``SourceVIP``, ``ILB``) sends what reaches a VIP (or, without VIPs, any
    address of the host) on ``ExternalPort`` to one backend after the other at
    ``InternalPort``; the backends see the host's address as the source (``SourceVIP`` if
    given), so their answers come back through the host. ``ILB`` is accepted: internal and
    external balancers are enforced alike. ``ROUTE`` policies are checked for their type
    only and not enforced.
    """
    out = []
    for entry in policies:
        t = _type(entry, where, frozenset({"ELB", "ROUTE"}), op)
        if t != "ELB":
            continue
        e = _lower_keys(entry)
        proto = e.get("protocol") or 6
        if proto not in (6, 17):
            raise InvalidNetworkRequestError(where, op, message="ELB Protocol must be 6 (TCP) "
                                             "or 17 (UDP)")
        ports = []
        for key in ("externalport", "internalport"):
            v = e.get(key) or 0
            if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v <= 0xFFFF:
                raise InvalidNetworkRequestError(where, op, message=f"ELB {key}: bad port")
            ports.append(v)
        vips = e.get("vips") or []
        if not isinstance(vips, list):
            raise InvalidNetworkRequestError(where, op, message="ELB VIPs must be a list")
        if not backends:
            raise InvalidNetworkRequestError(where, op, message="an ELB policy needs endpoint "
                                             "references")
        source = e.get("sourcevip") or ""
        out.append(LoadBalancer(
            protocol=proto, external_port=ports[0], internal_port=ports[1],
            vips=tuple(_ipv4(v, where, "ELB VIPs", op) for v in vips),
            backends=tuple(backends),
            source_vip=_ipv4(source, where, "ELB SourceVIP", op) if source else ""))
    return out


def apply_policy_list(policy_list_id: str, lbs: list[LoadBalancer]) -> None:
    """Enforce a policy list's load balancers (a table of its own, replaced as a whole)."""
    if lbs:
        nft.set_load_balancers(policy_list_id, lbs)


def remove_policy_list(policy_list_id: str) -> None:
    """Stop enforcing a policy list (nothing happens if it had no load balancer)."""
    nft.delete_load_balancers(policy_list_id)
