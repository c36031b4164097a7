//! Giving memory back to the system after large buffers are freed.
//!
//! The daemon's allocator is mimalloc (see `main.rs`). It returns freed pages to the system
//! lazily, on later allocator calls of the same thread; a worker whose 16 MiB frames (or the
//! values decoded from one) were just freed may not allocate again soon, and would keep their
//! pages. [`release`] asks it to give them back now. Only called after large buffers were
//! freed, at most a hundred times a second.

use std::time::{Duration, Instant};

/// mimalloc's option numbers (`mi_option_e` in mimalloc.h, v3, which libmimalloc-sys builds;
/// the Rust crate does not name these two).
const MI_OPTION_ARENA_EAGER_COMMIT: libmimalloc_sys::mi_option_t = 4;
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// How long freed pages stay before they are given back to the system (see below).
const PURGE_DELAY_MS: std::ffi::c_long = 10;

/// Tune the allocator's retention (issue 18). By default mimalloc commits its arenas eagerly
/// on Linux and purges freed pages only after a delay, and a worker that freed a flood's
/// batches kept them: peak RSS 46-65 MiB per worker under a UDP flood. Measured on one build,
/// the same 60,000-datagram flood (collector-load udp, 1 worker): default 46.5 and 64.5 MiB;
/// `MIMALLOC_ARENA_EAGER_COMMIT=0` 33.8; that and `MIMALLOC_PURGE_DELAY=0` 29.7 and 30.3, CPU
/// per sample within noise. Set in `main` instead, the first arena (reserved by the runtime's
/// first allocation, before `main`) stayed eagerly committed and the flood peaked at 41-42 MiB,
/// so the binary calls this from a constructor that runs before any allocation
/// (`main.rs`). It allocates nothing. An operator's own `MIMALLOC_*` variable for either
/// option wins.
///
/// The purge delay is 10 ms (mimalloc's own default), not 0: purging at once gave every page
/// freed back to the kernel (madvise, and TLB shootdowns reaching the writer's core) and took
/// a page fault to use it again, 0.1-0.25 CPU-seconds per 100,000 samples of system time.
/// Since reading pauses at one full pending batch the flood peaks at ~24 MiB either way
/// (`scripts/bench --workers 1 --no-peer`, one after the other: flat out 23.7 / 23.9 MiB, RPC
/// 24.0 / 24.8 MiB; CPU per 100k, UDP 1.65 -> 1.40 s, RPC 1.59 -> 1.40 s).
pub fn configure_allocator() {
    for (option, env, value) in [
        (
            MI_OPTION_ARENA_EAGER_COMMIT,
            c"MIMALLOC_ARENA_EAGER_COMMIT",
            0,
        ),
        (
            MI_OPTION_PURGE_DELAY,
            c"MIMALLOC_PURGE_DELAY",
            PURGE_DELAY_MS,
        ),
    ] {
        // SAFETY: getenv reads the environment (no other thread exists yet to change it) and
        // allocates nothing; mi_option_set only stores the value, read when mimalloc uses it.
        unsafe {
            if libc::getenv(env.as_ptr()).is_null() {
                libmimalloc_sys::mi_option_set(option, value);
            }
        }
    }
}

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

#[cfg(test)]
mod tests {
    use super::*;

    /// Without an operator's `MIMALLOC_*` variables, the arena is committed lazily and freed
    /// pages are purged after `PURGE_DELAY_MS`.
    #[test]
    fn the_allocator_is_tuned_unless_the_environment_says_otherwise() {
        if std::env::var_os("MIMALLOC_PURGE_DELAY").is_some()
            || std::env::var_os("MIMALLOC_ARENA_EAGER_COMMIT").is_some()
        {
            return;
        }
        configure_allocator();
        // SAFETY: reading an option has no preconditions.
        let (delay, eager) = unsafe {
            (
                libmimalloc_sys::mi_option_get(MI_OPTION_PURGE_DELAY),
                libmimalloc_sys::mi_option_get(MI_OPTION_ARENA_EAGER_COMMIT),
            )
        };
        assert_eq!(delay, PURGE_DELAY_MS);
        assert_eq!(eager, 0);
    }
}
