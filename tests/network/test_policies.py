"""Endpoint and policy-list policies enforced on the real kernel: ACLs, VLANs, QoS, outbound
NAT exceptions and ELB load balancers, observed with real traffic between namespaces."""

from __future__ import annotations

import json
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

import pyhcs
from pyhcs import _network as hns
from pyhcs._network._nft import lb_table_name, list_pyhcs_tables
from pyhcs._schema import to_dict

from .conftest import Netns, Wire, tcp_client, tcp_server, udp_socket

#: How long traffic that should be dropped is given to arrive anyway: past TCP's first
#: SYN retransmission (at 1 s), so one lost packet is not taken for a drop rule.
BLOCKED_WAIT = 2.5
#: How long traffic that should pass is waited for (a slow, loaded machine).
PASS_WAIT = 10.0


@pytest.fixture
def net() -> Iterator[pyhcs.HNSNetwork]:
    n = hns.create_network(pyhcs.HNSNetwork(name="pol", subnets=[
        pyhcs.Subnet(address_prefix="10.98.0.0/24", gateway_address="10.98.0.1")]))
    yield n
    for pl in hns.hns_policy_list_request("GET", "", ""):
        hns.hns_policy_list_request("DELETE", pl["ID"], "")
    for e in hns.list_endpoints():
        hns.delete_endpoint(e.id)
    hns.delete_network(n.id)


def _endpoint(net: pyhcs.HNSNetwork, ns: Netns, policies: list[dict[str, Any]] | None = None,
              ) -> pyhcs.HNSEndpoint:
    ep = hns.create_endpoint(pyhcs.HNSEndpoint(virtual_network=net.id,
                                               policies=policies or []))
    hns.attach_endpoint(ep.id, ns.path, container_id=ep.id)
    return ep


def _acl(action: str, direction: str, **fields: object) -> dict[str, object]:
    return {"Type": "ACL", "Action": action, "Direction": direction, **fields}


def tcp_reaches(src: Netns, dst: Netns, address: str, port: int,
                wait: float = PASS_WAIT) -> bool:
    """True if a TCP connection from *src* to *address*:*port* (served in *dst*) carries
    data both ways; False if its packets are dropped (the connection times out)."""
    server = tcp_server(dst, port)
    client = tcp_client(src)
    client.settimeout(wait)
    try:
        try:
            client.connect((address, port))
        except TimeoutError:
            return False
        conn, _ = server.accept()
        with conn:
            client.sendall(b"ping")
            assert conn.recv(4) == b"ping"
            conn.sendall(b"pong")
            assert client.recv(4) == b"pong"
        return True
    finally:
        client.close()
        server.close()


def tcp_blocked(src: Netns, dst: Netns, address: str, port: int) -> bool:
    """True if a TCP connection as in :func:`tcp_reaches` never gets through."""
    return not tcp_reaches(src, dst, address, port, BLOCKED_WAIT)


def udp_reaches(src: Netns, dst: Netns, address: str, port: int,
                wait: float = PASS_WAIT) -> bool:
    """True if UDP datagrams from *src* reach *address*:*port* (bound in *dst*) within
    *wait* seconds (one is sent every 0.2 s: a single lost datagram proves nothing)."""
    receiver = udp_socket(dst)
    sender = udp_socket(src)
    try:
        receiver.bind(("0.0.0.0", port))
        receiver.settimeout(0.2)
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            sender.sendto(b"datagram", (address, port))
            try:
                return receiver.recv(100) == b"datagram"
            except TimeoutError:
                continue
        return False
    finally:
        sender.close()
        receiver.close()


def udp_blocked(src: Netns, dst: Netns, address: str, port: int) -> bool:
    """True if no datagram sent as in :func:`udp_reaches` arrives."""
    return not udp_reaches(src, dst, address, port, BLOCKED_WAIT)


# --------------------------------------------------------------------------- ACLs


