"""The nftables side of the network service: one ``ip`` and one ``bridge`` table per network.

Each network owns ``table ip pyhcs_<id8>`` (NAT) and ``table bridge pyhcs_<id8>`` (ACLs),
so deleting a network is deleting its tables, and recovery finds strays by their prefix
without touching anyone else's rules. Port mappings live in a map of the ``ip`` table
(``proto . host port : container address . container port``) and endpoints' ACLs in a
per-endpoint chain of the ``bridge`` table reached through verdict maps keyed by the
endpoint's host-side interface, so adding or removing either is an element or chain
operation that never needs a rule handle.

Everything runs ``nft`` in the calling thread's network namespace; a failed batch changes
nothing (nft applies a file as one transaction).
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

__all__ = [
    "NftError",
    "TABLE_PREFIX",
    "table_name",
    "Acl",
    "network_tables",
    "delete_network_tables",
    "list_pyhcs_tables",
    "add_port_mappings",
    "delete_port_mappings",
    "set_endpoint_acls",
    "delete_endpoint_acls",
    "set_outbound_exceptions",
]

TABLE_PREFIX = "pyhcs_"


class NftError(OSError):
    """``nft`` refused a batch; nothing of it was applied."""


def table_name(network_id: str) -> str:
    """The name of a network's tables (nft names must start with a letter and be short)."""
    return TABLE_PREFIX + network_id.replace("-", "")[:12].lower()


def run(script: str) -> None:
    """Apply *script* as one nft transaction."""
    r = subprocess.run(["nft", "-f", "-"], input=script.encode(), capture_output=True,
                       check=False)
    if r.returncode != 0:
        raise NftError(r.returncode, r.stderr.decode(errors="replace").strip() or "nft failed")


def list_pyhcs_tables() -> list[tuple[str, str]]:
    """Every ``(family, name)`` table whose name starts with :data:`TABLE_PREFIX`."""
    r = subprocess.run(["nft", "-j", "list", "tables"], capture_output=True, check=False)
    if r.returncode != 0:
        raise NftError(r.returncode, r.stderr.decode(errors="replace").strip())
    out = []
    for item in json.loads(r.stdout or b'{"nftables": []}').get("nftables", []):
        t = item.get("table")
        if t and str(t.get("name", "")).startswith(TABLE_PREFIX):
            out.append((str(t["family"]), str(t["name"])))
    return out


def network_tables(network_id: str, bridge: str, subnets: Sequence[str],
                   exceptions: Iterable[str] = ()) -> None:
    """Create (or recreate empty) the tables of a ``nat`` network on *bridge*.

    Masquerades what leaves *subnets* for anywhere but the subnets themselves and the
    outbound-NAT *exceptions*; DNATs the host's own addresses through the port map (both
    for packets arriving from outside and for connections the host makes itself).
    """
    t = table_name(network_id)
    masq = "\n".join(
        f"    ip saddr {s} ip daddr != {s} ip daddr != @nat_except "
        f'oifname != "{bridge}" masquerade' for s in subnets)
    elements = ", ".join(exceptions)
    except_elems = f"elements = {{ {elements} }}" if elements else ""
    run(f"""
table ip {t}
delete table ip {t}
table bridge {t}
delete table bridge {t}
table ip {t} {{
  map portmap {{ type inet_proto . inet_service : ipv4_addr . inet_service; }}
  set nat_except {{ type ipv4_addr; flags interval; {except_elems} }}
  chain prerouting {{ type nat hook prerouting priority dstnat; policy accept;
    fib daddr type local dnat ip to meta l4proto . th dport map @portmap;
  }}
  chain output {{ type nat hook output priority -100; policy accept;
    fib daddr type local dnat ip to meta l4proto . th dport map @portmap;
  }}
  chain postrouting {{ type nat hook postrouting priority srcnat; policy accept;
{masq}
  }}
}}
table bridge {t} {{
  map acl_out {{ type ifname : verdict; }}
  map acl_in {{ type ifname : verdict; }}
  chain forward {{ type filter hook forward priority filter; policy accept;
    iifname vmap @acl_out
    oifname vmap @acl_in
  }}
  chain input {{ type filter hook input priority filter; policy accept;
    iifname vmap @acl_out
  }}
  chain output {{ type filter hook output priority filter; policy accept;
    oifname vmap @acl_in
  }}
}}
""")


def delete_network_tables(network_id: str) -> None:
    """Remove a network's tables (nothing happens if they are gone already)."""
    t = table_name(network_id)
    run(f"table ip {t}\ndelete table ip {t}\ntable bridge {t}\ndelete table bridge {t}\n")


def delete_tables(tables: Iterable[tuple[str, str]]) -> None:
    """Remove the given ``(family, name)`` tables."""
    script = "".join(f"table {f} {n}\ndelete table {f} {n}\n" for f, n in tables)
    if script:
        run(script)


def _mapping_elements(mappings: Iterable[tuple[str, int, str, int]]) -> str:
    return ", ".join(f"{proto} . {ext} : {addr} . {internal}"
                     for proto, ext, addr, internal in mappings)


