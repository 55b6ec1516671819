"""The hcsshim documents: names, JSON written and read as hcsshim's Go code does, errors."""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import msgspec
import msgspec.inspect as mi
import pytest

import pyhcs._schema as schema
from pyhcs._errors import InvalidConfigError
from pyhcs._schema import (
    ComputeSystemQuery,
    ContainerConfig,
    ContainerProperties,
    Document,
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
    from_dict,
    from_json,
    to_dict,
    to_json,
    validate,
)

# Every document's Go fields in Go's order, copied from the seed reference: (Go field name,
# name in its json tag or None when the tag names none). The Python attribute must be the
# Go field name in snake_case and the JSON name the tag's name, else the Go field name.
GO_FIELDS: dict[type[Document], list[tuple[str, str | None]]] = {
    ContainerConfig: [
        ("SystemType", None),
        ("Name", None),
        ("Owner", None),
        ("IsDummy", None),
        ("VolumePath", None),
        ("IgnoreFlushesDuringBoot", None),
        ("LayerFolderPath", None),
        ("Layers", None),
        ("Credentials", None),
        ("ProcessorCount", None),
        ("ProcessorWeight", None),
        ("ProcessorMaximum", None),
        ("StorageIOPSMaximum", None),
        ("StorageBandwidthMaximum", None),
        ("StorageSandboxSize", None),
        ("MemoryMaximumInMB", None),
        ("HostName", None),
        ("MappedDirectories", None),
        ("SandboxPath", None),
        ("HvPartition", None),
        ("EndpointList", None),
        ("HvRuntime", None),
        ("Servicing", None),
        ("AllowUnqualifiedDNSQuery", None),
    ],
    Layer: [("ID", None), ("Path", None)],
    MappedDir: [
        ("HostPath", None),
        ("ContainerPath", None),
        ("ReadOnly", None),
        ("BandwidthMaximum", None),
        ("IOPSMaximum", None),
    ],
    HvRuntime: [("ImagePath", None), ("SkipTemplate", None)],
    ProcessConfig: [
        ("ApplicationName", None),
        ("CommandLine", None),
        ("User", None),
        ("WorkingDirectory", None),
        ("Environment", None),
        ("EmulateConsole", None),
        ("CreateStdInPipe", None),
        ("CreateStdOutPipe", None),
        ("CreateStdErrPipe", None),
        ("ConsoleSize", None),
    ],
    ContainerProperties: [
        ("ID", "Id"),
        ("Name", None),
        ("SystemType", None),
        ("Owner", None),
        ("SiloGUID", "SiloGuid"),
        ("IsDummy", None),
        ("RuntimeID", "RuntimeId"),
        ("IsRuntimeTemplate", None),
        ("RuntimeImagePath", None),
        ("Stopped", None),
        ("ExitType", None),
        ("AreUpdatesPending", None),
        ("ObRoot", None),
        ("Statistics", None),
        ("ProcessList", None),
    ],
    ComputeSystemQuery: [("IDs", "Ids"), ("Types", None), ("Names", None), ("Owners", None)],
    Statistics: [
        ("Timestamp", None),
        ("ContainerStartTime", None),
        ("Uptime100ns", None),
        ("Memory", None),
        ("Processor", None),
        ("Storage", None),
        ("Network", None),
    ],
    MemoryStats: [
        ("UsageCommitBytes", "MemoryUsageCommitBytes"),
        ("UsageCommitPeakBytes", "MemoryUsageCommitPeakBytes"),
        ("UsagePrivateWorkingSetBytes", "MemoryUsagePrivateWorkingSetBytes"),
    ],
    ProcessorStats: [
        ("TotalRuntime100ns", None),
        ("RuntimeUser100ns", None),
        ("RuntimeKernel100ns", None),
    ],
    StorageStats: [
        ("ReadCountNormalized", None),
        ("ReadSizeBytes", None),
        ("WriteCountNormalized", None),
        ("WriteSizeBytes", None),
    ],
    NetworkStats: [
        ("BytesReceived", None),
        ("BytesSent", None),
        ("PacketsReceived", None),
        ("PacketsSent", None),
        ("DroppedPacketsIncoming", None),
        ("DroppedPacketsOutgoing", None),
        ("EndpointId", None),
        ("InstanceId", None),
    ],
    ProcessListItem: [
        ("CreateTimestamp", None),
        ("ImageName", None),
        ("KernelTime100ns", None),
        ("MemoryCommitBytes", None),
        ("MemoryWorkingSetPrivateBytes", None),
        ("MemoryWorkingSetSharedBytes", None),
        ("ProcessId", None),
        ("UserTime100ns", None),
    ],
    HNSNetwork: [
        ("Id", None),
        ("Name", None),
        ("Type", None),
        ("NetworkAdapterName", None),
        ("SourceMac", None),
        ("Policies", None),
        ("MacPools", None),
        ("Subnets", None),
        ("DNSSuffix", None),
        ("DNSServerList", None),
        ("DNSServerCompartment", None),
        ("ManagementIP", None),
    ],
    HNSEndpoint: [
        ("Id", None),
        ("Name", None),
        ("VirtualNetwork", None),
        ("VirtualNetworkName", None),
        ("Policies", None),
        ("MacAddress", None),
        ("IPAddress", None),
        ("DNSSuffix", None),
        ("DNSServerList", None),
        ("GatewayAddress", None),
        ("EnableInternalDNS", None),
        ("PrefixLength", None),
        ("IsRemoteEndpoint", None),
    ],
    Subnet: [("AddressPrefix", None), ("GatewayAddress", None), ("Policies", None)],
    MacPool: [("StartMacAddress", None), ("EndMacAddress", None)],
    NatPolicy: [("Type", None), ("Protocol", None), ("InternalPort", None), ("ExternalPort", None)],
    QosPolicy: [("Type", None), ("MaximumOutgoingBandwidthInBytes", None)],
    VlanPolicy: [("Type", None), ("VLAN", None)],
    VsidPolicy: [("Type", None), ("VSID", None)],
    PaPolicy: [("Type", None), ("PA", None)],
}

