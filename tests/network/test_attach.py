"""Endpoints plugged into "container" namespaces: addresses, routes, traffic, port mappings."""

from __future__ import annotations

import os
import socket
import threading
from collections.abc import Callable, Iterator

import pytest
from pyroute2 import IPRoute  # type: ignore[import-untyped]

import pyhcs
from pyhcs import _network as hns
from pyhcs._schema import to_dict

from .conftest import Netns, Wire, inside, run_in, tcp_client, tcp_server, udp_socket


def _nat(proto: str, internal: int, external: int) -> dict[str, object]:
    return to_dict(pyhcs.NatPolicy(protocol=proto, internal_port=internal,
                                   external_port=external))


@pytest.fixture
def net() -> Iterator[pyhcs.HNSNetwork]:
    n = hns.create_network(pyhcs.HNSNetwork(name="nat", subnets=[
        pyhcs.Subnet(address_prefix="10.99.0.0/24", gateway_address="10.99.0.1")]))
    yield n
    for e in hns.list_endpoints():
        hns.delete_endpoint(e.id)
    hns.delete_network(n.id)


def _inner(ns: Netns) -> dict[str, object]:
    with inside(ns), IPRoute() as ipr:
        link = ipr.get_links(ipr.link_lookup(ifname="eth0")[0])[0]
        addrs = [(a.get("IFA_ADDRESS"), a["prefixlen"]) for a in ipr.get_addr(
            index=link["index"], family=socket.AF_INET)]
        routes = [r.get("RTA_GATEWAY") for r in ipr.get_default_routes(family=socket.AF_INET)]
        return {"mac": link.get("IFLA_ADDRESS"), "state": link.get("IFLA_OPERSTATE"),
                "addrs": addrs, "gateways": routes}


def test_attach_configures_the_interface_inside(
        net: pyhcs.HNSNetwork, make_ns: Callable[[], Netns]) -> None:
    c = make_ns()
    ep = hns.create_endpoint(pyhcs.HNSEndpoint(virtual_network=net.id))
    assert hns.attach_endpoint(ep.id, c.path, container_id="c1") == "eth0"
    got = _inner(c)
    assert got["mac"] == ep.mac_address.replace("-", ":").lower()
    assert got["addrs"] == [(ep.ip_address, 24)]
    assert got["gateways"] == ["10.99.0.1"]
    assert got["state"] == "UP"
    with IPRoute() as ipr:
        (host_veth,) = ipr.get_links(ipr.link_lookup(ifname=hns.host_ifname(ep.id))[0])
        bridge = ipr.link_lookup(ifname=hns.bridge_name(net.id))[0]
        assert host_veth.get("IFLA_MASTER") == bridge
    # a second endpoint in the same namespace becomes eth1
    ep2 = hns.create_endpoint(pyhcs.HNSEndpoint(virtual_network=net.id))
    assert hns.attach_endpoint(ep2.id, c.path, container_id="c1") == "eth1"
    with pytest.raises(hns.NetworkError) as e:
        hns.attach_endpoint(ep.id, c.path, container_id="c1")
    assert e.value.code is pyhcs.ERR_VMCOMPUTE_OPERATION_INVALID_STATE
    hns.detach_endpoint(ep2.id, "c1")
    hns.detach_endpoint(ep.id, "c1")
    with inside(c), IPRoute() as ipr:
        assert ipr.link_lookup(ifname="eth0") == []
    with IPRoute() as ipr:
        assert ipr.link_lookup(ifname=hns.host_ifname(ep.id)) == []
    with pytest.raises(hns.NetworkError):
        hns.detach_endpoint(ep.id, "c1")
    # detached, it can be attached again (to another container)
    d = make_ns()
    assert hns.attach_endpoint(ep.id, d.path, container_id="c2") == "eth0"


def test_container_reaches_the_gateway(net: pyhcs.HNSNetwork,
                                       make_ns: Callable[[], Netns]) -> None:
    c = make_ns()
    ep = hns.create_endpoint(pyhcs.HNSEndpoint(virtual_network=net.id))
    hns.attach_endpoint(ep.id, c.path, container_id="c")
    r = run_in(c, "busybox", "ping", "-c", "1", "-W", "5", "10.99.0.1")
    assert r.returncode == 0, r.stdout + r.stderr
    server = tcp_server_on_host(7777)
    try:
        client = tcp_client(c)
        client.connect(("10.99.0.1", 7777))
        conn, peer = server.accept()
        assert peer[0] == ep.ip_address
        client.sendall(b"hello")
        assert conn.recv(5) == b"hello"
        conn.close()
        client.close()
    finally:
        server.close()
    stats = hns.endpoint_statistics(ep.id)
    assert stats.endpoint_id == ep.id and stats.instance_id == "c"
    assert stats.bytes_sent > 0 and stats.packets_sent > 0
    assert stats.bytes_received > 0 and stats.packets_received > 0


def tcp_server_on_host(port: int) -> socket.socket:
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("0.0.0.0", port))
    s.listen(4)
    s.settimeout(10)
    return s


def _echo_once(server: socket.socket) -> threading.Thread:
    def serve() -> None:
        conn, _ = server.accept()
        with conn:
            conn.sendall(conn.recv(100).upper())

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    return t


