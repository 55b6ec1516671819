"""``pyhcs layer ...`` and ``pyhcs image ...``: the layer store and images from the shell.

Long imports and exports draw a progress bar on stderr when stderr is a terminal (and
nothing otherwise, so scripts and pipes see only the result on stdout).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sys
import tempfile
import time
from collections.abc import Iterator
from typing import IO, Any, Literal, cast

import click

from .. import _layers
from .._errors import (
    ERR_ELEMENT_NOT_FOUND,
    ERR_VMCOMPUTE_OPERATION_INVALID_STATE,
    LayerError,
)
from .._paths import Roots
from .._registry import Registry

__all__ = ["image", "layer"]

_CHUNK = 1 << 20


@contextlib.contextmanager
def _progress(description: str) -> Iterator[_layers.ProgressCallback | None]:
    """A progress bar on stderr for the duration of the block, if stderr is a terminal;
    yields the ``progress(done, total)`` callback to feed it (None: no bar)."""
    if not sys.stderr.isatty():
        yield None
        return
    # Imported here: rich takes a noticeable part of a second to import, and most
    # commands never draw a bar.
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        console=Console(stderr=True),
        transient=True,
    ) as bar:
        task = bar.add_task(description, total=None)

        def update(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total or None)

        yield update


class _ReadProgress:
    """A binary file that reports how much of it has been read."""

    def __init__(self, f: IO[bytes], total: int, progress: _layers.ProgressCallback) -> None:
        self._f = f
        self._total = total
        self._done = 0
        self._progress = progress

    def read(self, n: int = -1) -> bytes:
        data = self._f.read(n)
        self._done += len(data)
        self._progress(self._done, self._total)
        return data


def _registry() -> Registry:
    return Registry.open(Roots.resolve().db_path)


def _layer_row(layer_id: str, op: str) -> Any:
    row = _registry().query_one("SELECT * FROM layers WHERE id = ?", (layer_id,))
    if row is None:
        raise LayerError(layer_id, op, ERR_ELEMENT_NOT_FOUND, message="no such layer")
    return row


def _driver(row: Any) -> _layers.DriverInfo:
    return _layers.DriverInfo(int(row["flavour"]), os.path.dirname(row["path"]))


def _container_using(layer_id: str, folder: str) -> str | None:
    """The id of a container whose sandbox is the layer or whose config names it."""
    for c in _registry().query("SELECT id, config, sandbox_layer FROM containers"):
        if c["sandbox_layer"] == layer_id:
            return str(c["id"])
        try:
            doc = json.loads(c["config"])
        except ValueError:
            continue
        if not isinstance(doc, dict):
            continue
        if doc.get("LayerFolderPath") and os.path.realpath(doc["LayerFolderPath"]) == folder:
            return str(c["id"])
        for entry in doc.get("Layers") or []:
            if isinstance(entry, dict) and (
                entry.get("ID") == layer_id
                or (entry.get("Path") and os.path.realpath(entry["Path"]) == folder)
            ):
                return str(c["id"])
    return None


# -- pyhcs layer ------------------------------------------------------------------------------


@click.group()
def layer() -> None:
    """Manage layers."""


@layer.command("import")
@click.option("--parent", default="", help="The id of the parent layer.")
@click.argument("file", type=click.Path(exists=True, dir_okay=False))
def layer_import(parent: str, file: str) -> None:
    """Import an OCI layer tar (plain, gzip or zstd); print the layer id (its sha256)."""
    info = _layers.DriverInfo()
    h = hashlib.sha256()
    with open(file, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    layer_id = h.hexdigest()
    if not _layers.layer_exists(info, layer_id):
        parents = []
        if parent:
            if not _layers.layer_exists(info, parent):
                raise click.ClickException(f"no such layer: {parent}")
            parents = _layers.resolve_image(parent).layer_chain
        with open(file, "rb") as f, _progress("importing layer") as progress:
            source: Any = f
            if progress is not None:
                source = _ReadProgress(f, os.fstat(f.fileno()).st_size, progress)
            _layers.import_layer_from_tar(info, layer_id, source, parents)
    click.echo(layer_id)


@layer.command("export")
@click.option(
    "--compression",
    type=click.Choice(["none", "gzip", "zstd"]),
    default="none",
    show_default=True,
    help="Compression of the tar written.",
)
@click.argument("layer_id", metavar="ID")
@click.argument("file", type=click.Path(dir_okay=False, allow_dash=True))
def layer_export(compression: str, layer_id: str, file: str) -> None:
    """Write layer ID as an OCI layer tar to FILE ('-': stdout)."""
    op = "ExportLayer"
    how = cast(Literal["none", "gzip", "zstd"], compression)
    row = _layer_row(layer_id, op)
    chain = _layers.resolve_image(layer_id).layer_chain
    if file == "-":
        if sys.stdout.isatty():
            raise click.UsageError("refusing to write a tar to a terminal; give a FILE")
        _layers.export_layer_to_tar(sys.stdout.buffer, row["path"], chain[1:], compression=how)
        sys.stdout.buffer.flush()
        return
    target = os.path.abspath(file)
    # Written beside the target and renamed into place: a failed export leaves no file.
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(target)}.", dir=os.path.dirname(target))
    try:
        with os.fdopen(fd, "wb") as out:
            _layers.export_layer_to_tar(out, row["path"], chain[1:], compression=how)
        os.chmod(tmp, 0o644)
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


@layer.command("rm")
@click.argument("layer_ids", nargs=-1, required=True, metavar="ID...")
def layer_rm(layer_ids: tuple[str, ...]) -> None:
    """Remove layers. Refused while an image or container uses one, another layer is built
    on it, or it is prepared."""
    op = "DestroyLayer"
    for layer_id in layer_ids:
        row = _layer_row(layer_id, op)
        container = _container_using(layer_id, os.path.realpath(row["path"]))
        if container is not None:
            raise LayerError(
                layer_id,
                op,
                ERR_VMCOMPUTE_OPERATION_INVALID_STATE,
                message=f"container {container[:12]} uses it",
            )
        _layers.destroy_layer(_driver(row), layer_id)
        click.echo(layer_id)


@layer.command("ls")
@click.option("--json", "as_json", is_flag=True, help="JSON output.")
def layer_ls(as_json: bool) -> None:
    """List layers (sandboxes of containers included)."""
    rows = [
        dict(r)
        for r in _registry().query(
            "SELECT id, parent, kind, state, size, created FROM layers ORDER BY created, id"
        )
    ]
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    click.echo(f"{'LAYER ID':<66}{'KIND':<9}{'STATE':<10}{'PARENT':<14}SIZE")
    for r in rows:
        click.echo(
            f"{r['id']:<66}{r['kind']:<9}{r['state']:<10}{(r['parent'] or '')[:12]:<14}"
            f"{r['size']}"
        )


# -- pyhcs image ------------------------------------------------------------------------------


@click.group()
def image() -> None:
    """Manage images."""


@image.command("ls")
@click.option("--json", "as_json", is_flag=True, help="JSON output.")
def image_ls(as_json: bool) -> None:
    """List images."""
    images = _layers.list_images()
    if as_json:
        click.echo(
            json.dumps(
                [
                    {
                        "name": i.name,
                        "top_layer": i.top_layer,
                        "layers": [os.path.basename(p) for p in i.layer_chain],
                        "config": i.config,
                        "created": i.created,
                    }
                    for i in images
                ],
                indent=2,
            )
        )
        return
    click.echo(f"{'NAME':<32}{'LAYERS':<8}{'TOP LAYER':<14}CREATED")
    for i in images:
        created = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(i.created))
        click.echo(f"{i.name:<32}{len(i.layer_chain):<8}{i.top_layer[:12]:<14}{created}")


@image.command("import")
@click.option("--name", default=None, help="The image's name (default: the archive's own).")
@click.argument("file", type=click.Path(exists=True, dir_okay=False, allow_dash=True))
def image_import(name: str | None, file: str) -> None:
    """Import an OCI image layout tar, a `docker save` tar or a root file system tar
    ('-': stdin) and print the image's name."""
    with _progress("importing image") as progress:
        if file == "-":
            info = _layers.import_image(name, sys.stdin.buffer, progress=progress)
        else:
            info = _layers.import_image(name, file, progress=progress)
    click.echo(info.name)


@image.command("build-busybox")
@click.option("--name", default="busybox", show_default=True)
@click.option(
    "--busybox",
    default="/bin/busybox",
    show_default=True,
    help="A static busybox binary (Debian's busybox-static).",
)
def image_build_busybox(name: str, busybox: str) -> None:
    """Build image NAME offline from a static busybox binary (no download)."""
    info = _layers.ensure_busybox_image(name, busybox=busybox)
    click.echo(f"{info.name} {info.top_layer}")


@image.command("rm")
@click.argument("names", nargs=-1, required=True)
def image_rm(names: tuple[str, ...]) -> None:
    """Remove images; their layers go too unless another image or a container uses them."""
    for n in names:
        _layers.remove_image(n)
        click.echo(n)
