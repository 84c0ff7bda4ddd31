#!/usr/bin/env bash
# bench/scale.sh: what the device size costs (issue 18, the space part).
#
# For sparse images of each size (default 1 TiB and 16 TiB - 4 KiB), prints:
#   mkfs time and bytes written (du of the image before and after mkfs),
#   mount time (exec of the daemon to the first `stat` of the mount point that answers),
#   the daemon's RssAnon right after mount, and after creating N empty files (-n),
#   the remount time with those files present and the daemon's RssAnon then, the time of
#   `find -ls` of them all and RssAnon after it, fsck.pmfs -f -n time and peak RSS
#   (/usr/bin/time -v), and du of the image at the end. While creating, it prints the
#   create rate of each tenth of FILES (so a slowdown with size shows).
# A benchmark, not a test: it asserts nothing; bench/README.md says how to read it.
#
# Usage: bench/scale.sh [-d DIR] [-n FILES] [-j CREATORS] [--keep] [--no-build] [SIZE...]
#   DIR       where the images go (default /dev/shm; a disk directory works as well)
#   FILES     files to create after the first mount (default 10000; 0 skips those steps)
#   CREATORS  processes creating files in parallel, each in its own directories of 1,000
#             files (default 1; FUSE round trips dominate, so more than the cores helps)
#   --keep    keep the last image (its path is printed) instead of deleting it
#   SIZE      image sizes as mkfs.pmfs -s takes them (default: 1T 17592186040320)
# PMFS_BIN / MKFS_BIN / FSCK_BIN point it at other binaries (e.g. an older build).
set -euo pipefail

dir=/dev/shm
files=10000
creators=1
keep=0
build=1
sizes=()
while [ $# -gt 0 ]; do
    case "$1" in
        -d) dir="$2"; shift 2 ;;
        -n) files="$2"; shift 2 ;;
        -j) creators="$2"; shift 2 ;;
        --keep) keep=1; shift ;;
        --no-build) build=0; shift ;;
        -h|--help) sed -n '2,22p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        -*) echo "scale.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
        *) sizes+=("$1"); shift ;;
    esac
