//! The guest's disk budget: the bytes its writes add to files, kept by the wasip1
//! ([`super::p1`]) and wasip2 ([`super::p2`]) wrappers.

use std::collections::HashMap;
use std::sync::Arc;

use super::Hits;
use super::LogFile;

/// A guest's disk budget: the bytes its writes added to files, counted in the WASI
/// layer before they reach the host, so that no file the host cannot walk (one
/// deleted while open, one among millions of entries) escapes the cap.
///
/// What counts is growth: a write past the end of a file adds what the file grew
/// by (a hole before it included: sparse files are not assumed), a rewrite in
/// place adds nothing. Truncating a file gives its bytes back, and so does
/// removing its last link (`unlink`, or a `rename` over it) unless the guest still
/// holds it open: then the bytes stay counted until its last descriptor closes
/// (wasip1; a wasip2 guest's until the step ends, as its descriptors' drops are
/// not seen). Directories and symlinks are not counted (the entry limit bounds
/// them); stdout and stderr are not files.
pub(super) struct Disk {
    cap: u64,
    used: u64,
    hits: Arc<Hits>,
    log: LogFile,
    /// Regular files the guest holds open (wasip1), by descriptor: their inode as
    /// WASI names it.
    pub(super) open: HashMap<i32, u64>,
    /// How many of those descriptors each inode has.
    refs: HashMap<u64, usize>,
    /// The size of each of those inodes: stat at open, then kept by the wrappers
    /// (every change of a guest's file goes through them), so a write needs no
    /// stat of its own.
    sizes: HashMap<u64, u64>,
    /// Regular files a wasip2 guest opened, by metadata hash: alive while the
    /// guest holds a descriptor or a stream of them (each holds the `Arc`).
    held: Vec<((u64, u64), std::sync::Weak<std::fs::File>)>,
}

impl Disk {
    pub(super) fn new(cap: u64, hits: Arc<Hits>, log: LogFile) -> Disk {
        Disk {
            cap,
            used: 0,
            hits,
            log,
            open: HashMap::new(),
            refs: HashMap::new(),
            sizes: HashMap::new(),
            held: Vec::new(),
        }
    }

    /// Notes a file a wasip2 guest opened (forgetting those it let go).
    pub(super) fn hold(&mut self, hash: (u64, u64), file: &Arc<std::fs::File>) {
        self.held.retain(|(_, f)| f.strong_count() > 0);
        self.held.push((hash, Arc::downgrade(file)));
    }

    pub(super) fn is_held(&self, hash: (u64, u64)) -> bool {
        self.held
            .iter()
            .any(|(h, f)| *h == hash && f.strong_count() > 0)
    }

    pub(super) fn room(&self) -> u64 {
        self.cap.saturating_sub(self.used)
    }

    /// Charges growth a write made. Past the cap it is also a refusal: the checks
    /// before each write should make that impossible, and if one missed a way to
    /// grow a file the step still fails instead of succeeding over its cap.
    pub(super) fn charge(&mut self, n: u64) {
        if self.used.saturating_add(n) > self.cap {
            self.refuse(n);
        }
        self.used = self.used.saturating_add(n);
    }

    pub(super) fn credit(&mut self, n: u64) {
        self.used = self.used.saturating_sub(n);
    }

    /// Whether a file may grow by `growth` more bytes; `false` notes the refusal
    /// (the caller answers ENOSPC).
    pub(super) fn admit(&mut self, growth: u64) -> bool {
        if growth > self.room() {
            self.refuse(growth);
            return false;
        }
        true
    }

    /// A file set from `before` to `after` bytes: growth charged, shrinking given back.
    pub(super) fn set_size(&mut self, before: u64, after: u64) {
        self.charge(after.saturating_sub(before));
        self.credit(before.saturating_sub(after));
    }

    /// Notes a refused growth of `n` bytes (the first one is logged and kept).
    pub(super) fn refuse(&mut self, n: u64) {
        let mut first = self.hits.disk.lock().unwrap_or_else(|e| e.into_inner());
        if first.is_none() {
            *first = Some((self.used, n));
            self.log.note(&format!(
                "disk cap of {} over /out, /tmp and /millrace reached: writes that grow files fail with ENOSPC",
                crate::definition::format_size(self.cap)
            ));
        }
    }

    pub(super) fn opened(&mut self, fd: i32, ino: u64, size: u64) {
        if let Some(old) = self.open.insert(fd, ino) {
            self.release(old);
        }
        *self.refs.entry(ino).or_default() += 1;
        self.sizes.insert(ino, size);
    }

    /// The size of the file open at `fd`, if tracked.
    pub(super) fn size_of(&self, fd: i32) -> Option<(u64, u64)> {
        let ino = *self.open.get(&fd)?;
        Some((ino, *self.sizes.get(&ino)?))
    }

    pub(super) fn resized(&mut self, fd: i32, size: u64) {
        if let Some(ino) = self.open.get(&fd) {
            self.sizes.insert(*ino, size);
        }
    }

    /// Forgets descriptor `fd`; whether it was the last of its inode.
    pub(super) fn closed(&mut self, fd: i32) -> bool {
        match self.open.remove(&fd) {
            Some(ino) => self.release(ino),
            None => false,
        }
    }

    fn release(&mut self, ino: u64) -> bool {
        match self.refs.get_mut(&ino) {
            Some(n) if *n > 1 => {
                *n -= 1;
                false
            }
            Some(_) => {
                self.refs.remove(&ino);
                self.sizes.remove(&ino);
                true
            }
            None => false,
        }
    }

    pub(super) fn is_open(&self, ino: u64) -> bool {
        self.refs.contains_key(&ino)
    }
}
