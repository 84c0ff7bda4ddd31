#!/usr/bin/env bash
# Measures direct mapping on an emulated 2 MiB-aligned pmem namespace: a tmpfs mounted
# huge=always holds the pmfs image, so the device pages are 2 MiB pages and a direct
# mapping of an aligned file can be PMD-mapped. Prints the PMD-mapped share from
# /proc/self/smaps and the load/store bandwidth through the mapping against memcpy on
# anonymous memory (examples/dax_demo.rs). Run as root from the repository.
set -euo pipefail
cd "$(dirname "$0")/.."
mib=${1:-1024}
huge=/mnt/pmfs-huge-tmpfs
mnt=/mnt/pmfs-huge
img=$huge/pmem.img
cleanup() {
    umount "$mnt" 2>/dev/null || fusermount3 -u "$mnt" 2>/dev/null || true
    rm -f "$img"
    umount "$huge" 2>/dev/null || true
}
trap cleanup EXIT
cargo build --release --workspace --examples --quiet
mkdir -p "$huge" "$mnt"
mount -t tmpfs -o huge=always,size=$((mib * 2 + 256))M pmfs-huge "$huge"
target/release/mkfs-pmfs -q -f --size $((mib * 2))M "$img"
target/release/pmfs "$img" "$mnt"
echo "machine: $(nproc) cores; $(uname -r); figures vary with load, compare within one run"
target/release/examples/dax_demo "$mnt/bigfile" "$mib"
target/release/pmfs layout "$mnt/bigfile" | awk '{ n++; if ($1 % 2097152 == 0 && $2 % 2097152 == 0 && $3 % 2097152 == 0) a++ } END { printf "  layout: %d extents, %d of them 2 MiB-aligned\n", n, a }'
