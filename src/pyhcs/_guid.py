"""GUIDs as hcsshim uses them: 16 bytes, with name-based generation."""

from __future__ import annotations

import hashlib
import uuid

__all__ = ["GUID", "name_to_guid", "new_guid", "PYHCS_NAMESPACE"]

#: The fixed namespace of :func:`name_to_guid` (UUID v5). Never change it: ids derived from it
#: are stored in registries and must stay the same across versions and machines.
PYHCS_NAMESPACE = uuid.UUID("8f0c6c2e-5d0b-5b8e-9a53-7079686373f1")


class GUID(bytes):
    """A 16-byte GUID (hcsshim's ``GUID [16]byte``), immutable and hashable.

    ``str(g)`` and :meth:`to_string` give the HCS string form, the 16 bytes in order as
    lowercase hex grouped 8-4-4-4-12 (what hcsshim's ``GUID.ToString`` prints).
    """

    __slots__ = ()

    def __new__(cls, data: bytes | bytearray = bytes(16)) -> GUID:
        if len(data) != 16:
            raise ValueError(f"a GUID is 16 bytes, not {len(data)}")
        return super().__new__(cls, data)

    @classmethod
    def parse(cls, text: str) -> GUID:
        """Parse the HCS string form (braces and case accepted); ``ValueError`` if malformed."""
        return cls(uuid.UUID(text.strip()).bytes)

    def to_string(self) -> str:
        """The HCS string form, e.g. ``'d3b1c6e0-...'``."""
        h = self.hex()
        return f"{h[0:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:32]}"

    def __str__(self) -> str:
        return self.to_string()

    def __repr__(self) -> str:
        return f"GUID('{self.to_string()}')"


def name_to_guid(name: str) -> GUID:
    """Map *name* to a GUID deterministically: the same name gives the same GUID everywhere.

    The algorithm is UUID v5 (SHA-1) of the UTF-8 name in :data:`PYHCS_NAMESPACE`.
    """
    return GUID(uuid.uuid5(PYHCS_NAMESPACE, name).bytes)


def new_guid(source: str) -> GUID:
    """hcsshim's ``NewGUID``: the first 16 bytes of SHA-1 of *source*."""
    return GUID(hashlib.sha1(source.encode()).digest()[:16])
