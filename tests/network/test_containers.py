"""Endpoints on real containers: EndpointList at creation, hot attach and detach, DNS,
network statistics. The "host" is the test's private network namespace (conftest)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import pytest

import pyhcs
from pyhcs import _network as hns

from ..compute.conftest import run


@pytest.fixture
def net() -> Iterator[pyhcs.HNSNetwork]:
    n = hns.create_network(pyhcs.HNSNetwork(name="ctr", subnets=[
        pyhcs.Subnet(address_prefix="10.98.0.0/24", gateway_address="10.98.0.1")]))
    yield n
    for e in hns.list_endpoints():
        with contextlib.suppress(pyhcs.HcsError):
            hns.delete_endpoint(e.id)
    hns.delete_network(n.id)


@pytest.fixture
def container(busybox: list[str], unique_id: str) -> Iterator[list[pyhcs.Container]]:
    made: list[pyhcs.Container] = []
    yield made
    for c in made:
        with contextlib.suppress(pyhcs.HcsError):
            pyhcs.remove_container(c.id, force=True)


def _make(busybox: list[str], cid: str, **fields: object) -> pyhcs.Container:
    layers = [pyhcs.Layer(id=p.rsplit("/", 1)[-1], path=p) for p in busybox]
    return pyhcs.create_container(cid, pyhcs.ContainerConfig(layers=layers, **fields))  # type: ignore[arg-type]


def test_endpoint_list_attaches_at_start(net: pyhcs.HNSNetwork, busybox: list[str],
                                         unique_id: str,
                                         container: list[pyhcs.Container]) -> None:
    ep = hns.create_endpoint(pyhcs.HNSEndpoint(dns_server_list="10.98.0.53",
                                               dns_suffix="corp.example"), network=net.id)
    c = _make(busybox, unique_id, endpoint_list=[ep.id])
    container.append(c)
    c.start()
    init = c.create_process(pyhcs.ProcessConfig(command_line="sleep 30"))
    try:
        code, out, _ = run(c, "ip -o -4 addr show eth0")
        assert code == 0 and f"{ep.ip_address}/24" in out.decode()
        code, out, _ = run(c, "cat /etc/resolv.conf")
        assert "nameserver 10.98.0.53" in out.decode() and "corp.example" in out.decode()
        code, _, err = run(c, "ping -c 2 -W 3 10.98.0.1")
        assert code == 0, err
        stats = c.statistics().network
        assert len(stats) == 1 and stats[0].endpoint_id == ep.id
        assert stats[0].packets_sent >= 2 and stats[0].bytes_received > 0
        assert hns.endpoint_compartment_id(ep.id) != 0
    finally:
        init.kill()
        init.wait(10)
    c.wait(10)
    pyhcs.remove_container(c.id)
    container.clear()
    # the endpoint outlives its container, detached, ready for another one
    assert hns.endpoint_compartment_id(ep.id) == 0


def test_hot_attach_and_detach(net: pyhcs.HNSNetwork, busybox: list[str], unique_id: str,
                               container: list[pyhcs.Container]) -> None:
    c = _make(busybox, unique_id)
    container.append(c)
    c.start()
    init = c.create_process(pyhcs.ProcessConfig(command_line="sleep 30"))
    try:
        assert b"eth0" not in run(c, "ip -o link")[1]
        ep = hns.create_endpoint(pyhcs.HNSEndpoint(), network=net.id)
        pyhcs.hot_attach_endpoint(c.id, ep.id)
        assert run(c, "ping -c 1 -W 3 10.98.0.1")[0] == 0
        pyhcs.hot_detach_endpoint(c.id, ep.id)
        assert b"eth0" not in run(c, "ip -o link")[1]
        with pytest.raises(pyhcs.NotSupportedError):
            c.modify({"ResourceType": "Memory", "RequestType": "Update", "Settings": 1})
        with pytest.raises(pyhcs.InvalidConfigError):
            c.modify("{not json")
    finally:
        init.kill()
        init.wait(10)


def test_unknown_endpoint_refused_at_create(busybox: list[str], unique_id: str) -> None:
    with pytest.raises(pyhcs.HcsError) as e:
        _make(busybox, unique_id, endpoint_list=["no-such-endpoint"])
    assert pyhcs.is_not_exist(e.value)
    assert pyhcs.get_containers() == []
