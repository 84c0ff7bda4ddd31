#!/usr/bin/env bash
# bench/requests.sh: where a workload's time goes on pmfs, in FUSE requests (and optionally in
# CPU samples). Mounts a fresh pmfs in the foreground with -d, runs one small workload, and
# prints the FUSE requests it caused, by opcode, and per operation of the workload.
#
# usage: bench/requests.sh [-o MOUNTOPTS] [--perf] [--strace] WORKLOAD
#   WORKLOAD: create | stat | unlink | untar | seqread | seqwrite | randread | reread |
#             mmapread | append | find
#   -o OPTS     pmfs mount options (e.g. cache=page)
#   --perf      also sample the daemon with perf record -e cpu-clock (software clock: works on
#               VMs without hardware counters) and print the top symbols; the debug log is
#               then off, so the samples are not skewed by logging
#   --strace    also count the daemon's system calls (strace -c -f)
# Environment: PMFS_BIN, MKFS_BIN as for compare.sh.
#
# The counts are exact and do not depend on the machine's load, unlike times.

set -uo pipefail
OPTS=cache=direct
PERF=0
STRACE=0
while [ $# -gt 1 ]; do
    case "$1" in
        -o) OPTS=$2; shift 2 ;;
        --perf) PERF=1; shift ;;
        --strace) STRACE=1; shift ;;
        *) break ;;
    esac
done
[ $# -eq 1 ] || { sed -n '2,16p' "$0" | sed 's/^# \{0,1\}//'; exit 2; }
WL=$1
[ "$(id -u)" = 0 ] || { echo "requests.sh: must run as root" >&2; exit 1; }

HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/.." && pwd)
PMFS_BIN=${PMFS_BIN:-$ROOT/target/release/pmfs}
MKFS_BIN=${MKFS_BIN:-$ROOT/target/release/mkfs-pmfs}
WORK=$(mktemp -d /dev/shm/pmfs-req.XXXXXX)
MNT=$(mktemp -d /tmp/pmfs-req-mnt.XXXXXX)
LOG=$WORK/debug.log
DPID=
cleanup() {
    mountpoint -q "$MNT" && { umount "$MNT" 2>/dev/null || umount -l "$MNT"; }
    if [ -n "$DPID" ]; then
        for _ in $(seq 100); do kill -0 "$DPID" 2>/dev/null || break; sleep 0.1; done
        kill "$DPID" 2>/dev/null
    fi
    [ -n "${KEEP_LOG:-}" ] && cp "$LOG" "$KEEP_LOG"
    [ -n "${KEEP_PERF:-}" ] && [ -f "$WORK/perf.data" ] && cp "$WORK/perf.data" "$KEEP_PERF"
    rm -rf "$WORK"
    rmdir "$MNT" 2>/dev/null
}
trap cleanup EXIT
trap 'exit 130' INT TERM

gcc -O2 -pthread -o "$WORK/metabench" "$HERE/metabench.c" || exit 1
MB=$WORK/metabench
"$MKFS_BIN" -f -q --size 3G "$WORK/pmem.img" || exit 1

mount_pmfs() {
    if [ "$PERF" = 1 ]; then
        "$PMFS_BIN" -f "$WORK/pmem.img" "$MNT" -o "$OPTS" 2>"$LOG" &
    else
        "$PMFS_BIN" -f -d "$WORK/pmem.img" "$MNT" -o "$OPTS" 2>"$LOG" &
    fi
    DPID=$!
    for _ in $(seq 200); do mountpoint -q "$MNT" && stat "$MNT" >/dev/null && return 0; sleep 0.05; done
    echo "requests.sh: mount failed:" >&2
    cat "$LOG" >&2
    exit 1
}
remount() {
    umount "$MNT"
    for _ in $(seq 100); do kill -0 "$DPID" 2>/dev/null || break; sleep 0.1; done
    mount_pmfs
}

N=2000          # files for the metadata workloads
IOS=20000       # 4 KiB I/Os for the random workloads
fio_base=(--name=req --ioengine=psync --fallocate=none --output-format=terse --terse-version=3)

mount_pmfs
# Preparation (not counted).
case $WL in
    stat | unlink)
        "$MB" mkfiles "$MNT/d" "$N" "$N" 1 >/dev/null ;;
    seqread | randread | reread | mmapread)
        fio "${fio_base[@]}" --filename="$MNT/f" --rw=write --bs=1m --size=256m >/dev/null ;;
    find)
        "$MB" mkfiles "$MNT/m" 20000 1000 2 >/dev/null ;;
    untar)
        mkdir -p "$WORK/src/tree"
        find /usr/share/doc -xdev -type f -size -16k 2>/dev/null | head -n "$N" |
            tar -cf "$WORK/tree.tar" -P --transform 's,^/,tree/,' -T - ;;
