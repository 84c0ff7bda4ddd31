//! `mkfs.pmfs`: formats a persistent-memory device, or an image file, for pmfs.

use clap::Parser;
use pmfs::device::{DeviceError, Media, create_image, create_sparse_image};
use pmfs::format::devices::NODE_UNKNOWN;
use pmfs::format::{
    BLOCK_SIZE, LABEL_LEN, MIN_DEVICE_SIZE, SUPERBLOCK_MAGIC, format_uuid, parse_uuid,
};
use pmfs::mkfs::{
    HugeRegions, MemberSpec, MkfsOptions, MkfsSummary, RootDir, format, format_devices, now_ns,
};
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

/// Largest device the format describes (2^40 blocks).
const MAX_DEVICE_SIZE: u64 = (1 << 40) * BLOCK_SIZE + (BLOCK_SIZE - 1);

const ABOUT: &str = "Create a pmfs file system on a persistent-memory device or an image file";

const LONG_ABOUT: &str = "\
Create a pmfs file system on DEVICE: a device-DAX character device (/dev/daxN.M), a pmem
block device (/dev/pmemN), or a regular file used as an image (in /dev/shm, on a DAX-mounted
file system, or anywhere else). The whole device is used.

Only metadata is written (a few MiB), never the data area, so formatting takes milliseconds
whatever the size. mkfs.pmfs refuses to overwrite a device that already holds a pmfs, ext2/3/4,
xfs or btrfs file system, or a swap area, unless -f is given.";

const EXAMPLES: &str = "\
Examples:
  mkfs.pmfs /dev/dax0.0                     format a device-DAX namespace
  mkfs.pmfs -L data /dev/pmem0              format a pmem block device, label it \"data\"
  mkfs.pmfs --size 4G /dev/shm/pm.img       create a 4 GiB image in memory and format it
  mkfs.pmfs -f -q -s 512M disk.img          reformat (or create) a 512 MiB image, silently
  mkfs.pmfs --sparse -s 1T /srv/pm.img      a 1 TiB image that takes space only as it is
                                            used (writes fail with ENOSPC if /srv fills up)
  mkfs.pmfs --huge-regions 25% /dev/dax0.0  keep the last quarter of the device for
                                            files of 1 GiB and more (1 GiB extents)
  mkfs.pmfs -U 0b7c2f6e-5d1a-4f3c-9e8b-2a4d6c8e0f12 /dev/dax0.0
                                            format with a given UUID
  mkfs.pmfs --root-owner 1000:1000 --root-mode 0700 /dev/dax0.0
                                            a file system user 1000 owns (and mounts:
                                            pmfs DEVICE MNT as that user)

Exit status: 0 formatted, 1 refused or failed, 2 bad usage.";

#[derive(Parser, Debug)]
#[command(
    name = "mkfs.pmfs",
    bin_name = "mkfs.pmfs",
    version,
    about = ABOUT,
    long_about = LONG_ABOUT,
    after_help = EXAMPLES
)]
struct Args {
    /// The device or image file to format: /dev/daxN.M, /dev/pmemN, or a regular file
    #[arg(value_name = "DEVICE", required = true, num_args = 1..)]
    device: Vec<PathBuf>,

    /// NUMA node of each device, in the order of the devices (several devices only)
    ///
    /// The k-th --node is the node of the k-th DEVICE (give one per device, or none). New
    /// file data goes to the device on the writing thread's node. Without --node, a
    /// /dev/daxX.Y or /dev/pmemN takes its node from sysfs and an image has none; at mount,
    /// sysfs wins over what is recorded here for a device that has it.
    #[arg(long, value_name = "N")]
    node: Vec<u32>,

    /// Create DEVICE as an image file of SIZE bytes, or grow it to SIZE (e.g. 512M, 4G, 1T)
    ///
    /// Create DEVICE as an image file of SIZE bytes, or grow an existing image to SIZE; its
    /// space is allocated up front, so the file system can never hit a full disk below it
    /// (see --sparse).
    /// SIZE is a number of bytes with an optional binary suffix K, M, G, T or P (also KiB,
    /// MiB, ...; 1K = 1024), e.g. 512M, 4G, 1.5T; it is rounded down to whole 4 KiB blocks.
    /// pmfs needs at least 16 MiB. Without --size, DEVICE must exist and is used whole.
    #[arg(short, long, value_name = "SIZE", value_parser = parse_size_arg)]
    size: Option<Size>,

    /// With --size: create the image sparse, allocating space only as pmfs uses it
    ///
    /// With --size: create (or grow) the image without allocating its space, so it may be
    /// larger than the free space of the file system holding it (e.g. --size 1T on a small
    /// disk). Risk: once that file system is full, writes to pmfs fail with ENOSPC (No space
    /// left on device) even though df shows pmfs space free; pmfs allocates the image's
    /// space before it uses it, so such a write fails cleanly and nothing is lost. fstrim on
    /// the mount gives the space of deleted files back to the file system holding the image.
    #[arg(long, requires = "size")]
    sparse: bool,

