"""l2bridge, transparent and overlay networks, each on real interfaces in the test's namespaces.

An "uplink" is one end of a veth whose other end sits in an "outside" namespace playing the
physical segment (TEST-NET-1 addresses). The overlay test plays two machines: two
namespaces joined by a veth "wire", each with its own pyhcs roots and its own overlay
network, a busybox container on each, and TCP between the containers through VXLAN.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from pyroute2 import IPRoute  # type: ignore[import-untyped]

import pyhcs
from pyhcs import _network as hns
from pyhcs._network import _netlink, _nft
from pyhcs._network._service import vxlan_name
from pyhcs._paths import Roots
from pyhcs._schema import to_dict

from ..compute.conftest import run
from .conftest import (
    Netns,
    inside,
    interface_names,
    killed_in,
    nft_table_names,
    run_cli,
    run_in,
    tcp_client,
    tcp_server,
)

SEGMENT = "192.0.2.0/24"
HOST_ADDRESS = "192.0.2.1"
OUTSIDE_ADDRESS = "192.0.2.2"


@dataclass
class Uplink:
    """``up0`` on the host (192.0.2.1/24, a static route and an alias), its peer outside."""

    outside: Netns
    name: str = "up0"


def _make_uplink(outside: Netns, up: bool) -> Uplink:
    with IPRoute() as ipr:
        ipr.link("add", ifname="up0", kind="veth",
                 peer={"ifname": "eth0", "net_ns_fd": outside.fd})
        idx = ipr.link_lookup(ifname="up0")[0]
        ipr.addr("add", index=idx, address=HOST_ADDRESS, prefixlen=24)
        ipr.addr("add", index=idx, address="192.0.2.7", prefixlen=24, label="up0:7")
        ipr.link("set", index=idx, state="up")
        # a route the kernel does not derive from an address: it must move and come back
        ipr.route("add", dst="198.51.100.0/24", gateway=OUTSIDE_ADDRESS)
        if not up:
            ipr.link("set", index=idx, state="down")
    with inside(outside), IPRoute() as ipr:
        idx = ipr.link_lookup(ifname="eth0")[0]
        ipr.addr("add", index=idx, address=OUTSIDE_ADDRESS, prefixlen=24)
        ipr.link("set", index=idx, state="up")
    return Uplink(outside)


@pytest.fixture
def uplink(make_ns: Callable[[], Netns]) -> Uplink:
    """An uplink that is up."""
    return _make_uplink(make_ns(), up=True)


def _ip(*argv: str) -> str:
    return subprocess.run(["ip", *argv], capture_output=True, text=True, check=True).stdout


def _uplink_state(name: str = "up0") -> dict[str, Any]:
    """What ``ip`` says of the uplink: flags, master, IPv4 addresses, routes (all tables)."""
    link = _ip("-o", "link", "show", name)
    flags = re.search(r"<([^>]*)>", link)
    addrs = [line.split("valid_lft")[0].split(None, 2)[2].strip()
             for line in _ip("-o", "-4", "addr", "show", "dev", name).splitlines()]
    routes = [line.strip() for fam in ("-4", "-6")
              for line in _ip(fam, "route", "show", "table", "all", "dev", name).splitlines()
              if "table local" not in line]
    return {"flags": flags.group(1) if flags else "", "master": " master " in link,
            "addresses": sorted(addrs), "routes": sorted(routes)}


def _peer_of(server: Any) -> str:
    """Accept one connection on *server*, return the peer's address."""
    conn, (addr, _) = server.accept()
    conn.close()
    return str(addr)


def _cleanup(roots: Roots | None = None) -> None:
    for e in hns.list_endpoints(roots=roots):
        with contextlib.suppress(pyhcs.HcsError):
            hns.delete_endpoint(e.id, roots=roots)
    for n in hns.list_networks(roots=roots):
        with contextlib.suppress(pyhcs.HcsError):
            hns.delete_network(n.id, roots=roots)


@pytest.fixture(autouse=True)
def _no_leftovers() -> Iterator[None]:
    yield
    _cleanup()


# --------------------------------------------------------------------------- l2bridge


