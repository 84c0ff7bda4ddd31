#!/usr/bin/env bash
# bench/compare.sh: pmfs side by side with tmpfs, ext4 on a loop device in /dev/shm and bindfs
# over tmpfs, in one run, on one machine. See bench/README.md.
#
# usage: bench/compare.sh [-n N] [-t SECONDS] [--million | --no-million] [--size SIZE]
#                         [--only LIST] [--no-build]
#   -n N            repeats of every workload; the table shows medians (default 3)
#   -t SECONDS      length of each time-limited fio run (default 1)
#   --million       always run the 1,000,000-file part (mount time, daemon RSS)
#   --no-million    never run it (default: run it if the time budget allows)
#   --size SIZE     size of the emulated pmem image (default 6G, 4G if memory is short)
#   --only LIST     comma-separated subset of: tmpfs,ext4,bindfs,pmfs-direct,pmfs-page,
#                   pmfs-writeback (cache=writeback), pmfs-direct-preload (cache=direct,
#                   the fio jobs run under the preload library libpmfs_direct.so), and
#                   pmfs-nospin (cache=direct with spin=0: never poll /dev/fuse) and
#                   pmfs-spin (cache=direct with spin=1000: always poll), to show what polling
#                   buys on this host against the default spin=auto (neither is in the
#                   default list)
#   --no-build      use the existing target/release binaries as they are
# Environment: PMFS_BIN, MKFS_BIN override the binaries; BENCH_BUDGET (seconds, default 600)
# is the time budget the automatic --million decision respects; BENCH_MILLION_FILES (default
# 1000000) the size of that part.
#
# Must run as root (mounts, loop devices, drop_caches). Installs fio and bindfs if missing.

set -uo pipefail

REPEATS=3
RUNTIME=1
MILLION=auto
PMEM_SIZE=
ONLY="tmpfs,ext4,bindfs,pmfs-direct,pmfs-page,pmfs-writeback,pmfs-direct-preload"
BUILD=1
BUDGET=${BENCH_BUDGET:-600}
META_FILES=20000
TREE_FILES=40000
MILLION_FILES=${BENCH_MILLION_FILES:-1000000}
FILE_SIZE=1g

while [ $# -gt 0 ]; do
    case "$1" in
        -n) REPEATS=$2; shift 2 ;;
        -t) RUNTIME=$2; shift 2 ;;
        --million) MILLION=yes; shift ;;
        --no-million) MILLION=no; shift ;;
        --size) PMEM_SIZE=$2; shift 2 ;;
        --only) ONLY=$2; shift 2 ;;
        --no-build) BUILD=0; shift ;;
        -h|--help) sed -n '2,22p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "compare.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
done

START=$(date +%s)
HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/.." && pwd)

log() { printf '# [%4ds] %s\n' $(($(date +%s) - START)) "$*"; }
die() { echo "compare.sh: $*" >&2; exit 1; }

[ "$(id -u)" = 0 ] || die "must run as root (mounts, loop devices, drop_caches)"

