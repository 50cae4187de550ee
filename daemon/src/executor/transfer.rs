//! Transfer steps: copy an artifact into a datastore path.
//!
//! - `mode = "replace"` (the default) makes the destination the artifact, whole.
//!   The new tree is written beside the destination, flushed, then swapped in
//!   with one `renameat2(RENAME_EXCHANGE)`, so a reader sees the old content or
//!   the new, never a mix; the old tree is removed afterwards.
//! - `mode = "merge"` writes the artifact's files into the destination and
//!   leaves every other file there alone. Each file that is missing or differs
//!   is written beside its place and renamed onto it, so a reader sees a file's
//!   old content or its new, never half of it.
//!
//! The artifact comes from a sandboxed step, so its names are the guest's: the
//! tree format already refuses `/`, `.`, `..` and NUL in a name. What is at the
//! destination is walked by directory descriptor and never followed through a
//! symbolic link: a link where the artifact has a directory (or the destination
//! itself being a link) fails the transfer, and a link where it has a file is
//! replaced, never written through. So a merge writes only below its
//! destination, as a replace does.

use std::ffi::{CStr, CString};
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::rc::Rc;

use crate::definition::TransferMode;
use crate::store::artifacts::{ArtifactStore, EntryKind, FileStat, shown};
use crate::store::walk::{self, Dir, Kind};

