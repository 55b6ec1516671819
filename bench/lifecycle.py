#!/usr/bin/env python3
"""Container lifecycle benchmark: create -> start -> wait -> delete of ``/bin/true``.

Four variants run side by side in one process, interleaved round by round (the order
rotates each round: a b c d, b c d a, ...), each in a fresh sandbox over the busybox image:

(a) ``api``  - pyhcs's Python API in this (warm) process: create_container, start,
    create_process("/bin/true"), Process.wait, Container.wait, remove_container.
(b) ``cli``  - ``pyhcs run --rm busybox -- /bin/true`` as a subprocess (a cold Python).
(c) ``crun`` - mount a fresh overlay (upper/work over the busybox layers), write the
    bundle's config.json, ``crun run``, unmount, remove the directories.
(d) ``runc`` - the same with ``runc run``.

Everything runs as root inside a private mount namespace in which the cgroup2 mount at
``/sys/fs/cgroup/unified`` is detached (crun refuses the hybrid layout otherwise); that is
set up once, before anything is timed, so all four variants see the same machine. pyhcs's
state lives in a temporary directory (``PYHCS_ROOT``, ``PYHCS_RUN_ROOT``) and its cgroups,
like crun's and runc's, under ``pyhcs-bench``; everything is removed at the end.

Usage: ``PYTHONPATH=src .venv/bin/python bench/lifecycle.py [--rounds N] [--json]``
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import ctypes.util
import errno
import itertools
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
CGROUP_PARENT = "pyhcs-bench"
CGROUP_ROOT = "/sys/fs/cgroup"
UNIFIED = "/sys/fs/cgroup/unified"
COMMAND = "/bin/true"

CLONE_NEWNS = 0x00020000
MS_REC = 0x4000
MS_PRIVATE = 1 << 18
MNT_DETACH = 2

VARIANTS = ("api", "cli", "crun", "runc")
LABELS = {
    "api": "(a) pyhcs Python API (warm process)",
    "cli": "(b) pyhcs CLI `pyhcs run --rm`",
    "crun": "(c) crun run (+ overlay mount/umount)",
    "runc": "(d) runc run (+ overlay mount/umount)",
}
API_STEPS = ("create", "start", "create_process", "process_wait", "container_wait", "remove")

_libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong,
                        ctypes.c_char_p]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
_libc.unshare.argtypes = [ctypes.c_int]


class BenchError(RuntimeError):
    """A round that did not succeed: the benchmark stops rather than report a fast number."""


# -- syscalls -------------------------------------------------------------------------------


def _check(ret: int, what: str) -> None:
    if ret != 0:
        e = ctypes.get_errno()
        raise OSError(e, f"{what}: {os.strerror(e)}")


def mount(source: str | None, target: str, fstype: str | None, flags: int,
          data: str | None = None) -> None:
    _check(_libc.mount(source.encode() if source is not None else None, target.encode(),
                       fstype.encode() if fstype is not None else None, flags,
                       data.encode() if data is not None else None), f"mount {target}")


def umount(target: str, flags: int = 0) -> None:
    _check(_libc.umount2(target.encode(), flags), f"umount {target}")


def enter_private_mount_namespace() -> bool:
    """unshare(CLONE_NEWNS), make every mount private, detach the cgroup2 mount.

    Returns True if ``/sys/fs/cgroup/unified`` was mounted (and is now hidden here).
    Must run while the process is single-threaded (before pyhcs is imported).
    """
    _check(_libc.unshare(CLONE_NEWNS), "unshare(CLONE_NEWNS)")
    mount(None, "/", None, MS_REC | MS_PRIVATE)
    try:
        umount(UNIFIED, MNT_DETACH)
    except OSError as e:
        if e.errno in (errno.EINVAL, errno.ENOENT):
            return False
        raise
    return True


def mounts_under(prefix: str) -> list[str]:
    """Mount points at or below *prefix* in this namespace, deepest first."""
    out: list[str] = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            target = line.split()[4].encode().decode("unicode_escape")
            if target == prefix or target.startswith(prefix.rstrip("/") + "/"):
                out.append(target)
    return sorted(out, key=len, reverse=True)


# -- statistics -----------------------------------------------------------------------------


def p90(values: list[float]) -> float:
    """The 90th percentile, linear interpolation between closest ranks (numpy's default)."""
    s = sorted(values)
    if len(s) == 1:
        return s[0]
    k = 0.9 * (len(s) - 1)
    lo = int(k)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def summary(values_ms: list[float]) -> dict[str, float]:
    return {"median_ms": statistics.median(values_ms), "min_ms": min(values_ms),
            "p90_ms": p90(values_ms), "mean_ms": statistics.fmean(values_ms)}


# -- the environment ------------------------------------------------------------------------


@dataclass
class Env:
    """Everything the rounds share: temp dirs, the image's layers, the OCI bundle template."""

    tmp: Path
    chain: list[str]
    lowerdir: str
    spec: dict[str, Any]
    crun: str
    runc: str
    cli: list[str]
    cli_env: dict[str, str]
    api_steps: dict[str, list[float]] = field(default_factory=dict)
    seq: int = 0

    def next_id(self, tag: str) -> str:
        self.seq += 1
        return f"bench-{tag}-{os.getpid()}-{self.seq}"


def oci_template(crun: str, workdir: Path) -> dict[str, Any]:
    """``crun spec``, made equivalent to pyhcs's container spec."""
    d = workdir / "spec"
    d.mkdir()
    subprocess.run([crun, "spec"], cwd=d, check=True, capture_output=True)
    spec: dict[str, Any] = json.loads((d / "config.json").read_text())
    shutil.rmtree(d)
    spec["process"]["terminal"] = False
    spec["process"]["args"] = [COMMAND]
    spec["root"] = {"path": "", "readonly": False}
    spec["linux"]["namespaces"] = [{"type": t} for t in
                                   ("pid", "network", "ipc", "uts", "mount", "cgroup")]
    return spec


def cli_command(pycache: Path) -> tuple[list[str], dict[str, str]]:
    """The pyhcs CLI: the venv's console script if installed, else ``python -m pyhcs``."""
    import pyhcs

    env = dict(os.environ)
    # A normal install has its bytecode compiled; an editable one run with
    # PYTHONDONTWRITEBYTECODE recompiles every module on every start. Cache the bytecode in
    # the benchmark's temp dir (written by the warm-up round), leaving the checkout alone.
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    env["PYTHONPYCACHEPREFIX"] = str(pycache)
    script = REPO / ".venv" / "bin" / "pyhcs"
    if script.exists():
        return [str(script)], env
    src = str(Path(pyhcs.__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(
        [src, *[p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]])
    return [sys.executable, "-m", "pyhcs"], env


# -- the variants ---------------------------------------------------------------------------


def run_api(env: Env) -> float:
    """(a): the Python API. Returns seconds; records the per-call breakdown."""
    import pyhcs

    cid = env.next_id("api")
    layers = [pyhcs.Layer(id=os.path.basename(p), path=p) for p in env.chain]
    t = [time.perf_counter()]
    c = pyhcs.create_container(cid, pyhcs.ContainerConfig(layers=layers))
    t.append(time.perf_counter())
    try:
        c.start()
        t.append(time.perf_counter())
        p = c.create_process(pyhcs.ProcessConfig(command_line=COMMAND))
        t.append(time.perf_counter())
        code = p.wait()
        t.append(time.perf_counter())
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
    if code != 0:
        raise BenchError(f"api: {COMMAND} exited {code} in container {cid}")
    for name, (a, b) in zip(API_STEPS, itertools.pairwise(t), strict=True):
        env.api_steps.setdefault(name, []).append((b - a) * 1000)
    return t[-1] - t[0]


def run_cli(env: Env) -> float:
    """(b): ``pyhcs run --rm busybox -- /bin/true``."""
    t0 = time.perf_counter()
    r = subprocess.run([*env.cli, "run", "--rm", "busybox", "--", COMMAND], env=env.cli_env,
                       stdin=subprocess.DEVNULL, capture_output=True)
    dt = time.perf_counter() - t0
    if r.returncode != 0:
        raise BenchError(f"cli: exit {r.returncode}: {r.stderr.decode(errors='replace').strip()}")
    return dt


def overlay_bundle(tmp: Path, prefix: str, lowerdir: str) -> tuple[Path, Path]:
    """A fresh bundle folder in *tmp* with an overlay of *lowerdir* mounted at its
    ``merged/`` (the peers' rootfs, as pyhcs's sandbox is); returns (bundle, merged)."""
    bundle = Path(tempfile.mkdtemp(prefix=f"{prefix}-", dir=tmp))
    upper, work, merged = bundle / "upper", bundle / "work", bundle / "merged"
    for d in (upper, work, merged):
        d.mkdir()
    mount("overlay", str(merged), "overlay", 0,
          f"lowerdir={lowerdir},upperdir={upper},workdir={work}")
    return bundle, merged


def make_oci_runner(name: str) -> Callable[[Env], float]:
    def run_oci(env: Env) -> float:
        """(c)/(d): fresh overlay, config.json, ``<runtime> run``, umount, rm."""
        runtime = env.crun if name == "crun" else env.runc
        state = env.tmp / f"{name}-state"
        cid = env.next_id(name)
        spec = dict(env.spec)
        t0 = time.perf_counter()
        bundle, merged = overlay_bundle(env.tmp, name, env.lowerdir)
        try:
            spec["root"] = {"path": str(merged), "readonly": False}
            spec["linux"] = {**env.spec["linux"], "cgroupsPath": f"/{CGROUP_PARENT}/{cid}"}
            (bundle / "config.json").write_text(json.dumps(spec))
            r = subprocess.run([runtime, "--root", str(state), "run", "--bundle", str(bundle),
                                cid], stdin=subprocess.DEVNULL, capture_output=True)
        finally:
            umount(str(merged))
        shutil.rmtree(bundle)
        dt = time.perf_counter() - t0
        if r.returncode != 0:
            with contextlib.suppress(OSError):
                subprocess.run([runtime, "--root", str(state), "delete", "-f", cid],
                               capture_output=True)
            raise BenchError(f"{name}: exit {r.returncode}: "
                             f"{(r.stderr or r.stdout).decode(errors='replace').strip()}")
        return dt

    return run_oci


RUNNERS: dict[str, Callable[[Env], float]] = {
    "api": run_api,
    "cli": run_cli,
    "crun": make_oci_runner("crun"),
    "runc": make_oci_runner("runc"),
}


# -- cleanup --------------------------------------------------------------------------------


def remove_cgroups(parent: str) -> list[str]:
    """rmdir ``<hierarchy>/<parent>`` and everything below it, in every hierarchy.
    Returns what could not be removed."""
    left: list[str] = []
    roots = [os.path.join(CGROUP_ROOT, h) for h in os.listdir(CGROUP_ROOT)]
    if not any(os.path.ismount(r) for r in roots):
        roots = [CGROUP_ROOT]  # a pure cgroup2 machine
    for root in roots:
        top = os.path.join(root, parent)
        if not os.path.isdir(top):
            continue
        if not os.path.ismount(root):
            # A plain directory of the /sys/fs/cgroup tmpfs: here, the hidden cgroup2 mount
            # point, in which crun (v1 mode) still makes "cgroups" holding a cgroup.procs file.
            shutil.rmtree(top, ignore_errors=True)
            if os.path.exists(top):
                left.append(f"{top}: cannot remove")
            continue
        for base, _dirs, _files in sorted(os.walk(top), key=lambda w: -len(w[0])):
            for _ in range(50):
                try:
                    os.rmdir(base)
                    break
                except FileNotFoundError:
                    break
                except OSError as e:
                    if e.errno != errno.EBUSY:
                        left.append(f"{base}: {e.strerror}")
                        break
                    time.sleep(0.01)
            else:
                left.append(f"{base}: busy")
    return left


def supervisors() -> list[int]:
    """Processes started with our PYHCS_ROOT in their environment (pyhcs supervisors)."""
    mark = f"PYHCS_ROOT={os.environ.get('PYHCS_ROOT', '')}".encode()
    out: list[int] = []
    for p in Path("/proc").iterdir():
        if not p.name.isdigit() or int(p.name) == os.getpid():
            continue
        try:
            if mark in (p / "environ").read_bytes().split(b"\0"):
                out.append(int(p.name))
        except OSError:
            pass
    return out


def cleanup(tmp: Path) -> list[str]:
    """Remove every container, supervisor, mount, cgroup and directory the run made.
    Returns what was found left over (an empty list when the run was clean)."""
    problems: list[str] = []
    if "pyhcs" in sys.modules:
        import pyhcs

        try:
            for props in pyhcs.get_containers():
                problems.append(f"container {props.id} was left")
                with contextlib.suppress(Exception):
                    pyhcs.remove_container(props.id, force=True)
        except Exception as e:
            problems.append(f"listing containers: {e}")
    deadline = time.monotonic() + 5
    while (pids := supervisors()) and time.monotonic() < deadline:
        time.sleep(0.05)
    for pid in pids:
        problems.append(f"process {pid} was left")
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)
    for target in mounts_under(str(tmp)):
        problems.append(f"mount {target} was left")
        with contextlib.suppress(OSError):
            umount(target, MNT_DETACH)
    problems += remove_cgroups(CGROUP_PARENT)
    shutil.rmtree(tmp, ignore_errors=True)
    return problems


# -- main -----------------------------------------------------------------------------------


def tool_version(argv: list[str]) -> str:
    out = subprocess.run(argv, capture_output=True, text=True).stdout
    return out.splitlines()[0].strip() if out else "?"


def table(results: dict[str, dict[str, float]], rounds: int) -> str:
    rows = [f"{'variant':<40} {'median':>8} {'min':>8} {'p90':>8} {'/crun':>7} {'/runc':>7}"]
    for v, s in results.items():
        ratios = " ".join(f"{s[k]:>6.2f}x" if k in s else f"{'-':>7}"
                          for k in ("vs_crun", "vs_runc"))
        rows.append(f"{LABELS[v]:<40} {s['median_ms']:>8.1f} {s['min_ms']:>8.1f} "
                    f"{s['p90_ms']:>8.1f} {ratios}")
    rows.append(f"(ms over {rounds} interleaved rounds)")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--rounds", type=int, default=20, help="timed rounds (default 20)")
    ap.add_argument("--json", action="store_true", help="print the results as JSON")
    ap.add_argument("--only", default=",".join(VARIANTS), metavar="LIST",
                    help="comma-separated subset of api,cli,crun,runc (default: all four)")
    args = ap.parse_args(argv)
    if args.rounds < 1:
        ap.error("--rounds must be at least 1")
    variants = [v for v in VARIANTS if v in args.only.split(",")]
    unknown = set(args.only.split(",")) - set(VARIANTS)
    if unknown or not variants:
        ap.error(f"--only: unknown variant(s) {sorted(unknown)}; choose from {VARIANTS}")
    if os.geteuid() != 0:
        print("lifecycle: must run as root", file=sys.stderr)
        return 2
    crun, runc = shutil.which("crun"), shutil.which("runc")
    if not crun or not runc:
        print("lifecycle: crun and runc must be installed (apt-get install crun runc)",
              file=sys.stderr)
        return 2
    # 1. the private mount namespace, while single-threaded and before anything is timed
    unified_hidden = enter_private_mount_namespace()
    # 2. private pyhcs state, before pyhcs is imported
    tmp = Path(tempfile.mkdtemp(prefix="pyhcs-bench-"))
    os.environ["PYHCS_ROOT"] = str(tmp / "root")
    os.environ["PYHCS_RUN_ROOT"] = str(tmp / "run")
    os.environ["PYHCS_CGROUP_PARENT"] = CGROUP_PARENT
    leftovers = remove_cgroups(CGROUP_PARENT)  # from an earlier interrupted run
    if leftovers:
        print("lifecycle: cgroups from an earlier run remain:", *leftovers, sep="\n  ",
              file=sys.stderr)
        return 2

    load_before = os.getloadavg()[0]
    results: dict[str, dict[str, float]] = {}
    steps: dict[str, dict[str, float]] = {}
    cli: list[str] = []
    problems: list[str] = []
    try:
        from pyhcs._layers import ensure_busybox_image

        chain = list(ensure_busybox_image().layer_chain)
        cli, cli_env = cli_command(tmp / "pycache")
        env = Env(tmp=tmp, chain=chain,
                  lowerdir=":".join(os.path.join(p, "fs") for p in chain),
                  spec=oci_template(crun, tmp), crun=crun, runc=runc, cli=cli,
                  cli_env=cli_env)
        for v in variants:  # warm-up round, untimed
            RUNNERS[v](env)
        env.api_steps.clear()
        times: dict[str, list[float]] = {v: [] for v in variants}
        for i in range(args.rounds):
            # rotate the order each round: a variant that runs right after another can
            # inherit kernel state from it (the cgroup v1 RCU-sync window of a recent move
            # makes the next move cheap), so no variant may always follow the same one.
            k = i % len(variants)
            for v in variants[k:] + variants[:k]:
                times[v].append(RUNNERS[v](env) * 1000)
            if not args.json:
                print(f"\rround {i + 1}/{args.rounds}", end="", file=sys.stderr, flush=True)
        if not args.json:
            print(file=sys.stderr)
        results = {v: summary(times[v]) for v in variants}
        for v in variants:
            for peer in ("crun", "runc"):
                if peer in results:
                    results[v][f"vs_{peer}"] = (results[v]["median_ms"]
                                                / results[peer]["median_ms"])
        steps = {s: summary(env.api_steps[s]) for s in API_STEPS if s in env.api_steps}
    except BenchError as e:
        print(f"lifecycle: a round failed: {e}", file=sys.stderr)
        return 1
    finally:
        problems = cleanup(tmp)
        if problems:
            print("lifecycle: cleanup found leftovers (removed):", *problems, sep="\n  ",
                  file=sys.stderr)

    machine = {
        "cpus": os.cpu_count() or 0,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "crun": tool_version([crun, "--version"]),
        "runc": tool_version([runc, "--version"]),
        "cgroup2_unified_hidden": unified_hidden,
        "loadavg_1min_before": load_before,
        "loadavg_1min_after": os.getloadavg()[0],
        "cli": " ".join(cli),
    }
    if args.json:
        print(json.dumps({"rounds": args.rounds, "command": COMMAND, "machine": machine,
                          "results": results, "api_breakdown": steps,
                          "cleanup_problems": problems}, indent=2))
    else:
        print(f"{machine['cpus']} cpus, kernel {machine['kernel']}, python "
              f"{machine['python']}, {machine['crun']}, {machine['runc']}; load "
              f"{load_before:.2f} before, {machine['loadavg_1min_after']:.2f} after")
        print(f"cli: {machine['cli']}")
        print(table(results, args.rounds))
        if steps:
            print("\n(a) breakdown, ms:")
            print(f"{'step':<16} {'median':>8} {'min':>8} {'p90':>8}")
            for name, st in steps.items():
                print(f"{name:<16} {st['median_ms']:>8.2f} {st['min_ms']:>8.2f} "
                      f"{st['p90_ms']:>8.2f}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
