#!/usr/bin/env bash
# Prepare the virtual machine that tests cgroup v2 with its controllers (as root, Debian 12).
#
# This host is hybrid: cpu, memory, io and pids are bound to cgroup v1 hierarchies, so no
# cgroup2 hierarchy here (not even one mounted in a private mount namespace) can have
# them. tests/runtime/test_cgroup2_vm.py therefore boots Debian's own kernel under KVM
# with a pure cgroup v2 hierarchy, the host's root file system shared read-only over 9p,
# and runs the cgroup and container-limit tests in there (tests/guest/).
#
# What this makes, in $PYHCS_VM_DIR (default /var/cache/pyhcs/cgroup2-vm; outside the
# checkout, nothing here is committed): vmlinuz, and initrd.img, a busybox initramfs with
# the kernel modules the guest needs and tests/guest/init as /init. Needs qemu-system-x86
# (installed here if missing) and the kernel package from Debian's archive (downloaded
# once, ~70 MB). Safe to run again: done steps are skipped.
set -euo pipefail
cd "$(dirname "$0")/.."
dir=${PYHCS_VM_DIR:-/var/cache/pyhcs/cgroup2-vm}
mkdir -p "$dir"

if ! command -v qemu-system-x86_64 >/dev/null 2>&1; then
    echo "cgroup2-vm: installing qemu-system-x86"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        qemu-system-x86 >/dev/null
fi

if [ ! -f "$dir/modules/ext4.ko" ]; then
    # the kernel package linux-image-amd64 points to (its modules are not installed here)
    pkg=$(apt-cache depends linux-image-amd64 | awk '/Depends: linux-image-[0-9]/ {print $2; exit}')
    echo "cgroup2-vm: fetching $pkg"
    rm -rf "$dir/pkg" && mkdir -p "$dir/pkg"
    (cd "$dir/pkg" && apt-get download -q "$pkg" >/dev/null 2>&1)
    dpkg -x "$dir"/pkg/*.deb "$dir/pkg/x"
    cp "$dir"/pkg/x/boot/vmlinuz-* "$dir/vmlinuz.tmp"
    rm -rf "$dir/modules" && mkdir -p "$dir/modules"
    mods=$(echo "$dir"/pkg/x/lib/modules/*/kernel)
    # 9p and virtio for the shared root, virtio_blk and ext4 for the scratch disk, overlay
    # and loop for containers and sized sandboxes (the package has no modules.dep:
    # depmod runs at install; the guest loads them in passes)
    for m in drivers/virtio/virtio drivers/virtio/virtio_ring \
             drivers/virtio/virtio_pci_legacy_dev drivers/virtio/virtio_pci_modern_dev \
             drivers/virtio/virtio_pci fs/fscache/fscache fs/netfs/netfs net/9p/9pnet \
             net/9p/9pnet_virtio fs/9p/9p fs/overlayfs/overlay drivers/block/loop \
             drivers/block/virtio_blk crypto/crc32c_generic lib/crc16 fs/mbcache \
             fs/jbd2/jbd2 fs/ext4/ext4; do
        cp "$mods/$m.ko" "$dir/modules/$(basename "$m").ko"
    done
    rm -rf "$dir/pkg"
    mv "$dir/vmlinuz.tmp" "$dir/vmlinuz"
fi

# the initramfs, rebuilt whenever tests/guest/init or the modules change
want=$( (cat tests/guest/init; ls "$dir/modules") | sha256sum | cut -d' ' -f1)
if [ "$(cat "$dir/initrd.sum" 2>/dev/null)" != "$want" ] || [ ! -f "$dir/initrd.img" ]; then
    root=$(mktemp -d)
    trap 'rm -rf "$root"' EXIT
    mkdir -p "$root"/{bin,dev,proc,sys,host,modules}
    cp /bin/busybox "$root/bin/busybox"
    cp "$dir"/modules/*.ko "$root/modules/"
    cp tests/guest/init "$root/init"
    chmod 755 "$root/init"
    (cd "$root" && find . | busybox cpio -o -H newc 2>/dev/null | gzip -1) > "$dir/initrd.img.tmp"
    mv "$dir/initrd.img.tmp" "$dir/initrd.img"
    echo "$want" > "$dir/initrd.sum"
fi
echo "cgroup2-vm: ready ($dir)"