ALL_TYPES = list(GO_FIELDS)
POLICY_TYPES = [NatPolicy, QosPolicy, VlanPolicy, VsidPolicy, PaPolicy]


def snake(go_name: str) -> str:
    """Go field name -> Python attribute: acronyms stay one word (IPAddress -> ip_address)."""
    name = go_name.replace("IDs", "Ids")
    name = re.sub(r"([A-Z]+)([A-Z][a-z])", r"\1_\2", name)
    name = re.sub(r"([a-z])([A-Z0-9])", r"\1_\2", name)
    return name.lower()


def test_snake_rule_matches_the_briefed_examples() -> None:
    assert snake("MemoryMaximumInMB") == "memory_maximum_in_mb"
    assert snake("StorageIOPSMaximum") == "storage_iops_maximum"
    assert snake("KernelTime100ns") == "kernel_time_100ns"
    assert snake("SiloGUID") == "silo_guid"
    assert snake("IDs") == "ids"


# ------------------------------------------------------------------------------ names


def test_every_document_type_is_exported_and_covered() -> None:
    exported = {
        obj
        for name in schema.__all__
        if isinstance(obj := getattr(schema, name), type)
        and issubclass(obj, Document)
        and obj is not Document
    }
    assert exported == set(GO_FIELDS)
    assert len(exported) == 22


@pytest.mark.parametrize("cls", ALL_TYPES, ids=lambda c: c.__name__)
def test_names_derive_from_the_go_struct(cls: type[Document]) -> None:
    actual = [(f.name, f.encode_name) for f in msgspec.structs.fields(cls)]
    expected = [(snake(go), tag or go) for go, tag in GO_FIELDS[cls]]
    assert actual == expected


