"""cgroups behind one small interface: v1 (per-controller hierarchies) or v2 (unified).

The backend is chosen once, from ``/proc/self/mountinfo`` (see :func:`choose`): v2 when
``/sys/fs/cgroup`` itself is a cgroup2 mount, v1 when the per-controller hierarchies are
mounted (a "hybrid" host with a cgroup2 mount at ``/sys/fs/cgroup/unified`` is v1: its
controllers live in the v1 hierarchies). Callers only see :class:`CgroupManager` and
:class:`Cgroup`. A container's cgroup is ``<PYHCS_CGROUP_PARENT or 'pyhcs'>/<container id>``
in every hierarchy pyhcs uses.

Every limit of :class:`Resources` has its Linux effect in both backends:

=====================  ===============================  ==================================
Resources field        cgroup v1                        cgroup v2
=====================  ===============================  ==================================
memory_bytes           memory.limit_in_bytes (+memsw)   memory.max (+ memory.swap.max 0)
cpu_shares             cpu.shares                       cpu.weight (runc's conversion)
cpu_quota_us/period    cpu.cfs_quota_us/cfs_period_us   cpu.max
cpuset_cpus            cpuset.cpus (mems from parent)   cpuset.cpus
pids_max               pids.max                         pids.max
io_limits              blkio.throttle.*_device          io.max
=====================  ===============================  ==================================

A limit whose controller is not available (not mounted in v1; not enabled for pyhcs's
parent in v2, e.g. because a v1 hierarchy holds it) raises :class:`NotSupportedError` naming
the controller: a limit is never silently dropped. Statistics simply omit what an
unavailable controller would have measured (:attr:`CgroupStats.measured` says what was).
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import stat
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, NamedTuple, Protocol

from .._errors import InvalidConfigError, NotSupportedError
from .._schema._stats import MemoryStats, ProcessorStats, StorageStats

__all__ = [
    "BlockDevice",
    "Cgroup",
    "CgroupManager",
    "CgroupStats",
    "IOLimit",
    "Resources",
    "V1Manager",
    "V2Manager",
    "block_device",
    "choose",
    "manager",
    "remove_parent",
    "shares_to_weight",
]

# The operation pyhcs's errors name: cgroups are made when a container starts.
_OP = "Start"


class BlockDevice(NamedTuple):
    """A block device by number, as cgroup throttles name it (``major:minor``)."""

    major: int
    minor: int

    def __str__(self) -> str:
        return f"{self.major}:{self.minor}"


@dataclass(frozen=True, slots=True)
class IOLimit:
    """Throttles of I/O to one block device, per direction; ``None`` leaves it unlimited.

    Linux throttles reads and writes separately, so a total limit is given to each. An
    IOLimit with no rate at all only makes the device's I/O counted: on cgroup v1 since
    Linux 6.10, a device's I/O is counted in ``blkio.throttle.*`` only once a throttle
    was configured on it, so the "no limit" value is written for it.
    """

    device: BlockDevice
    read_bps: int | None = None
    write_bps: int | None = None
    read_iops: int | None = None
    write_iops: int | None = None


@dataclass(frozen=True, slots=True)
class Resources:
    """The limits one container's cgroup enforces (``None`` or empty means unlimited)."""

    memory_bytes: int | None = None
    cpu_shares: int | None = None  # v1 cpu.shares (2..262144); v2 weight is derived
    cpu_quota_us: int | None = None  # per cpu_period_us
    cpu_period_us: int = 100_000
    cpuset_cpus: str | None = None
    pids_max: int | None = None
    io_limits: tuple[IOLimit, ...] = ()

    def counting_io_of(self, device: BlockDevice) -> Resources:
        """These resources, with the I/O to *device* counted in the statistics (see
        :class:`IOLimit`); the same resources if *device* already has an IOLimit."""
        if any(lim.device == device for lim in self.io_limits):
            return self
        return replace(self, io_limits=(*self.io_limits, IOLimit(device)))

    @classmethod
    def from_oci(cls, resources: Mapping[str, Any]) -> Resources:
        """The limits of an OCI ``linux.resources`` object (memory, cpu, pids, blockIO)."""
        mem = resources.get("memory") or {}
        cpu = resources.get("cpu") or {}
        blk = resources.get("blockIO") or {}
        per_device: dict[BlockDevice, dict[str, int]] = {}
        for key, attr in (("throttleReadBpsDevice", "read_bps"),
                          ("throttleWriteBpsDevice", "write_bps"),
                          ("throttleReadIOPSDevice", "read_iops"),
                          ("throttleWriteIOPSDevice", "write_iops")):
            for entry in blk.get(key) or ():
                dev = BlockDevice(int(entry["major"]), int(entry["minor"]))
                per_device.setdefault(dev, {})[attr] = int(entry["rate"])
        return cls(
            memory_bytes=mem.get("limit"),
            cpu_shares=cpu.get("shares"),
            cpu_quota_us=cpu.get("quota"),
            cpu_period_us=cpu.get("period") or 100_000,
            cpuset_cpus=cpu.get("cpus"),
            pids_max=(resources.get("pids") or {}).get("limit"),
            io_limits=tuple(IOLimit(dev, **rates) for dev, rates in per_device.items()),
        )

    def controllers(self) -> dict[str, str]:
        """The v2 controller each set limit needs, mapped to a name for error messages."""
        need: dict[str, str] = {}
        if self.memory_bytes is not None:
            need["memory"] = "the memory limit"
        if self.cpu_shares is not None:
            need["cpu"] = "the processor weight"
        if self.cpu_quota_us is not None:
            need["cpu"] = "the processor maximum"
        if self.cpuset_cpus:
            need["cpuset"] = "the processor count"
        if self.pids_max is not None:
            need["pids"] = "the process limit"
        if any(_rates(lim) for lim in self.io_limits):
            need["io"] = "the storage IOPS/bandwidth limit"
        return need


