"""Compute-system documents: container and process configuration, properties and queries.

Fields that only mean something to Windows (volume paths, Hyper-V settings, credentials,
servicing) are kept so that hcsshim documents load and re-encode unchanged; whether pyhcs
honours one is decided where the document is acted on, not here.
"""

import msgspec

from pyhcs._schema._codec import Document, Int64, UInt, UInt32, UInt64
from pyhcs._schema._stats import ProcessListItem, Statistics

__all__ = [
    "ComputeSystemQuery",
    "ContainerConfig",
    "ContainerProperties",
    "HvRuntime",
    "Layer",
    "MappedDir",
    "ProcessConfig",
]

_LAYER_NAMES = {
    "id": "ID",
    "path": "Path",
}


class Layer(Document, rename=_LAYER_NAMES):
    """One storage layer of a container: the layer's GUID and the folder it is stored in."""

    id: str = ""
    path: str = ""


_MAPPED_DIR_NAMES = {
    "host_path": "HostPath",
    "container_path": "ContainerPath",
    "read_only": "ReadOnly",
    "bandwidth_maximum": "BandwidthMaximum",
    "iops_maximum": "IOPSMaximum",
}


class MappedDir(Document, rename=_MAPPED_DIR_NAMES):
    """A host directory mapped into a container (a volume or bind mount), with I/O limits."""

    host_path: str = ""
    container_path: str = ""
    read_only: bool = False
    bandwidth_maximum: UInt64 = 0
    iops_maximum: UInt64 = 0


_HV_RUNTIME_NAMES = {
    "image_path": "ImagePath",
    "skip_template": "SkipTemplate",
}


class HvRuntime(Document, rename=_HV_RUNTIME_NAMES):
    """Hyper-V container settings: the utility VM image path and whether to skip templating."""

    image_path: str = ""
    skip_template: bool = False


_CONTAINER_CONFIG_NAMES = {
    "system_type": "SystemType",
    "name": "Name",
    "owner": "Owner",
    "is_dummy": "IsDummy",
    "volume_path": "VolumePath",
    "ignore_flushes_during_boot": "IgnoreFlushesDuringBoot",
    "layer_folder_path": "LayerFolderPath",
    "layers": "Layers",
    "credentials": "Credentials",
    "processor_count": "ProcessorCount",
    "processor_weight": "ProcessorWeight",
    "processor_maximum": "ProcessorMaximum",
    "storage_iops_maximum": "StorageIOPSMaximum",
    "storage_bandwidth_maximum": "StorageBandwidthMaximum",
    "storage_sandbox_size": "StorageSandboxSize",
    "memory_maximum_in_mb": "MemoryMaximumInMB",
    "host_name": "HostName",
    "mapped_directories": "MappedDirectories",
    "sandbox_path": "SandboxPath",
    "hv_partition": "HvPartition",
    "endpoint_list": "EndpointList",
    "hv_runtime": "HvRuntime",
    "servicing": "Servicing",
    "allow_unqualified_dns_query": "AllowUnqualifiedDNSQuery",
}


class ContainerConfig(Document, rename=_CONTAINER_CONFIG_NAMES):
    """The configuration a container is created from (``CreateContainer``'s document).

    Units as in hcsshim: ``processor_weight`` is CPU shares 0..10000 (0: the default),
    ``processor_maximum`` a percentage 1..100, ``memory_maximum_in_mb`` megabytes,
    ``storage_bandwidth_maximum`` bytes per second, ``storage_sandbox_size`` bytes.
    ``hv_runtime`` is ``None`` unless the container is a Hyper-V one.

    On Linux, ``ignore_flushes_during_boot`` and ``allow_unqualified_dns_query`` are
    accepted without effect; ``hv_partition``, ``hv_runtime``, ``sandbox_path``,
    ``credentials``, ``servicing`` and ``is_dummy`` are refused when set (the README's
    field-by-field list says why).
    """

    system_type: str = "Container"
    name: str = ""
    owner: str = ""
    is_dummy: bool = False
    volume_path: str = ""
    ignore_flushes_during_boot: bool = False
    layer_folder_path: str = ""
    layers: list[Layer] = msgspec.field(default_factory=list)
    credentials: str = ""
    processor_count: UInt32 = 0
    processor_weight: UInt64 = 0
    processor_maximum: Int64 = 0
    storage_iops_maximum: UInt64 = 0
    storage_bandwidth_maximum: UInt64 = 0
    storage_sandbox_size: UInt64 = 0
    memory_maximum_in_mb: Int64 = 0
    host_name: str = ""
    mapped_directories: list[MappedDir] = msgspec.field(default_factory=list)
    sandbox_path: str = ""
    hv_partition: bool = False
    endpoint_list: list[str] = msgspec.field(default_factory=list)
    hv_runtime: HvRuntime | None = None
    servicing: bool = False
    allow_unqualified_dns_query: bool = False