    /// Volume label, up to 64 bytes of UTF-8
    #[arg(short = 'L', long, value_name = "LABEL", value_parser = parse_label)]
    label: Option<String>,

    /// File-system UUID (default: a random one)
    ///
    /// File-system UUID in canonical form, xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx; by default a
    /// random (version 4) UUID is generated.
    #[arg(short = 'U', long, value_name = "UUID", value_parser = parse_uuid_arg)]
    uuid: Option<[u8; 16]>,

    /// Format even if DEVICE already holds a file system
    ///
    /// Format even if DEVICE already holds a file system (pmfs, ext2/3/4, xfs, btrfs) or a
    /// swap area: its contents are lost. A device in use (mounted, or opened by a pmfs
    /// daemon) is refused even with -f.
    #[arg(short, long)]
    force: bool,

    /// Print nothing but errors.
    #[arg(short, long)]
    quiet: bool,

    /// Owner of the root directory, numeric UID:GID (default: yours; 0:0 as root)
    ///
    /// Owner of the root directory, as numeric UID:GID (e.g. 1000:1000). By default the
    /// root directory belongs to whoever runs mkfs.pmfs: its real user and group when that
    /// is not root, so a user can format an image, mount it (pmfs IMG MNT) and write to it;
    /// 0:0 when root formats.
    #[arg(long, value_name = "UID:GID", value_parser = parse_owner_arg, conflicts_with = "extended")]
    root_owner: Option<(u32, u32)>,

    /// Permission bits of the root directory, in octal (default 0755)
    ///
    /// Permission bits of the root directory, in octal: rwx for owner, group and others, and
    /// the set-user-ID, set-group-ID and sticky bits (e.g. 0700, 2775, 1777); default 0755.
    #[arg(long, value_name = "MODE", value_parser = parse_mode_arg)]
    root_mode: Option<u16>,

    /// Extended options, as mke2fs: root_owner[=UID:GID]
    ///
    /// Extended options, comma-separated, as mke2fs spells them. root_owner[=UID:GID] is
    /// --root-owner; root_owner alone means your own user and group.
    #[arg(short = 'E', value_name = "OPTIONS", value_parser = parse_extended_arg)]
    extended: Option<(u32, u32)>,

    /// Reserve the last N whole 1 GiB regions (or PERCENT% of them) for 1 GiB extents
    ///
    /// Reserve the device's last N whole 1 GiB regions, or PERCENT% of its whole regions
    /// (e.g. 4 or 25%), for files of 1 GiB and more, whose 1 GiB-aligned extents a direct
    /// mapping can map with 1 GiB pages. Whole regions are taken for such files first; small
    /// files and 2 MiB chunks use a reserved region only when the rest of the device has no
    /// free space that fits, so a full device spills into them rather than failing with
    /// ENOSPC. The first region holds the metadata and is never reserved. Stored in the
    /// superblock; default 0 (without a reservation the allocator still keeps whole regions
    /// whole as long as other space serves).
    #[arg(long, value_name = "N|PERCENT%", value_parser = parse_huge_regions_arg)]
    huge_regions: Option<HugeRegions>,
}

/// A size argument: its value and the text the user wrote (for messages).
#[derive(Clone, Debug)]
struct Size {
    bytes: u64,
    text: String,
}

/// Parses a size: digits, an optional fraction, an optional binary unit.
fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let shift = match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kib" => 10,
        "m" | "mib" => 20,
        "g" | "gib" => 30,
        "t" | "tib" => 40,
        "p" | "pib" => 50,
        "kb" | "mb" | "gb" | "tb" | "pb" => {
            return Err(format!(
                "ambiguous unit {unit:?}: use {} or {}iB (binary units, 1K = 1024)",
                &unit[..1],
                &unit[..1]
            ));
        }
        _ => return Err(format!("unknown unit {unit:?}: use K, M, G, T or P")),
    };
    let (int, frac) = num.split_once('.').unwrap_or((num, ""));
    if (int.is_empty() && frac.is_empty()) || frac.contains('.') {
        return Err("expected a number, e.g. 512M or 4G".into());
    }
    let too_large = || "too large".to_string();
    let int: u128 = if int.is_empty() {
        0
    } else {
        int.parse().map_err(|_| too_large())?
    };
    let unit = 1u128 << shift;
    let mut bytes = int.checked_mul(unit).ok_or_else(too_large)?;
    if !frac.is_empty() {
        if shift == 0 {
            return Err("a number of bytes has no fraction".into());
        }
        let digits = u32::try_from(frac.len()).map_err(|_| too_large())?;
        let scale = 10u128.checked_pow(digits).ok_or_else(too_large)?;
        let f: u128 = frac.parse().map_err(|_| too_large())?;
        bytes += f.checked_mul(unit).ok_or_else(too_large)? / scale;
    }
    // Whole blocks: the file system uses nothing smaller, and images are created in pages.
    let bytes = bytes / u128::from(BLOCK_SIZE) * u128::from(BLOCK_SIZE);
    u64::try_from(bytes).map_err(|_| too_large())
}

