"""A minimal busybox root file system, built from the host's static busybox.

It gives tests and examples a real image without a registry or network: a deterministic
OCI layer tar (same busybox binary, same bytes, same sha256, so the same layer id) that
:func:`ensure_busybox_image` imports once.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import struct
import subprocess
import tarfile
import tempfile
from pathlib import Path

from pyhcs._errors import ERR_ELEMENT_NOT_FOUND, InvalidConfigError, LayerError
from pyhcs._layers._images import ImageInfo, ImageNotFoundError, import_image, resolve_image
from pyhcs._paths import Roots
from pyhcs._registry import Registry

__all__ = ["BUSYBOX_CONFIG", "build_busybox_tar", "ensure_busybox_image"]

#: The config :func:`ensure_busybox_image` records (OCI image-config field names).
BUSYBOX_CONFIG: dict[str, object] = {
    "Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
    "Cmd": ["/bin/sh"],
    "WorkingDir": "/",
}

_DIRS = {
    "bin": 0o755,
    "dev": 0o755,
    "etc": 0o755,
    "home": 0o755,
    "proc": 0o555,
    "root": 0o700,
    "sys": 0o555,
    "tmp": 0o1777,
    "usr": 0o755,
    "usr/bin": 0o755,
    "var": 0o755,
    "var/tmp": 0o1777,
}
_PASSWD = b"root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/home:/bin/false\n"
_GROUP = b"root:x:0:\nnobody:x:65534:\n"
_APPLET_RE = re.compile(r"[A-Za-z0-9_.\[\]-]+")
_PT_INTERP = 3


def _is_dynamic(elf: bytes) -> bool:
    """True if the ELF image asks for a program interpreter (so needs shared libraries)."""
    if elf[:4] != b"\x7fELF" or len(elf) < 64:
        raise ValueError("not an ELF executable")
    is64 = elf[4] == 2
    end = "<" if elf[5] == 1 else ">"
    if is64:
        (phoff,) = struct.unpack_from(end + "Q", elf, 0x20)
        phentsize, phnum = struct.unpack_from(end + "HH", elf, 0x36)
    else:
        (phoff,) = struct.unpack_from(end + "I", elf, 0x1C)
        phentsize, phnum = struct.unpack_from(end + "HH", elf, 0x2A)
    for i in range(phnum):
        off = phoff + i * phentsize
        if off + 4 > len(elf):
            raise ValueError("truncated ELF program headers")
        (p_type,) = struct.unpack_from(end + "I", elf, off)
        if p_type == _PT_INTERP:
            return True
    return False


def _applets(busybox: str) -> list[str]:
    out = subprocess.run(
        [busybox, "--list"], check=True, capture_output=True, text=True, timeout=60
    ).stdout
    names = sorted({n.strip() for n in out.splitlines() if n.strip()})
    for n in names:
        if not _APPLET_RE.fullmatch(n) or n in (".", ".."):
            raise ValueError(f"unexpected applet name {n!r} from {busybox} --list")
    return [n for n in names if n != "busybox"]


def _info(name: str, kind: bytes, mode: int, size: int = 0, link: str = "") -> tarfile.TarInfo:
    ti = tarfile.TarInfo(name)
    ti.type = kind
    ti.mode = mode
    ti.size = size
    ti.linkname = link
    # Fixed owner and time: the archive's bytes, and so the layer id, depend only on busybox.
    ti.uid = ti.gid = 0
    ti.uname = ti.gname = "root"
    ti.mtime = 0
    return ti


def build_busybox_tar(out_path: str | os.PathLike[str], busybox: str = "/bin/busybox") -> Path:
    """Write a deterministic busybox rootfs layer tar (uncompressed) to *out_path*.

    Contents: ``bin/busybox`` (0755) and one symlink ``bin/<applet> -> busybox`` per applet
    of ``busybox --list`` (``bin/sh`` among them); directories ``dev proc sys tmp`` (1777)
    ``etc root home var/tmp`` (1777) ``usr/bin``; ``etc/passwd`` and ``etc/group`` with root
    and nobody. Entries are sorted, owned by 0:0 and dated 0, so the same busybox always
    gives the same bytes. The file is written to a temporary name and renamed into place.

    Raises :class:`InvalidConfigError` if *busybox* is missing or dynamically linked (the
    image has no shared libraries to offer it).
    """
    op = "BuildBusyboxTar"
    try:
        with open(busybox, "rb") as f:
            binary = f.read()
        if _is_dynamic(binary):
            raise InvalidConfigError(
                op, extra_info=busybox, message="busybox must be statically linked"
            )
        applets = _applets(busybox)
    except (OSError, ValueError, subprocess.SubprocessError) as e:
        raise InvalidConfigError(op, extra_info=busybox, message=f"unusable busybox: {e}") from e

    entries: list[tuple[tarfile.TarInfo, bytes | None]] = []
    for d, mode in _DIRS.items():
        entries.append((_info(d, tarfile.DIRTYPE, mode), None))
    entries.append((_info("bin/busybox", tarfile.REGTYPE, 0o755, len(binary)), binary))
    entries.append((_info("etc/passwd", tarfile.REGTYPE, 0o644, len(_PASSWD)), _PASSWD))
    entries.append((_info("etc/group", tarfile.REGTYPE, 0o644, len(_GROUP)), _GROUP))
    for a in applets:
        entries.append((_info(f"bin/{a}", tarfile.SYMTYPE, 0o777, link="busybox"), None))
    # Sorting by path puts every directory before its contents (a prefix sorts first).
    entries.sort(key=lambda e: e[0].name)

    out = Path(out_path)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", dir=out.parent)
    try:
        # USTAR: no pax records, whose content could vary between Python versions.
        with (
            os.fdopen(fd, "wb") as raw,
            tarfile.open(fileobj=raw, mode="w", format=tarfile.USTAR_FORMAT) as tf,
        ):
            for ti, data in entries:
                tf.addfile(ti, io.BytesIO(data) if data is not None else None)
        os.chmod(tmp, 0o644)
        os.replace(tmp, out)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return out


def ensure_busybox_image(
    name: str = "busybox", *, busybox: str = "/bin/busybox", roots: Roots | None = None
) -> ImageInfo:
    """The image *name*, building it from the host's busybox and importing it if absent.

    An existing image of that name is returned as it is (whatever it contains). Otherwise
    :func:`build_busybox_tar` writes the tar to a temporary folder, :func:`import_image`
    imports it with :data:`BUSYBOX_CONFIG`, and the temporary folder is removed.
    """
    r = roots if roots is not None else Roots.resolve()
    reg = Registry.open(r.db_path)
    if reg.query_one("SELECT 1 FROM images WHERE name = ?", (name,)) is not None:
        try:
            return resolve_image(name, roots=r)
        except ImageNotFoundError:
            pass  # removed meanwhile: build it
        except LayerError as e:
            if e.code is not ERR_ELEMENT_NOT_FOUND:
                raise
    with tempfile.TemporaryDirectory(prefix="pyhcs-busybox-") as d:
        tar = build_busybox_tar(Path(d) / "busybox.tar", busybox)
        return import_image(name, tar, config=dict(BUSYBOX_CONFIG), roots=r)