def test_l2bridge_puts_endpoints_on_the_uplink_segment_and_gives_it_back(
        uplink: Uplink, make_ns: Callable[[], Netns]) -> None:
    before = _uplink_state()
    links, tables = interface_names(), nft_table_names()
    net = hns.create_network(pyhcs.HNSNetwork(
        name="l2", type="l2bridge", network_adapter_name="up0",
        subnets=[pyhcs.Subnet(address_prefix=SEGMENT, gateway_address=OUTSIDE_ADDRESS)]))
    br = hns.bridge_name(net.id)
    # the bridge holds the uplink, and the host's addresses and routes moved with it
    assert " master " + br in _ip("-o", "link", "show", "up0")
    assert f"{HOST_ADDRESS}/24" in _ip("-o", "-4", "addr", "show", "dev", br)
    assert "198.51.100.0/24 via 192.0.2.2" in _ip("route", "show", "dev", br)
    assert _ip("-o", "-4", "addr", "show", "dev", "up0") == ""
    server = tcp_server(uplink.outside, 7001)
    with contextlib.closing(server):
        c = socket.create_connection((OUTSIDE_ADDRESS, 7001), timeout=10)
        # the host itself still reaches the segment, with its own address
        assert _peer_of(server) == HOST_ADDRESS
        c.close()

    ep = hns.create_endpoint(pyhcs.HNSEndpoint(ip_address="192.0.2.10"), network=net.id)
    assert ep.gateway_address == OUTSIDE_ADDRESS and ep.prefix_length == 24
    ctr = make_ns()
    hns.attach_endpoint(ep.id, ctr.path, container_id="c1")
    # outside -> container: straight to its address on the segment
    server = tcp_server(ctr, 7002)
    with contextlib.closing(server):
        c = tcp_client(uplink.outside)
        c.connect(("192.0.2.10", 7002))
        assert _peer_of(server) == OUTSIDE_ADDRESS
        c.close()
    # container -> outside: no NAT, the outside sees the container's own address
    server = tcp_server(uplink.outside, 7003)
    with contextlib.closing(server):
        c = tcp_client(ctr)
        c.connect((OUTSIDE_ADDRESS, 7003))
        assert _peer_of(server) == "192.0.2.10"
        c.close()
    assert hns.endpoint_statistics(ep.id).packets_sent > 0

    hns.delete_endpoint(ep.id)
    hns.delete_network(net.id)
    assert _uplink_state() == before
    assert interface_names() == links and nft_table_names() == tables


def test_l2bridge_gives_a_down_uplink_back_down(make_ns: Callable[[], Netns]) -> None:
    _make_uplink(make_ns(), up=False)
    before = _uplink_state()
    assert "UP" not in before["flags"].split(",")
    net = hns.create_network(pyhcs.HNSNetwork(
        name="l2", type="l2bridge", network_adapter_name="up0",
        subnets=[pyhcs.Subnet(address_prefix=SEGMENT, gateway_address=OUTSIDE_ADDRESS)]))
    assert "UP" in _uplink_state()["flags"].split(",")
    hns.delete_network(net.id)
    assert _uplink_state() == before


def test_uplink_networks_refuse_bad_requests(uplink: Uplink) -> None:
    subnet = [pyhcs.Subnet(address_prefix=SEGMENT, gateway_address=OUTSIDE_ADDRESS)]
    before = _uplink_state()
    for bad in (pyhcs.HNSNetwork(name="x", type="l2bridge", subnets=subnet),
                pyhcs.HNSNetwork(name="x", type="transparent", network_adapter_name="nope0"),
                pyhcs.HNSNetwork(name="x", type="l2bridge", network_adapter_name="up0"),
                pyhcs.HNSNetwork(name="x", type="l2bridge", network_adapter_name="lo",
                                 subnets=subnet),
                pyhcs.HNSNetwork(name="x", type="nat", policies=[
                    to_dict(pyhcs.VsidPolicy(vsid=5))])):
        with pytest.raises(hns.InvalidNetworkRequestError):
            hns.create_network(bad)
    net = hns.create_network(pyhcs.HNSNetwork(name="a", type="l2bridge",
                                              network_adapter_name="up0", subnets=subnet))
    # one network per uplink
    with pytest.raises(hns.InvalidNetworkRequestError, match="already serves"):
        hns.create_network(pyhcs.HNSNetwork(name="b", type="transparent",
                                            network_adapter_name="up0"))
    # NAT policies and remote endpoints need other network types
    nat = to_dict(pyhcs.NatPolicy(protocol="TCP", internal_port=80, external_port=8080))
    with pytest.raises(hns.InvalidNetworkRequestError):
        hns.create_endpoint(pyhcs.HNSEndpoint(policies=[nat]), network=net.id)
    with pytest.raises(hns.InvalidNetworkRequestError, match="overlay"):
        hns.create_endpoint(pyhcs.HNSEndpoint(
            ip_address="192.0.2.50", mac_address="02-00-00-00-00-50", is_remote_endpoint=True,
            policies=[to_dict(pyhcs.PaPolicy(pa="10.0.0.2"))]), network=net.id)
    assert [n.name for n in hns.list_networks()] == ["a"]
    hns.delete_network(net.id)
    assert _uplink_state() == before