# ---------------------------------------------------------------------------------------------
# Tools
need_pkgs=()
command -v fio >/dev/null || need_pkgs+=(fio)
command -v bindfs >/dev/null || need_pkgs+=(bindfs)
command -v gcc >/dev/null || need_pkgs+=(gcc)
command -v fusermount3 >/dev/null || need_pkgs+=(fuse3)
command -v mkfs.ext4 >/dev/null || need_pkgs+=(e2fsprogs)
if [ ${#need_pkgs[@]} -gt 0 ]; then
    log "installing ${need_pkgs[*]}"
    export DEBIAN_FRONTEND=noninteractive
    { apt-get update -qq && apt-get install -y -qq "${need_pkgs[@]}"; } >/dev/null ||
        die "could not install ${need_pkgs[*]}"
fi

PMFS_BIN=${PMFS_BIN:-$ROOT/target/release/pmfs}
MKFS_BIN=${MKFS_BIN:-$ROOT/target/release/mkfs-pmfs}
PRELOAD_LIB=${PRELOAD_LIB:-$ROOT/target/release/libpmfs_direct.so}
if [ "$BUILD" = 1 ]; then
    log "cargo build --release (pmfs, mkfs-pmfs, pmfs-direct): a no-op when up to date"
    (cd "$ROOT" && cargo build --release -q -p pmfs -p mkfs-pmfs -p pmfs-direct) ||
        { [ -x "$PMFS_BIN" ] && [ -x "$MKFS_BIN" ] && log "build failed: using the existing binaries"; } ||
        die "cargo build --release failed"
fi
[ -x "$PMFS_BIN" ] || die "no $PMFS_BIN"
[ -x "$MKFS_BIN" ] || die "no $MKFS_BIN"

# ---------------------------------------------------------------------------------------------
# Scratch space and cleanup: everything lives under $WORK (in /dev/shm) and $MNTROOT.
WORK=$(mktemp -d /dev/shm/pmfs-bench.XXXXXX) || die "mktemp in /dev/shm"
MNTROOT=$(mktemp -d /tmp/pmfs-bench-mnt.XXXXXX) || die "mktemp in /tmp"
MB=$WORK/metabench
# fio names a job's files after the job, ignoring --filename_format, when a path named like
# the job exists in its working directory: run from the repository root (which has bench/),
# every process of w_par's `--name=bench` jobs shared one file "$MNT/bench". Run from $WORK.
PMFS_BIN=$(realpath "$PMFS_BIN") && MKFS_BIN=$(realpath "$MKFS_BIN") && PRELOAD_LIB=$(realpath -m "$PRELOAD_LIB") &&
    cd "$WORK" || die "cannot enter $WORK"
LOOPDEV=
PMFS_PID=

pmfs_daemon_pid() { # the detached daemon serving image $1
    local p
    for p in $(pgrep -f -- '--daemon-child' 2>/dev/null); do
        if tr '\0' ' ' <"/proc/$p/cmdline" 2>/dev/null | grep -qF -- " $1 "; then
            echo "$p"
            return 0
        fi
    done
    return 1
}

wait_gone() { # pid seconds
    local i
    for ((i = 0; i < $2 * 20; i++)); do
        kill -0 "$1" 2>/dev/null || return 0
        sleep 0.05
    done
    return 1
}

unmount_all() {
    local m
    for m in "$MNTROOT"/*; do
        [ -d "$m" ] || continue
        if mountpoint -q "$m"; then
            umount "$m" 2>/dev/null || umount -l "$m" 2>/dev/null
        fi
    done
}

cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    unmount_all
    if [ -n "$PMFS_PID" ] && ! wait_gone "$PMFS_PID" 10; then
        kill "$PMFS_PID" 2>/dev/null
    fi
    [ -n "$LOOPDEV" ] && losetup -d "$LOOPDEV" 2>/dev/null
    rm -rf "$WORK"
    rmdir "$MNTROOT"/* "$MNTROOT" 2>/dev/null
    exit $rc
}
trap cleanup EXIT
trap 'exit 130' INT TERM

gcc -O2 -pthread -o "$MB" "$HERE/metabench.c" || die "cannot compile bench/metabench.c"
# Snapshot the binaries: a rebuild during the run must not change the pmfs being measured.
mkdir -p "$WORK/bin" && cp "$PMFS_BIN" "$WORK/bin/pmfs" && cp "$MKFS_BIN" "$WORK/bin/mkfs.pmfs" ||
    die "cannot copy the binaries"
if [[ ",$ONLY," == *,pmfs-direct-preload,* ]]; then
    cp "$PRELOAD_LIB" "$WORK/bin/libpmfs_direct.so" || die "no $PRELOAD_LIB (cargo build --release -p pmfs-direct)"
    PRELOAD_LIB=$WORK/bin/libpmfs_direct.so
fi
PMFS_BIN_SRC=$PMFS_BIN
PMFS_BIN=$WORK/bin/pmfs
MKFS_BIN=$WORK/bin/mkfs.pmfs

# pmem image size: 6 GiB unless memory is short (the image is allocated up front).
avail_kb=$(awk '/MemAvailable/ {print $2}' /proc/meminfo)
shm_kb=$(df -k --output=avail /dev/shm | tail -1)
free_kb=$((avail_kb < shm_kb ? avail_kb : shm_kb))
if [ -z "$PMEM_SIZE" ]; then
    if [ "$free_kb" -ge $(((6 + 3) * 1024 * 1024)) ]; then PMEM_SIZE=6G; else PMEM_SIZE=4G; fi
fi

# ---------------------------------------------------------------------------------------------
# Results: RES[fs|metric] = space-separated samples.
declare -A RES=()
add() { RES["$1|$2"]="${RES["$1|$2"]:-} $3"; }
median() {
    printf '%s\n' "$@" | grep -v '^$' | sort -g |
        awk '{a[NR] = $1} END {if (NR == 0) print ""; else if (NR % 2) print a[(NR + 1) / 2]; else print (a[NR / 2] + a[NR / 2 + 1]) / 2}'
}
now_ns() { date +%s%N; }
secs_since() { awk -v a="$1" -v b="$(now_ns)" 'BEGIN {printf "%.3f", (b - a) / 1e9}'; }

# The environment of every fio run (LD_PRELOAD for pmfs-direct-preload, else nothing).
FIO_ENV=()
# fio, psync, buffered; prints the terse v3 line. $1 = file, rest = job options.
fio_run() {
    local file=$1
    shift
    env "${FIO_ENV[@]}" fio --name=bench --filename="$file" --ioengine=psync --group_reporting \
        --output-format=terse --terse-version=3 --fallocate=none "$@" 2>"$WORK/fio.err"
}
fio_read_mibs() { awk -F';' '{printf "%.1f", $7 / 1024}'; }
fio_read_kiops() { awk -F';' '{printf "%.1f", $8 / 1000}'; }
fio_write_mibs() { awk -F';' '{printf "%.1f", $48 / 1024}'; }
fio_write_kiops() { awk -F';' '{printf "%.1f", $49 / 1000}'; }

# measure FS METRIC CMD...: runs CMD, which prints one number, and records it (or "fail").
measure() {
    local fs=$1 metric=$2 v
    shift 2
    v=$("$@")
    if [ $? -ne 0 ] || [ -z "$v" ]; then
        log "$fs $metric: FAILED ($(head -c 300 "$WORK/fio.err" 2>/dev/null | tr '\n' ' '))"
        FAILED["$fs|$metric"]=1
        return 1
    fi
    add "$fs" "$metric" "$v"
}
declare -A FAILED=()

# ---------------------------------------------------------------------------------------------
# Workloads on a mounted directory $2 for file system label $1.
w_seqwrite() { rm -f "$1/seq.dat"; fio_run "$1/seq.dat" --rw=write --bs=1m --size=$FILE_SIZE | fio_write_mibs; }
w_seqread() { fio_run "$1/seq.dat" --rw=read --bs=1m --size=$FILE_SIZE | fio_read_mibs; }
w_randread() { fio_run "$1/seq.dat" --rw=randread --bs=4k --size=$FILE_SIZE --runtime="$RUNTIME" --time_based --numjobs="$2" | fio_read_kiops; }
w_randwrite() { fio_run "$1/seq.dat" --rw=randwrite --bs=4k --size=$FILE_SIZE --runtime="$RUNTIME" --time_based | fio_write_kiops; }
w_par() { # $2 threads, each writing 4 KiB blocks at random into a new file of its own
    env "${FIO_ENV[@]}" fio --name=bench --directory="$1" --filename_format='par.$jobnum' --ioengine=psync \
        --group_reporting --output-format=terse --terse-version=3 --fallocate=none \
        --rw=randwrite --bs=4k --size=256m --numjobs="$2" --runtime="$RUNTIME" --time_based \
        2>"$WORK/fio.err" | fio_write_kiops
    local rc=${PIPESTATUS[0]}
    rm -f "$1"/par.*
    return "$rc"
}
# The cheapest request a file system answers: getxattr of a missing name, which FUSE never
# caches (one GETXATTR round trip each); the system call alone on an in-kernel file system.
w_roundtrip() { touch "$1/rt" && "$MB" roundtrip "$1/rt" 20000 2>"$WORK/fio.err" | awk '{print $2}'; rm -f "$1/rt"; }
w_warm() { fio_run "$1/seq.dat" --rw=read --bs=1m --size=$FILE_SIZE --invalidate=0 >/dev/null; }
w_reread() { fio_run "$1/seq.dat" --rw=randread --bs=4k --size=$FILE_SIZE --runtime="$RUNTIME" --time_based --invalidate=0 | fio_read_kiops; }
# fio's mmap job. Under the preload library (FIO_ENV set) also samples, 70% into the run,
# the PMD-mapped share of the fio processes' mappings of the pmem image into $WORK/pmd.
w_mmap() {
    rm -f "$WORK/pmd"
    fio_run "$1/seq.dat" --ioengine=mmap --rw=randread --bs=4k --size=$FILE_SIZE --runtime="$RUNTIME" \
        --time_based >"$WORK/mmap.out" &
    local pid=$!
    if [ ${#FIO_ENV[@]} -gt 0 ]; then
        sleep "$(awk -v t="$RUNTIME" 'BEGIN {print t * 0.7}')"
        pmd_share "$PMEM_IMG" $(descendants "$pid") >"$WORK/pmd"
    fi
    wait "$pid" || return 1
    fio_read_kiops <"$WORK/mmap.out"
}
descendants() { # pid: its child processes, recursively
    local c
    for c in $(pgrep -P "$1"); do
        echo "$c"
        descendants "$c"
    done
}
# pmd_share IMAGE PID...: the share (%) of the resident bytes of the processes' mappings of
# IMAGE that are mapped by 2 MiB page-table entries (smaps ShmemPmdMapped/FilePmdMapped over
# Rss, as bench/dax-hugepages.sh reads them). Only touched pages are resident: the library's
# own whole-file mapping for served read(2) (no Rss while fio loads through its mmap) counts
# for nothing either way.
pmd_share() {
    local img=$1
    shift
    for p in "$@"; do cat "/proc/$p/smaps" 2>/dev/null; done | awk -v img="$img" '
        /^[0-9a-f]+-[0-9a-f]+ / { inside = ($6 == img); next }
        inside && /^Rss:/ { rss += $2 }
        inside && (/^ShmemPmdMapped:/ || /^FilePmdMapped:/) { pmd += $2 }
        END { if (rss > 0) printf "%.1f\n", 100 * pmd / rss }'
}
w_append() {
    rm -f "$1/append.dat"
    fio_run "$1/append.dat" --rw=write --bs=4k --fdatasync=1 --size=512m --runtime="$RUNTIME" | fio_write_kiops
    local rc=$?
    rm -f "$1/append.dat"
    return $rc
}
w_untar() {
    local t0
    t0=$(now_ns)
    tar -xf "$TARBALL" -C "$1" 2>"$WORK/fio.err" || return 1
    secs_since "$t0"
}
w_rmrf() {
    local t0
    t0=$(now_ns)
    rm -rf "$1/tree" 2>"$WORK/fio.err" || return 1
    secs_since "$t0"
}

run_round() { # label dir: every workload once
    local fs=$1 d=$2 out
    # Written data is synced (syncfs, untimed) before the reads: fio's reads drop the file's
    # page cache first, and on ext4 that must not include writing back dirty pages.
    measure "$fs" seqwrite w_seqwrite "$d"
    [ -f "$d/seq.dat" ] || fio_run "$d/seq.dat" --rw=write --bs=1m --size=$FILE_SIZE >/dev/null
    sync -f "$d"
    measure "$fs" seqread w_seqread "$d"
    measure "$fs" randread1 w_randread "$d" 1
    measure "$fs" randread2 w_randread "$d" 2
    measure "$fs" mmapread w_mmap "$d" && [ -s "$WORK/pmd" ] && add "$fs" mmappmd "$(cat "$WORK/pmd")"
    measure "$fs" randwrite w_randwrite "$d"
    measure "$fs" par1write w_par "$d" 1
    measure "$fs" par4write w_par "$d" 4
    sync -f "$d"
    w_warm "$d"
    measure "$fs" reread w_reread "$d"
    measure "$fs" append w_append "$d"
    measure "$fs" roundtrip w_roundtrip "$d"
    rm -f "$d/seq.dat"

    if out=$("$MB" meta "$d/meta" "$META_FILES" -c 2>"$WORK/fio.err"); then
        set -- $out
        add "$fs" create "$2"
        add "$fs" stat "$4"
        add "$fs" unlink "$6"
    else
        log "$fs meta: FAILED ($(head -c 300 "$WORK/fio.err" | tr '\n' ' '))"
        FAILED["$fs|create"]=1
        rm -rf "$d/meta" 2>/dev/null
    fi
    rmdir "$d/meta" 2>/dev/null

    measure "$fs" untar w_untar "$d"
    measure "$fs" rmrf w_rmrf "$d" || rm -rf "$d/tree" 2>/dev/null
}

# ---------------------------------------------------------------------------------------------
# File systems: setup_X sets MNT; teardown_X undoes it.
setup_tmpfs() {
    MNT=$MNTROOT/tmpfs
    mkdir -p "$MNT" && mount -t tmpfs -o size=3g tmpfs "$MNT"
}
teardown_tmpfs() { umount "$MNT"; }

setup_ext4() {
    MNT=$MNTROOT/ext4
    mkdir -p "$MNT"
    truncate -s 3G "$WORK/ext4.img" &&
        mkfs.ext4 -q -F -E lazy_itable_init=0,lazy_journal_init=0 "$WORK/ext4.img" &&
        LOOPDEV=$(losetup --find --show "$WORK/ext4.img") &&
        mount "$LOOPDEV" "$MNT"
}
teardown_ext4() {
    umount "$MNT"
    losetup -d "$LOOPDEV"
    LOOPDEV=
    rm -f "$WORK/ext4.img"
}

setup_bindfs() {
    MNT=$MNTROOT/bindfs
    mkdir -p "$MNT" "$MNTROOT/bindfs-src"
    mount -t tmpfs -o size=3g tmpfs "$MNTROOT/bindfs-src" && bindfs "$MNTROOT/bindfs-src" "$MNT"
}
teardown_bindfs() {
    umount "$MNT"
    sleep 0.2
    umount "$MNTROOT/bindfs-src"
}

PMEM_IMG=$WORK/pmem.img
pmfs_mount() { # -o options; records the mount time in MOUNT_MS
    local out
    out=$("$MB" mounttime "$MNT" 20000 "$PMFS_BIN" "$PMEM_IMG" "$MNT" -o "$1") || return 1
    MOUNT_MS=$(set -- $out; echo "$2")
    PMFS_PID=$(pmfs_daemon_pid "$PMEM_IMG")
}
pmfs_umount() {
    umount "$MNT" || umount -l "$MNT"
    if [ -n "$PMFS_PID" ]; then
        wait_gone "$PMFS_PID" 15 || { log "pmfs daemon $PMFS_PID did not exit: killing it"; kill "$PMFS_PID"; wait_gone "$PMFS_PID" 5; }
    fi
    PMFS_PID=
}
# A new image is written with zeros once before mkfs: a tmpfs file's pages (fallocated or
# not) are cleared on their first touch, which ran a 1 MiB write at 400-600 MiB/s against
# 5 GiB/s on the same blocks once touched (session 8). Real pmem has no such first touch, and
# columns whose image is made anew each round (pmfs-direct-preload) paid it in every round.
pmfs_format() {
    if [ ! -f "$PMEM_IMG" ]; then
        dd if=/dev/zero of="$PMEM_IMG" bs=1M count=$(($(numfmt --from=iec "$PMEM_SIZE") / 1048576)) \
            status=none || return 1
    fi
    "$MKFS_BIN" -f -q "$PMEM_IMG"
}
setup_pmfs() { # mode
    MNT=$MNTROOT/pmfs
    mkdir -p "$MNT"
    pmfs_format && pmfs_mount "$1"
}
setup_pmfs-direct() { setup_pmfs cache=direct; }
setup_pmfs-page() { setup_pmfs cache=page; }
setup_pmfs-nospin() { setup_pmfs cache=direct,spin=0; }
setup_pmfs-spin() { setup_pmfs cache=direct,spin=1000; }
setup_pmfs-writeback() { setup_pmfs cache=writeback; }
# Only the fio jobs run under the library (the metadata workloads and tar do not). The image
# lives on a tmpfs mounted huge=always, so that the library's direct mappings of 2 MiB-aligned
# extents can be PMD-mapped (as on a devdax or fsdax namespace of real pmem); the /dev/shm
# image of the other columns is removed meanwhile (memory), and made again after.
HUGE_IMG_DIR=$MNTROOT/pmfs-image-huge # sorts after $MNTROOT/pmfs: unmount_all's order
setup_pmfs-direct-preload() {
    rm -f "$PMEM_IMG"
    mkdir -p "$HUGE_IMG_DIR" &&
        mount -t tmpfs -o "huge=always,size=$(($(numfmt --from=iec "$PMEM_SIZE") / 1048576 + 64))M" \
            pmfs-huge "$HUGE_IMG_DIR" &&
        PMEM_IMG=$HUGE_IMG_DIR/pmem.img && setup_pmfs cache=direct && FIO_ENV=("LD_PRELOAD=$PRELOAD_LIB")
}
teardown_pmfs-direct-preload() {
    FIO_ENV=()
    pmfs_umount
    rm -f "$PMEM_IMG"
    umount "$HUGE_IMG_DIR"
    PMEM_IMG=$WORK/pmem.img
}
teardown_pmfs-direct() { pmfs_umount; }
teardown_pmfs-page() { pmfs_umount; }
teardown_pmfs-nospin() { pmfs_umount; }
teardown_pmfs-spin() { pmfs_umount; }
teardown_pmfs-writeback() { pmfs_umount; }

# ---------------------------------------------------------------------------------------------
# The tree to untar: ~40,000 small files from /usr (duplicated if the machine has fewer).
make_tarball() {
    TARBALL=$WORK/tree.tar
    local list=$WORK/tree.list n copy=0
    find /usr/share /usr/lib /usr/include -xdev -type f -size -16k -readable 2>/dev/null |
        LC_ALL=C sort | head -n "$TREE_FILES" >"$list"
    n=$(wc -l <"$list")
    [ "$n" -gt 0 ] || die "no files under /usr to build the tree from"
    : >"$TARBALL"
    while [ $((copy * n)) -lt "$TREE_FILES" ]; do
        head -n $((TREE_FILES - copy * n)) "$list" >"$list.part"
        tar -rf "$TARBALL" --transform "s,^/,tree/c$copy/," -P -T "$list.part" 2>/dev/null ||
            die "cannot build the tarball"
        copy=$((copy + 1))
    done
    TREE_ENTRIES=$(mkdir -p "$WORK/t" && tar -xf "$TARBALL" -C "$WORK/t" && find "$WORK/t/tree" | wc -l)
    rm -rf "$WORK/t" "$list" "$list.part"
    TREE_MB=$(($(stat -c %s "$TARBALL") / 1000000))
}

# ---------------------------------------------------------------------------------------------
NCPU=$(nproc)
echo "pmfs benchmark: $(date -u '+%Y-%m-%d %H:%M UTC'), $(uname -r), $NCPU cores, $(awk '/MemTotal/ {printf "%.0f GiB", $2 / 1048576}' /proc/meminfo)"
echo "pmfs $(git -C "$ROOT" describe --always --dirty 2>/dev/null || echo '?') ($PMFS_BIN_SRC, built $(date -u -r "$PMFS_BIN_SRC" '+%H:%M UTC')), fio $(fio --version | sed 's/fio-//'), bindfs $(bindfs --version 2>/dev/null | awk '{print $2}')"
echo "rounds $REPEATS (medians shown), fio runs ${RUNTIME}s, psync buffered I/O, pmem image $PMEM_SIZE in /dev/shm"
echo "load average at start: $(cut -d' ' -f1-3 /proc/loadavg)"
echo "NOTE: figures are ratios within this one run on a noisy $NCPU-core VM: idle vCPUs halt,"
echo "      so FUSE figures depend on how busy the machine is. Compare only inside one run."
echo

log "building the tarball"
make_tarball
log "tarball: $TREE_ENTRIES entries, $TREE_MB MB"

declare -A LOADAVG=()
IFS=, read -r -a FSLIST <<<"$ONLY"
log "every round runs each workload once on each file system in turn (rounds interleave the"
log "file systems, so a change in the machine's load hits all of them alike)"
for ((round = 1; round <= REPEATS; round++)); do
    for fs in "${FSLIST[@]}"; do
        LOADAVG[$fs]="${LOADAVG[$fs]:-}$(cut -d' ' -f1 /proc/loadavg) "
        t0=$(date +%s)
        if ! "setup_$fs"; then
            log "round $round/$REPEATS $fs: setup FAILED, skipped"
            unmount_all
            continue
        fi
        case $fs in pmfs-*) add "$fs" mount0 "$MOUNT_MS" ;; esac
        run_round "$fs" "$MNT"
        "teardown_$fs" || log "$fs: teardown failed"
        log "round $round/$REPEATS $fs: $(($(date +%s) - t0))s (load $(cut -d' ' -f1-3 /proc/loadavg))"
    done
done

# ---------------------------------------------------------------------------------------------
# One million files: create (through FUSE, 2 threads of mknod), mount time, RSS after find -ls.
million_part() {
    MNT=$MNTROOT/pmfs
    mkdir -p "$MNT"
    log "1M files: formatting and creating $MILLION_FILES files (1000 per directory, mknod, 2 threads)"
    pmfs_format && pmfs_mount cache=direct || return 1
    local out mode r
    out=$("$MB" mkfiles "$MNT/m" "$MILLION_FILES" 1000 2) || { log "mkfiles FAILED"; return 1; }
    log "1M files: $out"
    add pmfs-direct mkfiles "$(set -- $out; echo "$8")"
    pmfs_umount
    for mode in direct page; do
        [[ ",$ONLY," == *,pmfs-$mode,* ]] || continue
        for ((r = 0; r < REPEATS; r++)); do
            pmfs_mount "cache=$mode" || return 1
            add "pmfs-$mode" mount1m "$MOUNT_MS"
            pmfs_umount
        done
        pmfs_mount "cache=$mode" || return 1
        local t0
        t0=$(now_ns)
        find "$MNT" -ls >/dev/null
        add "pmfs-$mode" find1m "$(secs_since "$t0")"
        local st=/proc/$PMFS_PID/status
        add "pmfs-$mode" rss "$(awk '/VmRSS/ {printf "%.1f", $2 / 1024}' "$st")"
        add "pmfs-$mode" rssanon "$(awk '/RssAnon/ {printf "%.1f", $2 / 1024}' "$st")"
        add "pmfs-$mode" rssshmem "$(awk '/RssShmem/ {printf "%.1f", $2 / 1024}' "$st")"
        log "1M files, cache=$mode: mount ${MOUNT_MS} ms; after find -ls: $(grep -E 'VmRSS|RssAnon|RssShmem' "$st" | tr -s ' \t' ' ' | tr '\n' ' ')"
        pmfs_umount
    done
}

if [[ ",$ONLY," == *,pmfs-direct,* ]]; then
    elapsed=$(($(date +%s) - START))
    rate=$(median ${RES["pmfs-direct|create"]:-})
    srate=$(median ${RES["pmfs-direct|stat"]:-})
    if [ "$MILLION" = auto ]; then
        if [ -n "$rate" ] && [ -n "$srate" ]; then
            # creation (mknod from 2 threads: ~1.2x open+close from one) + find -ls twice
            # (~ cold stat rate) + mounts
            est=$(awk -v r="$rate" -v s="$srate" -v n="$MILLION_FILES" 'BEGIN {printf "%d", n / (r * 1.2) + 2 * n / s + 20}')
            if [ $((elapsed + est)) -le "$BUDGET" ]; then MILLION=yes; else
                MILLION=no
                log "1M files: skipped (estimated ${est}s after ${elapsed}s would exceed the ${BUDGET}s budget; use --million)"
            fi
        else
            MILLION=no
            log "1M files: skipped (no create rate measured for pmfs)"
        fi
    fi
    if [ "$MILLION" = yes ]; then
        million_part || { log "1M files: FAILED"; unmount_all; }
    fi
fi

# ---------------------------------------------------------------------------------------------
# The table.
TOTAL=$(($(date +%s) - START))
declare -a ROWS=(
    "seqwrite|1 MiB seq write|MiB/s|hi"
    "seqread|1 MiB seq read|MiB/s|hi"
    "randread1|4 KiB rand read, 1 job|kIOPS|hi"
    "randread2|4 KiB rand read, 2 jobs|kIOPS|hi"
    "randwrite|4 KiB rand write|kIOPS|hi"
    "par1write|4 KiB rand write, new file, 1 thread|kIOPS|hi"
    "par4write|4 KiB rand write, new files, 4 threads|kIOPS|hi"
    "reread|4 KiB rand re-read (warm)|kIOPS|hi"
    "mmapread|mmap 4 KiB rand read|kIOPS|hi"
    "mmappmd|mmap: PMD-mapped share of the resident mapping|%|hi"
    "append|4 KiB append+fdatasync|kIOPS|hi"
    "roundtrip|getxattr of a missing name (1 FUSE round trip)|µs|lo"
    "create|create (20k, 1 dir)|ops/s|hi"
    "stat|stat, cold (20k)|ops/s|hi"
    "unlink|unlink (20k)|ops/s|hi"
    "untar|untar tree|s|lo"
    "rmrf|rm -rf tree|s|lo"
    "mount0|mount, empty fs|ms|lo"
    "mkfiles|1M files: mknod, 2 threads|ops/s|hi"
    "mount1m|1M files: mount|ms|lo"
    "find1m|1M files: find -ls|s|lo"
    "rss|1M files: daemon VmRSS|MiB|lo"
    "rssanon|1M files: daemon RssAnon|MiB|lo"
    "rssshmem|1M files: daemon RssShmem (mapped image)|MiB|lo"
)
PEERS=()
PMFS=()
for fs in "${FSLIST[@]}"; do case $fs in pmfs-*) PMFS+=("$fs") ;; *) PEERS+=("$fs") ;; esac; done

cell() { # fs metric -> median, or "fail"/"-"
    local m
    m=$(median ${RES["$1|$2"]:-})
    if [ -n "$m" ]; then
        awk -v v="$m" 'BEGIN {if (v >= 100) printf "%.0f", v; else if (v >= 10) printf "%.1f", v; else printf "%.2f", v}'
    elif [ -n "${FAILED["$1|$2"]:-}" ]; then echo fail; else echo -; fi
}
ratio() { # pmfs peer metric dir -> speed ratio (>1: pmfs faster)
    local a b
    a=$(median ${RES["$1|$3"]:-})
    b=$(median ${RES["$2|$3"]:-})
    if [ -z "$a" ] || [ -z "$b" ]; then echo -; return; fi
    awk -v a="$a" -v b="$b" -v d="$4" 'BEGIN {if (a == 0 || b == 0) {print "-"; exit}; r = (d == "hi") ? a / b : b / a; printf "%.2f", r}'
}

echo
echo "## Absolute figures (median of $REPEATS)"
echo
hdr="| workload | unit |"
sep="|---|---|"
for fs in "${FSLIST[@]}"; do hdr+=" $fs |"; sep+="---:|"; done
echo "$hdr"
echo "$sep"
for row in "${ROWS[@]}"; do
    IFS='|' read -r key name unit dir <<<"$row"
    line="| $name | $unit |"
    any=0
    for fs in "${FSLIST[@]}"; do
        c=$(cell "$fs" "$key")
        [ "$c" != - ] && any=1
        line+=" $c |"
    done
    [ $any = 1 ] && echo "$line"
done

echo
echo "## pmfs's ratio to each peer (speed ratio: > 1 means pmfs is faster; for times, peer/pmfs)"
echo
hdr="| workload |"
sep="|---|"
for p in "${PMFS[@]}"; do for q in "${PEERS[@]}"; do hdr+=" ${p#pmfs-} / $q |"; sep+="---:|"; done; done
echo "$hdr"
echo "$sep"
for row in "${ROWS[@]}"; do
    IFS='|' read -r key name unit dir <<<"$row"
    line="| $name |"
    any=0
    for p in "${PMFS[@]}"; do for q in "${PEERS[@]}"; do
        c=$(ratio "$p" "$q" "$key" "$dir")
        [ "$c" != - ] && any=1
        line+=" $c |"
    done; done
    [ $any = 1 ] && echo "$line"
done

echo
echo "## Scaling: 4 threads on 4 new files / 1 thread on 1 new file (4 KiB random writes)"
echo
for fs in "${FSLIST[@]}"; do
    a=$(median ${RES["$fs|par4write"]:-})
    b=$(median ${RES["$fs|par1write"]:-})
    [ -n "$a" ] && [ -n "$b" ] && awk -v fs="$fs" -v a="$a" -v b="$b" \
        'BEGIN {if (b > 0) printf "- %s: %.2fx (%s vs %s kIOPS)\n", fs, a / b, a, b}'
done

echo
echo "load average (1 min) when each file system started, per round: $(for fs in "${FSLIST[@]}"; do printf '%s %s; ' "$fs" "${LOADAVG[$fs]% }"; done)"
echo "load average at end: $(cut -d' ' -f1-3 /proc/loadavg); total time ${TOTAL}s on $NCPU cores"
echo "NOTE: ratios within one run on a noisy VM; absolute figures vary between runs and machines."
if [ ${#FAILED[@]} -gt 0 ]; then
    echo "FAILED measurements: ${!FAILED[*]}"
fi
echo
echo "raw samples:"
for k in $(printf '%s\n' "${!RES[@]}" | sort); do echo "  $k:${RES[$k]}"; done
