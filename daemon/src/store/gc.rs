//! Garbage collection (`millrace gc`): the newest N runs of each pipeline stay,
//! with everything they reference; older runs, their logs and locks, sandboxes no
//! process drives, unfinished staging and the objects nothing names go.

use super::Store;
use super::db::DbError;
use crate::model::RunStatus;

#[derive(Debug, thiserror::Error)]
pub enum GcError {
    /// Not now, or not so: the request or the store's state refuses it.
    #[error("{0}")]
    Refused(String),
    #[error(transparent)]
    Store(#[from] super::StoreError),
    #[error(transparent)]
    Db(#[from] DbError),
    #[error(transparent)]
    Artifacts(#[from] super::artifacts::ArtifactError),
}

/// What a collection removed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct Collected {
    pub runs_deleted: usize,
    pub objects_deleted: u64,
    pub bytes_freed: u64,
}

/// Keeps the newest `keep` runs per pipeline. `driven(run)` says whether a
/// process drives that run now (the engine's run lock): such a run refuses the
/// collection, and its sandbox stays.
pub fn collect(
    store: &Store,
    keep: i64,
    driven: &dyn Fn(i64) -> bool,
) -> Result<Collected, GcError> {
    if keep < 1 {
        return Err(GcError::Refused("--keep must be at least 1".into()));
    }
    // A run in progress may have moved blobs into the store that no row names yet:
    // every run, import and publish holds the store lock shared while it writes.
    let Some(_exclusive) = store.try_lock_exclusive()? else {
        return Err(GcError::Refused(
            "a run, module import or publish is in progress; run gc when none is".into(),
        ));
    };
    let active: Vec<i64> = store
        .db()
        .read()
        .runs(None, i64::MAX)?
        .into_iter()
        .filter(|r| r.status == RunStatus::Running && driven(r.id))
        .map(|r| r.id)
        .collect();
    if let Some(id) = active.first() {
        return Err(GcError::Refused(format!(
            "run {id} is in progress; run gc when no run is"
        )));
    }
    let deleted = {
        let mut db = store.db();
        let keep_ids = db.read().runs_to_keep(keep)?;
        db.batch(|b| b.delete_runs_except(&keep_ids))?
    };
    // Logs and locks of deleted runs, sandboxes left by killed processes. A run that
    // starts meanwhile exists in the database and holds its lock before it creates
    // any of these, so it is left alone.
    for (dir, only_deleted) in [("logs", true), ("locks", true), ("work", false)] {
        let Ok(entries) = std::fs::read_dir(store.root.join(dir)) else {
            continue;
        };
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let Ok(id) = name
                .trim_start_matches("run-")
                .trim_end_matches(".lock")
                .parse::<i64>()
            else {
                continue;
            };
            let exists = store.db().read().run(id)?.is_some();
            let remove = !exists || (!only_deleted && !driven(id));
            if remove {
                // A sandbox holds what a guest left: any depth, no recursion.
                let _ = super::walk::remove_tree(&e.path());
            }
        }
    }
    // Staging files of ingestions and module imports that never finished: with the
    // store lock held exclusively, nothing is writing there now.
    if let Ok(entries) = std::fs::read_dir(store.root.join("objects/tmp")) {
        for e in entries.flatten() {
            let _ = super::walk::remove_tree(&e.path());
        }
    }
    let mut blobs = std::collections::HashSet::new();
    let mut trees = std::collections::HashSet::new();
    for a in store.db().read().all_artifacts()? {
        store.artifacts.reachable(&a, &mut blobs, &mut trees);
    }
    let (files, bytes) = store.artifacts.sweep(&blobs, &trees)?;
    Ok(Collected {
        runs_deleted: deleted,
        objects_deleted: files,
        bytes_freed: bytes,
    })
}