# --------------------------------------------------------------------------- transparent


def test_transparent_endpoints_are_macvlans_of_the_uplink(
        make_ns: Callable[[], Netns]) -> None:
    uplink = _make_uplink(make_ns(), up=False)
    before = _uplink_state()
    links = interface_names()
    net = hns.create_network(pyhcs.HNSNetwork(
        name="tr", type="transparent", network_adapter_name="up0",
        subnets=[pyhcs.Subnet(address_prefix=SEGMENT, gateway_address=OUTSIDE_ADDRESS)]))
    assert "UP" in _uplink_state()["flags"].split(",")  # the uplink must carry traffic
    e1 = hns.create_endpoint(pyhcs.HNSEndpoint(ip_address="192.0.2.21"), network=net.id)
    e2 = hns.create_endpoint(pyhcs.HNSEndpoint(), network=net.id)
    c1, c2 = make_ns(), make_ns()
    assert hns.attach_endpoint(e1.id, c1.path, container_id="c1") == "eth0"
    hns.attach_endpoint(e2.id, c2.path, container_id="c2")
    inner = run_in(c1, "ip", "-d", "-o", "link", "show", "eth0").stdout
    assert "macvlan mode bridge" in inner
    assert e1.mac_address.replace("-", ":").lower() in inner
    assert interface_names() == links  # nothing of an endpoint stays on the host
    # outside -> container, with its own address and MAC on the segment
    server = tcp_server(c1, 7011)
    with contextlib.closing(server):
        c = tcp_client(uplink.outside)
        c.connect(("192.0.2.21", 7011))
        assert _peer_of(server) == OUTSIDE_ADDRESS
        c.close()
    neigh = run_in(uplink.outside, "ip", "neigh", "show", "192.0.2.21").stdout
    assert e1.mac_address.replace("-", ":").lower() in neigh
    # container -> container on the same uplink (macvlan bridge mode)
    server = tcp_server(c1, 7012)
    with contextlib.closing(server):
        c = tcp_client(c2)
        c.connect(("192.0.2.21", 7012))
        assert _peer_of(server) == e2.ip_address
        c.close()
    assert hns.endpoint_statistics(e1.id).packets_received > 0
    # detach removes the macvlan from the namespace; attach again works
    hns.detach_endpoint(e1.id)
    assert "eth0" not in run_in(c1, "ip", "-o", "link").stdout
    hns.attach_endpoint(e1.id, c1.path, container_id="c1")
    # ACLs are enforced on the host's bridges, which a macvlan's traffic never crosses
    acl = {"Type": "ACL", "Action": "Block", "Direction": "In", "Priority": 1}
    with pytest.raises(hns.NetworkNotSupportedError):
        hns.create_endpoint(pyhcs.HNSEndpoint(policies=[acl]), network=net.id)

    hns.delete_endpoint(e1.id)
    assert "eth0" not in run_in(c1, "ip", "-o", "link").stdout
    hns.delete_endpoint(e2.id)
    hns.delete_network(net.id)
    assert _uplink_state() == before


def test_transparent_without_subnet_leaves_addressing_outside(uplink: Uplink,
                                                              make_ns: Callable[[], Netns]
                                                              ) -> None:
    net = hns.create_network(pyhcs.HNSNetwork(name="dhcp", type="transparent",
                                              network_adapter_name="up0"))
    ep = hns.create_endpoint(pyhcs.HNSEndpoint(), network=net.id)
    assert ep.ip_address == "" and ep.mac_address
    ctr = make_ns()
    hns.attach_endpoint(ep.id, ctr.path)
    assert "inet " not in run_in(ctr, "ip", "-o", "-4", "addr", "show", "eth0").stdout
    hns.delete_endpoint(ep.id)
    hns.delete_network(net.id)


# --------------------------------------------------------------------------- overlay