def _echo(server_ns: Netns, port: int, client_ns: Netns, address: tuple[str, int],
          payload: bytes) -> None:
    """One TCP round trip: a server in *server_ns* on *port* answers *payload* upper-cased
    to a client in *client_ns* that connects to *address*."""
    server = tcp_server(server_ns, port)
    t = _echo_once(server)
    client = tcp_client(client_ns)
    try:
        client.connect(address)
        client.sendall(payload)
        assert client.recv(len(payload)) == payload.upper()
    finally:
        t.join(10)
        client.close()
        server.close()


def test_two_containers_talk_over_the_bridge(net: pyhcs.HNSNetwork,
                                             make_ns: Callable[[], Netns]) -> None:
    a, b = make_ns(), make_ns()
    ea = hns.create_endpoint(pyhcs.HNSEndpoint(virtual_network=net.id))
    eb = hns.create_endpoint(pyhcs.HNSEndpoint(virtual_network=net.id))
    hns.attach_endpoint(ea.id, a.path, container_id="a")
    hns.attach_endpoint(eb.id, b.path, container_id="b")
    _echo(b, 9000, a, (eb.ip_address, 9000), b"ping")


def test_tcp_and_udp_port_mappings_from_another_namespace(
        net: pyhcs.HNSNetwork, make_ns: Callable[[], Netns], wire: Wire) -> None:
    c = make_ns()
    ep = hns.create_endpoint(pyhcs.HNSEndpoint(virtual_network=net.id, policies=[
        _nat("TCP", 80, 8080), _nat("UDP", 53, 5353)]))
    hns.attach_endpoint(ep.id, c.path, container_id="c")
    _echo(c, 80, wire.outside, (wire.host_address, 8080), b"mapped")

    usrv = udp_socket(c)
    usrv.bind(("0.0.0.0", 53))
    ucli = udp_socket(wire.outside)
    ucli.sendto(b"query", (wire.host_address, 5353))
    data, peer = usrv.recvfrom(100)
    assert data == b"query"
    usrv.sendto(b"answer", peer)
    assert ucli.recvfrom(100)[0] == b"answer"
    usrv.close()
    ucli.close()

    # the host port is taken: a second mapping is refused and the first one stays
    with pytest.raises(hns.NetworkError) as e:
        hns.create_endpoint(pyhcs.HNSEndpoint(virtual_network=net.id, policies=[
            _nat("TCP", 81, 8080)]))
    assert e.value.code is pyhcs.ERR_ALREADY_EXISTS
    _echo(c, 80, wire.outside, (wire.host_address, 8080), b"still")


def test_container_reaches_outside_through_masquerade(
        net: pyhcs.HNSNetwork, make_ns: Callable[[], Netns], wire: Wire) -> None:
    c = make_ns()
    ep = hns.create_endpoint(pyhcs.HNSEndpoint(virtual_network=net.id))
    hns.attach_endpoint(ep.id, c.path, container_id="c")
    server = tcp_server(wire.outside, 7000)
    client = tcp_client(c)
    client.connect((wire.outside_address, 7000))
    conn, peer = server.accept()
    # the outside machine has no route to 10.99.0.0/24: it sees the host's address
    assert peer[0] == wire.host_address
    conn.close()
    client.close()
    server.close()


def test_resolv_conf_from_dns_fields() -> None:
    ep = pyhcs.HNSEndpoint(dns_server_list="10.0.0.53, 1.1.1.1,bogus", dns_suffix="a.example")
    assert hns.resolv_conf(ep, search=["b.example"]) == (
        "search a.example b.example\nnameserver 10.0.0.53\nnameserver 1.1.1.1\n")
    assert hns.resolv_conf(pyhcs.HNSEndpoint()) == ""


def test_qos_policy_shapes_the_container_egress(
        net: pyhcs.HNSNetwork, make_ns: Callable[[], Netns]) -> None:
    c = make_ns()
    ep = hns.create_endpoint(pyhcs.HNSEndpoint(virtual_network=net.id, policies=[
        to_dict(pyhcs.QosPolicy(maximum_outgoing_bandwidth_in_bytes=1_250_000))]))
    hns.attach_endpoint(ep.id, c.path, container_id="c")
    r = run_in(c, "tc", "qdisc", "show", "dev", "eth0")
    assert "tbf" in r.stdout and "10Mbit" in r.stdout, r.stdout


def test_compartment_ids(net: pyhcs.HNSNetwork, make_ns: Callable[[], Netns],
                         host: Netns) -> None:
    c = make_ns()
    ep = hns.create_endpoint(pyhcs.HNSEndpoint(virtual_network=net.id))
    assert hns.endpoint_compartment_id(ep.id) == 0
    hns.attach_endpoint(ep.id, c.path, container_id="c")
    cid = hns.endpoint_compartment_id(ep.id)
    assert cid == c.ino
    # in a child process: the host namespace a process returns to is its own
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        ok = False
        try:
            def own() -> int:
                return os.stat("/proc/thread-self/ns/net").st_ino

            hns.set_current_thread_compartment_id(cid)
            inside_ok = own() == cid and hns.get_current_thread_compartment_id() == cid
            with socket.socket() as s:  # a socket opened now lives in the compartment
                s.bind((ep.ip_address, 0))
            hns.set_current_thread_compartment_id(0)
            ok = inside_ok and own() == host.ino and hns.get_current_thread_compartment_id() == 0
            try:
                hns.set_current_thread_compartment_id(12345)
                ok = False
            except hns.NetworkError as e:
                ok = ok and pyhcs.is_not_exist(e)
        finally:
            os.write(w, b"1" if ok else b"0")
            os._exit(0)
    os.close(w)
    assert os.read(r, 1) == b"1"
    os.close(r)
    os.waitpid(pid, 0)
