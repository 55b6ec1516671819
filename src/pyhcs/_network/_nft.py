"""The nftables side of the network service: one ``ip`` and one ``bridge`` table per network.

Each network owns ``table ip pyhcs_<id12>`` (NAT, ACLs) and ``table bridge pyhcs_<id12>``
(VLAN isolation), and each policy list with load balancers ``table ip pyhcs_lb<id12>``,
so deleting a network or a policy list is deleting its tables, and recovery finds strays
by their prefix without touching anyone else's rules. Port mappings live in a map of the
``ip`` table (``proto . host port : container address . container port``); endpoints'
ACLs in per-endpoint chains of the ``ip`` table reached through verdict maps keyed by the
endpoint's address; VLAN membership in sets and per-port chains of the ``bridge`` table
reached through a verdict map keyed by the endpoint's bridge port. Adding or removing any
of them is an element or chain operation that never needs a rule handle.

Everything runs in the calling thread's network namespace, through libnftables in-process
(:mod:`._libnft`; the ``nft`` command if the library is missing); a failed batch changes
nothing (nft applies a buffer as one transaction).
"""

from __future__ import annotations

import ipaddress
import json
import subprocess
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from pyhcs._network import _libnft

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
    "set_endpoint_vlan",
    "delete_endpoint_vlan",
    "LoadBalancer",
    "lb_table_name",
    "set_load_balancers",
    "delete_load_balancers",
]

TABLE_PREFIX = "pyhcs_"


class NftError(OSError):
    """``nft`` refused a batch; nothing of it was applied."""


def table_name(network_id: str) -> str:
    """The name of a network's tables (nft names must start with a letter and be short)."""
    return TABLE_PREFIX + network_id.replace("-", "")[:12].lower()


def _nft(script: str, *, json_output: bool = False) -> str:
    if _libnft.available():
        try:
            return _libnft.run(script, json_output=json_output)
        except _libnft.LibnftError as e:
            raise NftError(e.errno, e.strerror) from None
    argv = ["nft", "-j", "-f", "-"] if json_output else ["nft", "-f", "-"]
    r = subprocess.run(argv, input=script.encode(), capture_output=True, check=False)
    if r.returncode != 0:
        raise NftError(r.returncode, r.stderr.decode(errors="replace").strip() or "nft failed")
    return r.stdout.decode(errors="replace")


def run(script: str) -> None:
    """Apply *script* as one nft transaction; :class:`NftError` (nft's message) if refused."""
    _nft(script)


def list_pyhcs_tables() -> list[tuple[str, str]]:
    """Every ``(family, name)`` table whose name starts with :data:`TABLE_PREFIX`."""
    out = []
    text = _nft("list tables\n", json_output=True)
    for item in json.loads(text or '{"nftables": []}').get("nftables", []):
        t = item.get("table")
        if t and str(t.get("name", "")).startswith(TABLE_PREFIX):
            out.append((str(t["family"]), str(t["name"])))
    return out


def _except_elements(exceptions: Iterable[str | tuple[str, str]]) -> tuple[str, str]:
    """The elements of ``nat_except`` (any source) and ``nat_except_src`` (one source).

    Interval sets refuse overlapping elements, so each source's prefixes are collapsed
    (a source's pairs never overlap another source's, as sources are single addresses).
    """
    anywhere: list[ipaddress.IPv4Network] = []
    by_source: dict[str, list[ipaddress.IPv4Network]] = {}
    for e in exceptions:
        if isinstance(e, str):
            anywhere.append(ipaddress.IPv4Network(e, strict=False))
        else:
            src, dst = e
            by_source.setdefault(str(ipaddress.IPv4Address(src)), []).append(
                ipaddress.IPv4Network(dst, strict=False))
    any_elems = ", ".join(str(n) for n in ipaddress.collapse_addresses(anywhere))
    src_elems = ", ".join(f"{src} . {n}" for src in sorted(by_source)
                          for n in ipaddress.collapse_addresses(by_source[src]))
    return any_elems, src_elems


