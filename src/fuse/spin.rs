//! Adaptive polling of `/dev/fuse`: while requests keep coming and a CPU would otherwise sit
//! idle, the session threads poll for the next request instead of sleeping in `read`.
//!
//! A FUSE request costs two wake-ups: the kernel wakes a session thread sleeping in
//! `read(/dev/fuse)`, and the reply wakes the caller. On virtual machines an idle vCPU halts,
//! and waking it costs tens of microseconds, more than pmfs spends on most requests
//! (bench/RESULTS.md: 40% of the daemon's CPU in `finish_task_switch`). FUSE over io_uring
//! would remove the sleeping read, but fuser 0.18 does not speak it; libfuse's own authors
//! found that spinning before sleeping helps metadata throughput.
//!
//! fuser's session loop retries a read that fails with `EAGAIN` at once. So switching the
//! shared open file description of `/dev/fuse` to `O_NONBLOCK` turns every session thread into
//! a poller, and switching it back lets them sleep again, without touching fuser.
//!
//! [`Poller`] has three states:
//! - **sleeping**: blocking reads; the first request switches to polling;
//! - **polling**: non-blocking reads; a controller thread checks every `window`;
//! - **backed off**: blocking reads although requests flow, because the CPUs are wanted by
//!   others: polling threads would take CPU time from the callers they serve (measured: four
//!   writer threads on two CPUs lost a quarter of their throughput to polling).
//!
//! Every `window` the controller ends polling or backing off if no request came (so an idle
//! mount uses no CPU), and otherwise samples the number of runnable tasks (`/proc/loadavg`):
//! polling backs off when the tasks besides the session threads fill every CPU, and resumes
//! when some CPU is idle.
//!
//! Whether polling pays at all depends on the host, by a factor of 2-3 either way
//! (bench/RESULTS.md). Where waking an idle, halted vCPU is dear and the scheduler wakes
//! the session thread on another CPU, polling saves that wake-up. Where the scheduler runs
//! the woken session thread on the caller's own CPU (the caller is about to sleep), a
//! sleeping read costs two cheap context switches, and polling from another CPU only moves
//! the expensive wake-up to the reply, which must now wake the caller's halted CPU. Measured
//! with the real workloads, trying both modes while requests flow was too noisy to decide
//! (pairs of 3 ms arms differed by 2x either way), so without `spin=` the daemon measures
//! the host once at mount instead: [`Calibration`] times a pipe ping-pong, the same two
//! wake-ups a request makes, with the answering thread sleeping and then polling.

use nix::fcntl::{FcntlArg, OFlag, fcntl};
use parking_lot::{Condvar, Mutex, MutexGuard};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

/// Polling window when `spin=` is not given.
pub const DEFAULT_WINDOW: Duration = Duration::from_micros(1000);

const SLEEPING: u8 = 0;
const POLLING: u8 = 1;
const BACKED_OFF: u8 = 2;

/// How many tasks are runnable right now, system-wide (`None`: unknown, never back off).
pub type LoadProbe = Box<dyn Fn() -> Option<usize> + Send + Sync>;

/// Runnable tasks from the fourth field of `/proc/loadavg` (`running/total`).
fn proc_loadavg_probe() -> LoadProbe {
    let file = std::fs::File::open("/proc/loadavg").ok();
    Box::new(move || {
        let mut buf = [0u8; 128];
        let n = file.as_ref()?.read_at(&mut buf, 0).ok()?;
        let text = std::str::from_utf8(buf.get(..n)?).ok()?;
        text.split_whitespace()
            .nth(3)?
            .split('/')
            .next()?
            .parse()
            .ok()
    })
}

/// Switches `/dev/fuse` between polling and sleeping reads as requests come and go.
pub struct Poller {
    /// A duplicate of the session's descriptor: the same open file description, so its
    /// status flags are the session threads' flags.
    fd: OnceLock<OwnedFd>,
    window: Duration,
    /// Session threads: they count as runnable while they poll.
    threads: usize,
    cpus: usize,
    load: LoadProbe,
    state: AtomicU8,
    /// False while `spin=auto` has not decided yet, and for good if polling does not pay
    /// ([`Poller::poll_if_calibration_says_so`]): requests then leave the reads blocking.
    enabled: AtomicBool,
    /// Requests seen: the controller compares it across a window.
    requests: AtomicU64,
    /// The controller sleeps on this while the state is `SLEEPING`.
    wake: Condvar,
    parked: Mutex<()>,
}

