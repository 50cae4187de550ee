//! A step attempt's log file, shared by every executor: the guest's output and
//! millrace's own notes, capped in size.

use std::io::Write;
use std::path::Path;
use std::sync::{Arc, Mutex};

/// A step attempt's log: stdout and stderr interleaved in one file, capped in size.
/// Output past the cap is dropped and a single notice is appended.
#[derive(Clone)]
pub struct LogFile {
    inner: Arc<Mutex<LogInner>>,
}

struct LogInner {
    file: std::fs::File,
    written: u64,
    cap: u64,
    truncated: bool,
}

impl LogFile {
    pub fn create(path: &Path, cap: u64) -> std::io::Result<LogFile> {
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)?;
        }
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)?;
        Ok(LogFile {
            inner: Arc::new(Mutex::new(LogInner {
                file,
                written: 0,
                cap,
                truncated: false,
            })),
        })
    }

    /// Appends a line from millrace itself (not the guest).
    pub fn note(&self, line: &str) {
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let _ = writeln!(inner.file, "[millrace] {line}");
    }

    /// Empties the log (a re-adopted Slurm job's log is copied again from its
    /// start, so nothing the previous process copied appears twice).
    pub fn reset(&self) {
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        if inner.file.set_len(0).is_ok() {
            inner.written = 0;
            inner.truncated = false;
        }
    }

    /// Appends output of the step (capped like the rest).
    pub fn append(&self, buf: &[u8]) {
        let _ = self.write(buf);
    }

    /// Writes within the cap (the wasm runtime's streams write through this).
    pub(super) fn write(&self, buf: &[u8]) -> std::io::Result<()> {
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let room = inner.cap.saturating_sub(inner.written) as usize;
        if buf.len() <= room {
            inner.file.write_all(buf)?;
            inner.written += buf.len() as u64;
        } else if !inner.truncated {
            inner.file.write_all(&buf[..room])?;
            inner.written = inner.cap;
            inner.truncated = true;
            let cap = inner.cap;
            writeln!(
                inner.file,
                "\n[millrace] log truncated: output beyond {cap} bytes was dropped"
            )?;
        }
        Ok(())
    }
}