@pytest.mark.parametrize(
    ("obj", "expected"),
    [
        (
            MemoryStats(
                usage_commit_bytes=1, usage_commit_peak_bytes=2, usage_private_working_set_bytes=3
            ),
            b'{"MemoryUsageCommitBytes":1,"MemoryUsageCommitPeakBytes":2,'
            b'"MemoryUsagePrivateWorkingSetBytes":3}',
        ),
        (
            ContainerProperties(id="c1", silo_guid="g1", runtime_id="r1"),
            b'{"Id":"c1","SiloGuid":"g1","RuntimeId":"r1"}',
        ),
        (Layer(id="l1", path="/var/lib/pyhcs/l1"), b'{"ID":"l1","Path":"/var/lib/pyhcs/l1"}'),
        (MappedDir(host_path="/h", iops_maximum=5), b'{"HostPath":"/h","IOPSMaximum":5}'),
        (
            ContainerConfig(
                storage_iops_maximum=1,
                memory_maximum_in_mb=2,
                host_name="h",
                hv_partition=True,
                hv_runtime=HvRuntime(image_path="/uvm"),
                allow_unqualified_dns_query=True,
            ),
            b'{"StorageIOPSMaximum":1,"MemoryMaximumInMB":2,"HostName":"h","HvPartition":true,'
            b'"HvRuntime":{"ImagePath":"/uvm"},"AllowUnqualifiedDNSQuery":true}',
        ),
        (
            HNSEndpoint(
                id="e1",
                mac_address="00-15-5D-00-00-01",
                ip_address="172.16.0.2",
                dns_suffix="corp",
                dns_server_list="8.8.8.8,8.8.4.4",
                enable_internal_dns=True,
            ),
            b'{"Id":"e1","MacAddress":"00-15-5D-00-00-01","IPAddress":"172.16.0.2",'
            b'"DNSSuffix":"corp","DNSServerList":"8.8.8.8,8.8.4.4","EnableInternalDNS":true}',
        ),
        (
            HNSNetwork(
                network_adapter_name="eth0",
                source_mac="00-15-5D-00-00-00",
                mac_pools=[MacPool(start_mac_address="a", end_mac_address="b")],
                subnets=[Subnet(address_prefix="172.16.0.0/24")],
                dns_server_compartment=3,
                management_ip="10.0.0.1",
            ),
            b'{"NetworkAdapterName":"eth0","SourceMac":"00-15-5D-00-00-00",'
            b'"MacPools":[{"StartMacAddress":"a","EndMacAddress":"b"}],'
            b'"Subnets":[{"AddressPrefix":"172.16.0.0/24"}],"DNSServerCompartment":3,'
            b'"ManagementIP":"10.0.0.1"}',
        ),
        (
            ProcessListItem(process_id=4, kernel_time_100ns=5),
            b'{"KernelTime100ns":5,"ProcessId":4}',
        ),
        (
            NetworkStats(endpoint_id="e1", instance_id="i1"),
            b'{"EndpointId":"e1","InstanceId":"i1"}',
        ),
        (
            Statistics(uptime_100ns=1, timestamp=datetime(2016, 10, 26, 12, 0, tzinfo=UTC)),
            b'{"Timestamp":"2016-10-26T12:00:00Z","Uptime100ns":1}',
        ),
        (
            ComputeSystemQuery(ids=["a"], types=["Container"], names=["n"], owners=["docker"]),
            b'{"Ids":["a"],"Types":["Container"],"Names":["n"],"Owners":["docker"]}',
        ),
        (
            ProcessConfig(
                command_line="/bin/sh -c true",
                environment={"PATH": "/bin"},
                create_std_in_pipe=True,
                console_size=(25, 80),
            ),
            b'{"CommandLine":"/bin/sh -c true","Environment":{"PATH":"/bin"},'
            b'"CreateStdInPipe":true,"ConsoleSize":[25,80]}',
        ),
        (VlanPolicy(vlan=7), b'{"Type":"VLAN","VLAN":7}'),
        (VsidPolicy(vsid=9), b'{"Type":"VSID","VSID":9}'),
        (PaPolicy(pa="10.0.0.9"), b'{"Type":"PA","PA":"10.0.0.9"}'),
        (QosPolicy(), b'{"Type":"QOS","MaximumOutgoingBandwidthInBytes":0}'),
        (
            NatPolicy(protocol="TCP", internal_port=80, external_port=8080),
            b'{"Type":"NAT","Protocol":"TCP","InternalPort":80,"ExternalPort":8080}',
        ),
    ],
    ids=lambda v: type(v).__name__ if isinstance(v, Document) else "",
)
def test_hcsshim_names_appear_exactly(obj: Document, expected: bytes) -> None:
    assert to_json(obj) == expected
    assert from_json(type(obj), expected) == obj


# ------------------------------------------------------------ a document hcsshim wrote

