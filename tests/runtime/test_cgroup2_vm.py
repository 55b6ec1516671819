"""cgroup v2 with its controllers, tested in a virtual machine.

This host is hybrid: cpu, memory, io and pids are bound to cgroup v1 hierarchies, and a
controller bound to v1 cannot appear in any cgroup2 hierarchy, not even one mounted in a
private mount namespace (the v2 hierarchy here offers hugetlb alone). So the v2 backend's
limits are tested where they exist: Debian's kernel, booted by qemu with a pure cgroup v2
hierarchy (cpuset, cpu, io, memory, hugetlb, pids, ...), the host's root file system
shared read-only over 9p and tmpfs wherever programs write (tests/guest/init). In there
the guest runs the cgroup tests and the container-limit tests of this suite
(``GUEST_TESTS``) with the v2 backend, which pyhcs chooses itself on such a machine.

``scripts/cgroup2-vm.sh`` (run by ``scripts/test.sh``) prepares the kernel and initramfs.
qemu runs under software emulation: this machine's nested KVM hangs in the guest kernel's
early boot.
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
VM_DIR = Path(os.environ.get("PYHCS_VM_DIR", "/var/cache/pyhcs/cgroup2-vm"))
GUEST_TESTS = ["tests/runtime/test_cgroups.py", "tests/compute/test_config_fields.py",
               "tests/compute/test_container.py::test_memory_limit_kills",
               "tests/compute/test_container.py::test_statistics_and_process_list"]

_CG = "tests/runtime/test_cgroups.py::test_"
_FIELDS = "tests/compute/test_config_fields.py::test_"
MUST_PASS = [
    *(_CG + t for t in (
        "processor_maximum_limits_cpu_share", "processor_count_restricts_affinity",
        "processor_weight_writes_shares", "memory_and_pids_limits_are_written",
        "bandwidth_throttle_slows_direct_writes", "iops_throttle_slows_direct_writes",
        "stats_move_with_the_workload", "freeze_stops_and_kill_all_empties",
        "manager_matches_this_host")),
    *(_FIELDS + t for t in (
        "processor_count_restricts_the_cpus", "processor_maximum_limits_the_cpu_share",
        "processor_weight_sets_the_shares", "storage_limits_throttle_the_sandbox_device",
        "sandbox_size_gives_enospc_inside_only", "statistics_move_with_the_workload")),
    "tests/compute/test_container.py::test_memory_limit_kills",
]

pytestmark = pytest.mark.skipif(
    not (VM_DIR / "initrd.img").exists() and os.environ.get("CI") != "true",
    reason="no test machine: run scripts/cgroup2-vm.sh (scripts/test.sh does)")


def test_cgroup_v2_with_its_controllers(tmp_path: Path) -> None:
    # the guest's temporary directory, on its scratch disk: one that does not hide REPO
    tmp = "/var/tmp" if REPO.is_relative_to("/tmp") else "/tmp"
    script = tmp_path / "run.sh"  # read by the guest's /init before its scratch disk hides it
    script.write_text(
        f"cd {REPO}\n"
        "echo controllers: $(cat /sys/fs/cgroup/cgroup.controllers)\n"
        f"export PYTHONDONTWRITEBYTECODE=1 HOME={tmp} TMPDIR={tmp}\n"
        "export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin\n"
        "exec .venv/bin/python -m pytest -p no:cacheprovider --color=no -q -rA "
        f"{' '.join(GUEST_TESTS)}\n")
    # the guest's /tmp: a block device, as storage limits and sized sandboxes need
    disk = tmp_path / "scratch.img"
    with open(disk, "wb") as f:
        f.truncate(8 << 30)
    subprocess.run(["mkfs.ext4", "-q", "-F", str(disk)], check=True)
    try:
        r = _boot(script, disk, tmp)
    finally:
        disk.unlink()
    out = r.stdout.replace("\r", "")  # a serial console's line ends
    tail = out[-6000:]
    controllers = re.search(r"controllers: (.*)$", out, re.M)  # (after the BIOS's escapes)
    assert controllers is not None, tail
    assert {"cpu", "cpuset", "io", "memory", "pids"} <= set(controllers.group(1).split())
    assert "pyhcs-guest-exit 0" in out, tail
    summary = re.search(r"^(\d+) passed(.*) in [\d.]+s", out, re.M)
    print(out[-3000:])  # what the guest ran (pytest -s / -rA shows it)
    assert summary is not None and "failed" not in summary.group(2), tail
    # the limits' effects ran in there (they are skipped only where they cannot run)
    passed = set(re.findall(r"^PASSED (\S+)", out, re.M))
    assert set(MUST_PASS) <= passed, (sorted(set(MUST_PASS) - passed), tail)


def _boot(script: Path, disk: Path, tmp: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["qemu-system-x86_64", "-m", "4096", "-smp", "2", "-nographic", "-no-reboot",
         "-nic", "none", "-kernel", str(VM_DIR / "vmlinuz"),
         "-initrd", str(VM_DIR / "initrd.img"),
         "-append", f"console=ttyS0 quiet panic=-1 pyhcs.run={script} pyhcs.tmp={tmp}",
         "-virtfs", "local,path=/,mount_tag=host,security_model=passthrough,readonly=on,"
                    "multidevs=remap",
         "-drive", f"file={disk},if=virtio,format=raw,cache=unsafe"],
        stdin=subprocess.DEVNULL, capture_output=True, text=True, errors="replace",
        timeout=1800, check=False)