#[derive(Debug, thiserror::Error)]
pub enum TransferError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Artifact(#[from] crate::store::artifacts::ArtifactError),
    /// A merge met something at a path that it would have to remove.
    #[error("{}: {what}; a merge removes nothing that is there", shown(path))]
    Conflict { path: PathBuf, what: &'static str },
}

/// Publishes artifact `digest` at `dest` (a directory), as `mode` says.
pub fn publish(
    artifacts: &ArtifactStore,
    digest: &str,
    dest: &Path,
    mode: TransferMode,
) -> Result<(), TransferError> {
    match mode {
        TransferMode::Replace => replace(artifacts, digest, dest),
        TransferMode::Merge => merge(artifacts, digest, dest),
    }
}

/// Makes `dest` the artifact `digest`, whole.
fn replace(artifacts: &ArtifactStore, digest: &str, dest: &Path) -> Result<(), TransferError> {
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
    remove_stale_staging(dest);
    let staging = parent.join(staging_name(&name));
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

/// A new staging name for `<name>`, unique in this process.
fn staging_name(name: &str) -> String {
    static SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let seq = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    format!("{}{}-{seq}", staging_prefix(name), std::process::id())
}

/// A merge's staging copies are `.millrace-merge-<pid>-<seq>`, whatever the
/// file's name: short, so that a file whose name is near the 255-byte limit
/// still has one.
const MERGE_STAGING: &str = ".millrace-merge-";

fn merge_staging_name() -> String {
    static SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let seq = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    format!("{MERGE_STAGING}{}-{seq}", std::process::id())
}

/// The process that wrote the merge's staging copy `entry`, if that is what it is.
fn staging_pid(entry: &str) -> Option<i32> {
    let (pid, seq) = entry.strip_prefix(MERGE_STAGING)?.split_once('-')?;
    seq.parse::<u64>().ok()?;
    pid.parse().ok()
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

/// Writes the files of artifact `digest` into `dest`, each replaced only if it
/// differs, and removes nothing but what killed merges left (their staging
/// copies). Directories are walked by descriptor; see the module comment for
/// what is refused.
fn merge(artifacts: &ArtifactStore, digest: &str, dest: &Path) -> Result<(), TransferError> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| TransferError::Io { path, source }
    };
    // The way to the destination is the user's (a datastore may be a link to
    // another disk): created and followed as a replace does. The destination
    // itself is not followed.
    let parent = dest.parent().ok_or_else(|| TransferError::Io {
        path: dest.to_path_buf(),
        source: io::Error::other("no parent directory"),
    })?;
    std::fs::create_dir_all(parent).map_err(io(parent))?;
    match std::fs::create_dir(dest) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(io(dest)(e)),
    }
    // (`O_NOFOLLOW | O_DIRECTORY` on a link says ENOTDIR: ask first, to say so.)
    if std::fs::symlink_metadata(dest).is_ok_and(|m| m.file_type().is_symlink()) {
        return Err(TransferError::Conflict {
            path: dest.to_path_buf(),
            what: "the destination is a symbolic link",
        });
    }
    let root =
        Dir::open(dest).map_err(|e| refused(dest, e, "the destination is not a directory"))?;
    // (directory, its path, the tree to write into it)
    let mut todo: Vec<(Rc<Dir>, PathBuf, String)> =
        vec![(Rc::new(root), dest.to_path_buf(), digest.to_string())];
    let mut written = Vec::new();
    while let Some((dir, path, tree)) = todo.pop() {
        let entries = artifacts.read_tree(&tree)?;
        remove_stale_copies(&dir, &entries);
        let mut changed = false;
        for e in entries {
            let target = path.join(&e.name);
            let name = walk::cstr(std::ffi::OsStr::new(&e.name)).map_err(io(&target))?;
            let there = match dir.lstat(&name) {
                Ok(st) => Some(walk::kind_of(st.st_mode)),
                Err(err) if err.kind() == io::ErrorKind::NotFound => None,
                Err(err) => return Err(io(&target)(err)),
            };
            match e.kind {
                EntryKind::Dir => {
                    match there {
                        None => dir.mkdir(&name, 0o755).map_err(io(&target))?,
                        Some(Kind::Dir) => {}
                        Some(Kind::Symlink) => {
                            return Err(TransferError::Conflict {
                                path: target,
                                what: "a symbolic link is where the artifact has a directory",
                            });
                        }
                        Some(_) => {
                            return Err(TransferError::Conflict {
                                path: target,
                                what: "a file is where the artifact has a directory",
                            });
                        }
                    }
                    let sub = dir
                        .open_dir(&name)
                        .map_err(|err| refused(&target, err, "not a directory"))?;
                    todo.push((Rc::new(sub), target, e.digest));
                }
                EntryKind::File => {
                    if there == Some(Kind::Dir) {
                        return Err(TransferError::Conflict {
                            path: target,
                            what: "a directory is where the artifact has a file",
                        });
                    }
                    if there == Some(Kind::File) && holds_file(&dir, &name, e.size, &e.digest) {
                        continue;
                    }
                    write_file(artifacts, &dir, &name, &e.digest, &target)?;
                    changed = true;
                }
            }
        }
        if changed {
            written.push(path);
        }
    }
    // The renames made durable: each directory written in, once.
    for path in written {
        if let Ok(d) = std::fs::File::open(&path) {
            let _ = d.sync_all();
        }
    }
    Ok(())
}

/// An open that failed on a link (or a non-directory) where a directory must be.
fn refused(path: &Path, e: io::Error, what: &'static str) -> TransferError {
    match e.raw_os_error() {
        Some(libc::ELOOP) => TransferError::Conflict {
            path: path.to_path_buf(),
            what: "a symbolic link is where the artifact has a directory",
        },
        Some(libc::ENOTDIR) => TransferError::Conflict {
            path: path.to_path_buf(),
            what,
        },
        _ => TransferError::Io {
            path: path.to_path_buf(),
            source: e,
        },
    }
}

/// Removes, in a directory a merge writes into, the staging copies of processes
/// that no longer exist, but never a file the artifact itself holds there (a
/// guest may name a file like a staging copy).
fn remove_stale_copies(dir: &Dir, entries: &[crate::store::artifacts::Entry]) {
    let Ok(there) = dir.entries() else {
        return;
    };
    for e in there {
        let Some(name) = e.name.to_str().ok() else {
            continue;
        };
        let Some(pid) = staging_pid(name) else {
            continue;
        };
        if e.kind == Kind::File
            && pid != std::process::id() as i32
            && !process_exists(pid)
            && !entries.iter().any(|a| a.name == name)
        {
            let _ = dir.unlink(&e.name);
        }
    }
}

