"""Every ContainerConfig field has its Linux effect, seen from inside the container or
from its cgroup (the cgroup tests in tests/runtime prove the kernel then enforces it)."""

from __future__ import annotations

import os
import time

import pytest

import pyhcs
from pyhcs._layers import DriverInfo, get_layer_mount_path
from pyhcs._runtime._cgroups import block_device, manager, shares_to_weight

from .conftest import run
from .test_container import Make

MIB = 1 << 20


def _cgroup_file(container_id: str, controller: str, name: str) -> str:
    """The container's cgroup file *name*: of the v1 *controller*'s hierarchy, or of the
    one v2 hierarchy (tests/runtime/test_cgroup2_vm.py runs these tests on v2)."""
    cg = manager().open(container_id)
    if manager().version == 2:
        with open(os.path.join(cg.path, name)) as fh:  # type: ignore[attr-defined]
            return fh.read()
    for f in cg.procs_files():
        if f"/{controller}/" in f or f"/{controller}," in f:
            with open(os.path.join(os.path.dirname(f), name)) as fh:
                return fh.read()
    pytest.skip(f"no v1 {controller} hierarchy")


def test_processor_count_restricts_the_cpus(make_container: Make) -> None:
    c = make_container(processor_count=1)
    c.start()
    code, out, _ = run(c, "grep Cpus_allowed_list /proc/self/status")
    assert code == 0
    allowed = out.decode().split()[-1]
    assert allowed == str(sorted(os.sched_getaffinity(0))[0])


def test_processor_maximum_limits_the_cpu_share(make_container: Make) -> None:
    c = make_container(processor_maximum=20)
    c.start()
    # one busy loop per processor: unlimited, they would take the whole machine
    n = len(os.sched_getaffinity(0))
    p = c.create_process(pyhcs.ProcessConfig(
        command_line=f"sh -c 'for i in $(seq {n}); do (while :; do :; done) & done; wait'"))
    try:
        time.sleep(0.2)  # every loop running
        before = c.statistics().processor.total_runtime_100ns
        t0 = time.monotonic()
        time.sleep(1.0)
        used = (c.statistics().processor.total_runtime_100ns - before) / 1e7
        share = used / (time.monotonic() - t0) / n
        # 20% of all processors; a generous band for a busy shared machine
        assert 0.05 < share < 0.35, share
    finally:
        p.kill()
        p.wait(10)


def test_processor_weight_sets_the_shares(make_container: Make) -> None:
    c = make_container(processor_weight=2500)
    c.start()
    if manager().version == 2:
        assert int(_cgroup_file(c.id, "cpu", "cpu.weight")) == shares_to_weight(512)
    else:
        assert int(_cgroup_file(c.id, "cpu", "cpu.shares")) == 512


def test_processor_weight_divides_a_contended_cpu(make_container: Make) -> None:
    """Two busy loops on one processor: CPU time splits as the weights (9:1) say."""
    heavy = make_container(processor_weight=9000, processor_count=1)
    light = make_container(processor_weight=1000, processor_count=1)
    loops = []
    for c in (heavy, light):
        c.start()
        loops.append(c.create_process(pyhcs.ProcessConfig(
            command_line="sh -c 'while :; do :; done'")))
    try:
        time.sleep(0.2)
        before = [c.statistics().processor.total_runtime_100ns for c in (heavy, light)]
        time.sleep(1.5)
        after = [c.statistics().processor.total_runtime_100ns for c in (heavy, light)]
        h, lt = after[0] - before[0], after[1] - before[1]
        # 9:1 in theory; equal weights give 1:1. Other work on the processor skews both.
        assert h > 3 * lt, (h, lt)
    finally:
        for p in loops:
            p.kill()
            p.wait(10)


def test_storage_limits_throttle_the_sandbox_device(make_container: Make) -> None:
    c = make_container(storage_iops_maximum=100, storage_bandwidth_maximum=4 * MIB)
    c.start()
    rootfs = get_layer_mount_path(DriverInfo(), c.id)
    if manager().version == 2:
        dev, *rates = _cgroup_file(c.id, "io", "io.max").split()
        limits = dict(r.split("=") for r in rates)
        assert limits["wbps"] == str(4 * MIB) and limits["wiops"] == "100"
        # the throttled device is the one the container's root file system writes to
        assert dev == str(block_device(rootfs))
        return
    bps = _cgroup_file(c.id, "blkio", "blkio.throttle.write_bps_device").split()
    iops = _cgroup_file(c.id, "blkio", "blkio.throttle.write_iops_device").split()
    assert bps[1] == str(4 * MIB) and iops[1] == "100"
    assert bps[0] == iops[0] == str(block_device(rootfs))


def test_sandbox_size_gives_enospc_inside_only(make_container: Make) -> None:
    c = make_container(storage_sandbox_size=64 * MIB)
    c.start()
    init = c.create_process(pyhcs.ProcessConfig(command_line="sleep 30"))
    try:
        code, _, err = run(c, "dd if=/dev/zero of=/big bs=1M count=100")
        assert code != 0
        assert b"No space left" in err
        code, out, _ = run(c, "sh -c 'rm /big; echo ok > /small; cat /small'")
        assert (code, out) == (0, b"ok\n")
    finally:
        init.kill()
        init.wait(10)