@dataclass
class Machine:
    """A namespace playing a machine: its provider address and its own pyhcs roots."""

    ns: Netns
    pa: str
    roots: Roots


@pytest.fixture
def machines(make_ns: Callable[[], Netns], roots: Roots) -> Iterator[tuple[Machine, Machine]]:
    """Two machines joined by a veth "wire" ``pa0`` (192.0.2.1 and 192.0.2.2)."""
    base = roots.root.parent  # the roots fixture removes (and unmounts) everything in it
    m1 = Machine(make_ns(), "192.0.2.1", Roots(base / "m1", base / "m1run"))
    m2 = Machine(make_ns(), "192.0.2.2", Roots(base / "m2", base / "m2run"))
    with inside(m1.ns), IPRoute() as ipr:
        ipr.link("add", ifname="pa0", kind="veth", peer={"ifname": "pa0", "net_ns_fd": m2.ns.fd})
    for m in (m1, m2):
        with inside(m.ns), IPRoute() as ipr:
            idx = ipr.link_lookup(ifname="pa0")[0]
            ipr.addr("add", index=idx, address=m.pa, prefixlen=24)
            ipr.link("set", index=idx, state="up")
    yield m1, m2
    for m in (m1, m2):
        with _on(m):
            for c in pyhcs.get_containers(roots=m.roots):
                with contextlib.suppress(pyhcs.HcsError):
                    pyhcs.remove_container(c.id, force=True, roots=m.roots)
            _cleanup(m.roots)


@contextlib.contextmanager
def _on(m: Machine) -> Iterator[None]:
    """Act as machine *m*: in its namespace, with its roots in the environment too (the
    layer store of a container follows the environment, whatever ``roots=`` says)."""
    saved = {k: os.environ[k] for k in ("PYHCS_ROOT", "PYHCS_RUN_ROOT")}
    os.environ["PYHCS_ROOT"], os.environ["PYHCS_RUN_ROOT"] = (str(m.roots.root),
                                                              str(m.roots.run_root))
    try:
        with inside(m.ns):
            yield
    finally:
        os.environ.update(saved)


def _overlay(m: Machine, vsid: int = 4096) -> pyhcs.HNSNetwork:
    with inside(m.ns):
        return hns.create_network(pyhcs.HNSNetwork(
            name="ov", type="overlay", network_adapter_name="pa0",
            policies=[to_dict(pyhcs.VsidPolicy(vsid=vsid))],
            subnets=[pyhcs.Subnet(address_prefix="10.200.0.0/24",
                                  gateway_address="10.200.0.1")]), roots=m.roots)


def _remote(m: Machine, net: pyhcs.HNSNetwork, ep: pyhcs.HNSEndpoint,
            pa: str) -> pyhcs.HNSEndpoint:
    with inside(m.ns):
        return hns.create_endpoint(pyhcs.HNSEndpoint(
            ip_address=ep.ip_address, mac_address=ep.mac_address, is_remote_endpoint=True,
            policies=[to_dict(pyhcs.PaPolicy(pa=pa))]), network=net.id, roots=m.roots)


def _fdb(m: Machine, net: pyhcs.HNSNetwork) -> str:
    return run_in(m.ns, "bridge", "fdb", "show", "dev", vxlan_name(net.id)).stdout


