#!/usr/bin/env python3
"""Compute benchmark: exec, statistics, 100 containers, supervisor memory, stdout throughput.

Side by side in one run, against crun and runc where they have an equivalent. The peers
run ``crun spec``'s configuration made equivalent to pyhcs's (``lifecycle.oci_template``),
which has no seccomp profile, while pyhcs applies its default one to every container. So
the exec and fleet parts also run ``crun-seccomp``: crun given the very profile pyhcs
applies (``default_profile(DEFAULT_CAPABILITIES)``), as an engine such as podman gives it
one. The ratios are reported against both; plain crun (less work than pyhcs does) stays
the stricter yardstick.

(i)   ``exec``   - ``/bin/true`` in a running container: ``Container.create_process`` +
      ``Process.wait`` (+ ``close``) in this warm process, vs ``crun exec`` and ``runc
      exec`` into a running container of the same bundle. Interleaved, rotating order.
(ii)  ``stats``  - ``Container.statistics()`` on a running container.
(iii) ``fleet``  - 100 containers started one after another, each running ``sleep``:
      pyhcs ``create_container`` + ``start`` + ``create_process("sleep ...")``, vs a fresh
      overlay mount + ``config.json`` + ``crun run -d`` (and ``runc run -d``, and ``crun run
      -d`` with the seccomp profile) per container.
      Total time to have all 100 running; then the teardown (timed too, not compared).
      Before each variant ``os.sync()`` flushes what the one before it wrote.
(iv)  ``memory`` - at 100 running pyhcs containers, the proportional set size (Pss, from
      /proc/PID/smaps_rollup) of every supervisor process, and of the pid 1 it keeps made
      ahead for the next container, summed and divided by 100. crun and runc leave no process of
      their own beside a detached container (no conmon here), so their per-container
      overhead is 0; the container's own process (``sleep``) is shown for both.
(v)   ``stdout`` - bytes/s read from a container process's stdout pipe (``Process.stdio``):
      ``dd if=/dev/zero bs=1M count=N`` in the container, 1 MiB ``readinto`` here; with the
      pipe as the container gets it (1 MiB) and after the reader sets F_SETPIPE_SZ to 1 MiB
      itself (no change since the supervisor does it). The same ``dd`` run
      on the host through a ``subprocess`` pipe (64 KiB) is the reference.

The environment is the one of ``lifecycle.py`` (whose helpers it imports): a private
mount namespace with ``/sys/fs/cgroup/unified`` detached (crun refuses the hybrid layout
otherwise), private pyhcs roots in a temporary directory, cgroups under ``pyhcs-bench``,
and everything removed at the end.

Usage: ``PYTHONPATH=src .venv/bin/python bench/compute.py [--rounds N] [--only PART] [--json]``
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
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
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from lifecycle import (  # the bench folder is not a package: found through sys.path
    CGROUP_PARENT,
    MNT_DETACH,
    BenchError,
    cleanup,
    enter_private_mount_namespace,
    oci_template,
    overlay_bundle,
    remove_cgroups,
    summary,
    tool_version,
    umount,
)

SLEEP = ["sleep", "1000000"]
F_SETPIPE_SZ = 1031
F_GETPIPE_SZ = 1032
MIB = 1 << 20
PARTS = ("exec", "stats", "fleet", "stdout")


# -- OCI runtime containers ------------------------------------------------------------------


@dataclass
class Oci:
    """crun or runc with a state directory in the benchmark's temp dir."""

    name: str
    binary: str
    tmp: Path
    lowerdir: str
    template: dict[str, Any]
    bundles: dict[str, Path] = field(default_factory=dict)
    seq: int = 0

    @property
    def state(self) -> Path:
        return self.tmp / f"{self.name}-state"

    def _run(self, *args: str) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run([self.binary, "--root", str(self.state), *args],
                              stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE)

    def start(self) -> str:
        """Fresh overlay + config.json + ``run -d`` of ``sleep``; returns the id."""
        self.seq += 1
        cid = f"bench-{self.name}-{os.getpid()}-{self.seq}"
        bundle, merged = overlay_bundle(self.tmp, self.name, self.lowerdir)
        self.bundles[cid] = bundle
        spec = dict(self.template)
        spec["process"] = {**self.template["process"], "args": SLEEP}
        spec["root"] = {"path": str(merged), "readonly": False}
        spec["linux"] = {**self.template["linux"], "cgroupsPath": f"/{CGROUP_PARENT}/{cid}"}
        (bundle / "config.json").write_text(json.dumps(spec))
        # stderr to a file, not a pipe: the detached container inherits it and would keep
        # a pipe open forever
        with open(bundle / "run.log", "wb") as log:
            r = subprocess.run([self.binary, "--root", str(self.state), "run", "-d",
                                "--bundle", str(bundle), cid], stdin=subprocess.DEVNULL,
                               stdout=subprocess.DEVNULL, stderr=log)
        if r.returncode != 0:
            raise BenchError(f"{self.name} run -d: exit {r.returncode}: "
                             f"{(bundle / 'run.log').read_text(errors='replace').strip()}")
        return cid

    def exec_true(self, cid: str) -> None:
        r = self._run("exec", cid, "/bin/true")
        if r.returncode != 0:
            raise BenchError(f"{self.name} exec: exit {r.returncode}: "
                             f"{r.stderr.decode(errors='replace').strip()}")

    def pid(self, cid: str) -> int:
        out = subprocess.run([self.binary, "--root", str(self.state), "state", cid],
                             capture_output=True, check=True).stdout
        return int(json.loads(out)["pid"])

    def remove(self, cid: str) -> None:
        self._run("delete", "-f", cid)
        bundle = self.bundles.pop(cid)
        with contextlib.suppress(OSError):
            umount(str(bundle / "merged"), MNT_DETACH)
        shutil.rmtree(bundle, ignore_errors=True)

    def remove_all(self) -> None:
        for cid in list(self.bundles):
            self.remove(cid)