def network_tables(network_id: str, bridge: str, subnets: Sequence[str],
                   exceptions: Iterable[str | tuple[str, str]] = ()) -> None:
    """Create (or recreate empty) the tables of a ``nat`` network on *bridge*.

    Masquerades what leaves *subnets* for anywhere but the subnets themselves and the
    outbound-NAT *exceptions* (prefixes, or ``(source, prefix)`` pairs: see
    :func:`set_outbound_exceptions`); DNATs the host's own addresses through the port map
    (both for packets arriving from outside and for connections the host makes itself).

    The ``bridge`` table holds what is enforced between the bridge's ports: VLAN
    isolation (:func:`set_endpoint_vlan`) then each endpoint's ACLs
    (:func:`set_endpoint_acls`).
    """
    t = table_name(network_id)
    masq = "\n".join(
        f"    ip saddr {s} ip daddr != {s} ip daddr != @nat_except "
        f"ip saddr . ip daddr != @nat_except_src "
        f'oifname != "{bridge}" masquerade' for s in subnets)
    any_elems, src_elems = _except_elements(exceptions)
    except_any = f"elements = {{ {any_elems} }}" if any_elems else ""
    except_src = f"elements = {{ {src_elems} }}" if src_elems else ""
    run(f"""
table ip {t}
delete table ip {t}
table bridge {t}
delete table bridge {t}
table ip {t} {{
  map portmap {{ type inet_proto . inet_service : ipv4_addr . inet_service; }}
  set nat_except {{ type ipv4_addr; flags interval; {except_any} }}
  set nat_except_src {{ type ipv4_addr . ipv4_addr; flags interval; {except_src} }}
  chain prerouting {{ type nat hook prerouting priority dstnat; policy accept;
    fib daddr type local dnat ip to meta l4proto . th dport map @portmap;
  }}
  chain output {{ type nat hook output priority -100; policy accept;
    fib daddr type local dnat ip to meta l4proto . th dport map @portmap;
  }}
  chain postrouting {{ type nat hook postrouting priority srcnat; policy accept;
{masq}
  }}
  map acl_out {{ type ipv4_addr : verdict; }}
  map acl_in {{ type ipv4_addr : verdict; }}
  chain acl_forward {{ type filter hook forward priority filter; policy accept;
    ct state established,related accept
    ip saddr vmap @acl_out
    ip daddr vmap @acl_in
  }}
  chain acl_input {{ type filter hook input priority filter; policy accept;
    ct state established,related accept
    ip saddr vmap @acl_out
  }}
  chain acl_output {{ type filter hook output priority filter; policy accept;
    ct state established,related accept
    ip daddr vmap @acl_in
  }}
}}
table bridge {t} {{
  set vlan_ports {{ type ifname; }}
  map vlan_in {{ type ifname : verdict; }}
  chain forward {{ type filter hook forward priority filter; policy accept;
    iifname vmap @vlan_in
    iifname != @vlan_ports oifname @vlan_ports drop
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
    parts = []
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
    # an Allow ends this endpoint's checks only: "return", as "accept" would end the base
    # chain and skip the other endpoint's "in" ACLs
    parts.append("drop" if a.action == "drop" else "return")
    return " ".join(parts)


def set_endpoint_acls(network_id: str, host_ifname: str, acls: Sequence[Acl],
                      address: str) -> None:
    """Replace the ACLs of the endpoint at *address* (its chains named after *host_ifname*).

    Rules are checked in ``priority`` order (lower first) and the first match decides;
    traffic matching none is allowed, as in HNS. ``in``/``out`` are as seen from the
    endpoint. The ACLs are stateful, as HNS's are: they judge the packets that open a
    connection (or a UDP flow) and its answers pass. They live in the network's ``ip``
    table, keyed by the endpoint's address, and see traffic between endpoints of the same
    bridge through br_netfilter (enabled on the network's bridge by the caller).
    """
    t = table_name(network_id)
    script = []
    for d in ("in", "out"):
        chain = f"acl_{d}_{host_ifname}"
        # the map element always holds the same verdict (a jump to the endpoint's chain):
        # "add" is then idempotent, and a reset is a flush of the chain
        script += [
            f"add chain ip {t} {chain}",
            f"flush chain ip {t} {chain}",
            f"add element ip {t} acl_{d} {{ {address} : jump {chain} }}",
        ]
        mine = sorted((a for a in acls if a.direction == d), key=lambda a: a.priority)
        script += [f"add rule ip {t} {chain} {_acl_rule(a)}" for a in mine]
    run("\n".join(script) + "\n")


def delete_endpoint_acls(network_id: str, host_ifname: str, address: str) -> None:
    """Remove an endpoint's ACL chains (nothing happens if it had none)."""
    t = table_name(network_id)
    for d in ("in", "out"):
        try:
            run(f"delete element ip {t} acl_{d} {{ {address} }}\n")
        except NftError:
            pass
        try:
            run(f"delete chain ip {t} acl_{d}_{host_ifname}\n")
        except NftError:
            pass


def set_outbound_exceptions(network_id: str,
                            exceptions: Sequence[str | tuple[str, str]]) -> None:
    """Replace the destinations a ``nat`` network's traffic reaches without masquerade.

    An item is a destination prefix (an exception for every source of the network: a
    network's ``OutBoundNAT`` policy) or a ``(source address, destination prefix)`` pair
    (an endpoint's own ``OutBoundNAT`` policy, which concerns that endpoint only).
    """
    t = table_name(network_id)
    any_elems, src_elems = _except_elements(exceptions)
    body = f"flush set ip {t} nat_except\nflush set ip {t} nat_except_src\n"
    if any_elems:
        body += f"add element ip {t} nat_except {{ {any_elems} }}\n"
    if src_elems:
        body += f"add element ip {t} nat_except_src {{ {src_elems} }}\n"
    run(body)


def set_endpoint_vlan(network_id: str, host_ifname: str, vlan: int, old_vlan: int = 0) -> None:
    """Put the bridge port *host_ifname* in VLAN *vlan* (0: untagged), leaving *old_vlan*.

    The kernel's bridge VLAN filtering is not relied on (not every kernel has it): the
    bridge table's forward chain drops a frame whose ingress and egress ports are not in
    the same VLAN. A tagged port jumps through ``vlan_in`` to its chain ``vlan_<port>``,
    which drops frames to any port outside set ``vlan<v>``; a frame from an untagged port
    to a tagged one (set ``vlan_ports``) is dropped too. Broadcasts (ARP) are forwarded
    port by port, so they never cross VLANs either: endpoints of different VLANs cannot
    even resolve each other. Traffic to and from the host (the gateway) is not filtered:
    the host routes between VLANs as a router would.
    """
    t = table_name(network_id)
    q = f'"{host_ifname}"'
    chain = f"vlan_{host_ifname}"
    script = []
    if old_vlan:
        # create-if-missing then delete: the same text works whether or not it is there
        script += [
            f"add set bridge {t} vlan{old_vlan} {{ type ifname; }}",
            f"add element bridge {t} vlan{old_vlan} {{ {q} }}",
            f"delete element bridge {t} vlan{old_vlan} {{ {q} }}",
        ]
    script += [
        f"add element bridge {t} vlan_ports {{ {q} }}",
        f"delete element bridge {t} vlan_ports {{ {q} }}",
        f"add chain bridge {t} {chain}",
        f"flush chain bridge {t} {chain}",
        f"add element bridge {t} vlan_in {{ {q} : jump {chain} }}",
    ]
    if vlan:
        script += [
            f"add set bridge {t} vlan{vlan} {{ type ifname; }}",
            f"add element bridge {t} vlan{vlan} {{ {q} }}",
            f"add element bridge {t} vlan_ports {{ {q} }}",
            f"add rule bridge {t} {chain} oifname != @vlan{vlan} drop",
        ]
    run("\n".join(script) + "\n")


def delete_endpoint_vlan(network_id: str, host_ifname: str, vlan: int) -> None:
    """Take *host_ifname* out of VLAN isolation (nothing happens if it was not in it)."""
    t = table_name(network_id)
    q = f'"{host_ifname}"'
    for cmd in (f"delete element bridge {t} vlan_in {{ {q} }}",
                f"delete chain bridge {t} vlan_{host_ifname}",
                f"delete element bridge {t} vlan_ports {{ {q} }}",
                f"delete element bridge {t} vlan{vlan} {{ {q} }}" if vlan else ""):
        if cmd:
            try:
                run(cmd + "\n")
            except NftError:
                pass


# ------------------------------------------------------------------ load balancers

LB_PREFIX = TABLE_PREFIX + "lb"


def lb_table_name(policy_list_id: str) -> str:
    """The ``ip`` table of a policy list's load balancers."""
    return LB_PREFIX + policy_list_id.replace("-", "")[:12].lower()


@dataclass(frozen=True, slots=True)
class LoadBalancer:
    """One ``ELB`` policy, checked: traffic to ``vips`` (the host's own addresses if empty)
    on ``protocol``/``external_port`` (any port if 0) is spread round robin over
    ``backends`` (addresses) at ``internal_port`` (the same port if 0)."""

    protocol: int               # 6 | 17
    external_port: int
    internal_port: int
    vips: tuple[str, ...]
    backends: tuple[str, ...]
    source_vip: str = ""        # the source backends see; "" : the host's address


def _lb_rules(lb: LoadBalancer) -> tuple[str, str]:
    match = f"ip daddr {_set(lb.vips)}" if lb.vips else "fib daddr type local"
    proto = "tcp" if lb.protocol == 6 else "udp"
    match += f" meta l4proto {proto}"
    if lb.external_port:
        match += f" th dport {lb.external_port}"
    n = len(lb.backends)
    if lb.internal_port:
        targets = ", ".join(f"{i} : {b} . {lb.internal_port}" for i, b in enumerate(lb.backends))
    else:
        targets = ", ".join(f"{i} : {b}" for i, b in enumerate(lb.backends))
    dnat = f"{match} dnat ip to numgen inc mod {n} map {{ {targets} }}"
    # the backends must answer through the host for the DNAT to be undone: a client on
    # their own bridge would otherwise get the answer straight from the backend's address
    src = f"snat ip to {lb.source_vip}" if lb.source_vip else "masquerade"
    orig = f"ct original ip daddr {_set(lb.vips)}" if lb.vips else "ct status dnat"
    post = f"ct status dnat {orig} ip daddr {_set(lb.backends)} meta l4proto {proto} {src}"
    return dnat, post


def set_load_balancers(policy_list_id: str, lbs: Sequence[LoadBalancer]) -> None:
    """Create (or replace) the table enforcing a policy list's load balancers."""
    t = lb_table_name(policy_list_id)
    rules = [_lb_rules(lb) for lb in lbs]
    pre = "\n".join(f"    {d}" for d, _ in rules)
    post = "\n".join(f"    {p}" for _, p in rules)
    # before the networks' port maps (dstnat), so a VIP on a host address wins
    run(f"""
table ip {t}
delete table ip {t}
table ip {t} {{
  chain prerouting {{ type nat hook prerouting priority dstnat - 1; policy accept;
{pre}
  }}
  chain output {{ type nat hook output priority -101; policy accept;
{pre}
  }}
  chain postrouting {{ type nat hook postrouting priority srcnat - 1; policy accept;
{post}
  }}
}}
""")


def delete_load_balancers(policy_list_id: str) -> None:
    """Remove a policy list's table (nothing happens if it is gone already)."""
    t = lb_table_name(policy_list_id)
    run(f"table ip {t}\ndelete table ip {t}\n")
