#!/usr/bin/env python3
"""Network service benchmark: endpoint create + attach, and detach + delete.

Runs entirely inside a private network namespace playing the host (the real host's
interfaces and nftables ruleset are never touched) with a temporary registry. Each round
makes a fresh namespace playing a container, then times:

* ``create``  - ``create_endpoint`` on a ``nat`` network (IPAM in the registry);
* ``create+nat`` - the same with one TCP port mapping (adds an nftables element);
* ``attach``  - ``attach_endpoint`` into the container's namespace (veth pair, address,
  routes);
* ``create+attach`` - both, for an endpoint without policies;
* ``create+nat+attach`` - both, for an endpoint with one port mapping;
* ``create+acl+attach`` - both, for an endpoint with two ACLs (chains in nftables);
* ``detach+delete`` - ``detach_endpoint`` and ``delete_endpoint``.

``--profile`` prints where ``create+nat+attach`` spends its time (cProfile, cumulative).

Usage: ``PYTHONPATH=src .venv/bin/python bench/network.py [--rounds N] [--json]``
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

from pyhcs._linux import CLONE_NEWNET, setns, unshare


def _new_ns() -> int:
    back = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    unshare(CLONE_NEWNET)
    fd = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    setns(back, CLONE_NEWNET)
    os.close(back)
    return fd


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=100)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--profile", action="store_true")
    args = ap.parse_args()

    tmp = tempfile.mkdtemp(prefix="pyhcs-netbench-")
    os.environ["PYHCS_ROOT"] = f"{tmp}/root"
    os.environ["PYHCS_RUN_ROOT"] = f"{tmp}/run"
    # the whole benchmark runs with this (only) thread in a private "host" namespace
    host = _new_ns()
    setns(host, CLONE_NEWNET)
    from pyroute2 import IPRoute  # type: ignore[import-untyped]

    import pyhcs
    from pyhcs import _network as hns
    from pyhcs._schema import to_dict

    with IPRoute() as ipr:
        ipr.link("set", index=ipr.link_lookup(ifname="lo")[0], state="up")
    net = hns.create_network(pyhcs.HNSNetwork(name="bench", subnets=[
        pyhcs.Subnet(address_prefix="10.200.0.0/16")]))
    times: dict[str, list[float]] = {
        "create": [], "create+nat": [], "attach": [], "create+attach": [],
        "create+nat+attach": [], "create+acl+attach": [], "detach+delete": []}
    acls = [{"Type": "ACL", "Action": "Block", "Direction": "In", "Protocols": "6",
             "LocalPorts": "22", "Priority": 100},
            {"Type": "ACL", "Action": "Allow", "Direction": "Out", "Priority": 200}]
    profiler = None
    if args.profile:
        import cProfile

        profiler = cProfile.Profile()
    for i in range(args.rounds + 1):  # round 0 warms up
        for kind in ("plain", "nat", "acl"):
            c = _new_ns()
            pol: list[dict[str, object]] = []
            if kind == "nat":
                pol = [to_dict(pyhcs.NatPolicy(protocol="TCP", internal_port=80,
                                               external_port=20000 + i))]
            elif kind == "acl":
                pol = list(acls)
            if profiler is not None and kind == "nat" and i:
                profiler.enable()
            t0 = time.perf_counter()
            ep = hns.create_endpoint(pyhcs.HNSEndpoint(virtual_network=net.id, policies=pol))
            t1 = time.perf_counter()
            hns.attach_endpoint(ep.id, f"/proc/self/fd/{c}", container_id="bench")
            t2 = time.perf_counter()
            if profiler is not None:
                profiler.disable()
            hns.detach_endpoint(ep.id)
            hns.delete_endpoint(ep.id)
            t3 = time.perf_counter()
            os.close(c)
            if not i:
                continue
            if kind == "plain":
                times["create"].append(t1 - t0)
                times["attach"].append(t2 - t1)
                times["create+attach"].append(t2 - t0)
            elif kind == "nat":
                times["create+nat"].append(t1 - t0)
                times["create+nat+attach"].append(t2 - t0)
            else:
                times["create+acl+attach"].append(t2 - t0)
            times["detach+delete"].append(t3 - t2)
    hns.delete_network(net.id)
    os.close(host)
    import shutil

    shutil.rmtree(tmp, ignore_errors=True)

    if profiler is not None:
        import pstats

        pstats.Stats(profiler, stream=sys.stderr).sort_stats("cumulative").print_stats(25)
    result = {k: {"median_ms": statistics.median(v) * 1e3,
                  "p90_ms": sorted(v)[int(len(v) * 0.9) - 1] * 1e3, "n": len(v)}
              for k, v in times.items()}
    if args.json:
        json.dump(result, sys.stdout, indent=2)
        print()
    else:
        print(f"{'operation':<20}{'median ms':>10}{'p90 ms':>10}{'n':>6}")
        for k, r in result.items():
            print(f"{k:<20}{r['median_ms']:>10.2f}{r['p90_ms']:>10.2f}{r['n']:>6}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
