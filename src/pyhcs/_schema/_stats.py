"""Statistics documents (``Container.statistics()``) and process-list items.

Times in ``*100ns`` fields count 100-nanosecond units, as on Windows; on Linux the same
fields carry the equivalent measurements, converted to these units.
"""

import msgspec

from pyhcs._schema._codec import Document, Time, UInt32, UInt64

__all__ = [
    "MemoryStats",
    "NetworkStats",
    "ProcessListItem",
    "ProcessorStats",
    "Statistics",
    "StorageStats",
]

_MEMORY_STATS_NAMES = {
    "usage_commit_bytes": "MemoryUsageCommitBytes",
    "usage_commit_peak_bytes": "MemoryUsageCommitPeakBytes",
    "usage_private_working_set_bytes": "MemoryUsagePrivateWorkingSetBytes",
}


class MemoryStats(Document, rename=_MEMORY_STATS_NAMES):
    """A container's memory use in bytes: committed now, committed at peak, private working set."""

    usage_commit_bytes: UInt64 = 0
    usage_commit_peak_bytes: UInt64 = 0
    usage_private_working_set_bytes: UInt64 = 0


_PROCESSOR_STATS_NAMES = {
    "total_runtime_100ns": "TotalRuntime100ns",
    "runtime_user_100ns": "RuntimeUser100ns",
    "runtime_kernel_100ns": "RuntimeKernel100ns",
}


class ProcessorStats(Document, rename=_PROCESSOR_STATS_NAMES):
    """A container's CPU time in 100 ns units: total, user mode, kernel mode."""

    total_runtime_100ns: UInt64 = 0
    runtime_user_100ns: UInt64 = 0
    runtime_kernel_100ns: UInt64 = 0


_STORAGE_STATS_NAMES = {
    "read_count_normalized": "ReadCountNormalized",
    "read_size_bytes": "ReadSizeBytes",
    "write_count_normalized": "WriteCountNormalized",
    "write_size_bytes": "WriteSizeBytes",
}


class StorageStats(Document, rename=_STORAGE_STATS_NAMES):
    """A container's storage I/O: operation counts and bytes, read and written."""

    read_count_normalized: UInt64 = 0
    read_size_bytes: UInt64 = 0
    write_count_normalized: UInt64 = 0
    write_size_bytes: UInt64 = 0


_NETWORK_STATS_NAMES = {
    "bytes_received": "BytesReceived",
    "bytes_sent": "BytesSent",
    "packets_received": "PacketsReceived",
    "packets_sent": "PacketsSent",
    "dropped_packets_incoming": "DroppedPacketsIncoming",
    "dropped_packets_outgoing": "DroppedPacketsOutgoing",
    "endpoint_id": "EndpointId",
    "instance_id": "InstanceId",
}


class NetworkStats(Document, rename=_NETWORK_STATS_NAMES):
    """Traffic counters of one network endpoint attached to a container."""

    bytes_received: UInt64 = 0
    bytes_sent: UInt64 = 0
    packets_received: UInt64 = 0
    packets_sent: UInt64 = 0
    dropped_packets_incoming: UInt64 = 0
    dropped_packets_outgoing: UInt64 = 0
    endpoint_id: str = ""
    instance_id: str = ""


_STATISTICS_NAMES = {
    "timestamp": "Timestamp",
    "container_start_time": "ContainerStartTime",
    "uptime_100ns": "Uptime100ns",
    "memory": "Memory",
    "processor": "Processor",
    "storage": "Storage",
    "network": "Network",
}


class Statistics(Document, rename=_STATISTICS_NAMES):
    """A container's statistics at ``timestamp``; ``None`` times are Go's zero time."""

    timestamp: Time | None = None
    container_start_time: Time | None = None
    uptime_100ns: UInt64 = 0
    memory: MemoryStats = msgspec.field(default_factory=MemoryStats)
    processor: ProcessorStats = msgspec.field(default_factory=ProcessorStats)
    storage: StorageStats = msgspec.field(default_factory=StorageStats)
    network: list[NetworkStats] = msgspec.field(default_factory=list)


_PROCESS_LIST_ITEM_NAMES = {
    "create_timestamp": "CreateTimestamp",
    "image_name": "ImageName",
    "kernel_time_100ns": "KernelTime100ns",
    "memory_commit_bytes": "MemoryCommitBytes",
    "memory_working_set_private_bytes": "MemoryWorkingSetPrivateBytes",
    "memory_working_set_shared_bytes": "MemoryWorkingSetSharedBytes",
    "process_id": "ProcessId",
    "user_time_100ns": "UserTime100ns",
}


class ProcessListItem(Document, rename=_PROCESS_LIST_ITEM_NAMES):
    """One process of a container, as ``Container.process_list()`` reports it."""

    create_timestamp: Time | None = None
    image_name: str = ""
    kernel_time_100ns: UInt64 = 0
    memory_commit_bytes: UInt64 = 0
    memory_working_set_private_bytes: UInt64 = 0
    memory_working_set_shared_bytes: UInt64 = 0
    process_id: UInt32 = 0
    user_time_100ns: UInt64 = 0
