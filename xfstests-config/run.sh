#!/bin/bash
# Run the pmfs xfstests subset with an xfstests you built yourself.
#
#   sudo XFSTESTS_DIR=/path/to/xfstests xfstests-config/run.sh [TEST...]
#
# With no TEST arguments it runs every test in tests.list (minus those in exclude). It:
#   1. builds target/release (cargo build --release --workspace) if a binary is missing, and
#      copies pmfs, mkfs.pmfs and fsck.pmfs aside so a rebuild cannot change them mid-run;
#   2. formats the two images named by local.config with mkfs.pmfs (PMFS_IMAGE_SIZE, 4G)
#      and creates the mount points;
#   3. installs the mount(8) helper /sbin/mount.fuse.pmfs for the length of the run (the
#      previous one, e.g. install.sh's, is put back at exit);
#   4. runs ./check -E exclude TESTS in XFSTESTS_DIR with HOST_OPTIONS=local.config;
#   5. prints "N passed, N failed, N not run", then unmounts both devices and runs
#      fsck.pmfs -f -n on each, printing its result.
# Exit status: 0 if no test failed and both images check clean, 1 otherwise, 2 on a setup error.
#
# Environment: XFSTESTS_DIR (required); PMFS_BIN_DIR (default <repo>/target/release: take
# the binaries from elsewhere, no build); PMFS_IMAGE_SIZE (default 4G); PMFS_IMAGE_SPARSE=1
# (sparse images, mkfs.pmfs --sparse: memory is used only as pmfs writes, instead of 2 x 4 GiB
# up front, and FITRIM is supported: it needs a sparse image);
# PMFS_LOCAL_CONFIG (default: local.config next to this script); PMFS_PRELOAD=/path/to/
# libpmfs_direct.so runs the tests (every program check starts) under the preload library,
# the daemon not (PMFS_DIRECT_STATS is passed on: e.g. =/tmp/stats sums what it served).
set -u

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/.." && pwd)

die() {
	echo "run.sh: $*" >&2
	exit 2
}

[ "$(id -u)" = 0 ] || die "must run as root (xfstests mounts, and runs commands as other users)"
# Two runs on one machine would share local.config's images, mount points and mount helper:
# the second waits for the first.
exec 9>/run/lock/pmfs-xfstests.lock
if ! flock -n 9; then
	echo "run.sh: another xfstests run holds /run/lock/pmfs-xfstests.lock; waiting for it" >&2
	flock 9
fi
[ -n "${XFSTESTS_DIR:-}" ] || die "set XFSTESTS_DIR to a built xfstests (see README.md)"
XFSTESTS_DIR=$(cd "$XFSTESTS_DIR" && pwd) || die "XFSTESTS_DIR: no such directory"
[ -x "$XFSTESTS_DIR/check" ] && [ -x "$XFSTESTS_DIR/src/t_dir_type" ] ||
	die "$XFSTESTS_DIR is not a built xfstests (no ./check or src/t_dir_type: run make there)"

config=${PMFS_LOCAL_CONFIG:-$here/local.config}
[ -f "$config" ] || die "$config: no such file"
config=$(cd "$(dirname "$config")" && pwd)/$(basename "$config")
# shellcheck source=local.config
. "$config"
for v in FSTYP FUSE_SUBTYP TEST_DEV TEST_DIR SCRATCH_DEV SCRATCH_MNT; do
	[ -n "${!v:-}" ] || die "$config does not set $v"
done
[ "$FSTYP$FUSE_SUBTYP" = fuse.pmfs ] || die "$config: expected FSTYP=fuse FUSE_SUBTYP=.pmfs"

# --- 1. the binaries ---------------------------------------------------------------------
# Cargo cannot name a binary mkfs.pmfs, so the build makes mkfs-pmfs and fsck-pmfs; installed
# copies are called mkfs.pmfs and fsck.pmfs. Accept either.
find_bin() { # NAME: print the path of NAME (or its dashed form) in $bindir
	local b
	for b in "$bindir/$1" "$bindir/${1/./-}"; do
		[ -x "$b" ] && { echo "$b"; return 0; }
	done
	return 1
}
if [ -n "${PMFS_BIN_DIR:-}" ]; then
	bindir=$(cd "$PMFS_BIN_DIR" && pwd) || die "PMFS_BIN_DIR: no such directory"
	origin=$bindir