fn parse_size_arg(s: &str) -> Result<Size, String> {
    Ok(Size {
        bytes: parse_size(s)?,
        text: s.to_string(),
    })
}

fn parse_label(s: &str) -> Result<String, String> {
    if s.len() > LABEL_LEN {
        return Err(format!(
            "label too long: {} bytes, at most {LABEL_LEN}",
            s.len()
        ));
    }
    if s.contains('\0') {
        return Err("label contains a NUL byte".into());
    }
    Ok(s.to_string())
}

fn parse_huge_regions_arg(s: &str) -> Result<HugeRegions, String> {
    let bad = || format!("{s:?} is not a number of regions (4) nor a percentage (25%)");
    match s.strip_suffix('%') {
        Some(p) => match p.parse::<u8>() {
            Ok(p) if p <= 100 => Ok(HugeRegions::Percent(p)),
            _ => Err(format!("{s:?}: a percentage is 0% to 100%")),
        },
        None => s.parse::<u64>().map(HugeRegions::Count).map_err(|_| bad()),
    }
}

fn parse_uuid_arg(s: &str) -> Result<[u8; 16], String> {
    let dashes_ok = s
        .char_indices()
        .all(|(i, c)| (c == '-') == matches!(i, 8 | 13 | 18 | 23));
    parse_uuid(s)
        .filter(|_| dashes_ok)
        .ok_or_else(|| "not a UUID: expected xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx".into())
}

/// A numeric user or group ID: decimal, below 2^32 - 1 (which chown reads as "unchanged"
/// and no account can have).
fn parse_id(s: &str) -> Option<u32> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse::<u32>().ok().filter(|&id| id != u32::MAX)
}

fn parse_owner_arg(s: &str) -> Result<(u32, u32), String> {
    s.split_once(':')
        .and_then(|(u, g)| Some((parse_id(u)?, parse_id(g)?)))
        .ok_or_else(|| {
            "expected UID:GID, two numbers below 4294967295 such as 1000:1000".to_string()
        })
}

fn parse_mode_arg(s: &str) -> Result<u16, String> {
    let bad = || "expected an octal mode such as 0755, at most 07777".to_string();
    if s.is_empty() || !s.bytes().all(|b| (b'0'..=b'7').contains(&b)) {
        return Err(bad());
    }
    u16::from_str_radix(s, 8)
        .ok()
        .filter(|m| *m <= 0o7777)
        .ok_or_else(bad)
}

/// `-E OPTIONS`: the one extended option there is, root_owner[=UID:GID], as mke2fs's.
fn parse_extended_arg(s: &str) -> Result<(u32, u32), String> {
    let mut owner = None;
    for opt in s.split(',') {
        owner = Some(match opt.split_once('=') {
            None if opt == "root_owner" => {
                let me = RootDir::for_caller();
                (me.uid, me.gid)
            }
            Some(("root_owner", value)) => {
                parse_owner_arg(value).map_err(|e| format!("root_owner={value}: {e}"))?
            }
            _ => {
                return Err(format!(
                    "unknown extended option '{opt}' (there is only root_owner[=UID:GID])"
                ));
            }
        });
    }
    owner.ok_or_else(|| "no extended option given".to_string())
}

/// The root directory the arguments ask for.
fn root_dir(args: &Args) -> RootDir {
    let caller = RootDir::for_caller();
    let (uid, gid) = args
        .root_owner
        .or(args.extended)
        .unwrap_or((caller.uid, caller.gid));
    RootDir {
        uid,
        gid,
        mode: args.root_mode.unwrap_or(caller.mode),
    }
}

/// `bytes` in binary units with `decimals` decimals ("1.00 GiB").
fn human(bytes: u64, decimals: usize) -> String {
    const UNITS: [&str; 6] = ["bytes", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut v = bytes as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{bytes} bytes")
    } else {
        format!("{v:.decimals$} {}", UNITS[u])
    }
}

fn percent(p: f64) -> String {
    if p >= 0.1 {
        format!("{p:.2}%")
    } else {
        format!("{p:.3}%")
    }
}

