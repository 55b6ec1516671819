"""cgroups behind one small interface: v1 (per-controller hierarchies) or v2 (unified).

The backend is chosen once, from what is mounted at ``/sys/fs/cgroup``; callers only see
:class:`Cgroup`. A container's cgroup is ``<PYHCS_CGROUP_PARENT or 'pyhcs'>/<container id>``
in every hierarchy pyhcs uses.
"""

from __future__ import annotations

import errno
import os
import signal
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol

__all__ = ["Cgroup", "CgroupManager", "Resources", "CgroupStats", "manager", "remove_parent",
           "V1Manager", "V2Manager"]

_CGROUP2_SUPER_MAGIC = 0x63677270


@dataclass(frozen=True, slots=True)
class Resources:
    """The limits one container's cgroup enforces (``None`` means unlimited)."""

    memory_bytes: int | None = None
    cpu_shares: int | None = None  # v1 cpu.shares (2..262144); v2 weight is derived
    cpu_quota_us: int | None = None  # per cpu_period_us
    cpu_period_us: int = 100_000
    cpuset_cpus: str | None = None
    pids_max: int | None = None


@dataclass(frozen=True, slots=True)
class CgroupStats:
    """Counters of one cgroup; times are in nanoseconds."""

    memory_usage: int = 0
    memory_max_usage: int = 0
    memory_private_working_set: int = 0
    cpu_total_ns: int = 0
    cpu_user_ns: int = 0
    cpu_kernel_ns: int = 0
    io_read_bytes: int = 0
    io_write_bytes: int = 0
    io_read_ops: int = 0
    io_write_ops: int = 0


class Cgroup(Protocol):
    """One container's cgroup, in whichever backend was chosen."""

    name: str

    def procs_files(self) -> list[str]:
        """The files a pid is written to, to join this cgroup (one per hierarchy)."""

    def pids(self) -> list[int]:
        """The pids in the cgroup now."""

    def kill_all(self, sig: int = signal.SIGKILL) -> None:
        """Signal every process in the cgroup until it is empty (frozen first: no fork races)."""

    def freeze(self) -> None: ...

    def thaw(self) -> None: ...

    def oom_killed(self) -> bool:
        """True if the kernel's OOM killer killed a process of this cgroup."""

    def stats(self) -> CgroupStats: ...

    def remove(self) -> None:
        """Remove the cgroup; idempotent. The shared parent stays (see :func:`remove_parent`)."""


class CgroupManager(Protocol):
    version: int

    def create(self, name: str, resources: Resources) -> Cgroup: ...

    def open(self, name: str) -> Cgroup: ...

    def parent_dirs(self) -> list[str]:
        """The shared parent cgroup of every hierarchy (kept between containers: making
        and removing it costs every container start a few milliseconds)."""


def _parent() -> str:
    return os.environ.get("PYHCS_CGROUP_PARENT") or "pyhcs"


