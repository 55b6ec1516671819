"""The compute service: containers, processes and their supervision."""

from ._container import (
    Container,
    Process,
    container_state,
    create_container,
    create_container_with_json,
    get_containers,
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
    "open_container",
    "remove_container",
]