/// What an existing signature says the device holds, if anything. `read` fills a buffer from
/// a byte offset and returns false past the end of the device.
fn existing_signature(read: &mut dyn FnMut(u64, &mut [u8]) -> bool) -> Option<String> {
    let mut w = [0u8; 8];
    for off in [0, 4096] {
        if read(off, &mut w) && u64::from_le_bytes(w) == SUPERBLOCK_MAGIC {
            return Some("a pmfs file system".into());
        }
    }
    if read(0, &mut w) && u64::from_le_bytes(w) == pmfs::format::devices::MEMBER_MAGIC {
        return Some("a device of a pmfs file system over several devices".into());
    }
    let mut magic = [0u8; 4];
    if read(0, &mut magic) && &magic == b"XFSB" {
        return Some("an xfs file system".into());
    }
    // ext2/3/4: the superblock is at byte 1024, s_magic at +56, feature words at +92.
    let mut sb = [0u8; 112];
    if read(1024, &mut sb) && u16::from_le_bytes([sb[56], sb[57]]) == 0xEF53 {
        let word = |o: usize| u32::from_le_bytes([sb[o], sb[o + 1], sb[o + 2], sb[o + 3]]);
        let (compat, incompat, ro_compat) = (word(92), word(96), word(100));
        // extents, 64bit, flex_bg, ... / huge_file, gdt_csum, dir_nlink, extra_isize, csum.
        let kind = if incompat & 0x2c0 != 0 || ro_compat & 0x478 != 0 {
            "ext4"
        } else if compat & 0x4 != 0 {
            "ext3"
        } else {
            "ext2"
        };
        return Some(format!("an {kind} file system"));
    }
    let mut btrfs = [0u8; 8];
    if read(65600, &mut btrfs) && &btrfs == b"_BHRfS_M" {
        return Some("a btrfs file system".into());
    }
    let mut swap = [0u8; 10];
    if read(4096 - 10, &mut swap) && (&swap == b"SWAPSPACE2" || &swap == b"SWAP-SPACE") {
        return Some("a swap area".into());
    }
    None
}

/// A device error as one line that names the device once.
fn device_error(path: &Path, e: &DeviceError) -> String {
    match e {
        DeviceError::Io { .. } | DeviceError::Busy(_) | DeviceError::Unsupported { .. } => {
            e.to_string()
        }
        _ => format!("{}: {e}", path.display()),
    }
}

fn refuse(path: &Path, what: &str) -> String {
    format!(
        "{}: already contains {what} (use -f to overwrite)",
        path.display()
    )
}

fn run(args: &Args) -> Result<(MkfsSummary, String), String> {
    if !args.node.is_empty() && args.node.len() != args.device.len() {
        return Err(format!(
            "{} --node for {} devices: give one per device, in their order, or none",
            args.node.len(),
            args.device.len()
        ));
    }
    if args.device.len() > pmfs::format::devices::MAX_MEMBERS {
        return Err(format!(
            "{} devices: a file system spans at most {}",
            args.device.len(),
            pmfs::format::devices::MAX_MEMBERS
        ));
    }
    for (i, a) in args.device.iter().enumerate() {
        if args.device[..i].iter().any(|b| b == a) {
            return Err(format!("{}: named twice", a.display()));
        }
    }
    // Allocating a large image and formatting a large device take seconds: say so on a
    // terminal (nothing is shown elsewhere, nor for runs shorter than a second).
    let mut progress =
        pmfs::cli::Progress::start(format!("mkfs.pmfs: {}", args.device[0].display()));
    let devs = args
        .device
        .iter()
        .map(|path| prepare(args, path, &mut progress).map(Arc::new))
        .collect::<Result<Vec<_>, String>>()?;
    let opts = MkfsOptions {
        label: args.label.clone().unwrap_or_default(),
        uuid: args.uuid,
        now_ns: now_ns(),
        root: root_dir(args),
        huge_regions: args.huge_regions.unwrap_or_default(),
        ..MkfsOptions::default()
    };
    progress.phase("formatting");
    let shown = args.device[0].display();
    let summary = if let [dev] = devs.as_slice() {
        format(dev.as_ref(), &opts).map_err(|e| format!("{shown}: {e}"))?
    } else {
        let members: Vec<MemberSpec> = devs
            .iter()
            .zip(&args.device)
            .enumerate()
            .map(|(i, (dev, path))| MemberSpec {
                media: Arc::clone(dev) as Arc<dyn Media>,
                node: args
                    .node
                    .get(i)
                    .copied()
                    .or_else(|| pmfs::cli::sysfs_node(path))
                    .unwrap_or(NODE_UNKNOWN),
            })
            .collect();
        format_devices(&members, &opts)
            .map_err(|e| format!("{shown}: {e}"))?
            .0
    };
    progress.phase("writing back");
    for (dev, path) in devs.iter().zip(&args.device) {
        dev.sync_all().map_err(|e| device_error(path, &e))?;
    }
    progress.finish();
    Ok((summary, devs[0].persistence().to_string()))
}