else
	bindir=$repo/target/release
	if ! find_bin pmfs >/dev/null || ! find_bin mkfs.pmfs >/dev/null || ! find_bin fsck.pmfs >/dev/null; then
		echo "run.sh: building pmfs (cargo build --release --workspace)"
		(cd "$repo" && cargo build --release --workspace) || die "cargo build failed"
	fi
	origin="$bindir (repository at $(git -C "$repo" describe --always --dirty 2>/dev/null || echo '?'))"
fi
snap=$(mktemp -d /tmp/pmfs-xfstests.XXXXXX) || die "mktemp failed"
helper=/sbin/mount.fuse.pmfs
saved=
installed=false
cleanup() {
	if $installed; then
		if [ -n "$saved" ]; then
			cp -P "$saved" "$helper.tmp.$$" && mv -f "$helper.tmp.$$" "$helper"
		else
			rm -f "$helper"
		fi
	fi
	rm -rf "$snap"
}
trap cleanup EXIT
trap 'exit 130' INT TERM
for b in pmfs mkfs.pmfs fsck.pmfs; do
	src=$(find_bin $b) || die "no $b (or ${b/./-}) in $bindir"
	cp "$src" "$snap/$b" || die "cannot copy $src"
done
PMFS=$snap/pmfs
MKFS=$snap/mkfs.pmfs
FSCK=$snap/fsck.pmfs

# --- unmounting and waiting for the daemon ------------------------------------------------
unmount_dev() { # DEV: unmount it wherever it is mounted (xfstests unmounts by source too)
	local i
	for i in 1 2 3; do
		findmnt -rn -S "$1" >/dev/null || return 0
		umount "$1" 2>/dev/null || sleep 1
	done
	findmnt -rn -S "$1" >/dev/null && umount -l "$1"
	return 0
}
wait_released() { # DEV: wait (up to 30 s) until no process (an exiting daemon) has DEV open
	local i
	command -v fuser >/dev/null || { sleep 2; return 0; }
	for i in $(seq 60); do
		fuser -s "$1" 2>/dev/null || return 0
		sleep 0.5
	done
	echo "run.sh: $1 is still open after 30 s:" >&2
	fuser -v "$1" >&2
	return 1
}

# --- 2. format the devices ---------------------------------------------------------------
# xfstests never formats in FUSE mode (its _scratch_mkfs only empties the mounted scratch).
size=${PMFS_IMAGE_SIZE:-4G}
for dev in "$TEST_DEV" "$SCRATCH_DEV"; do
	unmount_dev "$dev"
	wait_released "$dev" || die "cannot format $dev: still in use"
	if [ "${PMFS_IMAGE_SPARSE:-0}" = 1 ]; then
		# Memory is taken only as pmfs uses it (mkfs --size alone allocates it all up
		# front); FITRIM (fstrim, generic/251, 260) hands deleted files' space back.
		rm -f "$dev" && "$MKFS" -f -q --sparse -s "$size" "$dev" ||
			die "mkfs.pmfs failed on $dev"
	else
		"$MKFS" -f -q -s "$size" "$dev" || die "mkfs.pmfs failed on $dev"
	fi
done
mkdir -p "$TEST_DIR" "$SCRATCH_MNT" || die "cannot create the mount points"

# --- 3. the mount helper -----------------------------------------------------------------
# mount(8) runs /sbin/mount.fuse.pmfs DEV MNT -o OPTS for `-t fuse.pmfs` when it exists;
# otherwise mount.fuse3, which runs `pmfs` found in the standard PATH (mount(8) resets PATH
# for helpers, so a PATH set here would not reach it). The helper below is the one
# install.sh installs, pointed at the copy under test.
if [ -e "$helper" ] || [ -L "$helper" ]; then
	saved=$snap/mount.fuse.pmfs.saved
	cp -P "$helper" "$saved" || die "cannot save $helper"