impl std::fmt::Debug for Poller {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Poller")
            .field("window", &self.window)
            .field("threads", &self.threads)
            .field("cpus", &self.cpus)
            .field("state", &self.state)
            .finish_non_exhaustive()
    }
}

impl Poller {
    /// A poller for `threads` session threads that polls for `window` after each request;
    /// nothing happens until [`Poller::attach`].
    pub fn new(window: Duration, threads: usize) -> Arc<Self> {
        let cpus = std::thread::available_parallelism().map_or(1, usize::from);
        Self::with_probe(window, threads, cpus, proc_loadavg_probe())
    }

    /// As [`Poller::new`], with the CPU count and the load probe given (for tests).
    pub fn with_probe(window: Duration, threads: usize, cpus: usize, load: LoadProbe) -> Arc<Self> {
        Arc::new(Self {
            fd: OnceLock::new(),
            window,
            threads,
            cpus,
            load,
            state: AtomicU8::new(SLEEPING),
            enabled: AtomicBool::new(true),
            requests: AtomicU64::new(0),
            wake: Condvar::new(),
            parked: Mutex::new(()),
        })
    }

    /// Starts controlling the session's `/dev/fuse` descriptor.
    pub fn attach(self: &Arc<Self>, session_fd: BorrowedFd<'_>) -> std::io::Result<()> {
        let fd = session_fd.try_clone_to_owned()?;
        if self.fd.set(fd).is_err() {
            return Err(std::io::Error::other("poller attached twice"));
        }
        let me = Arc::clone(self);
        std::thread::Builder::new()
            .name("pmfs-poller".into())
            .spawn(move || me.control())?;
        Ok(())
    }

    /// Called at the start of every request: counts it and starts polling if the session
    /// threads were sleeping. Only this moves the state out of `SLEEPING`, and only the
    /// controller moves it anywhere else, so the two never undo each other.
    #[inline]
    pub fn request(&self) {
        if !self.enabled.load(Ordering::Relaxed) {
            return;
        }
        self.requests.fetch_add(1, Ordering::Relaxed);
        if self.state.load(Ordering::Relaxed) == SLEEPING
            && self
                .state
                .compare_exchange(SLEEPING, POLLING, Ordering::AcqRel, Ordering::Relaxed)
                .is_ok()
        {
            self.set_nonblocking(true);
            let _guard = self.parked.lock();
            self.wake.notify_one();
        }
    }

    /// `spin=auto`: no polling until a [`Calibration`], run on a thread of its own so that
    /// it adds nothing to the mount's time, finds that polling pays on this host.
    pub fn poll_if_calibration_says_so(self: &Arc<Self>) {
        self.enabled.store(false, Ordering::Relaxed);
        let me = Arc::clone(self);
        let spawned = std::thread::Builder::new()
            .name("pmfs-calibrate".into())
            .spawn(move || match Calibration::measure() {
                Some(c) => {
                    let pays = c.polling_pays();
                    log::info!(
                        "spin=auto: a round trip takes {:?} to a sleeping thread, {:?} to a \
                         polling one: {}",
                        c.sleeping,
                        c.polling,
                        if pays { "polling" } else { "not polling" }
                    );
                    me.enabled.store(pays, Ordering::Relaxed);
                }
                None => {
                    log::info!("spin=auto: the host is too busy to time a round trip: not polling")
                }
            });
        if let Err(e) = spawned {
            log::warn!("spin=auto: cannot start the calibration ({e}): not polling");
        }
    }

    fn set_nonblocking(&self, on: bool) {
        let Some(fd) = self.fd.get() else { return };
        if let Err(e) = set_nonblocking(fd.as_fd(), on) {
            log::debug!("setting O_NONBLOCK={on} on /dev/fuse: {e}");
        }
    }

    /// The controller: waits for polling to start, then every window ends it (no request),
    /// backs off (the CPUs are busy) or resumes (a CPU is idle). Runs until the process exits.
    fn control(&self) {
        let mut guard = self.parked.lock();
        loop {
            while self.state.load(Ordering::Acquire) == SLEEPING {
                self.wake.wait(&mut guard);
            }
            // Checking needs no lock: only requests leave `SLEEPING`, and they take the lock
            // only to wake this thread.
            MutexGuard::unlocked(&mut guard, || self.poll_until_quiet());
        }
    }

