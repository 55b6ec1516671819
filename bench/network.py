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

``--containers`` instead compares whole containers with one port mapping, pyhcs against
podman (issue 5), interleaved round by round (the order alternates):

* ``pyhcs``  - create a ``nat`` endpoint with one NatPolicy (TCP 80 -> a host port), create
  a container with it in ``endpoint_list``, start, run ``/bin/true``, wait, remove the
  container, delete the endpoint (Python API, warm process);
* ``podman`` - ``podman run --rm -p <port>:80 busybox /bin/true`` on podman's default
  bridge network (netavark), with a private ``--root``/``--runroot``/``--tmpdir``,
  ``--cgroup-manager cgroupfs``, ``--events-backend none`` and the ulimits podman needs
  on these machines. The busybox image is pyhcs's own, exported layer by layer into a
  ``docker-archive`` and ``podman load``-ed offline. Without podman the column is skipped.

Both run in one private mount namespace (the cgroup2 mount at ``/sys/fs/cgroup/unified``
detached, as in bench/lifecycle.py; fresh tmpfs over ``/run`` and ``/var/lib/containers``
so podman's and netavark's fixed state paths stay private) and one private network
namespace (``ip netns add``), so no interface, route or nftables rule reaches the host.
Everything is removed at the end.

Usage: ``PYTHONPATH=src .venv/bin/python bench/network.py [--rounds N] [--json]
[--containers]``
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

# bench/ is sys.path[0] when this file is run as a script
from lifecycle import (
    CGROUP_PARENT,
    COMMAND,
    MNT_DETACH,
    BenchError,
    cleanup,
    enter_private_mount_namespace,
    mount,
    remove_cgroups,
    summary,
    tool_version,
    umount,
)

from pyhcs._linux import CLONE_NEWNET, setns, unshare


def _new_ns() -> int:
    back = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    unshare(CLONE_NEWNET)
    fd = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    setns(back, CLONE_NEWNET)
    os.close(back)
    return fd


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--rounds", type=int, default=None,
                    help="timed rounds (default 100, or 20 with --containers)")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--containers", action="store_true",
                    help="compare containers with a port mapping against podman run --rm")
    args = ap.parse_args()
    if args.containers:
        return containers_main(args.rounds or 20, args.json)
    args.rounds = args.rounds or 100
    return endpoints_main(args)


def endpoints_main(args: argparse.Namespace) -> int:
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


# -- containers with a port mapping: pyhcs against podman (--containers) ----------------------

PODMAN_IMAGE = "localhost/pyhcs-busybox:latest"
PODMAN_ULIMITS = ["--ulimit", "nofile=1024:1024", "--ulimit", "nproc=4096:4096"]
PODMAN_PORT = 30080
NAT_SUBNET = "10.201.0.0/16"  # podman's default network is 10.88.0.0/16
CT_STEPS = ("create_endpoint", "create", "start", "run_true", "remove", "delete_endpoint")


def docker_archive(chain: list[str], config: dict[str, object], dest: Path) -> None:
    """Write the image whose layer folders are *chain* (topmost first) as a ``docker save``
    tar that ``podman load`` reads, layers exported by pyhcs's own ``export_layer_to_tar``."""
    import io
    import tarfile

    import pyhcs

    arch = {"x86_64": "amd64", "aarch64": "arm64"}.get(platform.machine(), platform.machine())
    layers: list[str] = []
    diff_ids: list[str] = []
    with tarfile.open(dest, "w") as out:
        def add(name: str, data: bytes) -> None:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            out.addfile(info, io.BytesIO(data))

        for i, path in enumerate(reversed(chain)):  # docker lists the base layer first
            buf = io.BytesIO()
            diff_ids.append(pyhcs.export_layer_to_tar(buf, path).diff_id)
            layers.append(f"layer{i}/layer.tar")
            add(layers[-1], buf.getvalue())
        cfg = json.dumps({"architecture": arch, "os": "linux", "config": config,
                          "rootfs": {"type": "layers", "diff_ids": diff_ids}}).encode()
        add("config.json", cfg)
        add("manifest.json", json.dumps([{"Config": "config.json", "RepoTags": [PODMAN_IMAGE],
                                          "Layers": layers}]).encode())


@dataclass
class CtEnv:
    """What the container rounds share."""

    chain: list[str]
    net_id: str
    podman: list[str]  # podman and its global options, empty without podman
    steps: dict[str, list[float]] = field(default_factory=dict)
    seq: int = 0


