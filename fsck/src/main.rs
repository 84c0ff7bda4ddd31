//! fsck.pmfs: check and repair a pmfs file system, with e2fsck's options and fsck(8)'s exit
//! codes. The checking and repairing live in the library (`pmfs::check`, `pmfs::repair`);
//! this is the command line around them.

use clap::Parser;
use pmfs::check::Report;
use pmfs::cli::Progress;
use pmfs::device::{DeviceError, Media};
use pmfs::repair::{self, Class, RepairMode};
use std::io::{BufRead, IsTerminal, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Instant;

/// fsck(8) exit codes (they add up: 5 = some errors corrected, some left).
const EXIT_CLEAN: u8 = 0;
const EXIT_CORRECTED: u8 = 1;
const EXIT_UNCORRECTED: u8 = 4;
const EXIT_OPERATIONAL: u8 = 8;
const EXIT_USAGE: u8 = 16;

const AFTER_HELP: &str = "\
Modes (as e2fsck):
  -n   check only: the device is opened read-only and nothing is changed
  -y   repair everything that can be repaired, without asking
  -p   preen (-a is the same): repair without asking what loses nothing a user could still
       reach: superblock from its backup, journal rollback, inode checksums, link counts,
       sizes, block counts, '..' pointers, the block bitmap, orphaned inodes. Anything that
       drops data (clearing a damaged inode, rebuilding a damaged tree, removing directory
       entries, moving files to /lost+found) is left for a run with -y or without options,
       and fsck exits with 4 and asks for a manual run.
  none on a terminal: ask about each class of problem found (y/n);
  none, not on a terminal: check only, as with -n.

Without -f, a file system that was unmounted cleanly (and has no interrupted transaction)
is reported clean at once. After a repair, fsck checks again and reports what is left.
The device must not be in use: a mounted device is refused (exit 8).

Exit codes (fsck(8); they add up):
  0   no errors
  1   errors were corrected
  4   errors were left uncorrected
  8   operational error (cannot open the device, not a pmfs file system, I/O error)
  16  usage error

Examples:
  fsck.pmfs -n /dev/dax0.0        check, change nothing
  fsck.pmfs -fy disk.img          full check, repair everything";

/// Check and repair a pmfs file system.
#[derive(Debug, Parser)]
#[command(
    name = "fsck.pmfs",
    bin_name = "fsck.pmfs",
    version,
    about = "Check and repair a pmfs file system",
    after_help = AFTER_HELP
)]
struct Args {
    /// Check only: open the device read-only and change nothing
    #[arg(short = 'n', conflicts_with_all = ["yes", "preen"])]
    no: bool,
    /// Repair everything that can be repaired, without asking
    #[arg(short = 'y', conflicts_with = "preen")]
    yes: bool,
    /// Preen: repair without asking only what loses no data (see below)
    #[arg(short = 'p', short_alias = 'a')]
    preen: bool,
    /// Force a full check even if the file system is marked clean
    #[arg(short = 'f')]
    force: bool,
    /// Verbose: geometry, timings, and each repair as it is listed
    #[arg(short = 'v')]
    verbose: bool,
    /// The device or image file holding the file system
    device: PathBuf,
    /// The other devices of a file system over several devices, in any order
    #[arg(value_name = "DEVICE")]
    others: Vec<PathBuf>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    Check,
    Yes,
    Preen,
    Ask,
}

fn device_error(e: &DeviceError) -> String {
    match e {
        DeviceError::Busy(p) => format!(
            "{}: device is busy: mounted or in use by another program; refusing to check it",
            p.display()
        ),
        e => e.to_string(),
    }
}

/// Asks one yes/no question on the terminal; end of input is "no".
fn ask(question: &str) -> bool {
    let stdin = std::io::stdin();
    loop {
        print!("{question} [y/n] ");
        let _ = std::io::stdout().flush();
        let mut line = String::new();
        match stdin.lock().read_line(&mut line) {
            Ok(0) | Err(_) => {
                println!();
                return false;
            }
            Ok(_) => match line.trim().to_ascii_lowercase().as_str() {
                "y" | "yes" => return true,
                "n" | "no" => return false,
                _ => continue,
            },
        }
    }
}

/// The repairs to make for `report` in `mode`.
fn choose(mode: Mode, report: &Report, shown: &str) -> RepairMode {
    match mode {
        Mode::Check => RepairMode::none(),
        Mode::Yes => RepairMode::all(),
        Mode::Preen => RepairMode::preen(),
        Mode::Ask => {
            let mut counts: Vec<(Class, usize)> = Vec::new();
            for p in &report.problems {
                let c = repair::class_of(&p.kind);
                match counts.iter_mut().find(|(k, _)| *k == c) {
                    Some((_, n)) => *n += 1,
                    None => counts.push((c, 1)),
                }
            }
            counts.sort();
            let mut m = RepairMode::none();
            for (c, n) in counts {
                let s = if n == 1 { "" } else { "s" };
                if ask(&format!("{shown}: {n} problem{s}: {}?", c.describe())) {
                    m = m.with(c);
                    // Inode checksums are part of inode repairs; the bitmap must follow any
                    // repair that frees or claims blocks.
                    if c == Class::Inodes {
                        m = m.with(Class::Checksums);
                    }
                }
            }
            m
        }
    }
}

