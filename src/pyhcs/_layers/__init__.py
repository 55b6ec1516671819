"""The layer store: hcsshim's layer functions on Linux, over overlayfs.

hcsshim's graph driver keeps each layer in a folder under ``DriverInfo.home_dir`` and stacks
them with a file-system filter; pyhcs does the same with overlayfs (filter flavour, 1) or
with full copies (diff flavour, 0). Every layer is also a row of the registry's ``layers``
table (id, parent, kind, path, flavour, state, digest, size, created); a folder becomes
visible only once it is complete and its row is written.

On-disk format
--------------

::

    <home_dir>/                         mode 0700 (default: $PYHCS_ROOT/layers)
      <id>/                             one layer folder; "parent layer paths" are these
        fs/                             the layer's files, overlay style:
                                          whiteout  = character device 0:0 named as the
                                                      hidden entry
                                          opaque dir = xattr trusted.overlay.opaque=y
        upper/   work/                  sandbox only: overlay upperdir and workdir (filter
                                          flavour: links into scratch/)
        sandbox.img  scratch/           sandbox only, filter flavour: its own file system of
                                          the sandbox's size, and where it is mounted
                                          (see pyhcs._layers._sandbox_size)
        rootfs/                         sandbox only: where prepare_layer makes the
                                          container's root (overlay mount point; for the
                                          diff flavour a full copy of the chain)
        .activations                    activate_layer's count (absent: 0)
        .diff-populated                 diff flavour: rootfs/ holds the copied chain
        .unpublished                    only between the folder's rename and its registry
                                          row (see "Crash safety")
      .tmp-<id>-<random>/               an import or creation in progress (renamed to <id>
                                          on success, removed on failure)
      .trash-<id>-<random>/             a destroyed layer being removed

Kinds: ``base`` (no parent: imported rootfs, or ``create_layer`` without parent), ``layer``
(read-only, with a parent), ``sandbox`` (read-write, for a container). States: ``ready`` or
``prepared``. Ids are 1-128 characters of ``[A-Za-z0-9_.-]`` starting with a letter or
digit, unique per registry.

Archives are imported by a streaming extractor that refuses anything that could write
outside ``fs/`` (see :mod:`pyhcs._layers._extract` for the rules, limits and xattr
policy). Layers move in and out entry by entry (:func:`new_layer_reader`,
:func:`new_layer_writer`, :mod:`pyhcs._layers._stream`), as deterministic OCI tars
(:func:`export_layer_to_tar`, :func:`import_layer_from_tar`: plain, gzip, zstd) or in
pyhcs's folder transport format (:func:`export_layer`, :func:`import_layer`; see
:mod:`pyhcs._layers._transport`). Parent chains longer than one overlay mount's options
allow are mounted with the new mount API (:mod:`pyhcs._layers._overlay`).

Crash safety: every temporary folder (``.tmp-*``, ``.trash-*``) is locked (flock) by the
process filling it; the next operation that creates a folder in the home removes those
whose process died, so a ``kill -9`` mid-import leaves nothing registered and nothing that
outlives the next store operation. A finished folder is renamed to ``<id>`` before its
registry row is written; in between it holds an empty ``.unpublished`` file and stays
locked. A folder with that file, no row and no lock (its process was killed in that window)
is removed by the first creating operation of each process in that home, and by any later
import or creation of the same id; folders without the file are never removed that way.

Images (:func:`import_image`, :func:`resolve_image`...) name layer chains and carry an
image config; :func:`ensure_busybox_image` builds a small real image from the host's
static busybox.
"""

from __future__ import annotations

from pyhcs._layers._busybox import BUSYBOX_CONFIG, build_busybox_tar, ensure_busybox_image
from pyhcs._layers._extract import DEFAULT_MAX_SIZE, MAX_ENTRIES, MAX_HEADER_SIZE
from pyhcs._layers._images import (
    IMAGE_CONFIG_KEYS,
    ImageArchiveError,
    ImageInfo,
    ImageNotFoundError,
    ProgressCallback,
    import_image,
    list_images,
    remove_image,
    resolve_image,
)
from pyhcs._layers._sandbox_size import (
    MIN_SANDBOX_SIZE,
    expand_sandbox_size,
    get_sandbox_size,
)
from pyhcs._layers._store import (
    DIFF_DRIVER,
    FILTER_DRIVER,
    DriverInfo,
    LayerDescriptor,
    activate_layer,
    create_layer,
    create_sandbox_layer,
    deactivate_layer,
    destroy_layer,
    discard_sandbox,
    get_layer_mount_path,
    get_shared_base_images,
    import_layer_from_tar,
    layer_exists,
    layer_paths_to_descriptors,
    prepare_layer,
    process_base_layer,
    process_utility_vm_image,
    unprepare_layer,
    wait_for_trash,
)
from pyhcs._layers._stream import EntryType, LayerEntry, LayerReader, LayerWriter
from pyhcs._layers._transport import (
    TarExport,
    export_layer,
    export_layer_to_tar,
    import_layer,
    new_layer_reader,
    new_layer_writer,
)

__all__ = [
    "BUSYBOX_CONFIG",
    "DEFAULT_MAX_SIZE",
    "DIFF_DRIVER",
    "FILTER_DRIVER",
    "IMAGE_CONFIG_KEYS",
    "MAX_ENTRIES",
    "MAX_HEADER_SIZE",
    "MIN_SANDBOX_SIZE",
    "DriverInfo",
    "EntryType",
    "ImageArchiveError",
    "ImageInfo",
    "ImageNotFoundError",
    "LayerDescriptor",
    "LayerEntry",
    "LayerReader",
    "LayerWriter",
    "ProgressCallback",
    "TarExport",
    "activate_layer",
    "build_busybox_tar",
    "create_layer",
    "create_sandbox_layer",
    "deactivate_layer",
    "destroy_layer",
    "discard_sandbox",
    "ensure_busybox_image",
    "export_layer",
    "export_layer_to_tar",
    "expand_sandbox_size",
    "get_layer_mount_path",
    "get_sandbox_size",
    "get_shared_base_images",
    "import_image",
    "import_layer",
    "import_layer_from_tar",
    "layer_exists",
    "layer_paths_to_descriptors",
    "list_images",
    "new_layer_reader",
    "new_layer_writer",
    "prepare_layer",
    "process_base_layer",
    "process_utility_vm_image",
    "remove_image",
    "resolve_image",
    "unprepare_layer",
    "wait_for_trash",
]
