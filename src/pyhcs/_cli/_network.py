"""``pyhcs network`` and ``pyhcs endpoint``: the host network service from the command line.

Networks are made in the network namespace ``pyhcs`` runs in (normally the host's).
``--type`` picks the driver: ``nat`` (a private subnet behind the host's addresses),
``l2bridge`` and ``transparent`` (containers on the segment of ``--uplink``), ``overlay``
(a VXLAN segment shared with other hosts, VNI ``--vsid``).
"""

from __future__ import annotations

import json
from typing import Any

import click

from .._schema import HNSNetwork, Subnet, VsidPolicy, to_dict


class _Network:
    """pyhcs._network, imported on first use: it loads pyroute2, which every other
    command would otherwise pay for at startup."""

    def __getattr__(self, name: str) -> Any:
        from .. import _network

        return getattr(_network, name)


hns = _Network()

__all__ = ["network", "endpoint"]


@click.group()
def network() -> None:
    """Manage host networks (HNS)."""


@network.command("create")
@click.option("--type", "net_type", default="nat", show_default=True,
              type=click.Choice(["nat", "l2bridge", "transparent", "overlay"]),
              help="The network driver.")
@click.option("--subnet", default="", help="Address prefix (CIDR); default: a free /24.")
@click.option("--gateway", default="", help="Gateway address; default: the subnet's first.")
@click.option("--uplink", default="", metavar="IF",
              help="The host interface (l2bridge, transparent; overlay: the tunnel's).")
@click.option("--vsid", type=click.IntRange(1, 2**24 - 1), default=None, metavar="N",
              help="The virtual subnet id (overlay): its VXLAN VNI.")
@click.option("--dns", default="", help="DNS servers, comma-separated.")
@click.argument("name")
def network_create(net_type: str, subnet: str, gateway: str, uplink: str, vsid: int | None,
                   dns: str, name: str) -> None:
    """Create network NAME; print its id."""
    if gateway and not subnet:
        raise click.UsageError("--gateway needs --subnet")
    if vsid is not None and net_type != "overlay":
        raise click.UsageError("--vsid is for --type overlay")
    doc = HNSNetwork(name=name, type=net_type, network_adapter_name=uplink,
                     dns_server_list=dns,
                     policies=[to_dict(VsidPolicy(vsid=vsid))] if vsid is not None else [],
                     subnets=[Subnet(address_prefix=subnet, gateway_address=gateway)]
                     if subnet else [])
    click.echo(hns.create_network(doc).id)


@network.command("ls")
@click.option("--json", "as_json", is_flag=True, help="JSON output (hcsshim's documents).")
def network_ls(as_json: bool) -> None:
    """List networks."""
    nets = hns.list_networks()
    if as_json:
        click.echo(json.dumps(to_dict(nets), indent=2))
        return
    click.echo(f"{'NETWORK ID':<38}{'NAME':<20}{'TYPE':<13}{'UPLINK':<16}SUBNETS")
    for n in nets:
        subnets = ",".join(s.address_prefix for s in n.subnets)
        click.echo(f"{n.id:<38}{n.name:<20}{n.type:<13}{n.network_adapter_name or '-':<16}"
                   f"{subnets}")


@network.command("inspect")
@click.argument("refs", nargs=-1, required=True)
def network_inspect(refs: tuple[str, ...]) -> None:
    """Show networks (by id or name) as hcsshim JSON."""
    click.echo(json.dumps([to_dict(hns.get_network(r)) for r in refs], indent=2))


@network.command("rm")
@click.argument("refs", nargs=-1, required=True)
def network_rm(refs: tuple[str, ...]) -> None:
    """Remove networks (by id or name); their endpoints must be removed first."""
    for r in refs:
        hns.delete_network(r)
        click.echo(r)


@network.command("restore")
def network_restore() -> None:
    """Recreate networks the kernel lost (after a reboot) and clean up interrupted work."""
    for nid in hns.restore():
        click.echo(nid)


@click.group()
def endpoint() -> None:
    """Manage network endpoints (HNS)."""


@endpoint.command("ls")
@click.option("--network", "net", default="", help="Only this network's (id or name).")
@click.option("--json", "as_json", is_flag=True, help="JSON output (hcsshim's documents).")
def endpoint_ls(net: str, as_json: bool) -> None:
    """List endpoints."""
    eps = hns.list_endpoints(network=net)
    if as_json:
        click.echo(json.dumps(to_dict(eps), indent=2))
        return
    click.echo(f"{'ENDPOINT ID':<38}{'NAME':<16}{'NETWORK':<16}{'IP ADDRESS':<17}MAC")
    for e in eps:
        click.echo(f"{e.id:<38}{e.name:<16}{e.virtual_network_name:<16}{e.ip_address:<17}"
                   f"{e.mac_address}")


@endpoint.command("inspect")
@click.argument("refs", nargs=-1, required=True)
def endpoint_inspect(refs: tuple[str, ...]) -> None:
    """Show endpoints (by id or name) as hcsshim JSON."""
    click.echo(json.dumps([to_dict(hns.get_endpoint(r)) for r in refs], indent=2))


@endpoint.command("rm")
@click.argument("refs", nargs=-1, required=True)
def endpoint_rm(refs: tuple[str, ...]) -> None:
    """Remove endpoints (detached first if attached)."""
    for r in refs:
        hns.delete_endpoint(r)
        click.echo(r)
