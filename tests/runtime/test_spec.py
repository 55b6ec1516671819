"""The OCI runtime spec's security content: capabilities, masked and read-only paths,
the seccomp profile, user namespaces, and uid/gid validation."""

from __future__ import annotations

import json
from typing import Any

import pytest

from pyhcs import InvalidConfigError
from pyhcs._runtime._seccomp import default_profile
from pyhcs._runtime._spec import (
    CAPABILITY_NUMBERS,
    DEFAULT_CAPABILITIES,
    MASKED_PATHS,
    MAX_ID,
    READONLY_PATHS,
    IdMapping,
    UserNamespace,
    check_id,
    container_spec,
    parse_user,
    process_spec,
)
from pyhcs._schema import ContainerConfig, ProcessConfig

# containerd's defaults (pkg/oci DefaultSpec), written out here so a change to the module's
# lists is a visible decision
CONTAINERD_CAPS = {
    "CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_FSETID", "CAP_FOWNER", "CAP_MKNOD", "CAP_NET_RAW",
    "CAP_SETGID", "CAP_SETUID", "CAP_SETFCAP", "CAP_SETPCAP", "CAP_NET_BIND_SERVICE",
    "CAP_SYS_CHROOT", "CAP_KILL", "CAP_AUDIT_WRITE",
}
CONTAINERD_MASKED = {
    "/proc/acpi", "/proc/asound", "/proc/kcore", "/proc/keys", "/proc/latency_stats",
    "/proc/timer_list", "/proc/timer_stats", "/proc/sched_debug", "/sys/firmware",
    "/sys/devices/virtual/powercap", "/proc/scsi",
}
CONTAINERD_READONLY = {"/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger"}
ACTIONS = {"SCMP_ACT_ALLOW", "SCMP_ACT_ERRNO", "SCMP_ACT_KILL", "SCMP_ACT_KILL_PROCESS",
           "SCMP_ACT_KILL_THREAD", "SCMP_ACT_TRAP", "SCMP_ACT_TRACE", "SCMP_ACT_LOG"}
OPS = {"SCMP_CMP_NE", "SCMP_CMP_LT", "SCMP_CMP_LE", "SCMP_CMP_EQ", "SCMP_CMP_GE",
       "SCMP_CMP_GT", "SCMP_CMP_MASKED_EQ"}


def spec(**kw: Any) -> dict[str, Any]:
    return container_spec("c1", ContainerConfig(), "/tmp/rootfs", **kw)


def allowed(profile: dict[str, Any]) -> set[str]:
    """Syscalls the profile allows whatever their arguments."""
    return {n for s in profile["syscalls"]
            if s["action"] == "SCMP_ACT_ALLOW" and not s.get("args") for n in s["names"]}


# -- capabilities, paths --------------------------------------------------------------------


def test_process_gets_containerds_capabilities_and_no_new_privs() -> None:
    p = process_spec(ProcessConfig(command_line="true"))
    assert set(DEFAULT_CAPABILITIES) == CONTAINERD_CAPS
    caps = p["capabilities"]
    assert set(caps) == {"bounding", "effective", "permitted"}  # inheritable, ambient empty
    for key in ("bounding", "effective", "permitted"):
        assert set(caps[key]) == CONTAINERD_CAPS
    assert p["noNewPrivileges"] is True


def test_every_kernel_capability_has_a_number() -> None:
    with open("/proc/sys/kernel/cap_last_cap") as f:
        last = int(f.read())
    assert sorted(CAPABILITY_NUMBERS.values())[: last + 1] == list(range(last + 1))
    assert len(set(CAPABILITY_NUMBERS.values())) == len(CAPABILITY_NUMBERS)


def test_masked_and_readonly_paths() -> None:
    linux = spec()["linux"]
    masked = linux["maskedPaths"]
    assert set(masked) >= CONTAINERD_MASKED
    assert "/proc/interrupts" in masked  # moby masks it too now
    assert len(masked) == len(set(masked))
    extra = set(masked) - set(MASKED_PATHS)
    assert all(p.startswith("/sys/devices/system/cpu/cpu") and p.endswith("/thermal_throttle")
               for p in extra)
    assert set(linux["readonlyPaths"]) == CONTAINERD_READONLY == set(READONLY_PATHS)


# -- seccomp --------------------------------------------------------------------------------