_PROCESS_CONFIG_NAMES = {
    "application_name": "ApplicationName",
    "command_line": "CommandLine",
    "user": "User",
    "working_directory": "WorkingDirectory",
    "environment": "Environment",
    "emulate_console": "EmulateConsole",
    "create_std_in_pipe": "CreateStdInPipe",
    "create_std_out_pipe": "CreateStdOutPipe",
    "create_std_err_pipe": "CreateStdErrPipe",
    "console_size": "ConsoleSize",
}


class ProcessConfig(Document, rename=_PROCESS_CONFIG_NAMES):
    """How to start a process in a container (``Container.CreateProcess``'s document).

    ``command_line`` is one string, as on Windows; ``emulate_console`` asks for a
    pseudo-terminal; ``console_size`` is Go's ``[2]uint`` (Docker fills it as
    ``[height, width]``).
    """

    application_name: str = ""
    command_line: str = ""
    user: str = ""
    working_directory: str = ""
    environment: dict[str, str] = msgspec.field(default_factory=dict)
    emulate_console: bool = False
    create_std_in_pipe: bool = False
    create_std_out_pipe: bool = False
    create_std_err_pipe: bool = False
    console_size: tuple[UInt, UInt] = (0, 0)


_CONTAINER_PROPERTIES_NAMES = {
    "id": "Id",
    "name": "Name",
    "system_type": "SystemType",
    "owner": "Owner",
    "silo_guid": "SiloGuid",
    "is_dummy": "IsDummy",
    "runtime_id": "RuntimeId",
    "is_runtime_template": "IsRuntimeTemplate",
    "runtime_image_path": "RuntimeImagePath",
    "stopped": "Stopped",
    "exit_type": "ExitType",
    "are_updates_pending": "AreUpdatesPending",
    "ob_root": "ObRoot",
    "statistics": "Statistics",
    "process_list": "ProcessList",
}


class ContainerProperties(Document, rename=_CONTAINER_PROPERTIES_NAMES):
    """What ``GetContainers`` reports about one compute system."""

    id: str = ""
    name: str = ""
    system_type: str = ""
    owner: str = ""
    silo_guid: str = ""
    is_dummy: bool = False
    runtime_id: str = ""
    is_runtime_template: bool = False
    runtime_image_path: str = ""
    stopped: bool = False
    exit_type: str = ""
    are_updates_pending: bool = False
    ob_root: str = ""
    statistics: Statistics = msgspec.field(default_factory=Statistics)
    process_list: list[ProcessListItem] = msgspec.field(default_factory=list)


# Not in the seed reference's text (only its name is); fields from hcsshim v0.5.3 source.
_COMPUTE_SYSTEM_QUERY_NAMES = {
    "ids": "Ids",
    "types": "Types",
    "names": "Names",
    "owners": "Owners",
}


class ComputeSystemQuery(Document, rename=_COMPUTE_SYSTEM_QUERY_NAMES):
    """A ``GetContainers`` filter on compute-system ids, types, names and owners."""

    ids: list[str] = msgspec.field(default_factory=list)
    types: list[str] = msgspec.field(default_factory=list)
    names: list[str] = msgspec.field(default_factory=list)
    owners: list[str] = msgspec.field(default_factory=list)
