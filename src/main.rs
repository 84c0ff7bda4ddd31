//! `pmfs DEVICE MOUNTPOINT`: the mount daemon (arrives with the file-system issue).

fn main() {
    eprintln!("pmfs: the mount daemon is not built yet");
    std::process::exit(1);
}