/// Whether the regular file `name` in `dir` holds the blob `digest` of `size` bytes.
fn holds_file(dir: &Dir, name: &CStr, size: u64, digest: &str) -> bool {
    let Ok(f) = dir.open_file(name) else {
        return false;
    };
    match f.metadata() {
        Ok(m) if m.is_file() && m.len() == size => {}
        _ => return false,
    }
    let mut h = blake3::Hasher::new();
    h.update_reader(io::BufReader::with_capacity(1 << 16, f))
        .is_ok_and(|h| h.finalize().to_hex().as_str() == digest)
}

/// Writes blob `digest` as `name` in `dir`: into a staging copy beside it,
/// flushed, then renamed onto the name (which replaces a file or a link there,
/// and never follows one).
fn write_file(
    artifacts: &ArtifactStore,
    dir: &Dir,
    name: &CStr,
    digest: &str,
    target: &Path,
) -> Result<(), TransferError> {
    let staging = CString::new(merge_staging_name()).map_err(|e| TransferError::Io {
        path: target.to_path_buf(),
        source: io::Error::other(e),
    })?;
    let written = (|| -> io::Result<()> {
        let blob = artifacts.blob_path(digest);
        let mut src = std::fs::File::open(&blob)?;
        let mut f = match dir.create_new(&staging, 0o644) {
            // No copy of this process has the name: a process that had our pid
            // before left it. Replaced, as a replace's staging tree is.
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                dir.unlink(&staging)?;
                dir.create_new(&staging, 0o644)?
            }
            other => other?,
        };
        io::copy(&mut src, &mut f)?;
        f.sync_all()?;
        dir.rename(&staging, dir, name)
    })();
    if let Err(source) = written {
        let _ = dir.unlink(&staging);
        return Err(TransferError::Io {
            path: target.to_path_buf(),
            source,
        });
    }
    Ok(())
}