/// A problem's line, with the path of the inode it names when the check knows it and the
/// message does not say it already.
fn with_path(p: &pmfs::check::Problem, report: &Report) -> String {
    use pmfs::check::ProblemKind as K;
    let ino = match &p.kind {
        K::BadInode(i) | K::BadTree(i) | K::Orphan(i) => *i,
        K::BlockCount { ino, .. } | K::LinkCount { ino, .. } | K::DirSize { ino, .. } => *ino,
        _ => return p.message.clone(),
    };
    match report.path(ino) {
        Some(path) if !p.message.contains(path.as_str()) => format!("{} ({path})", p.message),
        _ => p.message.clone(),
    }
}

fn plural(n: usize, what: &str) -> String {
    if n == 1 {
        format!("1 {what}")
    } else {
        format!("{n} {what}s")
    }
}

fn summary_line(media: &Arc<dyn Media>) -> Option<String> {
    let s = repair::summary(media).ok()?;
    Some(format!(
        "{}/{} inodes, {}/{} blocks",
        s.inodes_used, s.inodes_total, s.blocks_used, s.blocks_total
    ))
}

/// Why the device cannot be checked, as one line. A device shorter than the file system its
/// superblock describes (a truncated image) fails deep in the check with an access past its
/// end; say what the mount says instead.
fn check_error(media: &dyn Media, e: &pmfs::error::Error) -> String {
    use pmfs::error::Error;
    let past_end = |e: &Error| matches!(e, Error::Device(DeviceError::OutOfBounds { .. }));
    if !past_end(e) {
        return e.to_string();
    }
    match pmfs::fs::read_superblock(media) {
        Err(sb) if !past_end(&sb) => sb.to_string(),
        _ => format!(
            "the device ends after {} bytes, too short for a pmfs file system (truncated image?)",
            media.size()
        ),
    }
}

