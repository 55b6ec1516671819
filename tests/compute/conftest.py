from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator

import pytest

import pyhcs


def pytest_runtest_setup(item: pytest.Item) -> None:
    """Skip ``native_only`` tests when the suite runs on an OCI runtime (PYHCS_RUNTIME)."""
    marker = item.get_closest_marker("native_only")
    if marker is not None and os.environ.get("PYHCS_RUNTIME", "native") not in ("", "native"):
        pytest.skip(f"native runtime only: {marker.args[0]}")


@pytest.fixture
def make_container(busybox: list[str], unique_id: str
                   ) -> Iterator[Callable[..., pyhcs.Container]]:
    """Create (not start) containers on busybox; every one is removed at teardown."""
    made: list[str] = []

    def make(*, user_namespace: pyhcs.UserNamespace | None = None, runtime: str | None = None,
             **fields: object) -> pyhcs.Container:
        cid = f"{unique_id}-{len(made)}"
        layers = [pyhcs.Layer(id=p.rsplit("/", 1)[-1], path=p) for p in busybox]
        config = pyhcs.ContainerConfig(**{"layers": layers, **fields})  # type: ignore[arg-type]
        c = pyhcs.create_container(cid, config, user_namespace=user_namespace, runtime=runtime)
        made.append(cid)
        return c

    yield make
    for cid in made:
        with contextlib.suppress(pyhcs.HcsError):
            pyhcs.remove_container(cid, force=True)


def run(c: pyhcs.Container, command: str, **fields: object) -> tuple[int, bytes, bytes]:
    """Run *command* in the started container *c*; return (exit code, stdout, stderr)."""
    p = c.create_process(pyhcs.ProcessConfig(command_line=command, create_std_out_pipe=True,
                                             create_std_err_pipe=True, **fields))  # type: ignore[arg-type]
    _, out, err = p.stdio()
    assert out is not None and err is not None
    data = out.read()
    edata = err.read()
    code = p.wait(30)
    out.close()
    err.close()
    p.close()
    return code, data, edata
