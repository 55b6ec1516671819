"""The default seccomp profile, and loading an OCI ``linux.seccomp`` profile into the kernel.

:func:`default_profile` builds the allowlist containerd and moby apply to every container:
a syscall not on the list fails with EPERM. Some entries depend on an argument (personality
values, clone without namespace flags, sockets of any family but AF_VSOCK) and some on a
capability (``mount`` and friends only with CAP_SYS_ADMIN, ``kcmp`` only with
CAP_SYS_PTRACE ...), resolved here against the process's capability set. The result is the
OCI form, so crun and runc apply exactly what the native executor applies.

The native executor loads a profile with libseccomp (``libseccomp.so.2``, through ctypes).
Building the filter costs milliseconds, so :func:`compile_seccomp` does it once in the
parent and returns the BPF program; the child, right before exec, installs it with one
prctl(2) in :func:`load_bpf`. :func:`load_seccomp` does both steps in one call.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import functools
import hashlib
import json
import os
import platform
from collections.abc import Iterable, Mapping
from typing import Any

from .._errors import InvalidConfigError, NotSupportedError

__all__ = ["default_profile", "compile_seccomp", "load_bpf", "load_seccomp"]

# -- the default profile --------------------------------------------------------------------

# Allowed for every container. Names a kernel or an architecture does not have are skipped
# when the filter is built. "socket" is absent: it is allowed below for any family but
# AF_VSOCK, whose host-facing transports have been a steady source of kernel bugs.
_ALLOWED_NAMES = """
    accept accept4 access adjtimex alarm bind brk capget capset chdir chmod chown chown32
    clock_adjtime clock_adjtime64 clock_getres clock_getres_time64 clock_gettime
    clock_gettime64 clock_nanosleep clock_nanosleep_time64 close close_range connect
    copy_file_range creat dup dup2 dup3 epoll_create epoll_create1 epoll_ctl epoll_ctl_old
    epoll_pwait epoll_pwait2 epoll_wait epoll_wait_old eventfd eventfd2 execve execveat exit
    exit_group faccessat faccessat2 fadvise64 fadvise64_64 fallocate fanotify_mark fchdir
    fchmod fchmodat fchmodat2 fchown fchown32 fchownat fcntl fcntl64 fdatasync fgetxattr
    flistxattr flock fork fremovexattr fsetxattr fstat fstat64 fstatat64 fstatfs fstatfs64
    fsync ftruncate ftruncate64 futex futex_requeue futex_time64 futex_wait futex_waitv
    futex_wake futimesat get_robust_list get_thread_area getcpu getcwd getdents getdents64
    getegid getegid32 geteuid geteuid32 getgid getgid32 getgroups getgroups32 getitimer
    getpeername getpgid getpgrp getpid getppid getpriority getrandom getresgid getresgid32
    getresuid getresuid32 getrlimit getrusage getsid getsockname getsockopt gettid
    gettimeofday getuid getuid32 getxattr inotify_add_watch inotify_init inotify_init1
    inotify_rm_watch io_cancel io_destroy io_getevents io_pgetevents io_pgetevents_time64
    io_setup io_submit io_uring_enter io_uring_register io_uring_setup ioctl ioprio_get
    ioprio_set ipc kill landlock_add_rule landlock_create_ruleset landlock_restrict_self
    lchown lchown32 lgetxattr link linkat listen listxattr llistxattr _llseek lremovexattr
    lseek lsetxattr lstat lstat64 madvise map_shadow_stack membarrier memfd_create
    memfd_secret mincore mkdir mkdirat mknod mknodat mlock mlock2 mlockall mmap mmap2
    mprotect mq_getsetattr mq_notify mq_open mq_timedreceive mq_timedreceive_time64
    mq_timedsend mq_timedsend_time64 mq_unlink mremap msgctl msgget msgrcv msgsnd msync
    munlock munlockall munmap nanosleep newfstatat _newselect open openat openat2 pause
    pidfd_open pidfd_send_signal pipe pipe2 poll ppoll ppoll_time64 prctl pread64 preadv
    preadv2 prlimit64 process_mrelease pselect6 pselect6_time64 pwrite64 pwritev pwritev2
    read readahead readlink readlinkat readv recv recvfrom recvmmsg recvmmsg_time64 recvmsg
    remap_file_pages removexattr rename renameat renameat2 restart_syscall rmdir rseq
    rt_sigaction rt_sigpending rt_sigprocmask rt_sigqueueinfo rt_sigreturn rt_sigsuspend
    rt_sigtimedwait rt_sigtimedwait_time64 rt_tgsigqueueinfo sched_get_priority_max
    sched_get_priority_min sched_getaffinity sched_getattr sched_getparam sched_getscheduler
    sched_rr_get_interval sched_rr_get_interval_time64 sched_setaffinity sched_setattr
    sched_setparam sched_setscheduler sched_yield seccomp select semctl semget semop
    semtimedop semtimedop_time64 send sendfile sendfile64 sendmmsg sendmsg sendto
    set_robust_list set_thread_area set_tid_address setfsgid setfsgid32 setfsuid setfsuid32
    setgid setgid32 setgroups setgroups32 setitimer setpgid setpriority setregid setregid32
    setresgid setresgid32 setresuid setresuid32 setreuid setreuid32 setrlimit setsid
    setsockopt setuid setuid32 setxattr shmat shmctl shmdt shmget shutdown sigaltstack
    signalfd signalfd4 sigprocmask sigreturn socketcall socketpair splice stat stat64 statfs
    statfs64 statx symlink symlinkat sync sync_file_range syncfs sysinfo tee tgkill time
    timer_create timer_delete timer_getoverrun timer_gettime timer_gettime64 timer_settime
    timer_settime64 timerfd_create timerfd_gettime timerfd_gettime64 timerfd_settime
    timerfd_settime64 times tkill truncate truncate64 ugetrlimit umask uname unlink unlinkat
    utime utimensat utimensat_time64 utimes vfork vmsplice wait4 waitid waitpid write writev