def test_acls_block_and_allow_by_port_protocol_and_address(
        net: pyhcs.HNSNetwork, make_ns: Callable[[], Netns], host: Netns) -> None:
    c, d, f, g = make_ns(), make_ns(), make_ns(), make_ns()
    ep_d, ep_f, ep_g = _endpoint(net, d), _endpoint(net, f), _endpoint(net, g)
    ep_c = _endpoint(net, c, [
        _acl("Block", "In", Protocols="6", LocalPorts="81", Priority=100),
        _acl("Block", "In", Protocol=17, Priority=100),
        _acl("Block", "In", RemoteAddresses=ep_f.ip_address, Priority=100),
        _acl("Block", "Out", Protocols="TCP", RemotePorts="82", Priority=100),
        _acl("Block", "Out", RemoteAddresses=f"{ep_g.ip_address}/32", Priority=100),
    ])
    c_ip, d_ip = ep_c.ip_address, ep_d.ip_address
    # in: by port, by protocol, by remote address; other traffic passes
    assert tcp_reaches(d, c, c_ip, 80)
    assert tcp_blocked(d, c, c_ip, 81)
    assert udp_blocked(d, c, c_ip, 5353)
    assert tcp_blocked(f, c, c_ip, 80)
    # the host (the gateway) is held to the same rules
    assert tcp_reaches(host, c, c_ip, 80)
    assert tcp_blocked(host, c, c_ip, 81)
    # out: by remote port, by remote address; UDP out is allowed
    assert tcp_reaches(c, d, d_ip, 80)
    assert tcp_blocked(c, d, d_ip, 82)
    assert udp_reaches(c, d, d_ip, 5353)
    assert tcp_blocked(c, g, ep_g.ip_address, 80)
    assert tcp_blocked(c, host, "10.98.0.1", 82)
    # stateful: answers pass although their direction is blocked for that peer
    assert tcp_reaches(c, f, ep_f.ip_address, 80)
    assert tcp_reaches(g, c, c_ip, 80)
    # the endpoints without ACLs are not affected
    assert tcp_reaches(d, f, ep_f.ip_address, 81)

    # priorities: the lowest first, the first match decides
    hns.update_endpoint(ep_c.id, pyhcs.HNSEndpoint(policies=[
        _acl("Block", "In", Priority=200),
        _acl("Allow", "In", Protocols="6", LocalPorts="83", Priority=100),
    ]))
    assert tcp_reaches(d, c, c_ip, 83)
    assert tcp_blocked(d, c, c_ip, 80)
    assert udp_blocked(d, c, c_ip, 5353)
    assert tcp_reaches(c, d, d_ip, 82)          # the Out rules are gone
    # an Allow of one endpoint does not lift the other endpoint's Block
    hns.update_endpoint(ep_d.id, pyhcs.HNSEndpoint(policies=[
        _acl("Allow", "Out", Priority=100)]))
    assert tcp_blocked(d, c, c_ip, 80)

    # no ACLs: everything passes again
    hns.update_endpoint(ep_c.id, pyhcs.HNSEndpoint(policies=[]))
    assert tcp_reaches(d, c, c_ip, 81)
    assert udp_reaches(d, c, c_ip, 5353)


def test_acls_are_removed_with_their_endpoint(
        net: pyhcs.HNSNetwork, make_ns: Callable[[], Netns]) -> None:
    c, d = make_ns(), make_ns()
    _endpoint(net, d)
    ep = _endpoint(net, c, [_acl("Block", "In", Protocols="6", LocalPorts="80")])
    assert tcp_blocked(d, c, ep.ip_address, 80)
    # ACLs dropped by an update, then the endpoint deleted: nothing of them stays
    hns.update_endpoint(ep.id, pyhcs.HNSEndpoint(policies=[]))
    assert tcp_reaches(d, c, ep.ip_address, 80)
    hns.delete_endpoint(ep.id)
    assert hns.host_ifname(ep.id).lower() not in _ruleset()
    # a new endpoint given the same address starts without the old one's ACLs...
    c2 = make_ns()
    ep2 = _endpoint(net, c2)
    assert ep2.ip_address == ep.ip_address
    assert tcp_reaches(d, c2, ep2.ip_address, 80)
    hns.delete_endpoint(ep2.id)
    # ...and can have ACLs of its own
    c3 = make_ns()
    ep3 = _endpoint(net, c3, [_acl("Block", "In", Protocols="6", LocalPorts="81")])
    assert ep3.ip_address == ep.ip_address
    assert tcp_reaches(d, c3, ep3.ip_address, 80)
    assert tcp_blocked(d, c3, ep3.ip_address, 81)
    hns.delete_endpoint(ep3.id)
    assert hns.host_ifname(ep3.id).lower() not in _ruleset()


