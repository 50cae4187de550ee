//! The state directory: the SQLite database and the artifact store side by side.
//!
//! ```text
//! <state>/millrace.db        runs, steps, artifacts, lineage, cache, metrics
//! <state>/objects/           content-addressed artifacts (see `artifacts`)
//! <state>/work/<run>/…       sandboxes of running steps (removed afterwards)
//! <state>/logs/<run>/…       step logs, one file per attempt
//! <state>/cache/wasm/        precompiled wasm, written only by millrace
//! <state>/store.lock         shared by runs, imports and publishes; exclusive for gc
//! ```

pub mod artifacts;
pub mod db;
pub mod gc;
pub mod walk;

use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};

use artifacts::{ArtifactError, ArtifactStore, FileStat, Ingested, Mode};
use db::Db;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("state directory {path}: {source}")]
    Dir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Db(#[from] db::DbError),
    #[error(transparent)]
    Artifact(#[from] ArtifactError),
}

/// Creates `path` (a file, or a directory) with `mode` if missing, else sets `mode`.
/// SQLite gives its journal and WAL files the database file's mode.
fn make_private(path: &Path, mode: u32, dir: bool) -> std::io::Result<()> {
    use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
    let meta = match std::fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            if dir {
                std::fs::DirBuilder::new().mode(mode).create(path)?;
            } else {
                std::fs::OpenOptions::new()
                    .create_new(true)
                    .write(true)
                    .mode(mode)
                    .open(path)?;
            }
            return Ok(());
        }
        Err(e) => return Err(e),
    };
    // Only the owner can tighten it; a reader of someone else's state (a
    // member of its group, say) leaves it as it is.
    // SAFETY: geteuid has no preconditions.
    let ours = meta.uid() == unsafe { libc::geteuid() };
    if ours && meta.permissions().mode() & 0o777 != mode {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))?;
    }
    Ok(())
}

/// `<state>/store.lock`: see [`Store::lock_shared`].
const LOCK: &str = "store.lock";

/// The store lock, held until dropped (one open file description each, so the
/// shared holders of one process do not share a lock).
pub struct StoreLock {
    _file: std::fs::File,
}

pub struct Store {
    pub root: PathBuf,
    db: Mutex<Db>,
    pub artifacts: ArtifactStore,
    /// Where compiled wasm is kept (see [`Store::wasm_cache_dir`]).
    wasm_cache: PathBuf,
}

/// What a store is opened with: the walk limits and the compiled-code cache.
/// `millrace` builds it with the engine's configuration
/// (`engine::EngineConfig::store`, where the environment overrides are read).
#[derive(Debug, Clone, Default)]
pub struct StoreConfig {
    pub limits: walk::Limits,
    /// Precompiled wasm elsewhere than `<state>/cache/wasm` (`MILLRACE_CACHE`).
    pub wasm_cache: Option<PathBuf>,
}

impl Store {
    /// The store at `root` with the default limits and cache: the tests' and the
    /// library's; `millrace` itself opens with [`Store::open_with`].
    pub fn open(root: &Path) -> Result<Store, StoreError> {
        Store::open_with(root, &StoreConfig::default())
    }

    pub fn open_with(root: &Path, config: &StoreConfig) -> Result<Store, StoreError> {
        let dir_err = |source| StoreError::Dir {
            path: root.to_path_buf(),
            source,
        };
        // The state holds the API token, every log and the database: only its
        // owner may read it (a directory we create is 0700; the database and the
        // logs are private even in a directory the user made).
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(root)
            .map_err(dir_err)?;
        let root = std::path::absolute(root).map_err(dir_err)?;
        let db_path = root.join("millrace.db");
        for (path, mode, dir) in [(&db_path, 0o600, false), (&root.join("logs"), 0o700, true)] {
            make_private(path, mode, dir).map_err(|source| StoreError::Dir {
                path: path.clone(),
                source,
            })?;
        }
        let db = Db::open(&db_path)?;
        let artifacts = ArtifactStore::open(&root.join("objects"))?.with_limits(config.limits);
        let wasm_cache = config
            .wasm_cache
            .clone()
            .unwrap_or_else(|| root.join("cache").join("wasm"));
        Ok(Store {
            root,
            db: Mutex::new(db),
            artifacts,
            wasm_cache,
        })
    }

    /// The database; hold the guard only for a few statements.
    pub fn db(&self) -> MutexGuard<'_, Db> {
        // A panic while holding the lock leaves the connection usable: SQLite rolls
        // back an unfinished transaction when it is dropped.
        self.db.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn work_dir(&self, run: i64) -> PathBuf {
        self.root.join("work").join(run.to_string())
    }

    pub fn log_dir(&self, run: i64) -> PathBuf {
        self.root.join("logs").join(run.to_string())
    }

    /// Precompiled wasm: `<state>/cache/wasm`, or the configured cache
    /// (`MILLRACE_CACHE`, so the tests and several state directories share one
    /// compile of the Python runtime). Only millrace writes there; no guest ever
    /// sees it.
    pub fn wasm_cache_dir(&self) -> PathBuf {
        self.wasm_cache.clone()
    }

    /// What the walks of guest-written trees stop at.
    pub fn limits(&self) -> walk::Limits {
        self.artifacts.limits()
    }

    /// Takes the store lock shared, waiting while `gc` holds it: every process that
    /// may move objects into the store before a row names them (a run, a module
    /// import or publish) holds it for as long as it does.
    pub fn lock_shared(&self) -> Result<StoreLock, StoreError> {
        let file = self.lock_file()?;
        file.lock_shared().map_err(|source| StoreError::Dir {
            path: self.root.join(LOCK),
            source,
        })?;
        Ok(StoreLock { _file: file })
    }

