"""Sandbox size on the real kernel: a sparse ext4 image on a loop device under the overlay."""

from __future__ import annotations

import errno
import io
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from pyhcs._errors import (
    ERR_ELEMENT_NOT_FOUND,
    ERR_VMCOMPUTE_OPERATION_INVALID_STATE,
    InvalidConfigError,
    LayerError,
    NotSupportedError,
)
from pyhcs._layers import (
    DIFF_DRIVER,
    MIN_SANDBOX_SIZE,
    DriverInfo,
    _loopdev,
    create_sandbox_layer,
    destroy_layer,
    expand_sandbox_size,
    get_layer_mount_path,
    get_sandbox_size,
    import_layer_from_tar,
    layer_exists,
    prepare_layer,
    unprepare_layer,
)
from pyhcs._paths import Roots

from .tarbuild import build, d, f, mounted

MIB = 1 << 20
GIB = 1 << 30


@pytest.fixture
def info(roots: Roots) -> DriverInfo:
    return DriverInfo()


@pytest.fixture
def base(info: DriverInfo) -> str:
    return import_layer_from_tar(
        info, "base", io.BytesIO(build([d("etc"), f("etc/hello", b"hello\n")]))
    )


def image_of(info: DriverInfo, layer_id: str) -> str:
    return os.path.join(info.home_dir, layer_id, "sandbox.img")


def loops_of(info: DriverInfo, layer_id: str) -> list[str]:
    return _loopdev.backing_devices(image_of(info, layer_id))


@contextmanager
def prepared(info: DriverInfo, layer_id: str, parents: list[str]) -> Iterator[Path]:
    prepare_layer(info, layer_id, parents)
    try:
        yield Path(get_layer_mount_path(info, layer_id))
    finally:
        unprepare_layer(info, layer_id)


def fill(path: Path, limit: int) -> tuple[int, int | None]:
    """Write zeros-free data to *path* until *limit* bytes or an error: (written, errno)."""
    chunk = os.urandom(MIB)  # not zeros: nothing may store it sparsely
    written = 0
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        while written < limit:
            try:
                n = os.write(fd, chunk)
            except OSError as e:
                return written, e.errno
            written += n
            if n < len(chunk):  # a short write: the next one reports why
                continue
        try:
            os.fsync(fd)
        except OSError as e:
            return written, e.errno
        return written, None
    finally:
        os.close(fd)


def allocated(path: str) -> int:
    return os.stat(path).st_blocks * 512


def has_cap_sys_resource() -> bool:
    with open("/proc/self/status") as fh:
        eff = next(int(line.split()[1], 16) for line in fh if line.startswith("CapEff:"))
    return bool(eff & (1 << 24))


# -- size --------------------------------------------------------------------------------------


def test_a_sandbox_has_no_size_unless_asked(info: DriverInfo, base: str) -> None:
    create_sandbox_layer(info, "sb", "base", [base])
    assert not os.path.exists(image_of(info, "sb"))
    with pytest.raises(NotSupportedError):
        get_sandbox_size(info, "sb")
    with prepared(info, "sb", [base]) as root:
        # bounded by the store's own file system
        assert os.statvfs(root).f_blocks == os.statvfs(info.home_dir).f_blocks
    destroy_layer(info, "sb")


DEFAULT_SANDBOX_SIZE = 20 << 30  # hcsshim's default sandbox size


def test_size_is_what_the_rootfs_reports(info: DriverInfo, base: str) -> None:
    create_sandbox_layer(info, "sb", "base", [base], size_bytes=DEFAULT_SANDBOX_SIZE)
    assert get_sandbox_size(info, "sb") == DEFAULT_SANDBOX_SIZE
    # Sparse: a 20 GiB sandbox costs the host a few MiB of metadata.
    assert allocated(image_of(info, "sb")) < 16 * MIB
    with prepared(info, "sb", [base]) as root:
        st = os.statvfs(root)
        # What the container may still write; the file system itself is larger (headroom).
        assert DEFAULT_SANDBOX_SIZE - MIB < st.f_bavail * st.f_frsize <= DEFAULT_SANDBOX_SIZE
        assert st.f_blocks * st.f_frsize > DEFAULT_SANDBOX_SIZE
        assert (root / "etc/hello").read_bytes() == b"hello\n"
        # The container's root never shows the scratch file system's own entries.
        assert sorted(os.listdir(root)) == ["etc"]
    destroy_layer(info, "sb")