def _ruleset() -> str:
    return subprocess.run(["nft", "list", "ruleset"], capture_output=True, text=True,
                          check=True).stdout


def test_bad_acls_are_refused(net: pyhcs.HNSNetwork) -> None:
    for bad in (_acl("Maybe", "In"), _acl("Block", "Sideways"),
                _acl("Block", "In", LocalPorts="80"),             # ports without protocol
                _acl("Block", "In", Protocols="1", LocalPorts="80"),
                _acl("Block", "In", RemoteAddresses="10.0.0.300")):
        with pytest.raises(hns.InvalidNetworkRequestError):
            hns.create_endpoint(pyhcs.HNSEndpoint(virtual_network=net.id, policies=[bad]))
    assert hns.list_endpoints() == []


# --------------------------------------------------------------------------- VLANs


def test_vlans_isolate_endpoints_of_one_network(
        net: pyhcs.HNSNetwork, make_ns: Callable[[], Netns], host: Netns) -> None:
    a1, a2, b1, u = make_ns(), make_ns(), make_ns(), make_ns()

    def vlan(v: int) -> list[dict[str, Any]]:
        return [to_dict(pyhcs.VlanPolicy(vlan=v))]

    ep_a1, ep_a2 = _endpoint(net, a1, vlan(10)), _endpoint(net, a2, vlan(10))
    ep_b1, ep_u = _endpoint(net, b1, vlan(20)), _endpoint(net, u)
    # same VLAN: reachable, both ways
    assert tcp_reaches(a1, a2, ep_a2.ip_address, 80)
    assert tcp_reaches(a2, a1, ep_a1.ip_address, 80)
    # other VLAN, or untagged: not even ARP crosses
    assert tcp_blocked(a1, b1, ep_b1.ip_address, 80)
    assert tcp_blocked(b1, a1, ep_a1.ip_address, 80)
    assert udp_blocked(a1, b1, ep_b1.ip_address, 5353)
    assert tcp_blocked(u, a1, ep_a1.ip_address, 80)
    assert tcp_blocked(a1, u, ep_u.ip_address, 80)
    # the host (gateway) serves every VLAN
    assert tcp_reaches(host, b1, ep_b1.ip_address, 80)
    assert tcp_reaches(a1, host, "10.98.0.1", 80)
    # moving an endpoint to the other VLAN moves its reachability
    hns.update_endpoint(ep_b1.id, pyhcs.HNSEndpoint(policies=vlan(10)))
    assert tcp_reaches(a1, b1, ep_b1.ip_address, 80)
    hns.update_endpoint(ep_b1.id, pyhcs.HNSEndpoint(policies=[]))
    assert tcp_blocked(a1, b1, ep_b1.ip_address, 80)
    assert tcp_reaches(u, b1, ep_b1.ip_address, 80)
    hns.delete_endpoint(ep_b1.id)
    assert hns.host_ifname(ep_b1.id).lower() not in _ruleset()
    # a deleted tagged endpoint's port leaves no rule behind for the next one
    hns.delete_endpoint(ep_a2.id)
    n = make_ns()
    ep_n = _endpoint(net, n)
    assert tcp_reaches(u, n, ep_n.ip_address, 80)


# --------------------------------------------------------------------------- QoS


_SO_SNDBUFFORCE, _SO_RCVBUFFORCE = 32, 33  # root may exceed net.core.[wr]mem_max


