#!/usr/bin/env bash
# Builds pmfs in release mode and installs the tool set where Linux looks for it:
#   /usr/local/sbin/pmfs        the mount daemon (and `pmfs layout FILE...`)
#   /usr/local/sbin/mkfs.pmfs   found by mkfs -t pmfs
#   /usr/local/sbin/fsck.pmfs   found by fsck -t pmfs
#   /sbin/mount.fuse.pmfs       the mount(8) helper for -t fuse.pmfs and /etc/fstab
#   /usr/local/lib/libpmfs_direct.so  LD_PRELOAD library: direct read/write of pmfs files
# Cargo cannot name a binary with a dot, so mkfs.pmfs and fsck.pmfs are built as
# mkfs-pmfs and fsck-pmfs and renamed here. Installs fuse3 and pkg-config if missing.
# Usage (as root): ./install.sh [PREFIX]   (PREFIX defaults to /usr/local)
set -euo pipefail
cd "$(dirname "$0")"
prefix=${1:-/usr/local}

need=()
command -v fusermount3 >/dev/null || need+=(fuse3)
command -v pkg-config >/dev/null || need+=(pkg-config)
if [ ${#need[@]} -gt 0 ]; then
    # A fresh machine has empty package lists: without the update the install finds nothing.
    echo "pmfs: installing ${need[*]} (apt-get update, then apt-get install)"
    DEBIAN_FRONTEND=noninteractive apt-get update -q
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${need[@]}"
fi

# Cargo shows its progress (a bar on a terminal, one line per crate otherwise): a first
# build takes minutes, and silence for that long looks like a hang.
echo "pmfs: building in release mode (a first build takes about 3 minutes on 2 CPUs)"
cargo build --release --workspace
install -d "$prefix/sbin"
install -m 755 target/release/pmfs "$prefix/sbin/pmfs"
install -m 755 target/release/mkfs-pmfs "$prefix/sbin/mkfs.pmfs"
install -m 755 target/release/fsck-pmfs "$prefix/sbin/fsck.pmfs"
install -d "$prefix/lib"
install -m 755 target/release/libpmfs_direct.so "$prefix/lib/libpmfs_direct.so"
cat > /sbin/mount.fuse.pmfs <<HELPER
#!/bin/sh
# mount(8) helper for pmfs, installed by pmfs/install.sh:
#   mount.fuse.pmfs DEVICE MOUNTPOINT [-o OPTIONS]
# The daemon serves everyone: it must not inherit the mounting shell's file-size limit.
ulimit -f unlimited 2>/dev/null
exec $prefix/sbin/pmfs "\$@"
HELPER
chmod 755 /sbin/mount.fuse.pmfs
echo "pmfs: installed pmfs, mkfs.pmfs, fsck.pmfs in $prefix/sbin, libpmfs_direct.so in $prefix/lib and /sbin/mount.fuse.pmfs"