# What hcsshim v0.5's json.Marshal writes for a Windows Server container Docker creates:
# non-omitempty fields present even when empty, nil slices as null, Go's field order.
GO_CONTAINER_CONFIG = (
    r'{"SystemType":"Container",'
    r'"Name":"5e0055c814a6005b8e57ac59f9a522066e0af12b48b3c26a9416e23907698776",'
    r'"Owner":"docker","IsDummy":false,"IgnoreFlushesDuringBoot":true,'
    r'"LayerFolderPath":"C:\\ProgramData\\docker\\windowsfilter\\5e0055c814a6",'
    r'"Layers":[{"ID":"9d4d8b1c-8c1a-5f3e-a3b0-2a7c1f1e6a11",'
    r'"Path":"C:\\ProgramData\\docker\\windowsfilter\\0f5e7c9d3b1a"},'
    r'{"ID":"1c2e0f55-3b7d-5a4e-8e61-9f0d2b4c6a88",'
    r'"Path":"C:\\ProgramData\\docker\\windowsfilter\\77ab3c01d2e4"}],'
    r'"ProcessorWeight":512,"MemoryMaximumInMB":256,"HostName":"5e0055c814a6",'
    r'"MappedDirectories":null,"HvPartition":false,'
    r'"EndpointList":["e3c57cfa-4a5b-4b6e-9d0f-6c2b8f3a1d77"],'
    r'"Servicing":false,"AllowUnqualifiedDNSQuery":false}'
)


def test_container_config_written_by_hcsshim_loads_unchanged() -> None:
    config = from_json(ContainerConfig, GO_CONTAINER_CONFIG)
    assert config.system_type == "Container"
    assert config.name == "5e0055c814a6005b8e57ac59f9a522066e0af12b48b3c26a9416e23907698776"
    assert config.owner == "docker"
    assert config.is_dummy is False
    assert config.ignore_flushes_during_boot is True
    assert config.layer_folder_path == "C:\\ProgramData\\docker\\windowsfilter\\5e0055c814a6"
    assert config.layers == [
        Layer(
            id="9d4d8b1c-8c1a-5f3e-a3b0-2a7c1f1e6a11",
            path="C:\\ProgramData\\docker\\windowsfilter\\0f5e7c9d3b1a",
        ),
        Layer(
            id="1c2e0f55-3b7d-5a4e-8e61-9f0d2b4c6a88",
            path="C:\\ProgramData\\docker\\windowsfilter\\77ab3c01d2e4",
        ),
    ]
    assert config.processor_weight == 512
    assert config.memory_maximum_in_mb == 256
    assert config.host_name == "5e0055c814a6"
    assert config.mapped_directories == []
    assert config.hv_partition is False
    assert config.endpoint_list == ["e3c57cfa-4a5b-4b6e-9d0f-6c2b8f3a1d77"]
    assert config.hv_runtime is None
    assert config.servicing is False
    assert config.allow_unqualified_dns_query is False
    assert config.volume_path == config.credentials == config.sandbox_path == ""
    assert config.processor_count == config.processor_maximum == config.storage_sandbox_size == 0


def test_container_config_dumps_back_with_hcsshim_names_and_round_trips() -> None:
    config = from_json(ContainerConfig, GO_CONTAINER_CONFIG)
    out = to_json(config)
    written = json.loads(out)
    go = json.loads(GO_CONTAINER_CONFIG)
    # Every non-default field Go wrote is written back under the same name, in Go's order;
    # SystemType is "Container", the default, so it is left out like the false/null ones.
    assert list(written) == [
        "Name",
        "Owner",
        "IgnoreFlushesDuringBoot",
        "LayerFolderPath",
        "Layers",
        "ProcessorWeight",
        "MemoryMaximumInMB",
        "HostName",
        "EndpointList",
    ]
    assert written == {k: v for k, v in go.items() if k in written}
    assert from_json(ContainerConfig, out) == config
    assert to_dict(config) == written


