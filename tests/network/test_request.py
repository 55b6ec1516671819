"""The HNS request API with hcsshim's JSON: create, list, get, update, delete; error shapes."""

from __future__ import annotations

import json
import os
import subprocess

import pytest

import pyhcs
from pyhcs import _network as hns
from pyhcs._paths import Roots
from pyhcs._registry import Registry
from pyhcs._schema import to_dict

from .conftest import interface_names, nft_table_names

NAT_NET = json.dumps({
    "Name": "natnet", "Type": "nat",
    "Subnets": [{"AddressPrefix": "10.88.0.0/24", "GatewayAddress": "10.88.0.1"}],
    "DNSServerList": "10.88.0.53,1.1.1.1", "DNSSuffix": "corp.example",
})


def _counts(roots: Roots) -> tuple[int, ...]:
    reg = Registry.open(roots.db_path)
    return tuple(reg.query(f"SELECT count(*) FROM {t}")[0][0] for t in
                 ("networks", "net_subnets", "endpoints", "ip_allocations",
                  "mac_allocations", "port_mappings", "policy_lists"))


def test_network_create_get_list_delete(roots: Roots) -> None:
    net = hns.hns_network_request("POST", "", NAT_NET)
    assert net.id and net.name == "natnet" and net.type == "nat"
    assert net.subnets[0].address_prefix == "10.88.0.0/24"
    assert net.mac_pools, "a network without MacPools gets one, as HNS does"
    assert hns.bridge_name(net.id) in interface_names()
    assert hns._nft.table_name(net.id) in nft_table_names()

    assert hns.hns_network_request("GET", net.id, "") == net
    assert hns.hns_network_request("GET", f"/networks/{net.id.lower()}", "") == net
    assert hns.get_network("natnet") == net
    assert hns.hns_list_network_request("GET", "", "") == [net]
    # the wire form is hcsshim's: PascalCase names, empty fields left out
    raw = json.loads(pyhcs.to_json(net))
    assert raw["Subnets"] == [{"AddressPrefix": "10.88.0.0/24", "GatewayAddress": "10.88.0.1"}]
    assert "NetworkAdapterName" not in raw

    gone = hns.hns_network_request("DELETE", net.id, "")
    assert gone.id == net.id
    assert hns.hns_list_network_request("GET", "", "") == []
    assert hns.bridge_name(net.id) not in interface_names()
    assert hns._nft.table_name(net.id) not in nft_table_names()
    assert _counts(roots) == (0, 0, 0, 0, 0, 0, 0)


def test_network_default_subnet_and_gateway() -> None:
    a = hns.create_network(pyhcs.HNSNetwork(name="a"))
    b = hns.create_network(pyhcs.HNSNetwork(name="b"))
    assert a.type == "nat"
    assert a.subnets[0].address_prefix == "172.28.0.0/24"
    assert a.subnets[0].gateway_address == "172.28.0.1"
    assert b.subnets[0].address_prefix == "172.28.1.0/24"
    hns.delete_network(a.id)
    hns.delete_network(b.id)


