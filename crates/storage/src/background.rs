//! A thread that runs a piece of work each time it is nudged, for the work a storage handle
//! (a grave's drop) or the daemon's writer (a retention pass) hands off rather than waits for.

use std::sync::mpsc::{sync_channel, SyncSender};
use std::thread::JoinHandle;

/// The thread runs `work` once per nudge; nudges while it works coalesce into one more run.
/// Dropping it lets the run in progress finish, then joins the thread.
pub struct Nudged {
    tx: Option<SyncSender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl Nudged {
    /// Start the thread, named `name`, idle until the first nudge.
    pub fn spawn(name: &str, mut work: impl FnMut() + Send + 'static) -> std::io::Result<Nudged> {
        let (tx, rx) = sync_channel::<()>(1);
        let thread = std::thread::Builder::new()
            .name(name.to_string())
            .spawn(move || {
                while rx.recv().is_ok() {
                    work();
                }
            })?;
        Ok(Nudged {
            tx: Some(tx),
            thread: Some(thread),
        })
    }

    /// Have the thread run its work once more; returns at once. `false` only if the thread
    /// has gone.
    pub fn nudge(&self) -> bool {
        use std::sync::mpsc::TrySendError;
        match self.tx.as_ref().map(|tx| tx.try_send(())) {
            // Full: a nudge is already waiting, which covers this one.
            Some(Ok(())) | Some(Err(TrySendError::Full(()))) => true,
            _ => false,
        }
    }
}

impl Drop for Nudged {
    fn drop(&mut self) {
        self.tx = None;
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    /// Each nudge runs the work at least once more; dropping waits for the run in progress.
    #[test]
    fn nudges_run_the_work_and_drop_waits_for_it() {
        let runs = Arc::new(AtomicUsize::new(0));
        let counted = runs.clone();
        let n = Nudged::spawn("test", move || {
            std::thread::sleep(std::time::Duration::from_millis(20));
            counted.fetch_add(1, Ordering::SeqCst);
        })
        .unwrap();
        assert!(n.nudge());
        drop(n);
        assert_eq!(runs.load(Ordering::SeqCst), 1);
    }
}