def test_container_properties_list_written_by_hcsshim_loads() -> None:
    # GetContainers' answer: Statistics is a struct, so Go writes it (zero times and all).
    data = (
        b'[{"Id":"abc","Name":"abc","SystemType":"Container","Owner":"docker",'
        b'"RuntimeId":"8d7b5c1a-0000-0000-0000-000000000000",'
        b'"Statistics":{"Timestamp":"0001-01-01T00:00:00Z",'
        b'"ContainerStartTime":"0001-01-01T00:00:00Z","Memory":{},"Processor":{},'
        b'"Storage":{}}},{"Id":"def","Name":"def","SystemType":"Container","Owner":"",'
        b'"Stopped":true,"ExitType":"GracefulExit","Statistics":{'
        b'"Timestamp":"2016-10-26T12:30:45.1234567Z",'
        b'"ContainerStartTime":"2016-10-26T12:00:00+02:00","Uptime100ns":18000000000,'
        b'"Memory":{"MemoryUsageCommitBytes":1048576},"Processor":{},"Storage":{},'
        b'"Network":[{"BytesSent":10,"EndpointId":"e1"}]}}]'
    )
    first, second = from_json(list[ContainerProperties], data)
    assert first == ContainerProperties(
        id="abc",
        name="abc",
        system_type="Container",
        owner="docker",
        runtime_id="8d7b5c1a-0000-0000-0000-000000000000",
    )
    assert first.statistics.timestamp is None
    assert second.stopped is True
    assert second.exit_type == "GracefulExit"
    stats = second.statistics
    assert stats.timestamp == datetime(2016, 10, 26, 12, 30, 45, 123457, tzinfo=UTC)
    start = stats.container_start_time
    assert start is not None
    assert start.utcoffset() == timedelta(hours=2)
    assert start == datetime(2016, 10, 26, 10, 0, tzinfo=UTC)
    assert stats.uptime_100ns == 18_000_000_000
    assert stats.memory.usage_commit_bytes == 1048576
    assert stats.network == [NetworkStats(bytes_sent=10, endpoint_id="e1")]
    assert to_json(first) == (
        b'{"Id":"abc","Name":"abc","SystemType":"Container","Owner":"docker",'
        b'"RuntimeId":"8d7b5c1a-0000-0000-0000-000000000000"}'
    )
    again = from_json(list[ContainerProperties], to_json([first, second]))
    assert again == [first, second]


# --------------------------------------------------------------------- empty is omitted


@pytest.mark.parametrize(
    "cls", [c for c in ALL_TYPES if c not in POLICY_TYPES], ids=lambda c: c.__name__
)
def test_a_default_document_writes_as_an_empty_object(cls: type[Document]) -> None:
    assert to_json(cls()) == b"{}"
    assert to_dict(cls()) == {}
    assert from_json(cls, b"{}") == cls()


def test_nested_documents_equal_to_their_default_are_omitted() -> None:
    props = ContainerProperties(
        id="x", statistics=Statistics(memory=MemoryStats(), network=[NetworkStats()])
    )
    assert to_json(props) == b'{"Id":"x","Statistics":{"Network":[{}]}}'
    props.statistics.network.clear()
    assert to_json(props) == b'{"Id":"x"}'
    props.statistics.storage.write_size_bytes = 4096
    assert to_json(props) == b'{"Id":"x","Statistics":{"Storage":{"WriteSizeBytes":4096}}}'
    # An empty HvRuntime is not the default (None): Go writes it too.
    assert to_json(ContainerConfig(hv_runtime=HvRuntime())) == b'{"HvRuntime":{}}'
    assert to_json(ContainerConfig(system_type="")) == b'{"SystemType":""}'


def test_loaded_values_equal_to_the_default_are_omitted() -> None:
    # msgspec alone would write these: they equal the default but are not the same object.
    loaded = from_json(ProcessConfig, b'{"ConsoleSize":[0,0],"User":"","Environment":{}}')
    assert to_json(loaded) == b"{}"
    assert to_json(from_json(ContainerConfig, b'{"SystemType":"Container"}')) == b"{}"
    assert to_json(ContainerConfig(system_type="".join(["Con", "tainer"]))) == b"{}"


@pytest.mark.parametrize(
    ("cls", "expected"),
    [
        (NatPolicy, {"Type": "NAT", "Protocol": "", "InternalPort": 0, "ExternalPort": 0}),
        (QosPolicy, {"Type": "QOS", "MaximumOutgoingBandwidthInBytes": 0}),
        (VlanPolicy, {"Type": "VLAN", "VLAN": 0}),
        (VsidPolicy, {"Type": "VSID", "VSID": 0}),
        (PaPolicy, {"Type": "PA", "PA": ""}),
    ],
    ids=lambda v: v.__name__ if isinstance(v, type) else "",
)
def test_policies_are_written_whole_with_their_type(
    cls: type[Document], expected: dict[str, Any]
) -> None:
    assert to_dict(cls()) == expected
    assert json.loads(to_json(cls())) == expected


def test_policies_travel_inside_an_endpoint_as_json_objects() -> None:
    nat = NatPolicy(protocol="TCP", internal_port=80, external_port=8080)
    vlan = VlanPolicy(vlan=12)
    endpoint = HNSEndpoint(name="ep", policies=[to_dict(nat), to_dict(vlan)])
    loaded = from_json(HNSEndpoint, to_json(endpoint))
    assert [p["Type"] for p in loaded.policies] == ["NAT", "VLAN"]
    assert from_dict(NatPolicy, loaded.policies[0]) == nat
    assert from_dict(VlanPolicy, loaded.policies[1]) == vlan


