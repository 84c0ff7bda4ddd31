#!/usr/bin/env bash
# bench/scale.sh: what the device size costs (issue 18, the space part).
#
# For sparse images of each size (default 1 TiB and 16 TiB - 4 KiB), prints:
#   mkfs time and bytes written (du of the image before and after mkfs),
#   mount time (exec of the daemon to the first `ls` of the mount point that answers),
#   the daemon's RssAnon right after mount, and after creating N empty files (-n),
#   the remount time with those files present, and du of the image at the end.
# A benchmark, not a test: it asserts nothing; bench/README.md says how to read it.
#
# Usage: bench/scale.sh [-d DIR] [-n FILES] [--no-build] [SIZE...]
#   DIR    where the images go (default /dev/shm; a disk directory works as well)
#   FILES  files to create after the first mount (default 10000; 0 skips that step)
#   SIZE   image sizes as mkfs.pmfs -s takes them (default: 1T 17592186040320)
# PMFS_BIN / MKFS_BIN point it at other binaries (e.g. an older build, for before/after).
set -euo pipefail

dir=/dev/shm
files=10000
build=1
sizes=()
while [ $# -gt 0 ]; do
    case "$1" in
        -d) dir="$2"; shift 2 ;;
        -n) files="$2"; shift 2 ;;
        --no-build) build=0; shift ;;
        -h|--help) sed -n '2,16p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        -*) echo "scale.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
        *) sizes+=("$1"); shift ;;
    esac
done
[ ${#sizes[@]} -gt 0 ] || sizes=(1T 17592186040320)

root="$(cd "$(dirname "$0")/.." && pwd)"
if [ "$build" = 1 ] && [ -z "${PMFS_BIN:-}${MKFS_BIN:-}" ]; then
    (cd "$root" && cargo build --release -q -p pmfs -p mkfs-pmfs)
fi
pmfs_bin="${PMFS_BIN:-$root/target/release/pmfs}"
mkfs_bin="${MKFS_BIN:-$root/target/release/mkfs-pmfs}"

work="$(mktemp -d "$dir/pmfs-scale.XXXXXX")"
mnt="$(mktemp -d /tmp/pmfs-scale-mnt.XXXXXX)"
daemon=""
cleanup() {
    if mountpoint -q "$mnt"; then umount "$mnt" 2>/dev/null || umount -l "$mnt" || true; fi
    if [ -n "$daemon" ]; then wait "$daemon" 2>/dev/null || true; fi
    rm -rf "$work"
    rmdir "$mnt" 2>/dev/null || true
}
trap cleanup EXIT
trap 'exit 130' INT TERM

now_ns() { date +%s%N; }
ms_since() { echo $(( ($(now_ns) - $1) / 1000000 )); }
du_bytes() { du -B1 "$1" | cut -f1; }
rss_anon_kb() { awk '/^RssAnon/ {print $2}' "/proc/$1/status"; }

# Starts the daemon in the foreground (so its pid is ours) and waits until `ls` of the
# mount point answers; sets `elapsed_ms` to the milliseconds from exec to then (not
# printed: a command substitution would run it in a subshell and lose the daemon's pid).
mount_timed() {
    local img="$1" t0
    t0=$(now_ns)
    "$pmfs_bin" "$img" "$mnt" -f >"$work/daemon.log" 2>&1 &
    daemon=$!
    local tries=0
    until mountpoint -q "$mnt" && ls "$mnt" >/dev/null 2>&1; do
        if ! kill -0 "$daemon" 2>/dev/null; then
            echo "scale.sh: the daemon exited during mount:" >&2
            cat "$work/daemon.log" >&2
            exit 1
        fi
        tries=$((tries + 1))
        [ $tries -lt 60000 ] || { echo "scale.sh: mount did not answer in 60 s" >&2; exit 1; }
        sleep 0.001
    done
    elapsed_ms=$(ms_since "$t0")
}

unmount() {
    umount "$mnt"
    wait "$daemon" || true
    daemon=""
}

printf '%-16s %9s %12s %9s %12s %14s %10s %12s\n' size mkfs_ms mkfs_written mount_ms \
    rss_anon_kb "rss_${files}f_kb" remount_ms du_end
for size in "${sizes[@]}"; do
    img="$work/img"
    rm -f "$img"
    truncate -s 0 "$img"
    before=$(du_bytes "$img")
    t0=$(now_ns)
    "$mkfs_bin" -q -f --sparse -s "$size" "$img" >/dev/null
    mkfs_ms=$(ms_since "$t0")
    written=$(( $(du_bytes "$img") - before ))
    mount_timed "$img"
    mount_ms=$elapsed_ms
    rss=$(rss_anon_kb "$daemon")
    rss_files="-"
    remount_ms="-"
    if [ "$files" -gt 0 ]; then
        python3 - "$mnt" "$files" <<'EOF'
import os, sys
d, n = sys.argv[1], int(sys.argv[2])
per = 1000
for i in range(n):
    sub = os.path.join(d, "d%d" % (i // per))
    if i % per == 0:
        os.mkdir(sub)
    os.close(os.open(os.path.join(sub, "f%d" % i), os.O_CREAT | os.O_WRONLY, 0o644))
EOF
        rss_files=$(rss_anon_kb "$daemon")
        unmount
        mount_timed "$img"
        remount_ms=$elapsed_ms
    fi
    unmount
    printf '%-16s %9s %12s %9s %12s %14s %10s %12s\n' "$size" "$mkfs_ms" "$written" \
        "$mount_ms" "$rss" "$rss_files" "$remount_ms" "$(du_bytes "$img")"
    rm -f "$img"
done