def run_pyhcs_ct(env: CtEnv) -> float:
    """One pyhcs round: nat endpoint with a port mapping -> container -> /bin/true -> gone."""
    import pyhcs
    from pyhcs import _network as hns
    from pyhcs._schema import to_dict

    env.seq += 1
    cid = f"bench-net-{os.getpid()}-{env.seq}"
    layers = [pyhcs.Layer(id=os.path.basename(p), path=p) for p in env.chain]
    pol = [to_dict(pyhcs.NatPolicy(protocol="TCP", internal_port=80,
                                   external_port=20000 + env.seq % 10000))]
    t = [time.perf_counter()]
    ep = hns.create_endpoint(pyhcs.HNSEndpoint(virtual_network=env.net_id, policies=pol))
    t.append(time.perf_counter())
    try:
        c = pyhcs.create_container(cid, pyhcs.ContainerConfig(layers=layers,
                                                              endpoint_list=[ep.id]))
        t.append(time.perf_counter())
        try:
            c.start()
            t.append(time.perf_counter())
            p = c.create_process(pyhcs.ProcessConfig(command_line=COMMAND))
            code = p.wait()
            c.wait()
            t.append(time.perf_counter())
            p.close()
            c.close()
        except BaseException:
            with contextlib.suppress(Exception):
                pyhcs.remove_container(cid, force=True)
            raise
        pyhcs.remove_container(cid)
        t.append(time.perf_counter())
    except BaseException:
        with contextlib.suppress(Exception):
            hns.delete_endpoint(ep.id)
        raise
    hns.delete_endpoint(ep.id)
    t.append(time.perf_counter())
    if code != 0:
        raise BenchError(f"pyhcs: {COMMAND} exited {code} in container {cid}")
    for name, (a, b) in zip(CT_STEPS, itertools.pairwise(t), strict=True):
        env.steps.setdefault(name, []).append((b - a) * 1000)
    return t[-1] - t[0]


def run_podman_ct(env: CtEnv) -> float:
    """One podman round: ``podman run --rm -p PORT:80 busybox /bin/true``."""
    t0 = time.perf_counter()
    r = subprocess.run([*env.podman, "run", "--rm", *PODMAN_ULIMITS,
                        "--cgroup-parent", f"/{CGROUP_PARENT}", "-p", f"{PODMAN_PORT}:80",
                        PODMAN_IMAGE, COMMAND], stdin=subprocess.DEVNULL, capture_output=True)
    dt = time.perf_counter() - t0
    if r.returncode != 0:
        raise BenchError(f"podman: exit {r.returncode}: "
                         f"{r.stderr.decode(errors='replace').strip()}")
    return dt


def _private_state_mounts(made: list[str]) -> None:
    """Fresh tmpfs over the fixed paths podman, netavark, crun and ``ip netns`` write
    (/run/containers, /run/crun, /run/netns, /var/lib/containers/cache), in this private
    mount namespace only. A folder that had to be created for that is put in *made*."""
    for d in ("/run", "/var/lib/containers"):
        if not os.path.isdir(d):
            os.makedirs(d)
            made.append(d)
        mount("tmpfs", d, "tmpfs", 0, "mode=0755")


