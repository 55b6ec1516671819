"""The network service's errors: hcsshim's ``HNS failed with error : ...`` with pyhcs's codes."""

from __future__ import annotations

from pyhcs._errors import ErrorCode, IdError, InvalidConfigError, NotSupportedError

__all__ = ["NetworkError", "InvalidNetworkRequestError", "NetworkNotSupportedError"]


class NetworkError(IdError):
    """An HNS request failed; ``id`` is the network's or endpoint's id (or the path asked).

    The message reads as hcsshim's does (``HNS failed with error : <reason>``). ``code``
    classifies it: ``ERR_ELEMENT_NOT_FOUND`` for an unknown network or endpoint (so
    :func:`pyhcs.is_not_exist` is true), ``ERR_ALREADY_EXISTS`` for a duplicate name, an
    address, MAC or host port already taken.
    """

    def __init__(
        self,
        id: str,
        operation: str,
        code: ErrorCode | None = None,
        extra_info: str = "",
        *,
        message: str | None = None,
    ) -> None:
        if message is not None and not message.startswith("HNS failed"):
            message = f"HNS failed with error : {message}"
        super().__init__(id, operation, code, extra_info, message=message)


class InvalidNetworkRequestError(NetworkError, InvalidConfigError):
    """The request is malformed or invalid (bad path, JSON, policy, overlapping subnet...).

    Nothing was changed.
    """


class NetworkNotSupportedError(NetworkError, NotSupportedError):
    """The request is valid for HNS but this part is not supported on Linux (yet)."""