def test_seccomp_profile_has_the_oci_shape() -> None:
    seccomp = json.loads(json.dumps(spec()))["linux"]["seccomp"]
    assert seccomp["defaultAction"] == "SCMP_ACT_ERRNO"
    assert "defaultErrnoRet" not in seccomp  # EPERM, the OCI default
    assert all(a.startswith("SCMP_ARCH_") for a in seccomp["architectures"])
    assert set(seccomp) <= {"defaultAction", "defaultErrnoRet", "architectures", "syscalls"}
    for entry in seccomp["syscalls"]:
        assert set(entry) <= {"names", "action", "errnoRet", "args"}
        assert entry["names"] and all(isinstance(n, str) and n for n in entry["names"])
        assert entry["action"] in ACTIONS
        if "errnoRet" in entry:
            assert isinstance(entry["errnoRet"], int) and entry["action"] == "SCMP_ACT_ERRNO"
        for arg in entry.get("args", []):
            assert set(arg) <= {"index", "value", "valueTwo", "op"}
            assert 0 <= arg["index"] <= 5 and arg["op"] in OPS
            assert 0 <= arg["value"] < 1 << 64


def test_default_profile_content() -> None:
    profile = spec()["linux"]["seccomp"]
    assert profile == default_profile(DEFAULT_CAPABILITIES)
    ok = allowed(profile)
    assert {"read", "write", "execve", "exit_group", "chroot", "setuid", "capset"} <= ok
    for name in ("mount", "umount2", "unshare", "setns", "keyctl", "add_key", "request_key",
                 "kexec_load", "bpf", "perf_event_open", "kcmp", "clone", "clone3",
                 "socket", "personality", "open_by_handle_at", "reboot", "init_module",
                 "syslog", "userfaultfd", "swapon", "acct", "settimeofday", "iopl"):
        assert name not in ok, name
    by_name: dict[str, list[dict[str, Any]]] = {}
    for entry in profile["syscalls"]:
        for n in entry["names"]:
            by_name.setdefault(n, []).append(entry)
    assert [e["args"] for e in by_name["clone"]] == [
        [{"index": 0, "value": 0x7E020000, "valueTwo": 0, "op": "SCMP_CMP_MASKED_EQ"}]]
    assert by_name["clone3"] == [{"names": ["clone3"], "action": "SCMP_ACT_ERRNO",
                                  "errnoRet": 38}]
    assert [e["args"] for e in by_name["socket"]] == [
        [{"index": 0, "value": 40, "op": "SCMP_CMP_NE"}]]
    assert sorted(e["args"][0]["value"] for e in by_name["personality"]) == [
        0, 8, 0x20000, 0x20008, 0xFFFFFFFF]


def test_capability_conditional_groups() -> None:
    admin = default_profile([*DEFAULT_CAPABILITIES, "CAP_SYS_ADMIN"])
    assert {"mount", "unshare", "setns", "clone", "clone3", "bpf"} <= allowed(admin)
    assert not any(e["action"] == "SCMP_ACT_ERRNO" for e in admin["syscalls"])
    ptrace = default_profile(["CAP_SYS_PTRACE"])
    assert {"kcmp", "pidfd_getfd", "process_madvise"} <= allowed(ptrace)
    assert "chroot" not in allowed(ptrace)
    assert "ptrace" not in allowed(default_profile([], kernel=(4, 4)))
    assert "ptrace" in allowed(default_profile([], kernel=(4, 8)))
    s390 = default_profile([], machine="s390x")
    assert [e["args"][0]["index"] for e in s390["syscalls"] if e["names"] == ["clone"]] == [1]
    assert s390["architectures"] == ["SCMP_ARCH_S390X", "SCMP_ARCH_S390"]
    assert "arch_prctl" in allowed(default_profile([], machine="x86_64"))
    assert "arch_prctl" not in allowed(s390)


def test_seccomp_can_be_disabled_or_replaced() -> None:
    assert "seccomp" not in spec(seccomp=False)["linux"]
    custom = {"defaultAction": "SCMP_ACT_ALLOW",
              "syscalls": [{"names": ["keyctl"], "action": "SCMP_ACT_ERRNO"}]}
    out = spec(seccomp=custom)["linux"]["seccomp"]
    assert out == custom and out is not custom
    with pytest.raises(InvalidConfigError):
        spec(seccomp={"defaultAction": "SCMP_ACT_NONSENSE"})
    with pytest.raises(InvalidConfigError):
        spec(seccomp="yes")


# -- user namespaces ------------------------------------------------------------------------


def test_user_namespace_in_the_spec() -> None:
    assert "user" not in [n["type"] for n in spec()["linux"]["namespaces"]]
    userns = UserNamespace(uid_map=(IdMapping(0, 100000, 65536),),
                           gid_map=(IdMapping(0, 200000, 1000), IdMapping(1000, 300000, 1)))
    linux = spec(userns=userns)["linux"]
    assert "user" in [n["type"] for n in linux["namespaces"]]
    assert linux["uidMappings"] == [{"containerID": 0, "hostID": 100000, "size": 65536}]
    assert linux["gidMappings"] == [{"containerID": 0, "hostID": 200000, "size": 1000},
                                    {"containerID": 1000, "hostID": 300000, "size": 1}]
    assert "uidMappings" not in spec()["linux"]


