"""pyhcs: hcsshim's container API — compute systems, processes, layers — on Linux.

This module is the whole public API; everything else lives in private modules. Names
follow hcsshim in snake_case (``CreateContainer`` is :func:`create_container`, ``Layer.ID``
is :attr:`Layer.id`); documents read and write hcsshim's JSON unchanged.
"""

from ._compute import (
    Container,
    Process,
    container_state,
    create_container,
    create_container_with_json,
    get_containers,
    hot_attach_endpoint,
    hot_detach_endpoint,
    open_container,
    remove_container,
)
from ._errors import (
    ERR_ALREADY_CLOSED,
    ERR_ALREADY_EXISTS,
    ERR_COMPUTE_SYSTEM_DOES_NOT_EXIST,
    ERR_ELEMENT_NOT_FOUND,
    ERR_HANDLE_CLOSE,
    ERR_INVALID_NOTIFICATION_TYPE,
    ERR_INVALID_PROCESS_STATE,
    ERR_PROC_NOT_FOUND,
    ERR_TIMEOUT,
    ERR_UNEXPECTED_CONTAINER_EXIT,
    ERR_UNEXPECTED_PROCESS_ABORT,
    ERR_UNEXPECTED_VALUE,
    ERR_VMCOMPUTE_ALREADY_STOPPED,
    ERR_VMCOMPUTE_OPERATION_INVALID_STATE,
    ERR_VMCOMPUTE_OPERATION_PENDING,
    TIMEOUT_INFINITE,
    WAIT_ERR_EXEC_FAILED,
    ContainerError,
    ContainerTimeoutError,
    ErrorCode,
    HcsError,
    InvalidConfigError,
    LayerError,
    NotSupportedError,
    ProcessError,
    ProcessTimeoutError,
    is_already_closed,
    is_already_stopped,
    is_not_exist,
    is_pending,
    is_timeout,
)
from ._guid import GUID, name_to_guid, new_guid
from ._layers import (
    DriverInfo,
    EntryType,
    ImageInfo,
    LayerDescriptor,
    LayerEntry,
    LayerReader,
    LayerWriter,
    TarExport,
    activate_layer,
    create_layer,
    create_sandbox_layer,
    deactivate_layer,
    destroy_layer,
    expand_sandbox_size,
    export_layer,
    export_layer_to_tar,
    get_layer_mount_path,
    get_sandbox_size,
    get_shared_base_images,
    import_image,
    import_layer,
    import_layer_from_tar,
    layer_exists,
    list_images,
    new_layer_reader,
    new_layer_writer,
    prepare_layer,
    process_base_layer,
    process_utility_vm_image,
    remove_image,
    resolve_image,
    unprepare_layer,
)
from ._paths import Roots
from ._runtime._spec import IdMapping, UserNamespace
from ._schema import (
    ComputeSystemQuery,
    ContainerConfig,
    ContainerProperties,
    HNSEndpoint,
    HNSNetwork,
    HvRuntime,
    Layer,
    MacPool,
    MappedDir,
    MemoryStats,
    NatPolicy,
    NetworkStats,
    PaPolicy,
    ProcessConfig,
    ProcessListItem,
    ProcessorStats,
    QosPolicy,
    Statistics,
    StorageStats,
    Subnet,
    VlanPolicy,
    VsidPolicy,
    from_json,
    to_json,
)

__version__ = "0.1.0"

# The network service loads pyroute2, which a program that only runs containers without
# networks should not pay for at import: its names resolve on first use.
_NETWORK_NAMES = frozenset({
    "hns_network_request", "hns_list_network_request", "hns_endpoint_request",
    "hns_list_endpoint_request", "hns_policy_list_request", "set_current_thread_compartment_id",
    "get_current_thread_compartment_id", "create_network", "delete_network", "get_network",
    "list_networks", "create_endpoint", "update_endpoint", "delete_endpoint", "get_endpoint",
    "list_endpoints", "attach_endpoint", "detach_endpoint", "endpoint_statistics",
    "endpoint_compartment_id", "resolv_conf", "NetworkError", "InvalidNetworkRequestError",
    "NetworkNotSupportedError",
})


def __getattr__(name: str) -> object:
    if name in _NETWORK_NAMES:
        from . import _network

        value = getattr(_network, name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'pyhcs' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | _NETWORK_NAMES)


def is_tp4() -> bool:
    """hcsshim's IsTP4, kept for parity: always False, as no Linux kernel is Windows TP4."""
    return False


__all__ = [
    # compute
    "Container", "Process", "create_container", "create_container_with_json",
    "open_container", "get_containers", "remove_container", "container_state",
    "hot_attach_endpoint", "hot_detach_endpoint", "UserNamespace", "IdMapping",
    # network (loaded on first use)
    *sorted(_NETWORK_NAMES),
    # layers
    "DriverInfo", "LayerDescriptor", "activate_layer", "create_layer", "create_sandbox_layer",
    "deactivate_layer", "destroy_layer", "get_layer_mount_path", "get_shared_base_images",
    "import_layer_from_tar", "layer_exists", "prepare_layer", "process_base_layer",
    "process_utility_vm_image", "unprepare_layer", "expand_sandbox_size", "get_sandbox_size",
    "export_layer", "import_layer", "export_layer_to_tar", "new_layer_reader",
    "new_layer_writer", "LayerReader", "LayerWriter", "LayerEntry", "EntryType", "TarExport",
    # images
    "ImageInfo", "import_image", "list_images", "remove_image", "resolve_image",
    # documents
    "ComputeSystemQuery", "ContainerConfig", "ContainerProperties", "HNSEndpoint",
    "HNSNetwork", "HvRuntime", "Layer", "MacPool", "MappedDir", "MemoryStats", "NatPolicy",
    "NetworkStats", "PaPolicy", "ProcessConfig", "ProcessListItem", "ProcessorStats",
    "QosPolicy", "Statistics", "StorageStats", "Subnet", "VlanPolicy", "VsidPolicy",
    "from_json", "to_json",
    # errors
    "HcsError", "ContainerError", "ProcessError", "LayerError", "InvalidConfigError",
    "NotSupportedError", "ContainerTimeoutError", "ProcessTimeoutError", "ErrorCode",
    "ERR_ALREADY_CLOSED", "ERR_ALREADY_EXISTS", "ERR_COMPUTE_SYSTEM_DOES_NOT_EXIST",
    "ERR_ELEMENT_NOT_FOUND", "ERR_HANDLE_CLOSE", "ERR_INVALID_NOTIFICATION_TYPE",
    "ERR_INVALID_PROCESS_STATE", "ERR_PROC_NOT_FOUND", "ERR_TIMEOUT",
    "ERR_UNEXPECTED_CONTAINER_EXIT", "ERR_UNEXPECTED_PROCESS_ABORT", "ERR_UNEXPECTED_VALUE",
    "ERR_VMCOMPUTE_ALREADY_STOPPED", "ERR_VMCOMPUTE_OPERATION_INVALID_STATE",
    "ERR_VMCOMPUTE_OPERATION_PENDING", "TIMEOUT_INFINITE", "WAIT_ERR_EXEC_FAILED",
    "is_already_closed", "is_already_stopped", "is_not_exist", "is_pending", "is_timeout",
    "is_tp4",
    # ids and paths
    "GUID", "name_to_guid", "new_guid", "Roots",
]