def test_overlay_joins_containers_on_two_machines(
        machines: tuple[Machine, Machine], unique_id: str) -> None:
    m1, m2 = machines
    n1, n2 = _overlay(m1), _overlay(m2)
    with inside(m1.ns):
        e1 = hns.create_endpoint(pyhcs.HNSEndpoint(ip_address="10.200.0.11"),
                                 network=n1.id, roots=m1.roots)
    with inside(m2.ns):
        e2 = hns.create_endpoint(pyhcs.HNSEndpoint(ip_address="10.200.0.12"),
                                 network=n2.id, roots=m2.roots)
    # each machine learns of the other's endpoint from its orchestrator: a remote endpoint
    r2 = _remote(m1, n1, e2, m2.pa)
    _remote(m2, n2, e1, m1.pa)
    mac2 = e2.mac_address.replace("-", ":").lower()
    assert f"{mac2} dst {m2.pa}" in _fdb(m1, n1)
    assert f"10.200.0.12 lladdr {mac2}" in run_in(
        m1.ns, "ip", "neigh", "show", "dev", vxlan_name(n1.id)).stdout
    assert "vxlan id 4096" in run_in(m1.ns, "ip", "-d", "link", "show",
                                     vxlan_name(n1.id)).stdout

    containers = []
    for m, ep, suffix in ((m1, e1, "a"), (m2, e2, "b")):
        with _on(m):
            chain = pyhcs._layers.ensure_busybox_image(roots=m.roots).layer_chain
            layers = [pyhcs.Layer(id=p.rsplit("/", 1)[-1], path=p) for p in chain]
            c = pyhcs.create_container(unique_id + suffix, pyhcs.ContainerConfig(
                layers=layers, endpoint_list=[ep.id]), roots=m.roots)
            c.start()
        containers.append(c)
    c1, c2 = containers
    # the first process is each container's pid 1: a long sleep keeps both running
    inits = [c.create_process(pyhcs.ProcessConfig(command_line="sleep 60")) for c in containers]
    server = c1.create_process(pyhcs.ProcessConfig(command_line="nc -l -p 7000",
                                                   create_std_out_pipe=True))
    try:
        # the MTU inside leaves room for the VXLAN header
        code, out, _ = run(c2, "cat /sys/class/net/eth0/mtu")
        assert code == 0 and int(out) == 1450
        # the client retries until the server listens (it starts concurrently)
        code, _, err = run(c2, "sh -c 'for i in $(seq 100); do "
                               "echo hello-overlay | nc 10.200.0.11 7000 && exit 0; "
                               "sleep 0.1; done; exit 1'")
        assert code == 0, err
        _, out_pipe, _ = server.stdio()
        assert out_pipe is not None
        assert out_pipe.read() == b"hello-overlay\n"
        assert server.wait(30) == 0
    finally:
        for p in (server, *inits):
            with contextlib.suppress(pyhcs.HcsError):
                p.kill()
    for m, c in ((m1, c1), (m2, c2)):
        with _on(m):
            pyhcs.remove_container(c.id, force=True, roots=m.roots)

    # deleting the remote endpoint removes its FDB and neighbour entries
    with inside(m1.ns):
        hns.delete_endpoint(r2.id, roots=m1.roots)
    assert f"{mac2} dst" not in _fdb(m1, n1)
    assert "10.200.0.12" not in run_in(m1.ns, "ip", "neigh", "show", "dev",
                                       vxlan_name(n1.id)).stdout
    for m in (m1, m2):
        with inside(m.ns):
            _cleanup(m.roots)
            assert not [n for n in interface_names() if n.startswith("ph")]


def test_overlay_requests_checked(machines: tuple[Machine, Machine]) -> None:
    m1, _ = machines
    with inside(m1.ns):
        for bad in (pyhcs.HNSNetwork(name="x", type="overlay", subnets=[
                        pyhcs.Subnet(address_prefix="10.201.0.0/24")]),  # no VSID
                    pyhcs.HNSNetwork(name="x", type="overlay", policies=[
                        to_dict(pyhcs.VsidPolicy(vsid=7))])):  # no subnet
            with pytest.raises(hns.InvalidNetworkRequestError):
                hns.create_network(bad, roots=m1.roots)
    net = _overlay(m1, vsid=7)
    with inside(m1.ns):
        # a VSID is one network's
        with pytest.raises(pyhcs.HcsError, match="VSID 7"):
            hns.create_network(pyhcs.HNSNetwork(
                name="y", type="overlay", policies=[to_dict(pyhcs.VsidPolicy(vsid=7))],
                subnets=[pyhcs.Subnet(address_prefix="10.202.0.0/24")]), roots=m1.roots)
        # a remote endpoint needs its address, MAC and provider address; it is not attached
        with pytest.raises(hns.InvalidNetworkRequestError, match="PA"):
            hns.create_endpoint(pyhcs.HNSEndpoint(ip_address="10.200.0.30",
                                                  is_remote_endpoint=True),
                                network=net.id, roots=m1.roots)
        r = hns.create_endpoint(pyhcs.HNSEndpoint(
            ip_address="10.200.0.30", mac_address="02-00-00-00-00-30", is_remote_endpoint=True,
            policies=[to_dict(pyhcs.PaPolicy(pa="192.0.2.2"))]), network=net.id, roots=m1.roots)
        with pytest.raises(hns.InvalidNetworkRequestError, match="remote"):
            hns.attach_endpoint(r.id, machines[1].ns.path, roots=m1.roots)
        # its address is taken on this host too
        with pytest.raises(pyhcs.HcsError, match="in use"):
            hns.create_endpoint(pyhcs.HNSEndpoint(ip_address="10.200.0.30"), network=net.id,
                                roots=m1.roots)
        # a provider address that moves is followed
        hns.update_endpoint(r.id, pyhcs.HNSEndpoint(policies=[
            to_dict(pyhcs.PaPolicy(pa="192.0.2.99"))]), roots=m1.roots)
    assert "02:00:00:00:00:30 dst 192.0.2.99" in _fdb(m1, net)