def _throughput(sender_ns: Netns, receiver_ns: Netns, address: str, port: int,
                seconds: float) -> float:
    """Bytes per second a TCP stream from *sender_ns* delivers, measured at the receiver
    after the first half second (the token bucket's initial burst is not counted)."""
    server = tcp_server(receiver_ns, port)
    client = tcp_client(sender_ns)
    # deep socket buffers keep the kernel sending (and receiving) while the machine is
    # busy and these threads are not scheduled: what is measured is the shaping
    server.setsockopt(socket.SOL_SOCKET, _SO_RCVBUFFORCE, 8 << 20)
    client.setsockopt(socket.SOL_SOCKET, _SO_SNDBUFFORCE, 8 << 20)
    client.connect((address, port))
    conn, _ = server.accept()
    stop = threading.Event()

    def send() -> None:
        chunk = b"x" * (1 << 20)
        try:
            while not stop.is_set():
                client.sendall(chunk)
        except OSError:
            pass

    t = threading.Thread(target=send, daemon=True)
    t.start()
    buf = bytearray(1 << 20)
    try:
        start = time.monotonic()
        while time.monotonic() - start < 0.5:
            conn.recv_into(buf)
        counted, t0 = 0, time.monotonic()
        while (elapsed := time.monotonic() - t0) < seconds:
            counted += conn.recv_into(buf)
        return counted / elapsed
    finally:
        stop.set()
        client.close()
        conn.close()
        server.close()
        t.join(5)


def test_qos_limits_the_endpoint_egress_throughput(
        net: pyhcs.HNSNetwork, make_ns: Callable[[], Netns], host: Netns) -> None:
    limit = 10_000_000  # bytes per second
    c, d, r = make_ns(), make_ns(), make_ns()
    _endpoint(net, c, [to_dict(pyhcs.QosPolicy(maximum_outgoing_bandwidth_in_bytes=limit))])
    ep_r = _endpoint(net, r)
    _endpoint(net, d)
    # to the host, and to another container of the network
    for dst, address in ((host, "10.98.0.1"), (r, ep_r.ip_address)):
        # never above the limit; at it in at least one of three tries, as a machine busy
        # with other work can delay the shaper's dequeues (tokens past the burst are lost)
        samples: list[float] = []
        while len(samples) < 3 and not any(x >= 0.8 * limit for x in samples):
            samples.append(_throughput(c, dst, address, 9000, 2.0))
            assert samples[-1] <= 1.2 * limit, f"{samples[-1] / 1e6:.2f} MB/s to {address}"
        assert max(samples) >= 0.8 * limit, f"{samples} B/s to {address}"
    # the limit is the endpoint's own: an endpoint without QoS is much faster
    assert _throughput(d, r, ep_r.ip_address, 9001, 1.0) > 3 * limit


# --------------------------------------------------------------------------- outbound NAT


def _source_seen(src: Netns, outside: Netns, address: str, port: int) -> str:
    server = tcp_server(outside, port)
    client = tcp_client(src)
    try:
        client.connect((address, port))
        conn, peer = server.accept()
        conn.close()
        return str(peer[0])
    finally:
        client.close()
        server.close()


def test_outbound_nat_exceptions_keep_the_source_address(
        net: pyhcs.HNSNetwork, make_ns: Callable[[], Netns], wire: Wire) -> None:
    c, e = make_ns(), make_ns()
    ep_c = _endpoint(net, c)
    ep_e = _endpoint(net, e, [{"Type": "OutBoundNAT", "ExceptionList": ["192.0.2.0/24"]}])
    out = wire.outside_address
    # masqueraded: the outside sees the host's address
    assert _source_seen(c, wire.outside, out, 8080) == wire.host_address
    # an exception of one endpoint: its own address arrives, the other is still masqueraded
    assert _source_seen(e, wire.outside, out, 8080) == ep_e.ip_address
    assert _source_seen(c, wire.outside, out, 8080) == wire.host_address
    # exceptions follow updates
    hns.update_endpoint(ep_c.id, pyhcs.HNSEndpoint(policies=[
        {"Type": "OutBoundNAT", "ExceptionList": ["192.0.2.2/32"]}]))
    assert _source_seen(c, wire.outside, out, 8080) == ep_c.ip_address
    hns.update_endpoint(ep_e.id, pyhcs.HNSEndpoint(policies=[]))
    assert _source_seen(e, wire.outside, out, 8080) == wire.host_address


def test_network_outbound_nat_exceptions_cover_every_endpoint(
        make_ns: Callable[[], Netns], wire: Wire) -> None:
    n = hns.create_network(pyhcs.HNSNetwork(name="ex", policies=[
        {"Type": "OutBoundNAT", "ExceptionList": ["192.0.2.0/24"]}], subnets=[
        pyhcs.Subnet(address_prefix="10.97.0.0/24")]))
    try:
        c = make_ns()
        ep = _endpoint(n, c)
        assert _source_seen(c, wire.outside, wire.outside_address, 8080) == ep.ip_address
        hns.delete_endpoint(ep.id)
    finally:
        hns.delete_network(n.id)