def test_endpoint_create_get_update_delete(roots: Roots) -> None:
    net = hns.hns_network_request("POST", "", NAT_NET)
    ep = hns.hns_endpoint_request("POST", "", json.dumps({
        "Name": "web", "VirtualNetwork": net.id,
        "Policies": [{"Type": "NAT", "Protocol": "TCP", "InternalPort": 80,
                      "ExternalPort": 8080}],
    }))
    assert ep.ip_address == "10.88.0.2" and ep.gateway_address == "10.88.0.1"
    assert ep.prefix_length == 24
    assert ep.virtual_network == net.id and ep.virtual_network_name == "natnet"
    assert ep.mac_address == net.mac_pools[0].start_mac_address
    assert ep.dns_server_list == "10.88.0.53,1.1.1.1" and ep.dns_suffix == "corp.example"
    assert hns.hns_endpoint_request("GET", ep.id, "") == ep
    assert hns.get_endpoint("web") == ep
    assert hns.hns_list_endpoint_request("GET", "", "") == [ep]
    assert "tcp . 8080 : 10.88.0.2 . 80" in _portmap(net.id)

    ep2 = hns.hns_endpoint_request("POST", "", json.dumps(
        {"VirtualNetworkName": "natnet", "IPAddress": "10.88.0.77",
         "MacAddress": "02:00:00:00:00:77"}))
    assert ep2.ip_address == "10.88.0.77" and ep2.mac_address == "02-00-00-00-00-77"

    # update: the mapping moves to another host port
    up = hns.hns_endpoint_request("POST", ep.id, json.dumps({
        "Policies": [{"Type": "NAT", "Protocol": "UDP", "InternalPort": 53,
                      "ExternalPort": 5353}]}))
    assert up.policies[0]["ExternalPort"] == 5353 and up.ip_address == ep.ip_address
    pm = _portmap(net.id)
    assert "8080" not in pm and "udp . 5353 : 10.88.0.2 . 53" in pm

    with pytest.raises(hns.NetworkError) as e:
        hns.hns_network_request("DELETE", net.id, "")
    assert "endpoint" in str(e.value)
    for x in (ep, ep2):
        assert hns.hns_endpoint_request("DELETE", x.id, "").id == x.id
    assert "5353" not in _portmap(net.id)
    hns.hns_network_request("DELETE", net.id, "")
    assert _counts(roots) == (0, 0, 0, 0, 0, 0, 0)


def _portmap(network_id: str) -> str:
    return subprocess.run(["nft", "list", "map", "ip", hns._nft.table_name(network_id),
                           "portmap"], capture_output=True, text=True, check=True).stdout


def test_released_address_is_reused() -> None:
    net = hns.create_network(pyhcs.HNSNetwork(name="n", subnets=[
        pyhcs.Subnet(address_prefix="10.89.0.0/29")]))
    eps = [hns.create_endpoint(pyhcs.HNSEndpoint(virtual_network=net.id)) for _ in range(5)]
    assert [e.ip_address for e in eps] == [f"10.89.0.{i}" for i in range(2, 7)]
    with pytest.raises(hns.NetworkError, match="no free address"):
        hns.create_endpoint(pyhcs.HNSEndpoint(virtual_network=net.id))
    hns.delete_endpoint(eps[1].id)
    again = hns.create_endpoint(pyhcs.HNSEndpoint(virtual_network=net.id))
    assert again.ip_address == "10.89.0.3"
    for e in [*eps[:1], *eps[2:], again]:
        hns.delete_endpoint(e.id)
    hns.delete_network(net.id)


