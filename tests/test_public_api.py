"""The public namespace: one module, everything in ``__all__``, every seed entry present."""

from __future__ import annotations

import inspect

import pyhcs

# hcsshim's API (../shared/seeds) -> pyhcs's name, for what this version provides.
SEED_FUNCTIONS = {
    "ActivateLayer": "activate_layer",
    "CreateLayer": "create_layer",
    "CreateSandboxLayer": "create_sandbox_layer",
    "DeactivateLayer": "deactivate_layer",
    "DestroyLayer": "destroy_layer",
    "GetLayerMountPath": "get_layer_mount_path",
    "GetSharedBaseImages": "get_shared_base_images",
    "IsAlreadyClosed": "is_already_closed",
    "IsAlreadyStopped": "is_already_stopped",
    "IsNotExist": "is_not_exist",
    "IsPending": "is_pending",
    "IsTP4": "is_tp4",
    "IsTimeout": "is_timeout",
    "LayerExists": "layer_exists",
    "PrepareLayer": "prepare_layer",
    "ProcessBaseLayer": "process_base_layer",
    "ProcessUtilityVMImage": "process_utility_vm_image",
    "UnprepareLayer": "unprepare_layer",
    "CreateContainer": "create_container",
    "OpenContainer": "open_container",
    "GetContainers": "get_containers",
    "NameToGuid": "name_to_guid",
    "NewGUID": "new_guid",
    "ExpandSandboxSize": "expand_sandbox_size",
    "ExportLayer": "export_layer",
    "ImportLayer": "import_layer",
    "NewLayerReader": "new_layer_reader",
    "NewLayerWriter": "new_layer_writer",
    "SetCurrentThreadCompartmentId": "set_current_thread_compartment_id",
    "HNSNetworkRequest": "hns_network_request",
    "HNSListNetworkRequest": "hns_list_network_request",
    "HNSEndpointRequest": "hns_endpoint_request",
}
SEED_TYPES = [
    "ComputeSystemQuery", "Container", "ContainerConfig", "ContainerError",
    "ContainerProperties", "DriverInfo", "GUID", "HNSEndpoint", "HNSNetwork", "HcsError",
    "HvRuntime", "Layer", "MacPool", "MappedDir", "MemoryStats", "NatPolicy", "NetworkStats",
    "PaPolicy", "Process", "ProcessConfig", "ProcessError", "ProcessListItem",
    "ProcessorStats", "QosPolicy", "Statistics", "StorageStats", "Subnet", "VlanPolicy",
    "VsidPolicy", "LayerReader", "LayerWriter", "LayerDescriptor",
]
CONTAINER_METHODS = ["start", "shutdown", "terminate", "wait", "wait_timeout", "pause",
                     "resume", "has_pending_updates", "statistics", "process_list",
                     "create_process", "open_process", "close"]
PROCESS_METHODS = ["kill", "wait", "wait_timeout", "exit_code", "resize_console", "stdio",
                   "close_stdin", "close"]


def test_all_is_exact() -> None:
    exported = {n for n in dir(pyhcs) if not n.startswith("_")}
    modules = {n for n in exported if inspect.ismodule(getattr(pyhcs, n))}
    assert set(pyhcs.__all__) == exported - modules
    assert len(pyhcs.__all__) == len(set(pyhcs.__all__))


def test_seed_functions_exist() -> None:
    for go, py in SEED_FUNCTIONS.items():
        assert py in pyhcs.__all__, go
        assert callable(getattr(pyhcs, py)), go


def test_seed_types_exist() -> None:
    for name in SEED_TYPES:
        assert name in pyhcs.__all__, name
        assert inspect.isclass(getattr(pyhcs, name)), name
    assert inspect.isclass(pyhcs.LayerDescriptor)  # WC_LAYER_DESCRIPTOR


def test_container_and_process_methods() -> None:
    for m in CONTAINER_METHODS:
        assert callable(getattr(pyhcs.Container, m)), m
    for m in PROCESS_METHODS:
        assert callable(getattr(pyhcs.Process, m)), m
    assert isinstance(pyhcs.Process.pid, property)


def test_public_names_are_documented() -> None:
    for name in pyhcs.__all__:
        obj = getattr(pyhcs, name)
        if inspect.isfunction(obj) or inspect.isclass(obj):
            assert inspect.getdoc(obj), name


def test_is_tp4_is_false_on_linux() -> None:
    assert pyhcs.is_tp4() is False