def test_overlay_restore_recreates_vxlan_and_remote_entries(
        machines: tuple[Machine, Machine]) -> None:
    m1, _ = machines
    net = _overlay(m1)
    with inside(m1.ns):
        hns.create_endpoint(pyhcs.HNSEndpoint(
            ip_address="10.200.0.40", mac_address="02-00-00-00-00-40", is_remote_endpoint=True,
            policies=[to_dict(pyhcs.PaPolicy(pa="192.0.2.2"))]), network=net.id, roots=m1.roots)
        assert hns.restore(roots=m1.roots) == []
        # "reboot": the bridge, the VXLAN device (and its FDB) and the tables are gone
        with IPRoute() as ipr:
            for name in (vxlan_name(net.id), hns.bridge_name(net.id)):
                ipr.link("del", index=ipr.link_lookup(ifname=name)[0])
        _nft.delete_network_tables(net.id)
        assert hns.restore(roots=m1.roots) == [net.id]
        assert hns.restore(roots=m1.roots) == []
    assert "02:00:00:00:00:40 dst 192.0.2.2" in _fdb(m1, net)
    assert f"master {hns.bridge_name(net.id)}" in run_in(
        m1.ns, "ip", "-o", "link", "show", vxlan_name(net.id)).stdout


# --------------------------------------------------------------------------- recovery


def test_kill_during_l2bridge_create_gives_the_uplink_back(
        uplink: Uplink, monkeypatch: pytest.MonkeyPatch) -> None:
    before, links, tables = _uplink_state(), interface_names(), nft_table_names()
    request = pyhcs.HNSNetwork(name="doomed", type="l2bridge", network_adapter_name="up0",
                               subnets=[pyhcs.Subnet(address_prefix=SEGMENT)])
    killed_in(monkeypatch, _netlink, "take_uplink", lambda: hns.create_network(request))
    assert _uplink_state()["master"]  # half made: the uplink is held by a bridge
    assert hns.list_networks() == []
    assert len(hns.recover()) == 1
    assert _uplink_state() == before
    assert interface_names() == links and nft_table_names() == tables
    hns.delete_network(hns.create_network(request).id)
    assert _uplink_state() == before


def test_kill_during_transparent_attach_leaves_nothing_after_recover(
        uplink: Uplink, monkeypatch: pytest.MonkeyPatch, make_ns: Callable[[], Netns]) -> None:
    net = hns.create_network(pyhcs.HNSNetwork(
        name="tr", type="transparent", network_adapter_name="up0",
        subnets=[pyhcs.Subnet(address_prefix=SEGMENT, gateway_address=OUTSIDE_ADDRESS)]))
    ep = hns.create_endpoint(pyhcs.HNSEndpoint(), network=net.id)
    ctr = make_ns()
    path = ctr.path  # the parent's: it outlives the killed child
    killed_in(monkeypatch, _netlink, "create_macvlan_into",
               lambda: hns.attach_endpoint(ep.id, path, container_id="c"))
    assert "eth0" in run_in(ctr, "ip", "-o", "link").stdout
    assert hns.recover() == [ep.id]
    assert "eth0" not in run_in(ctr, "ip", "-o", "link").stdout
    assert hns.attach_endpoint(ep.id, ctr.path, container_id="c") == "eth0"
    hns.delete_endpoint(ep.id)
    hns.delete_network(net.id)