# ------------------------------------------------------------ Go's decoding rules


def test_field_names_match_case_insensitively_at_every_level() -> None:
    config = from_json(
        ContainerConfig,
        b'{"hostname":"h","SYSTEMTYPE":"X","layers":[{"id":"a","PATH":"p"}],'
        b'"hvRuntime":{"imagepath":"/uvm","SKIPTEMPLATE":true},'
        b'"storageiopsmaximum":3,"allowunqualifieddnsquery":true}',
    )
    assert config == ContainerConfig(
        host_name="h",
        system_type="X",
        layers=[Layer(id="a", path="p")],
        hv_runtime=HvRuntime(image_path="/uvm", skip_template=True),
        storage_iops_maximum=3,
        allow_unqualified_dns_query=True,
    )
    stats = from_json(
        Statistics, b'{"memory":{"memoryusagecommitbytes":5},"NETWORK":[{"endpointid":"e"}]}'
    )
    assert stats.memory.usage_commit_bytes == 5
    assert stats.network == [NetworkStats(endpoint_id="e")]
    assert from_json(ContainerProperties, b'{"ID":"x","siloguid":"g"}') == ContainerProperties(
        id="x", silo_guid="g"
    )
    assert from_json(ComputeSystemQuery, b'{"IDS":["a"]}').ids == ["a"]
    assert from_dict(HNSEndpoint, {"ipaddress": "10.0.0.2"}).ip_address == "10.0.0.2"


def test_case_folding_is_gos_simple_folding() -> None:
    # Go folds the Kelvin sign to k, but never folds "ß" to "ss" as str.casefold does.
    assert from_json(HvRuntime, '{"S\u212aipTemplate":true}').skip_template is True
    assert from_json(Statistics, '{"Proce\u00dfor":{"TotalRuntime100ns":1}}') == Statistics()


def test_map_keys_are_data_and_keep_their_case() -> None:
    config = from_json(ProcessConfig, b'{"environment":{"Path":"/bin","path":"/usr/bin"}}')
    assert config.environment == {"Path": "/bin", "path": "/usr/bin"}


def test_a_later_duplicate_key_wins_as_in_go() -> None:
    assert from_json(ContainerConfig, b'{"hostname":"a","HostName":"b"}').host_name == "b"
    assert from_json(ContainerConfig, b'{"HostName":"b","hostname":"a"}').host_name == "a"


def test_unknown_fields_are_ignored() -> None:
    config = from_json(
        ContainerConfig, b'{"Name":"n","DNSSearchList":"a,b","MappedVirtualDisks":[{"x":1}]}'
    )
    assert config == ContainerConfig(name="n")


def test_null_means_the_default() -> None:
    nulls = {encode: None for _, encode in _encode_names(ContainerConfig)}
    assert from_dict(ContainerConfig, nulls) == ContainerConfig()
    assert from_dict(ContainerConfig, nulls).system_type == "Container"
    assert from_json(ContainerProperties, b'{"Statistics":null,"ProcessList":null}') == (
        ContainerProperties()
    )
    assert from_json(ContainerConfig, b"null") == ContainerConfig()
    assert from_json(list[Layer], b"null") == []


def test_null_elements_are_go_zero_values() -> None:
    config = from_json(
        ContainerConfig, b'{"EndpointList":[null,"e"],"Layers":[null,{"ID":"a","Path":null}]}'
    )
    assert config.endpoint_list == ["", "e"]
    assert config.layers == [Layer(), Layer(id="a")]
    assert from_json(ProcessConfig, b'{"Environment":{"A":null}}').environment == {"A": ""}


def test_null_after_a_value_acts_as_gos_does() -> None:
    # Go leaves a non-pointer field as it was, and sets a pointer or slice to nil.
    loaded = from_json(
        ContainerConfig,
        b'{"Name":"a","name":null,"HvRuntime":{"ImagePath":"x"},"hvruntime":null,'
        b'"Layers":[{"ID":"l"}],"layers":null}',
    )
    assert loaded == ContainerConfig(name="a")


def test_go_zero_time_loads_as_none() -> None:
    stats = from_json(
        Statistics,
        b'{"Timestamp":"0001-01-01T00:00:00Z","ContainerStartTime":"0001-01-01T00:00:00Z"}',
    )
    assert stats.timestamp is None
    assert stats.container_start_time is None
    item = from_json(ProcessListItem, b'{"CreateTimestamp":"0001-01-01T00:00:00Z","ProcessId":1}')
    assert item == ProcessListItem(process_id=1)
    assert from_json(Statistics, b'{"Timestamp":null}').timestamp is None


