"""zstd streams through Debian's ``libzstd.so.1`` (ctypes; Python 3.11 has no zstd module).

Only the streaming API is used (``ZSTD_decompressStream`` / ``ZSTD_compressStream2``), so
memory stays bounded whatever the frame claims: the decoder refuses frames whose window
exceeds 2**27 bytes (128 MiB, zstd's own default limit, set explicitly) and hands out at
most the caller's buffer per call; bounding the total output is the caller's job (the
extractor counts every byte against ``max_size``). Output of the compressor is
deterministic for a given level: single-threaded, no content size, checksum on.
"""

from __future__ import annotations

import ctypes
import io
from typing import IO, Any, BinaryIO

__all__ = ["ZstdError", "ZstdReader", "ZstdWriter", "available"]

_ZSTD_d_windowLogMax = 100
_ZSTD_c_compressionLevel = 100
_ZSTD_c_checksumFlag = 201
_ZSTD_e_continue = 0
_ZSTD_e_end = 2
_WINDOW_LOG_MAX = 27


class ZstdError(Exception):
    """libzstd is missing, or a zstd stream is corrupt or truncated."""


class _Buf(ctypes.Structure):
    # ZSTD_inBuffer and ZSTD_outBuffer share this layout: pointer, size, pos.
    _fields_ = [("ptr", ctypes.c_void_p), ("size", ctypes.c_size_t), ("pos", ctypes.c_size_t)]


_lib: Any = None


def _load() -> Any:
    global _lib
    if _lib is not None:
        return _lib
    try:
        lib = ctypes.CDLL("libzstd.so.1")
    except OSError as e:
        raise ZstdError(f"zstd needs libzstd.so.1 (Debian: libzstd1): {e}") from None
    vp, sz = ctypes.c_void_p, ctypes.c_size_t
    for name, res, args in (
        ("ZSTD_createDCtx", vp, []),
        ("ZSTD_freeDCtx", sz, [vp]),
        ("ZSTD_DCtx_setParameter", sz, [vp, ctypes.c_int, ctypes.c_int]),
        ("ZSTD_decompressStream", sz, [vp, ctypes.POINTER(_Buf), ctypes.POINTER(_Buf)]),
        ("ZSTD_DStreamInSize", sz, []),
        ("ZSTD_createCCtx", vp, []),
        ("ZSTD_freeCCtx", sz, [vp]),
        ("ZSTD_CCtx_setParameter", sz, [vp, ctypes.c_int, ctypes.c_int]),
        (
            "ZSTD_compressStream2",
            sz,
            [vp, ctypes.POINTER(_Buf), ctypes.POINTER(_Buf), ctypes.c_int],
        ),
        ("ZSTD_CStreamOutSize", sz, []),
        ("ZSTD_isError", ctypes.c_uint, [sz]),
        ("ZSTD_getErrorName", ctypes.c_char_p, [sz]),
    ):
        fn = getattr(lib, name)
        fn.restype = res
        fn.argtypes = args
    _lib = lib
    return lib


def available() -> bool:
    """True if libzstd can be loaded."""
    try:
        _load()
    except ZstdError:
        return False
    return True


def _check(lib: Any, ret: int, what: str) -> int:
    if lib.ZSTD_isError(ret):
        raise ZstdError(f"{what}: {lib.ZSTD_getErrorName(ret).decode()}")
    return ret


