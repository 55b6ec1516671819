"""Host networking (HNS) documents: networks, endpoints, subnets, MAC pools and policies.

``policies`` fields are Go's ``[]json.RawMessage``: each entry is a JSON object kept as a
``dict`` whose ``"Type"`` says which policy it is. Build one from a policy document with
``to_dict(NatPolicy(...))`` and read it back with ``from_dict(NatPolicy, entry)``.
"""

import ipaddress
from typing import Any

import msgspec

from pyhcs._schema._codec import Document, UInt, UInt8, UInt16, UInt32, UInt64

__all__ = [
    "HNSEndpoint",
    "HNSNetwork",
    "MacPool",
    "NatPolicy",
    "PaPolicy",
    "QosPolicy",
    "Subnet",
    "VlanPolicy",
    "VsidPolicy",
]

_SUBNET_NAMES = {
    "address_prefix": "AddressPrefix",
    "gateway_address": "GatewayAddress",
    "policies": "Policies",
}


class Subnet(Document, rename=_SUBNET_NAMES):
    """One subnet of a network: its prefix in CIDR form, its gateway and its policies."""

    address_prefix: str = ""
    gateway_address: str = ""
    policies: list[dict[str, Any]] = msgspec.field(default_factory=list)


_MAC_POOL_NAMES = {
    "start_mac_address": "StartMacAddress",
    "end_mac_address": "EndMacAddress",
}


class MacPool(Document, rename=_MAC_POOL_NAMES):
    """A range of MAC addresses a network hands to its endpoints, bounds included."""

    start_mac_address: str = ""
    end_mac_address: str = ""


_HNS_NETWORK_NAMES = {
    "id": "Id",
    "name": "Name",
    "type": "Type",
    "network_adapter_name": "NetworkAdapterName",
    "source_mac": "SourceMac",
    "policies": "Policies",
    "mac_pools": "MacPools",
    "subnets": "Subnets",
    "dns_suffix": "DNSSuffix",
    "dns_server_list": "DNSServerList",
    "dns_server_compartment": "DNSServerCompartment",
    "management_ip": "ManagementIP",
}


class HNSNetwork(Document, rename=_HNS_NETWORK_NAMES):
    """A host network (HNS): its driver ``type`` (e.g. ``"nat"``), subnets and settings.

    ``dns_server_list`` is one comma-separated string, as in HNS.
    """

    id: str = ""
    name: str = ""
    type: str = ""
    network_adapter_name: str = ""
    source_mac: str = ""
    policies: list[dict[str, Any]] = msgspec.field(default_factory=list)
    mac_pools: list[MacPool] = msgspec.field(default_factory=list)
    subnets: list[Subnet] = msgspec.field(default_factory=list)
    dns_suffix: str = ""
    dns_server_list: str = ""
    dns_server_compartment: UInt32 = 0
    management_ip: str = ""


_HNS_ENDPOINT_NAMES = {
    "id": "Id",
    "name": "Name",
    "virtual_network": "VirtualNetwork",
    "virtual_network_name": "VirtualNetworkName",
    "policies": "Policies",
    "mac_address": "MacAddress",
    "ip_address": "IPAddress",
    "dns_suffix": "DNSSuffix",
    "dns_server_list": "DNSServerList",
    "gateway_address": "GatewayAddress",
    "enable_internal_dns": "EnableInternalDNS",
    "prefix_length": "PrefixLength",
    "is_remote_endpoint": "IsRemoteEndpoint",
}


class HNSEndpoint(Document, rename=_HNS_ENDPOINT_NAMES):
    """A network endpoint (HNS) that a container attaches to; ``virtual_network`` is a network id.

    ``ip_address`` is Go's ``net.IP`` as text: empty (no address) or an IPv4/IPv6 address.
    Anything else raises ``ValueError`` on construction and :class:`InvalidConfigError`
    on loading: unlike other documents, this one checks itself when built.
    """

    id: str = ""
    name: str = ""
    virtual_network: str = ""
    virtual_network_name: str = ""
    policies: list[dict[str, Any]] = msgspec.field(default_factory=list)
    mac_address: str = ""
    ip_address: str = ""
    dns_suffix: str = ""
    dns_server_list: str = ""
    gateway_address: str = ""
    enable_internal_dns: bool = False
    prefix_length: UInt8 = 0
    is_remote_endpoint: bool = False

    def __post_init__(self) -> None:
        # Go's net.IP cannot hold text that is not an address, so neither can this field.
        # Zones ("fe80::1%eth0") are not part of a net.IP. A ValueError here becomes the
        # InvalidConfigError of from_json.
        if not isinstance(self.ip_address, str) or not self.ip_address:
            return
        try:
            ipaddress.ip_address(self.ip_address)
            valid = "%" not in self.ip_address
        except ValueError:
            valid = False
        if not valid:
            raise ValueError(f"invalid IPAddress {self.ip_address!r}")


# Policy documents are written whole, never omitting a default: Go's policy structs have no
# omitempty, and "Type" must always be there for a reader to tell policies apart.

_NAT_POLICY_NAMES = {
    "type": "Type",
    "protocol": "Protocol",
    "internal_port": "InternalPort",
    "external_port": "ExternalPort",
}


class NatPolicy(Document, omit_defaults=False, rename=_NAT_POLICY_NAMES):
    """An endpoint port mapping: ``external_port`` on the host to ``internal_port`` inside."""

    type: str = "NAT"
    protocol: str = ""
    internal_port: UInt16 = 0
    external_port: UInt16 = 0


_QOS_POLICY_NAMES = {
    "type": "Type",
    "maximum_outgoing_bandwidth_in_bytes": "MaximumOutgoingBandwidthInBytes",
}


class QosPolicy(Document, omit_defaults=False, rename=_QOS_POLICY_NAMES):
    """An endpoint's outgoing bandwidth limit (``MaximumOutgoingBandwidthInBytes``)."""

    type: str = "QOS"
    maximum_outgoing_bandwidth_in_bytes: UInt64 = 0


_VLAN_POLICY_NAMES = {
    "type": "Type",
    "vlan": "VLAN",
}


class VlanPolicy(Document, omit_defaults=False, rename=_VLAN_POLICY_NAMES):
    """Tags a network's or endpoint's traffic with a VLAN id."""

    type: str = "VLAN"
    vlan: UInt = 0


_VSID_POLICY_NAMES = {
    "type": "Type",
    "vsid": "VSID",
}


class VsidPolicy(Document, omit_defaults=False, rename=_VSID_POLICY_NAMES):
    """Assigns a virtual subnet id (network virtualization) to a network or endpoint."""

    type: str = "VSID"
    vsid: UInt = 0


_PA_POLICY_NAMES = {
    "type": "Type",
    "pa": "PA",
}


class PaPolicy(Document, omit_defaults=False, rename=_PA_POLICY_NAMES):
    """Sets the provider address (network virtualization) of an endpoint."""

    type: str = "PA"
    pa: str = ""
