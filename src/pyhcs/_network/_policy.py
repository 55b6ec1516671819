"""Reading HNS policies: each ``Policies`` entry checked and turned into what the service applies.

Policy entries are JSON objects told apart by ``"Type"`` (matched case-insensitively, as
HNS does). An unknown type, a missing or invalid field raises
:class:`InvalidNetworkRequestError`: a request with a policy pyhcs cannot enforce is
refused rather than half applied.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from typing import Any

from pyhcs._errors import InvalidConfigError
from pyhcs._network._errors import InvalidNetworkRequestError
from pyhcs._network._nft import Acl
from pyhcs._schema import NatPolicy, PaPolicy, QosPolicy, VlanPolicy, VsidPolicy, from_dict

__all__ = ["EndpointPolicies", "NetworkPolicies", "endpoint_policies", "network_policies"]

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
    for p in _csv(e.get("protocols"), where, "ACL Protocols", op):
        if p.isdigit() and int(p) <= 255:
            protocols.append(int(p))
        elif p.lower() in _PROTOCOLS:
            protocols.append(_PROTOCOLS[p.lower()])
        else:
            raise InvalidNetworkRequestError(where, op, message=f"ACL Protocols: bad {p!r}")
    local_ports = _ports(e.get("localports"), where, "ACL LocalPorts", op)
    remote_ports = _ports(e.get("remoteports"), where, "ACL RemotePorts", op)
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
            out.outbound_exceptions += _prefixes(
                _lower_keys(entry).get("exceptionlist"), where, "OutBoundNAT ExceptionList", op)
        elif t == "VLAN":
            vlan: VlanPolicy = _load(VlanPolicy, entry, where, op)
            if not 1 <= vlan.vlan <= 4094:
                raise InvalidNetworkRequestError(where, op, message="VLAN must be 1..4094")
            out.vlan = vlan.vlan
        elif t == "VSID":
            vsid: VsidPolicy = _load(VsidPolicy, entry, where, op)
            if not 1 <= vsid.vsid < 2**24:
                raise InvalidNetworkRequestError(where, op, message="VSID must be 1..2^24-1")
            out.vsid = vsid.vsid
        elif t == "PA":
            pa: PaPolicy = _load(PaPolicy, entry, where, op)
            try:
                out.provider_address = str(ipaddress.IPv4Address(pa.pa))
            except ValueError as e:
                raise InvalidNetworkRequestError(
                    where, op, message=f"PA {pa.pa!r} is not an IPv4 address") from e
    return out


def network_policies(policies: list[dict[str, Any]], where: str, op: str) -> NetworkPolicies:
    """Check a network's (or a subnet's) ``Policies``."""
    out = NetworkPolicies()
    for entry in policies:
        t = _type(entry, where, NETWORK_TYPES, op)
        if t == "VLAN":
            vlan: VlanPolicy = _load(VlanPolicy, entry, where, op)
            if not 1 <= vlan.vlan <= 4094:
                raise InvalidNetworkRequestError(where, op, message="VLAN must be 1..4094")
            out.vlan = vlan.vlan
        elif t == "VSID":
            vsid: VsidPolicy = _load(VsidPolicy, entry, where, op)
            if not 1 <= vsid.vsid < 2**24:
                raise InvalidNetworkRequestError(where, op, message="VSID must be 1..2^24-1")
            out.vsid = vsid.vsid
        elif t == "OUTBOUNDNAT":
            out.outbound_exceptions += _prefixes(
                _lower_keys(entry).get("exceptionlist"), where, "OutBoundNAT ExceptionList", op)
    return out
