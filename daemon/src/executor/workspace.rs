//! A step's sandbox directories on the host: `in/<mount>/`, `out/<output>/`, `tmp/`
//! and `millrace/` (the metrics file). They are recycled from step to step within a
//! run: emptied directories are renamed into a spare list and renamed back into place
//! for the next step, instead of being deleted and created again. On ext4, creating
//! and deleting thousands of directories is what a trivial step costs most.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::executor::LogFile;
use crate::store::walk;

/// A tree past a walk limit, named as the step sees it (e.g. "output `o`").
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{limit} in {what}")]
pub struct Overgrown {
    pub limit: walk::Limit,
    pub what: String,
}

/// What `dir` holds, or the limit it breaks, named with `what` (e.g. "output `o`").
pub fn checked_size(dir: &Path, what: &str, limits: walk::Limits) -> Result<u64, Overgrown> {
    match walk::usage(dir, limits.depth, limits.entries) {
        (u, None) => Ok(u.bytes),
        (_, Some(limit)) => Err(Overgrown {
            limit,
            what: what.to_string(),
        }),
    }
}

/// Why a watch stopped a step.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Overrun {
    /// The writable directories hold these bytes, more than the cap.
    Bytes(u64),
    /// A depth or entry limit, with the message naming it and the directory.
    Limit(String),
}

/// Resolves when the directories (with their names in the sandbox) hold more than
/// `cap` bytes together, or one breaks the depth limit, or together the entry
/// limit (`limits`): the disk cap on a step's writable directories. The kernel cannot
/// enforce it on a bind-mounted host directory for an unprivileged daemon, so it
/// is polled. A walk costs what the trees hold, so walks are spaced to keep them
/// under a tenth of a core's time (every 50 ms for small trees, at most every
/// 5 s); between walks, one `statvfs` every 50 ms watches the free space of their
/// filesystem, and a fall larger than what is left under the cap walks at once.
/// So a guest writing fast is seen within ~50 ms however large its trees.
pub async fn watch(dirs: Vec<(String, PathBuf)>, cap: u64, limits: walk::Limits) -> Overrun {
    const TICK: Duration = Duration::from_millis(50);
    let mut interval = TICK;
    let mut last_walk: Option<(Instant, u64, Option<u64>)> = None;
    let probe = dirs.first().map(|(_, d)| d.clone());
    loop {
        tokio::time::sleep(TICK).await;
        let free = probe.as_deref().and_then(free_bytes);
        if let Some((at, used, free_then)) = last_walk {
            let fell = match (free_then, free) {
                (Some(then), Some(now)) => then.saturating_sub(now),
                _ => 0,
            };
            if at.elapsed() < interval && fell <= cap.saturating_sub(used) {
                continue;
            }
        }
        let dirs = dirs.clone();
        let started = Instant::now();
        let seen = tokio::task::spawn_blocking(move || -> Result<u64, Overrun> {
            let (depth, mut entries_left) = (limits.depth, limits.entries);
            let mut bytes = 0u64;
            for (name, d) in &dirs {
                let (u, limit) = walk::usage(d, depth, entries_left);
                bytes += u.bytes;
                if let Some(limit) = limit {
                    let limit = match limit {
                        // The count is over all the directories together.
                        walk::Limit::Entries(_) => walk::Limit::Entries(limits.entries),
                        l => l,
                    };
                    return Err(Overrun::Limit(format!("{limit} in {name}")));
                }
                entries_left = entries_left.saturating_sub(u.entries);
            }
            Ok(bytes)
        })
        .await;
        let used = match seen {
            Ok(Ok(used)) if used > cap => return Overrun::Bytes(used),
            Ok(Err(over)) => return over,
            Ok(Ok(used)) => used,
            Err(_) => 0,
        };
        last_walk = Some((Instant::now(), used, free));
        interval = (started.elapsed() * 10).clamp(TICK, Duration::from_secs(5));
    }
}

/// Free bytes of the filesystem holding `dir` (for an unprivileged writer).
fn free_bytes(dir: &Path) -> Option<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(dir.as_os_str().as_bytes()).ok()?;
    // SAFETY: an all-zero statvfs is a valid value for the kernel to overwrite.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: a NUL-terminated path and a valid out pointer.
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return None;
    }
    Some((st.f_bavail as u64).saturating_mul(st.f_frsize as u64))
}

/// [`watch`] for the bytes alone (a Slurm job reports only those): resolves with
/// what the directories hold once it is more than `cap`, or a limit is broken.
pub async fn watch_disk(dirs: Vec<PathBuf>, cap: u64, limits: walk::Limits) -> u64 {
    let named = dirs
        .into_iter()
        .map(|d| (d.display().to_string(), d))
        .collect();
    match watch(named, cap, limits).await {
        Overrun::Bytes(used) => used,
        // Past a limit the bytes below it are not counted: report the cap broken.
        Overrun::Limit(_) => cap.saturating_add(1),
    }
}

/// Most metric lines read from one step.
const MAX_METRIC_LINES: usize = 100_000;

