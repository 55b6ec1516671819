"""pyhcs's error tree and hcsshim's error predicates.

Every failure pyhcs reports is an :class:`HcsError`. It carries the *operation*
that was attempted, the *id* of what it was attempted on, optional *extra_info*
and a *code*: one of the sentinel :class:`ErrorCode` values below, which mirror
hcsshim's ``Err*`` variables so the ``is_*`` predicates answer as hcsshim's do.
An ``OSError`` from the kernel is never raised bare: it is translated at the
boundary into the most specific pyhcs error and chained with ``from``.
"""

from __future__ import annotations

import errno
from dataclasses import dataclass

__all__ = [
    "ErrorCode",
    "HcsError",
    "ContainerError",
    "ProcessError",
    "LayerError",
    "InvalidConfigError",
    "NotSupportedError",
    "ContainerTimeoutError",
    "ProcessTimeoutError",
    "ERR_COMPUTE_SYSTEM_DOES_NOT_EXIST",
    "ERR_ELEMENT_NOT_FOUND",
    "ERR_HANDLE_CLOSE",
    "ERR_ALREADY_CLOSED",
    "ERR_INVALID_NOTIFICATION_TYPE",
    "ERR_INVALID_PROCESS_STATE",
    "ERR_TIMEOUT",
    "ERR_UNEXPECTED_CONTAINER_EXIT",
    "ERR_UNEXPECTED_PROCESS_ABORT",
    "ERR_UNEXPECTED_VALUE",
    "ERR_VMCOMPUTE_ALREADY_STOPPED",
    "ERR_VMCOMPUTE_OPERATION_PENDING",
    "ERR_VMCOMPUTE_OPERATION_INVALID_STATE",
    "ERR_PROC_NOT_FOUND",
    "ERR_ALREADY_EXISTS",
    "WAIT_ERR_EXEC_FAILED",
    "TIMEOUT_INFINITE",
    "is_not_exist",
    "is_already_stopped",
    "is_already_closed",
    "is_pending",
    "is_timeout",
]

#: Exit code a process reports when its program could not be executed (hcsshim's WaitErrExecFailed).
WAIT_ERR_EXEC_FAILED = 32767
#: hcsshim's TimeoutInfinite; pyhcs spells an infinite wait ``timeout=None``.
TIMEOUT_INFINITE = 0xFFFFFFFF


@dataclass(frozen=True, slots=True)
class ErrorCode:
    """A sentinel error value, as hcsshim's ``Err*`` variables.

    ``value`` is the HRESULT or Win32 error number hcsshim uses, or 0 for plain errors.
    """

    name: str
    value: int
    message: str

    def __str__(self) -> str:
        return self.message


ERR_COMPUTE_SYSTEM_DOES_NOT_EXIST = ErrorCode(
    "ComputeSystemDoesNotExist", 0xC037010E, "the compute system does not exist"
)
ERR_ELEMENT_NOT_FOUND = ErrorCode("ElementNotFound", 0x490, "element not found")
ERR_HANDLE_CLOSE = ErrorCode(
    "HandleClose", 0, "hcsshim: the handle generating this notification has been closed"
)
ERR_ALREADY_CLOSED = ErrorCode("AlreadyClosed", 0, "hcsshim: the handle has already been closed")
ERR_INVALID_NOTIFICATION_TYPE = ErrorCode(
    "InvalidNotificationType", 0, "hcsshim: invalid notification type"
)
ERR_INVALID_PROCESS_STATE = ErrorCode(
    "InvalidProcessState", 0, "the process is in an invalid state for the attempted operation"
)
ERR_TIMEOUT = ErrorCode("Timeout", 0, "hcsshim: timeout waiting for notification")
ERR_UNEXPECTED_CONTAINER_EXIT = ErrorCode(
    "UnexpectedContainerExit", 0, "unexpected container exit"
)
ERR_UNEXPECTED_PROCESS_ABORT = ErrorCode(
    "UnexpectedProcessAbort", 0, "lost communication with compute service"
)
ERR_UNEXPECTED_VALUE = ErrorCode("UnexpectedValue", 0, "unexpected value returned from hcs")
ERR_VMCOMPUTE_ALREADY_STOPPED = ErrorCode(
    "VmcomputeAlreadyStopped", 0xC0370110, "the compute system has already stopped"
)
ERR_VMCOMPUTE_OPERATION_PENDING = ErrorCode(
    "VmcomputeOperationPending", 0xC0370103, "the operation is being completed asynchronously"
)
ERR_VMCOMPUTE_OPERATION_INVALID_STATE = ErrorCode(
    "VmcomputeOperationInvalidState",
    0xC0370105,
    "the compute system is not in a valid state for the requested operation",
)
ERR_PROC_NOT_FOUND = ErrorCode("ProcNotFound", 0x7F, "the process cannot be found")
#: pyhcs addition: an object with this id already exists.
ERR_ALREADY_EXISTS = ErrorCode("AlreadyExists", 0xB7, "an object with this id already exists")


