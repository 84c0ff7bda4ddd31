//! Test-only failpoints (as in sled): named places in the core where a test pauses a thread
//! or makes its operation fail, to force the interleavings that concurrency bugs need.
//!
//! A hook is registered for one thread name, so tests running in parallel in one process
//! never see each other's hooks.

use crate::error::Result;
use parking_lot::Mutex;
use std::sync::Arc;

type Hook = Arc<dyn Fn() -> Result<()> + Send + Sync>;

static HOOKS: Mutex<Vec<(&'static str, String, Hook)>> = Mutex::new(Vec::new());

/// Runs `hook` whenever a thread named `thread` reaches failpoint `name`.
pub(crate) fn set(
    name: &'static str,
    thread: &str,
    hook: impl Fn() -> Result<()> + Send + Sync + 'static,
) {
    HOOKS.lock().push((name, thread.to_owned(), Arc::new(hook)));
}

/// Removes every hook of `thread`.
pub(crate) fn clear(thread: &str) {
    HOOKS.lock().retain(|(_, t, _)| t != thread);
}

/// A failpoint: runs the hooks registered for it and this thread (outside the registry's
/// lock); the first error is returned to the operation.
pub(crate) fn hit(name: &'static str) -> Result<()> {
    let current = std::thread::current();
    let Some(thread) = current.name() else {
        return Ok(());
    };
    let hooks: Vec<Hook> = HOOKS
        .lock()
        .iter()
        .filter(|(n, t, _)| *n == name && t == thread)
        .map(|(_, _, h)| Arc::clone(h))
        .collect();
    for h in hooks {
        h()?;
    }
    Ok(())
}
