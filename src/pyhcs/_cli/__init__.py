"""The ``pyhcs`` command line: run and manage containers, layers and images.

Every failure is one line on stderr and a non-zero exit (125 for pyhcs's own errors, as
docker does); ``PYHCS_DEBUG=1`` adds the traceback.
"""

from __future__ import annotations

import json
import os
import secrets
import shlex
import sqlite3
import sys
import time

import click

from .. import _layers
from .._compute import (
    container_state,
    create_container,
    get_containers,
    open_container,
    remove_container,
)
from .._errors import HcsError
from .._paths import Roots
from .._registry import Registry
from .._runtime._spec import IdMapping, UserNamespace
from .._schema import ContainerConfig, Layer, ProcessConfig
from . import _compute as _compute_cli
from . import _images
from . import _network as _network_cli
from ._common import attach, fail, parse_env, resolve_container

__all__ = ["main", "cli"]


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def cli() -> None:
    """pyhcs: containers on Linux through hcsshim's API."""


@cli.command(context_settings={"ignore_unknown_options": True,
                               "allow_interspersed_args": False})
@click.option("--rm", "auto_remove", is_flag=True, help="Remove the container when it exits.")
@click.option("-d", "--detach", is_flag=True,
              help="Print the container id and return; `pyhcs logs` shows its output.")
@click.option("--name", default="", help="A name for the container.")
@click.option("--memory", "memory_mb", type=click.IntRange(min=1), default=None,
              help="Memory limit in MB.")
@click.option("--hostname", default="", help="The container's hostname.")
@click.option("-e", "--env", "env", multiple=True, help="KEY=VALUE for the process.")
@click.option("-w", "--workdir", default="", help="Working directory inside the container.")
@click.option("-u", "--user", default="", help="user[:group] (names or numeric ids).")
@click.option("-i", "--interactive", is_flag=True, help="Keep stdin open and attached.")
@click.option("--network", default="", help="Attach to this network (name or id).")
@click.option("-p", "--publish", multiple=True, metavar="HOST:CONTAINER[/udp]",
              help="Map a host port to a container port (needs --network).")
@click.option("--userns", default="", metavar="CONTAINER:HOST:SIZE",
              help="Run in a new user namespace: SIZE uids and gids from CONTAINER map to "
              "HOST onward (e.g. 0:100000:65536).")
@click.argument("image")
@click.argument("command", nargs=-1, type=click.UNPROCESSED)
def run(auto_remove: bool, detach: bool, name: str, memory_mb: int | None, hostname: str,
        env: tuple[str, ...], workdir: str, user: str, interactive: bool, network: str,
        publish: tuple[str, ...], userns: str, image: str, command: tuple[str, ...]) -> None:
    """Run COMMAND in a new container of IMAGE; exit with its exit code.

    With --network, the container gets an endpoint of its own on that network (named
    ``run-<id>``), removed with the container; -p publishes ports through it.
    """
    if publish and not network:
        raise click.UsageError("-p needs --network")
    ports = [_parse_publish(p) for p in publish]
    user_namespace = _parse_userns(userns) if userns else None
    img = _layers.resolve_image(image)
    cfg = img.config
    argv = list(command)
    if argv and argv[0] == "--":
        argv = argv[1:]
    if not argv:
        argv = list(cfg.get("Entrypoint") or []) + list(cfg.get("Cmd") or [])
    elif cfg.get("Entrypoint"):
        argv = list(cfg["Entrypoint"]) + argv
    if not argv:
        raise click.UsageError("no command given and the image has none")
    environment = parse_env(env)
    container_id = secrets.token_hex(32)
    if name and Registry.open(Roots.resolve().db_path).query_one(
            "SELECT 1 FROM containers WHERE name=?", (name,)):
        raise click.ClickException(f"the name {name!r} is already in use")
    endpoints = [_run_endpoint(container_id, network, ports)] if network else []
    config = ContainerConfig(
        name=name, owner="pyhcs",
        layers=[Layer(id=os.path.basename(p), path=p) for p in img.layer_chain],
        memory_maximum_in_mb=memory_mb or 0, host_name=hostname or container_id[:12],
        endpoint_list=endpoints)
    try:
        c = create_container(container_id, config, image_config=cfg,
                             auto_remove=auto_remove and detach, user_namespace=user_namespace)
    except BaseException:
        _drop_run_endpoint(container_id)
        raise
    try:
        c.start()
        p = c.create_process(ProcessConfig(
            command_line=shlex.join(argv), environment=environment,
            working_directory=workdir, user=user,
            create_std_in_pipe=interactive,
            create_std_out_pipe=not detach, create_std_err_pipe=not detach),
            log_output=detach)  # kept by the supervisor for `pyhcs logs`
    except BaseException:
        _discard(container_id)
        raise
    if p.exec_error:
        p.close()
        _finish_run(container_id, auto_remove)
        fail(f"{argv[0]}: {p.exec_error}", 127 if p.exec_errno == 2 else 126)
    if detach:
        p.close()
        click.echo(container_id)
        return
    code = attach(p, interactive)
    _finish_run(container_id, auto_remove)
    sys.exit(code)


def _parse_userns(spec: str) -> UserNamespace:
    parts = spec.split(":")
    if len(parts) != 3 or not all(p.isascii() and p.isdigit() and len(p) <= 10 for p in parts):
        raise click.BadParameter(f"{spec!r} is not CONTAINER:HOST:SIZE", param_hint="--userns")
    mapping = IdMapping(*(int(p) for p in parts))
    return UserNamespace(uid_map=(mapping,), gid_map=(mapping,))  # InvalidConfigError: checked