def test_owner_and_name_are_queryable(make_container: Make) -> None:
    a = make_container(owner="ci", name="alpha")
    make_container(owner="other", name="beta")
    found = pyhcs.get_containers(pyhcs.ComputeSystemQuery(owners=["ci"]))
    assert [p.id for p in found] == [a.id]
    assert found[0].name == "alpha" and found[0].owner == "ci"
    assert [p.id for p in pyhcs.get_containers(pyhcs.ComputeSystemQuery(names=["alpha"]))] == [
        a.id]


def test_query_by_ids_and_types(make_container: Make) -> None:
    a = make_container()
    b = make_container()
    ids = pyhcs.ComputeSystemQuery(ids=[b.id])
    assert [p.id for p in pyhcs.get_containers(ids)] == [b.id]
    both = pyhcs.ComputeSystemQuery(ids=[a.id, b.id], types=["Container"])
    assert sorted(p.id for p in pyhcs.get_containers(both)) == sorted([a.id, b.id])
    vm = pyhcs.ComputeSystemQuery(ids=[a.id, b.id], types=["VirtualMachine"])
    assert pyhcs.get_containers(vm) == []


def test_create_with_json_merges_over_the_config(busybox: list[str], unique_id: str) -> None:
    layers = [pyhcs.Layer(id=p.rsplit("/", 1)[-1], path=p) for p in busybox]
    config = pyhcs.ContainerConfig(layers=layers, host_name="from-config", owner="config")
    for bad in ("{not json", "[1, 2]"):
        with pytest.raises(pyhcs.InvalidConfigError):
            pyhcs.create_container_with_json(unique_id, config, bad)
    assert pyhcs.get_containers(pyhcs.ComputeSystemQuery(ids=[unique_id])) == []
    c = pyhcs.create_container_with_json(
        unique_id, config, '{"HostName": "from-json", "Owner": "json"}')
    try:
        assert [p.owner for p in pyhcs.get_containers(pyhcs.ComputeSystemQuery(
            ids=[unique_id]))] == ["json"]
        c.start()
        code, out, _ = run(c, "hostname")
        assert (code, out) == (0, b"from-json\n")
    finally:
        c.close()
        pyhcs.remove_container(unique_id, force=True)


@pytest.mark.parametrize(("field", "value"), [
    ("hv_partition", True), ("hv_runtime", pyhcs.HvRuntime()), ("sandbox_path", "/var/lib/uvm"),
    ("credentials", "{}"),
    ("servicing", True), ("is_dummy", True),
])
def test_windows_only_fields_are_refused_by_name(make_container: Make, field: str,
                                                 value: object) -> None:
    name = {"hv_partition": "HvPartition", "hv_runtime": "HvRuntime", "sandbox_path": "SandboxPath",
            "credentials": "Credentials", "servicing": "Servicing", "is_dummy": "IsDummy"}
    with pytest.raises(pyhcs.NotSupportedError, match=name[field]):
        make_container(**{field: value})
    assert pyhcs.get_containers() == []


def test_hints_with_no_linux_meaning_are_accepted(make_container: Make) -> None:
    c = make_container(ignore_flushes_during_boot=True, allow_unqualified_dns_query=True)
    c.start()
    assert run(c, "true")[0] == 0


def test_volume_path_must_be_the_sandbox_mount(make_container: Make, busybox: list[str],
                                               unique_id: str) -> None:
    with pytest.raises(pyhcs.InvalidConfigError, match="VolumePath"):
        make_container(volume_path="/tmp")  # no LayerFolderPath: it would go unused
    # as hcsshim's callers do: prepare a sandbox, pass its folder and its mount path
    info = DriverInfo()
    sid = f"{unique_id}-sandbox"
    parent = busybox[0].rsplit("/", 1)[-1]
    pyhcs.create_sandbox_layer(info, sid, parent, busybox)
    try:
        pyhcs.prepare_layer(info, sid, busybox)
        try:
            folder = os.path.join(info.home_dir, sid)
            mount = get_layer_mount_path(info, sid)
            with pytest.raises(pyhcs.InvalidConfigError, match="VolumePath"):
                make_container(layers=[], layer_folder_path=folder, volume_path="/tmp")
            c = make_container(layers=[], layer_folder_path=folder, volume_path=mount)
            c.start()
            code, out, _ = run(c, "sh -c 'echo here > /mark; cat /mark'")
            assert (code, out) == (0, b"here\n")
            c.wait(10)
            c.close()
            pyhcs.remove_container(c.id)
            assert os.path.exists(os.path.join(mount, "mark"))  # the caller's sandbox
        finally:
            pyhcs.unprepare_layer(info, sid)
    finally:
        pyhcs.destroy_layer(info, sid)
    assert pyhcs.get_containers() == []


def test_statistics_move_with_the_workload(make_container: Make) -> None:
    c = make_container()
    c.start()
    p = c.create_process(pyhcs.ProcessConfig(command_line="sleep 30"))
    try:
        s1 = c.statistics()
        code, _, _ = run(c, "sh -c 'i=0; while [ $i -lt 30000 ]; do i=$((i+1)); done; "
                            "dd if=/dev/zero of=/data bs=1M count=16 oflag=direct'")
        assert code == 0
        s2 = c.statistics()
        assert s2.processor.total_runtime_100ns > s1.processor.total_runtime_100ns
        assert s2.memory.usage_commit_bytes > 0
        assert s2.storage.write_size_bytes >= s1.storage.write_size_bytes + 16 * MIB
        assert s2.uptime_100ns > s1.uptime_100ns
    finally:
        p.kill()
        p.wait(10)
