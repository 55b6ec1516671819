"""Every JSON document of hcsshim v0.5 as a typed value object, and their codec.

Documents are msgspec Structs with snake_case attributes; each class spells out the
mapping to hcsshim's JSON names (``MemoryStats.usage_commit_bytes`` is
``MemoryUsageCommitBytes``, ``Layer.id`` is ``ID``...). :func:`to_json` / :func:`to_dict`
write them with those names, leaving out fields that hold their default;
:func:`from_json` / :func:`from_dict` read them as Go's ``encoding/json`` reads
hcsshim-written JSON and raise :class:`~pyhcs._errors.InvalidConfigError` naming the
invalid field.
"""

from pyhcs._schema._codec import Document, from_dict, from_json, to_dict, to_json, validate
from pyhcs._schema._compute import (
    ComputeSystemQuery,
    ContainerConfig,
    ContainerProperties,
    HvRuntime,
    Layer,
    MappedDir,
    ProcessConfig,
)
from pyhcs._schema._hns import (
    HNSEndpoint,
    HNSNetwork,
    MacPool,
    NatPolicy,
    PaPolicy,
    QosPolicy,
    Subnet,
    VlanPolicy,
    VsidPolicy,
)
from pyhcs._schema._stats import (
    MemoryStats,
    NetworkStats,
    ProcessListItem,
    ProcessorStats,
    Statistics,
    StorageStats,
)

__all__ = [
    # codec
    "Document",
    "from_dict",
    "from_json",
    "to_dict",
    "to_json",
    "validate",
    # compute systems
    "ComputeSystemQuery",
    "ContainerConfig",
    "ContainerProperties",
    "HvRuntime",
    "Layer",
    "MappedDir",
    "ProcessConfig",
    # statistics
    "MemoryStats",
    "NetworkStats",
    "ProcessListItem",
    "ProcessorStats",
    "Statistics",
    "StorageStats",
    # host networking
    "HNSEndpoint",
    "HNSNetwork",
    "MacPool",
    "NatPolicy",
    "PaPolicy",
    "QosPolicy",
    "Subnet",
    "VlanPolicy",
    "VsidPolicy",
]