BAD_REQUESTS = [
    # (function, method, path, body, error class, code or None, words in the message)
    ("net", "GET", "/nonsense/", "", hns.InvalidNetworkRequestError, None, "unknown path"),
    ("net", "PUT", "", NAT_NET, hns.InvalidNetworkRequestError, None, "method"),
    ("net", "POST", "", "{not json", hns.InvalidNetworkRequestError, None, "malformed JSON"),
    ("net", "POST", "", "", hns.InvalidNetworkRequestError, None, "JSON body"),
    ("net", "POST", "", json.dumps({"Name": "x", "Type": "bogus"}),
     hns.InvalidNetworkRequestError, None, "unknown network Type"),
    ("net", "POST", "", json.dumps({"Name": "x", "Policies": [{"Type": "Frobnicate"}]}),
     hns.InvalidNetworkRequestError, None, "unknown policy type"),
    ("net", "POST", "", json.dumps({"Name": "x", "Subnets": [{"AddressPrefix": "10.1.0.0/33"}]}),
     hns.InvalidNetworkRequestError, None, "AddressPrefix"),
    ("net", "POST", "", json.dumps({"Name": "x", "Subnets": [
        {"AddressPrefix": "10.1.0.0/24", "GatewayAddress": "10.2.0.1"}]}),
     hns.InvalidNetworkRequestError, None, "GatewayAddress"),
    ("net", "POST", "", json.dumps({"Name": "other", "Subnets": [
        {"AddressPrefix": "10.88.0.128/25"}]}),
     hns.InvalidNetworkRequestError, None, "overlaps"),
    ("net", "POST", "", json.dumps({"Name": "natnet", "Subnets": [
        {"AddressPrefix": "10.90.0.0/24"}]}),
     hns.NetworkError, pyhcs.ERR_ALREADY_EXISTS, "already exists"),
    ("net", "GET", "no-such-network", "", hns.NetworkError, pyhcs.ERR_ELEMENT_NOT_FOUND,
     "not found"),
    ("net", "DELETE", "", "", hns.InvalidNetworkRequestError, None, "needs a network id"),
    ("ep", "GET", "6F0A1B2C-0000-0000-0000-000000000000", "", hns.NetworkError,
     pyhcs.ERR_ELEMENT_NOT_FOUND, "not found"),
    ("ep", "POST", "", json.dumps({"Name": "e"}), hns.InvalidNetworkRequestError, None,
     "VirtualNetwork"),
    ("ep", "POST", "", json.dumps({"VirtualNetworkName": "natnet",
                                   "Policies": [{"Type": "Teleport"}]}),
     hns.InvalidNetworkRequestError, None, "unknown policy type"),
    ("ep", "POST", "", json.dumps({"VirtualNetworkName": "natnet", "Policies": [
        {"Type": "NAT", "Protocol": "SCTP", "InternalPort": 1, "ExternalPort": 2}]}),
     hns.InvalidNetworkRequestError, None, "TCP or UDP"),
    ("ep", "POST", "", json.dumps({"VirtualNetworkName": "natnet", "Policies": [
        {"Type": "NAT", "Protocol": "TCP", "InternalPort": 1, "ExternalPort": 70000}]}),
     hns.InvalidNetworkRequestError, None, "ExternalPort"),
    ("ep", "POST", "", json.dumps({"VirtualNetworkName": "natnet", "IPAddress": "10.77.0.5"}),
     hns.InvalidNetworkRequestError, None, "no subnet"),
    ("ep", "POST", "", json.dumps({"VirtualNetworkName": "natnet", "IPAddress": "10.88.0.1"}),
     hns.InvalidNetworkRequestError, None, "reserved"),
    ("ep", "POST", "", json.dumps({"VirtualNetworkName": "natnet", "IPAddress": "10.88.0.9"}),
     hns.NetworkError, pyhcs.ERR_ALREADY_EXISTS, "in use"),
    ("ep", "POST", "", json.dumps({"VirtualNetworkName": "natnet", "Name": "first"}),
     hns.NetworkError, pyhcs.ERR_ALREADY_EXISTS, "already exists"),
    ("ep", "POST", "", json.dumps({"VirtualNetworkName": "natnet", "Policies": [
        {"Type": "NAT", "Protocol": "TCP", "InternalPort": 80, "ExternalPort": 8080}]}),
     hns.NetworkError, pyhcs.ERR_ALREADY_EXISTS, "8080"),
    ("ep", "POST", "", json.dumps({"VirtualNetworkName": "nope"}), hns.NetworkError,
     pyhcs.ERR_ELEMENT_NOT_FOUND, "not found"),
    ("pl", "POST", "", json.dumps({"Policies": [{"Type": "Magic"}]}),
     hns.InvalidNetworkRequestError, None, "unknown policy type"),
    ("pl", "POST", "", json.dumps({"References": ["/endpoints/nope"]}),
     hns.InvalidNetworkRequestError, None, "unknown endpoint"),
]