def add_port_mappings(network_id: str, mappings: Sequence[tuple[str, int, str, int]]) -> None:
    """Add ``(proto, host port, container address, container port)`` DNAT mappings.

    ``create`` (not ``add``) so that a host port already mapped fails the whole batch.
    """
    if mappings:
        run(f"create element ip {table_name(network_id)} portmap "
            f"{{ {_mapping_elements(mappings)} }}\n")


def delete_port_mappings(network_id: str, keys: Sequence[tuple[str, int]],
                         *, missing_ok: bool = True) -> None:
    """Remove the mappings of ``(proto, host port)`` *keys*."""
    if not keys:
        return
    t = table_name(network_id)
    script = "".join(f"delete element ip {t} portmap {{ {p} . {port} }}\n" for p, port in keys)
    try:
        run(script)
    except NftError:
        if not missing_ok:
            raise
        # one missing element fails the batch: remove the rest one by one
        for p, port in keys:
            try:
                run(f"delete element ip {t} portmap {{ {p} . {port} }}\n")
            except NftError:
                pass


@dataclass(frozen=True, slots=True)
class Acl:
    """One ACL rule, already checked: ``direction`` is ``"in"`` or ``"out"``."""

    action: str                 # "accept" | "drop"
    direction: str              # "in" | "out" (as seen from the endpoint)
    protocols: tuple[int, ...]  # IP protocol numbers; empty = any
    local_addresses: tuple[str, ...]
    remote_addresses: tuple[str, ...]
    local_ports: tuple[int, ...]
    remote_ports: tuple[int, ...]
    priority: int


def _set(values: Sequence[object]) -> str:
    return str(values[0]) if len(values) == 1 else "{ " + ", ".join(map(str, values)) + " }"


def _acl_rule(a: Acl) -> str:
    # "out" traffic comes from the endpoint: its local side is the source
    local, remote = ("saddr", "daddr") if a.direction == "out" else ("daddr", "saddr")
    lport, rport = ("sport", "dport") if a.direction == "out" else ("dport", "sport")
    parts = ["meta protocol ip"]  # ACLs are IPv4 rules; ARP is handled before them
    if a.local_addresses:
        parts.append(f"ip {local} {_set(a.local_addresses)}")
    if a.remote_addresses:
        parts.append(f"ip {remote} {_set(a.remote_addresses)}")
    if a.protocols:
        parts.append(f"meta l4proto {_set(a.protocols)}")
    if a.local_ports:
        parts.append(f"th {lport} {_set(a.local_ports)}")
    if a.remote_ports:
        parts.append(f"th {rport} {_set(a.remote_ports)}")
    return " ".join(parts) + f" {a.action}"


def set_endpoint_acls(network_id: str, host_ifname: str, acls: Sequence[Acl]) -> None:
    """Replace the ACLs of the endpoint whose host-side interface is *host_ifname*.

    Rules are checked in ``priority`` order (lower first) and the first match decides;
    traffic matching none is allowed, as in HNS. ``in``/``out`` are as seen from the
    endpoint. ARP is always allowed, or no address could be resolved at all.
    """
    t = table_name(network_id)
    script = []
    for d in ("in", "out"):
        chain = f"{d}_{host_ifname}"
        # create-if-missing then flush: the same script works for a first set and a reset
        script += [
            f"add chain bridge {t} {chain}",
            f"flush chain bridge {t} {chain}",
            f'add element bridge {t} acl_{d} {{ "{host_ifname}" : continue }}',
            f'delete element bridge {t} acl_{d} {{ "{host_ifname}" }}',
        ]
    for d in ("in", "out"):
        chain = f"{d}_{host_ifname}"
        mine = sorted((a for a in acls if a.direction == d), key=lambda a: a.priority)
        if not mine:
            continue
        script.append(f"add rule bridge {t} {chain} meta protocol arp accept")
        script += [f"add rule bridge {t} {chain} {_acl_rule(a)}" for a in mine]
        script.append(f'add element bridge {t} acl_{d} {{ "{host_ifname}" : jump {chain} }}')
    run("\n".join(script) + "\n")


def delete_endpoint_acls(network_id: str, host_ifname: str) -> None:
    """Remove an endpoint's ACL chains (nothing happens if it had none)."""
    t = table_name(network_id)
    for d in ("in", "out"):
        try:
            run(f'delete element bridge {t} acl_{d} {{ "{host_ifname}" }}\n')
        except NftError:
            pass
        try:
            run(f"delete chain bridge {t} {d}_{host_ifname}\n")
        except NftError:
            pass


def set_outbound_exceptions(network_id: str, prefixes: Sequence[str]) -> None:
    """Replace the destinations a ``nat`` network's traffic reaches without masquerade."""
    t = table_name(network_id)
    body = f"flush set ip {t} nat_except\n"
    if prefixes:
        body += f"add element ip {t} nat_except {{ {', '.join(prefixes)} }}\n"
    run(body)