def _rates(lim: IOLimit) -> list[tuple[str, int | None]]:
    """The (v2 io.max key, rate) of *lim*; empty when it sets no rate."""
    rates = [("rbps", lim.read_bps), ("wbps", lim.write_bps),
             ("riops", lim.read_iops), ("wiops", lim.write_iops)]
    return rates if any(v is not None for _, v in rates) else []


@dataclass(frozen=True, slots=True)
class CgroupStats:
    """Counters of one cgroup: bytes, nanoseconds, operation and process counts.

    ``measured`` names what was read (``"memory"``, ``"cpu"``, ``"io"``, ``"pids"``); the
    fields of the others are 0 because their controller is unavailable, not because the
    workload is idle. Memory follows the kubelet's conventions: usage is the cgroup's
    charge, the private working set is usage minus inactive file pages.
    """

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
    pids_current: int = 0
    measured: frozenset[str] = field(default_factory=frozenset)

    def memory_stats(self) -> MemoryStats:
        """The memory figures as hcsshim's MemoryStats document."""
        return MemoryStats(usage_commit_bytes=self.memory_usage,
                           usage_commit_peak_bytes=self.memory_max_usage,
                           usage_private_working_set_bytes=self.memory_private_working_set)

    def processor_stats(self) -> ProcessorStats:
        """The CPU times as hcsshim's ProcessorStats document (100 ns units)."""
        return ProcessorStats(total_runtime_100ns=self.cpu_total_ns // 100,
                              runtime_user_100ns=self.cpu_user_ns // 100,
                              runtime_kernel_100ns=self.cpu_kernel_ns // 100)

    def storage_stats(self) -> StorageStats:
        """The block I/O figures as hcsshim's StorageStats document."""
        return StorageStats(read_count_normalized=self.io_read_ops,
                            read_size_bytes=self.io_read_bytes,
                            write_count_normalized=self.io_write_ops,
                            write_size_bytes=self.io_write_bytes)


class Cgroup(Protocol):
    """One container's cgroup, in whichever backend was chosen."""

    name: str

    def procs_files(self) -> list[str]:
        """The files a pid is written to, to join this cgroup (one per hierarchy)."""

    def join_files(self) -> list[str]:
        """The files a single-threaded process writes ``0`` to, to move itself in.

        cgroup v1's ``tasks`` moves only the writer, and the kernel then skips the global
        threadgroup lock whose first writer waits out an RCU grace period (5-30 ms);
        ``cgroup.procs`` always takes it. cgroup v2 has no ``tasks``: ``cgroup.procs``.
        """

    def pids(self) -> list[int]:
        """The pids in the cgroup now."""

    def kill_all(self, sig: int = signal.SIGKILL) -> None:
        """Signal every process in the cgroup; SIGKILL returns once it is empty (frozen
        first, so a fork cannot escape)."""

    def freeze(self) -> None:
        """Stop every process in the cgroup; returns once they are frozen."""

    def thaw(self) -> None:
        """Let a frozen cgroup's processes run again."""

    def oom_killed(self) -> bool:
        """True if the kernel's OOM killer killed a process of this cgroup."""

    def stats(self) -> CgroupStats:
        """The cgroup's counters now."""

    def remove(self) -> None:
        """Remove the cgroup; idempotent. The shared parent stays (see :func:`remove_parent`)."""


class CgroupManager(Protocol):
    """Makes and finds containers' cgroups in one backend."""

    version: int

    def available(self) -> frozenset[str]:
        """The v2 names of the controllers whose limits this backend can enforce."""

    def create(self, name: str, resources: Resources) -> Cgroup:
        """Make the cgroup *name* with *resources* applied (NotSupportedError if a limit's
        controller is unavailable, InvalidConfigError if the kernel rejects a value)."""

    def open(self, name: str) -> Cgroup:
        """The cgroup *name*, which need not exist (its calls then see no processes)."""

    def parent_dirs(self) -> list[str]:
        """The shared parent cgroup of every hierarchy (kept between containers: making
        and removing it costs every container start a few milliseconds)."""


def shares_to_weight(shares: int) -> int:
    """cgroup v1 cpu.shares (2..262144) as a v2 cpu.weight (1..10000), as runc and crun map it."""
    shares = max(2, min(262144, shares))
    return 1 + ((shares - 2) * 9999) // 262142


def _parent() -> str:
    return os.environ.get("PYHCS_CGROUP_PARENT") or "pyhcs"


def _write(path: str, value: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.write(fd, value.encode())
    finally:
        os.close(fd)


def _write_limit(path: str, value: str, what: str) -> None:
    try:
        _write(path, value)
    except OSError as e:
        if e.errno in (errno.EINVAL, errno.ERANGE, errno.ENODEV, errno.EOVERFLOW):
            raise InvalidConfigError(
                _OP, message=f"{what}: the kernel refused {value!r} for "
                             f"{os.path.basename(path)} ({e.strerror})") from e
        raise


def _read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return ""


def _read_int(path: str) -> int:
    text = _read(path).strip()
    return int(text) if text.isdigit() else 0


def _read_kv(path: str) -> dict[str, int]:
    out: dict[str, int] = {}
    for line in _read(path).splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[1].lstrip("-").isdigit():
            out[parts[0]] = int(parts[1])
    return out


def _read_pids(path: str) -> list[int]:
    return [int(x) for x in _read(path).split()]


def _rmdir(path: str, timeout: float = 10.0) -> None:
    """Remove the cgroup folder *path*, killing what is still in it.

    A cgroup whose last task just exited can report EBUSY for a moment. A task can also
    still be in it after a kill that saw the cgroup empty: in v1 a process joins the
    hierarchies one after another, and the kill looks at one of them. The folder is a
    container's, so what is left in it is the container's and is killed.
    """
    deadline = time.monotonic() + timeout
    while True:
        try:
            os.rmdir(path)
            return
        except FileNotFoundError:
            return
        except OSError as e:
            if e.errno != errno.EBUSY or time.monotonic() > deadline:
                raise
        for pid in _read_pids(os.path.join(path, "cgroup.procs")):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.01)


def _signal_each(cg: Cgroup, sig: int) -> None:
    for pid in cg.pids():
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def _kill_all(cg: V1Cgroup | V2Cgroup) -> None:
    # Freeze so no process forks between the listing and the kill, signal every one
    # once, thaw, then repeat until empty. The kill must not wait while frozen: a task
    # in the v1 freezer does not act on SIGKILL until it is thawed.
    cg.freeze()
    try:
        _signal_each(cg, signal.SIGKILL)
    finally:
        cg.thaw()
    deadline = time.monotonic() + 10
    while cg.pids() and time.monotonic() < deadline:
        _signal_each(cg, signal.SIGKILL)
        time.sleep(0.002)


def _unavailable(version: int, ctrl: str, what: str, where: str) -> NotSupportedError:
    why = ("it is not mounted" if version == 1 else
           "it is not enabled for pyhcs's cgroups (on a hybrid host a cgroup v1 hierarchy "
           "holds it)")
    return NotSupportedError(
        _OP, message=f"{what} needs the cgroup v{version} {ctrl!r} controller, which is not "
                     f"available at {where}: {why}")


# -- v1 -------------------------------------------------------------------------------------

_V1_CONTROLLERS = ("memory", "cpu", "cpuacct", "cpuset", "pids", "freezer", "blkio")
# v2 controller name -> the v1 hierarchy that enforces it
_V1_NAME = {"memory": "memory", "cpu": "cpu", "cpuset": "cpuset", "pids": "pids", "io": "blkio"}


class V1Cgroup:
    """A container's cgroup in the v1 hierarchies (one directory per controller)."""

    def __init__(self, name: str, dirs: dict[str, str]) -> None:
        self.name = name
        self.dirs = dirs

    def procs_files(self) -> list[str]:
        return [os.path.join(d, "cgroup.procs") for d in self.dirs.values()]

    def join_files(self) -> list[str]:
        return [os.path.join(d, "tasks") for d in self.dirs.values()]

    def pids(self) -> list[int]:
        d = self.dirs.get("pids") or self.dirs.get("memory") or next(iter(self.dirs.values()))
        return _read_pids(os.path.join(d, "cgroup.procs"))

    def kill_all(self, sig: int = signal.SIGKILL) -> None:
        if not self.pids():
            return  # the common case at exit: nothing to freeze, nothing to kill
        if sig == signal.SIGKILL:
            _kill_all(self)
        else:
            _signal_each(self, sig)

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
        measured: set[str] = set()
        f: dict[str, int] = {}
        mem = self.dirs.get("memory")
        if mem is not None:
            measured.add("memory")
            ms = _read_kv(os.path.join(mem, "memory.stat"))
            usage = _read_int(os.path.join(mem, "memory.usage_in_bytes"))
            f["memory_usage"] = usage
            f["memory_max_usage"] = _read_int(os.path.join(mem, "memory.max_usage_in_bytes"))
            f["memory_private_working_set"] = max(0, usage - ms.get("total_inactive_file", 0))
        acct = self.dirs.get("cpuacct")
        if acct is not None:
            measured.add("cpu")
            f["cpu_total_ns"] = _read_int(os.path.join(acct, "cpuacct.usage"))
            user = os.path.join(acct, "cpuacct.usage_user")
            if os.path.exists(user):  # nanoseconds since 4.7; cpuacct.stat counts ticks
                f["cpu_user_ns"] = _read_int(user)
                f["cpu_kernel_ns"] = _read_int(os.path.join(acct, "cpuacct.usage_sys"))
            else:
                ticks = _read_kv(os.path.join(acct, "cpuacct.stat"))
                tick_ns = 1_000_000_000 // os.sysconf("SC_CLK_TCK")
                f["cpu_user_ns"] = ticks.get("user", 0) * tick_ns
                f["cpu_kernel_ns"] = ticks.get("system", 0) * tick_ns
        blk = self.dirs.get("blkio")
        if blk is not None:
            measured.add("io")
            for stat, r, w in (("io_service_bytes_recursive", "io_read_bytes", "io_write_bytes"),
                               ("io_serviced_recursive", "io_read_ops", "io_write_ops")):
                for line in _read(os.path.join(blk, "blkio.throttle." + stat)).splitlines():
                    p = line.split()
                    if len(p) == 3 and p[1] in ("Read", "Write") and p[2].isdigit():
                        key = r if p[1] == "Read" else w
                        f[key] = f.get(key, 0) + int(p[2])
        pids = self.dirs.get("pids")
        if pids is not None:
            measured.add("pids")
            f["pids_current"] = _read_int(os.path.join(pids, "pids.current"))
        return CgroupStats(**f, measured=frozenset(measured))

    def remove(self) -> None:
        for d in self.dirs.values():
            _rmdir(d)


class V1Manager:
    """cgroup v1: one hierarchy per controller, *mounts* maps controller -> mount point."""

    version = 1

    def __init__(self, mounts: dict[str, str]) -> None:
        self.mounts = mounts

    def available(self) -> frozenset[str]:
        return frozenset(c for c, v1 in _V1_NAME.items() if v1 in self.mounts)

    def _dirs(self, name: str) -> dict[str, str]:
        return {c: os.path.join(m, _parent(), name) for c, m in self.mounts.items()}

    def create(self, name: str, resources: Resources) -> V1Cgroup:
        for ctrl, what in resources.controllers().items():
            if _V1_NAME[ctrl] not in self.mounts:
                raise _unavailable(1, _V1_NAME[ctrl], what, "/sys/fs/cgroup")
        dirs = self._dirs(name)
        made: list[str] = []
        try:
            for ctrl, d in dirs.items():
                if ctrl == "cpuset":
                    self._cpuset_parent(os.path.dirname(d))
                os.makedirs(d)
                made.append(d)
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

    def _cpuset_parent(self, parent: str) -> None:
        # A fresh v1 cpuset cgroup has no cpus and no mems, and a cgroup without them
        # cannot take tasks: give pyhcs's parent the root's (once, it is kept).
        cpus = os.path.join(parent, "cpuset.cpus")
        if os.path.isdir(parent) and _read(cpus).strip():
            return
        os.makedirs(parent, exist_ok=True)
        root = self.mounts["cpuset"]
        for f in ("cpuset.cpus", "cpuset.mems"):
            _write(os.path.join(parent, f), _read(os.path.join(root, f)).strip())

    @staticmethod
    def _apply(cg: V1Cgroup, r: Resources) -> None:
        cpuset = cg.dirs.get("cpuset")
        if cpuset:
            parent = os.path.dirname(cpuset)
            cpus = r.cpuset_cpus or _read(os.path.join(parent, "cpuset.cpus")).strip()
            _write_limit(os.path.join(cpuset, "cpuset.cpus"), cpus, "the processor count")
            _write(os.path.join(cpuset, "cpuset.mems"),
                   _read(os.path.join(parent, "cpuset.mems")).strip())
        mem = cg.dirs.get("memory")
        if mem and r.memory_bytes is not None:
            _write_limit(os.path.join(mem, "memory.limit_in_bytes"), str(r.memory_bytes),
                         "the memory limit")
            memsw = os.path.join(mem, "memory.memsw.limit_in_bytes")
            if os.path.exists(memsw):  # without it a limited container swaps instead of dying
                _write_limit(memsw, str(r.memory_bytes), "the memory limit")
        cpu = cg.dirs.get("cpu")
        if cpu and r.cpu_shares is not None:
            _write_limit(os.path.join(cpu, "cpu.shares"), str(r.cpu_shares),
                         "the processor weight")
        if cpu and r.cpu_quota_us is not None:
            _write_limit(os.path.join(cpu, "cpu.cfs_period_us"), str(r.cpu_period_us),
                         "the processor maximum")
            _write_limit(os.path.join(cpu, "cpu.cfs_quota_us"), str(r.cpu_quota_us),
                         "the processor maximum")
        pids = cg.dirs.get("pids")
        if pids and r.pids_max is not None:
            _write_limit(os.path.join(pids, "pids.max"), str(r.pids_max), "the process limit")
        blk = cg.dirs.get("blkio", "")
        for lim in r.io_limits if blk else ():
            what = f"the storage limit on {lim.device}"
            if not _rates(lim):  # 0 is "no limit"; it makes the kernel count the device's I/O
                _write_limit(os.path.join(blk, "blkio.throttle.read_bps_device"),
                             f"{lim.device} 0", what)
            for f, rate in (("read_bps_device", lim.read_bps),
                            ("write_bps_device", lim.write_bps),
                            ("read_iops_device", lim.read_iops),
                            ("write_iops_device", lim.write_iops)):
                if rate is not None:
                    _write_limit(os.path.join(blk, "blkio.throttle." + f),
                                 f"{lim.device} {rate}", what)

    def open(self, name: str) -> V1Cgroup:
        return V1Cgroup(name, self._dirs(name))

    def parent_dirs(self) -> list[str]:
        return [os.path.join(m, _parent()) for m in self.mounts.values()]


# -- v2 -------------------------------------------------------------------------------------

_V2_WANTED = ("cpu", "cpuset", "memory", "io", "pids")


class V2Cgroup:
    """A container's cgroup in the unified hierarchy.

    *controllers* are those enabled for it; counters of the others are not read.
    """

    def __init__(self, name: str, path: str, controllers: frozenset[str] | None = None) -> None:
        self.name = name
        self.path = path
        if controllers is None:
            controllers = frozenset(_read(os.path.join(path, "cgroup.controllers")).split())
        self.controllers = controllers

    def procs_files(self) -> list[str]:
        return [os.path.join(self.path, "cgroup.procs")]

    def join_files(self) -> list[str]:
        return self.procs_files()

    def pids(self) -> list[int]:
        return _read_pids(os.path.join(self.path, "cgroup.procs"))

    def kill_all(self, sig: int = signal.SIGKILL) -> None:
        kill = os.path.join(self.path, "cgroup.kill")
        if sig == signal.SIGKILL and os.path.exists(kill):
            # the kernel kills every task, forks in flight included (5.14+)
            _write(kill, "1")
            deadline = time.monotonic() + 10
            while self.pids() and time.monotonic() < deadline:
                time.sleep(0.002)
            return
        if sig != signal.SIGKILL:
            _signal_each(self, sig)
        elif self.pids():
            _kill_all(self)

    def freeze(self) -> None:
        self._freeze(1)

    def thaw(self) -> None:
        self._freeze(0)

    def _freeze(self, v: int) -> None:
        _write(os.path.join(self.path, "cgroup.freeze"), str(v))
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            if _read_kv(os.path.join(self.path, "cgroup.events")).get("frozen") == v:
                return
            time.sleep(0.001)

    def oom_killed(self) -> bool:
        return _read_kv(os.path.join(self.path, "memory.events")).get("oom_kill", 0) > 0

    def stats(self) -> CgroupStats:
        measured = {"cpu"}  # cpu.stat's usage is core: there even without the cpu controller
        f: dict[str, int] = {}
        cpu = _read_kv(os.path.join(self.path, "cpu.stat"))
        f["cpu_total_ns"] = cpu.get("usage_usec", 0) * 1000
        f["cpu_user_ns"] = cpu.get("user_usec", 0) * 1000
        f["cpu_kernel_ns"] = cpu.get("system_usec", 0) * 1000
        if "memory" in self.controllers:
            measured.add("memory")
            ms = _read_kv(os.path.join(self.path, "memory.stat"))
            usage = _read_int(os.path.join(self.path, "memory.current"))
            f["memory_usage"] = usage
            peak = os.path.join(self.path, "memory.peak")  # 5.19+
            f["memory_max_usage"] = _read_int(peak) if os.path.exists(peak) else usage
            f["memory_private_working_set"] = max(0, usage - ms.get("inactive_file", 0))
        if "io" in self.controllers:
            measured.add("io")
            for line in _read(os.path.join(self.path, "io.stat")).splitlines():
                kv = dict(x.split("=", 1) for x in line.split()[1:] if "=" in x)
                for src, dst in (("rbytes", "io_read_bytes"), ("wbytes", "io_write_bytes"),
                                 ("rios", "io_read_ops"), ("wios", "io_write_ops")):
                    if kv.get(src, "").isdigit():
                        f[dst] = f.get(dst, 0) + int(kv[src])
        if "pids" in self.controllers:
            measured.add("pids")
            f["pids_current"] = _read_int(os.path.join(self.path, "pids.current"))
        return CgroupStats(**f, measured=frozenset(measured))

    def remove(self) -> None:
        _rmdir(self.path)


class V2Manager:
    """cgroup v2: one unified hierarchy mounted at *mount*.

    Controllers pyhcs uses are enabled from the mount's root down to pyhcs's parent as far
    as the kernel allows; those it cannot enable are unavailable (see the module's doc).
    """

    version = 2

    def __init__(self, mount: str) -> None:
        self.mount = mount
        self._available: frozenset[str] | None = None

    def _parent_dir(self) -> str:
        return os.path.join(self.mount, _parent())

    def available(self) -> frozenset[str]:
        parent = self._parent_dir()
        if self._available is None or not os.path.isdir(parent):
            self._available = self._make_parent(parent)
        return self._available

    def _make_parent(self, parent: str) -> frozenset[str]:
        cur = self.mount
        for part in [p for p in _parent().split("/") if p]:
            self._enable(cur)
            cur = os.path.join(cur, part)
            os.makedirs(cur, exist_ok=True)
        self._enable(cur)
        return frozenset(_read(os.path.join(parent, "cgroup.subtree_control")).split())

    @staticmethod
    def _enable(path: str) -> None:
        have = set(_read(os.path.join(path, "cgroup.controllers")).split())
        on = set(_read(os.path.join(path, "cgroup.subtree_control")).split())
        for c in _V2_WANTED:
            if c in have and c not in on:
                try:
                    # one at a time: a controller the kernel refuses (a cgroup with
                    # processes, a threaded subtree) must not keep the others off
                    _write(os.path.join(path, "cgroup.subtree_control"), "+" + c)
                except OSError:
                    pass

    def create(self, name: str, resources: Resources) -> V2Cgroup:
        avail = self.available()
        for ctrl, what in resources.controllers().items():
            if ctrl not in avail:
                raise _unavailable(2, ctrl, what, self._parent_dir())
        path = os.path.join(self._parent_dir(), name)
        os.mkdir(path)
        try:
            self._apply(path, resources)
        except BaseException:
            _rmdir(path)
            raise
        return V2Cgroup(name, path, avail)

    @staticmethod
    def _apply(path: str, r: Resources) -> None:
        def put(f: str, v: str, what: str) -> None:
            _write_limit(os.path.join(path, f), v, what)

        if r.memory_bytes is not None:
            put("memory.max", str(r.memory_bytes), "the memory limit")
            if os.path.exists(os.path.join(path, "memory.swap.max")):  # no swap accounting
                put("memory.swap.max", "0", "the memory limit")
        if r.cpu_shares is not None:
            put("cpu.weight", str(shares_to_weight(r.cpu_shares)), "the processor weight")
        if r.cpu_quota_us is not None:
            put("cpu.max", f"{r.cpu_quota_us} {r.cpu_period_us}", "the processor maximum")
        if r.cpuset_cpus:
            put("cpuset.cpus", r.cpuset_cpus, "the processor count")
        if r.pids_max is not None:
            put("pids.max", str(r.pids_max), "the process limit")
        for lim in r.io_limits:  # v2 counts every device's I/O (io.stat) without a limit
            rates = " ".join(f"{k}={'max' if v is None else v}" for k, v in _rates(lim))
            if rates:
                put("io.max", f"{lim.device} {rates}", f"the storage limit on {lim.device}")

    def open(self, name: str) -> V2Cgroup:
        return V2Cgroup(name, os.path.join(self._parent_dir(), name))

    def parent_dirs(self) -> list[str]:
        return [self._parent_dir()]


# -- choosing the backend -------------------------------------------------------------------


def _unescape(s: str) -> str:
    r"""mountinfo's octal escapes (``\040`` for a space) undone."""
    if "\\" not in s:
        return s
    out, i = bytearray(), 0
    raw = os.fsencode(s)
    while i < len(raw):
        digits = raw[i + 1:i + 4]
        if raw[i] == 0x5C and len(digits) == 3 and digits.isdigit():
            out.append(int(digits, 8) & 0xFF)
            i += 4
        else:
            out.append(raw[i])
            i += 1
    return os.fsdecode(bytes(out))


class _Mount(NamedTuple):
    dev: str  # major:minor of st_dev
    point: str
    fstype: str
    source: str
    super_opts: str


def _parse_mountinfo(lines: Iterable[str]) -> list[_Mount]:
    mounts = []
    for line in lines:
        left, sep, right = line.rstrip("\n").partition(" - ")
        fields, rfields = left.split(), right.split()
        if not sep or len(fields) < 5 or len(rfields) < 3:
            continue
        mounts.append(_Mount(fields[2], _unescape(fields[4]), rfields[0], _unescape(rfields[1]),
                             rfields[2]))
    return mounts


def choose(mountinfo: Iterable[str], root: str = "/sys/fs/cgroup") -> V1Manager | V2Manager:
    """The backend for a machine whose ``/proc/self/mountinfo`` has these *lines*.

    v2 if *root* is a cgroup2 mount (a pure v2 host); otherwise v1 if the v1 memory
    hierarchy is mounted (a v1 or hybrid host); otherwise v2 at any cgroup2 mount.
    """
    mounts = _parse_mountinfo(mountinfo)
    at_root = [m for m in mounts if m.point == root]
    if at_root and at_root[-1].fstype == "cgroup2":  # the last mount at a point is visible
        return V2Manager(root)
    v1: dict[str, str] = {}
    for m in mounts:
        if m.fstype == "cgroup":
            opts = set(m.super_opts.split(","))
            for c in _V1_CONTROLLERS:
                if c in opts and c not in v1:
                    v1[c] = m.point
    if "memory" in v1:
        return V1Manager(v1)
    for m in mounts:
        if m.fstype == "cgroup2":
            return V2Manager(m.point)
    raise NotSupportedError(_OP, message=f"no usable cgroup hierarchy is mounted at {root}")


_manager: V1Manager | V2Manager | None = None


def manager(root: str = "/sys/fs/cgroup") -> CgroupManager:
    """The cgroup backend of this machine, chosen on first use and kept (see :func:`choose`)."""
    global _manager
    if _manager is None:
        with open("/proc/self/mountinfo") as f:
            _manager = choose(f, root)
    return _manager


_namespace_mounts: list[tuple[str, str, str]] | None = None


def namespace_mounts(root: str = "/sys/fs/cgroup") -> list[tuple[str, str, str]]:
    """The cgroup file systems a container mounts at its own ``/sys/fs/cgroup``, as
    ``(name under it, fstype, mount data)``, copied from this machine's layout (read once
    and kept): a pure v2 host gives ``[("", "cgroup2", "")]``; a v1 or hybrid host one
    entry per hierarchy mounted directly under *root* (``("memory", "cgroup", "memory")``,
    ``("systemd", "cgroup", "name=systemd")``, ``("unified", "cgroup2", "")``...), and
    ``(name, "symlink", target)`` for the host's links between them (``cpu -> cpu,cpuacct``).
    Mounted from inside the container's cgroup namespace, each shows the container's own
    cgroup as its root."""
    global _namespace_mounts
    if _namespace_mounts is None:
        with open("/proc/self/mountinfo") as f:
            mounts = _parse_mountinfo(f)
        at_root = [m for m in mounts if m.point == root]
        if at_root and at_root[-1].fstype == "cgroup2":
            _namespace_mounts = [("", "cgroup2", "")]
        else:
            # The hierarchy's controllers and name; never its other options (a
            # release_agent is how CVE-2022-0492 escaped).
            with open("/proc/cgroups") as f:
                known = {line.split()[0] for line in f if line.strip() and line[0] != "#"}
            found: dict[str, tuple[str, str, str]] = {}
            for m in mounts:
                name = os.path.basename(m.point)
                if (os.path.dirname(m.point) != root or m.fstype not in ("cgroup", "cgroup2")
                        or "/" in name or name in ("", ".", "..")):
                    continue
                data = ",".join(o for o in m.super_opts.split(",")
                                if o in known or o.startswith("name="))
                found[name] = (name, m.fstype, data if m.fstype == "cgroup" else "")
            # cpu -> cpu,cpuacct and the like, where the host has them
            with contextlib.suppress(OSError), os.scandir(root) as it:
                for entry in it:
                    if entry.is_symlink() and entry.name not in found:
                        target = os.readlink(entry.path)
                        if target in found:
                            found[entry.name] = (entry.name, "symlink", target)
            _namespace_mounts = sorted(found.values())
    return _namespace_mounts


def remove_everywhere(name: str) -> None:
    """Remove the cgroup *name* under pyhcs's parent from every v1 hierarchy where it is
    left empty, also those pyhcs does not use but an OCI runtime makes it in (``devices``,
    ``name=systemd``); a busy or missing one is left alone."""
    for hierarchy, fstype, _ in namespace_mounts():
        if fstype == "cgroup":
            with contextlib.suppress(OSError):
                os.rmdir(os.path.join("/sys/fs/cgroup", hierarchy, _parent(), name))


def remove_parent() -> None:
    """Remove the shared parent cgroups if no container uses them (tests, uninstall): in
    every hierarchy, also those pyhcs does not use but an OCI executor (crun, runc) makes
    its cgroups in (``devices``, ``name=systemd``)."""
    dirs = list(manager().parent_dirs())
    for name, fstype, _ in namespace_mounts():
        if fstype == "cgroup":
            d = os.path.join("/sys/fs/cgroup", name, _parent())
            if d not in dirs:
                dirs.append(d)
    for d in dirs:
        try:
            os.rmdir(d)
        except FileNotFoundError:
            pass


# -- block devices --------------------------------------------------------------------------


def _sysfs_block(dev: BlockDevice) -> str | None:
    path = f"/sys/dev/block/{dev}"
    return path if os.path.exists(path) else None


def _whole_disk(dev: BlockDevice, sysdir: str) -> BlockDevice:
    # The kernel throttles whole disks only (a partition is refused with ENODEV); I/O to
    # a partition passes through its disk's queue, so the disk's throttle covers it.
    if not os.path.exists(os.path.join(sysdir, "partition")):
        return dev
    disk = os.path.dirname(os.path.realpath(sysdir))
    major, _, minor = _read(os.path.join(disk, "dev")).strip().partition(":")
    return BlockDevice(int(major), int(minor))


def block_device(path: str, *, mountinfo: str = "/proc/self/mountinfo") -> BlockDevice:
    """The block device that holds the file system of *path*, in the form throttles need.

    A partition resolves to its disk; loop and device-mapper devices are block devices
    themselves. A file system without a device number of its own (overlayfs, btrfs
    subvolumes) resolves through *mountinfo*: overlayfs to the device of its upper layer
    (where a container's writes go), others to their source device. A file system backed
    by no block device at all (tmpfs, network file systems) raises NotSupportedError.
    """
    try:
        st_dev = os.stat(path).st_dev
        with open(mountinfo) as f:
            mounts = _parse_mountinfo(f)
    except OSError as e:
        raise NotSupportedError(_OP, message=f"cannot find the block device of {path}: "
                                             f"{e.strerror}") from e
    seen: set[int] = set()
    where = path
    while st_dev not in seen:
        seen.add(st_dev)
        dev = BlockDevice(os.major(st_dev), os.minor(st_dev))
        sysdir = _sysfs_block(dev)
        if sysdir is not None:
            return _whole_disk(dev, sysdir)
        mount = next((m for m in reversed(mounts) if m.dev == str(dev)), None)
        if mount is None:
            break
        try:
            if mount.fstype == "overlay":
                opts = dict(o.split("=", 1) for o in mount.super_opts.split(",") if "=" in o)
                upper = _unescape(opts.get("upperdir", ""))
                if not upper.startswith("/"):
                    raise NotSupportedError(
                        _OP, message=f"{where} is on an overlay without an upper layer: no "
                                     "block device takes its writes")
                st_dev, where = os.stat(upper).st_dev, upper
            elif mount.source.startswith("/") and _is_blockdev(mount.source):
                st_dev, where = os.stat(mount.source).st_rdev, mount.source
            else:
                raise NotSupportedError(
                    _OP, message=f"{where} is on {mount.fstype} ({mount.source}), which no "
                                 "block device backs: its I/O cannot be throttled")
        except OSError as e:
            raise NotSupportedError(_OP, message=f"cannot find the block device of {where}: "
                                                 f"{e.strerror}") from e
    raise NotSupportedError(
        _OP, message=f"{path} is on device {os.major(st_dev)}:{os.minor(st_dev)}, which is not "
                     "a block device: its I/O cannot be throttled")


def _is_blockdev(path: str) -> bool:
    try:
        return stat.S_ISBLK(os.stat(path).st_mode)
    except OSError:
        return False