@pytest.mark.parametrize(("fn", "method", "path", "body", "cls", "code", "words"), BAD_REQUESTS)
def test_bad_requests_raise_and_change_nothing(
    roots: Roots, fn: str, method: str, path: str, body: str, cls: type[Exception],
    code: pyhcs.ErrorCode | None, words: str,
) -> None:
    net = hns.hns_network_request("POST", "", NAT_NET)
    first = hns.hns_endpoint_request("POST", "", json.dumps({
        "Name": "first", "VirtualNetwork": net.id, "IPAddress": "10.88.0.9",
        "Policies": [{"Type": "NAT", "Protocol": "TCP", "InternalPort": 80,
                      "ExternalPort": 8080}]}))
    before = (_counts(roots), interface_names(), nft_table_names(), _portmap(net.id))
    call = {"net": hns.hns_network_request, "ep": hns.hns_endpoint_request,
            "pl": hns.hns_policy_list_request}[fn]
    with pytest.raises(cls) as e:
        call(method, path, body)
    assert isinstance(e.value, pyhcs.HcsError)
    assert str(e.value).count("HNS failed with error : ") == 1
    assert words in str(e.value)
    if code is not None:
        assert e.value.code is code
        assert pyhcs.is_not_exist(e.value) == (code is pyhcs.ERR_ELEMENT_NOT_FOUND)
    if cls is hns.InvalidNetworkRequestError:
        assert isinstance(e.value, pyhcs.InvalidConfigError)
    assert (_counts(roots), interface_names(), nft_table_names(), _portmap(net.id)) == before
    hns.delete_endpoint(first.id)
    hns.delete_network(net.id)


def test_host_port_held_by_a_socket_is_refused() -> None:
    import socket

    net = hns.create_network(pyhcs.HNSNetwork(name="n"))
    with socket.socket() as s:
        s.bind(("0.0.0.0", 0))
        s.listen()
        port = s.getsockname()[1]
        with pytest.raises(hns.NetworkError, match=f"tcp/{port} is already in use"):
            hns.create_endpoint(pyhcs.HNSEndpoint(virtual_network=net.id, policies=[
                to_dict(pyhcs.NatPolicy(protocol="TCP", internal_port=80,
                                              external_port=port))]))
    assert hns.list_endpoints() == []
    hns.delete_network(net.id)


def test_policy_lists(roots: Roots) -> None:
    net = hns.create_network(pyhcs.HNSNetwork(name="n"))
    ep = hns.create_endpoint(pyhcs.HNSEndpoint(virtual_network=net.id))
    pl = hns.hns_policy_list_request("POST", "", json.dumps({
        "References": [f"/endpoints/{ep.id}"],
        "Policies": [{"Type": "ELB", "VIPs": ["10.0.0.10"], "ExternalPort": 80,
                      "InternalPort": 8080, "Protocol": 6}]}))
    assert pl["ID"] and pl["References"] == [f"/endpoints/{ep.id}"]
    assert hns.hns_policy_list_request("GET", "", "") == [pl]
    assert hns.hns_policy_list_request("GET", pl["ID"], "") == pl
    assert hns.hns_policy_list_request("DELETE", pl["ID"], "") == pl
    assert hns.hns_policy_list_request("GET", "", "") == []
    hns.delete_endpoint(ep.id)
    hns.delete_network(net.id)


def test_nft_works_with_a_thousand_descriptors_open() -> None:
    # libnftables select()s on its socket and aborts the process if that descriptor is
    # 1024 or more: pyhcs must notice and use the nft command instead
    import resource

    from pyhcs._network import _nft

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard < 2048:
        pytest.skip("RLIMIT_NOFILE too low to open 1,100 descriptors")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 2048), hard))
    held: list[int] = []
    try:
        while len(held) < 1100:
            held.append(os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC))
        assert isinstance(_nft.list_pyhcs_tables(), list)  # and the process is still alive
    finally:
        for fd in held:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