def test_restore_retakes_an_l2bridge_uplink(uplink: Uplink, make_ns: Callable[[], Netns]
                                            ) -> None:
    before = _uplink_state()
    net = hns.create_network(pyhcs.HNSNetwork(
        name="l2", type="l2bridge", network_adapter_name="up0",
        subnets=[pyhcs.Subnet(address_prefix=SEGMENT, gateway_address=OUTSIDE_ADDRESS)]))
    ep = hns.create_endpoint(pyhcs.HNSEndpoint(), network=net.id)
    # the host's own addresses (192.0.2.1, .7) and the gateway (.2) are not handed out
    assert ep.ip_address == "192.0.2.3"
    # the bridge vanishes (with the host's addresses it held)
    with IPRoute() as ipr:
        ipr.link("del", index=ipr.link_lookup(ifname=hns.bridge_name(net.id))[0])
    assert hns.restore() == [net.id]
    br = hns.bridge_name(net.id)
    assert f"master {br}" in _ip("-o", "link", "show", "up0")
    assert f"{HOST_ADDRESS}/24" in _ip("-o", "-4", "addr", "show", "dev", br)
    ctr = make_ns()
    hns.attach_endpoint(ep.id, ctr.path)
    server = tcp_server(ctr, 7021)
    with contextlib.closing(server):
        c = tcp_client(uplink.outside)
        c.connect((ep.ip_address, 7021))
        assert _peer_of(server) == OUTSIDE_ADDRESS
        c.close()
    hns.delete_endpoint(ep.id)
    hns.delete_network(net.id)
    assert _uplink_state() == before


# --------------------------------------------------------------------------- CLI


def test_cli_creates_every_type(uplink: Uplink, capsys: pytest.CaptureFixture[str]) -> None:
    before = _uplink_state()
    code, out, err = run_cli(capsys, "network", "create", "--type", "l2bridge", "--uplink", "up0",
                          "--subnet", SEGMENT, "--gateway", OUTSIDE_ADDRESS, "l2")
    assert code == 0, err
    l2 = out.strip()
    code, out, err = run_cli(capsys, "network", "create", "--type", "overlay", "--vsid", "5000",
                          "--subnet", "10.203.0.0/24", "ov")
    assert code == 0, err
    code, out, _ = run_cli(capsys, "network", "ls")
    assert code == 0 and re.search(r"l2\s+l2bridge\s+up0\s+192\.0\.2\.0/24", out)
    code, out, _ = run_cli(capsys, "network", "ls", "--json")
    docs = {d["Name"]: d for d in json.loads(out)}
    assert docs["l2"]["Id"] == l2 and docs["l2"]["NetworkAdapterName"] == "up0"
    assert docs["ov"]["Type"] == "overlay"
    assert docs["ov"]["Policies"] == [{"Type": "VSID", "VSID": 5000}]
    assert "vxlan id 5000" in _ip("-d", "link", "show", vxlan_name(docs["ov"]["Id"]))
    ep = hns.create_endpoint(pyhcs.HNSEndpoint(name="e1"), network="ov")
    code, out, _ = run_cli(capsys, "endpoint", "ls", "--json")
    assert code == 0 and [(d["Name"], d["IPAddress"]) for d in json.loads(out)] == [
        ("e1", ep.ip_address)]
    # --vsid belongs to overlay networks; a transparent network needs its uplink
    code, _, err = run_cli(capsys, "network", "create", "--vsid", "5", "x")
    assert code == 2 and "--vsid" in err
    code, _, err = run_cli(capsys, "network", "create", "--type", "transparent", "x")
    assert code == 125 and "NetworkAdapterName" in err
    assert run_cli(capsys, "endpoint", "rm", "e1")[0] == 0
    assert run_cli(capsys, "network", "rm", "l2", "ov")[0] == 0
    assert _uplink_state() == before


def test_kill_during_remote_endpoint_create_leaves_no_fdb_entry(
        machines: tuple[Machine, Machine], monkeypatch: pytest.MonkeyPatch) -> None:
    m1, _ = machines
    net = _overlay(m1)
    request = pyhcs.HNSEndpoint(
        ip_address="10.200.0.50", mac_address="02-00-00-00-00-50", is_remote_endpoint=True,
        policies=[to_dict(pyhcs.PaPolicy(pa="192.0.2.2"))])
    with inside(m1.ns):
        killed_in(monkeypatch, _netlink, "add_remote",
                   lambda: hns.create_endpoint(request, network=net.id, roots=m1.roots))
    assert "02:00:00:00:00:50 dst 192.0.2.2" in _fdb(m1, net)
    with inside(m1.ns):
        assert len(hns.recover(roots=m1.roots)) == 1
        assert hns.list_endpoints(roots=m1.roots) == []
    assert "02:00:00:00:00:50 dst" not in _fdb(m1, net)
    assert "10.200.0.50" not in run_in(m1.ns, "ip", "neigh", "show", "dev",
                                       vxlan_name(net.id)).stdout
