#!/usr/bin/env bash
# The project's checks: lint, types, then the test suite on the real kernel (as root).
set -euo pipefail
cd "$(dirname "$0")/.."
.venv/bin/ruff check src tests bench
.venv/bin/mypy
# the virtual machine with a pure cgroup v2 hierarchy (tests/runtime/test_cgroup2_vm.py)
bash scripts/cgroup2-vm.sh
exec .venv/bin/python -m pytest -q "$@"
