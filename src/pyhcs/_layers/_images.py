"""Images: names for layer chains, with an image config.

An image is a row of the registry's ``images`` table: a *name*, the id of its topmost
layer (the chain below follows the layers' ``parent`` links) and a config (``Env``,
``Cmd``, ``WorkingDir``... as JSON). :func:`import_image` makes a single-layer image from
a rootfs tar; the layer's id is the sha256 of the archive's bytes, so importing the same
archive twice, under any names, stores it once.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass
from typing import IO, Any, BinaryIO

from pyhcs._errors import ERR_ELEMENT_NOT_FOUND, InvalidConfigError, LayerError
from pyhcs._layers._extract import DEFAULT_MAX_SIZE
from pyhcs._layers._store import (
    _ID_RE,
    _KIND_BASE,
    FILTER_DRIVER,
    DriverInfo,
    _check_id,
    _discard,
    _extract_to_temp,
    _publish,
    _registry,
    _roots,
    _row,
    destroy_layer,
)
from pyhcs._paths import Roots
from pyhcs._registry import Registry

__all__ = [
    "ImageInfo",
    "ImageNotFoundError",
    "import_image",
    "list_images",
    "remove_image",
    "resolve_image",
]

_MAX_CHAIN = 128  # deeper than any real image; stops a corrupt parent cycle


class ImageNotFoundError(LayerError):
    """No image (and, where a layer id is accepted, no layer) has this name.

    ``code`` is ``ERR_ELEMENT_NOT_FOUND``, so :func:`pyhcs.is_not_exist` is true.
    """

    def _subject(self) -> str:
        return f"image {self.id}"


@dataclass(frozen=True, slots=True)
class ImageInfo:
    """An image: its name, top layer, layer folders (topmost first) and config."""

    name: str
    #: Id of the topmost layer.
    top_layer: str
    #: Folders of the image's layers, topmost first: the ``parent_layer_paths`` a sandbox
    #: built on this image takes.
    layer_chain: list[str]
    #: The image config (``Env``, ``Cmd``, ``WorkingDir``...), ``{}`` if none was given.
    config: dict[str, Any]
    #: When the name was recorded (seconds since the epoch).
    created: float


def _check_name(name: str, op: str) -> None:
    if (
        not isinstance(name, str)
        or not 0 < len(name) <= 255
        or any(c.isspace() or not c.isprintable() for c in name)
    ):
        raise InvalidConfigError(
            op,
            extra_info=f"name {name!r}",
            message="an image name is 1-255 printable characters without whitespace",
        )


@contextlib.contextmanager
def _images_lock(roots: Roots) -> Iterator[None]:
    """Serialise image bookkeeping (share-or-publish a layer, name it, prune it) across
    processes, so a removal cannot prune a layer an import has just decided to share."""
    os.makedirs(roots.root, 0o700, exist_ok=True)
    fd = os.open(roots.root / ".images.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _chain(reg: Registry, top: str, op: str, name: str) -> list[str]:
    chain: list[str] = []
    layer: str | None = top
    while layer:
        if len(chain) >= _MAX_CHAIN:
            raise LayerError(top, op, None, message="layer chain too deep (a parent cycle?)")
        row = _row(reg, layer)
        if row is None:
            raise LayerError(
                layer,
                op,
                ERR_ELEMENT_NOT_FOUND,
                f"image {name!r}",
                message="a layer of the image is missing",
            )
        chain.append(str(row["path"]))
        layer = row["parent"]
    return chain


def _info(reg: Registry, row: sqlite3.Row, op: str) -> ImageInfo:
    config = json.loads(row["config"] or "{}")
    return ImageInfo(
        name=row["name"],
        top_layer=row["top_layer"],
        layer_chain=_chain(reg, row["top_layer"], op, row["name"]),
        config=config if isinstance(config, dict) else {},
        created=float(row["created"]),
    )


def import_image(
    name: str,
    tar: BinaryIO | IO[bytes] | str | os.PathLike[str],
    *,
    config: dict[str, Any] | None = None,
    max_size: int = DEFAULT_MAX_SIZE,
    roots: Roots | None = None,
) -> ImageInfo:
    """Import the rootfs tar *tar* as a base layer and name it *name*.

    The layer id is the sha256 (hex) of the archive's bytes; if that layer exists it is
    shared, not imported again. The archive is extracted as by
    :func:`~pyhcs._layers.import_layer_from_tar` (same safety, *max_size*). An existing
    image of the same name is re-pointed (as ``docker load`` retags); its old layers stay.
    *config* is stored with the name. Raises :class:`LayerError`.
    """
    op = "ImportImage"
    _check_name(name, op)
    r = _roots(roots)
    reg = _registry(r)
    home = str(r.layers_dir)
    tmp, result = _extract_to_temp(home, "image", tar, max_size, name, op)
    layer_id = result.digest
    folder = os.path.join(home, layer_id)
    with _images_lock(r):
        existing = _row(reg, layer_id)
        if existing is not None and os.path.isdir(existing["path"]):
            _discard(tmp)
        else:
            if existing is not None:
                # Registered but its folder was removed by hand: replace the stale row.
                reg.execute("DELETE FROM layers WHERE id = ?", (layer_id,))
            _publish(
                reg,
                tmp,
                folder,
                layer_id=layer_id,
                op=op,
                parent=None,
                kind=_KIND_BASE,
                flavour=FILTER_DRIVER,
                digest=result.digest,
                size=result.size,
            )
        reg.execute(
            "INSERT OR REPLACE INTO images (name, top_layer, config, created) VALUES (?, ?, ?, ?)",
            (name, layer_id, reg.dumps(config or {}), reg.now()),
        )
    return resolve_image(name, roots=r)


def list_images(*, roots: Roots | None = None) -> list[ImageInfo]:
    """Every image, sorted by name."""
    reg = _registry(roots)
    rows = reg.query("SELECT * FROM images ORDER BY name")
    return [_info(reg, row, "ListImages") for row in rows]


def resolve_image(name_or_layer_id: str, *, roots: Roots | None = None) -> ImageInfo:
    """The image named *name_or_layer_id*, or else the chain whose top is that layer.

    For a bare layer the result's name is the layer id and its config ``{}``. Raises
    :class:`ImageNotFoundError` if neither exists, :class:`LayerError` if a layer of the
    chain is missing.
    """
    op = "ResolveImage"
    reg = _registry(roots)
    row = reg.query_one("SELECT * FROM images WHERE name = ?", (name_or_layer_id,))
    if row is not None:
        return _info(reg, row, op)
    if isinstance(name_or_layer_id, str) and _ID_RE.fullmatch(name_or_layer_id):
        layer = _row(reg, name_or_layer_id)
        if layer is not None:
            return ImageInfo(
                name=name_or_layer_id,
                top_layer=name_or_layer_id,
                layer_chain=_chain(reg, name_or_layer_id, op, name_or_layer_id),
                config={},
                created=float(layer["created"]),
            )
    raise ImageNotFoundError(
        str(name_or_layer_id), op, ERR_ELEMENT_NOT_FOUND, message="no such image or layer"
    )


def remove_image(name: str, *, prune_layers: bool = True, roots: Roots | None = None) -> None:
    """Forget the image *name*; with *prune_layers*, also destroy its layers that nothing
    else uses (no other image's top layer, no other layer's parent, e.g. no sandbox).

    Raises :class:`ImageNotFoundError` for an unknown name; a layer that cannot be
    destroyed raises :class:`LayerError` after the name is gone.
    """
    op = "RemoveImage"
    r = _roots(roots)
    reg = _registry(r)
    with _images_lock(r):
        row = reg.query_one("SELECT * FROM images WHERE name = ?", (name,))
        if row is None:
            raise ImageNotFoundError(name, op, ERR_ELEMENT_NOT_FOUND, message="no such image")
        reg.execute("DELETE FROM images WHERE name = ?", (name,))
        if not prune_layers:
            return
        layer: str | None = row["top_layer"]
        for _ in range(_MAX_CHAIN):
            if not layer:
                break
            lrow = _row(reg, layer)
            if lrow is None:
                break
            used = reg.query_one(
                "SELECT 1 FROM images WHERE top_layer = ? UNION ALL "
                "SELECT 1 FROM layers WHERE parent = ? LIMIT 1",
                (layer, layer),
            )
            if used is not None:
                break
            _check_id(layer, op)
            info = DriverInfo(int(lrow["flavour"]), os.path.dirname(lrow["path"]))
            destroy_layer(info, layer, roots=r)
            layer = lrow["parent"]
