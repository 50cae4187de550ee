//! The run lock: one process drives a run at a time.

use crate::store::Store;

/// Held while a process drives a run; `resume` refuses a run whose lock is held.
pub struct RunLock {
    _file: std::fs::File,
}

impl RunLock {
    /// The lock, `None` while another process holds it, or the error that kept
    /// us from asking (out of descriptors, say: that is not "busy", and a
    /// dispatcher taking it for busy would pick the run again at once).
    pub fn acquire(store: &Store, run: i64) -> std::io::Result<Option<RunLock>> {
        let Some(file) = Self::lock_file(store, run)? else {
            return Ok(None);
        };
        // Who drives the run, for `millrace cancel` (best effort: the lock itself
        // is what counts).
        use std::io::Write;
        let _ = file.set_len(0);
        let _ = write!(&file, "{}", std::process::id());
        Ok(Some(RunLock { _file: file }))
    }

    /// The run's lock file, locked; `None` while another process holds it.
    fn lock_file(store: &Store, run: i64) -> std::io::Result<Option<std::fs::File>> {
        std::fs::create_dir_all(store.root.join("locks"))?;
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(Self::path(store, run))?;
        match file.try_lock() {
            Ok(()) => Ok(Some(file)),
            Err(std::fs::TryLockError::WouldBlock) => Ok(None),
            Err(std::fs::TryLockError::Error(e)) => Err(e),
        }
    }

    /// The process driving the run now, as it recorded itself; `None` when no
    /// process holds the lock (or the holder's pid cannot be read).
    pub fn holder(store: &Store, run: i64) -> Option<u32> {
        if !RunLock::is_held(store, run) {
            return None;
        }
        std::fs::read_to_string(Self::path(store, run))
            .ok()?
            .trim()
            .parse()
            .ok()
    }

    /// Whether some process is driving the run now (when we cannot tell, yes:
    /// the safe answer for gc, recovery and the orphan sweep).
    /// Asking takes the lock for a moment and leaves the recorded holder as it is.
    pub fn is_held(store: &Store, run: i64) -> bool {
        !matches!(RunLock::lock_file(store, run), Ok(Some(_)))
    }

    fn path(store: &Store, run: i64) -> std::path::PathBuf {
        store.root.join("locks").join(format!("run-{run}.lock"))
    }
}