fn run(args: &Args) -> u8 {
    let shown = args.device.display().to_string();
    let mode = if args.no {
        Mode::Check
    } else if args.yes {
        Mode::Yes
    } else if args.preen {
        Mode::Preen
    } else if std::io::stdin().is_terminal() && std::io::stdout().is_terminal() {
        Mode::Ask
    } else {
        if args.verbose {
            eprintln!("{shown}: not a terminal and no -n/-y/-p: checking only, as with -n");
        }
        Mode::Check
    };
    let read_only = mode == Mode::Check;
    // Right after `umount` the old daemon may still hold the device for a moment: wait
    // for it (bounded, and said on stderr if it takes long), unless the device is mounted.
    let dev =
        match pmfs::cli::open_device(&args.device, read_only, pmfs::cli::TOOL_WAIT, "fsck.pmfs") {
            Ok(d) => d,
            Err(e) => {
                eprintln!("fsck.pmfs: {}", device_error(&e));
                return EXIT_OPERATIONAL;
            }
        };
    let media = match pmfs::cli::open_members(
        Arc::new(dev),
        &args.device,
        &args.others,
        read_only,
        pmfs::cli::TOOL_WAIT,
        "fsck.pmfs",
    ) {
        Ok(a) => a.media,
        Err(e) => {
            eprintln!("fsck.pmfs: {e}");
            return EXIT_OPERATIONAL;
        }
    };
    if args.verbose
        && let Ok((sb, g)) = pmfs::meta::read_superblock(media.as_ref())
    {
        println!(
            "{shown}: pmfs version {}, UUID {}, label '{}', {} blocks of 4 KiB, {} journal slots, {} persistence",
            sb.version,
            sb.uuid_string(),
            sb.label_str(),
            g.block_count,
            g.journal_slots,
            media.persistence()
        );
    }
    if !args.force
        && let Ok(Some(s)) = repair::quick_check(&media)
    {
        println!(
            "{shown}: clean, {}/{} inodes, {}/{} blocks",
            s.inodes_used, s.inodes_total, s.blocks_used, s.blocks_total
        );
        return EXIT_CLEAN;
    }
    let mut progress = Progress::start(format!("fsck.pmfs: {shown}"));
    progress.phase("checking");
    let t0 = Instant::now();
    // On a terminal: the phase and how far it is ("inodes 1200000/10000000").
    let report = match repair::diagnose_with_progress(&media, &mut |phase, done, total| {
        progress.phase(&format!("checking {phase} {done}/{total}"));
    }) {
        Ok(r) => r,
        Err(e) => {
            progress.finish();
            eprintln!("fsck.pmfs: {shown}: {}", check_error(media.as_ref(), &e));
            return EXIT_OPERATIONAL;
        }
    };
    progress.finish();
    if args.verbose {
        println!(
            "{shown}: checked {} inodes ({} directories) and {} blocks in use in {:.2?}",
            report.inodes,
            report.directories,
            report.used_blocks,
            t0.elapsed()
        );
    }
    for p in &report.problems {
        println!("{shown}: {}", with_path(p, &report));
    }
    if report.problems.is_empty() {
        if !read_only && let Err(e) = repair::mark_clean(&media) {
            eprintln!("fsck.pmfs: {shown}: cannot mark the file system clean: {e}");
            return EXIT_OPERATIONAL;
        }
        println!(
            "{shown}: no problems found{}",
            summary_line(&media).map_or_else(String::new, |s| format!(", {s}"))
        );
        return EXIT_CLEAN;
    }
    let n = report.problems.len();
    if read_only {
        println!(
            "{shown}: {} found; nothing changed (checked read-only)",
            plural(n, "problem")
        );
        return EXIT_UNCORRECTED;
    }
    let allowed = choose(mode, &report, &shown);
    if allowed == RepairMode::none() {
        println!("{shown}: {} left unrepaired", plural(n, "problem"));
        return EXIT_UNCORRECTED;
    }
    let mut progress = Progress::start(format!("fsck.pmfs: {shown}"));
    progress.phase("repairing");
    let t1 = Instant::now();
    let result = repair::repair(&media, &report, allowed);
    progress.finish();
    let out = match result {
        Ok(o) => o,
        Err(e) => {
            eprintln!("fsck.pmfs: {shown}: repair stopped: {e}");
            return EXIT_OPERATIONAL | EXIT_UNCORRECTED;
        }
    };
    for a in &out.actions {
        println!("{shown}: fixed: {}", a.message);
    }
    if let Err(e) = media.sync_all() {
        eprintln!("fsck.pmfs: {shown}: {e}");
        return EXIT_OPERATIONAL;
    }
    if args.verbose {
        println!(
            "{shown}: {} in {:.2?}",
            plural(out.actions.len(), "repair"),
            t1.elapsed()
        );
    }
    let changed = if out.changed() { EXIT_CORRECTED } else { 0 };
    if out.changed() {
        println!("\n{shown}: ***** FILE SYSTEM WAS MODIFIED *****");
    }
    if out.report.problems.is_empty() {
        if let Err(e) = repair::mark_clean(&media) {
            eprintln!("fsck.pmfs: {shown}: cannot mark the file system clean: {e}");
            return EXIT_OPERATIONAL;
        }
        println!(
            "{shown}: {}{}",
            if changed != 0 {
                "all problems repaired"
            } else {
                "no problems left"
            },
            summary_line(&media).map_or_else(String::new, |s| format!(", {s}"))
        );
        return changed;
    }
    for p in &out.report.problems {
        println!("{shown}: UNFIXED: {}", p.message);
    }
    println!(
        "{shown}: {} left uncorrected",
        plural(out.report.problems.len(), "problem")
    );
    if mode == Mode::Preen {
        println!("{shown}: UNEXPECTED INCONSISTENCY; RUN fsck.pmfs MANUALLY (without -p or -a).");
    }
    changed | EXIT_UNCORRECTED
}

fn main() -> ExitCode {
    // Never a panic trace: one line and the operational-error code.
    std::panic::set_hook(Box::new(|info| {
        let msg = info
            .payload()
            .downcast_ref::<&str>()
            .map(|s| (*s).to_string())
            .or_else(|| info.payload().downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "unknown".into());
        // println! on a stdout that cannot take it (`> /dev/full`, a closed pipe): the
        // user's problem, not ours; the run stops here, as the exit code says.
        if let Some(why) = msg.strip_prefix("failed printing to stdout: ") {
            let why = why.split(" (os error ").next().unwrap_or(why);
            eprintln!("fsck.pmfs: write error on standard output: {why}");
            std::process::exit(i32::from(EXIT_OPERATIONAL));
        }
        let at = info
            .location()
            .map(|l| format!(" at {}:{}", l.file(), l.line()))
            .unwrap_or_default();
        eprintln!(
            "fsck.pmfs: internal error{at}: {}",
            msg.lines().next().unwrap_or("")
        );
        std::process::exit(i32::from(EXIT_OPERATIONAL));
    }));
    let args = match Args::try_parse() {
        Ok(a) => a,
        Err(e) => {
            use clap::error::ErrorKind;
            return match e.kind() {
                ErrorKind::DisplayHelp | ErrorKind::DisplayVersion => {
                    let _ = e.print();
                    ExitCode::SUCCESS
                }
                _ => {
                    let text = e.to_string();
                    let head = text.split("\n\n").next().unwrap_or("usage error");
                    let line = head
                        .trim_start_matches("error: ")
                        .split_whitespace()
                        .collect::<Vec<_>>()
                        .join(" ");
                    eprintln!("fsck.pmfs: {line} (try 'fsck.pmfs --help')");
                    ExitCode::from(EXIT_USAGE)
                }
            };
        }
    };
    ExitCode::from(run(&args))
}