def test_sizes_are_checked_and_rounded(info: DriverInfo, base: str) -> None:
    for bad in (MIN_SANDBOX_SIZE - 1, -1):
        with pytest.raises(InvalidConfigError):
            create_sandbox_layer(info, "sb", "base", [base], size_bytes=bad)
        assert not layer_exists(info, "sb")
        assert not os.path.lexists(os.path.join(info.home_dir, "sb"))
    create_sandbox_layer(info, "sb", "base", [base], size_bytes=40 * MIB + 1)
    assert get_sandbox_size(info, "sb") == 41 * MIB
    with pytest.raises(InvalidConfigError):
        expand_sandbox_size(info, "sb", -5)
    destroy_layer(info, "sb")


def test_writing_past_the_size_is_enospc_in_the_sandbox_only(
    info: DriverInfo, base: str
) -> None:
    create_sandbox_layer(info, "small", "base", [base], size_bytes=64 * MIB)
    create_sandbox_layer(info, "other", "base", [base], size_bytes=64 * MIB)
    with prepared(info, "small", [base]) as root, prepared(info, "other", [base]) as other:
        written, err = fill(root / "big", 200 * MIB)
        assert err == errno.ENOSPC
        assert 40 * MIB <= written <= 64 * MIB
        # Full means full for everything in the sandbox, even a small new file...
        with pytest.raises(OSError) as e:
            (root / "etc/more").write_bytes(os.urandom(MIB))
        assert e.value.errno == errno.ENOSPC
        # ...but not for a neighbour, nor for the host's file system.
        assert fill(other / "f", 8 * MIB) == (8 * MIB, None)
        (Path(info.home_dir) / "host-file").write_bytes(os.urandom(MIB))
        # The host holds no more than the sandbox's size for it (and ext4's metadata).
        assert allocated(image_of(info, "small")) <= 64 * MIB + 48 * MIB
        # Deleting gives the space back inside the sandbox.
        os.unlink(root / "big")
        os.sync()
        assert fill(root / "again", 16 * MIB) == (16 * MIB, None)
    for sb in ("small", "other"):
        destroy_layer(info, sb)