# -- pyhcs containers ------------------------------------------------------------------------


class Pyhcs:
    def __init__(self, chain: list[str]) -> None:
        import pyhcs

        self.pyhcs = pyhcs
        self.layers = [pyhcs.Layer(id=os.path.basename(p), path=p) for p in chain]
        self.seq = 0
        self.running: list[str] = []

    def start(self) -> str:
        pyhcs = self.pyhcs
        self.seq += 1
        cid = f"bench-api-{os.getpid()}-{self.seq}"
        c = pyhcs.create_container(cid, pyhcs.ContainerConfig(layers=self.layers))
        self.running.append(cid)
        c.start()
        c.create_process(pyhcs.ProcessConfig(command_line=" ".join(SLEEP))).close()
        c.close()
        return cid

    def exec_true(self, c: Any) -> None:
        p = c.create_process(self.pyhcs.ProcessConfig(command_line="/bin/true"))
        code = p.wait()
        p.close()
        if code != 0:
            raise BenchError(f"api exec: /bin/true exited {code}")

    def supervisor(self, cid: str) -> int:
        return int(self.pyhcs.container_state(cid)["supervisor_pid"])

    def init(self, cid: str) -> int:
        """The host pid of the container's pid 1."""
        with self.pyhcs.open_container(cid) as c:
            return int(c._call("Bench", {"op": "netns"})[0]["pid"])

    def remove_all(self) -> None:
        pyhcs = self.pyhcs
        for cid in self.running:
            with pyhcs.open_container(cid) as c:
                c.terminate()
        for cid in self.running:
            with pyhcs.open_container(cid) as c:
                c.wait(60)
            pyhcs.remove_container(cid)
        self.running.clear()


# -- measurements -----------------------------------------------------------------------------


def cpu_times() -> tuple[int, int]:
    """(steal, total) clock ticks of all CPUs since boot (/proc/stat): on a virtual machine
    the time the host gave to others, which slows whatever runs then."""
    with open("/proc/stat") as f:
        ticks = [int(v) for v in f.readline().split()[1:]]
    return ticks[7], sum(ticks[:8])


def timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1000


def rollup(pid: int) -> dict[str, int]:
    """/proc/PID/smaps_rollup in KiB (Rss, Pss, Private_Dirty, ...)."""
    out: dict[str, int] = {}
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            parts = line.split()
            if len(parts) == 3 and parts[2] == "kB":
                out[parts[0].rstrip(":")] = int(parts[1])
    return out