/// Checks, creates (--size) and opens one device to format.
fn prepare(
    args: &Args,
    path: &Path,
    progress: &mut pmfs::cli::Progress,
) -> Result<pmfs::device::Device, String> {
    let shown = path.display();
    let min = "pmfs needs at least 16 MiB";
    let max = "pmfs handles at most 4 PiB";
    if let Some(size) = &args.size {
        if size.bytes < MIN_DEVICE_SIZE {
            return Err(format!("{}: too small: {min}", size.text));
        }
        if size.bytes > MAX_DEVICE_SIZE {
            return Err(format!("{}: too large: {max}", size.text));
        }
    }
    match std::fs::metadata(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            if args.size.is_none() {
                return Err(format!(
                    "{shown}: No such file or directory (use --size to create an image)"
                ));
            }
        }
        Err(e) => return Err(format!("{shown}: {e}")),
        Ok(md) if md.is_dir() => return Err(format!("{shown}: is a directory")),
        Ok(md) => {
            if let Some(size) = &args.size {
                if !md.is_file() {
                    return Err(format!(
                        "{shown}: --size applies only to image files, not to devices"
                    ));
                }
                if md.len() > size.bytes {
                    return Err(format!(
                        "{shown}: the image is already {} ({} bytes), larger than --size {}: \
                         omit --size to use it whole, or truncate it first",
                        human(md.len(), 2),
                        md.len(),
                        size.text
                    ));
                }
                // Check before growing the file, so a refusal leaves it untouched.
                if !args.force && md.len() > 0 {
                    let file = std::fs::File::open(path).map_err(|e| format!("{shown}: {e}"))?;
                    let mut read = |off: u64, buf: &mut [u8]| file.read_exact_at(buf, off).is_ok();
                    if let Some(what) = existing_signature(&mut read) {
                        return Err(refuse(path, &what));
                    }
                }
            }
        }
    }
    if let Some(size) = &args.size {
        if args.sparse {
            create_sparse_image(path, size.bytes).map_err(|e| device_error(path, &e))?;
        } else {
            progress.phase(&format!("allocating {}", human(size.bytes, 2)));
            create_image(path, size.bytes).map_err(|e| {
                let no_space = matches!(&e, DeviceError::Io { source, .. }
                    if source.kind() == std::io::ErrorKind::StorageFull);
                let msg = device_error(path, &e);
                if no_space {
                    format!("{msg} (--sparse creates it without allocating its space up front)")
                } else {
                    msg
                }
            })?;
        }
    }
    progress.phase("waiting for the device");
    // Right after `umount` the old daemon may still hold the device for a moment: wait for
    // it (bounded, and said on stderr if it takes long), unless the device is mounted.
    let dev = pmfs::cli::open_device(path, false, pmfs::cli::TOOL_WAIT, "mkfs.pmfs")
        .map_err(|e| device_error(path, &e))?;
    if dev.size() < MIN_DEVICE_SIZE {
        return Err(format!(
            "{shown}: too small ({}): {min}",
            human(dev.size(), 2)
        ));
    }
    if dev.size() > MAX_DEVICE_SIZE {
        return Err(format!(
            "{shown}: too large ({}): {max}",
            human(dev.size(), 2)
        ));
    }
    if !args.force {
        let mut read = |off: u64, buf: &mut [u8]| dev.read(off, buf).is_ok();
        if let Some(what) = existing_signature(&mut read) {
            return Err(refuse(path, &what));
        }
    }
    Ok(dev)
}

fn report(path: &Path, s: &MkfsSummary, persistence: &str) -> String {
    let label = if s.label.is_empty() {
        "(none)".to_string()
    } else {
        s.label.clone()
    };
    format!(
        "pmfs: formatted {}\n\
         \x20 size            {} ({} blocks of 4 KiB, {} huge chunks of 2 MiB)\n\
         \x20 inodes          {} now, up to {} (the table grows on demand)\n\
         \x20 metadata        {} ({})\n\
         \x20 uuid            {}\n\
         \x20 label           {}\n\
         \x20 root directory  owner {}:{}, mode {:04o}\n\
         \x20 1 GiB regions   {}\n\
         \x20 persistence     {}\n",
        path.display(),
        human(s.size_bytes, 2),
        s.block_count,
        s.chunk_count,
        s.initial_inodes,
        s.inode_capacity,
        human(s.metadata_bytes, 1),
        percent(s.metadata_percent),
        format_uuid(&s.uuid),
        label,
        s.root.uid,
        s.root.gid,
        s.root.mode,
        regions_line(s),
        persistence,
    )
}

/// The reservation line of the report.
fn regions_line(s: &MkfsSummary) -> String {
    match s.huge_regions {
        0 => "none reserved (--huge-regions)".to_string(),
        1 => "1 reserved for 1 GiB extents (the last GiB of the device)".to_string(),
        n => format!("{n} reserved for 1 GiB extents (the last {n} GiB of the device)"),
    }
}

/// What a failed write to stdout makes of the run: a closed pipe (`| head`) ends quietly
/// with the status a SIGPIPE death shows in the shell, as coreutils do; anything else (a
/// full disk, `> /dev/full`) is one line and a failure, since the output asked for is lost.
fn output_failed(e: &std::io::Error, what: &str) -> ExitCode {
    if e.kind() == std::io::ErrorKind::BrokenPipe {
        return ExitCode::from(128 + 13);
    }
    // "No space left on device", without Rust's " (os error 28)".
    let text = e.to_string();
    let reason = text.split(" (os error ").next().unwrap_or(&text);
    let _ = writeln!(std::io::stderr(), "mkfs.pmfs: {what}: {reason}");
    ExitCode::from(1)
}

