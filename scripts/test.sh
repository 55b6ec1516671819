#!/usr/bin/env bash
# The project's checks: lint, types, then the test suite on the real kernel (as root).
set -euo pipefail
cd "$(dirname "$0")/.."
.venv/bin/ruff check src tests bench
.venv/bin/mypy
# the virtual machine with a pure cgroup v2 hierarchy (tests/runtime/test_cgroup2_vm.py)
bash scripts/cgroup2-vm.sh
.venv/bin/python -m pytest -q "$@"
if [ $# -eq 0 ]; then
    # the compute API's tests once more on crun (PYHCS_RUNTIME): the same calls on the same
    # generated spec; the tests of the native supervisor itself are skipped (native_only)
    PYHCS_RUNTIME=crun .venv/bin/python -m pytest -q tests/compute/test_container.py \
        tests/compute/test_processes.py
fi
