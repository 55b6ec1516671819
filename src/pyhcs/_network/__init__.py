"""The host network service (HNS): networks, endpoints and policies on netlink and nftables.

hcsshim's HNS on Linux. The request API (:func:`hns_network_request`,
:func:`hns_list_network_request`, :func:`hns_endpoint_request`, ...) takes and returns
hcsshim's JSON; the typed helpers (:func:`create_network`, :func:`create_endpoint`, ...)
do the same with documents. State lives in the registry; kernel objects are made in the
calling thread's network namespace:

* a ``nat`` network is a bridge ``phbr<id>`` holding each subnet's gateway address, with
  IPv4 forwarding on and the nftables tables ``ip pyhcs_<id>`` (masquerade, port-mapping
  DNAT) and ``bridge pyhcs_<id>`` (endpoint ACLs);
* an endpoint is an address and MAC of its network (IPAM in the registry) plus its policies;
  :func:`attach_endpoint` plugs it into a container's network namespace as a veth pair
  (``phv<id>`` on the host, ``eth0`` inside) and :func:`detach_endpoint` unplugs it;
* a compartment id is the inode of a network namespace with an endpoint attached
  (:func:`endpoint_compartment_id`, :func:`set_current_thread_compartment_id`).

For the compute service: attach each id of ``ContainerConfig.endpoint_list`` with
``attach_endpoint(id, f"/proc/{init_pid}/ns/net", container_id=...)`` once the
container's network namespace exists, write :func:`resolv_conf` into its rootfs, report
:func:`endpoint_statistics` in ``Container.statistics()``, and call
:func:`detach_endpoint` when the container stops (the kernel removes the veth with the
namespace anyway; detaching also clears the record). :func:`restore` rebuilds networks
after a reboot and :func:`recover` cleans up after killed creators.
"""

from pyhcs._network._compartment import (
    get_current_thread_compartment_id,
    set_current_thread_compartment_id,
)
from pyhcs._network._errors import (
    InvalidNetworkRequestError,
    NetworkError,
    NetworkNotSupportedError,
)
from pyhcs._network._request import (
    PolicyList,
    hns_call,
    hns_endpoint_request,
    hns_list_endpoint_request,
    hns_list_network_request,
    hns_network_request,
    hns_policy_list_request,
)
from pyhcs._network._service import (
    NETWORK_TYPES,
    attach_endpoint,
    bridge_name,
    create_endpoint,
    create_network,
    delete_endpoint,
    delete_network,
    detach_endpoint,
    endpoint_compartment_id,
    endpoint_statistics,
    get_endpoint,
    get_network,
    host_ifname,
    list_endpoints,
    list_networks,
    recover,
    resolv_conf,
    restore,
    update_endpoint,
)

__all__ = [
    "NETWORK_TYPES",
    "InvalidNetworkRequestError",
    "NetworkError",
    "NetworkNotSupportedError",
    "PolicyList",
    "attach_endpoint",
    "bridge_name",
    "create_endpoint",
    "create_network",
    "delete_endpoint",
    "delete_network",
    "detach_endpoint",
    "endpoint_compartment_id",
    "endpoint_statistics",
    "get_current_thread_compartment_id",
    "get_endpoint",
    "get_network",
    "hns_call",
    "hns_endpoint_request",
    "hns_list_endpoint_request",
    "hns_list_network_request",
    "hns_network_request",
    "hns_policy_list_request",
    "host_ifname",
    "list_endpoints",
    "list_networks",
    "recover",
    "resolv_conf",
    "restore",
    "set_current_thread_compartment_id",
    "update_endpoint",
]
