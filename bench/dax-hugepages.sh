#!/usr/bin/env bash
# Measures direct mapping on emulated pmem whose pages are huge, so that a direct mapping of
# an aligned file can use huge page-table entries. Prints the PMD- (2 MiB) and PUD-mapped
# (1 GiB) shares from /proc/self/smaps, and the load/store bandwidth and the rate of random
# loads from distinct 4 KiB pages through the mapping against anonymous memory on 4 KiB and
# on 2 MiB pages: medians of DAX_DEMO_ROUNDS (default 5) interleaved rounds, with the
# ratios (examples/dax_demo.rs). In 1 GiB mode it then writes the file with dd (1 MiB
# writes) and with 4 KiB appends and prints the PUD share of each. Run as root from the
# repository.
#
#   bench/dax-hugepages.sh [MiB]       2 MiB mode: the image on a tmpfs mounted huge=always
#                                       (default 1024 MiB file)
#   bench/dax-hugepages.sh 1g [MiB]    1 GiB mode: the image on a hugetlbfs with 1 GiB pages
#                                       (default 2048 MiB file); reserves the pages it needs
#                                       in nr_hugepages and gives them back at the end
set -euo pipefail
cd "$(dirname "$0")/.."
mode=2m
if [ "${1:-}" = 1g ]; then
    mode=1g
    shift
fi
mnt=/mnt/pmfs-huge
cargo build --release --workspace --examples --quiet
mkdir -p "$mnt"
if [ "$mode" = 2m ]; then
    mib=${1:-1024}
    huge=/mnt/pmfs-huge-tmpfs
    image_mib=$((mib * 2))
    mount_fs() { mount -t tmpfs -o huge=always,size=$((image_mib + 256))M pmfs-huge "$huge"; }
    restore_pages() { :; }
else
    mib=${1:-2048}
    huge=/mnt/pmfs-huge-hugetlbfs
    # The image: whole 1 GiB pages; its first GiB holds the metadata (a broken region),
    # the file needs ceil(mib / 1024) whole free regions after it.
    pages=$(((mib + 1023) / 1024 + 1))
    image_mib=$((pages * 1024))
    nr=/sys/kernel/mm/hugepages/hugepages-1048576kB/nr_hugepages
    free_file=/sys/kernel/mm/hugepages/hugepages-1048576kB/free_hugepages
    old_nr=$(cat "$nr")
    restore_pages() { echo "$old_nr" >"$nr"; }
    mount_fs() {
        local free
        free=$(cat "$free_file")
        if [ "$free" -lt "$pages" ]; then
            echo $((old_nr + pages - free)) >"$nr"
        fi
        if [ "$(cat "$free_file")" -lt "$pages" ]; then
            echo "dax-hugepages: could not reserve $pages pages of 1 GiB ($(cat "$free_file") free)" >&2
            exit 1
        fi
        mount -t hugetlbfs -o pagesize=1G,size=${image_mib}M pmfs-huge "$huge"
    }
fi
img=$huge/pmem.img
cleanup() {
    umount "$mnt" 2>/dev/null || fusermount3 -u "$mnt" 2>/dev/null || true
    rm -f "$img"
    umount "$huge" 2>/dev/null || true
    restore_pages
}
trap cleanup EXIT
mkdir -p "$huge"
mount_fs
target/release/mkfs-pmfs -q -f --size ${image_mib}M "$img"
target/release/pmfs "$img" "$mnt"
echo "machine: $(nproc) cores; $(uname -r); mode $mode; figures vary with load, compare within one run"
layout() {
    target/release/pmfs layout "$1" | awk '{
        n++
        if ($1 % 2097152 == 0 && $2 % 2097152 == 0 && $3 % 2097152 == 0) a++
        if ($1 % 1073741824 == 0 && $2 % 1073741824 == 0 && $3 % 1073741824 == 0) g++
    } END { printf "  layout: %d extents, %d of them 2 MiB-aligned, %d of them whole 1 GiB regions\n", n, a, g }'
}
echo "== a file fallocated to $mib MiB"
target/release/examples/dax_demo "$mnt/bigfile" "$mib"
layout "$mnt/bigfile"
rm "$mnt/bigfile"
if [ "$mode" = 1g ]; then
    # Files that grow by writes: their extents are what the growth policy gave them (the
    # demo's fallocate finds nothing left to allocate). One round: the mapping is the point.
    echo "== a file written sequentially with 1 MiB writes (dd bs=1M)"
    dd if=/dev/zero of="$mnt/dd" bs=1M count="$mib" status=none
    DAX_DEMO_ROUNDS=1 target/release/examples/dax_demo "$mnt/dd" "$mib" | grep -E 'huge-page mapping'
    layout "$mnt/dd"
    rm "$mnt/dd"
    echo "== a file grown by 4 KiB appends (dd bs=4k oflag=append)"
    dd if=/dev/zero of="$mnt/appended" bs=4k count=$((mib * 256)) oflag=append conv=notrunc status=none
    DAX_DEMO_ROUNDS=1 target/release/examples/dax_demo "$mnt/appended" "$mib" | grep -E 'huge-page mapping'
    layout "$mnt/appended"
    rm "$mnt/appended"
fi