def memory_of(pids: list[int], per: int = 0) -> dict[str, float]:
    """KiB of Pss, Rss and private memory of *pids* together, divided by *per* (default:
    the number of processes, so a mean per process)."""
    rolls = [rollup(p) for p in pids]
    n = per or len(rolls)
    return {
        "pss_kib": sum(r["Pss"] for r in rolls) / n,
        "rss_kib": sum(r["Rss"] for r in rolls) / n,
        "private_kib": sum(r["Private_Clean"] + r["Private_Dirty"] for r in rolls) / n,
        "processes": len(rolls),
    }


def children_of(pid: int) -> list[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return [int(x) for x in f.read().split()]


def bench_exec(api: Pyhcs, ocis: list[Oci], rounds: int) -> dict[str, dict[str, float]]:
    pyhcs = api.pyhcs
    cid = api.start()
    c = pyhcs.open_container(cid)
    peers = {o.name: o.start() for o in ocis}
    runners: dict[str, Callable[[], None]] = {"api": lambda: api.exec_true(c)}
    for o in ocis:
        runners[o.name] = (lambda o=o: o.exec_true(peers[o.name]))  # type: ignore[misc]
    try:
        for fn in runners.values():  # warm-up
            fn()
        times: dict[str, list[float]] = {k: [] for k in runners}
        names = list(runners)
        for i in range(rounds):
            k = i % len(names)
            for name in names[k:] + names[:k]:
                times[name].append(timed(runners[name]))
        return {k: {**summary(v), **drift(v)} for k, v in times.items()}
    finally:
        c.close()
        api.remove_all()
        for o in ocis:
            o.remove_all()


def drift(values_ms: list[float]) -> dict[str, float]:
    """The medians of the first and the last fifth of the rounds: an exec that costs more
    the more execs the container has seen shows here."""
    n = max(1, len(values_ms) // 5)
    return {"first_fifth_median_ms": statistics.median(values_ms[:n]),
            "last_fifth_median_ms": statistics.median(values_ms[-n:])}


def bench_stats(api: Pyhcs, calls: int) -> dict[str, float]:
    cid = api.start()
    c = api.pyhcs.open_container(cid)
    try:
        c.statistics()
        return summary([timed(c.statistics) for _ in range(calls)])
    finally:
        c.close()
        api.remove_all()


def bench_fleet(api: Pyhcs, ocis: list[Oci], count: int, rounds: int
                ) -> tuple[dict[str, dict[str, float]], dict[str, Any]]:
    """(iii) and (iv): start *count* containers in a row, per variant, interleaved."""
    totals: dict[str, list[float]] = {"api": []}
    teardown: dict[str, list[float]] = {"api": []}
    memory: dict[str, Any] = {}
    for o in ocis:
        totals[o.name] = []
        teardown[o.name] = []
    names = list(totals)
    by_name = {o.name: o for o in ocis}
    for i in range(rounds):
        k = i % len(names)
        for name in names[k:] + names[:k]:
            # the file system's journal holds the writes of the teardown before: flushed
            # now, so no variant pays for the one before it (ext4 here: new folders and
            # files took 0.3 ms instead of 0.03 ms while it committed)
            os.sync()
            if name == "api":
                t0 = time.perf_counter()
                for _ in range(count):
                    api.start()
                totals[name].append((time.perf_counter() - t0) * 1000)
                if "api" not in memory:
                    sups = {api.supervisor(cid) for cid in api.running}
                    inits = [api.init(cid) for cid in api.running]
                    # what else the supervisors keep: the pid 1 made ahead
                    ahead = {q for s in sups for q in children_of(s)} - set(inits)
                    memory["api"] = {"supervisors": memory_of(sorted(sups | ahead), per=count),
                                     "container_processes": memory_of(inits)}
                teardown[name].append(timed(api.remove_all))
            else:
                o = by_name[name]
                t0 = time.perf_counter()
                for _ in range(count):
                    o.start()
                totals[name].append((time.perf_counter() - t0) * 1000)
                if name not in memory:
                    memory[name] = {"supervisors": None, "container_processes":
                                    memory_of([o.pid(cid) for cid in o.bundles])}
                teardown[name].append(timed(o.remove_all))
        print(f"\rfleet round {i + 1}/{rounds}", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)
    results = {}
    for name in names:
        results[name] = {**{f"start_{k}": v for k, v in summary(totals[name]).items()},
                         **{f"teardown_{k}": v for k, v in summary(teardown[name]).items()}}
    return results, memory


def _drain(f: Any, size: int) -> float:
    """Read *size* bytes from *f* in 1 MiB reads; seconds taken."""
    buf = memoryview(bytearray(MIB))
    got = 0
    t0 = time.perf_counter()
    while True:
        n = f.readinto(buf)
        if not n:
            break
        got += n
    dt = time.perf_counter() - t0
    if got != size:
        raise BenchError(f"stdout: read {got} bytes, expected {size}")
    return dt


def bench_stdout(api: Pyhcs, mib: int, rounds: int) -> dict[str, dict[str, float]]:
    pyhcs = api.pyhcs
    size = mib * MIB
    dd = f"dd if=/dev/zero bs=1M count={mib}"
    cid = api.start()
    c = pyhcs.open_container(cid)
    rates: dict[str, list[float]] = {"api": [], "api_pipe_1mib": [], "host": []}
    pipe_size = 0
    try:
        for i in range(rounds + 1):  # the first round warms up
            for variant in rates:
                if variant == "host":
                    proc = subprocess.Popen(["busybox", *dd.split()], stdout=subprocess.PIPE,
                                            stderr=subprocess.DEVNULL)
                    assert proc.stdout is not None
                    dt = _drain(proc.stdout, size)
                    proc.stdout.close()
                    if proc.wait() != 0:
                        raise BenchError("host dd failed")
                else:
                    p = c.create_process(pyhcs.ProcessConfig(command_line=dd,
                                                             create_std_out_pipe=True))
                    _, out, _ = p.stdio()
                    assert out is not None
                    pipe_size = fcntl.fcntl(out.fileno(), F_GETPIPE_SZ)
                    if variant == "api_pipe_1mib":
                        fcntl.fcntl(out.fileno(), F_SETPIPE_SZ, MIB)
                    dt = _drain(out, size)
                    out.close()
                    code = p.wait()
                    p.close()
                    if code != 0:
                        raise BenchError(f"dd in the container exited {code}")
                if i:
                    rates[variant].append(size / dt / 1e9)
    finally:
        c.close()
        api.remove_all()
    result: dict[str, dict[str, float]] = {}
    for k, v in rates.items():
        result[k] = {"median_gb_s": statistics.median(v), "max_gb_s": max(v),
                     "min_gb_s": min(v)}
    result["api"]["default_pipe_bytes"] = pipe_size
    return result


# -- main -------------------------------------------------------------------------------------


def report(r: dict[str, Any]) -> str:
    lines = []
    m = r["machine"]
    lines.append(f"{m['cpus']} cpus, kernel {m['kernel']}, python {m['python']}, {m['crun']}, "
                 f"{m['runc']}; load {m['loadavg_1min_before']:.2f} before, "
                 f"{m['loadavg_1min_after']:.2f} after; CPU steal {m['cpu_steal_percent']:.1f}%")
    if "exec" in r:
        lines += _report_exec(r)
    if "stats" in r:
        st = r["stats"]
        lines.append(f"\n(ii) Container.statistics(), ms ({r['stats_calls']} calls): median "
                     f"{st['median_ms']:.3f}, min {st['min_ms']:.3f}, p90 {st['p90_ms']:.3f} "
                     "(target <= 2 ms)")
    if "fleet" in r:
        lines += _report_fleet(r)
    if "stdout" in r:
        lines += _report_stdout(r)
    return "\n".join(lines)


def _report_exec(r: dict[str, Any]) -> list[str]:
    lines = []
    ex = r["exec"]
    lines.append(f"\n(i) exec /bin/true in a running container, ms ({r['rounds']} rounds)")
    lines.append(f"{'variant':<34} {'median':>8} {'min':>8} {'p90':>8} {'/crun':>7} {'/runc':>7}"
                 f" {'/crun+sc':>8} {'1st 5th':>8} {'last 5th':>8}")
    label = {"api": "pyhcs create_process + wait", "crun": "crun exec", "runc": "runc exec",
             "crun-seccomp": "crun exec, pyhcs's seccomp profile"}
    for k, s in ex.items():
        ratios = " ".join(f"{s['median_ms'] / ex[p]['median_ms']:>{w - 1}.2f}x" if p in ex
                          else f"{'-':>{w}}" for p, w in (("crun", 7), ("runc", 7),
                                                          ("crun-seccomp", 8)))
        lines.append(f"{label[k]:<34} {s['median_ms']:>8.2f} {s['min_ms']:>8.2f} "
                     f"{s['p90_ms']:>8.2f} {ratios} {s['first_fifth_median_ms']:>8.2f} "
                     f"{s['last_fifth_median_ms']:>8.2f}")
    return lines


def _report_fleet(r: dict[str, Any]) -> list[str]:
    lines = []
    fl = r["fleet"]
    n = r["containers"]
    lines.append(f"\n(iii) {n} containers started one after another (each running sleep), "
                 f"total ms ({r['fleet_rounds']} rounds)")
    lines.append(f"{'variant':<34} {'median':>9} {'min':>9} {'per ctr':>8} {'/crun':>7} "
                 f"{'/crun+sc':>8} {'teardown':>9}")
    flabel = {"api": "pyhcs create+start+create_process", "crun": "crun run -d (+ overlay)",
              "runc": "runc run -d (+ overlay)",
              "crun-seccomp": "crun run -d, pyhcs's seccomp"}
    for k, s in fl.items():
        ratio = " ".join(f"{s['start_median_ms'] / fl[p]['start_median_ms']:>{w - 1}.2f}x"
                         if p in fl else f"{'-':>{w}}" for p, w in (("crun", 7),
                                                                    ("crun-seccomp", 8)))
        lines.append(f"{flabel[k]:<34} {s['start_median_ms']:>9.0f} {s['start_min_ms']:>9.0f} "
                     f"{s['start_median_ms'] / n:>8.2f} {ratio} {s['teardown_median_ms']:>9.0f}")
    mem = r["memory"]
    lines.append(f"\n(iv) memory at {n} running containers, KiB (smaps_rollup)")
    sup = mem["api"]["supervisors"]
    lines.append(f"pyhcs supervisors, per container ({sup['processes']} processes in all): "
                 f"Pss {sup['pss_kib']:.0f}, private {sup['private_kib']:.0f}, "
                 f"Rss {sup['rss_kib']:.0f}  (target Pss <= 1024)")
    for k in mem:
        cp = mem[k]["container_processes"]
        lines.append(f"{k} container's sleep: Pss {cp['pss_kib']:.0f}, Rss {cp['rss_kib']:.0f}"
                     + ("" if k == "api" else f"; {k} itself: no process left (0)"))
    return lines


def _report_stdout(r: dict[str, Any]) -> list[str]:
    lines = []
    so = r["stdout"]
    lines.append(f"\n(v) stdout throughput, GB/s ({r['stdout_mib']} MiB per round, "
                 f"{r['stdout_rounds']} rounds; the container's pipe is "
                 f"{so['api']['default_pipe_bytes'] // 1024} KiB)")
    slabel = {"api": "pyhcs Process stdout pipe", "api_pipe_1mib": "  same, pipe set to 1 MiB",
              "host": "host dd | subprocess pipe"}
    for k in ("api", "api_pipe_1mib", "host"):
        s = so[k]
        lines.append(f"{slabel[k]:<34} median {s['median_gb_s']:.2f}  min {s['min_gb_s']:.2f}"
                     f"  max {s['max_gb_s']:.2f}")
    lines.append("(target >= 1 GB/s)")
    return lines


def _steal_percent(before: tuple[int, int], after: tuple[int, int]) -> float:
    total = after[1] - before[1]
    return 100 * (after[0] - before[0]) / total if total else 0.0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--rounds", type=int, default=30, help="exec rounds (default 30)")
    ap.add_argument("--stats-calls", type=int, default=300)
    ap.add_argument("--containers", type=int, default=100)
    ap.add_argument("--fleet-rounds", type=int, default=3)
    ap.add_argument("--stdout-mib", type=int, default=2000)
    ap.add_argument("--stdout-rounds", type=int, default=3)
    ap.add_argument("--only", action="append", choices=PARTS,
                    help="run this part only (repeatable; default: all of them)")
    ap.add_argument("--json", action="store_true", help="print the results as JSON")
    args = ap.parse_args(argv)
    if os.geteuid() != 0:
        print("compute: must run as root", file=sys.stderr)
        return 2
    crun, runc = shutil.which("crun"), shutil.which("runc")
    if not crun or not runc:
        print("compute: crun and runc must be installed", file=sys.stderr)
        return 2
    unified_hidden = enter_private_mount_namespace()
    tmp = Path(tempfile.mkdtemp(prefix="pyhcs-bench-"))
    os.environ["PYHCS_ROOT"] = str(tmp / "root")
    os.environ["PYHCS_RUN_ROOT"] = str(tmp / "run")
    os.environ["PYHCS_CGROUP_PARENT"] = CGROUP_PARENT
    if remove_cgroups(CGROUP_PARENT):
        print("compute: cgroups from an earlier run remain under pyhcs-bench", file=sys.stderr)
        return 2
    load_before = os.getloadavg()[0]
    steal_before = cpu_times()
    ocis: list[Oci] = []
    results: dict[str, Any] = {}
    try:
        from pyhcs._layers import ensure_busybox_image
        from pyhcs._runtime._seccomp import default_profile
        from pyhcs._runtime._spec import DEFAULT_CAPABILITIES

        chain = list(ensure_busybox_image().layer_chain)
        lowerdir = ":".join(os.path.join(p, "fs") for p in chain)
        template = oci_template(crun, tmp)
        # the profile pyhcs applies to each of its containers (see the docstring)
        sealed = json.loads(json.dumps(template))
        sealed["linux"]["seccomp"] = default_profile(DEFAULT_CAPABILITIES)
        ocis = [Oci("crun", crun, tmp, lowerdir, template),
                Oci("runc", runc, tmp, lowerdir, template),
                Oci("crun-seccomp", crun, tmp, lowerdir, sealed)]
        api = Pyhcs(chain)
        parts = args.only or PARTS
        if "exec" in parts:
            print("exec ...", file=sys.stderr, flush=True)
            results["exec"] = bench_exec(api, ocis, args.rounds)
        if "stats" in parts:
            print("statistics ...", file=sys.stderr, flush=True)
            results["stats"] = bench_stats(api, args.stats_calls)
        if "fleet" in parts:
            results["fleet"], results["memory"] = bench_fleet(api, ocis, args.containers,
                                                              args.fleet_rounds)
        if "stdout" in parts:
            print("stdout ...", file=sys.stderr, flush=True)
            results["stdout"] = bench_stdout(api, args.stdout_mib, args.stdout_rounds)
    except BenchError as e:
        print(f"compute: a round failed: {e}", file=sys.stderr)
        return 1
    finally:
        for o in ocis:
            o.remove_all()
        problems = cleanup(tmp)
        if problems:
            print("compute: cleanup found leftovers (removed):", *problems, sep="\n  ",
                  file=sys.stderr)
    results.update({
        "rounds": args.rounds, "stats_calls": args.stats_calls,
        "containers": args.containers, "fleet_rounds": args.fleet_rounds,
        "stdout_mib": args.stdout_mib, "stdout_rounds": args.stdout_rounds,
        "machine": {
            "cpus": os.cpu_count() or 0, "kernel": platform.release(),
            "python": platform.python_version(), "crun": tool_version([crun, "--version"]),
            "runc": tool_version([runc, "--version"]),
            "cgroup2_unified_hidden": unified_hidden, "loadavg_1min_before": load_before,
            "loadavg_1min_after": os.getloadavg()[0],
            "cpu_steal_percent": _steal_percent(steal_before, cpu_times()),
        },
        "cleanup_problems": problems,
    })
    print(json.dumps(results, indent=2) if args.json else report(results))
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
