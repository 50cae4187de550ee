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
    /// Secret values the step was given, replaced by `***` before anything is
    /// written (SPEC "Secrets").
    redact: Vec<Vec<u8>>,
    /// The tail of the output so far that may be the start of a secret split
    /// across two writes: held back until the next write (or the end) decides.
    held: Vec<u8>,
}

const MASK: &[u8] = b"***";

/// `data` with every secret in `secrets` replaced by [`MASK`], and the tail that
/// could still become one (a proper prefix of a secret reaching the end), held.
fn redact(data: &[u8], secrets: &[Vec<u8>]) -> (Vec<u8>, Vec<u8>) {
    let mut out = Vec::with_capacity(data.len());
    let mut i = 0;
    'scan: while i < data.len() {
        let rest = &data[i..];
        // The longest first, so that a secret containing another is masked whole.
        for s in secrets {
            if rest.starts_with(s) {
                out.extend_from_slice(MASK);
                i += s.len();
                continue 'scan;
            }
        }
        if secrets
            .iter()
            .any(|s| rest.len() < s.len() && s.starts_with(rest))
        {
            return (out, rest.to_vec());
        }
        out.push(data[i]);
        i += 1;
    }
    (out, Vec::new())
}

impl LogInner {
    /// Writes what is held back: the output ended without completing a secret.
    fn flush_held(&mut self) -> std::io::Result<()> {
        let held = std::mem::take(&mut self.held);
        self.put(&held)
    }

    /// Writes within the cap.
    fn put(&mut self, buf: &[u8]) -> std::io::Result<()> {
        let room = self.cap.saturating_sub(self.written) as usize;
        if buf.len() <= room {
            self.file.write_all(buf)?;
            self.written += buf.len() as u64;
        } else if !self.truncated {
            self.file.write_all(&buf[..room])?;
            self.written = self.cap;
            self.truncated = true;
            let cap = self.cap;
            writeln!(
                self.file,
                "\n[millrace] log truncated: output beyond {cap} bytes was dropped"
            )?;
        }
        Ok(())
    }
}

impl Drop for LogInner {
    fn drop(&mut self) {
        let _ = self.flush_held();
    }
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
                redact: Vec::new(),
                held: Vec::new(),
            })),
        })
    }

    /// From now on, every value in `secrets` is written as `***` (empty ones are
    /// ignored: they would mask every position).
    pub fn redact(&self, secrets: impl IntoIterator<Item = Vec<u8>>) {
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        inner
            .redact
            .extend(secrets.into_iter().filter(|s| !s.is_empty()));
        inner.redact.sort_by_key(|s| std::cmp::Reverse(s.len()));
        inner.redact.dedup();
    }

    /// The values this log masks (for a log written elsewhere: a Slurm node's).
    pub fn redactions(&self) -> Vec<Vec<u8>> {
        let inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        inner.redact.clone()
    }

    /// `text` with the secrets masked, for what is recorded beside the log (a
    /// failure's message).
    pub fn redacted(&self, text: &str) -> String {
        let inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let (mut out, held) = redact(text.as_bytes(), &inner.redact);
        out.extend_from_slice(&held);
        String::from_utf8_lossy(&out).into_owned()
    }

    /// Writes what is held back for a possible secret: the guest is done.
    pub fn finish(&self) {
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let _ = inner.flush_held();
    }

    /// Appends a line from millrace itself (not the guest).
    pub fn note(&self, line: &str) {
        let line = self.redacted(line);
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let _ = inner.flush_held();
        let _ = writeln!(inner.file, "[millrace] {line}");
    }

    /// Empties the log (a re-adopted Slurm job's log is copied again from its
    /// start, so nothing the previous process copied appears twice).
    pub fn reset(&self) {
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        if inner.file.set_len(0).is_ok() {
            inner.written = 0;
            inner.truncated = false;
            inner.held.clear();
        }
    }

    /// Appends output of the step (capped like the rest).
    pub fn append(&self, buf: &[u8]) {
        let _ = self.write(buf);
    }

    /// Writes within the cap (the wasm runtime's streams write through this),
    /// secrets masked.
    pub(super) fn write(&self, buf: &[u8]) -> std::io::Result<()> {
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        if inner.redact.is_empty() {
            return inner.put(buf);
        }
        let mut data = std::mem::take(&mut inner.held);
        data.extend_from_slice(buf);
        let (out, held) = redact(&data, &inner.redact);
        inner.held = held;
        inner.put(&out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A secret is masked wherever it is, also split across writes; a prefix of
    /// one that never completes is written as it was.
    #[test]
    fn secrets_are_masked_across_writes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log");
        let log = LogFile::create(&path, 1 << 20).unwrap();
        log.redact([b"hunter2".to_vec(), Vec::new()]);
        log.append(b"pw=hun");
        log.append(b"ter2; again hunter2\nhunt");
        log.append(b"ing hunte");
        log.note("failed: hunter2");
        log.append(b"hunter");
        log.finish();
        drop(log);
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(
            text,
            "pw=***; again ***\nhunting hunte[millrace] failed: ***\nhunter"
        );
    }
}
