"""The error predicates answer as hcsshim's do; GUIDs are hcsshim's."""

from __future__ import annotations

import errno

import pytest

import pyhcs


@pytest.mark.parametrize(("code", "not_exist", "stopped"), [
    (pyhcs.ERR_COMPUTE_SYSTEM_DOES_NOT_EXIST, True, False),
    (pyhcs.ERR_ELEMENT_NOT_FOUND, True, True),
    (pyhcs.ERR_PROC_NOT_FOUND, True, True),
    (pyhcs.ERR_VMCOMPUTE_ALREADY_STOPPED, False, True),
    (pyhcs.ERR_TIMEOUT, False, False),
])
def test_not_exist_and_stopped(code: pyhcs.ErrorCode, not_exist: bool, stopped: bool) -> None:
    e = pyhcs.ContainerError("c1", "Start", code)
    assert pyhcs.is_not_exist(e) is not_exist
    assert pyhcs.is_already_stopped(e) is stopped


def test_other_predicates() -> None:
    assert pyhcs.is_timeout(pyhcs.ProcessTimeoutError("c", 3, "Wait", pyhcs.ERR_TIMEOUT))
    assert pyhcs.is_pending(pyhcs.HcsError("Start", pyhcs.ERR_VMCOMPUTE_OPERATION_PENDING))
    assert pyhcs.is_already_closed(pyhcs.ProcessError("c", 1, "Kill", pyhcs.ERR_ALREADY_CLOSED))
    assert not pyhcs.is_timeout(pyhcs.HcsError("Start"))
    assert not pyhcs.is_not_exist(None)
    assert pyhcs.is_not_exist(OSError(errno.ENOENT, "x"))


def test_error_carries_what_was_attempted() -> None:
    e = pyhcs.ProcessError("c9", 7, "Kill", pyhcs.ERR_ELEMENT_NOT_FOUND, "extra")
    assert (e.id, e.pid, e.operation, e.extra_info) == ("c9", 7, "Kill", "extra")
    assert "c9" in str(e) and "Kill" in str(e) and "extra" in str(e)
    assert isinstance(pyhcs.ContainerTimeoutError("c", "Wait"), TimeoutError)


def test_guid_forms() -> None:
    g = pyhcs.name_to_guid("layer-1")
    assert g == pyhcs.name_to_guid("layer-1")
    assert g != pyhcs.name_to_guid("layer-2")
    assert len(g) == 16
    assert pyhcs.GUID.parse(str(g)) == g
    # hcsshim's NewGUID: the first 16 bytes of SHA-1, printed in byte order
    assert str(pyhcs.new_guid("abc")) == "a9993e36-4706-816a-ba3e-25717850c26c"
    with pytest.raises(ValueError):
        pyhcs.GUID(b"short")
