"""ContainerConfig -> OCI runtime spec (config.json), the contract with every executor.

The native executor and installed OCI runtimes (crun, runc) execute the same document, so
what a container gets is decided here, once: namespaces, mounts, resources and the security
defaults containerd applies (capabilities, masked and read-only paths, no_new_privs, the
default seccomp profile), plus an optional user namespace.
"""

from __future__ import annotations

import functools
import glob
import json
import os
import re
import shlex
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .._errors import InvalidConfigError, NotSupportedError
from .._schema import ContainerConfig, ProcessConfig
from ._seccomp import compile_seccomp, default_profile

__all__ = ["DEFAULT_CAPABILITIES", "DEFAULT_PATH", "container_spec", "process_spec",
           "MASKED_PATHS", "NAMESPACES", "READONLY_PATHS", "MAX_ID", "IdMapping",
           "UserNamespace",
           "check_id", "parse_user"]

OCI_VERSION = "1.0.2"
#: The spec annotation naming the sandbox's block device ("major:minor").
SANDBOX_DEVICE_ANNOTATION = "io.pyhcs.sandbox-device"
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
#: Every container's namespaces (a user namespace is added when one is asked for).
NAMESPACES = ("pid", "network", "ipc", "uts", "mount", "cgroup")

# containerd's default capability set (oci.DefaultSpec / defaultUnixCaps).
DEFAULT_CAPABILITIES = [
    "CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_FSETID", "CAP_FOWNER", "CAP_MKNOD", "CAP_NET_RAW",
    "CAP_SETGID", "CAP_SETUID", "CAP_SETFCAP", "CAP_SETPCAP", "CAP_NET_BIND_SERVICE",
    "CAP_SYS_CHROOT", "CAP_KILL", "CAP_AUDIT_WRITE",
]
CAPABILITY_NUMBERS = {
    "CAP_CHOWN": 0, "CAP_DAC_OVERRIDE": 1, "CAP_DAC_READ_SEARCH": 2, "CAP_FOWNER": 3,
    "CAP_FSETID": 4, "CAP_KILL": 5, "CAP_SETGID": 6, "CAP_SETUID": 7, "CAP_SETPCAP": 8,
    "CAP_LINUX_IMMUTABLE": 9, "CAP_NET_BIND_SERVICE": 10, "CAP_NET_BROADCAST": 11,
    "CAP_NET_ADMIN": 12, "CAP_NET_RAW": 13, "CAP_IPC_LOCK": 14, "CAP_IPC_OWNER": 15,
    "CAP_SYS_MODULE": 16, "CAP_SYS_RAWIO": 17, "CAP_SYS_CHROOT": 18, "CAP_SYS_PTRACE": 19,
    "CAP_SYS_PACCT": 20, "CAP_SYS_ADMIN": 21, "CAP_SYS_BOOT": 22, "CAP_SYS_NICE": 23,
    "CAP_SYS_RESOURCE": 24, "CAP_SYS_TIME": 25, "CAP_SYS_TTY_CONFIG": 26, "CAP_MKNOD": 27,
    "CAP_LEASE": 28, "CAP_AUDIT_WRITE": 29, "CAP_AUDIT_CONTROL": 30, "CAP_SETFCAP": 31,
    "CAP_MAC_OVERRIDE": 32, "CAP_MAC_ADMIN": 33, "CAP_SYSLOG": 34, "CAP_WAKE_ALARM": 35,
    "CAP_BLOCK_SUSPEND": 36, "CAP_AUDIT_READ": 37, "CAP_PERFMON": 38, "CAP_BPF": 39,
    "CAP_CHECKPOINT_RESTORE": 40,
}

# containerd's masked paths, plus /proc/interrupts as moby masks it now (per-CPU interrupt
# counts let a container watch the host's activity). _masked_paths() adds the per-CPU
# thermal_throttle directories of this host, a power side channel, as moby does.
MASKED_PATHS = [
    "/proc/acpi", "/proc/asound", "/proc/interrupts", "/proc/kcore", "/proc/keys",
    "/proc/latency_stats", "/proc/timer_list", "/proc/timer_stats", "/proc/sched_debug",
    "/proc/scsi", "/sys/firmware", "/sys/devices/virtual/powercap",
]
READONLY_PATHS = [
    "/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger",
]

_MiB = 1024 * 1024


