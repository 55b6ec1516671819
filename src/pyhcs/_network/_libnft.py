"""libnftables through ctypes: ``nft`` without a subprocess.

Running ``nft -f -`` costs a fork, an exec and libnftables' start-up (about 7 ms); calling
the library in-process costs a fraction of a millisecond. The command text is the same
as ``nft``'s, a buffer is applied as one transaction, and a failure is reported with
``nft``'s own error message.

Every call gets a context of its own (about 0.1 ms), made in the calling thread's
network namespace and freed after. A context kept between calls would also keep
libnftables' cache of the ruleset, which other processes change meanwhile; libnftables
1.0.6 (Debian 12) aborts the process on some such stale caches. Calls are also serialised:
that version keeps some tables in globals that freeing any context releases.

If ``libnftables.so.1`` cannot be loaded (nftables not installed as a library) the
callers fall back on the ``nft`` command.
"""

from __future__ import annotations

import ctypes
import os
import threading

__all__ = ["available", "run", "LibnftError"]

_NFT_CTX_DEFAULT = 0
_NFT_CTX_OUTPUT_JSON = 1 << 4


class LibnftError(OSError):
    """libnftables refused a buffer (nothing of it was applied); the message is nft's."""


def _load() -> ctypes.CDLL | None:
    try:
        lib = ctypes.CDLL("libnftables.so.1", use_errno=True)
    except OSError:
        return None
    lib.nft_ctx_new.restype = ctypes.c_void_p
    lib.nft_ctx_new.argtypes = [ctypes.c_uint32]
    lib.nft_ctx_free.restype = None
    lib.nft_ctx_free.argtypes = [ctypes.c_void_p]
    lib.nft_ctx_buffer_output.restype = ctypes.c_int
    lib.nft_ctx_buffer_output.argtypes = [ctypes.c_void_p]
    lib.nft_ctx_buffer_error.restype = ctypes.c_int
    lib.nft_ctx_buffer_error.argtypes = [ctypes.c_void_p]
    lib.nft_ctx_get_output_buffer.restype = ctypes.c_char_p
    lib.nft_ctx_get_output_buffer.argtypes = [ctypes.c_void_p]
    lib.nft_ctx_get_error_buffer.restype = ctypes.c_char_p
    lib.nft_ctx_get_error_buffer.argtypes = [ctypes.c_void_p]
    lib.nft_ctx_output_get_flags.restype = ctypes.c_uint
    lib.nft_ctx_output_get_flags.argtypes = [ctypes.c_void_p]
    lib.nft_ctx_output_set_flags.restype = None
    lib.nft_ctx_output_set_flags.argtypes = [ctypes.c_void_p, ctypes.c_uint]
    lib.nft_run_cmd_from_buffer.restype = ctypes.c_int
    lib.nft_run_cmd_from_buffer.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
    return lib


_lib = _load()
_lock = threading.Lock()


def available() -> bool:
    """True if libnftables could be loaded and can be used by this process now.

    libnftables waits on its netlink socket with select(), which aborts the whole process
    (glibc's fortify check) if that socket's descriptor is 1024 or more. A process with
    that many descriptors open uses the ``nft`` command instead."""
    return _lib is not None and _lowest_free_fd() < _FD_SETSIZE - 64


_FD_SETSIZE = 1024


def _lowest_free_fd() -> int:
    fd = os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC)  # the kernel gives the lowest free
    os.close(fd)
    return fd


class _Ctx:
    """One ``struct nft_ctx`` with buffered output and errors; freed when dropped."""

    def __init__(self) -> None:
        assert _lib is not None
        ptr = _lib.nft_ctx_new(_NFT_CTX_DEFAULT)
        if not ptr:
            raise LibnftError(ctypes.get_errno() or 12, "nft_ctx_new failed")
        self.ptr: int = ptr
        if _lib.nft_ctx_buffer_output(ptr) or _lib.nft_ctx_buffer_error(ptr):
            _lib.nft_ctx_free(ptr)
            raise LibnftError(12, "cannot buffer libnftables output")
        self.flags = int(_lib.nft_ctx_output_get_flags(ptr))

    def run(self, script: str, *, json_output: bool = False) -> str:
        assert _lib is not None
        _lib.nft_ctx_output_set_flags(
            self.ptr, self.flags | (_NFT_CTX_OUTPUT_JSON if json_output else 0))
        rc = _lib.nft_run_cmd_from_buffer(self.ptr, script.encode())
        # read both buffers every time: reading one resets it for the next command
        out = (_lib.nft_ctx_get_output_buffer(self.ptr) or b"").decode(errors="replace")
        err = (_lib.nft_ctx_get_error_buffer(self.ptr) or b"").decode(errors="replace")
        if rc != 0:
            raise LibnftError(rc if rc > 0 else 1, err.strip() or "nft failed")
        return out

    def free(self) -> None:
        if _lib is not None and self.ptr:
            _lib.nft_ctx_free(self.ptr)
            self.ptr = 0


def run(script: str, *, json_output: bool = False) -> str:
    """Apply *script* (nft's command language) as one transaction; return nft's output.

    Raises :class:`LibnftError` with nft's message if the buffer is refused, and
    ``OSError(ENOSYS)`` if libnftables is not available.
    """
    if _lib is None:
        raise OSError(38, "libnftables.so.1 is not available")
    with _lock:
        ctx = _Ctx()
        try:
            return ctx.run(script, json_output=json_output)
        finally:
            ctx.free()
