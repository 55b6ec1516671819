#!/usr/bin/env bash
# Set up pyhcs on Debian 12, as root: the Debian packages it uses, a virtual environment in
# .venv with the `pyhcs` command, and the offline `busybox` image. Safe to run again: each
# step is skipped when already done.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" != 0 ]; then
    echo "setup: run as root (pyhcs manages namespaces, mounts and cgroups)" >&2
    exit 1
fi

# busybox-static: the offline base image. crun, runc: the peers in bench/ (and alternative
# executors). nftables: NAT, port mappings and ACLs of the network service. libseccomp2:
# the default seccomp filter. e2fsprogs: mkfs.ext4 for sized sandboxes. python3-venv: the
# virtual environment on a stock Debian python3. tar (essential, so always there): GNU tar
# writes imported layers.
packages=(busybox-static crun runc nftables libseccomp2 e2fsprogs tar)
command -v python3 >/dev/null 2>&1 || packages+=(python3)
python3 -c 'import ensurepip, venv' >/dev/null 2>&1 || packages+=(python3-venv)
missing=()
for p in "${packages[@]}"; do
    dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
    echo "setup: installing ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi

stamp=.venv/.pyhcs-installed
want=$(cat pyproject.toml | sha256sum | cut -d' ' -f1)
if [ ! -x .venv/bin/python ] || [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    echo "setup: creating .venv"
    python3 -m venv .venv
    .venv/bin/python -m pip install -q --upgrade pip >/dev/null
    .venv/bin/python -m pip install -q -e ".[dev]"
    echo "$want" > "$stamp"
fi

.venv/bin/pyhcs image build-busybox >/dev/null
echo "setup: ready (.venv/bin/pyhcs; image busybox)"