def test_console_size_behaves_as_a_go_array() -> None:
    assert from_json(ProcessConfig, b'{"ConsoleSize":[25,80]}').console_size == (25, 80)
    assert from_json(ProcessConfig, b'{"ConsoleSize":[25]}').console_size == (25, 0)
    assert from_json(ProcessConfig, b'{"ConsoleSize":[25,80,3]}').console_size == (25, 80)
    assert from_json(ProcessConfig, b'{"ConsoleSize":null}').console_size == (0, 0)


def test_unsigned_bounds_are_gos() -> None:
    top = 2**64 - 1
    stats = from_json(Statistics, f'{{"Network":[{{"BytesSent":{top}}}]}}')
    assert stats.network[0].bytes_sent == top
    assert from_json(HNSEndpoint, b'{"PrefixLength":255}').prefix_length == 255
    assert from_json(NatPolicy, b'{"ExternalPort":65535}').external_port == 65535
    assert from_json(ContainerConfig, b'{"ProcessorMaximum":-1}').processor_maximum == -1


# ------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("cls", "data", "where"),
    [
        (ContainerConfig, '{"ProcessorWeight":"512"}', "$.ProcessorWeight"),
        (ContainerConfig, '{"processorweight":-1}', "$.ProcessorWeight"),
        (ContainerConfig, '{"ProcessorCount":4294967296}', "$.ProcessorCount"),
        (ContainerConfig, '{"MemoryMaximumInMB":1.5}', "$.MemoryMaximumInMB"),
        (ContainerConfig, '{"MemoryMaximumInMB":9223372036854775808}', "$.MemoryMaximumInMB"),
        (ContainerConfig, '{"HvPartition":1}', "$.HvPartition"),
        (ContainerConfig, '{"Layers":{}}', "$.Layers"),
        (ContainerConfig, '{"Layers":[{"ID":"a"},{"ID":5}]}', "$.Layers[1].ID"),
        (ContainerConfig, '{"HvRuntime":{"SkipTemplate":"yes"}}', "$.HvRuntime.SkipTemplate"),
        (ContainerConfig, '{"MappedDirectories":[{"IOPSMaximum":-5}]}', "IOPSMaximum"),
        (ContainerConfig, "[]", "Expected `object`"),
        (ProcessConfig, '{"ConsoleSize":[-1,0]}', "$.ConsoleSize[0]"),
        (ProcessConfig, '{"Environment":{"A":1}}', "$.Environment"),
        (ProcessListItem, '{"ProcessId":true}', "$.ProcessId"),
        (ProcessListItem, '{"ProcessId":4294967296}', "$.ProcessId"),
        (Statistics, '{"Network":[{"BytesSent":18446744073709551616}]}', "$.Network[0].BytesSent"),
        (Statistics, '{"Timestamp":"yesterday"}', "$.Timestamp"),
        (Statistics, '{"Timestamp":"2016-10-26T12:00:00"}', "$.Timestamp"),
        (Statistics, '{"Memory":{"MemoryUsageCommitBytes":-1}}', "$.Memory.MemoryUsageCommitBytes"),
        (HNSEndpoint, '{"PrefixLength":256}', "$.PrefixLength"),
        (HNSEndpoint, '{"IPAddress":"300.1.1.1"}', "IPAddress"),
        (HNSEndpoint, '{"IPAddress":"fe80::1%eth0"}', "IPAddress"),
        (HNSNetwork, '{"Subnets":[{"Policies":["x"]}]}', "$.Subnets[0].Policies[0]"),
        (HNSNetwork, '{"DNSServerCompartment":-1}', "$.DNSServerCompartment"),
        (NatPolicy, '{"InternalPort":65536}', "$.InternalPort"),
        (VlanPolicy, '{"VLAN":-1}', "$.VLAN"),
    ],
)
def test_invalid_values_raise_invalid_config_naming_the_field(
    cls: type[Document], data: str, where: str
) -> None:
    with pytest.raises(InvalidConfigError) as info:
        from_json(cls, data)
    assert info.value.operation == f"Decode{cls.__name__}"
    assert where in str(info.value)
    assert isinstance(info.value, ValueError)
    assert isinstance(info.value.__cause__, msgspec.ValidationError)
    with pytest.raises(InvalidConfigError):
        from_dict(cls, json.loads(data))