fn main() -> ExitCode {
    let args = match Args::try_parse() {
        Ok(a) => a,
        Err(e) => {
            use clap::error::ErrorKind;
            if !matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion) {
                e.exit();
            }
            return match e.print().and_then(|()| std::io::stdout().flush()) {
                Ok(()) => ExitCode::SUCCESS,
                Err(err) => output_failed(&err, "write error on standard output"),
            };
        }
    };
    match run(&args) {
        Ok((summary, persistence)) => {
            if !args.quiet {
                let mut out = std::io::stdout().lock();
                let text = report(&args.device[0], &summary, &persistence);
                if let Err(e) = out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
                    let what = format!(
                        "{}: formatted, but writing the report to standard output failed",
                        args.device[0].display()
                    );
                    return output_failed(&e, &what);
                }
            }
            ExitCode::SUCCESS
        }
        Err(msg) => {
            let _ = writeln!(std::io::stderr(), "mkfs.pmfs: {msg}");
            ExitCode::from(1)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pmfs::device::RecordingDevice;
    use pmfs::format::Geometry;
    use pmfs::mkfs::summary_for;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("512M"), Ok(512 << 20));
        assert_eq!(parse_size("4G"), Ok(4 << 30));
        assert_eq!(parse_size("4g"), Ok(4 << 30));
        assert_eq!(parse_size("1T"), Ok(1 << 40));
        assert_eq!(parse_size("16MiB"), Ok(16 << 20));
        assert_eq!(parse_size("64K"), Ok(64 << 10));
        assert_eq!(parse_size("1.5G"), Ok(3 << 29));
        assert_eq!(parse_size("16777217"), Ok(16 << 20));
        assert_eq!(parse_size("1.3G"), Ok(1_395_863_552));
        assert_eq!(parse_size(".5M"), Ok(512 << 10));
        assert_eq!(parse_size("2P"), Ok(2 << 50));
        for bad in [
            "",
            "G",
            "4X",
            "4GB",
            "1.5",
            "1.2.3G",
            "-4G",
            "99999999999P",
            "4 G",
        ] {
            assert!(parse_size(bad).is_err(), "{bad:?} accepted");
        }
        assert_eq!(parse_size("16383P"), Ok(16383 << 50));
        assert!(parse_size("16384P").is_err());
    }

    #[test]
    fn uuids_and_labels() {
        let u = "0b7c2f6e-5d1a-4f3c-9e8b-2a4d6c8e0f12";
        assert_eq!(
            parse_uuid_arg(u).map(|b| format_uuid(&b)),
            Ok(u.to_string())
        );
        assert!(parse_uuid_arg("0b7c2f6e5d1a4f3c9e8b2a4d6c8e0f12----").is_err());
        assert!(parse_uuid_arg("0b7c2f6e-5d1a-4f3c-9e8b-2a4d6c8e0f1").is_err());
        assert!(parse_uuid_arg("zb7c2f6e-5d1a-4f3c-9e8b-2a4d6c8e0f12").is_err());
        assert!(parse_label(&"x".repeat(64)).is_ok());
        assert!(parse_label(&"x".repeat(65)).is_err());
    }

    #[test]
    fn root_owner_and_mode_arguments() {
        assert_eq!(parse_owner_arg("1000:100"), Ok((1000, 100)));
        assert_eq!(parse_owner_arg("0:0"), Ok((0, 0)));
        assert_eq!(parse_owner_arg("4294967294:7"), Ok((4_294_967_294, 7)));
        for bad in [
            "",
            "1000",
            "1000:",
            ":1000",
            "a:b",
            "-1:0",
            "1:2:3",
            "4294967295:0",
            "1 :2",
            "+1:2",
            "99999999999:0",
        ] {
            assert!(parse_owner_arg(bad).is_err(), "{bad:?} accepted");
        }
        assert_eq!(parse_mode_arg("755"), Ok(0o755));
        assert_eq!(parse_mode_arg("0700"), Ok(0o700));
        assert_eq!(parse_mode_arg("1777"), Ok(0o1777));
        assert_eq!(parse_mode_arg("07777"), Ok(0o7777));
        for bad in ["", "0o755", "8", "10000", "rwx", "-755", "0x1ff"] {
            assert!(parse_mode_arg(bad).is_err(), "{bad:?} accepted");
        }
        assert_eq!(parse_extended_arg("root_owner=5:6"), Ok((5, 6)));
        let me = RootDir::for_caller();
        assert_eq!(parse_extended_arg("root_owner"), Ok((me.uid, me.gid)));
        assert_eq!(
            parse_extended_arg("root_owner=5:6,root_owner=7:8"),
            Ok((7, 8))
        );
        assert!(parse_extended_arg("root_owner=x").is_err());
        assert_eq!(
            parse_extended_arg("lazy_itable_init=1").unwrap_err(),
            "unknown extended option 'lazy_itable_init=1' (there is only root_owner[=UID:GID])"
        );

        let parse = |argv: &[&str]| {
            Args::try_parse_from(std::iter::once("mkfs.pmfs").chain(argv.iter().copied()))
        };
        let a = parse(&["--root-owner", "1:2", "--root-mode", "0700", "x"]).unwrap();
        assert_eq!(
            root_dir(&a),
            RootDir {
                uid: 1,
                gid: 2,
                mode: 0o700
            }
        );
        let a = parse(&["-E", "root_owner=3:4", "x"]).unwrap();
        assert_eq!((root_dir(&a).uid, root_dir(&a).gid), (3, 4));
        assert_eq!(root_dir(&a).mode, 0o755);
        assert_eq!(root_dir(&parse(&["x"]).unwrap()), RootDir::for_caller());
        assert!(parse(&["-E", "root_owner=3:4", "--root-owner", "1:2", "x"]).is_err());
    }

    fn signature_of(image: &RecordingDevice) -> Option<String> {
        existing_signature(&mut |off, buf| image.read(off, buf).is_ok())
    }

    #[test]
    fn signatures() {
        let d = RecordingDevice::new(1 << 20);
        assert_eq!(signature_of(&d), None);
        d.write(1080, &0xEF53u16.to_le_bytes()).unwrap();
        assert_eq!(signature_of(&d).as_deref(), Some("an ext2 file system"));
        d.write(1024 + 92, &4u32.to_le_bytes()).unwrap();
        assert_eq!(signature_of(&d).as_deref(), Some("an ext3 file system"));
        d.write(1024 + 96, &0x40u32.to_le_bytes()).unwrap();
        assert_eq!(signature_of(&d).as_deref(), Some("an ext4 file system"));
        let d = RecordingDevice::new(1 << 20);
        d.write(0, b"XFSB").unwrap();
        assert_eq!(signature_of(&d).as_deref(), Some("an xfs file system"));
        let d = RecordingDevice::new(1 << 20);
        d.write(65600, b"_BHRfS_M").unwrap();
        assert_eq!(signature_of(&d).as_deref(), Some("a btrfs file system"));
        let d = RecordingDevice::new(1 << 20);
        d.write(4086, b"SWAPSPACE2").unwrap();
        assert_eq!(signature_of(&d).as_deref(), Some("a swap area"));
        // A device too short for some signatures is not an error.
        let d = RecordingDevice::new(2048);
        assert_eq!(signature_of(&d), None);
    }

    #[test]
    fn pmfs_signature_after_format() {
        let d = RecordingDevice::new(16 << 20);
        pmfs::mkfs::format(&d, &MkfsOptions::default()).unwrap();
        assert_eq!(signature_of(&d).as_deref(), Some("a pmfs file system"));
    }

    #[test]
    fn report_text() {
        let g = Geometry::for_device_size(1 << 30).unwrap();
        let s = summary_for(&g, [0x11; 16], "").unwrap();
        let text = report(Path::new("/dev/shm/t.img"), &s, "cpu-flush (clwb+sfence)");
        assert!(text.starts_with("pmfs: formatted /dev/shm/t.img\n"));
        assert!(text.contains("1.00 GiB (262144 blocks of 4 KiB, 512 huge chunks of 2 MiB)"));
        assert!(text.contains("8188 now, up to 4167692"));
        assert!(text.contains("6.1 MiB (0.59%)"), "{text}");
        assert!(text.contains("label           (none)"));
        assert!(
            text.contains("root directory  owner 0:0, mode 0755\n"),
            "{text}"
        );
        let g = Geometry::for_device_size(64 << 30).unwrap();
        let s = summary_for(&g, [0x11; 16], "big").unwrap();
        let text = report(Path::new("x"), &s, "msync");
        assert!(text.contains("8.0 MiB (0.012%)"), "{text}");
    }

    /// End to end on image files in /dev/shm (or the temp dir): the real device layer.
    mod images {
        use super::*;
        use pmfs::format::Superblock;

        fn dir() -> tempfile::TempDir {
            let shm = Path::new("/dev/shm");
            if shm.is_dir() {
                tempfile::tempdir_in(shm).unwrap()
            } else {
                tempfile::tempdir().unwrap()
            }
        }

        fn mkfs(argv: &[&str]) -> Result<(MkfsSummary, String), String> {
            let args =
                Args::try_parse_from(std::iter::once("mkfs.pmfs").chain(argv.iter().copied()))
                    .map_err(|e| e.to_string())?;
            run(&args)
        }

        fn superblock(path: &Path) -> Superblock {
            let bytes = std::fs::read(path).unwrap();
            Superblock::decode(&bytes[..256]).unwrap()
        }

        #[test]
        fn create_refuse_force() {
            let d = dir();
            let img = d.path().join("t.img");
            let p = img.to_str().unwrap();
            let (s, persistence) = mkfs(&["-s", "32M", "-L", "hello", p]).unwrap();
            assert_eq!(std::fs::metadata(&img).unwrap().len(), 32 << 20);
            assert_eq!(s.size_bytes, 32 << 20);
            assert!(!persistence.is_empty());
            let sb = superblock(&img);
            assert_eq!(sb.label_str(), "hello");
            assert_eq!(sb.uuid, s.uuid);

            let err = mkfs(&[p]).unwrap_err();
            assert_eq!(
                err,
                format!("{p}: already contains a pmfs file system (use -f to overwrite)")
            );
            let err = mkfs(&["--size", "32M", p]).unwrap_err();
            assert!(
                err.ends_with("already contains a pmfs file system (use -f to overwrite)"),
                "{err}"
            );

            let u = "0b7c2f6e-5d1a-4f3c-9e8b-2a4d6c8e0f12";
            mkfs(&["-f", "-U", u, p]).unwrap();
            assert_eq!(superblock(&img).uuid_string(), u);
            // Growing an image reformats it at the new size.
            let (s, _) = mkfs(&["-f", "-s", "48M", p]).unwrap();
            assert_eq!(s.size_bytes, 48 << 20);
            let err = mkfs(&["-f", "-s", "32M", p]).unwrap_err();
            assert!(err.contains("larger than --size 32M"), "{err}");
        }

        #[test]
        fn sparse_images_allocate_only_the_metadata() {
            use std::os::unix::fs::MetadataExt;
            let d = dir();
            let img = d.path().join("sparse.img");
            let p = img.to_str().unwrap();
            let (s, _) = mkfs(&["--sparse", "-s", "1G", p]).unwrap();
            assert_eq!(s.size_bytes, 1 << 30);
            let md = std::fs::metadata(&img).unwrap();
            assert_eq!(md.len(), 1 << 30);
            assert!(md.blocks() * 512 < 16 << 20, "{} blocks", md.blocks());
            // Growing keeps it sparse; --sparse means nothing without --size.
            mkfs(&["-f", "--sparse", "-s", "2G", p]).unwrap();
            let md = std::fs::metadata(&img).unwrap();
            assert_eq!(md.len(), 2 << 30);
            assert!(md.blocks() * 512 < 32 << 20, "{} blocks", md.blocks());
            let err = mkfs(&["-f", "--sparse", p]).unwrap_err();
            assert!(err.contains("--size"), "{err}");
        }

        /// A tmpfs of 32 MiB on a temporary directory, unmounted (lazily) on drop.
        struct SmallStore(tempfile::TempDir);

        impl Drop for SmallStore {
            fn drop(&mut self) {
                let _ = nix::mount::umount2(self.0.path(), nix::mount::MntFlags::MNT_DETACH);
            }
        }

        /// Issue 14 item 4: an image larger than the free space below is refused with a
        /// pointer to --sparse, and --sparse makes it.
        #[test]
        fn an_image_beyond_the_free_space_needs_sparse() {
            assert!(
                nix::unistd::geteuid().is_root(),
                "this test mounts a tmpfs: it needs root"
            );
            let store = SmallStore(tempfile::tempdir().unwrap());
            nix::mount::mount(
                Some("tmpfs"),
                store.0.path(),
                Some("tmpfs"),
                nix::mount::MsFlags::empty(),
                Some("size=32M"),
            )
            .unwrap();
            let img = store.0.path().join("big.img");
            let p = img.to_str().unwrap();
            let err = mkfs(&["-s", "1G", p]).unwrap_err();
            assert_eq!(
                err,
                format!(
                    "{p}: no space for an image of 1073741824 bytes (--sparse creates it \
                     without allocating its space up front)"
                )
            );
            assert!(!img.exists(), "a refused new image is removed");
            mkfs(&["--sparse", "-s", "1G", p]).unwrap();
            assert_eq!(std::fs::metadata(&img).unwrap().len(), 1 << 30);
        }

        #[test]
        fn missing_and_small() {
            let d = dir();
            let img = d.path().join("none.img");
            let p = img.to_str().unwrap();
            assert_eq!(
                mkfs(&[p]).unwrap_err(),
                format!("{p}: No such file or directory (use --size to create an image)")
            );
            assert_eq!(
                mkfs(&["-s", "8M", p]).unwrap_err(),
                "8M: too small: pmfs needs at least 16 MiB"
            );
            assert!(!img.exists());
            std::fs::write(&img, vec![0u8; 4 << 20]).unwrap();
            let err = mkfs(&[p]).unwrap_err();
            assert!(
                err.contains("too small (4.00 MiB): pmfs needs at least 16 MiB"),
                "{err}"
            );
        }

        #[test]
        fn foreign_signatures() {
            let d = dir();
            for (offset, bytes, what) in [
                (1080u64, &0xEF53u16.to_le_bytes()[..], "an ext2 file system"),
                (0, &b"XFSB"[..], "an xfs file system"),
                (65600, &b"_BHRfS_M"[..], "a btrfs file system"),
            ] {
                let img = d.path().join("foreign.img");
                let mut image = vec![0u8; 16 << 20];
                image[offset as usize..offset as usize + bytes.len()].copy_from_slice(bytes);
                std::fs::write(&img, &image).unwrap();
                let p = img.to_str().unwrap();
                let want = format!("{p}: already contains {what} (use -f to overwrite)");
                assert_eq!(mkfs(&[p]).unwrap_err(), want);
                // Refused before growing: the file is untouched.
                assert_eq!(mkfs(&["-s", "32M", p]).unwrap_err(), want);
                assert_eq!(std::fs::read(&img).unwrap(), image);
                mkfs(&["-f", p]).unwrap();
                superblock(&img);
            }
        }
    }
}