def test_user_namespace_round_trips_through_the_spec_and_proc() -> None:
    userns = UserNamespace(uid_map=(IdMapping(0, 100000, 65536),),
                           gid_map=(IdMapping(1000, 300000, 1), IdMapping(0, 200000, 1000)))
    assert UserNamespace.from_spec(spec(userns=userns)["linux"]) == userns
    assert UserNamespace.from_spec(spec()["linux"]) is None
    assert userns.proc_maps() == ("0 100000 65536\n", "1000 300000 1\n0 200000 1000\n")
    assert userns.host_root() == (100000, 200000)
    assert UserNamespace(uid_map=((1, 5, 1),), gid_map=((0, 5, 1),)).host_root() is None  # type: ignore[arg-type]


def test_user_namespace_accepts_tuples_and_the_edges() -> None:
    ns = UserNamespace(uid_map=((0, 0, 1), (1, 4294967294, 1)),  # type: ignore[arg-type]
                       gid_map=((4294967294, 0, 1),))  # type: ignore[arg-type]
    assert ns.uid_map[1] == IdMapping(1, 4294967294, 1)
    UserNamespace(uid_map=(IdMapping(0, 0, 4294967295),), gid_map=(IdMapping(0, 0, 1),))
    # adjacent ranges touch but do not overlap
    UserNamespace(uid_map=(IdMapping(0, 1000, 10), IdMapping(10, 1010, 10)),
                  gid_map=(IdMapping(0, 0, 1),))


@pytest.mark.parametrize("uid_map", [
    (),                                                   # nothing mapped
    (IdMapping(0, 1000, 0),),                             # empty range
    (IdMapping(0, 4294967295, 1),),                       # host id (uid_t)-1
    (IdMapping(4294967295, 0, 1),),                       # container id (uid_t)-1
    (IdMapping(0, 4294967294, 2),),                       # host range wraps past 2**32-2
    (IdMapping(4294967200, 0, 200),),                     # container range too
    (IdMapping(0, 0, 4294967296),),                       # larger than the id space
    (IdMapping(-1, 0, 1),),                               # negative
    (IdMapping(0, 1000, 10), IdMapping(5, 5000, 10)),     # container ranges overlap
    (IdMapping(0, 1000, 10), IdMapping(100, 1009, 10)),   # host ranges overlap
    (IdMapping(0, 1000, 10), IdMapping(0, 1000, 10)),     # the same twice
    (IdMapping(True, 1000, 10),),                         # a bool is not an id
    ((0, 1000),),                                         # not a triple
    tuple(IdMapping(i, 1000 + i, 1) for i in range(341)),  # more than the kernel takes
])
def test_user_namespace_mappings_are_validated(uid_map: tuple[IdMapping, ...]) -> None:
    with pytest.raises(InvalidConfigError):
        UserNamespace(uid_map=uid_map, gid_map=(IdMapping(0, 0, 1),))
    with pytest.raises(InvalidConfigError):
        UserNamespace(uid_map=(IdMapping(0, 0, 1),), gid_map=uid_map)


# -- uids and gids --------------------------------------------------------------------------


@pytest.mark.parametrize(("user", "parsed"), [
    ("0", (0, None)),
    ("1000:1000", (1000, 1000)),
    ("2147483647", (MAX_ID, None)),
    ("0:2147483647", (0, MAX_ID)),
    ("nobody", ("nobody", None)),
    ("www-data:adm", ("www-data", "adm")),
    ("1000:staff", (1000, "staff")),
    ("007", (7, None)),
])
def test_parse_user(user: str, parsed: tuple[object, object]) -> None:
    assert parse_user(user) == parsed


@pytest.mark.parametrize("user", [
    "2147483648", "4294967295", "4294967296", "18446744073709551616", "9" * 5000,
    "0:2147483648", "0:4294967296", "-1", "0:-1", "", ":", "0:", ":0", "a b", "a/b",
    "root:wheel:extra", "-root", "a\0b",
])
def test_parse_user_refuses_out_of_range_ids_and_bad_names(user: str) -> None:
    with pytest.raises(InvalidConfigError):
        parse_user(user)


def test_check_id() -> None:
    assert check_id(0) == 0 and check_id(MAX_ID) == MAX_ID
    for bad in (-1, MAX_ID + 1, 1 << 32, True, "5", 1.0):
        with pytest.raises(InvalidConfigError):
            check_id(bad)


def test_process_spec_refuses_wrapping_ids() -> None:
    for user in ("2147483648", "4294967296", "0:4294967296"):
        with pytest.raises(InvalidConfigError):
            process_spec(ProcessConfig(command_line="true", user=user))
    p = process_spec(ProcessConfig(command_line="true", user="nobody"))
    assert p["pyhcsUser"] == "nobody"