done
[ ${#sizes[@]} -gt 0 ] || sizes=(1T 17592186040320)

root="$(cd "$(dirname "$0")/.." && pwd)"
if [ "$build" = 1 ] && [ -z "${PMFS_BIN:-}${MKFS_BIN:-}${FSCK_BIN:-}" ]; then
    (cd "$root" && cargo build --release -q -p pmfs -p mkfs-pmfs -p fsck-pmfs)
fi
pmfs_bin="${PMFS_BIN:-$root/target/release/pmfs}"
mkfs_bin="${MKFS_BIN:-$root/target/release/mkfs-pmfs}"
fsck_bin="${FSCK_BIN:-$root/target/release/fsck-pmfs}"

work="$(mktemp -d "$dir/pmfs-scale.XXXXXX")"
mnt="$(mktemp -d /tmp/pmfs-scale-mnt.XXXXXX)"
daemon=""
cleanup() {
    if mountpoint -q "$mnt"; then umount "$mnt" 2>/dev/null || umount -l "$mnt" || true; fi
    if [ -n "$daemon" ]; then wait "$daemon" 2>/dev/null || true; fi
    if [ "$keep" = 1 ] && [ -e "$work/img" ]; then
        echo "scale.sh: image kept: $work/img" >&2
    else
        rm -rf "$work"
    fi
    rmdir "$mnt" 2>/dev/null || true
}
trap cleanup EXIT
trap 'exit 130' INT TERM

now_ns() { date +%s%N; }
ms_since() { echo $(( ($(now_ns) - $1) / 1000000 )); }
du_bytes() { du -B1 "$1" | cut -f1; }
rss_anon_kb() { awk '/^RssAnon/ {print $2}' "/proc/$1/status"; }

# Starts the daemon in the foreground (so its pid is ours) and waits until `stat` of the
# mount point answers (a GETATTR served by the daemon; not `ls`, which with FILES in the
# root would time the listing of thousands of entries); sets `elapsed_ms` to the milliseconds from exec to then (not
# printed: a command substitution would run it in a subshell and lose the daemon's pid).
mount_timed() {
    local img="$1" t0
    t0=$(now_ns)
    "$pmfs_bin" "$img" "$mnt" -f >"$work/daemon.log" 2>&1 &
    daemon=$!
    local tries=0
    until mountpoint -q "$mnt" && stat "$mnt" >/dev/null 2>&1; do
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

columns='%-16s %8s %12s %8s %11s %11s %9s %11s %8s %11s %8s %11s %11s %12s\n'
printf "$columns" size mkfs_ms mkfs_written mount_ms rss_anon_kb rss_full_kb remount_ms \
    rss_remount find_ms rss_find_kb fsck_ms fsck_maxrss fsck_anon du_end
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
    rss_files="-" remount_ms="-" rss_remount="-" find_ms="-" rss_find="-"
    fsck_ms="-" fsck_rss="-" fsck_anon="-"
    if [ "$files" -gt 0 ]; then
        # Creators: worker w makes the directories d ≡ w (mod CREATORS) of 1,000 files
        # each; the parent samples their counters and prints the rate of each tenth.
        python3 - "$mnt" "$files" "$creators" <<'EOF' >&2
import multiprocessing as mp, os, sys, time
d, n, workers = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
per = 1000
dirs = (n + per - 1) // per
done = mp.Array("q", workers, lock=False)

def create(w):
    for k in range(w, dirs, workers):
        sub = os.path.join(d, "d%d" % k)
        os.mkdir(sub)
        for i in range(k * per, min(n, (k + 1) * per)):
            path = os.path.join(sub, "f%d" % i)
            os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
            done[w] += 1

procs = [mp.Process(target=create, args=(w,)) for w in range(workers)]
start = time.monotonic()
for p in procs:
    p.start()
step = max(1, n // 10)
mark, mark_t = 0, start
while True:
    alive = any(p.is_alive() for p in procs)
    total = sum(done)
    now = time.monotonic()
    if total >= mark + step or (not alive and total > mark):
        rate = (total - mark) / max(now - mark_t, 1e-9)
        print("scale.sh: files %d-%d: %.0f creates/s" % (mark, total, rate), flush=True)
        mark, mark_t = total, now
    if not alive:
        break
    time.sleep(0.2)
for p in procs:
    p.join()
    if p.exitcode != 0:
        sys.exit("scale.sh: a creator failed")
print("scale.sh: %d files in %.1f s, %.0f creates/s" % (n, now - start, n / (now - start)), flush=True)
EOF
        rss_files=$(rss_anon_kb "$daemon")
        unmount
        mount_timed "$img"
        remount_ms=$elapsed_ms
        rss_remount=$(rss_anon_kb "$daemon")
        t0=$(now_ns)
        find "$mnt" -ls >/dev/null
        find_ms=$(ms_since "$t0")
        rss_find=$(rss_anon_kb "$daemon")
        unmount
        # Peak RSS from time(1) counts the pages of the image fsck maps (shared memory on
        # /dev/shm); the peak of its anonymous memory is sampled every 50 ms.
        /usr/bin/time -v -o "$work/fsck.time" "$fsck_bin" -f -n "$img" >"$work/fsck.log" 2>&1 &
        timer=$!
        fsck_anon=0
        while kill -0 "$timer" 2>/dev/null; do
            for pid in $(pgrep -P "$timer"); do
                a=$(rss_anon_kb "$pid" 2>/dev/null || echo 0)
                [ "${a:-0}" -le "$fsck_anon" ] || fsck_anon=$a
            done
            sleep 0.05
        done
        wait "$timer" || echo "scale.sh: fsck exited $?: $(tail -3 "$work/fsck.log")" >&2
        fsck_ms=$(awk -F': ' '/Elapsed \(wall clock\)/ {n = split($2, t, ":"); s = 0;
            for (i = 1; i <= n; i++) s = s * 60 + t[i]; printf "%d", s * 1000}' "$work/fsck.time")
        fsck_rss=$(awk '/Maximum resident set size/ {print $NF}' "$work/fsck.time")
    else
        unmount
    fi
    [ -z "$daemon" ] || unmount
    printf "$columns" "$size" "$mkfs_ms" "$written" "$mount_ms" "$rss" "$rss_files" \
        "$remount_ms" "$rss_remount" "$find_ms" "$rss_find" "$fsck_ms" "$fsck_rss" "$fsck_anon" \
        "$(du_bytes "$img")"
    [ "$keep" = 1 ] || rm -f "$img"
done