def test_malformed_json_raises_invalid_config() -> None:
    with pytest.raises(InvalidConfigError, match="malformed JSON") as info:
        from_json(ContainerConfig, b'{"Name":')
    assert info.value.operation == "DecodeContainerConfig"


def test_list_documents_name_their_element_type() -> None:
    with pytest.raises(InvalidConfigError, match=r"\$\[1\]\.ProcessId") as info:
        from_json(list[ProcessListItem], b'[{"ProcessId":1},{"ProcessId":"x"}]')
    assert info.value.operation == "DecodeProcessListItemList"


def test_validate_checks_a_document_built_in_python() -> None:
    validate(ContainerConfig(processor_weight=10, layers=[Layer(id="a")]))
    with pytest.raises(InvalidConfigError, match=r"\$\.ProcessorWeight") as info:
        validate(ContainerConfig(processor_weight=-1))
    assert info.value.operation == "ValidateContainerConfig"
    with pytest.raises(InvalidConfigError, match=r"\$\.Timestamp"):
        validate(Statistics(timestamp=datetime(2016, 10, 26)))
    with pytest.raises(InvalidConfigError, match=r"\$\.Layers\[0\]\.Path"):
        validate(ContainerConfig(layers=[Layer(path=3)]))  # type: ignore[arg-type]


def test_unencodable_values_raise_invalid_config() -> None:
    with pytest.raises(InvalidConfigError) as info:
        to_json(ContainerConfig(name=object()))  # type: ignore[arg-type]
    assert info.value.operation == "EncodeContainerConfig"


def test_an_endpoint_cannot_be_built_with_an_invalid_address() -> None:
    with pytest.raises(ValueError, match="IPAddress"):
        HNSEndpoint(ip_address="not-an-ip")
    assert HNSEndpoint(ip_address="fe80::1").ip_address == "fe80::1"


# --------------------------------------------------- every type, every field set


def _encode_names(cls: type[Document]) -> list[tuple[str, str]]:
    return [(f.name, f.encode_name) for f in msgspec.structs.fields(cls)]


WHEN = datetime(2016, 10, 26, 12, 30, 45, 123456, tzinfo=timezone(timedelta(hours=-7)))


def _non_default(t: mi.Type, name: str) -> Any:
    """A valid value for type *t* that is not the field's default."""
    if isinstance(t, mi.UnionType):
        (member,) = [m for m in t.types if not isinstance(m, mi.NoneType)]
        return _non_default(member, name)
    if isinstance(t, mi.StructType):
        assert issubclass(t.cls, Document)
        return _filled(t.cls)
    if isinstance(t, mi.StrType):
        return "192.0.2.7" if name == "ip_address" else f"{name}-value"
    if isinstance(t, mi.BoolType):
        return True
    if isinstance(t, mi.IntType):
        return 7 if t.le is None else t.le  # also the upper bound of Go's small ints
    if isinstance(t, mi.DateTimeType):
        return WHEN
    if isinstance(t, mi.ListType):
        return [_non_default(t.item_type, name), _non_default(t.item_type, name)]
    if isinstance(t, mi.TupleType):
        return tuple(10 + i for i, _ in enumerate(t.item_types))
    if isinstance(t, mi.DictType):
        if isinstance(t.value_type, mi.AnyType):
            return {"Type": "ACL", "Priority": 100, "RemoteAddresses": ["10.0.0.0/8"]}
        return {"PATH": "/usr/bin:/bin", "HOME": "/root"}
    raise AssertionError(f"no value for {t!r}")


def _filled(cls: type[Document]) -> Document:
    info = mi.type_info(cls)
    assert isinstance(info, mi.StructType)
    return cls(**{f.name: _non_default(f.type, f.name) for f in info.fields})


@pytest.mark.parametrize("cls", ALL_TYPES, ids=lambda c: c.__name__)
def test_every_field_round_trips(cls: type[Document]) -> None:
    obj = _filled(cls)
    for f in msgspec.structs.fields(cls):
        default = f.default_factory() if f.default is msgspec.NODEFAULT else f.default
        assert getattr(obj, f.name) != default, f.name
    data = to_json(obj)
    written = json.loads(data)
    assert list(written) == [encode for _, encode in _encode_names(cls)]
    loaded = from_json(cls, data)
    assert loaded == obj
    assert loaded is not obj
    assert from_dict(cls, to_dict(obj)) == obj
    assert to_json(loaded) == data
    validate(obj)