    /// While requests come: back off or resume every window; returns to sleeping reads after
    /// a window without one.
    fn poll_until_quiet(&self) {
        let mut seen = self.requests.load(Ordering::Relaxed);
        loop {
            std::thread::sleep(self.window);
            let now = self.requests.load(Ordering::Relaxed);
            if now == seen {
                break;
            }
            seen = now;
            let Some(running) = (self.load)() else {
                continue;
            };
            match self.state.load(Ordering::Acquire) {
                // The controller (running now) and the polling threads are runnable
                // themselves: count the others.
                POLLING if running.saturating_sub(self.threads + 1) >= self.cpus => {
                    self.set_nonblocking(false);
                    self.state.store(BACKED_OFF, Ordering::Release);
                }
                BACKED_OFF if running.saturating_sub(1) < self.cpus => {
                    self.set_nonblocking(true);
                    self.state.store(POLLING, Ordering::Release);
                }
                _ => {}
            }
        }
        // Quiet for a whole window: sleep in read again. A request racing with this sees the
        // state not yet `SLEEPING` and leaves it; the next one after the store starts polling
        // again, so at worst one request pays a wake-up.
        self.set_nonblocking(false);
        self.state.store(SLEEPING, Ordering::Release);
    }
}

/// Sets or clears `O_NONBLOCK` on `fd`'s open file description (shared by its duplicates).
fn set_nonblocking(fd: BorrowedFd<'_>, on: bool) -> nix::Result<()> {
    let mut flags = OFlag::from_bits_retain(fcntl(fd, FcntlArg::F_GETFL)?);
    flags.set(OFlag::O_NONBLOCK, on);
    fcntl(fd, FcntlArg::F_SETFL(flags)).map(drop)
}

/// Round trips of a ping-pong between two threads over pipes, with the answering thread
/// sleeping in `read` or polling non-blocking reads: a request's two wake-ups without FUSE.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Calibration {
    pub sleeping: Duration,
    pub polling: Duration,
}

/// Timed round trips in one measurement (after as many untimed ones), and measurements of
/// each mode, alternating; each mode keeps its fastest measurement.
const CALIBRATION_ROUNDS: u32 = 300;
const CALIBRATION_PASSES: usize = 3;
/// A calibration on a host so busy that one measurement takes longer decides nothing.
const CALIBRATION_LIMIT: Duration = Duration::from_millis(100);

impl Calibration {
    /// Measures both modes (tens of milliseconds on an idle host); `None` if the host is
    /// too busy to tell or a thread or pipe cannot be made.
    pub fn measure() -> Option<Self> {
        let mut best = [Duration::MAX; 2];
        for _ in 0..CALIBRATION_PASSES {
            for (mode, best) in best.iter_mut().enumerate() {
                let t = ping_pong(mode == 1, CALIBRATION_ROUNDS)?;
                *best = (*best).min(t);
            }
        }
        Some(Self {
            sleeping: best[0],
            polling: best[1],
        })
    }

    /// Polling pays if its round trip is at least 20% shorter: it keeps CPUs busy, which
    /// must buy something clear.
    pub fn polling_pays(&self) -> bool {
        self.polling.saturating_mul(5) < self.sleeping.saturating_mul(4)
    }
}

/// The mean round trip of `rounds` pings (after as many untimed ones), the answering thread
/// polling or sleeping; `None` past [`CALIBRATION_LIMIT`] or on an error.
///
/// A polling session thread keeps its CPU, so the caller runs on another one: the polling
/// run pins the two threads to two different CPUs, and its reply must wake the caller's CPU.
/// The sleeping run leaves placement to the scheduler, as it is for session threads.
fn ping_pong(polling: bool, rounds: u32) -> Option<Duration> {
    let cpus = if polling {
        let allowed = nix::sched::sched_getaffinity(nix::unistd::Pid::from_raw(0)).ok()?;
        let mut set =
            (0..nix::sched::CpuSet::count()).filter(|&c| allowed.is_set(c).unwrap_or(false));
        // One CPU: a poller would take it from the caller; polling cannot pay.
        Some((set.next()?, set.next()?))
    } else {
        None
    };
    let pin = |cpu: Option<usize>| {
        if let Some(cpu) = cpu {
            let mut one = nix::sched::CpuSet::new();
            if one.set(cpu).is_ok() {
                let _ = nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &one);
            }
        }
    };
    // The caller in a thread of its own too, so that pinning it leaves the daemon's alone.
    std::thread::scope(|scope| {
        std::thread::Builder::new()
            .name("pmfs-calibrate".into())
            .spawn_scoped(scope, || {
                pin(cpus.map(|c| c.0));
                ping_pong_from_here(polling, rounds, move || pin(cpus.map(|c| c.1)))
            })
            .ok()?
            .join()
            .ok()?
    })
}