    /// [`Store::lock_shared`], giving up (`None`) once `stop` says so: a run
    /// waiting for `gc` can still be cancelled or stopped.
    pub fn lock_shared_unless(
        &self,
        stop: &dyn Fn() -> bool,
    ) -> Result<Option<StoreLock>, StoreError> {
        let file = self.lock_file()?;
        loop {
            match file.try_lock_shared() {
                Ok(()) => return Ok(Some(StoreLock { _file: file })),
                Err(std::fs::TryLockError::WouldBlock) if !stop() => {
                    std::thread::sleep(std::time::Duration::from_millis(50));
                }
                Err(std::fs::TryLockError::WouldBlock) => return Ok(None),
                Err(std::fs::TryLockError::Error(source)) => {
                    return Err(StoreError::Dir {
                        path: self.root.join(LOCK),
                        source,
                    });
                }
            }
        }
    }

    /// Takes the store lock exclusively (for `gc`), or `None` while anyone holds it.
    pub fn try_lock_exclusive(&self) -> Result<Option<StoreLock>, StoreError> {
        let file = self.lock_file()?;
        match file.try_lock() {
            Ok(()) => Ok(Some(StoreLock { _file: file })),
            Err(std::fs::TryLockError::WouldBlock) => Ok(None),
            Err(std::fs::TryLockError::Error(source)) => Err(StoreError::Dir {
                path: self.root.join(LOCK),
                source,
            }),
        }
    }

    fn lock_file(&self) -> Result<std::fs::File, StoreError> {
        let path = self.root.join(LOCK);
        std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(|source| StoreError::Dir { path, source })
    }

    /// Whether `path` lies inside the state directory (symlinks resolved as far
    /// as `path` exists; it need not exist).
    pub fn inside(&self, path: &Path) -> bool {
        let (state, real) = self.resolved(path);
        real.is_some_and(|r| r.starts_with(&state))
    }

    /// Whether `path` lies inside the state directory or holds it: a dataset, a
    /// code directory or a transfer destination must do neither (a step would see
    /// the API token, the database and every log).
    pub fn overlaps(&self, path: &Path) -> bool {
        let (state, real) = self.resolved(path);
        real.is_some_and(|r| r.starts_with(&state) || state.starts_with(&r))
    }

    fn resolved(&self, path: &Path) -> (PathBuf, Option<PathBuf>) {
        let state = self
            .root
            .canonicalize()
            .unwrap_or_else(|_| self.root.clone());
        // The path may not exist yet: resolve its nearest existing ancestor.
        let Ok(absolute) = std::path::absolute(path) else {
            return (state, None);
        };
        let mut existing = absolute.as_path();
        let mut rest = Vec::new();
        while !existing.exists() {
            let (Some(name), Some(parent)) = (existing.file_name(), existing.parent()) else {
                return (state, None);
            };
            rest.push(name.to_os_string());
            existing = parent;
        }
        let real = existing.canonicalize().ok().map(|mut r| {
            r.extend(rest.iter().rev());
            r
        });
        (state, real)
    }

    /// The stat cache as the artifact store asks it.
    fn known(&self) -> impl Fn(&Path, &FileStat) -> Option<String> + '_ {
        move |path, stat| self.db().read().stat_lookup(path, stat).ok().flatten()
    }

    /// Ingests a file or directory (a user's dataset with `Mode::Copy`, a step's
    /// output with `Mode::Move`) and records the artifact and the stat data of its
    /// files in one transaction, so unchanged files are not re-read next time.
    pub fn ingest(&self, path: &Path, mode: Mode) -> Result<Ingested, StoreError> {
        let known = self.known();
        // A step's output is the guest's: a symlink there must not lead the store
        // to take (and move) a host file, nor a FIFO make it block.
        let meta = if mode == Mode::Move {
            std::fs::symlink_metadata(path)
        } else {
            std::fs::metadata(path)
        }
        .map_err(|source| ArtifactError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        if meta.file_type().is_symlink() {
            return Err(ArtifactError::Symlink(path.to_path_buf()).into());
        }
        if !meta.is_dir() && !meta.is_file() {
            return Err(ArtifactError::Special(path.to_path_buf()).into());
        }
        let ingested = if meta.is_dir() {
            self.artifacts.ingest_dir(path, mode, &known)?
        } else {
            self.artifacts.ingest_file(path, mode, &known)?
        };
        // An unchanged dataset (every file known by stat, artifact recorded) writes
        // nothing.
        let recorded = mode == Mode::Hash || self.db().read().artifact(&ingested.digest)?.is_some();
        if !ingested.known.is_empty() || !recorded {
            self.db().batch(|b| {
                if !recorded {
                    b.record_artifact(&ingested.digest, ingested.size, ingested.files)?;
                }
                for (file, stat, digest) in &ingested.known {
                    b.stat_record(file, stat, digest)?;
                }
                Ok(())
            })?;
        }
        Ok(ingested)
    }

    /// Checks an artifact is present and intact (see [`ArtifactStore::verify`]).
    pub fn verify(&self, digest: &str) -> Result<(), StoreError> {
        let checked = self.artifacts.verify(digest, &self.known())?;
        if !checked.is_empty() {
            self.db().batch(|b| {
                for (blob, stat, digest) in &checked {
                    b.stat_record(blob, stat, digest)?;
                }
                Ok(())
            })?;
        }
        Ok(())
    }
}
