"""IPAM under concurrency from separate processes; recovery after kill -9; restore."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable
from typing import Any

import pytest
from pyroute2 import IPRoute  # type: ignore[import-untyped]

import pyhcs
from pyhcs import _network as hns
from pyhcs._network import _nft, _rtnl, _service
from pyhcs._paths import Roots
from pyhcs._registry import Registry
from pyhcs._schema import to_dict

from .conftest import (
    Netns,
    Wire,
    interface_names,
    killed_in,
    nft_table_names,
    tcp_client,
    tcp_server,
)


def _rows(roots: Roots, sql: str) -> list[Any]:
    return [tuple(r) for r in Registry.open(roots.db_path).query(sql)]


def test_100_concurrent_endpoint_creations_get_distinct_addresses(roots: Roots) -> None:
    net = hns.create_network(pyhcs.HNSNetwork(name="n", subnets=[
        pyhcs.Subnet(address_prefix="10.70.0.0/24")]))
    pids = []
    for _ in range(100):
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                hns.create_endpoint(pyhcs.HNSEndpoint(virtual_network=net.id))
                code = 0
            finally:
                os._exit(code)
        pids.append(pid)
    codes = [os.waitstatus_to_exitcode(os.waitpid(p, 0)[1]) for p in pids]
    assert codes == [0] * 100
    eps = hns.list_endpoints()
    assert len(eps) == 100
    assert len({e.ip_address for e in eps}) == 100
    assert len({e.mac_address for e in eps}) == 100
    assert {e.ip_address for e in eps} == {f"10.70.0.{i}" for i in range(2, 102)}
    for e in eps:
        hns.delete_endpoint(e.id)
    assert _rows(roots, "SELECT * FROM ip_allocations") == []
    assert _rows(roots, "SELECT * FROM mac_allocations") == []
    hns.delete_network(net.id)


def test_kill_during_network_create_leaves_nothing_after_recover(
        roots: Roots, monkeypatch: pytest.MonkeyPatch) -> None:
    links, tables = interface_names(), nft_table_names()
    killed_in(monkeypatch, _nft, "network_tables",
               lambda: hns.create_network(pyhcs.HNSNetwork(name="doomed")))
    assert any(n.startswith("phbr") for n in interface_names() - links)
    assert nft_table_names() - tables
    assert hns.list_networks() == []  # never reported while half made
    assert len(hns.recover()) == 1
    assert interface_names() == links and nft_table_names() == tables
    assert _rows(roots, "SELECT * FROM networks") == []
    assert _rows(roots, "SELECT * FROM net_subnets") == []
    # the name and subnet are free again
    hns.delete_network(hns.create_network(pyhcs.HNSNetwork(name="doomed")).id)


def test_kill_during_endpoint_create_and_attach_leaves_nothing_after_recover(
        roots: Roots, monkeypatch: pytest.MonkeyPatch, make_ns: Callable[[], Netns]) -> None:
    net = hns.create_network(pyhcs.HNSNetwork(name="n"))
    nat = to_dict(pyhcs.NatPolicy(protocol="TCP", internal_port=80, external_port=8080))
    killed_in(monkeypatch, _nft, "add_port_mappings",
               lambda: hns.create_endpoint(pyhcs.HNSEndpoint(virtual_network=net.id,
                                                             policies=[nat])))
    assert "8080" in _portmap(net.id)
    assert hns.recover()
    assert "8080" not in _portmap(net.id)
    for t in ("endpoints", "ip_allocations", "mac_allocations", "port_mappings"):
        assert _rows(roots, f"SELECT * FROM {t}") == []

    c = make_ns()
    ep = hns.create_endpoint(pyhcs.HNSEndpoint(virtual_network=net.id, policies=[nat]))
    links = interface_names()
    killed_in(monkeypatch, _rtnl, "_create_veth",  # attach's veth, on a nat network
               lambda: hns.attach_endpoint(ep.id, c.path, container_id="c"))
    assert hns.host_ifname(ep.id) in interface_names()
    assert hns.recover() == [ep.id]
    assert interface_names() == links
    # the endpoint itself survives, detached, and can be attached again
    assert hns.get_endpoint(ep.id) == ep
    assert hns.attach_endpoint(ep.id, c.path, container_id="c") == "eth0"
    hns.delete_endpoint(ep.id)
    hns.delete_network(net.id)


def _portmap(network_id: str) -> str:
    return subprocess.run(["nft", "list", "map", "ip", _nft.table_name(network_id),
                           "portmap"], capture_output=True, text=True, check=True).stdout


def test_recover_leaves_live_creators_alone(roots: Roots) -> None:
    net = hns.create_network(pyhcs.HNSNetwork(name="n"))
    reg = Registry.open(roots.db_path)
    reg.execute("UPDATE networks SET state='creating', owner_pid=?, owner_start=? WHERE id=?",
                (os.getpid(), _service._start_time(os.getpid()), net.id))
    assert hns.recover() == []
    assert hns.bridge_name(net.id) in interface_names()
    reg.execute("UPDATE networks SET state='ready' WHERE id=?", (net.id,))
    hns.delete_network(net.id)


def test_restore_after_reboot_like_restart(
        make_ns: Callable[[], Netns], wire: Wire) -> None:
    net = hns.create_network(pyhcs.HNSNetwork(name="n", subnets=[
        pyhcs.Subnet(address_prefix="10.71.0.0/24")]))
    ep = hns.create_endpoint(pyhcs.HNSEndpoint(virtual_network=net.id, policies=[
        to_dict(pyhcs.NatPolicy(protocol="TCP", internal_port=80, external_port=8081))]))
    old = make_ns()
    hns.attach_endpoint(ep.id, old.path, container_id="old")
    # "reboot": the container and every interface and table are gone, the registry stays
    os.close(old.fd)
    with IPRoute() as ipr:
        for name in (hns.bridge_name(net.id), hns.host_ifname(ep.id)):
            found = ipr.link_lookup(ifname=name)
            if found:
                ipr.link("del", index=found[0])
    _nft.delete_network_tables(net.id)
    old.fd = os.open("/dev/null", os.O_RDONLY)  # make_ns closes it at the end

    assert hns.restore() == [net.id]
    assert hns.bridge_name(net.id) in interface_names()
    assert "tcp . 8081 : 10.71.0.2 . 80" in _portmap(net.id)
    assert hns.endpoint_compartment_id(ep.id) == 0  # the dead container's attachment cleared
    assert hns.restore() == []  # intact networks are not touched
    # a new container gets the endpoint, and the port mapping works again
    c = make_ns()
    hns.attach_endpoint(ep.id, c.path, container_id="new")
    server = tcp_server(c, 80)
    client = tcp_client(wire.outside)
    client.connect((wire.host_address, 8081))
    conn, _ = server.accept()
    conn.close()
    client.close()
    server.close()
    hns.delete_endpoint(ep.id)
    hns.delete_network(net.id)
