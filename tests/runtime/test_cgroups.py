"""The cgroup layer on the real kernel: every limit's effect, the counters, v1 and v2.

Workloads are Python children that wait for a line on stdin, so they are moved into the
cgroup before they do anything. Rates are measured by the workload itself and asserted
within generous bands around the limit: a behaviour, not a timing.
"""

from __future__ import annotations

import os
import signal
import struct
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from pyhcs import InvalidConfigError, NotSupportedError
from pyhcs._runtime import _cgroups as C
from pyhcs._runtime._spec import _resources
from pyhcs._schema import ContainerConfig

MiB = 1024 * 1024
UNIFIED = "/sys/fs/cgroup/unified"


def _is_cgroup2(path: str) -> bool:
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == path and " - cgroup2 " in line for line in f)


HOST = C.manager()
Make = Callable[..., C.Cgroup]
needs_v1 = pytest.mark.skipif(HOST.version != 1, reason="this host's backend is cgroup v2")


# -- helpers --------------------------------------------------------------------------------


class Workload:
    """A Python child running *code* once released; it is in the cgroup before it starts."""

    def __init__(self, cg: C.Cgroup, code: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", "import sys\nsys.stdin.readline()\n" + code],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        for f in cg.procs_files():
            Path(f).write_text(str(self.proc.pid))

    def go(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write("go\n")
        self.proc.stdin.flush()

    def result(self) -> str:
        out, _ = self.proc.communicate(timeout=60)
        assert self.proc.returncode == 0
        return out

    def line(self) -> str:
        assert self.proc.stdout is not None
        return self.proc.stdout.readline().strip()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.communicate()


@pytest.fixture
def cgroup_name() -> str:
    return "cgtest-" + uuid.uuid4().hex[:12]


@pytest.fixture
def make(cgroup_name: str) -> Iterator[Make]:
    """make(resources, mgr=HOST) -> a fresh cgroup, killed and removed after the test."""
    made: list[C.Cgroup] = []

    def _make(resources: C.Resources | None = None,
              mgr: C.CgroupManager = HOST) -> C.Cgroup:
        cg = mgr.create(cgroup_name + str(len(made)), resources or C.Resources())
        made.append(cg)
        return cg

    yield _make
    for cg in made:
        cg.kill_all()  # frozen or not
        cg.remove()


def _run(*argv: str) -> str:
    return subprocess.run(argv, check=True, capture_output=True, text=True).stdout.strip()


@pytest.fixture
def loop_fs(tmp_path: Path) -> Iterator[Path]:
    """A mounted ext4 file system on a fresh loop device."""
    image, mnt = tmp_path / "disk.img", tmp_path / "mnt"
    mnt.mkdir()
    with open(image, "wb") as f:
        f.truncate(96 * MiB)
    _run("mkfs.ext4", "-q", "-F", str(image))
    dev = _run("losetup", "--find", "--show", str(image))
    try:
        _run("mount", "-t", "ext4", dev, str(mnt))
        try:
            yield mnt
        finally:
            _run("umount", str(mnt))
    finally:
        _run("losetup", "-d", dev)


# A direct-I/O loop: page-aligned buffer (mmap), aligned offsets, no page cache.
_DIRECT_IO = """
import mmap, os, time
def direct(path, chunk, count, write=True):
    buf = mmap.mmap(-1, chunk)
    buf.write(b"x" * chunk)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_DIRECT, 0o600)
    t = time.monotonic()
    for i in range(count):
        if write:
            assert os.pwritev(fd, [buf], i * chunk) == chunk
        else:
            assert os.preadv(fd, [buf], i * chunk) == chunk
    os.close(fd)
    return time.monotonic() - t
"""


# -- choosing the backend (pure) ------------------------------------------------------------

HYBRID = """\
25 30 0:23 / /sys rw,nosuid,nodev,noexec,relatime shared:7 - sysfs sysfs rw
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
33 31 0:30 / /sys/fs/cgroup/cpuacct rw,relatime - cgroup cgroup rw,cpuacct
34 31 0:31 / /sys/fs/cgroup/cpuset rw,relatime - cgroup cgroup rw,cpuset
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
37 31 0:34 / /sys/fs/cgroup/freezer rw,relatime - cgroup cgroup rw,freezer
38 31 0:35 / /sys/fs/cgroup/blkio rw,relatime - cgroup cgroup rw,blkio
39 31 0:36 / /sys/fs/cgroup/pids rw,relatime - cgroup cgroup rw,pids
40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,name=systemd
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
""".splitlines()

PURE_V2 = """\
25 30 0:23 / /sys rw,nosuid,nodev,noexec,relatime shared:7 - sysfs sysfs rw
26 25 0:24 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:8 - cgroup2 cgroup2 \
rw,nsdelegate,memory_recursiveprot
""".splitlines()

SYSTEMD_V1 = """\
31 23 0:28 / /sys/fs/cgroup ro,nosuid,nodev,noexec shared:9 - tmpfs tmpfs ro,mode=755
35 31 0:32 / /sys/fs/cgroup/cpu,cpuacct rw shared:14 - cgroup cgroup rw,cpu,cpuacct
36 31 0:33 / /sys/fs/cgroup/memory rw shared:15 - cgroup cgroup rw,memory
""".splitlines()


def test_choose_pure_v2_host_is_v2() -> None:
    m = C.choose(PURE_V2)
    assert isinstance(m, C.V2Manager)
    assert m.mount == "/sys/fs/cgroup"


def test_choose_hybrid_host_is_v1_with_every_controller() -> None:
    m = C.choose(HYBRID)
    assert isinstance(m, C.V1Manager)
    assert m.mounts["memory"] == "/sys/fs/cgroup/memory"
    assert m.mounts["cpuacct"] == "/sys/fs/cgroup/cpuacct"
    assert m.mounts["blkio"] == "/sys/fs/cgroup/blkio"
    assert "devices" not in m.mounts and "name=systemd" not in m.mounts


def test_choose_v1_with_comounted_controllers() -> None:
    m = C.choose(SYSTEMD_V1)
    assert isinstance(m, C.V1Manager)
    assert m.mounts["cpu"] == m.mounts["cpuacct"] == "/sys/fs/cgroup/cpu,cpuacct"
    assert m.available() == {"memory", "cpu"}


def test_choose_sees_the_last_mount_at_the_root() -> None:
    # a tmpfs mounted over a cgroup2 /sys/fs/cgroup hides it
    over = [*PURE_V2, "50 26 0:40 / /sys/fs/cgroup rw - tmpfs tmpfs rw", *SYSTEMD_V1[1:]]
    assert isinstance(C.choose(over), C.V1Manager)
    # and a cgroup2 mount over a v1 tmpfs is what is visible
    assert isinstance(C.choose([*HYBRID, "60 31 0:41 / /sys/fs/cgroup rw - cgroup2 cgroup2 rw"]),
                      C.V2Manager)


def test_choose_v2_elsewhere_and_nothing() -> None:
    m = C.choose(["41 31 0:38 / /mnt/cg\\0402 rw - cgroup2 cgroup2 rw"])
    assert isinstance(m, C.V2Manager) and m.mount == "/mnt/cg 2"
    with pytest.raises(NotSupportedError, match="no usable cgroup"):
        C.choose(HYBRID[:2])


def test_manager_matches_this_host() -> None:
    expected = 2 if _is_cgroup2("/sys/fs/cgroup") else 1
    assert C.manager().version == expected
    assert C.manager() is C.manager()


@pytest.mark.skipif(_is_cgroup2("/sys/fs/cgroup"),
                    reason="a pure v2 host: test_manager_matches_this_host makes this choice")
def test_choose_in_a_namespace_with_cgroup2_at_the_root() -> None:
    # The choice made from a real mountinfo, in a private mount namespace where
    # /sys/fs/cgroup is cgroup2 as on a pure v2 host.
    from pyhcs import _linux as L

    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        code = 1
        try:
            os.close(r)
            L.unshare(L.CLONE_NEWNS)
            L.mount(None, "/", None, L.MS_REC | L.MS_PRIVATE, None)
            L.mount("cgroup2", "/sys/fs/cgroup", "cgroup2", 0, None)
            with open("/proc/self/mountinfo") as f:
                m = C.choose(f)
            os.write(w, f"{type(m).__name__} {getattr(m, 'mount', '')}".encode())
            code = 0
        except BaseException as e:
            os.write(w, repr(e).encode())
        finally:
            os._exit(code)
    os.close(w)
    with os.fdopen(r) as f:
        got = f.read()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, got
    assert got == "V2Manager /sys/fs/cgroup"


# -- conversions (pure) ---------------------------------------------------------------------


def test_shares_to_weight_is_runc_conversion() -> None:
    assert C.shares_to_weight(2) == 1
    assert C.shares_to_weight(262144) == 10000
    assert C.shares_to_weight(1024) == 39  # the v1 default is v2's ~default range
    assert C.shares_to_weight(0) == 1 and C.shares_to_weight(10**9) == 10000


def test_resources_from_oci_groups_throttles_by_device() -> None:
    r = C.Resources.from_oci({
        "memory": {"limit": 64 * MiB, "swap": 64 * MiB},
        "cpu": {"shares": 512, "quota": 40000, "period": 100000, "cpus": "0"},
        "pids": {"limit": 50},
        "blockIO": {"throttleReadBpsDevice": [{"major": 7, "minor": 1, "rate": 100}],
                    "throttleWriteBpsDevice": [{"major": 7, "minor": 1, "rate": 200}],
                    "throttleWriteIOPSDevice": [{"major": 8, "minor": 0, "rate": 30}]},
    })
    assert r.memory_bytes == 64 * MiB and r.cpu_shares == 512 and r.pids_max == 50
    assert (r.cpu_quota_us, r.cpu_period_us, r.cpuset_cpus) == (40000, 100000, "0")
    assert set(r.io_limits) == {
        C.IOLimit(C.BlockDevice(7, 1), read_bps=100, write_bps=200),
        C.IOLimit(C.BlockDevice(8, 0), write_iops=30),
    }
    assert C.Resources.from_oci({}) == C.Resources()


def test_spec_maps_storage_maxima_to_block_io() -> None:
    cfg = ContainerConfig(storage_iops_maximum=300, storage_bandwidth_maximum=10 * MiB)
    res = _resources(cfg, C.BlockDevice(254, 0))
    dev = {"major": 254, "minor": 0}
    assert res["blockIO"] == {
        "throttleReadIOPSDevice": [{**dev, "rate": 300}],
        "throttleWriteIOPSDevice": [{**dev, "rate": 300}],
        "throttleReadBpsDevice": [{**dev, "rate": 10 * MiB}],
        "throttleWriteBpsDevice": [{**dev, "rate": 10 * MiB}],
    }
    r = C.Resources.from_oci(res)
    assert r.io_limits == (C.IOLimit(C.BlockDevice(254, 0), read_bps=10 * MiB,
                                     write_bps=10 * MiB, read_iops=300, write_iops=300),)
    with pytest.raises(NotSupportedError, match="StorageIOPSMaximum"):
        _resources(ContainerConfig(storage_iops_maximum=1))
    assert "blockIO" not in _resources(ContainerConfig(), C.BlockDevice(1, 2))


def test_spec_processor_count_uses_usable_processors() -> None:
    usable = sorted(os.sched_getaffinity(0))
    res = _resources(ContainerConfig(processor_count=1))
    assert res["cpu"]["cpus"] == str(usable[0])
    with pytest.raises(InvalidConfigError, match="ProcessorCount"):
        _resources(ContainerConfig(processor_count=len(usable) + 1))


# -- block devices --------------------------------------------------------------------------


@pytest.mark.skipif(os.major(os.stat("/").st_dev) == 0,
                    reason="the root file system is not on a block device (the cgroup v2 VM's)")
def test_block_device_of_the_root_is_a_whole_disk() -> None:
    dev = C.block_device("/")
    sysdir = Path(f"/sys/dev/block/{dev}")
    assert sysdir.exists() and not (sysdir / "partition").exists()


def test_block_device_of_a_loop_file_system(loop_fs: Path) -> None:
    dev = C.block_device(str(loop_fs))
    assert os.major(os.stat(loop_fs).st_dev) == dev.major == 7
    assert (Path(f"/sys/dev/block/{dev}") / "loop" / "backing_file").exists()


def test_block_device_of_an_overlay_is_its_upper_layers(loop_fs: Path, tmp_path: Path) -> None:
    from pyhcs import _linux as L

    lower, merged = tmp_path / "lower", tmp_path / "merged"
    upper, work = loop_fs / "upper", loop_fs / "work"
    for d in (lower, merged, upper, work):
        d.mkdir()
    L.mount("overlay", str(merged), "overlay", 0,
            f"lowerdir={lower},upperdir={upper},workdir={work}")
    try:
        assert os.major(os.stat(merged).st_dev) == 0  # no device of its own
        assert C.block_device(str(merged)) == C.block_device(str(loop_fs))
    finally:
        L.umount(str(merged))


def test_block_device_of_tmpfs_is_not_supported(tmp_path: Path) -> None:
    from pyhcs import _linux as L

    L.mount("tmpfs", str(tmp_path), "tmpfs", 0, "size=1m")
    try:
        with pytest.raises(NotSupportedError, match=r"tmpfs.*cannot be throttled"):
            C.block_device(str(tmp_path))
    finally:
        L.umount(str(tmp_path))


def test_block_device_of_a_partition_is_its_disk(tmp_path: Path) -> None:
    image = tmp_path / "parted.img"
    with open(image, "wb") as f:
        f.truncate(40 * MiB)
        # one MBR partition, type 0x83, from sector 2048 to the end
        entry = struct.pack("<B3sB3sII", 0, b"\0\0\0", 0x83, b"\0\0\0", 2048,
                            40 * MiB // 512 - 2048)
        f.seek(446)
        f.write(entry)
        f.seek(510)
        f.write(b"\x55\xaa")
    dev = _run("losetup", "--find", "--show", "--partscan", str(image))
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    try:
        part = dev + "p1"
        if not Path(f"/sys/class/block/{os.path.basename(part)}").exists():
            pytest.skip("this kernel parses no partition tables (no CONFIG_MSDOS_PARTITION)")
        for _ in range(200):  # udev or devtmpfs makes the node
            if os.path.exists(part):
                break
            time.sleep(0.01)
        _run("mkfs.ext4", "-q", "-F", part)
        _run("mount", "-t", "ext4", part, str(mnt))
        try:
            rdev = os.stat(dev).st_rdev
            assert os.stat(mnt).st_dev == os.stat(part).st_rdev != rdev
            assert C.block_device(str(mnt)) == (os.major(rdev), os.minor(rdev))
        finally:
            _run("umount", str(mnt))
    finally:
        _run("losetup", "-d", dev)


def test_whole_disk_of_a_partition_in_sysfs(tmp_path: Path) -> None:
    # sysfs's layout for a partition (where the kernel here can make none, see above):
    # /sys/dev/block/M:m links to the partition's directory inside its disk's.
    disk = tmp_path / "devices" / "virtio1" / "block" / "vdb"
    (disk / "vdb1").mkdir(parents=True)
    (disk / "dev").write_text("252:16\n")
    (disk / "vdb1" / "partition").write_text("1\n")
    (disk / "vdb1" / "dev").write_text("252:17\n")
    (tmp_path / "block").mkdir()
    link = tmp_path / "block" / "252:17"
    link.symlink_to(os.path.relpath(disk / "vdb1", link.parent))
    assert C._whole_disk(C.BlockDevice(252, 17), str(link)) == C.BlockDevice(252, 16)
    (tmp_path / "block" / "252:16").symlink_to(os.path.relpath(disk, link.parent))
    assert C._whole_disk(C.BlockDevice(252, 16), str(tmp_path / "block" / "252:16")) == (
        252, 16)


# -- every limit's effect (v1 here; v2 in the test VM: test_cgroup2_vm.py) -----------------


@needs_v1
def test_v1_create_and_remove_leave_nothing(make: Make, cgroup_name: str) -> None:
    cg = make(C.Resources(memory_bytes=32 * MiB))
    assert isinstance(cg, C.V1Cgroup)
    assert all(os.path.isdir(d) for d in cg.dirs.values())
    assert cg.pids() == []
    cg.remove()
    cg.remove()  # idempotent
    assert not any(os.path.exists(d) for d in cg.dirs.values())


def test_processor_maximum_limits_cpu_share(make: Make) -> None:
    ncpu = os.cpu_count() or 1
    # ProcessorMaximum 20 (% of the machine), as _spec computes it
    quota = _resources(ContainerConfig(processor_maximum=20))["cpu"]
    cg = make(C.Resources(cpu_quota_us=quota["quota"], cpu_period_us=quota["period"]))
    loops = [Workload(cg, "while True: pass") for _ in range(ncpu)]
    try:
        for w in loops:
            w.go()
        time.sleep(0.3)  # past the first period, whose budget is not yet spent
        before, t0 = cg.stats().cpu_total_ns, time.monotonic()
        time.sleep(1.5)
        used, elapsed = cg.stats().cpu_total_ns - before, time.monotonic() - t0
    finally:
        for w in loops:
            w.stop()
    share = used / (elapsed * 1e9 * ncpu)
    # unlimited, ncpu busy loops would take ~100% of the machine
    assert 0.10 <= share <= 0.35, share


def test_processor_count_restricts_affinity(make: Make) -> None:
    usable = sorted(os.sched_getaffinity(0))
    if len(usable) < 2:
        pytest.skip("needs two processors")
    cpus = _resources(ContainerConfig(processor_count=1))["cpu"]["cpus"]
    cg = make(C.Resources(cpuset_cpus=cpus))
    w = Workload(cg, "import os\nprint(sorted(os.sched_getaffinity(0)))")
    w.go()
    assert w.result().strip() == str([usable[0]])
    if isinstance(cg, C.V1Cgroup):
        assert Path(cg.dirs["cpuset"], "cpuset.mems").read_text().strip()  # copied from parent


def test_processor_weight_writes_shares(make: Make) -> None:
    shares = _resources(ContainerConfig(processor_weight=2500))["cpu"]["shares"]
    assert shares == 512
    cg = make(C.Resources(cpu_shares=shares))
    if isinstance(cg, C.V2Cgroup):
        assert Path(cg.path, "cpu.weight").read_text().strip() == str(C.shares_to_weight(512))
    else:
        assert isinstance(cg, C.V1Cgroup)
        assert Path(cg.dirs["cpu"], "cpu.shares").read_text().strip() == "512"


def test_memory_and_pids_limits_are_written(make: Make) -> None:
    cg = make(C.Resources(memory_bytes=48 * MiB, pids_max=7))
    if isinstance(cg, C.V2Cgroup):
        assert int(Path(cg.path, "memory.max").read_text()) == 48 * MiB
        assert Path(cg.path, "pids.max").read_text().strip() == "7"
    else:
        assert isinstance(cg, C.V1Cgroup)
        assert int(Path(cg.dirs["memory"], "memory.limit_in_bytes").read_text()) == 48 * MiB
        assert Path(cg.dirs["pids"], "pids.max").read_text().strip() == "7"
    # and the pids limit bites: the 8th process cannot be forked
    w = Workload(cg, "import os, time\nn = 0\ntry:\n    while True:\n        if os.fork() == 0:\n"
                     "            time.sleep(30)\n        n += 1\nexcept OSError:\n    print(n)")
    w.go()
    assert w.line() == "6"
    cg.kill_all()
    w.stop()


def test_bandwidth_throttle_slows_direct_writes(make: Make, loop_fs: Path) -> None:
    dev, limit = C.block_device(str(loop_fs)), 2 * MiB
    cg = make(C.Resources(io_limits=(C.IOLimit(dev, write_bps=limit, read_bps=limit),)))
    w = Workload(cg, _DIRECT_IO + f"print(direct({str(loop_fs / 'f')!r}, 128 * 1024, 40))")
    w.go()
    elapsed = float(w.result())
    rate = 40 * 128 * 1024 / elapsed
    # unthrottled, direct writes to a loop device run at hundreds of MB/s
    assert 0.3 * limit <= rate <= 1.6 * limit, rate


def test_iops_throttle_slows_direct_writes(make: Make, loop_fs: Path) -> None:
    dev, limit = C.block_device(str(loop_fs)), 25
    cg = make(C.Resources(io_limits=(C.IOLimit(dev, write_iops=limit),)))
    w = Workload(cg, _DIRECT_IO + f"print(direct({str(loop_fs / 'f')!r}, 4096, 60))")
    w.go()
    iops = 60 / float(w.result())
    assert 0.3 * limit <= iops <= 1.6 * limit, iops


def test_stats_move_with_the_workload(make: Make, loop_fs: Path) -> None:
    cg = make(C.Resources().counting_io_of(C.block_device(str(loop_fs))))
    idle = cg.stats()
    assert idle.measured == {"memory", "cpu", "io", "pids"}
    w = Workload(cg, _DIRECT_IO + f"""
t = time.process_time()
while time.process_time() - t < 0.3:
    pass
mem = b"\\1" * (64 << 20)
direct({str(loop_fs / 'f')!r}, 65536, 32)
direct({str(loop_fs / 'f')!r}, 65536, 32, write=False)
print("done", flush=True)
sys.stdin.readline()
""")
    try:
        w.go()
        assert w.line() == "done"
        st = cg.stats()
        assert st.pids_current == len(cg.pids()) == 1
    finally:
        w.stop()
    assert st.cpu_total_ns - idle.cpu_total_ns >= 250_000_000
    assert st.cpu_user_ns > idle.cpu_user_ns
    assert st.cpu_user_ns + st.cpu_kernel_ns <= st.cpu_total_ns * 1.1 + 20_000_000
    assert st.memory_usage >= 64 * MiB and st.memory_max_usage >= st.memory_usage
    assert 64 * MiB <= st.memory_private_working_set <= st.memory_usage
    assert st.io_write_bytes >= 2 * MiB and st.io_write_ops >= 32
    assert st.io_read_bytes >= 2 * MiB and st.io_read_ops >= 32
    doc = st.processor_stats()
    assert doc.total_runtime_100ns == st.cpu_total_ns // 100
    assert st.storage_stats().write_size_bytes == st.io_write_bytes
    assert st.memory_stats().usage_commit_bytes == st.memory_usage


def test_freeze_stops_and_kill_all_empties(make: Make) -> None:
    cg = make()
    w = Workload(cg, "import os\nos.fork()\nwhile True: pass")
    w.go()
    while len(cg.pids()) < 2:
        time.sleep(0.01)
    cg.freeze()
    before = cg.stats().cpu_total_ns
    time.sleep(0.3)
    assert cg.stats().cpu_total_ns - before < 20_000_000  # frozen: nothing runs
    cg.thaw()
    # Thawed, the busy loops run again: wait (with a generous deadline, since a
    # loaded CI machine may schedule them late) for their CPU time to move.
    deadline = time.monotonic() + 20
    while cg.stats().cpu_total_ns - before <= 50_000_000:
        assert time.monotonic() < deadline, "thawed workload never ran"
        time.sleep(0.02)
    cg.kill_all()
    assert cg.pids() == []
    w.stop()


@needs_v1
def test_remove_kills_what_joined_only_some_hierarchies(make: Make) -> None:
    """A v1 process joins a container's hierarchies one after another. One caught between
    them (in memory, not yet in pids, which kill_all looks at) when the container ends is
    killed by remove, and every folder goes, instead of the cgroup staying busy for good."""
    cg = make()
    assert isinstance(cg, C.V1Cgroup)
    p = subprocess.Popen(["sleep", "1000"])
    try:
        Path(cg.dirs["memory"], "cgroup.procs").write_text(str(p.pid))
        assert cg.pids() == []
        cg.kill_all()
        cg.remove()
        assert p.wait(10) == -signal.SIGKILL
        assert [d for d in cg.dirs.values() if os.path.exists(d)] == []
    finally:
        p.kill()
        p.wait()


@needs_v1
def test_v1_unavailable_controller_and_rejected_value(make: Make, cgroup_name: str) -> None:
    assert isinstance(HOST, C.V1Manager)
    no_blkio = C.V1Manager({k: v for k, v in HOST.mounts.items() if k != "blkio"})
    io = (C.IOLimit(C.block_device("/"), write_bps=MiB),)
    with pytest.raises(NotSupportedError, match="'blkio' controller"):
        no_blkio.create(cgroup_name, C.Resources(io_limits=io))
    with pytest.raises(InvalidConfigError, match="processor count"):
        HOST.create(cgroup_name, C.Resources(cpuset_cpus="4095"))
    # nothing is left of the cgroups that failed
    assert not any(os.path.exists(d) for d in HOST.open(cgroup_name).dirs.values())


# -- v2 on this host's cgroup2 hierarchy ----------------------------------------------------

needs_unified = pytest.mark.skipif(not _is_cgroup2(UNIFIED) or HOST.version != 1,
                                   reason="no separate cgroup2 hierarchy on this host")


@pytest.fixture
def v2() -> Iterator[C.V2Manager]:
    m = C.V2Manager(UNIFIED)
    yield m
    for d in m.parent_dirs():
        try:
            os.rmdir(d)
        except FileNotFoundError:
            pass


@needs_unified
def test_v2_lifecycle_freeze_kill_remove(v2: C.V2Manager, make: Make) -> None:
    cg = make(mgr=v2)
    assert isinstance(cg, C.V2Cgroup)
    assert os.path.isdir(cg.path) and cg.pids() == []
    w = Workload(cg, "import os\nos.fork()\nwhile True: pass")
    w.go()
    while len(cg.pids()) < 2:
        time.sleep(0.01)
    assert w.proc.pid in cg.pids()
    assert f"0::/{os.path.relpath(cg.path, UNIFIED)}" in Path(
        f"/proc/{w.proc.pid}/cgroup").read_text().splitlines()

    cg.freeze()
    assert "frozen 1" in Path(cg.path, "cgroup.events").read_text()
    before = cg.stats().cpu_total_ns
    time.sleep(0.3)
    assert cg.stats().cpu_total_ns - before < 20_000_000
    cg.thaw()
    assert "frozen 0" in Path(cg.path, "cgroup.events").read_text()
    # Thawed, the busy loops run again: wait (with a generous deadline, since a
    # loaded CI machine may schedule them late) for their CPU time to move.
    deadline = time.monotonic() + 20
    while cg.stats().cpu_total_ns - before <= 50_000_000:
        assert time.monotonic() < deadline, "thawed workload never ran"
        time.sleep(0.02)

    cg.kill_all()  # cgroup.kill
    assert cg.pids() == []
    assert w.proc.wait(timeout=10) == -signal.SIGKILL
    w.stop()
    cg.remove()
    assert not os.path.exists(cg.path)
    cg.remove()


@needs_unified
def test_v2_degrades_without_controllers(v2: C.V2Manager, make: Make,
                                         cgroup_name: str) -> None:
    avail = v2.available()
    assert "memory" not in avail  # held by the v1 hierarchy on this host
    for res, ctrl in ((C.Resources(memory_bytes=MiB), "memory"),
                      (C.Resources(cpu_quota_us=1000), "cpu"),
                      (C.Resources(cpuset_cpus="0"), "cpuset"),
                      (C.Resources(pids_max=3), "pids"),
                      (C.Resources(io_limits=(C.IOLimit(C.BlockDevice(7, 0), read_iops=1),)),
                       "io")):
        if ctrl in avail:
            continue
        with pytest.raises(NotSupportedError, match=f"cgroup v2 '{ctrl}' controller"):
            v2.create(cgroup_name, res)
        assert not os.path.exists(os.path.join(v2.parent_dirs()[0], cgroup_name))
    cg = make(mgr=v2)
    w = Workload(cg, "t = __import__('time').process_time()\n"
                     "while __import__('time').process_time() - t < 0.3: pass")
    w.go()
    w.result()
    st = cg.stats()
    assert st.measured == {"cpu"} | (avail & {"memory", "io", "pids"})
    assert st.cpu_total_ns >= 250_000_000 and st.cpu_user_ns > 0  # cpu.stat is core
    if "memory" not in avail:
        assert st.memory_usage == 0 and st.memory_stats().usage_commit_bytes == 0