def _write(path: str, value: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.write(fd, value.encode())
    finally:
        os.close(fd)


def _read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return ""


def _read_kv(path: str) -> dict[str, int]:
    out: dict[str, int] = {}
    for line in _read(path).splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[1].lstrip("-").isdigit():
            out[parts[0]] = int(parts[1])
    return out


def _read_pids(path: str) -> list[int]:
    return [int(x) for x in _read(path).split()]


def _rmdir(path: str) -> None:
    # A cgroup whose last task just exited can report EBUSY for a moment.
    for _ in range(100):
        try:
            os.rmdir(path)
            return
        except FileNotFoundError:
            return
        except OSError as e:
            if e.errno != errno.EBUSY:
                raise
            time.sleep(0.01)
    os.rmdir(path)


def _kill_until_empty(cg: Cgroup, sig: int) -> None:
    deadline = time.monotonic() + 10
    while True:
        pids = cg.pids()
        if not pids:
            return
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        if sig != signal.SIGKILL or time.monotonic() > deadline:
            return
        time.sleep(0.002)


# -- v1 -------------------------------------------------------------------------------------

_V1_CONTROLLERS = ("memory", "cpu", "cpuacct", "cpuset", "pids", "freezer", "blkio")


class V1Cgroup:
    def __init__(self, name: str, dirs: dict[str, str]) -> None:
        self.name = name
        self.dirs = dirs

    def procs_files(self) -> list[str]:
        return [os.path.join(d, "cgroup.procs") for d in self.dirs.values()]

    def pids(self) -> list[int]:
        d = self.dirs.get("pids") or self.dirs.get("memory") or next(iter(self.dirs.values()))
        return _read_pids(os.path.join(d, "cgroup.procs"))

    def kill_all(self, sig: int = signal.SIGKILL) -> None:
        if not self.pids():
            return  # the common case at exit: nothing to freeze, nothing to kill
        if sig == signal.SIGKILL:
            self.freeze()
        try:
            _kill_until_empty(self, sig)
        finally:
            if sig == signal.SIGKILL:
                self.thaw()
                _kill_until_empty(self, sig)

    def _freezer(self, state: str) -> None:
        d = self.dirs.get("freezer")
        if d is None:
            return
        _write(os.path.join(d, "freezer.state"), state)
        deadline = time.monotonic() + 5
        while _read(os.path.join(d, "freezer.state")).strip() not in (state, "") and (
            time.monotonic() < deadline
        ):
            time.sleep(0.001)

    def freeze(self) -> None:
        self._freezer("FROZEN")

    def thaw(self) -> None:
        self._freezer("THAWED")

    def oom_killed(self) -> bool:
        d = self.dirs.get("memory")
        if d is None:
            return False
        return _read_kv(os.path.join(d, "memory.oom_control")).get("oom_kill", 0) > 0

    def stats(self) -> CgroupStats:
        mem = self.dirs.get("memory", "")
        acct = self.dirs.get("cpuacct", "")
        blk = self.dirs.get("blkio", "")
        ms = _read_kv(os.path.join(mem, "memory.stat"))
        usage = int(_read(os.path.join(mem, "memory.usage_in_bytes")) or 0)
        peak = int(_read(os.path.join(mem, "memory.max_usage_in_bytes")) or 0)
        cpu = _read_kv(os.path.join(acct, "cpuacct.stat"))
        tick_ns = 1_000_000_000 // os.sysconf("SC_CLK_TCK")
        total = int(_read(os.path.join(acct, "cpuacct.usage")) or 0)
        rb = wb = ro = wo = 0
        for line in _read(os.path.join(blk, "blkio.throttle.io_service_bytes")).splitlines():
            p = line.split()
            if len(p) == 3:
                rb += int(p[2]) if p[1] == "Read" else 0
                wb += int(p[2]) if p[1] == "Write" else 0
        for line in _read(os.path.join(blk, "blkio.throttle.io_serviced")).splitlines():
            p = line.split()
            if len(p) == 3:
                ro += int(p[2]) if p[1] == "Read" else 0
                wo += int(p[2]) if p[1] == "Write" else 0
        return CgroupStats(
            memory_usage=usage,
            memory_max_usage=peak,
            memory_private_working_set=max(0, usage - ms.get("total_inactive_file", 0)),
            cpu_total_ns=total,
            cpu_user_ns=cpu.get("user", 0) * tick_ns,
            cpu_kernel_ns=cpu.get("system", 0) * tick_ns,
            io_read_bytes=rb,
            io_write_bytes=wb,
            io_read_ops=ro,
            io_write_ops=wo,
        )

    def remove(self) -> None:
        for d in self.dirs.values():
            _rmdir(d)


class V1Manager:
    version = 1

    def __init__(self, mounts: dict[str, str]) -> None:
        self.mounts = mounts

    def _dirs(self, name: str) -> dict[str, str]:
        return {c: os.path.join(m, _parent(), name) for c, m in self.mounts.items()}

    def create(self, name: str, resources: Resources) -> V1Cgroup:
        dirs = self._dirs(name)
        made: list[str] = []
        try:
            for ctrl, d in dirs.items():
                parent = os.path.dirname(d)
                if ctrl == "cpuset" and not os.path.isdir(parent):
                    os.makedirs(parent, exist_ok=True)
                    # a fresh cpuset cgroup has no cpus and no mems: copy the root's.
                    root = self.mounts["cpuset"]
                    for f in ("cpuset.cpus", "cpuset.mems"):
                        _write(os.path.join(parent, f), _read(os.path.join(root, f)).strip())
                os.makedirs(d)
                made.append(d)
                if ctrl == "cpuset":
                    cpus = resources.cpuset_cpus or _read(os.path.join(parent, "cpuset.cpus"))
                    _write(os.path.join(d, "cpuset.cpus"), cpus.strip())
                    _write(os.path.join(d, "cpuset.mems"),
                           _read(os.path.join(parent, "cpuset.mems")).strip())
            cg = V1Cgroup(name, dirs)
            self._apply(cg, resources)
            return cg
        except BaseException:
            for d in made:
                try:
                    _rmdir(d)
                except OSError:
                    pass
            raise

    @staticmethod
    def _apply(cg: V1Cgroup, r: Resources) -> None:
        mem = cg.dirs.get("memory")
        if mem and r.memory_bytes is not None:
            _write(os.path.join(mem, "memory.limit_in_bytes"), str(r.memory_bytes))
            memsw = os.path.join(mem, "memory.memsw.limit_in_bytes")
            if os.path.exists(memsw):  # without it a limited container swaps instead of dying
                _write(memsw, str(r.memory_bytes))
        cpu = cg.dirs.get("cpu")
        if cpu and r.cpu_shares is not None:
            _write(os.path.join(cpu, "cpu.shares"), str(r.cpu_shares))
        if cpu and r.cpu_quota_us is not None:
            _write(os.path.join(cpu, "cpu.cfs_period_us"), str(r.cpu_period_us))
            _write(os.path.join(cpu, "cpu.cfs_quota_us"), str(r.cpu_quota_us))
        pids = cg.dirs.get("pids")
        if pids and r.pids_max is not None:
            _write(os.path.join(pids, "pids.max"), str(r.pids_max))

    def open(self, name: str) -> V1Cgroup:
        return V1Cgroup(name, self._dirs(name))

    def parent_dirs(self) -> list[str]:
        return [os.path.join(m, _parent()) for m in self.mounts.values()]


# -- v2 -------------------------------------------------------------------------------------


class V2Cgroup:
    def __init__(self, name: str, path: str) -> None:
        self.name = name
        self.path = path

    def procs_files(self) -> list[str]:
        return [os.path.join(self.path, "cgroup.procs")]

    def pids(self) -> list[int]:
        return _read_pids(os.path.join(self.path, "cgroup.procs"))

    def kill_all(self, sig: int = signal.SIGKILL) -> None:
        kill = os.path.join(self.path, "cgroup.kill")
        if sig == signal.SIGKILL and os.path.exists(kill):
            _write(kill, "1")
            deadline = time.monotonic() + 10
            while self.pids() and time.monotonic() < deadline:
                time.sleep(0.002)
            return
        _kill_until_empty(self, sig)

    def freeze(self) -> None:
        self._freeze("1")

    def thaw(self) -> None:
        self._freeze("0")

    def _freeze(self, v: str) -> None:
        _write(os.path.join(self.path, "cgroup.freeze"), v)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            if _read_kv(os.path.join(self.path, "cgroup.events")).get("frozen") == int(v):
                return
            time.sleep(0.001)

    def oom_killed(self) -> bool:
        return _read_kv(os.path.join(self.path, "memory.events")).get("oom_kill", 0) > 0

    def stats(self) -> CgroupStats:
        ms = _read_kv(os.path.join(self.path, "memory.stat"))
        usage = int(_read(os.path.join(self.path, "memory.current")) or 0)
        peak = int(_read(os.path.join(self.path, "memory.peak")) or usage)
        cpu = _read_kv(os.path.join(self.path, "cpu.stat"))
        rb = wb = ro = wo = 0
        for line in _read(os.path.join(self.path, "io.stat")).splitlines():
            kv = dict(f.split("=", 1) for f in line.split()[1:] if "=" in f)
            rb += int(kv.get("rbytes", 0))
            wb += int(kv.get("wbytes", 0))
            ro += int(kv.get("rios", 0))
            wo += int(kv.get("wios", 0))
        return CgroupStats(
            memory_usage=usage,
            memory_max_usage=peak,
            memory_private_working_set=max(0, usage - ms.get("inactive_file", 0)),
            cpu_total_ns=cpu.get("usage_usec", 0) * 1000,
            cpu_user_ns=cpu.get("user_usec", 0) * 1000,
            cpu_kernel_ns=cpu.get("system_usec", 0) * 1000,
            io_read_bytes=rb,
            io_write_bytes=wb,
            io_read_ops=ro,
            io_write_ops=wo,
        )

    def remove(self) -> None:
        _rmdir(self.path)


class V2Manager:
    version = 2

    def __init__(self, mount: str) -> None:
        self.mount = mount

    def create(self, name: str, resources: Resources) -> V2Cgroup:
        parent = os.path.join(self.mount, _parent())
        if not os.path.isdir(parent):
            os.makedirs(parent, exist_ok=True)
            avail = _read(os.path.join(self.mount, "cgroup.subtree_control")).split()
            want = [c for c in ("cpu", "cpuset", "memory", "io", "pids") if c in avail]
            if want:
                _write(os.path.join(parent, "cgroup.subtree_control"),
                       " ".join("+" + c for c in want))
        path = os.path.join(parent, name)
        os.mkdir(path)
        try:
            self._apply(path, resources)
        except BaseException:
            _rmdir(path)
            raise
        return V2Cgroup(name, path)

    @staticmethod
    def _apply(path: str, r: Resources) -> None:
        def put(f: str, v: str) -> None:
            p = os.path.join(path, f)
            if os.path.exists(p):
                _write(p, v)

        if r.memory_bytes is not None:
            put("memory.max", str(r.memory_bytes))
            put("memory.swap.max", "0")
        if r.cpu_shares is not None:
            # the conversion runc and crun use from shares (2..262144) to weight (1..10000)
            put("cpu.weight", str(1 + ((r.cpu_shares - 2) * 9999) // 262142))
        if r.cpu_quota_us is not None:
            put("cpu.max", f"{r.cpu_quota_us} {r.cpu_period_us}")
        if r.cpuset_cpus:
            put("cpuset.cpus", r.cpuset_cpus)
        if r.pids_max is not None:
            put("pids.max", str(r.pids_max))

    def open(self, name: str) -> V2Cgroup:
        return V2Cgroup(name, os.path.join(self.mount, _parent(), name))

    def parent_dirs(self) -> list[str]:
        return [os.path.join(self.mount, _parent())]


def _v1_mounts(lines: Iterable[str]) -> dict[str, str]:
    mounts: dict[str, str] = {}
    for line in lines:
        left, _, right = line.partition(" - ")
        fields = left.split()
        rfields = right.split()
        if len(rfields) >= 3 and rfields[0] == "cgroup":
            opts = set(rfields[2].split(","))
            for c in _V1_CONTROLLERS:
                if c in opts and c not in mounts:
                    mounts[c] = fields[4]
    return mounts


_manager: CgroupManager | None = None


def manager(root: str = "/sys/fs/cgroup") -> CgroupManager:
    """The cgroup backend of this machine, chosen on first use and kept."""
    global _manager
    if _manager is None:
        if _fs_magic(root) == _CGROUP2_SUPER_MAGIC:
            _manager = V2Manager(root)
        else:
            with open("/proc/self/mountinfo") as f:
                mounts = _v1_mounts(f)
            if "memory" not in mounts:
                raise OSError(errno.ENOTSUP, "no usable cgroup hierarchy", root)
            _manager = V1Manager(mounts)
    return _manager


def _fs_magic(path: str) -> int:
    import ctypes

    class _StatFS(ctypes.Structure):
        _fields_ = [("f_type", ctypes.c_long), ("_rest", ctypes.c_byte * 120)]

    buf = _StatFS()
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.statfs(os.fsencode(path), ctypes.byref(buf)) != 0:
        return 0
    return int(buf.f_type) & 0xFFFFFFFF


def remove_parent() -> None:
    """Remove the shared parent cgroups if no container uses them (tests, uninstall)."""
    for d in manager().parent_dirs():
        try:
            os.rmdir(d)
        except FileNotFoundError:
            pass