def _parse_publish(spec: str) -> tuple[int, int, str]:
    ports, _, proto = spec.partition("/")
    host, sep, inner = ports.partition(":")
    proto = (proto or "tcp").upper()
    try:
        h, i = int(host), int(inner)
    except ValueError:
        h = i = 0
    if not sep or proto not in ("TCP", "UDP") or not (0 < h < 65536 and 0 < i < 65536):
        raise click.BadParameter(f"{spec!r} is not HOST:CONTAINER[/udp]",
                                 param_hint="-p/--publish")
    return h, i, proto


def _run_endpoint(container_id: str, network: str, ports: list[tuple[int, int, str]]) -> str:
    """An endpoint for ``run --network``, publishing *ports*; returns its id."""
    from .. import _network
    from .._schema import HNSEndpoint, NatPolicy, to_dict

    policies = [to_dict(NatPolicy(protocol=proto, internal_port=inner, external_port=host))
                for host, inner, proto in ports]
    net = _network.get_network(network)
    ep = _network.create_endpoint(HNSEndpoint(name=f"run-{container_id}", policies=policies),
                                  network=net.id)
    return ep.id


def _drop_run_endpoint(container_id: str) -> None:
    """Delete the endpoint ``run --network`` made for the container, if any."""
    reg = Registry.open(Roots.resolve().db_path)
    try:
        rows = reg.query("SELECT id FROM endpoints WHERE name=?", (f"run-{container_id}",))
    except sqlite3.OperationalError:
        return  # no networking tables: nothing was made
    if rows:
        from .. import _network

        for r in rows:
            try:
                _network.delete_endpoint(r["id"])
            except HcsError:
                pass


def _finish_run(container_id: str, auto_remove: bool) -> None:
    c = open_container(container_id)
    c.wait()
    if auto_remove:
        remove_container(container_id)
        _drop_run_endpoint(container_id)


def _discard(container_id: str) -> None:
    try:
        remove_container(container_id, force=True)
    except HcsError:
        pass
    _drop_run_endpoint(container_id)


@cli.command()
@click.option("-a", "--all", "show_all", is_flag=True, help="Show stopped containers too.")
@click.option("--json", "as_json", is_flag=True, help="JSON output.")
def ps(show_all: bool, as_json: bool) -> None:
    """List containers."""
    get_containers()  # runs recovery for supervisors that died
    reg = Registry.open(Roots.resolve().db_path)
    rows = [dict(r) for r in reg.query(
        "SELECT id, name, state, exit_code, exit_type, created FROM containers "
        "WHERE state != 'creating' ORDER BY created")]
    for r in rows:
        if r["state"] in ("running", "paused"):
            # the supervisor records pause and resume in its status file: fold it in
            r.update({k: v for k, v in container_state(r["id"]).items() if k in r})
    if not show_all:
        rows = [r for r in rows if r["state"] != "stopped"]
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    click.echo(f"{'CONTAINER ID':<14}{'NAME':<20}{'STATE':<10}{'EXIT':<6}CREATED")
    for r in rows:
        created = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r["created"]))
        code = "" if r["exit_code"] is None else str(r["exit_code"])
        click.echo(f"{r['id'][:12]:<14}{r['name'][:19]:<20}{r['state']:<10}{code:<6}{created}")


@cli.command()
@click.argument("container")
def inspect(container: str) -> None:
    """Print a container's record as JSON (state, exit code, config)."""
    cid = resolve_container(container)
    state = container_state(cid)
    state["config"] = json.loads(state["config"])
    state["config"].pop("_pyhcs_image", None)
    click.echo(json.dumps(state, indent=2))


@cli.command()
@click.option("-f", "--force", is_flag=True, help="Terminate a running container first.")
@click.argument("containers", nargs=-1, required=True)
def rm(force: bool, containers: tuple[str, ...]) -> None:
    """Remove containers."""
    for ref in containers:
        cid = resolve_container(ref)
        remove_container(cid, force=force)
        _drop_run_endpoint(cid)
        click.echo(ref)


for _command in _compute_cli.commands:
    cli.add_command(_command)
cli.add_command(_images.layer)
cli.add_command(_images.image)
cli.add_command(_network_cli.network)
cli.add_command(_network_cli.endpoint)


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``pyhcs`` console script."""
    from pyhcs._compute._supervisor import prepare_ahead

    prepare_ahead(False)  # one container per command: a pid 1 made ahead would be for nothing
    try:
        cli.main(args=argv, prog_name="pyhcs", standalone_mode=False)
    except click.exceptions.Exit as e:
        sys.exit(e.exit_code)
    except click.ClickException as e:
        fail(e.format_message(), e.exit_code if isinstance(e, click.UsageError) else 125)
    except click.exceptions.Abort:
        fail("aborted", 130)
    except (HcsError, OSError) as e:
        if os.environ.get("PYHCS_DEBUG"):
            raise
        fail(str(e))
    except KeyboardInterrupt:
        sys.exit(130)
    except Exception as e:  # never a traceback for users; PYHCS_DEBUG=1 shows it
        if os.environ.get("PYHCS_DEBUG"):
            raise
        fail(f"internal error: {type(e).__name__}: {e}")