# --------------------------------------------------------------------------- policy lists


def _serve_identity(ns: Netns, port: int, name: bytes) -> tuple[socket.socket,
                                                                threading.Thread]:
    server = tcp_server(ns, port)

    def serve() -> None:
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            with conn:
                conn.sendall(name)

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    return server, t


def _ask(src: Netns, address: str, port: int) -> bytes:
    client = tcp_client(src)
    try:
        client.connect((address, port))
        return client.recv(16)
    finally:
        client.close()


def test_elb_policy_list_balances_a_vip_over_endpoints(
        net: pyhcs.HNSNetwork, make_ns: Callable[[], Netns], wire: Wire) -> None:
    b1, b2, client = make_ns(), make_ns(), make_ns()
    ep1, ep2 = _endpoint(net, b1), _endpoint(net, b2)
    _endpoint(net, client)
    servers = [_serve_identity(b1, 8080, b"one"), _serve_identity(b2, 8080, b"two")]
    vip = "10.96.0.10"
    try:
        # nothing answers the VIP before the policy list exists
        probe = tcp_client(client)
        probe.settimeout(BLOCKED_WAIT)
        with pytest.raises(OSError):
            probe.connect((vip, 80))
        probe.close()
        pl = hns.hns_policy_list_request("POST", "", json.dumps({
            "References": [f"/endpoints/{ep1.id}", f"/endpoints/{ep2.id}"],
            "Policies": [{"Type": "ELB", "VIPs": [vip], "Protocol": 6,
                          "ExternalPort": 80, "InternalPort": 8080}]}))
        # from a container of the network (hairpin through the host) and from outside:
        # round robin over both endpoints
        for src in (client, wire.outside):
            got = [_ask(src, vip, 80) for _ in range(4)]
            assert sorted(got) == [b"one", b"one", b"two", b"two"], got
            assert got[0] != got[1]
        # other ports of the VIP are not forwarded
        probe = tcp_client(wire.outside)
        probe.settimeout(BLOCKED_WAIT)
        with pytest.raises(OSError):
            probe.connect((vip, 8080))
        probe.close()
        # a reboot-like loss of the list's rules: restore brings them back
        table = lb_table_name(pl["ID"])
        subprocess.run(["nft", "delete", "table", "ip", table], check=True)
        assert ("ip", table) not in list_pyhcs_tables()
        probe = tcp_client(client)
        probe.settimeout(BLOCKED_WAIT)
        with pytest.raises(OSError):
            probe.connect((vip, 80))
        probe.close()
        hns.restore()
        assert ("ip", table) in list_pyhcs_tables()
        got = [_ask(client, vip, 80) for _ in range(2)]
        assert sorted(got) == [b"one", b"two"], got
        hns.hns_policy_list_request("DELETE", pl["ID"], "")
        probe = tcp_client(client)
        probe.settimeout(BLOCKED_WAIT)
        with pytest.raises(OSError):
            probe.connect((vip, 80))
        probe.close()
    finally:
        for server, t in servers:
            server.close()
            t.join(5)


def test_bad_elb_policies_are_refused(net: pyhcs.HNSNetwork) -> None:
    ep = hns.create_endpoint(pyhcs.HNSEndpoint(virtual_network=net.id))
    refs = [f"/endpoints/{ep.id}"]
    for refs_, pol in ((refs, {"Type": "ELB", "VIPs": ["10.96.0.300"], "ExternalPort": 80}),
                       (refs, {"Type": "ELB", "Protocol": 1, "ExternalPort": 80}),
                       ([], {"Type": "ELB", "VIPs": ["10.96.0.1"], "ExternalPort": 80})):
        with pytest.raises(hns.InvalidNetworkRequestError):
            hns.hns_policy_list_request("POST", "", json.dumps({
                "References": refs_, "Policies": [pol]}))
    assert hns.hns_policy_list_request("GET", "", "") == []