class ZstdReader(io.RawIOBase):
    """Decompress the zstd stream (one or more frames) read from *src*.

    Raises :class:`ZstdError` for a corrupt stream and ``EOFError`` if the source ends
    inside a frame.
    """

    def __init__(self, src: BinaryIO | IO[bytes]) -> None:
        super().__init__()
        lib = _load()
        self._lib = lib
        self._src = src
        self._ctx = lib.ZSTD_createDCtx()
        if not self._ctx:
            raise MemoryError("ZSTD_createDCtx")
        _check(lib, lib.ZSTD_DCtx_setParameter(self._ctx, _ZSTD_d_windowLogMax, _WINDOW_LOG_MAX),
               "zstd window limit")
        self._chunk = int(lib.ZSTD_DStreamInSize())
        self._data = b""
        self._in = _Buf(None, 0, 0)
        self._eof = False
        self._pending = 0  # last return value: 0 once a frame is complete
        self._started = False

    def readable(self) -> bool:
        return True

    def readinto(self, buf: Any) -> int:
        view = memoryview(buf).cast("B")
        if not view:
            return 0
        target = (ctypes.c_char * len(view)).from_buffer(view)
        out = _Buf(ctypes.addressof(target), len(view), 0)
        lib = self._lib
        while True:
            if self._in.pos >= self._in.size and not self._eof:
                data = self._src.read(self._chunk)
                if not data:
                    self._eof = True
                else:
                    self._data = bytes(data)  # kept referenced while libzstd reads it
                    ptr = ctypes.cast(ctypes.c_char_p(self._data), ctypes.c_void_p)
                    self._in = _Buf(ptr.value, len(self._data), 0)
                    self._started = True
            if self._in.pos >= self._in.size and self._eof and self._pending == 0:
                return 0  # every frame is complete and flushed
            ret = _check(
                lib,
                lib.ZSTD_decompressStream(self._ctx, ctypes.byref(out), ctypes.byref(self._in)),
                "corrupt zstd stream",
            )
            self._pending = ret
            if out.pos:
                return int(out.pos)
            if self._in.pos >= self._in.size and self._eof:
                if ret and self._started:
                    raise EOFError("zstd stream is truncated")
                return 0

    def close(self) -> None:
        if self._ctx:
            self._lib.ZSTD_freeDCtx(self._ctx)
            self._ctx = None
        super().close()


class ZstdWriter(io.RawIOBase):
    """Compress what is written into one zstd frame written to *dest*; :meth:`close`
    ends the frame (it does not close *dest*)."""

    def __init__(self, dest: BinaryIO | IO[bytes], level: int = 3) -> None:
        super().__init__()
        lib = _load()
        self._lib = lib
        self._dest = dest
        self._ctx = lib.ZSTD_createCCtx()
        if not self._ctx:
            raise MemoryError("ZSTD_createCCtx")
        _check(lib, lib.ZSTD_CCtx_setParameter(self._ctx, _ZSTD_c_compressionLevel, level),
               "zstd level")
        _check(lib, lib.ZSTD_CCtx_setParameter(self._ctx, _ZSTD_c_checksumFlag, 1),
               "zstd checksum")
        self._out = ctypes.create_string_buffer(int(lib.ZSTD_CStreamOutSize()))

    def writable(self) -> bool:
        return True

    def _run(self, data: bytes, mode: int) -> None:
        lib = self._lib
        ptr = ctypes.cast(ctypes.c_char_p(data), ctypes.c_void_p).value if data else None
        inp = _Buf(ptr, len(data), 0)
        while True:
            out = _Buf(ctypes.addressof(self._out), len(self._out), 0)
            ret = _check(
                lib,
                lib.ZSTD_compressStream2(self._ctx, ctypes.byref(out), ctypes.byref(inp), mode),
                "zstd compression",
            )
            if out.pos:
                self._dest.write(self._out.raw[: out.pos])
            if mode == _ZSTD_e_end:
                if ret == 0:
                    return
            elif inp.pos >= inp.size:
                return

    def write(self, b: Any) -> int:
        data = bytes(b)
        if data:
            self._run(data, _ZSTD_e_continue)
        return len(data)

    def close(self) -> None:
        if self._ctx:
            try:
                self._run(b"", _ZSTD_e_end)
            finally:
                self._lib.ZSTD_freeCCtx(self._ctx)
                self._ctx = None
        super().close()