class HcsError(Exception):
    """Base of every pyhcs error.

    ``operation`` names what was attempted (``"Start"``, ``"ImportLayer"``...),
    ``code`` is the sentinel that classifies the failure (or ``None``),
    ``extra_info`` adds detail, and ``__cause__`` holds the underlying error.
    """

    def __init__(
        self,
        operation: str,
        code: ErrorCode | None = None,
        extra_info: str = "",
        *,
        message: str | None = None,
    ) -> None:
        self.operation = operation
        self.code = code
        self.extra_info = extra_info
        self._message = message
        super().__init__(self._render())

    def _subject(self) -> str:
        return ""

    def _render(self) -> str:
        parts = [f"pyhcs::{self.operation}"]
        subject = self._subject()
        if subject:
            parts.append(subject)
        detail = self._message or (str(self.code) if self.code else "")
        text = " ".join(parts)
        if detail:
            text += f": {detail}"
        if self.extra_info:
            text += f" ({self.extra_info})"
        return text


class IdError(HcsError):
    """An error about one object named by ``id`` (the first argument); the base of the
    container, layer and network errors. Not raised itself."""

    def __init__(
        self,
        id: str,
        operation: str,
        code: ErrorCode | None = None,
        extra_info: str = "",
        *,
        message: str | None = None,
    ) -> None:
        self.id = id
        super().__init__(operation, code, extra_info, message=message)

    def _subject(self) -> str:
        return self.id


class ContainerError(IdError):
    """An error in an operation on a container; ``id`` is the container's id."""


class ProcessError(HcsError):
    """An error in an operation on a process; ``id`` is its container's id, ``pid`` its pid."""

    def __init__(
        self,
        id: str,
        pid: int,
        operation: str,
        code: ErrorCode | None = None,
        extra_info: str = "",
        *,
        message: str | None = None,
    ) -> None:
        self.id = id
        self.pid = pid
        super().__init__(operation, code, extra_info, message=message)

    def _subject(self) -> str:
        return f"{self.id} pid {self.pid}"


class LayerError(IdError):
    """An error in a layer-store operation; ``id`` is the layer's id."""

    def _subject(self) -> str:
        return f"layer {self.id}" if self.id else ""


class InvalidConfigError(HcsError, ValueError):
    """A document or argument is invalid; nothing was changed."""


class NotSupportedError(HcsError):
    """The request is valid for hcsshim but not supported by pyhcs on Linux (the field is named)."""


class ContainerTimeoutError(ContainerError, TimeoutError):
    """A wait on a container reached its deadline (code ``ERR_TIMEOUT``)."""


class ProcessTimeoutError(ProcessError, TimeoutError):
    """A wait on a process reached its deadline (code ``ERR_TIMEOUT``)."""


def _code(err: BaseException | None) -> ErrorCode | None:
    return err.code if isinstance(err, HcsError) else None


def is_not_exist(err: BaseException | None) -> bool:
    """True if *err* says the container or process does not exist.

    As in hcsshim, ``ERR_ELEMENT_NOT_FOUND`` and ``ERR_PROC_NOT_FOUND`` make both this and
    :func:`is_already_stopped` true: an exited process and a missing one look alike.
    """
    if isinstance(err, OSError) and err.errno in (errno.ENOENT, errno.ESRCH):
        return True
    return _code(err) in (
        ERR_COMPUTE_SYSTEM_DOES_NOT_EXIST, ERR_ELEMENT_NOT_FOUND, ERR_PROC_NOT_FOUND
    )


def is_already_stopped(err: BaseException | None) -> bool:
    """True if *err* says the container or process has already stopped."""
    if isinstance(err, OSError) and err.errno == errno.ESRCH:
        return True
    return _code(err) in (ERR_VMCOMPUTE_ALREADY_STOPPED, ERR_ELEMENT_NOT_FOUND, ERR_PROC_NOT_FOUND)


def is_already_closed(err: BaseException | None) -> bool:
    """True if *err* was caused by using a Container or Process after ``close()``."""
    return _code(err) is ERR_ALREADY_CLOSED


def is_pending(err: BaseException | None) -> bool:
    """True if *err* says the operation goes on in the background."""
    return _code(err) is ERR_VMCOMPUTE_OPERATION_PENDING


def is_timeout(err: BaseException | None) -> bool:
    """True if *err* is a wait that reached its deadline."""
    return _code(err) is ERR_TIMEOUT
