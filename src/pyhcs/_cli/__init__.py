"""The ``pyhcs`` command line: run and manage containers, layers and images.

Every failure is one line on stderr and a non-zero exit (125 for pyhcs's own errors, as
docker does); ``PYHCS_DEBUG=1`` adds the traceback.
"""

from __future__ import annotations

import json
import os
import secrets
import shlex
import signal
import sqlite3
import sys
import threading
import time
from typing import IO

import click

from .. import _layers
from .._compute import (
    Process,
    container_state,
    create_container,
    get_containers,
    open_container,
    remove_container,
)
from .._errors import HcsError
from .._paths import Roots
from .._registry import Registry
from .._schema import ContainerConfig, Layer, ProcessConfig
from . import _images
from . import _network as _network_cli

__all__ = ["main", "cli"]

EXIT_PYHCS_ERROR = 125


def _fail(message: str, code: int = EXIT_PYHCS_ERROR) -> None:
    click.echo(f"pyhcs: {message}", err=True)
    sys.exit(code)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def cli() -> None:
    """pyhcs: containers on Linux through hcsshim's API."""


def _resolve_container(ref: str) -> str:
    """A container id from an id, a unique id prefix, or a name."""
    reg = Registry.open(Roots.resolve().db_path)
    rows = reg.query("SELECT id FROM containers WHERE id=? OR name=?", (ref, ref))
    if not rows and len(ref) >= 3:
        rows = reg.query("SELECT id FROM containers WHERE id LIKE ? ESCAPE '\\'",
                         (ref.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
                          + "%",))
    if not rows:
        raise click.ClickException(f"no such container: {ref}")
    if len(rows) > 1:
        raise click.ClickException(f"{ref} matches {len(rows)} containers; be more specific")
    return str(rows[0]["id"])


def _pump(src: IO[bytes], dst: IO[bytes]) -> None:
    fd = src.fileno()
    out = dst.fileno()
    while True:
        chunk = os.read(fd, 1 << 16)
        if not chunk:
            break
        view = memoryview(chunk)
        while view:
            n = os.write(out, view)
            view = view[n:]
    src.close()


@cli.command(context_settings={"ignore_unknown_options": True,
                               "allow_interspersed_args": False})
@click.option("--rm", "auto_remove", is_flag=True, help="Remove the container when it exits.")
@click.option("-d", "--detach", is_flag=True, help="Print the container id and return.")
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
@click.argument("image")
@click.argument("command", nargs=-1, type=click.UNPROCESSED)
def run(auto_remove: bool, detach: bool, name: str, memory_mb: int | None, hostname: str,
        env: tuple[str, ...], workdir: str, user: str, interactive: bool, network: str,
        publish: tuple[str, ...], image: str, command: tuple[str, ...]) -> None:
    """Run COMMAND in a new container of IMAGE; exit with its exit code.

    With --network, the container gets an endpoint of its own on that network (named
    ``run-<id>``), removed with the container; -p publishes ports through it.
    """
    if publish and not network:
        raise click.UsageError("-p needs --network")
    ports = [_parse_publish(p) for p in publish]
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
    environment = {}
    for item in env:
        k, sep, v = item.partition("=")
        if not sep:
            v = os.environ.get(k, "")
        environment[k] = v
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
                             auto_remove=auto_remove and detach)
    except BaseException:
        _drop_run_endpoint(container_id)
        raise
    try:
        c.start()
        p = c.create_process(ProcessConfig(
            command_line=shlex.join(argv), environment=environment,
            working_directory=workdir, user=user,
            create_std_in_pipe=interactive,
            create_std_out_pipe=not detach, create_std_err_pipe=not detach))
    except BaseException:
        _discard(container_id)
        raise
    if p.exec_error:
        p.close()
        _finish_run(container_id, auto_remove)
        _fail(f"{argv[0]}: {p.exec_error}", 127 if p.exec_errno == 2 else 126)
    if detach:
        p.close()
        click.echo(container_id)
        return
    code = _attach(p, interactive)
    _finish_run(container_id, auto_remove)
    sys.exit(code)


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


def _attach(p: Process, interactive: bool) -> int:
    stdin, stdout, stderr = p.stdio()
    threads = []
    for src, dst in ((stdout, sys.stdout.buffer), (stderr, sys.stderr.buffer)):
        if src is not None:
            t = threading.Thread(target=_pump, args=(src, dst), daemon=True)
            t.start()
            threads.append(t)
    if interactive and stdin is not None:
        def feed() -> None:
            try:
                _pump(sys.stdin.buffer, stdin)
            except OSError:
                pass
            try:
                p.close_stdin()
            except HcsError:
                pass
        threading.Thread(target=feed, daemon=True).start()

    def forward(signum: int, _frame: object) -> None:
        try:
            p.signal(signum)
        except HcsError:
            pass

    for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(s, forward)
    code = p.wait()
    for t in threads:
        t.join()
    p.close()
    return code


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
    cid = _resolve_container(container)
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
        cid = _resolve_container(ref)
        remove_container(cid, force=force)
        _drop_run_endpoint(cid)
        click.echo(ref)


cli.add_command(_images.layer)
cli.add_command(_images.image)
cli.add_command(_network_cli.network)
cli.add_command(_network_cli.endpoint)


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``pyhcs`` console script."""
    try:
        cli.main(args=argv, prog_name="pyhcs", standalone_mode=False)
    except click.exceptions.Exit as e:
        sys.exit(e.exit_code)
    except click.ClickException as e:
        _fail(e.format_message(), e.exit_code if isinstance(e, click.UsageError) else 125)
    except click.exceptions.Abort:
        _fail("aborted", 130)
    except (HcsError, OSError) as e:
        if os.environ.get("PYHCS_DEBUG"):
            raise
        _fail(str(e))
    except KeyboardInterrupt:
        sys.exit(130)
    except Exception as e:  # never a traceback for users; PYHCS_DEBUG=1 shows it
        if os.environ.get("PYHCS_DEBUG"):
            raise
        _fail(f"internal error: {type(e).__name__}: {e}")
