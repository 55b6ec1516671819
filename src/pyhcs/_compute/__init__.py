"""The compute service: containers, processes and their supervision."""

from ._container import (
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

__all__ = [
    "Container",
    "Process",
    "container_state",
    "create_container",
    "create_container_with_json",
    "get_containers",
    "hot_attach_endpoint",
    "hot_detach_endpoint",
    "open_container",
    "remove_container",
]