/// Whether `dest` still holds every file of artifact `digest` as the artifact
/// has it (what a merge wrote; other files may be there too). `known` vouches
/// for a file's digest by its stat data; the files hashed to find out are
/// returned, for the stat cache. `Err` says what is missing or differs.
pub fn merged(
    artifacts: &ArtifactStore,
    digest: &str,
    dest: &Path,
    known: &dyn Fn(&Path, &FileStat) -> Option<String>,
) -> Result<Vec<(PathBuf, FileStat, String)>, String> {
    let root = Dir::open(dest).map_err(|e| format!("{}: {e}", shown(dest)))?;
    let mut todo = vec![(root, dest.to_path_buf(), digest.to_string())];
    let mut hashed = Vec::new();
    while let Some((dir, path, tree)) = todo.pop() {
        let entries = artifacts.read_tree(&tree).map_err(|e| e.to_string())?;
        for e in entries {
            let target = path.join(&e.name);
            let gone = |why: &dyn std::fmt::Display| format!("{}: {why}", shown(&target));
            let name = walk::cstr(std::ffi::OsStr::new(&e.name)).map_err(|e| gone(&e))?;
            match e.kind {
                EntryKind::Dir => {
                    let sub = dir.open_dir(&name).map_err(|e| gone(&e))?;
                    todo.push((sub, target, e.digest));
                }
                EntryKind::File => {
                    let f = dir.open_file(&name).map_err(|e| gone(&e))?;
                    let m = f.metadata().map_err(|e| gone(&e))?;
                    if !m.is_file() || m.len() != e.size {
                        return Err(gone(&"changed"));
                    }
                    let stat = FileStat::of(&m);
                    if known(&target, &stat).as_deref() == Some(e.digest.as_str()) {
                        continue;
                    }
                    let mut h = blake3::Hasher::new();
                    h.update_reader(io::BufReader::with_capacity(1 << 16, f))
                        .map_err(|e| gone(&e))?;
                    if h.finalize().to_hex().as_str() != e.digest {
                        return Err(gone(&"changed"));
                    }
                    hashed.push((target, stat, e.digest));
                }
            }
        }
    }
    Ok(hashed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::artifacts::Mode;

    #[test]
    fn staging_copies_are_named_by_their_process() {
        assert_eq!(staging_pid(".millrace-merge-42-7"), Some(42));
        assert_eq!(
            staging_pid(&merge_staging_name()),
            Some(std::process::id() as i32)
        );
        assert_eq!(staging_pid("millrace-merge-42-7"), None);
        assert_eq!(staging_pid(".millrace-merge-42"), None);
        assert_eq!(staging_pid(".a.csv.millrace-42-7"), None);
    }

    #[test]
    fn a_merge_removes_only_the_staging_copies_of_dead_processes() {
        let tmp = tempfile::tempdir().unwrap();
        let store = ArtifactStore::open(&tmp.path().join("objects")).unwrap();
        let src = tmp.path().join("src");
        std::fs::create_dir_all(&src).unwrap();
        std::fs::write(src.join("a.csv"), "a\n").unwrap();
        // A guest may name a file like a staging copy: it is the artifact's.
        let named_like = ".millrace-merge-999999999-0";
        std::fs::write(src.join(named_like), "b\n").unwrap();
        // A name at the 255-byte limit still gets a staging copy.
        let long = "l".repeat(255);
        std::fs::write(src.join(&long), "l\n").unwrap();
        let digest = store
            .ingest_dir(&src, Mode::Copy, &|_, _| None)
            .unwrap()
            .digest;
        let dest = tmp.path().join("dest");
        std::fs::create_dir_all(&dest).unwrap();
        // What a killed merge left (no process has that pid), and one of ours.
        let stale = ".millrace-merge-999999998-3";
        std::fs::write(dest.join(stale), "half").unwrap();
        let live = format!(".millrace-merge-{}-999999", std::process::id());
        std::fs::write(dest.join(&live), "in progress").unwrap();
        publish(&store, &digest, &dest, TransferMode::Merge).unwrap();
        let mut names: Vec<String> = std::fs::read_dir(&dest)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        let mut expected = [live.as_str(), named_like, "a.csv", long.as_str()];
        expected.sort();
        assert_eq!(names, expected);
        assert!(merged(&store, &digest, &dest, &|_, _| None).is_ok());
        std::fs::write(dest.join("a.csv"), "b\n").unwrap();
        assert!(merged(&store, &digest, &dest, &|_, _| None).is_err());
    }

    #[test]
    fn a_merge_removes_nothing_in_the_way_of_the_artifact() {
        let tmp = tempfile::tempdir().unwrap();
        let store = ArtifactStore::open(&tmp.path().join("objects")).unwrap();
        let src = tmp.path().join("src");
        std::fs::create_dir_all(src.join("sub")).unwrap();
        std::fs::write(src.join("sub/c.csv"), "c\n").unwrap();
        std::fs::write(src.join("a.csv"), "a\n").unwrap();
        let digest = store
            .ingest_dir(&src, Mode::Copy, &|_, _| None)
            .unwrap()
            .digest;
        let conflict = |dest: &Path| match publish(&store, &digest, dest, TransferMode::Merge) {
            Err(TransferError::Conflict { what, .. }) => what,
            other => panic!("{other:?}"),
        };
        // A file where the artifact has a directory.
        let dest = tmp.path().join("d1");
        std::fs::create_dir_all(&dest).unwrap();
        std::fs::write(dest.join("sub"), "mine").unwrap();
        assert_eq!(
            conflict(&dest),
            "a file is where the artifact has a directory"
        );
        assert_eq!(std::fs::read_to_string(dest.join("sub")).unwrap(), "mine");
        // A directory where it has a file.
        let dest = tmp.path().join("d2");
        std::fs::create_dir_all(dest.join("a.csv/inner")).unwrap();
        assert_eq!(
            conflict(&dest),
            "a directory is where the artifact has a file"
        );
        assert!(dest.join("a.csv/inner").is_dir());
        // A file where the destination should be.
        let dest = tmp.path().join("d3");
        std::fs::write(&dest, "mine").unwrap();
        assert_eq!(conflict(&dest), "the destination is not a directory");
    }
}