/// [`ping_pong`] with the calling thread as the caller; `on_answerer` runs first in the
/// answering thread.
fn ping_pong_from_here(
    polling: bool,
    rounds: u32,
    on_answerer: impl FnOnce() + Send + 'static,
) -> Option<Duration> {
    use std::io::{ErrorKind, Read, Write};
    let pipe = || {
        nix::unistd::pipe()
            .ok()
            .map(|(rx, tx)| (std::fs::File::from(rx), std::fs::File::from(tx)))
    };
    let (mut ping_rx, mut ping_tx) = pipe()?;
    let (mut pong_rx, mut pong_tx) = pipe()?;
    if polling {
        set_nonblocking(ping_rx.as_fd(), true).ok()?;
    }
    let deadline = Instant::now() + CALIBRATION_LIMIT;
    // The answering thread: echoes each byte until a 0 (or the deadline, or an error).
    let answerer = std::thread::Builder::new()
        .name("pmfs-calibrate".into())
        .spawn(move || {
            on_answerer();
            let mut byte = [0u8; 1];
            loop {
                match ping_rx.read(&mut byte) {
                    Ok(1) if byte[0] != 0 => {
                        if pong_tx.write_all(&byte).is_err() {
                            return;
                        }
                    }
                    Err(e) if e.kind() == ErrorKind::WouldBlock && Instant::now() < deadline => {
                        std::hint::spin_loop();
                    }
                    Err(e) if e.kind() == ErrorKind::Interrupted => {}
                    _ => return,
                }
            }
        })
        .ok()?;
    let mut round = |byte: u8| -> Option<()> {
        ping_tx.write_all(&[byte]).ok()?;
        let mut back = [0u8; 1];
        pong_rx.read_exact(&mut back).ok()?;
        (back[0] == byte && Instant::now() < deadline).then_some(())
    };
    let timed = (|| {
        for _ in 0..rounds {
            round(1)?;
        }
        let start = Instant::now();
        for _ in 0..rounds {
            round(2)?;
        }
        Some(start.elapsed() / rounds)
    })();
    // A 0 ends the answerer; so does the pipe closing if the write fails.
    let _ = ping_tx.write_all(&[0]);
    drop(ping_tx);
    let _ = answerer.join();
    timed
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nonblocking(fd: BorrowedFd<'_>) -> bool {
        let flags = fcntl(fd, FcntlArg::F_GETFL).expect("F_GETFL");
        OFlag::from_bits_retain(flags).contains(OFlag::O_NONBLOCK)
    }

    /// Waits up to two seconds for `cond`.
    fn eventually(cond: impl Fn() -> bool) -> bool {
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(2) {
            if cond() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        false
    }

    #[test]
    fn polls_while_requests_come_and_sleeps_after_a_quiet_window() {
        // A pipe stands in for /dev/fuse: status flags live in the open file description,
        // so the original descriptor shows what the poller set on its duplicate.
        let (read_end, _write_end) = nix::unistd::pipe().expect("pipe");
        // A long window, so a loaded machine cannot make 5 ms sleeps look quiet.
        let poller = Poller::with_probe(Duration::from_millis(200), 2, 2, Box::new(|| Some(0)));
        poller.attach(read_end.as_fd()).expect("attach");
        assert!(!nonblocking(read_end.as_fd()), "idle: blocking reads");

        poller.request();
        assert!(
            nonblocking(read_end.as_fd()),
            "a request starts polling at once"
        );
        // Requests more often than the window keep it polling.
        for _ in 0..10 {
            std::thread::sleep(Duration::from_millis(5));
            poller.request();
            assert!(nonblocking(read_end.as_fd()), "busy: still polling");
        }
        assert!(
            eventually(|| !nonblocking(read_end.as_fd())),
            "a quiet window ends polling"
        );
        // And the next request starts it again.
        poller.request();
        assert!(nonblocking(read_end.as_fd()));
        assert!(eventually(|| !nonblocking(read_end.as_fd())));
    }

    #[test]
    fn calibration_times_both_modes_within_its_limit() {
        let start = Instant::now();
        let c = Calibration::measure().expect("an idle test host can be calibrated");
        assert!(start.elapsed() < CALIBRATION_LIMIT * 2 * CALIBRATION_PASSES as u32);
        for t in [c.sleeping, c.polling] {
            assert!(t > Duration::ZERO && t < CALIBRATION_LIMIT, "{c:?}");
        }
    }

    #[test]
    fn polling_must_be_a_fifth_faster_to_pay() {
        let us = Duration::from_micros;
        let pays = |sleeping, polling| {
            Calibration {
                sleeping: us(sleeping),
                polling: us(polling),
            }
            .polling_pays()
        };
        assert!(pays(10, 7));
        assert!(!pays(10, 8), "20% faster is not enough");
        assert!(!pays(5, 10));
        assert!(!pays(0, 0));
    }

    #[test]
    fn a_poller_that_calibration_has_not_enabled_never_polls() {
        // spin=auto until the calibration says polling pays: requests leave reads blocking
        // (and are not even counted, so the controller never starts).
        let (read_end, _write_end) = nix::unistd::pipe().expect("pipe");
        let poller = Poller::with_probe(Duration::from_millis(200), 2, 2, Box::new(|| Some(0)));
        poller.attach(read_end.as_fd()).expect("attach");
        poller.enabled.store(false, Ordering::Relaxed);
        for _ in 0..10 {
            poller.request();
        }
        assert!(!nonblocking(read_end.as_fd()), "disabled: blocking reads");
        assert_eq!(poller.requests.load(Ordering::Relaxed), 0);
        // Once enabled (what a calibration finding polling pays does), requests poll.
        poller.enabled.store(true, Ordering::Relaxed);
        poller.request();
        assert!(nonblocking(read_end.as_fd()), "enabled: polling");
    }

    #[test]
    fn attaching_twice_is_refused() {
        let (read_end, _write_end) = nix::unistd::pipe().expect("pipe");
        let poller = Poller::new(Duration::from_millis(1), 1);
        poller.attach(read_end.as_fd()).expect("attach");
        assert!(poller.attach(read_end.as_fd()).is_err());
    }

    #[test]
    fn backs_off_while_the_cpus_are_busy_and_resumes_when_one_is_idle() {
        let (read_end, _write_end) = nix::unistd::pipe().expect("pipe");
        let running = Arc::new(AtomicU64::new(0));
        let probe = {
            let running = Arc::clone(&running);
            Box::new(move || usize::try_from(running.load(Ordering::Relaxed)).ok())
        };
        // Two session threads on two CPUs.
        let poller = Poller::with_probe(Duration::from_millis(20), 2, 2, probe);
        poller.attach(read_end.as_fd()).expect("attach");
        // Keep requests flowing from another thread until told to stop.
        let stop = Arc::new(AtomicU64::new(0));
        let feeder = {
            let (poller, stop) = (Arc::clone(&poller), Arc::clone(&stop));
            std::thread::spawn(move || {
                while stop.load(Ordering::Relaxed) == 0 {
                    poller.request();
                    std::thread::sleep(Duration::from_millis(2));
                }
            })
        };
        assert!(
            eventually(|| nonblocking(read_end.as_fd())),
            "requests: polling"
        );
        // The controller, the two pollers and two other runnable tasks: the CPUs are full.
        running.store(5, Ordering::Relaxed);
        assert!(
            eventually(|| !nonblocking(read_end.as_fd())),
            "busy CPUs: backed off although requests flow"
        );
        // The controller and one other runnable task on two CPUs: a CPU is idle, poll again.
        running.store(2, Ordering::Relaxed);
        assert!(
            eventually(|| nonblocking(read_end.as_fd())),
            "idle CPU: polling"
        );
        stop.store(1, Ordering::Relaxed);
        feeder.join().expect("feeder");
        assert!(
            eventually(|| !nonblocking(read_end.as_fd())),
            "no requests: sleeping"
        );
    }
}