def test_a_container_process_gets_enospc(info: DriverInfo, busybox: list[str]) -> None:
    create_sandbox_layer(info, "sb", "", busybox, size_bytes=48 * MIB)
    with prepared(info, "sb", busybox) as root:
        done = subprocess.run(
            ["chroot", str(root), "/bin/sh", "-c",
             "stat -f -c '%a %S' /; yes 0123456789abcdef | dd of=/big bs=4096 count=40000"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert "No space left on device" in done.stderr
        avail, bsize = map(int, done.stdout.split())
        assert 40 * MIB < avail * bsize <= 48 * MIB
        assert 40 * MIB < (root / "big").stat().st_size <= 48 * MIB
    destroy_layer(info, "sb")


# -- growing -----------------------------------------------------------------------------------


def test_expand_while_prepared_gives_room_at_once(info: DriverInfo, base: str) -> None:
    create_sandbox_layer(info, "sb", "base", [base], size_bytes=64 * MIB)
    with prepared(info, "sb", [base]) as root:
        written, err = fill(root / "first", 200 * MIB)
        assert err == errno.ENOSPC
        before = os.statvfs(root)
        keep = os.open(root / "first", os.O_RDONLY)  # in use across the grow
        try:
            assert before.f_bavail * before.f_frsize < MIB
            expand_sandbox_size(info, "sb", 256 * MIB)
            after = os.statvfs(root)
            assert 180 * MIB < after.f_bavail * after.f_frsize <= 256 * MIB - written
            assert fill(root / "second", 128 * MIB) == (128 * MIB, None)
            assert os.fstat(keep).st_size > 40 * MIB
        finally:
            os.close(keep)
        assert get_sandbox_size(info, "sb") == 256 * MIB
    # The size is kept across unprepare/prepare, with the data.
    with prepared(info, "sb", [base]) as root:
        st = os.statvfs(root)
        assert 56 * MIB < st.f_bavail * st.f_frsize < 72 * MIB  # 256 less the 192 written
        assert (root / "second").stat().st_size == 128 * MIB
    destroy_layer(info, "sb")


def test_expand_while_unprepared_applies_at_prepare(info: DriverInfo, base: str) -> None:
    create_sandbox_layer(info, "sb", "base", [base], size_bytes=64 * MIB)
    expand_sandbox_size(info, "sb", 1 << 30)
    assert get_sandbox_size(info, "sb") == 1 << 30
    with prepared(info, "sb", [base]) as root:
        st = os.statvfs(root)
        assert 1023 * MIB < st.f_bavail * st.f_frsize <= 1024 * MIB
    destroy_layer(info, "sb")


def test_growing_past_the_headroom(info: DriverInfo, base: str) -> None:
    """The file system itself grows: offline when unprepared; online when prepared, which
    needs CAP_SYS_RESOURCE (without it the size stays as it was, and says why)."""
    create_sandbox_layer(info, "sb", "base", [base], size_bytes=64 * MIB)
    image = image_of(info, "sb")
    fs_before = os.stat(image).st_size
    expand_sandbox_size(info, "sb", fs_before + GIB)
    assert os.stat(image).st_size > fs_before + GIB
    assert allocated(image) < 64 * MIB  # still sparse
    with prepared(info, "sb", [base]) as root:
        st = os.statvfs(root)
        assert st.f_bavail * st.f_frsize > fs_before
        assert fill(root / "f", 8 * MIB) == (8 * MIB, None)
        size = get_sandbox_size(info, "sb")
        image_size = os.stat(image).st_size
        if has_cap_sys_resource():
            expand_sandbox_size(info, "sb", image_size + GIB)
            assert get_sandbox_size(info, "sb") == image_size + GIB
            st = os.statvfs(root)
            assert st.f_bavail * st.f_frsize > image_size
        else:
            with pytest.raises(LayerError, match="CAP_SYS_RESOURCE"):
                expand_sandbox_size(info, "sb", image_size + GIB)
            assert get_sandbox_size(info, "sb") == size
            assert os.stat(image).st_size == image_size
            assert fill(root / "g", 8 * MIB) == (8 * MIB, None)
    destroy_layer(info, "sb")


def test_smaller_size_changes_nothing(info: DriverInfo, base: str) -> None:
    """hcsshim's ExpandSandboxSize grows "to at least size bytes": it never shrinks."""
    create_sandbox_layer(info, "sb", "base", [base], size_bytes=96 * MIB)
    with prepared(info, "sb", [base]) as root:
        (root / "data").write_bytes(b"x" * 1000)
        avail = os.statvfs(root).f_bavail
        expand_sandbox_size(info, "sb", 64 * MIB)
        expand_sandbox_size(info, "sb", 0)
        assert get_sandbox_size(info, "sb") == 96 * MIB
        assert os.statvfs(root).f_bavail == avail
        assert (root / "data").read_bytes() == b"x" * 1000
    destroy_layer(info, "sb")


def test_expand_refuses_what_has_no_size(info: DriverInfo, base: str, roots: Roots) -> None:
    with pytest.raises(LayerError) as e:
        expand_sandbox_size(info, "missing", 1 << 30)
    assert e.value.code is ERR_ELEMENT_NOT_FOUND
    with pytest.raises(LayerError) as e:
        expand_sandbox_size(info, "base", 1 << 30)
    assert e.value.code is ERR_VMCOMPUTE_OPERATION_INVALID_STATE
    diff = DriverInfo(DIFF_DRIVER, info.home_dir)
    with pytest.raises(NotSupportedError):
        create_sandbox_layer(diff, "dsb", "base", [base], size_bytes=64 * MIB)
    assert not layer_exists(diff, "dsb")
    create_sandbox_layer(diff, "dsb", "base", [base])
    with pytest.raises(NotSupportedError):
        expand_sandbox_size(diff, "dsb", 1 << 30)
    destroy_layer(diff, "dsb")


# -- lifecycle and crashes ---------------------------------------------------------------------


def test_unprepare_and_destroy_leave_no_device_or_mount(info: DriverInfo, base: str) -> None:
    create_sandbox_layer(info, "sb", "base", [base], size_bytes=64 * MIB)
    folder = Path(info.home_dir) / "sb"
    assert loops_of(info, "sb") == []  # created, not prepared: nothing attached
    prepare_layer(info, "sb", [base])
    try:
        assert len(loops_of(info, "sb")) == 1
        assert mounted(folder / "scratch") and mounted(folder / "rootfs")
        # The overlay's upper is on the sandbox's file system.
        (Path(get_layer_mount_path(info, "sb")) / "new").write_text("x")
        assert (folder / "upper/new").read_text() == "x"
        assert os.stat(folder / "scratch/upper").st_dev != os.stat(folder).st_dev
        # Destroying a prepared sandbox is refused and leaves it working.
        with pytest.raises(LayerError) as e:
            destroy_layer(info, "sb")
        assert e.value.code is ERR_VMCOMPUTE_OPERATION_INVALID_STATE
        assert len(loops_of(info, "sb")) == 1
    finally:
        unprepare_layer(info, "sb")
    assert not mounted(folder / "scratch") and not mounted(folder / "rootfs")
    assert _detached(info, "sb")
    destroy_layer(info, "sb")
    assert not folder.exists()


def _detached(info: DriverInfo, layer_id: str) -> bool:
    """True once no loop device is bound to the sandbox's image. The autoclear detach
    follows the last release of the file system, which a mount namespace another process
    copied while the sandbox was mounted (other tests on this machine) can hold a moment
    longer; so this waits for it, bounded."""
    deadline = time.monotonic() + 10
    while loops_of(info, layer_id):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def _run_and_die(code: str) -> None:
    """Run *code* in a child Python that then kills itself (as a crash would)."""
    script = textwrap.dedent(code) + "\nimport os, signal\nos.kill(os.getpid(), signal.SIGKILL)\n"
    done = subprocess.run([sys.executable, "-c", script], timeout=60, check=False)
    assert done.returncode == -signal.SIGKILL


def test_prepare_and_destroy_recover_from_a_killed_prepare(
    info: DriverInfo, base: str
) -> None:
    create_sandbox_layer(info, "sb", "base", [base], size_bytes=64 * MIB)
    folder = Path(info.home_dir) / "sb"
    # Killed after mounting the sandbox's file system, before the overlay.
    _run_and_die(
        f"from pyhcs._layers import _sandbox_size\n"
        f"_sandbox_size._mount_volume({str(folder)!r}, 'sb', 'test')\n"
    )
    assert mounted(folder / "scratch") and not mounted(folder / "rootfs")
    with prepared(info, "sb", [base]) as root:
        (root / "f").write_text("x")
        assert len(loops_of(info, "sb")) == 1  # reused, never a second device
    assert not mounted(folder / "scratch") and loops_of(info, "sb") == []
    # Killed again; this time destroy_layer clears it.
    _run_and_die(
        f"from pyhcs._layers import _sandbox_size\n"
        f"_sandbox_size._mount_volume({str(folder)!r}, 'sb', 'test')\n"
    )
    assert mounted(folder / "scratch")
    destroy_layer(info, "sb")
    assert not folder.exists()
    assert not [m for m in Path("/proc/self/mountinfo").read_text().splitlines()
                if str(folder) in m]


def test_a_device_left_bound_is_reused_then_detached(info: DriverInfo, base: str) -> None:
    """A loop device bound to the image without autoclear (losetup by hand, or an older
    pyhcs) is never doubled by prepare, and destroy_layer detaches it."""
    create_sandbox_layer(info, "sb", "base", [base], size_bytes=64 * MIB)
    image = image_of(info, "sb")
    dev = subprocess.run(
        ["losetup", "-f", "--show", image], capture_output=True, text=True, check=True
    ).stdout.strip()
    try:
        with prepared(info, "sb", [base]) as root:
            (root / "f").write_text("x")
            assert loops_of(info, "sb") == [os.path.basename(dev)]
        assert loops_of(info, "sb") == [os.path.basename(dev)]  # not ours to autoclear
        destroy_layer(info, "sb")
        assert loops_of(info, "sb") == []
        assert not os.path.exists(f"/sys/block/{os.path.basename(dev)}/loop/backing_file")
    finally:
        subprocess.run(["losetup", "-d", dev], capture_output=True, check=False)