"""
_ALLOWED = frozenset(_ALLOWED_NAMES.split())

# Since Linux 4.8 seccomp is checked again after a tracer changes a syscall, so ptrace can
# no longer be used to slip past the filter; the kernel's own ptrace access checks (same
# uid, and CAP_SYS_PTRACE over anything more privileged) still apply.
_ALLOWED_SINCE_4_8 = ("process_vm_readv", "process_vm_writev", "ptrace")

# Architecture-specific additions, by platform.machine().
_ARCH_ALLOWED: dict[str, tuple[str, ...]] = {
    "x86_64": ("arch_prctl", "modify_ldt"),
    "i686": ("modify_ldt",),
    "aarch64": ("arm_fadvise64_64", "arm_sync_file_range", "breakpoint", "cacheflush",
                "set_tls", "sync_file_range2"),
    "armv7l": ("arm_fadvise64_64", "arm_sync_file_range", "breakpoint", "cacheflush",
               "set_tls", "sync_file_range2"),
    "ppc64le": ("swapcontext", "sync_file_range2"),
    "s390x": ("s390_pci_mmio_read", "s390_pci_mmio_write", "s390_runtime_instr"),
    "riscv64": ("riscv_flush_icache",),
}

# The seccomp architectures a process of this machine can call the kernel with.
_ARCHITECTURES: dict[str, tuple[str, ...]] = {
    "x86_64": ("SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32"),
    "i686": ("SCMP_ARCH_X86",),
    "aarch64": ("SCMP_ARCH_AARCH64", "SCMP_ARCH_ARM"),
    "armv7l": ("SCMP_ARCH_ARM",),
    "ppc64le": ("SCMP_ARCH_PPC64LE",),
    "s390x": ("SCMP_ARCH_S390X", "SCMP_ARCH_S390"),
    "riscv64": ("SCMP_ARCH_RISCV64",),
}

# Allowed only to a process whose bounding set holds the capability: the kernel would let
# such a process make the call anyway, and without it they are pure attack surface.
_CAP_ALLOWED: dict[str, tuple[str, ...]] = {
    "CAP_DAC_READ_SEARCH": ("open_by_handle_at",),
    "CAP_SYS_ADMIN": (
        "bpf", "clone", "clone3", "fanotify_init", "fsconfig", "fsmount", "fsopen", "fspick",
        "lookup_dcookie", "mount", "mount_setattr", "move_mount", "name_to_handle_at",
        "open_tree", "perf_event_open", "quotactl", "quotactl_fd", "setdomainname",
        "sethostname", "setns", "syslog", "umount", "umount2", "unshare"),
    "CAP_SYS_BOOT": ("reboot",),
    "CAP_SYS_CHROOT": ("chroot",),
    "CAP_SYS_MODULE": ("delete_module", "finit_module", "init_module"),
    "CAP_SYS_PACCT": ("acct",),
    "CAP_SYS_PTRACE": ("kcmp", "pidfd_getfd", "process_madvise", "process_vm_readv",
                       "process_vm_writev", "ptrace"),
    "CAP_SYS_RAWIO": ("ioperm", "iopl"),
    "CAP_SYS_TIME": ("clock_settime", "clock_settime64", "settimeofday", "stime"),
    "CAP_SYS_TTY_CONFIG": ("vhangup",),
    "CAP_SYS_NICE": ("get_mempolicy", "mbind", "set_mempolicy"),
    "CAP_SYSLOG": ("syslog",),
    "CAP_BPF": ("bpf",),
    "CAP_PERFMON": ("perf_event_open",),
}

# personality(2) values a program may set: the Linux default, 32-bit, UNAME26 (a 2.6
# version string for old programs), both, and 0xffffffff, which only queries.
# Anything else (READ_IMPLIES_EXEC, ADDR_NO_RANDOMIZE ...) weakens the process's defences.
_PERSONALITIES = (0x0, 0x8, 0x20000, 0x20008, 0xFFFFFFFF)
AF_VSOCK = 40
# CLONE_NEWNS | NEWUTS | NEWIPC | NEWUSER | NEWPID | NEWNET | NEWCGROUP
_CLONE_NS_FLAGS = 0x7E020000


def _kernel_version() -> tuple[int, int]:
    parts = platform.release().split(".")
    try:
        return int(parts[0]), int("".join(c for c in parts[1] if c.isdigit()) or 0)
    except (IndexError, ValueError):
        return (0, 0)


def default_profile(capabilities: Iterable[str], *, machine: str | None = None,
                    kernel: tuple[int, int] | None = None) -> dict[str, Any]:
    """containerd's and moby's default seccomp profile for a process holding *capabilities*
    (its bounding set), as an OCI ``linux.seccomp`` object.

    Every syscall not allowed fails with EPERM; ``clone3`` fails with ENOSYS without
    CAP_SYS_ADMIN so that C libraries fall back to ``clone``, whose namespace flags the
    filter can see. *machine* (``platform.machine()``) and *kernel* (major, minor) default
    to this host's.
    """
    caps = set(capabilities)
    machine = machine or platform.machine()
    kernel = kernel or _kernel_version()
    allowed = set(_ALLOWED) | set(_ARCH_ALLOWED.get(machine, ()))
    if kernel >= (4, 8):
        allowed.update(_ALLOWED_SINCE_4_8)
    for cap, names in _CAP_ALLOWED.items():
        if cap in caps:
            allowed.update(names)
    syscalls: list[dict[str, Any]] = [
        {"names": sorted(allowed), "action": "SCMP_ACT_ALLOW"},
    ]
    for value in _PERSONALITIES:
        syscalls.append({"names": ["personality"], "action": "SCMP_ACT_ALLOW",
                         "args": [{"index": 0, "value": value, "op": "SCMP_CMP_EQ"}]})
    syscalls.append({"names": ["socket"], "action": "SCMP_ACT_ALLOW",
                     "args": [{"index": 0, "value": AF_VSOCK, "op": "SCMP_CMP_NE"}]})
    if "CAP_SYS_ADMIN" not in caps:
        # s390's clone takes the flags second
        index = 1 if machine.startswith("s390") else 0
        syscalls.append({"names": ["clone"], "action": "SCMP_ACT_ALLOW",
                         "args": [{"index": index, "value": _CLONE_NS_FLAGS, "valueTwo": 0,
                                   "op": "SCMP_CMP_MASKED_EQ"}]})
        syscalls.append({"names": ["clone3"], "action": "SCMP_ACT_ERRNO",
                         "errnoRet": errno.ENOSYS})
    return {
        "defaultAction": "SCMP_ACT_ERRNO",
        "architectures": list(_ARCHITECTURES.get(machine, ())),
        "syscalls": syscalls,
    }


# -- libseccomp -----------------------------------------------------------------------------

_ACT_KILL_PROCESS = 0x80000000
_ACT_KILL_THREAD = 0x00000000
_ACT_TRAP = 0x00030000
_ACT_ERRNO = 0x00050000
_ACT_TRACE = 0x7FF00000
_ACT_LOG = 0x7FFC0000
_ACT_ALLOW = 0x7FFF0000

_OPS = {"SCMP_CMP_NE": 1, "SCMP_CMP_LT": 2, "SCMP_CMP_LE": 3, "SCMP_CMP_EQ": 4,
        "SCMP_CMP_GE": 5, "SCMP_CMP_GT": 6, "SCMP_CMP_MASKED_EQ": 7}

_FLTATR_CTL_NNP = 3
_FLTATR_CTL_OPTIMIZE = 8
_NR_SCMP_ERROR = -1

_PR_SET_SECCOMP = 22
_SECCOMP_MODE_FILTER = 2


class _ArgCmp(ctypes.Structure):
    _fields_ = [("arg", ctypes.c_uint), ("op", ctypes.c_int),
                ("datum_a", ctypes.c_uint64), ("datum_b", ctypes.c_uint64)]


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


@functools.cache
def _lib() -> ctypes.CDLL:
    name = ctypes.util.find_library("seccomp") or "libseccomp.so.2"
    try:
        lib = ctypes.CDLL(name, use_errno=True)
    except OSError as e:
        raise NotSupportedError(
            "Start", message=f"seccomp needs libseccomp ({name}), which is not installed"
        ) from e
    lib.seccomp_init.argtypes = [ctypes.c_uint32]
    lib.seccomp_init.restype = ctypes.c_void_p
    lib.seccomp_release.argtypes = [ctypes.c_void_p]
    lib.seccomp_release.restype = None
    lib.seccomp_arch_resolve_name.argtypes = [ctypes.c_char_p]
    lib.seccomp_arch_resolve_name.restype = ctypes.c_uint32
    lib.seccomp_arch_add.argtypes = [ctypes.c_void_p, ctypes.c_uint32]
    lib.seccomp_attr_set.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_uint32]
    lib.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]
    lib.seccomp_rule_add_array.argtypes = [ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int,
                                           ctypes.c_uint, ctypes.POINTER(_ArgCmp)]
    lib.seccomp_export_bpf.argtypes = [ctypes.c_void_p, ctypes.c_int]
    lib.seccomp_load.argtypes = [ctypes.c_void_p]
    return lib


def _invalid(message: str) -> InvalidConfigError:
    return InvalidConfigError("CreateContainer", message=f"linux.seccomp: {message}")


def _action(name: Any, errno_ret: Any) -> int:
    if name in ("SCMP_ACT_ERRNO", "SCMP_ACT_TRACE"):
        ret = errno.EPERM if errno_ret is None else errno_ret
        if not isinstance(ret, int) or not 0 <= ret <= 0xFFFF:
            raise _invalid(f"errnoRet {errno_ret!r} is not 0..65535")
        return (_ACT_ERRNO if name == "SCMP_ACT_ERRNO" else _ACT_TRACE) | ret
    simple = {"SCMP_ACT_ALLOW": _ACT_ALLOW, "SCMP_ACT_KILL": _ACT_KILL_THREAD,
              "SCMP_ACT_KILL_THREAD": _ACT_KILL_THREAD,
              "SCMP_ACT_KILL_PROCESS": _ACT_KILL_PROCESS, "SCMP_ACT_TRAP": _ACT_TRAP,
              "SCMP_ACT_LOG": _ACT_LOG}
    if name == "SCMP_ACT_NOTIFY":
        raise NotSupportedError("CreateContainer",
                                message="linux.seccomp: SCMP_ACT_NOTIFY is not supported")
    if name not in simple:
        raise _invalid(f"unknown action {name!r}")
    return simple[name]


def _comparisons(args: Any) -> list[list[_ArgCmp]]:
    """The rules one syscall entry becomes: its comparisons are ANDed, except that several
    on the same argument (which libseccomp cannot AND) become separate, ORed rules, as
    runc does."""
    cmps = []
    for a in args or ():
        if not isinstance(a, Mapping):
            raise _invalid(f"argument rule {a!r} is not an object")
        index, op = a.get("index"), a.get("op")
        value, value_two = a.get("value", 0), a.get("valueTwo", 0)
        if not isinstance(index, int) or not 0 <= index <= 5:
            raise _invalid(f"argument index {index!r} is not 0..5")
        if op not in _OPS:
            raise _invalid(f"unknown operator {op!r}")
        for v in (value, value_two):
            if not isinstance(v, int) or not 0 <= v < 1 << 64:
                raise _invalid(f"argument value {v!r} is not a 64-bit unsigned integer")
        cmps.append(_ArgCmp(index, _OPS[op], value, value_two))
    indexes = [c.arg for c in cmps]
    if len(set(indexes)) == len(indexes):
        return [cmps]
    if len(set(indexes)) == 1:
        return [[c] for c in cmps]
    raise _invalid("an entry compares one argument several times and others too")


def _build(profile: Mapping[str, Any]) -> int:
    """A libseccomp filter context for *profile* (the caller releases it)."""
    lib = _lib()
    if not isinstance(profile, Mapping):
        raise _invalid("is not an object")
    default = _action(profile.get("defaultAction"), profile.get("defaultErrnoRet"))
    ctx = lib.seccomp_init(default)
    if not ctx:
        raise _invalid(f"libseccomp refused the default action {profile.get('defaultAction')!r}")
    try:
        # no_new_privs is the runtime's decision (process.noNewPrivileges), not libseccomp's
        _check(lib.seccomp_attr_set(ctx, _FLTATR_CTL_NNP, 0), "seccomp_attr_set")
        # a binary search over syscall numbers instead of a linear scan of ~400 of them
        lib.seccomp_attr_set(ctx, _FLTATR_CTL_OPTIMIZE, 2)
        for arch in profile.get("architectures") or ():
            if not isinstance(arch, str) or not arch.startswith("SCMP_ARCH_"):
                raise _invalid(f"unknown architecture {arch!r}")
            token = lib.seccomp_arch_resolve_name(arch[len("SCMP_ARCH_"):].lower().encode())
            if not token:
                raise _invalid(f"unknown architecture {arch!r}")
            ret = lib.seccomp_arch_add(ctx, token)
            if ret not in (0, -errno.EEXIST):
                _check(ret, f"seccomp_arch_add {arch}")
        for entry in profile.get("syscalls") or ():
            if not isinstance(entry, Mapping):
                raise _invalid(f"syscall entry {entry!r} is not an object")
            action = _action(entry.get("action"), entry.get("errnoRet"))
            rules = _comparisons(entry.get("args"))
            names = entry.get("names") or ([entry["name"]] if entry.get("name") else [])
            if action == default:
                continue  # libseccomp refuses a rule that changes nothing
            for name in names:
                if not isinstance(name, str) or not name:
                    raise _invalid(f"syscall name {name!r} is invalid")
                nr = lib.seccomp_syscall_resolve_name(name.encode())
                if nr == _NR_SCMP_ERROR:
                    continue  # not a syscall of this architecture or libseccomp: as runc
                for cmps in rules:
                    array = (_ArgCmp * len(cmps))(*cmps)
                    _check(lib.seccomp_rule_add_array(ctx, action, nr, len(cmps), array),
                           f"seccomp rule for {name}")
    except BaseException:
        lib.seccomp_release(ctx)
        raise
    return int(ctx)


def _check(ret: int, what: str) -> None:
    if ret < 0:
        raise OSError(-ret, f"{what}: {os.strerror(-ret)}")


def _compile(canonical: str) -> bytes:
    lib = _lib()
    ctx = _build(json.loads(canonical))
    try:
        fd = os.memfd_create("pyhcs-seccomp", os.MFD_CLOEXEC)
        try:
            _check(lib.seccomp_export_bpf(ctx, fd), "seccomp_export_bpf")
            size = os.lseek(fd, 0, os.SEEK_END)
            return os.pread(fd, size, 0)
        finally:
            os.close(fd)
    finally:
        lib.seccomp_release(ctx)


def compile_seccomp(profile: Mapping[str, Any], *,
                    cache_dir: str | os.PathLike[str] | None = None) -> bytes:
    """The BPF program (``struct sock_filter`` array, native byte order) for an OCI
    ``linux.seccomp`` profile, for :func:`load_bpf`.

    Raises :class:`InvalidConfigError` for a malformed profile. Syscall names this
    architecture or libseccomp does not know are skipped, as runc does. Building the default
    profile takes libseccomp tens of milliseconds, so results are cached in memory and, with
    *cache_dir* (a root-only directory such as the run root), on disk under a name that
    hashes the profile and the libseccomp version: the next process gets it for one read.
    """
    canonical = json.dumps(profile, sort_keys=True, separators=(",", ":"))
    key = (canonical, None if cache_dir is None else os.fspath(cache_dir))
    bpf = _memory.get(key)
    if bpf is None:
        bpf = _compile(canonical) if cache_dir is None else _cached(canonical, cache_dir)
        if len(_memory) >= 16:
            _memory.clear()
        _memory[key] = bpf
    return bpf


#: (profile, cache dir) -> program, for this process and its forks
_memory: dict[tuple[str, str | None], bytes] = {}


def _cached(canonical: str, cache_dir: str | os.PathLike[str]) -> bytes:
    key = hashlib.sha256(f"{_version()}\n{canonical}".encode()).hexdigest()
    path = os.path.join(os.fspath(cache_dir), f"seccomp-{key[:32]}.bpf")
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        pass
    else:
        try:
            cached = os.read(fd, 1 << 20)
        finally:
            os.close(fd)
        if cached and len(cached) % 8 == 0:
            return cached
    bpf = _compile(canonical)
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        os.makedirs(cache_dir, mode=0o700, exist_ok=True)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC,
                     0o600)
        try:
            os.write(fd, bpf)
        finally:
            os.close(fd)
        os.replace(tmp, path)  # readers see the whole program or none
    except OSError:
        try:  # the cache only saves time: never fail for it
            os.unlink(tmp)
        except OSError:
            pass
    return bpf


class _Version(ctypes.Structure):
    _fields_ = [("major", ctypes.c_uint), ("minor", ctypes.c_uint), ("micro", ctypes.c_uint)]


@functools.cache
def _version() -> str:
    lib = _lib()
    lib.seccomp_version.restype = ctypes.POINTER(_Version)
    v = lib.seccomp_version().contents
    return f"libseccomp {v.major}.{v.minor}.{v.micro} {platform.machine()}"


def load_bpf(bpf: bytes) -> None:
    """Install a BPF program from :func:`compile_seccomp` on the calling thread.

    The kernel requires no_new_privs or CAP_SYS_ADMIN first. Call it in the forked child
    right before exec: every syscall after it is filtered. Raises ``OSError`` on failure.
    """
    if not bpf or len(bpf) % 8 or len(bpf) // 8 > 0xFFFF:
        raise OSError(errno.EINVAL, "seccomp: not a BPF program")
    buf = ctypes.create_string_buffer(bpf, len(bpf))
    prog = _SockFprog(len(bpf) // 8, ctypes.addressof(buf))
    if _libc.prctl(_PR_SET_SECCOMP, _SECCOMP_MODE_FILTER, ctypes.addressof(prog), 0, 0) < 0:
        e = ctypes.get_errno()
        raise OSError(e, f"seccomp: installing the filter: {os.strerror(e)}")


def load_seccomp(profile: Mapping[str, Any]) -> None:
    """Build an OCI ``linux.seccomp`` profile with libseccomp and install it on the calling
    thread (seccomp_load).

    Same conditions as :func:`load_bpf`, but it costs the whole filter build in the child:
    compiling once in the parent with :func:`compile_seccomp` and calling :func:`load_bpf`
    in the child is the fast path.
    """
    lib = _lib()
    ctx = _build(profile)
    try:
        _check(lib.seccomp_load(ctx), "seccomp_load")
    finally:
        lib.seccomp_release(ctx)


_libc = ctypes.CDLL("libc.so.6", use_errno=True)  # glibc; find_library runs ldconfig
_libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong,
                        ctypes.c_ulong]
