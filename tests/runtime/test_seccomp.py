"""The default seccomp profile on the real kernel: what it blocks, what it lets through.

Each probe runs in a forked child that sets no_new_privs and installs the filter, as the
native executor does right before exec. The child keeps every capability, so an EPERM can
only come from the filter; each blocked probe is also run without the filter, to show that
the kernel alone would not have answered EPERM.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import shutil
import socket
import subprocess
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from pyhcs import InvalidConfigError
from pyhcs import _linux as L
from pyhcs._runtime import _seccomp
from pyhcs._runtime._seccomp import compile_seccomp, default_profile, load_bpf, load_seccomp
from pyhcs._runtime._spec import (
    CAPABILITY_NUMBERS,
    DEFAULT_CAPABILITIES,
    container_spec,
    process_spec,
)
from pyhcs._schema import ContainerConfig, ProcessConfig

_libc = ctypes.CDLL("libc.so.6", use_errno=True)
_libc.syscall.restype = ctypes.c_long

CLONE_NEWUSER = 0x10000000
CLONE_NEWNS = 0x00020000
SIGCHLD = 17
AF_INET, AF_VSOCK, SOCK_STREAM = 2, 40, 1
DEFAULT = default_profile(DEFAULT_CAPABILITIES)


def _nr(name: str) -> int:
    nr = int(_seccomp._lib().seccomp_syscall_resolve_name(name.encode()))
    if nr < 0:
        pytest.skip(f"{name} is not a syscall of this architecture")
    return nr


def sys_call(name: str, *args: int | bytes | None) -> int:
    """Call syscall *name*; its result if it succeeded, else minus its errno."""
    cargs: list[Any] = []
    for a in args:
        if a is None:
            cargs.append(ctypes.c_void_p(None))
        elif isinstance(a, bytes):
            cargs.append(ctypes.c_char_p(a))
        else:
            cargs.append(ctypes.c_long(a))
    ctypes.set_errno(0)
    ret = int(_libc.syscall(ctypes.c_long(_nr(name)), *cargs))
    return ret if ret >= 0 else -ctypes.get_errno()


def in_child(probe: Callable[[], Any], profile: dict[str, Any] | None = DEFAULT,
             loader: str = "bpf", drop_caps: bool = False) -> Any:
    """Run *probe* in a forked child, under *profile* (None: no filter); its result."""
    bpf = compile_seccomp(profile) if profile is not None and loader == "bpf" else b""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(r)
            if drop_caps:  # the native executor's order: bounding set, nnp, capset, filter
                keep = frozenset(CAPABILITY_NUMBERS[c] for c in DEFAULT_CAPABILITIES)
                L.prctl(L.PR_SET_NO_NEW_PRIVS, 1)
                L.capset_drop_to(keep)
            if profile is not None:
                L.prctl(L.PR_SET_NO_NEW_PRIVS, 1)
                if loader == "bpf":
                    load_bpf(bpf)
                else:
                    load_seccomp(profile)
            out = {"result": probe()}
        except BaseException as e:
            out = {"error": repr(e)}
        try:
            os.write(w, json.dumps(out).encode())
        finally:
            os._exit(0)
    os.close(w)
    data = b""
    while chunk := os.read(r, 65536):
        data += chunk
    os.close(r)
    os.waitpid(pid, 0)
    reply = json.loads(data)
    assert "error" not in reply, reply.get("error")
    return reply["result"]


def _clone_newuser() -> int:
    ret = sys_call("clone", CLONE_NEWUSER | SIGCHLD, 0, None, None, 0)
    if ret == 0:
        os._exit(0)  # the control run made a child: it leaves at once
    if ret > 0:
        os.waitpid(ret, 0)
    return ret


def _mount() -> int:
    return sys_call("mount", b"none", b"/nonexistent-pyhcs-seccomp", b"tmpfs", 0, None)


# name -> probe returning the syscall's result (negative errno on failure)
BLOCKED: dict[str, Callable[[], int]] = {
    "unshare(CLONE_NEWUSER)": lambda: sys_call("unshare", CLONE_NEWUSER),
    "unshare(CLONE_NEWNS)": lambda: sys_call("unshare", CLONE_NEWNS),
    "clone(CLONE_NEWUSER)": _clone_newuser,
    "mount": _mount,
    "umount2": lambda: sys_call("umount2", b"/nonexistent-pyhcs-seccomp", 0),
    "setns": lambda: sys_call("setns", -1, 0),
    "keyctl": lambda: sys_call("keyctl", 0, -2, 0),  # KEYCTL_GET_KEYRING_ID, process ring
    "add_key": lambda: sys_call("add_key", None, None, None, 0, 0),
    "request_key": lambda: sys_call("request_key", None, None, None, 0),
    "kexec_load": lambda: sys_call("kexec_load", 0, 0, None, 0),
    "finit_module": lambda: sys_call("finit_module", -1, b"", 0),
    "reboot": lambda: sys_call("reboot", 0, 0, 0, None),  # bad magic: EINVAL without filter
    "bpf": lambda: sys_call("bpf", 0, None, 0),
    "perf_event_open": lambda: sys_call("perf_event_open", None, 0, -1, -1, 0),
    "kcmp": lambda: sys_call("kcmp", os.getpid(), os.getpid(), 0, 0, 0),
    "process_madvise": lambda: sys_call("process_madvise", -1, None, 0, 0, 0),
    "personality(READ_IMPLIES_EXEC)": lambda: sys_call("personality", 0x0400000),
    "personality(ADDR_NO_RANDOMIZE)": lambda: sys_call("personality", 0x0040000),
    "socket(AF_VSOCK)": lambda: sys_call("socket", AF_VSOCK, SOCK_STREAM, 0),
    "userfaultfd": lambda: sys_call("userfaultfd", 0),
    "open_by_handle_at": lambda: sys_call("open_by_handle_at", -1, None, 0),
    "swapoff": lambda: sys_call("swapoff", b"/nonexistent-pyhcs-seccomp"),
}


@pytest.mark.parametrize("loader", ["bpf", "libseccomp"])
@pytest.mark.parametrize("name", sorted(BLOCKED))
def test_blocked_syscalls_fail_with_eperm(name: str, loader: str) -> None:
    probe = BLOCKED[name]
    assert in_child(probe, profile=None) != -errno.EPERM  # the kernel alone would not refuse
    assert in_child(probe, loader=loader) == -errno.EPERM


@pytest.mark.parametrize("loader", ["bpf", "libseccomp"])
def test_clone3_reports_enosys_so_libc_falls_back_to_clone(loader: str) -> None:
    assert in_child(lambda: sys_call("clone3", None, 0), loader=loader) == -errno.ENOSYS


def _allowed_probe() -> dict[str, Any]:
    r, w = os.pipe()
    out: dict[str, Any] = {"write": os.write(w, b"hello"), "read": os.read(r, 5).decode()}
    out["getpid"] = os.getpid() == sys_call("getpid")
    pid = os.fork()  # clone without namespace flags
    if pid == 0:
        os._exit(3)
    out["fork"] = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
    out["personality?"] = sys_call("personality", 0xFFFFFFFF)
    out["personality(0)"] = sys_call("personality", 0)
    s = sys_call("socket", AF_INET, SOCK_STREAM, 0)
    out["socket(AF_INET)"] = s >= 0
    out["socketpair"] = len(socket.socketpair()) == 2
    out["chroot(.)"] = sys_call("chroot", b".")  # CAP_SYS_CHROOT is a default capability
    out["ptrace"] = sys_call("ptrace", 2, 0x7FFFFFFF, 0, 0)  # PEEKDATA on no such pid
    return out


@pytest.mark.parametrize("loader", ["bpf", "libseccomp"])
def test_allowed_syscalls_work(loader: str) -> None:
    out = in_child(_allowed_probe, loader=loader)
    assert out["write"] == 5 and out["read"] == "hello" and out["getpid"]
    assert out["fork"] == 3
    assert out["personality?"] >= 0 and out["personality(0)"] >= 0
    assert out["socket(AF_INET)"] and out["socketpair"]
    assert out["chroot(.)"] == 0
    # allowed since Linux 4.8 as upstream does: the kernel's own check answers (no such pid)
    assert out["ptrace"] == -errno.ESRCH


def test_exec_works_under_the_filter_after_dropping_capabilities() -> None:
    def probe() -> int:
        pid = os.fork()
        if pid == 0:
            os.execv("/bin/sh", ["sh", "-c", "cat /proc/self/status > /dev/null; exit 7"])
        return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])

    assert in_child(probe, drop_caps=True) == 7
    # personality needs no capability: only the filter refuses it once they are gone
    weaken = BLOCKED["personality(READ_IMPLIES_EXEC)"]
    assert in_child(weaken, profile=None, drop_caps=True) >= 0
    assert in_child(weaken, drop_caps=True) == -errno.EPERM
    status = in_child(lambda: Path("/proc/self/status").read_text(), drop_caps=True)
    assert "Seccomp:\t2" in status


def test_capability_groups_follow_the_capability_set() -> None:
    admin = default_profile([*DEFAULT_CAPABILITIES, "CAP_SYS_ADMIN", "CAP_SYS_PTRACE"])
    assert in_child(lambda: sys_call("unshare", CLONE_NEWUSER), profile=admin) == 0
    assert in_child(BLOCKED["kcmp"], profile=admin) == 0
    assert in_child(_mount, profile=admin) == -errno.ENOENT  # the kernel's answer
    no_chroot = default_profile([c for c in DEFAULT_CAPABILITIES if c != "CAP_SYS_CHROOT"])
    assert in_child(lambda: sys_call("chroot", b"."), profile=no_chroot) == -errno.EPERM


def test_ptrace_is_blocked_before_linux_4_8() -> None:
    old = default_profile(DEFAULT_CAPABILITIES, kernel=(4, 4))
    probe = BLOCKED["kcmp"]
    assert in_child(lambda: sys_call("ptrace", 2, 0x7FFFFFFF, 0, 0), profile=old) == -errno.EPERM
    assert in_child(probe, profile=old) == -errno.EPERM


def test_errno_ret_and_default_action_are_honoured() -> None:
    profile = {"defaultAction": "SCMP_ACT_ALLOW",
               "syscalls": [{"names": ["getppid"], "action": "SCMP_ACT_ERRNO",
                             "errnoRet": errno.EADDRNOTAVAIL}]}
    assert in_child(lambda: sys_call("getppid"), profile=profile) == -errno.EADDRNOTAVAIL
    assert in_child(lambda: sys_call("getpid"), profile=profile) > 0


def test_unknown_syscall_names_are_skipped() -> None:
    profile = {"defaultAction": "SCMP_ACT_ERRNO",
               "syscalls": [{"names": ["no_such_syscall_pyhcs", *DEFAULT["syscalls"][0]["names"]],
                             "action": "SCMP_ACT_ALLOW"}]}
    assert in_child(lambda: sys_call("getpid"), profile=profile, loader="libseccomp") > 0


def test_comparisons_on_one_argument_are_alternatives() -> None:
    allow = DEFAULT["syscalls"][0]
    profile = {"defaultAction": "SCMP_ACT_ERRNO", "syscalls": [
        allow,
        {"names": ["personality"], "action": "SCMP_ACT_ALLOW",
         "args": [{"index": 0, "value": 0, "op": "SCMP_CMP_EQ"},
                  {"index": 0, "value": 0xFFFFFFFF, "op": "SCMP_CMP_EQ"}]}]}

    def probe() -> list[int]:
        return [sys_call("personality", v) for v in (0xFFFFFFFF, 0, 0x20000)]

    first, second, third = in_child(probe, profile=profile)
    assert first >= 0 and second >= 0 and third == -errno.EPERM


@pytest.mark.parametrize("profile", [
    {"defaultAction": "SCMP_ACT_BOGUS"},
    {"defaultAction": "SCMP_ACT_ERRNO", "architectures": ["SCMP_ARCH_NOPE"]},
    {"defaultAction": "SCMP_ACT_ERRNO", "architectures": ["x86_64"]},
    {"defaultAction": "SCMP_ACT_ERRNO", "defaultErrnoRet": 70000},
    {"defaultAction": "SCMP_ACT_ERRNO",
     "syscalls": [{"names": ["read"], "action": "SCMP_ACT_ALLOW",
                   "args": [{"index": 6, "value": 0, "op": "SCMP_CMP_EQ"}]}]},
    {"defaultAction": "SCMP_ACT_ERRNO",
     "syscalls": [{"names": ["read"], "action": "SCMP_ACT_ALLOW",
                   "args": [{"index": 0, "value": 0, "op": "SCMP_CMP_ALMOST"}]}]},
    {"defaultAction": "SCMP_ACT_ERRNO",
     "syscalls": [{"names": ["read"], "action": "SCMP_ACT_ALLOW",
                   "args": [{"index": 0, "value": -1, "op": "SCMP_CMP_EQ"}]}]},
    {"defaultAction": "SCMP_ACT_ERRNO",
     "syscalls": [{"names": [""], "action": "SCMP_ACT_ALLOW"}]},
    {"defaultAction": "SCMP_ACT_ERRNO", "syscalls": ["read"]},
])
def test_malformed_profiles_are_refused(profile: dict[str, Any]) -> None:
    with pytest.raises(InvalidConfigError):
        compile_seccomp(profile)


def test_load_bpf_refuses_what_is_not_a_program() -> None:
    def probe() -> str:
        L.prctl(L.PR_SET_NO_NEW_PRIVS, 1)
        try:
            load_bpf(b"123")
        except OSError as e:
            return errno.errorcode[e.errno or 0]
        return "loaded"

    assert in_child(probe, profile=None) == "EINVAL"


def test_compiled_programs_are_cached() -> None:
    assert compile_seccomp(DEFAULT) is compile_seccomp(json.loads(json.dumps(DEFAULT)))
    assert len(compile_seccomp(DEFAULT)) % 8 == 0


# -- the same profile through an installed OCI runtime --------------------------------------


@pytest.mark.skipif(not shutil.which("runc") or not Path("/bin/busybox").exists(),
                    reason="needs runc and busybox-static")
def test_runc_applies_the_generated_profile(tmp_path: Path) -> None:
    rootfs = tmp_path / "rootfs"
    for d in ("bin", "proc", "sys", "dev", "mnt", "tmp"):
        (rootfs / d).mkdir(parents=True)
    shutil.copy("/bin/busybox", rootfs / "bin" / "busybox")
    for applet in ("sh", "unshare", "mount", "grep", "echo"):
        (rootfs / "bin" / applet).symlink_to("busybox")
    spec = container_spec("seccomp", ContainerConfig(), "rootfs")
    spec["process"] = process_spec(ProcessConfig(command_line=(
        "sh -c 'unshare -U true 2>/dev/null; echo unshare=$?; "
        "mount -t tmpfs none /mnt 2>/dev/null; echo mount=$?; grep ^Seccomp: /proc/self/status'"
    )))
    (tmp_path / "config.json").write_text(json.dumps(spec))
    cid = f"pyhcs-seccomp-{uuid.uuid4().hex[:8]}"
    try:
        out = subprocess.run(["runc", "run", cid], cwd=tmp_path, capture_output=True,
                             stdin=subprocess.DEVNULL, timeout=60, check=False)
    finally:
        subprocess.run(["runc", "delete", "-f", cid], capture_output=True, check=False)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.decode().split()
    assert lines == ["unshare=1", "mount=1", "Seccomp:", "2"]


def test_compiled_programs_are_cached_on_disk(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    bpf = compile_seccomp(DEFAULT, cache_dir=cache)
    (path,) = cache.iterdir()
    assert path.read_bytes() == bpf == compile_seccomp(DEFAULT)
    assert path.stat().st_mode & 0o777 == 0o600
    path.write_bytes(b"\0" * 8)
    assert compile_seccomp(DEFAULT, cache_dir=cache) == bpf  # this process remembers it
    _seccomp._memory.clear()  # as a new process: whatever the file holds is what it gets
    assert compile_seccomp(DEFAULT, cache_dir=cache) == b"\0" * 8
    _seccomp._memory.clear()
    path.write_bytes(b"torn")  # not a whole program: rebuilt and rewritten
    assert compile_seccomp(DEFAULT, cache_dir=cache) == bpf == path.read_bytes()
    other = {"defaultAction": "SCMP_ACT_ALLOW", "syscalls": []}
    assert compile_seccomp(other, cache_dir=cache) != bpf
    assert len(list(cache.iterdir())) == 2
