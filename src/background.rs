//! How the crate's background threads (the file watcher, the reaper) share the
//! processor with the threads serving requests.
//!
//! A large reload is seconds of work. On a machine with as many busy request threads
//! as cores, a reload thread that simply runs takes a core away for a scheduler slice
//! at a time (4 ms on a 250 Hz kernel), and every request queued on that core waits
//! that long. So a background thread runs at a lower priority, and its long loops
//! call [`Pacer::step`], which gives the processor away every
//! [`SLICE`](Pacer::SLICE) of work: a waiting request thread gets it back within
//! that, and when nothing is waiting the yield returns at once.

use std::{cell::Cell, thread, time::Instant};

/// How much lower than its spawner's priority a background thread runs (a `nice`
/// increment): it gets about a tenth of a contended core, and all of an idle one.
#[cfg(any(target_os = "linux", target_os = "android"))]
const NICENESS: i32 = 10;

thread_local! {
    static BACKGROUND: Cell<bool> = const { Cell::new(false) };
}

/// Marks the calling thread as a background thread: lowers its scheduling priority
/// (best effort, where the platform has per-thread priorities) and turns on its
/// [`Pacer`]s.
pub(crate) fn enter() {
    BACKGROUND.set(true);
    #[cfg(any(target_os = "linux", target_os = "android"))]
    {
        // On Linux a nice value belongs to a thread, and `None` (0) names the calling
        // one, so this leaves the rest of the process alone.
        if let Ok(current) = rustix::process::getpriority_process(None) {
            let _ = rustix::process::setpriority_process(None, (current + NICENESS).min(19));
        }
    }
}

/// Whether the calling thread is one of the crate's background threads.
#[cfg(feature = "file")]
pub(crate) fn is_background() -> bool {
    BACKGROUND.get()
}

/// Paces a long loop on a background thread; does nothing on any other thread (a
/// caller loading keys at start-up, or publishing them itself, is not slowed).
pub(crate) struct Pacer {
    on: bool,
    steps: u32,
    since: Instant,
}

impl Pacer {
    /// The most work done between two yields.
    pub(crate) const SLICE: std::time::Duration = std::time::Duration::from_micros(200);
    /// Steps between two looks at the clock.
    const CHECK: u32 = 64;

    pub(crate) fn new() -> Self {
        Self {
            on: BACKGROUND.get(),
            steps: 0,
            since: Instant::now(),
        }
    }

    /// One step of work done; yields if this thread has worked a slice since it last
    /// did.
    #[inline]
    pub(crate) fn step(&mut self) {
        if self.on {
            self.steps += 1;
            if self.steps >= Self::CHECK {
                self.steps = 0;
                self.pause();
            }
        }
    }

    /// Yields now if a slice has gone by.
    pub(crate) fn pause(&mut self) {
        if self.on && self.since.elapsed() >= Self::SLICE {
            thread::yield_now();
            self.since = Instant::now();
        }
    }
}

/// Frees a large list a slice at a time, pausing in between (on a background
/// thread), so that on a small machine the freeing does not hold a core for long.
pub(crate) fn drop_paced<T>(mut items: Vec<T>, pacer: &mut Pacer) {
    while !items.is_empty() {
        items.truncate(items.len().saturating_sub(256));
        pacer.pause();
    }
}
