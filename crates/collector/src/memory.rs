//! Giving memory back to the system after large buffers are freed.
//!
//! The daemon's allocator is mimalloc (see `main.rs`). It returns freed pages to the system
//! lazily, on later allocator calls of the same thread; a worker whose 16 MiB frames (or the
//! values decoded from one) were just freed may not allocate again soon, and would keep their
//! pages. [`release`] asks it to give them back now. Only called after large buffers were
//! freed, at most a hundred times a second.

use std::time::{Duration, Instant};

/// Releases freed memory to the system, at most once per `every`.
pub struct Releaser {
    pending: bool,
    last: Option<Instant>,
    every: Duration,
}

impl Releaser {
    pub const fn new(every: Duration) -> Releaser {
        Releaser {
            pending: false,
            last: None,
            every,
        }
    }

    /// A large buffer was freed: release memory at the next opportunity.
    pub fn freed(&mut self) {
        self.pending = true;
    }

    /// Release now if something large was freed and the last release is old enough.
    pub fn maybe_release(&mut self, now: Instant) {
        if !self.pending
            || self
                .last
                .is_some_and(|t| now.duration_since(t) < self.every)
        {
            return;
        }
        self.pending = false;
        self.last = Some(now);
        release();
    }
}

/// Return the free pages of this thread's heap to the system (a no-op for memory that another
/// allocator manages, as in unit tests).
pub fn release() {
    // SAFETY: mi_collect has no preconditions; `force` frees what is free.
    unsafe { libmimalloc_sys::mi_collect(true) };
}
