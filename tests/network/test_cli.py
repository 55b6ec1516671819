"""``pyhcs network`` / ``pyhcs endpoint`` commands (run in-process, inside the test's namespace)."""

from __future__ import annotations

import json
import time

import pytest
from click.testing import CliRunner

import pyhcs
from pyhcs import _network as hns
from pyhcs._cli import cli

from .conftest import Wire, run_cli, tcp_client


def test_network_and_endpoint_commands(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_cli(capsys, "network", "create", "--subnet", "10.66.0.0/24",
                        "--gateway", "10.66.0.254", "--dns", "10.66.0.53", "web")
    assert code == 0
    nid = out.strip()
    assert hns.get_network("web").id == nid
    code, out, _ = run_cli(capsys, "network", "ls")
    assert code == 0 and "web" in out and "10.66.0.0/24" in out
    code, out, _ = run_cli(capsys, "network", "inspect", "web")
    (doc,) = json.loads(out)
    assert doc["Subnets"][0]["GatewayAddress"] == "10.66.0.254"
    assert doc["DNSServerList"] == "10.66.0.53"

    ep = hns.create_endpoint(pyhcs.HNSEndpoint(name="e1", virtual_network=nid))
    code, out, _ = run_cli(capsys, "endpoint", "ls", "--network", "web")
    assert code == 0 and "e1" in out and ep.ip_address in out
    code, out, _ = run_cli(capsys, "endpoint", "inspect", "e1")
    assert json.loads(out)[0]["IPAddress"] == "10.66.0.1"

    # errors: one line, exit 125, nothing changed
    code, _, err = run_cli(capsys, "network", "rm", "web")
    assert code == 125 and err.startswith("pyhcs: ") and "endpoint" in err
    assert len(err.strip().splitlines()) == 1
    code, _, err = run_cli(capsys, "network", "create", "--subnet", "10.66.0.0/16", "other")
    assert code == 125 and "overlaps" in err
    code, _, err = run_cli(capsys, "network", "create", "--type", "overlay", "--subnet",
                        "10.67.0.0/24", "ov")
    assert code == 125 and "VSID" in err

    assert run_cli(capsys, "endpoint", "rm", "e1")[0] == 0
    assert run_cli(capsys, "network", "rm", nid)[0] == 0
    code, out, _ = run_cli(capsys, "network", "ls", "--json")
    assert json.loads(out) == []
    code, _, err = run_cli(capsys, "network", "inspect", "web")
    assert code == 125 and "not found" in err


def test_network_restore_command() -> None:
    net = hns.create_network(pyhcs.HNSNetwork(name="n"))
    hns._nft.delete_network_tables(net.id)
    r = CliRunner().invoke(cli, ["network", "restore"])
    assert r.exit_code == 0 and r.output.strip() == net.id
    hns.delete_network(net.id)


def test_run_with_network_publishes_a_port(capsys: pytest.CaptureFixture[str],
                                           busybox: list[str], wire: Wire) -> None:
    assert run_cli(capsys, "network", "create", "--subnet", "10.67.0.0/24", "pub")[0] == 0
    code, out, err = run_cli(capsys, "run", "-d", "--network", "pub", "-p", "8080:80", "busybox",
                          "sh", "-c", "echo pong | nc -l -p 80")
    assert code == 0, err
    cid = out.strip()
    try:
        (ep,) = [e for e in hns.list_endpoints() if e.name == f"run-{cid}"]
        deadline = time.monotonic() + 10
        while True:  # until nc listens
            client = tcp_client(wire.outside)
            try:
                client.connect((wire.host_address, 8080))
                data = client.recv(100)
                if data:
                    break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
            finally:
                client.close()
        assert data == b"pong\n"
        assert ep.ip_address.startswith("10.67.0.")
    finally:
        assert run_cli(capsys, "rm", "-f", cid)[0] == 0
    assert [e for e in hns.list_endpoints() if e.name == f"run-{cid}"] == []
    code, _, err = run_cli(capsys, "run", "-p", "1:2", "busybox", "true")
    assert code == 2 and "--network" in err
    code, _, err = run_cli(capsys, "run", "--network", "pub", "-p", "80", "busybox", "true")
    assert code == 2 and "HOST:CONTAINER" in err
    assert run_cli(capsys, "network", "rm", "pub")[0] == 0