fi
installed=true
cat >"$helper.tmp.$$" <<EOF
#!/bin/sh
# mount(8) helper for pmfs, installed for one run by xfstests-config/run.sh:
#   mount.fuse.pmfs DEVICE MOUNTPOINT [-o OPTIONS]
# The daemon serves everyone: it must not inherit the mounting shell's file-size limit.
ulimit -f unlimited 2>/dev/null
# Nor the preload library of a PMFS_PRELOAD run: it is for the programs under test.
unset LD_PRELOAD
exec $PMFS "\$@"
EOF
chmod 755 "$helper.tmp.$$" && mv -f "$helper.tmp.$$" "$helper" || die "cannot install $helper"

for u in fsgqa 123456-fsgqa fsgqa2; do
	id "$u" >/dev/null 2>&1 || echo "run.sh: warning: user $u is missing; tests needing it will not run (README.md)" >&2
done
getent group fsgqa >/dev/null || echo "run.sh: warning: group fsgqa is missing" >&2

# --- 4. run the tests --------------------------------------------------------------------
if [ $# -gt 0 ]; then
	tests=("$@")
else
	mapfile -t tests < <(sed -e 's/#.*//' -e '/^[[:space:]]*$/d' "$here/tests.list")
fi
mkdir -p "$XFSTESTS_DIR/results"
log=$XFSTESTS_DIR/results/pmfs-run.$(date +%Y%m%d-%H%M%S).log
echo "run.sh: $("$PMFS" --version 2>/dev/null | head -1) from $origin; ${#tests[@]} tests; log: $log"
start=$(date +%s)
preload=()
if [ -n "${PMFS_PRELOAD:-}" ]; then
	[ -f "$PMFS_PRELOAD" ] || die "PMFS_PRELOAD: $PMFS_PRELOAD: no such file"
	preload=("LD_PRELOAD=$(cd "$(dirname "$PMFS_PRELOAD")" && pwd)/$(basename "$PMFS_PRELOAD")")
	echo "run.sh: the tests run under ${preload[0]}"
fi
(cd "$XFSTESTS_DIR" && env "${preload[@]}" HOST_OPTIONS="$config" ./check -E "$here/exclude" "${tests[@]}") 2>&1 | tee "$log"
end=$(date +%s)

# --- 5. the counts, then fsck ------------------------------------------------------------
# check ends with "Ran: t...", "Not run: t...", "Failures: t..." (each optional). "Ran" lists
# every test started, so it includes the failures and the tests that reported not run;
# excluded tests appear as [expunged] and are in none of the lists.
words() { sed -n "s/^$1: *//p" "$log" | tail -1 | wc -w; }
ran=$(words Ran)
notrun=$(words 'Not run')
failed=$(words Failures)
status=0
if ! grep -q '^Ran:' "$log"; then
	echo "run.sh: check ran no test (it stopped early: see $log)" >&2
	status=1
fi
[ "$failed" -eq 0 ] || status=1
elapsed=$((end - start))
echo "run.sh: run time $((elapsed / 60))m$((elapsed % 60))s"
[ "$failed" -eq 0 ] || echo "run.sh: failures: $(sed -n 's/^Failures: *//p' "$log" | tail -1)"
echo "$((ran - failed - notrun)) passed, $failed failed, $notrun not run"

for dev in "$TEST_DEV" "$SCRATCH_DEV"; do
	unmount_dev "$dev"
	wait_released "$dev"
	out=$("$FSCK" -f -n "$dev" 2>&1)
	rc=$?
	echo "fsck.pmfs -f -n $dev: exit $rc: $(echo "$out" | tail -1)"
	[ "$(echo "$out" | wc -l)" -le 1 ] || echo "$out" | head -20 | sed 's/^/    /'
	[ $rc -eq 0 ] || status=1
done
exit $status