def containers_main(rounds: int, as_json: bool) -> int:
    """--containers: pyhcs vs podman, create -> start -> wait -> delete with a port mapping."""
    if os.geteuid() != 0:
        print("network: must run as root", file=sys.stderr)
        return 2
    podman = shutil.which("podman")
    if podman is None:
        print("network: podman is not installed, the podman column is skipped "
              "(apt-get install podman to compare)", file=sys.stderr)
    # single-threaded here: namespaces first, then pyhcs
    unified_hidden = enter_private_mount_namespace()
    made: list[str] = []
    _private_state_mounts(made)
    netns = f"pyhcs-bench-{os.getpid()}"
    subprocess.run(["ip", "netns", "add", netns], check=True)
    tmp = Path(tempfile.mkdtemp(prefix="pyhcs-netbench-"))
    os.environ["PYHCS_ROOT"] = str(tmp / "root")
    os.environ["PYHCS_RUN_ROOT"] = str(tmp / "run")
    os.environ["PYHCS_CGROUP_PARENT"] = CGROUP_PARENT
    fd = os.open(f"/run/netns/{netns}", os.O_RDONLY | os.O_CLOEXEC)
    setns(fd, CLONE_NEWNET)  # this (only) thread, so every child starts in it too
    os.close(fd)
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)

    variants = ["pyhcs"] + (["podman"] if podman else [])
    runners: dict[str, Callable[[CtEnv], float]] = {"pyhcs": run_pyhcs_ct,
                                                    "podman": run_podman_ct}
    results: dict[str, dict[str, float]] = {}
    steps: dict[str, dict[str, float]] = {}
    problems: list[str] = []
    load_before = os.getloadavg()[0]
    net_id = ""
    pm: list[str] = []
    try:
        leftovers = remove_cgroups(CGROUP_PARENT)
        if leftovers:
            print("network: cgroups from an earlier run remain:", *leftovers, sep="\n  ",
                  file=sys.stderr)
            return 2
        import pyhcs
        from pyhcs import _network as hns
        from pyhcs._layers import BUSYBOX_CONFIG, ensure_busybox_image

        chain = list(ensure_busybox_image().layer_chain)
        net_id = hns.create_network(pyhcs.HNSNetwork(name="bench-nat", type="nat", subnets=[
            pyhcs.Subnet(address_prefix=NAT_SUBNET)])).id
        if podman:
            pm = [podman, "--root", str(tmp / "podman-root"), "--runroot",
                  str(tmp / "podman-run"), "--tmpdir", str(tmp / "podman-tmp"),
                  "--network-config-dir", str(tmp / "podman-net"),
                  "--cgroup-manager", "cgroupfs", "--events-backend", "none",
                  "--storage-driver", "overlay"]
            archive = tmp / "busybox.tar"
            docker_archive(chain, dict(BUSYBOX_CONFIG), archive)
            subprocess.run([*pm, "load", "-q", "-i", str(archive)], check=True,
                           capture_output=True, env={**os.environ, "TMPDIR": str(tmp)})
        env = CtEnv(chain=chain, net_id=net_id, podman=pm)
        for v in variants:  # warm-up round, untimed
            runners[v](env)
        env.steps.clear()
        times: dict[str, list[float]] = {v: [] for v in variants}
        for i in range(rounds):
            order = variants if i % 2 == 0 else variants[::-1]
            for v in order:
                times[v].append(runners[v](env) * 1000)
            if not as_json:
                print(f"\rround {i + 1}/{rounds}", end="", file=sys.stderr, flush=True)
        if not as_json:
            print(file=sys.stderr)
        results = {v: summary(times[v]) for v in variants}
        if "podman" in results:
            results["pyhcs"]["vs_podman"] = (results["pyhcs"]["median_ms"]
                                             / results["podman"]["median_ms"])
        steps = {s: summary(env.steps[s]) for s in CT_STEPS if s in env.steps}
    except (BenchError, subprocess.CalledProcessError) as e:
        print(f"network: a round failed: {e}", file=sys.stderr)
        return 1
    finally:
        problems = _containers_cleanup(tmp, net_id, pm, netns, made)
        if problems:
            print("network: cleanup found leftovers (removed):", *problems, sep="\n  ",
                  file=sys.stderr)

    machine = {"cpus": os.cpu_count() or 0, "kernel": platform.release(),
               "python": platform.python_version(),
               "podman": tool_version([podman, "--version"]) if podman else "absent",
               "cgroup2_unified_hidden": unified_hidden,
               "loadavg_1min_before": load_before,
               "loadavg_1min_after": os.getloadavg()[0]}
    if as_json:
        print(json.dumps({"rounds": rounds, "command": COMMAND, "machine": machine,
                          "results": results, "pyhcs_breakdown": steps,
                          "cleanup_problems": problems}, indent=2))
    else:
        print(f"{machine['cpus']} cpus, kernel {machine['kernel']}, python "
              f"{machine['python']}, {machine['podman']}; load {load_before:.2f} before, "
              f"{machine['loadavg_1min_after']:.2f} after")
        print(f"{'variant':<34} {'median':>8} {'min':>8} {'p90':>8} {'/podman':>8}")
        labels = {"pyhcs": "pyhcs API, nat endpoint + 1 port", "podman": "podman run --rm -p"}
        for v, r in results.items():
            ratio = f"{r['vs_podman']:>7.3f}x" if "vs_podman" in r else f"{'-':>8}"
            print(f"{labels[v]:<34} {r['median_ms']:>8.1f} {r['min_ms']:>8.1f} "
                  f"{r['p90_ms']:>8.1f} {ratio}")
        print(f"(ms over {rounds} interleaved rounds)")
        if steps:
            print("\npyhcs breakdown, ms:")
            print(f"{'step':<16} {'median':>8} {'min':>8} {'p90':>8}")
            for name, st in steps.items():
                print(f"{name:<16} {st['median_ms']:>8.2f} {st['min_ms']:>8.2f} "
                      f"{st['p90_ms']:>8.2f}")
    return 1 if problems else 0


def _containers_cleanup(tmp: Path, net_id: str, pm: list[str], netns: str,
                        made: list[str]) -> list[str]:
    """Remove podman's containers and storage, pyhcs's network, then (lifecycle's cleanup)
    pyhcs's containers, supervisors, mounts under *tmp*, cgroups and *tmp*; then the
    network namespace (and with it every interface and nftables table in it)."""
    problems: list[str] = []
    if pm:
        r = subprocess.run([*pm, "ps", "-aq"], capture_output=True, text=True)
        for cid in r.stdout.split():
            problems.append(f"podman container {cid} was left")
            subprocess.run([*pm, "rm", "-f", cid], capture_output=True)
        subprocess.run([*pm, "system", "reset", "-f"], capture_output=True)
    if net_id:
        from pyhcs import _network as hns

        for e in hns.list_endpoints():
            problems.append(f"endpoint {e.id} was left")
            with contextlib.suppress(Exception):
                hns.delete_endpoint(e.id)
        try:
            hns.delete_network(net_id)
        except Exception as e:
            problems.append(f"network {net_id}: {e}")
    problems += cleanup(tmp)
    if subprocess.run(["ip", "netns", "delete", netns], capture_output=True).returncode:
        problems.append(f"ip netns delete {netns} failed")
    for d in ("/var/lib/containers", "/run"):
        with contextlib.suppress(OSError):
            umount(d, MNT_DETACH)
    for d in reversed(made):
        with contextlib.suppress(OSError):
            os.rmdir(d)
    return problems


if __name__ == "__main__":
    sys.exit(main())