/// One line of a step's metrics file.
#[derive(Debug, Clone, PartialEq)]
pub struct Metric {
    pub name: String,
    pub value: f64,
    /// The line's `step` (an epoch, an iteration), if it gave one.
    pub index: Option<i64>,
}

/// Reads the metrics file protocol: one JSON object per line,
/// `{"name": …, "value": …, "step": optional int}`. A line that is not one is
/// noted in the log and skipped; `None` when the file could not be read (a
/// missing file is no metrics, said nowhere).
pub fn read_metrics(path: &Path, log: &LogFile) -> Option<Vec<Metric>> {
    // A guest controls this file: read a bounded prefix only.
    const MAX_METRICS_BYTES: u64 = 64 << 20;
    // Neither a symlink out of the sandbox nor a FIFO that would block.
    let opened = {
        use std::os::unix::fs::OpenOptionsExt;
        std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_NOFOLLOW)
            .open(path)
            .and_then(|f| {
                if f.metadata()?.is_file() {
                    Ok(f)
                } else {
                    Err(std::io::Error::other("not a regular file"))
                }
            })
    };
    if let Err(e) = &opened
        && e.kind() != std::io::ErrorKind::NotFound
    {
        log.note(&format!("the metrics file was not read: {e}"));
    }
    let text = opened.and_then(|f| {
        let mut s = String::new();
        std::io::Read::read_to_string(&mut std::io::Read::take(f, MAX_METRICS_BYTES), &mut s)
            .map(|_| s)
    });
    let text = text.ok()?;
    let mut rows = Vec::new();
    for (n, line) in text.lines().enumerate().take(MAX_METRIC_LINES) {
        if line.trim().is_empty() {
            continue;
        }
        let parsed = serde_json::from_str::<serde_json::Value>(line)
            .ok()
            .and_then(|v| {
                Some(Metric {
                    name: v.get("name")?.as_str()?.to_string(),
                    value: v.get("value")?.as_f64()?,
                    index: v.get("step").and_then(|s| s.as_i64()),
                })
            });
        match parsed {
            Some(row) => rows.push(row),
            None => log.note(&format!(
                "metrics line {} ignored: expected {{\"name\": …, \"value\": number}}",
                n + 1
            )),
        }
    }
    Some(rows)
}

/// One sandbox's directory tree.
pub struct Workspace {
    root: PathBuf,
    spares: Vec<PathBuf>,
    created: usize,
}

impl Workspace {
    fn new(root: PathBuf) -> io::Result<Workspace> {
        for d in ["in", "out", "tmp", "millrace", "spare"] {
            fs::create_dir_all(root.join(d))?;
        }
        Ok(Workspace {
            root,
            spares: Vec::new(),
            created: 0,
        })
    }

    pub fn dir_in(&self) -> PathBuf {
        self.root.join("in")
    }

    pub fn dir_out(&self) -> PathBuf {
        self.root.join("out")
    }

    pub fn dir_tmp(&self) -> PathBuf {
        self.root.join("tmp")
    }

    pub fn dir_meta(&self) -> PathBuf {
        self.root.join("millrace")
    }

    pub fn metrics_file(&self) -> PathBuf {
        self.dir_meta().join("metrics.jsonl")
    }

    /// Puts an empty directory at `in/<mount>` and `out/<output>` for each name.
    pub fn prepare(&mut self, mounts: &[&str], outputs: &[&str]) -> io::Result<()> {
        for m in mounts {
            self.take_dir(&self.dir_in().join(m))?;
        }
        for o in outputs {
            self.take_dir(&self.dir_out().join(o))?;
        }
        Ok(())
    }

    fn take_dir(&mut self, dest: &Path) -> io::Result<()> {
        match self.spares.pop() {
            Some(spare) => fs::rename(spare, dest),
            None => fs::create_dir(dest),
        }
    }

    /// Empties the workspace for the next step; top directories become spares (up
    /// to [`MAX_SPARES`]: 200 000 directories a guest left in `/tmp` are removed,
    /// not kept). Everything goes through one [`walk::Drain`], so no depth or width
    /// of what a guest left makes it recurse or slow.
    pub fn reset(&mut self) -> io::Result<()> {
        let spare_dir = walk::Dir::open(&self.root.join("spare"))?;
        let mut drain = walk::Drain::new(&spare_dir)?;
        let mut first_error = None;
        for parent in [
            self.dir_in(),
            self.dir_out(),
            self.dir_tmp(),
            self.dir_meta(),
        ] {
            if let Err(e) = self.reset_one(&parent, &spare_dir, &mut drain) {
                first_error.get_or_insert(e);
            }
        }
        let finished = drain.finish();
        match first_error {
            Some(e) => Err(e),
            None => finished,
        }
    }

