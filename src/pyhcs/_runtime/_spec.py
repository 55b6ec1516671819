"""ContainerConfig -> OCI runtime spec (config.json), the contract with every executor.

The native executor and installed OCI runtimes (crun, runc) execute the same document, so
what a container gets is decided here, once: namespaces, mounts, resources and the security
defaults containerd applies (capabilities, masked and read-only paths, no_new_privs).
"""

from __future__ import annotations

import os
import shlex
from typing import Any

from .._errors import InvalidConfigError, NotSupportedError
from .._schema import ContainerConfig, ProcessConfig

__all__ = ["DEFAULT_CAPABILITIES", "DEFAULT_PATH", "container_spec", "process_spec",
           "MASKED_PATHS", "READONLY_PATHS"]

OCI_VERSION = "1.0.2"
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

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
}

# containerd's masked and read-only paths.
MASKED_PATHS = [
    "/proc/acpi", "/proc/asound", "/proc/kcore", "/proc/keys", "/proc/latency_stats",
    "/proc/timer_list", "/proc/timer_stats", "/proc/sched_debug", "/proc/scsi",
    "/sys/firmware", "/sys/devices/virtual/powercap",
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


def _resources(config: ContainerConfig) -> dict[str, Any]:
    res: dict[str, Any] = {}
    if config.memory_maximum_in_mb < 0:
        raise InvalidConfigError("CreateContainer", message="MemoryMaximumInMB is negative")
    if config.memory_maximum_in_mb:
        res["memory"] = {"limit": config.memory_maximum_in_mb * _MiB,
                         "swap": config.memory_maximum_in_mb * _MiB}
    cpu: dict[str, Any] = {}
    ncpu = os.cpu_count() or 1
    if config.processor_count:
        if config.processor_count > ncpu:
            raise InvalidConfigError(
                "CreateContainer",
                message=f"ProcessorCount {config.processor_count} exceeds the {ncpu} processors")
        cpu["cpus"] = f"0-{config.processor_count - 1}"
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
    return res


def container_spec(container_id: str, config: ContainerConfig, rootfs: str) -> dict[str, Any]:
    """The OCI runtime spec of a container, without its process (see :func:`process_spec`).

    Fields pyhcs cannot honour yet raise :class:`NotSupportedError` naming the field, so a
    limit is never silently dropped.
    """
    if config.hv_partition or config.hv_runtime is not None:
        raise NotSupportedError(
            "CreateContainer",
            message="HvPartition: VM-isolated containers are not supported yet on Linux")
    for name, value in (("StorageIOPSMaximum", config.storage_iops_maximum),
                        ("StorageBandwidthMaximum", config.storage_bandwidth_maximum),
                        ("StorageSandboxSize", config.storage_sandbox_size)):
        if value:
            raise NotSupportedError("CreateContainer", message=f"{name} is not supported yet")
    if config.endpoint_list:
        raise NotSupportedError(
            "CreateContainer", message="EndpointList: the network service is not built yet")
    hostname = config.host_name or container_id[:12]
    if len(hostname) > 64:
        raise InvalidConfigError("CreateContainer", message="HostName is longer than 64 bytes")
    return {
        "ociVersion": OCI_VERSION,
        "root": {"path": rootfs, "readonly": False},
        "hostname": hostname,
        "mounts": _mounts(config),
        "linux": {
            "namespaces": [{"type": t} for t in
                           ("pid", "network", "ipc", "uts", "mount", "cgroup")],
            "resources": _resources(config),
            "maskedPaths": list(MASKED_PATHS),
            "readonlyPaths": list(READONLY_PATHS),
            "rootfsPropagation": "rslave",
        },
        "annotations": {"io.pyhcs.owner": config.owner, "io.pyhcs.name": config.name},
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
        spec["pyhcsUser"] = pc.user  # resolved against the image's /etc/passwd at spawn
    return spec
