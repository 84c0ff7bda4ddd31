//! Adaptive polling of `/dev/fuse`: while requests keep coming, the session threads poll for
//! the next one instead of sleeping in `read`.
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
//! a poller, and switching it back lets them sleep again, without touching fuser. [`Poller`]
//! switches it on at the first request after a quiet spell and a controller thread switches it
//! off once a whole `window` passed without a request, so an idle mount costs no CPU and a
//! busy one polls at most one window past its last request.
//!
//! The cost: while requests flow, every session thread keeps a CPU busy. `-o spin=0` turns the
//! poller off.

use nix::fcntl::{FcntlArg, OFlag, fcntl};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::Duration;

/// Polling window when `spin=` is not given.
pub const DEFAULT_WINDOW: Duration = Duration::from_micros(1000);

/// Switches `/dev/fuse` between polling and sleeping reads as requests come and go.
#[derive(Debug)]
pub struct Poller {
    /// A duplicate of the session's descriptor: the same open file description, so its
    /// status flags are the session threads' flags.
    fd: OnceLock<OwnedFd>,
    window: Duration,
    /// True while the descriptor is non-blocking (or about to be).
    polling: AtomicBool,
    /// Requests seen: the controller compares it across a window.
    requests: AtomicU64,
    /// The controller sleeps on this while nobody polls.
    wake: Condvar,
    parked: Mutex<()>,
}

impl Poller {
    /// A poller that polls for `window` after each request; nothing happens until
    /// [`Poller::attach`].
    pub fn new(window: Duration) -> Arc<Self> {
        Arc::new(Self {
            fd: OnceLock::new(),
            window,
            polling: AtomicBool::new(false),
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
    /// threads were sleeping.
    #[inline]
    pub fn request(&self) {
        self.requests.fetch_add(1, Ordering::Relaxed);
        if !self.polling.load(Ordering::Relaxed) && !self.polling.swap(true, Ordering::AcqRel) {
            self.set_nonblocking(true);
            let _guard = self.parked.lock();
            self.wake.notify_one();
        }
    }

    fn set_nonblocking(&self, on: bool) {
        let Some(fd) = self.fd.get() else { return };
        let result = fcntl(fd.as_fd(), FcntlArg::F_GETFL).and_then(|flags| {
            let mut flags = OFlag::from_bits_retain(flags);
            flags.set(OFlag::O_NONBLOCK, on);
            fcntl(fd.as_fd(), FcntlArg::F_SETFL(flags))
        });
        if let Err(e) = result {
            log::debug!("setting O_NONBLOCK={on} on /dev/fuse: {e}");
        }
    }

    /// The controller: waits for polling to start, then ends it after a window with no
    /// request. Runs until the process exits (it holds no resource worth releasing).
    fn control(&self) {
        let mut guard = match self.parked.lock() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        };
        loop {
            while !self.polling.load(Ordering::Acquire) {
                guard = match self.wake.wait(guard) {
                    Ok(g) => g,
                    Err(poisoned) => poisoned.into_inner(),
                };
            }
            drop(guard);
            let mut seen = self.requests.load(Ordering::Relaxed);
            loop {
                std::thread::sleep(self.window);
                let now = self.requests.load(Ordering::Relaxed);
                if now == seen {
                    break;
                }
                seen = now;
            }
            // Quiet for a whole window: sleep in read again. A request racing with this sees
            // `polling` still true and does not switch back; the next one after the store
            // does, so at worst one request pays a wake-up.
            self.set_nonblocking(false);
            self.polling.store(false, Ordering::Release);
            guard = match self.parked.lock() {
                Ok(g) => g,
                Err(poisoned) => poisoned.into_inner(),
            };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

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
        let poller = Poller::new(Duration::from_millis(200));
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
    fn attaching_twice_is_refused() {
        let (read_end, _write_end) = nix::unistd::pipe().expect("pipe");
        let poller = Poller::new(Duration::from_millis(1));
        poller.attach(read_end.as_fd()).expect("attach");
        assert!(poller.attach(read_end.as_fd()).is_err());
    }
}