    fn reset_one(
        &mut self,
        parent: &Path,
        spare_dir: &walk::Dir,
        drain: &mut walk::Drain,
    ) -> io::Result<()> {
        let dir = walk::Dir::open(parent)?;
        for e in dir.entries()? {
            let keep = e.kind == walk::Kind::Dir && self.spares.len() < MAX_SPARES;
            // One the guest made unreadable is not kept: the drain deals with it.
            let sub = if keep {
                dir.open_dir(&e.name).ok()
            } else {
                None
            };
            if let Some(sub) = sub {
                drain.empty(&sub)?;
                drop(sub);
                let n = self.created.to_string();
                self.created += 1;
                dir.rename(&e.name, spare_dir, &walk::cstr(n.as_ref())?)?;
                self.spares.push(self.root.join("spare").join(n));
            } else {
                drain.remove(&dir, &e)?;
            }
        }
        Ok(())
    }
}

/// Most emptied directories a workspace keeps for the next step.
const MAX_SPARES: usize = 64;

/// The workspaces of one run, each used by one step at a time.
pub struct WorkspacePool {
    root: PathBuf,
    free: Mutex<(Vec<Workspace>, usize)>,
}

impl WorkspacePool {
    pub fn new(root: PathBuf) -> WorkspacePool {
        WorkspacePool {
            root,
            free: Mutex::new((Vec::new(), 0)),
        }
    }

    /// A clean workspace: a recycled one, or a new one.
    pub fn take(&self) -> io::Result<Workspace> {
        let n = {
            let mut free = self.free.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(ws) = free.0.pop() {
                return Ok(ws);
            }
            free.1 += 1;
            free.1
        };
        let root = self.root.join(format!("sandbox-{n}"));
        if root.exists() {
            // Left by an interrupted process of the same run (before a resume).
            walk::remove_tree(&root)?;
        }
        Workspace::new(root)
    }

    /// Returns a workspace after emptying it; one that cannot be emptied is dropped
    /// (its directory goes with the run's).
    pub fn give_back(&self, mut ws: Workspace) {
        if ws.reset().is_ok() {
            self.free
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .0
                .push(ws);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_recycled_workspace_is_empty_and_reuses_its_directories() {
        let tmp = tempfile::tempdir().unwrap();
        let pool = WorkspacePool::new(tmp.path().to_path_buf());
        let mut ws = pool.take().unwrap();
        ws.prepare(&["data"], &["model"]).unwrap();
        fs::write(ws.dir_out().join("model/w.bin"), "w").unwrap();
        fs::create_dir(ws.dir_tmp().join("scratch")).unwrap();
        fs::write(ws.metrics_file(), "{}\n").unwrap();
        let inode = |p: &Path| std::os::unix::fs::MetadataExt::ino(&fs::metadata(p).unwrap());
        let model_inode = inode(&ws.dir_out().join("model"));
        pool.give_back(ws);
        let mut ws = pool.take().unwrap();
        assert_eq!(fs::read_dir(ws.dir_out()).unwrap().count(), 0);
        assert_eq!(fs::read_dir(ws.dir_tmp()).unwrap().count(), 0);
        assert!(!ws.metrics_file().exists());
        ws.prepare(&["x", "y"], &["out"]).unwrap();
        assert_eq!(fs::read_dir(ws.dir_out().join("out")).unwrap().count(), 0);
        let reused = [
            ws.dir_in().join("x"),
            ws.dir_in().join("y"),
            ws.dir_out().join("out"),
        ]
        .iter()
        .any(|p| inode(p) == model_inode);
        assert!(reused, "a spare directory was renamed back into place");
    }

    #[test]
    fn a_reset_removes_deep_and_wide_trees_and_keeps_few_spares() {
        let tmp = tempfile::tempdir().unwrap();
        let pool = WorkspacePool::new(tmp.path().to_path_buf());
        let mut ws = pool.take().unwrap();
        ws.prepare(&[], &["o"]).unwrap();
        // 20 000 levels under /out/o (beyond any recursion and PATH_MAX) and 5 000
        // empty directories in /tmp.
        let mut d = walk::Dir::open(&ws.dir_out().join("o")).unwrap();
        for _ in 0..20_000 {
            d.mkdir(c"a", 0o755).unwrap();
            d = d.open_dir(c"a").unwrap();
        }
        drop(d);
        for i in 0..5_000 {
            fs::create_dir(ws.dir_tmp().join(format!("d{i}"))).unwrap();
        }
        assert!(
            checked_size(
                &ws.dir_out().join("o"),
                "output `o`",
                walk::Limits::default()
            )
            .unwrap_err()
            .to_string()
            .contains(
                "directory depth limit of 256 levels exceeded (MILLRACE_MAX_DEPTH) in output `o`"
            )
        );
        let started = Instant::now();
        ws.reset().unwrap();
        eprintln!("reset: {:?}", started.elapsed());
        assert!(ws.spares.len() <= MAX_SPARES);
        assert_eq!(fs::read_dir(ws.dir_out()).unwrap().count(), 0);
        assert_eq!(fs::read_dir(ws.dir_tmp()).unwrap().count(), 0);
        assert_eq!(
            fs::read_dir(ws.root.join("spare")).unwrap().count(),
            ws.spares.len()
        );
    }
}