esac
case $WL in stat | unlink | seqread | randread | mmapread | find) remount ;; esac
if [ "$WL" = reread ]; then
    fio "${fio_base[@]}" --filename="$MNT/f" --rw=read --bs=1m --size=256m --invalidate=0 >/dev/null
fi
: >"$LOG.mark"
START_LINE=$(wc -l <"$LOG")
if [ "$PERF" = 1 ]; then
    perf record -q -e cpu-clock -F 1999 --call-graph dwarf,16384 -p "$DPID" -o "$WORK/perf.data" 2>/dev/null &
    PERFPID=$!
    sleep 0.5
fi
if [ "$STRACE" = 1 ]; then
    strace -c -f -p "$DPID" -o "$WORK/strace.txt" 2>/dev/null &
    STRACEPID=$!
    sleep 0.5
fi

OPS=0
t0=$(date +%s%N)
case $WL in
    create)
        "$MB" meta "$MNT/d" "$N" >/dev/null 2>&1 # create, stat, unlink: counted together
        OPS=$((3 * N))
        echo "(create, stat and unlink of $N files: per op = per file-operation, 3 per file)" ;;
    stat) "$MB" statfiles "$MNT/d" "$N" "$N" >/dev/null; OPS=$N ;;
    unlink) rm -rf "$MNT/d"; OPS=$N ;;
    untar) tar -xf "$WORK/tree.tar" -C "$MNT"; OPS=$(tar -tf "$WORK/tree.tar" | wc -l) ;;
    seqwrite) fio "${fio_base[@]}" --filename="$MNT/f" --rw=write --bs=1m --size=256m >/dev/null; OPS=256 ;;
    seqread) fio "${fio_base[@]}" --filename="$MNT/f" --rw=read --bs=1m --size=256m >/dev/null; OPS=256 ;;
    randread | reread)
        fio "${fio_base[@]}" --filename="$MNT/f" --rw=randread --bs=4k --size=256m --number_ios=$IOS \
            $([ "$WL" = reread ] && echo --invalidate=0) >/dev/null
        OPS=$IOS ;;
    mmapread)
        fio "${fio_base[@]}" --filename="$MNT/f" --ioengine=mmap --rw=randread --bs=4k --size=256m --number_ios=$IOS >/dev/null
        OPS=$IOS ;;
    append)
        fio "${fio_base[@]}" --filename="$MNT/a" --rw=write --bs=4k --fdatasync=1 --size=40m >/dev/null
        OPS=10240 ;;
    find) find "$MNT/m" -ls >/dev/null; OPS=20000 ;;
    *) echo "requests.sh: unknown workload $WL" >&2; exit 2 ;;
esac
t1=$(date +%s%N)
[ "$PERF" = 1 ] && { kill -INT "$PERFPID"; wait "$PERFPID" 2>/dev/null; }
[ "$STRACE" = 1 ] && { kill -INT "$STRACEPID"; wait "$STRACEPID" 2>/dev/null; }

echo "workload $WL on pmfs -o $OPTS: $OPS operations in $(awk -v a="$t0" -v b="$t1" 'BEGIN {printf "%.3f", (b - a) / 1e9}') s$([ "$PERF" = 0 ] && echo ' (with debug logging: slower than without)')"
if [ "$PERF" = 0 ]; then
    echo "FUSE requests (opcode, count, per operation):"
    tail -n +"$((START_LINE + 1))" "$LOG" | grep -o 'FUSE( *[0-9]*) ino 0x[0-9a-f]* [A-Z_]*' |
        awk '{print $NF}' | sed 's/^0x.*/(unnamed)/' | sort | uniq -c | sort -rn |
        awk -v n="$OPS" '{printf "  %-12s %9d  %7.3f\n", $2, $1, $1 / n; t += $1} END {printf "  %-12s %9d  %7.3f\n", "total", t, t / n}'
    echo "READ/WRITE sizes (bytes, count):"
    tail -n +"$((START_LINE + 1))" "$LOG" | grep -oE '(READ|WRITE) fh .*size [0-9]+' |
        awk '{print $1, $NF}' | sort | uniq -c | sort -rn | head -8 | sed 's/^/  /'
fi
if [ "$PERF" = 1 ]; then
    echo "daemon CPU samples (perf record -e cpu-clock), top symbols by self time:"
    perf report -i "$WORK/perf.data" --no-children --stdio --sort symbol 2>/dev/null |
        grep -E '^ +[0-9]' | head -25
fi
if [ "$STRACE" = 1 ]; then
    echo "daemon system calls (strace -c -f):"
    head -20 "$WORK/strace.txt"
fi
