//! Transfer steps: copy an artifact into a datastore path, replacing what was there
//! whole. The new tree is written beside the destination, flushed, then swapped in
//! with one `renameat2(RENAME_EXCHANGE)`, so a reader sees the old content or the
//! new, never a mix; the old tree is removed afterwards.

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use crate::store::artifacts::ArtifactStore;

#[derive(Debug, thiserror::Error)]
pub enum TransferError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Artifact(#[from] crate::store::artifacts::ArtifactError),
}

/// Publishes artifact `digest` at `dest` (a directory).
pub fn publish(artifacts: &ArtifactStore, digest: &str, dest: &Path) -> Result<(), TransferError> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| TransferError::Io { path, source }
    };
    let parent = dest.parent().ok_or_else(|| TransferError::Io {
        path: dest.to_path_buf(),
        source: std::io::Error::other("no parent directory"),
    })?;
    std::fs::create_dir_all(parent).map_err(io(parent))?;
    let name = dest
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    static SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let seq = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    remove_stale_staging(dest);
    let staging = parent.join(format!(
        "{}{}-{seq}",
        staging_prefix(&name),
        std::process::id()
    ));
    if staging.exists() {
        crate::store::walk::remove_tree(&staging).map_err(io(&staging))?;
    }
    artifacts.export(digest, &staging)?;
    sync_tree(&staging);
    let result = if dest.exists() {
        exchange(&staging, dest).map_err(io(dest)).and_then(|()| {
            // `staging` now holds the old content, which may have been a file.
            crate::store::walk::remove_tree(&staging).map_err(io(&staging))
        })
    } else {
        std::fs::rename(&staging, dest).map_err(io(dest))
    };
    if result.is_err() && staging.exists() {
        let _ = crate::store::walk::remove_tree(&staging);
    }
    result?;
    if let Ok(d) = std::fs::File::open(parent) {
        let _ = d.sync_all();
    }
    Ok(())
}

/// The staging copies of `<name>` are `.<name>.millrace-<pid>-<seq>` beside it.
fn staging_prefix(name: &str) -> String {
    format!(".{name}.millrace-")
}

/// Removes the staging copies that killed processes left beside `dest`: those of
/// processes that no longer exist.
pub fn remove_stale_staging(dest: &Path) {
    let (Some(parent), Some(name)) = (dest.parent(), dest.file_name()) else {
        return;
    };
    let prefix = staging_prefix(&name.to_string_lossy());
    let prefix = prefix.as_str();
    let Ok(entries) = std::fs::read_dir(parent) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|n| n.strip_prefix(prefix))
            .and_then(|rest| rest.split_once('-'))
            .and_then(|(pid, _)| pid.parse::<i32>().ok())
        else {
            continue;
        };
        if pid != std::process::id() as i32 && !process_exists(pid) {
            let path = e.path();
            let _ = crate::store::walk::remove_tree(&path);
        }
    }
}

fn process_exists(pid: i32) -> bool {
    // SAFETY: signal 0 only checks that the process exists.
    let rc = unsafe { libc::kill(pid, 0) };
    rc == 0 || std::io::Error::last_os_error().raw_os_error() != Some(libc::ESRCH)
}

/// fsyncs every file and directory of a freshly written tree.
fn sync_tree(dir: &Path) {
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                sync_tree(&p);
            } else if let Ok(f) = std::fs::File::open(&p) {
                let _ = f.sync_all();
            }
        }
    }
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
}

/// Atomically swaps two paths.
fn exchange(a: &Path, b: &Path) -> std::io::Result<()> {
    let a = CString::new(a.as_os_str().as_bytes()).map_err(std::io::Error::other)?;
    let b = CString::new(b.as_os_str().as_bytes()).map_err(std::io::Error::other)?;
    // SAFETY: both are valid NUL-terminated paths that outlive the call.
    let rc = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            a.as_ptr(),
            libc::AT_FDCWD,
            b.as_ptr(),
            libc::RENAME_EXCHANGE,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}