def _mounts(config: ContainerConfig) -> list[dict[str, Any]]:
    mounts: list[dict[str, Any]] = [
        {"destination": "/proc", "type": "proc", "source": "proc",
         "options": ["nosuid", "noexec", "nodev"]},
        {"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
         "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
        {"destination": "/dev/pts", "type": "devpts", "source": "devpts",
         "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620", "gid=5"]},
        {"destination": "/dev/shm", "type": "tmpfs", "source": "shm",
         "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]},
        {"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue",
         "options": ["nosuid", "noexec", "nodev"]},
        {"destination": "/sys", "type": "sysfs", "source": "sysfs",
         "options": ["nosuid", "noexec", "nodev", "ro"]},
        # the container's own cgroups, read-only (as containerd's and runc's default specs)
        {"destination": "/sys/fs/cgroup", "type": "cgroup", "source": "cgroup",
         "options": ["nosuid", "noexec", "nodev", "relatime", "ro"]},
    ]
    for md in config.mapped_directories:
        if not md.host_path or not md.container_path:
            raise InvalidConfigError("CreateContainer",
                                     message="MappedDirectories needs HostPath and ContainerPath")
        if not os.path.isabs(md.container_path):
            raise InvalidConfigError(
                "CreateContainer",
                message=f"MappedDirectories ContainerPath {md.container_path!r} is not absolute")
        if md.iops_maximum or md.bandwidth_maximum:
            raise NotSupportedError(
                "CreateContainer",
                message="MappedDirectories IOPSMaximum/BandwidthMaximum are not supported yet")
        opts = ["rbind", "rprivate", "ro" if md.read_only else "rw"]
        mounts.append({"destination": md.container_path, "type": "bind",
                       "source": os.path.abspath(md.host_path), "options": opts})
    return mounts


def _resources(config: ContainerConfig,
               block_device: tuple[int, int] | None = None) -> dict[str, Any]:
    """The OCI ``linux.resources`` of *config*.

    *block_device* (major, minor) is the device that holds the container's sandbox: the
    storage IOPS and bandwidth maxima throttle it, each for reads and for writes separately
    (Linux has no combined read+write throttle). Without it those fields raise
    NotSupportedError rather than go unenforced.
    """
    res: dict[str, Any] = {}
    if config.memory_maximum_in_mb < 0:
        raise InvalidConfigError("CreateContainer", message="MemoryMaximumInMB is negative")
    if config.memory_maximum_in_mb:
        res["memory"] = {"limit": config.memory_maximum_in_mb * _MiB,
                         "swap": config.memory_maximum_in_mb * _MiB}
    cpu: dict[str, Any] = {}
    ncpu = os.cpu_count() or 1
    if config.processor_count:
        # the processors this process may run on: offline or fenced-off ones cannot be given
        usable = sorted(os.sched_getaffinity(0))
        if config.processor_count > len(usable):
            raise InvalidConfigError(
                "CreateContainer",
                message=f"ProcessorCount {config.processor_count} exceeds the "
                        f"{len(usable)} usable processors")
        cpu["cpus"] = ",".join(str(c) for c in usable[:config.processor_count])
    if config.processor_weight:
        if config.processor_weight > 10000:
            raise InvalidConfigError("CreateContainer", message="ProcessorWeight is 0..10000")
        # weight 5000 (HCS's middle) is the kernel's default 1024 shares.
        cpu["shares"] = max(2, min(262144, config.processor_weight * 1024 // 5000))
    if config.processor_maximum:
        if not 1 <= config.processor_maximum <= 100:
            raise InvalidConfigError("CreateContainer", message="ProcessorMaximum is 1..100")
        cpu["period"] = 100_000
        cpu["quota"] = ncpu * 100_000 * config.processor_maximum // 100
    if cpu:
        res["cpu"] = cpu
    throttle: dict[str, list[dict[str, int]]] = {}
    for name, value, keys in (
            ("StorageIOPSMaximum", config.storage_iops_maximum,
             ("throttleReadIOPSDevice", "throttleWriteIOPSDevice")),
            ("StorageBandwidthMaximum", config.storage_bandwidth_maximum,
             ("throttleReadBpsDevice", "throttleWriteBpsDevice"))):
        if not value:
            continue
        if block_device is None:
            raise NotSupportedError(
                "CreateContainer",
                message=f"{name}: the sandbox is on no block device that can be throttled")
        for key in keys:
            throttle[key] = [{"major": block_device[0], "minor": block_device[1],
                              "rate": value}]
    if throttle:
        res["blockIO"] = throttle
    return res


#: ContainerConfig fields refused when set: (attribute, why), the message naming the field
_REFUSED_FIELDS = (
    ("hv_partition", "HvPartition: VM-isolated containers are not supported yet on Linux"),
    ("hv_runtime", "HvRuntime: VM-isolated containers are not supported yet on Linux"),
    # hcsshim's callers set it for a Hyper-V container's utility VM only
    ("sandbox_path", "SandboxPath: it belongs to VM-isolated containers, not supported yet"),
    ("credentials", "Credentials: Windows credential specs (gMSA) have no Linux equivalent"),
    ("servicing", "Servicing: Windows servicing containers have no Linux equivalent"),
    ("is_dummy", "IsDummy: dummy containers are not supported"),
)


def _check_windows_fields(config: ContainerConfig, rootfs: str) -> None:
    """Refuse, naming the field, what hcsshim hands to Windows and Linux cannot do; the
    fields accepted without effect are listed in the README (ContainerConfig on Linux)."""
    op = "CreateContainer"
    for name, why in _REFUSED_FIELDS:
        if getattr(config, name) not in (None, False, ""):
            raise NotSupportedError(op, message=why)
    if config.volume_path and (
            not config.layer_folder_path
            or os.path.realpath(config.volume_path) != os.path.realpath(rootfs)):
        # hcsshim's callers pass the mounted sandbox (GetLayerMountPath of LayerFolderPath);
        # the root is always that mount here, so any other path would be silently unused
        raise InvalidConfigError(
            op, message=f"VolumePath {config.volume_path!r} is not the mount path of "
            "LayerFolderPath (pyhcs.get_layer_mount_path)")


def container_spec(container_id: str, config: ContainerConfig, rootfs: str, *,
                   seccomp: bool | Mapping[str, Any] = True,
                   userns: UserNamespace | None = None,
                   block_device: tuple[int, int] | None = None) -> dict[str, Any]:
    """The OCI runtime spec of a container, without its process (see :func:`process_spec`).

    Fields pyhcs cannot honour yet raise :class:`NotSupportedError` naming the field, so a
    limit is never silently dropped.

    *seccomp* is the container's syscall filter (``linux.seccomp``): ``True`` (the default)
    applies containerd's default profile for the default capability set, ``False`` applies
    none, and a mapping is used as the OCI profile itself. hcsshim's ContainerConfig has no
    such field, so this is an argument of pyhcs's own. *userns* puts the container in a new
    user namespace with the given id mappings. *block_device* (major, minor) holds the
    container's sandbox: StorageIOPSMaximum and StorageBandwidthMaximum throttle it, and
    its I/O is what the storage statistics count (annotation ``io.pyhcs.sandbox-device``).
    ``StorageSandboxSize`` is the sandbox layer's business, not the spec's.
    """
    _check_windows_fields(config, rootfs)
    annotations = {"io.pyhcs.owner": config.owner, "io.pyhcs.name": config.name}
    if block_device is not None:
        annotations[SANDBOX_DEVICE_ANNOTATION] = f"{block_device[0]}:{block_device[1]}"
    hostname = config.host_name or container_id[:12]
    if len(hostname) > 64:
        raise InvalidConfigError("CreateContainer", message="HostName is longer than 64 bytes")
    return {
        "ociVersion": OCI_VERSION,
        "root": {"path": rootfs, "readonly": False},
        "hostname": hostname,
        "mounts": _mounts(config),
        "linux": {
            "namespaces": [{"type": t} for t in NAMESPACES]
                          + ([{"type": "user"}] if userns is not None else []),
            "resources": _resources(config, block_device),
            "maskedPaths": _masked_paths(),
            "readonlyPaths": list(READONLY_PATHS),
            "rootfsPropagation": "rslave",
            **_security(seccomp, userns),
        },
        "annotations": annotations,
    }


def parse_command_line(command_line: str) -> list[str]:
    """Split a CommandLine into argv the way a POSIX shell splits words (quotes, escapes).

    No expansion happens: ``$HOME`` and globs reach the program unchanged.
    """
    try:
        return shlex.split(command_line, posix=True)
    except ValueError as e:
        raise InvalidConfigError("CreateProcess", message=f"CommandLine: {e}") from e


def process_spec(pc: ProcessConfig, *, default_env: dict[str, str] | None = None,
                 default_cwd: str = "/") -> dict[str, Any]:
    """The OCI ``process`` object for a ProcessConfig."""
    argv = parse_command_line(pc.command_line)
    if pc.application_name and not argv:
        argv = [pc.application_name]
    if not argv:
        raise InvalidConfigError("CreateProcess", message="CommandLine is empty")
    env = dict(default_env or {})
    env.update(pc.environment)
    env.setdefault("PATH", DEFAULT_PATH)
    for k in env:
        if not k or "=" in k or "\0" in k:
            raise InvalidConfigError("CreateProcess", message=f"Environment name {k!r} is invalid")
    cwd = pc.working_directory or default_cwd
    if not cwd.startswith("/"):
        raise InvalidConfigError("CreateProcess",
                                 message=f"WorkingDirectory {cwd!r} is not absolute")
    caps = list(DEFAULT_CAPABILITIES)
    spec: dict[str, Any] = {
        "terminal": pc.emulate_console,
        "args": argv,
        "env": [f"{k}={v}" for k, v in env.items()],
        "cwd": cwd,
        "user": {"uid": 0, "gid": 0},
        "capabilities": {"bounding": caps, "effective": caps, "permitted": caps},
        "noNewPrivileges": True,
    }
    if pc.application_name:
        spec["pyhcsExecutable"] = pc.application_name
    if pc.emulate_console and any(pc.console_size):
        spec["consoleSize"] = {"height": pc.console_size[0], "width": pc.console_size[1]}
    if pc.user:
        parse_user(pc.user)  # numeric ids are checked now; names resolve against the image
        spec["pyhcsUser"] = pc.user  # resolved against the image's /etc/passwd at spawn
    return spec


# -- security: masked paths, seccomp, user namespaces ---------------------------------------

_THERMAL_THROTTLE = "/sys/devices/system/cpu/cpu[0-9]*/thermal_throttle"


def _masked_paths() -> list[str]:
    return list(MASKED_PATHS) + list(_host_masked_paths())


@functools.cache
def _host_masked_paths() -> tuple[str, ...]:
    # the host's processors do not change while we run: looked up once per process
    return tuple(sorted(glob.glob(_THERMAL_THROTTLE)))


def _security(seccomp: bool | Mapping[str, Any],
              userns: UserNamespace | None) -> dict[str, Any]:
    """The ``linux.seccomp`` and ``linux.uidMappings/gidMappings`` entries of a spec."""
    out: dict[str, Any] = {}
    if seccomp is True:
        out["seccomp"] = default_profile(DEFAULT_CAPABILITIES)
    elif isinstance(seccomp, Mapping):
        try:
            profile = json.loads(json.dumps(seccomp))  # a detached, JSON-clean copy
        except (TypeError, ValueError) as e:
            raise InvalidConfigError("CreateContainer",
                                     message=f"linux.seccomp is not JSON: {e}") from e
        compile_seccomp(profile)  # a malformed profile fails here, not when it starts
        out["seccomp"] = profile
    elif seccomp is not False:
        raise InvalidConfigError("CreateContainer",
                                 message="seccomp is True, False or an OCI profile")
    if userns is not None:
        out["uidMappings"] = [m.to_oci() for m in userns.uid_map]
        out["gidMappings"] = [m.to_oci() for m in userns.gid_map]
    return out


#: The largest uid or gid a process may be given. Like runc, ids at or past 2**31 are
#: refused rather than wrapped: 2**32 - 1 is (uid_t)-1, "no change", to the kernel, and
#: larger values would silently wrap to small ones (2**32 is root).
MAX_ID = (1 << 31) - 1
_ID_LIMIT = (1 << 32) - 2  # the largest id a user namespace mapping may cover
_MAX_EXTENTS = 340  # lines the kernel accepts in uid_map / gid_map
_NUMERIC = re.compile(r"[0-9]+")
_NAME = re.compile(r"[^\s:/,\-\x00-\x1f\x7f][^\s:/,\x00-\x1f\x7f]{0,255}")


def check_id(value: object, what: str = "uid", operation: str = "CreateProcess") -> int:
    """*value* as a uid/gid, or :class:`InvalidConfigError` unless it is an int in
    0..:data:`MAX_ID` (never wrapped or truncated)."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_ID:
        raise InvalidConfigError(operation, message=f"{what} {value!r} is not 0..{MAX_ID}")
    return value


def _user_part(text: str, what: str, operation: str) -> int | str:
    if _NUMERIC.fullmatch(text):
        if len(text) > 10:  # also keeps int() away from absurdly long digit strings
            raise InvalidConfigError(operation, message=f"{what} {text} is not 0..{MAX_ID}")
        return check_id(int(text), what, operation)
    if not _NAME.fullmatch(text):
        raise InvalidConfigError(operation, message=f"{what} name {text!r} is invalid")
    return text


def parse_user(user: str, operation: str = "CreateProcess") -> tuple[int | str, int | str | None]:
    """Split ProcessConfig.User (``user``, ``uid``, ``user:group``, ``uid:gid`` ...) into
    (uid or user name, gid or group name or None).

    Numeric ids are checked here (:func:`check_id`): 2**31 and 2**32 are refused with
    :class:`InvalidConfigError`, never wrapped. Names are only checked for form; they are
    resolved later against the image's /etc/passwd and /etc/group.
    """
    name, sep, group = user.partition(":")
    uid = _user_part(name, "uid", operation)
    if not sep:
        return uid, None
    return uid, _user_part(group, "gid", operation)


@dataclass(frozen=True)
class IdMapping:
    """``size`` consecutive ids from ``container_id`` inside the container map to ``host_id``
    onward on the host (one line of /proc/<pid>/uid_map)."""

    container_id: int
    host_id: int
    size: int

    def to_oci(self) -> dict[str, int]:
        """The OCI ``linux.uidMappings`` / ``gidMappings`` entry."""
        return {"containerID": self.container_id, "hostID": self.host_id, "size": self.size}


def _mappings(kind: str, maps: Sequence[object]) -> tuple[IdMapping, ...]:
    def bad(message: str) -> InvalidConfigError:
        return InvalidConfigError("CreateContainer", message=f"user namespace {kind}: {message}")

    if not isinstance(maps, tuple | list):
        raise bad(f"{maps!r} is not a sequence of mappings")
    out: list[IdMapping] = []
    for item in maps:
        if isinstance(item, IdMapping):
            m = item
        elif isinstance(item, tuple | list) and len(item) == 3:
            m = IdMapping(*item)
        else:
            raise bad(f"{item!r} is not (container_id, host_id, size)")
        for v in (m.container_id, m.host_id, m.size):
            if isinstance(v, bool) or not isinstance(v, int):
                raise bad(f"{m} holds a value that is not an integer")
        if m.size < 1:
            raise bad(f"{m} is empty")
        for start in (m.container_id, m.host_id):
            # the whole range within 0..2**32-2: no wrap past (uid_t)-1
            if not 0 <= start <= _ID_LIMIT or start + m.size - 1 > _ID_LIMIT:
                raise bad(f"{m} leaves the ids 0..{_ID_LIMIT}")
        for prev in out:
            for a, b in ((m.container_id, prev.container_id), (m.host_id, prev.host_id)):
                if a < b + prev.size and b < a + m.size:
                    raise bad(f"{m} overlaps {prev}")
        out.append(m)
    if not out:
        raise bad("no mapping given")
    if len(out) > _MAX_EXTENTS:
        raise bad(f"more than {_MAX_EXTENTS} mappings")
    return tuple(out)


@dataclass(frozen=True)
class UserNamespace:
    """Run the container in a new user namespace with these uid and gid mappings.

    Each map is a tuple of :class:`IdMapping` (``(container_id, host_id, size)`` tuples
    are converted). Ranges must be non-empty, lie within 0..2**32-2 on both sides, and not
    overlap one another on either side; otherwise :class:`InvalidConfigError`.
    """

    uid_map: tuple[IdMapping, ...] = field(default=())
    gid_map: tuple[IdMapping, ...] = field(default=())

    def __post_init__(self) -> None:
        object.__setattr__(self, "uid_map", _mappings("uid_map", self.uid_map))
        object.__setattr__(self, "gid_map", _mappings("gid_map", self.gid_map))

    def proc_maps(self) -> tuple[str, str]:
        """The contents to write to ``/proc/<pid>/uid_map`` and ``gid_map``."""
        def text(maps: tuple[IdMapping, ...]) -> str:
            return "".join(f"{m.container_id} {m.host_id} {m.size}\n" for m in maps)

        return text(self.uid_map), text(self.gid_map)

    def host_root(self) -> tuple[int, int] | None:
        """The host uid and gid of the container's root (uid and gid 0), or None if
        either is not mapped."""
        uid = next((m.host_id for m in self.uid_map if m.container_id == 0), None)
        gid = next((m.host_id for m in self.gid_map if m.container_id == 0), None)
        return None if uid is None or gid is None else (uid, gid)

    @classmethod
    def from_spec(cls, linux: Mapping[str, Any]) -> UserNamespace | None:
        """The user namespace of an OCI spec's ``linux`` object, or None if it has none."""
        if not any(ns.get("type") == "user" for ns in linux.get("namespaces", [])):
            return None
        return cls(*(tuple(IdMapping(m["containerID"], m["hostID"], m["size"])
                           for m in linux.get(key, []))
                     for key in ("uidMappings", "gidMappings")))
