//! The artifact store: content-addressed with BLAKE3. A file is a blob; a directory
//! is a tree (a Merkle node listing its entries with their digests); an artifact is
//! the digest of its root tree.
//!
//! Layout under `<state>/objects/`: `blobs/ab/cdef…` (read-only files),
//! `trees/ab/cdef…` (tree text), `tmp/` (staging). Everything enters by rename from
//! `tmp/` or from a step's output directory on the same filesystem, so a reader never
//! sees half an object; a crash leaves at most unreferenced files that `gc` removes.

use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum ArtifactError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("{0}: symbolic links cannot be part of an artifact")]
    Symlink(PathBuf),
    #[error("{0}: only regular files and directories can be part of an artifact")]
    Special(PathBuf),
    #[error("{0}: file names in artifacts must be UTF-8 without newlines")]
    BadName(PathBuf),
    #[error("artifact {digest} is damaged: {detail}")]
    Damaged { digest: String, detail: String },
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> ArtifactError + '_ {
    move |source| ArtifactError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// One entry of a tree.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub name: String,
    pub kind: EntryKind,
    /// Blob digest for files, tree digest for directories.
    pub digest: String,
    /// File size in bytes; for a directory, the total size below it.
    pub size: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EntryKind {
    File,
    Dir,
}

/// What ingesting a directory produced.
#[derive(Debug, Clone)]
pub struct Ingested {
    pub digest: String,
    pub size: u64,
    pub files: u64,
    /// Files whose digest is now known by stat (blobs written or confirmed, and
    /// the sources of copies), for the stat cache.
    pub known: Vec<(PathBuf, FileStat, String)>,
}

/// The stat data that lets a file skip re-hashing while it is unchanged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileStat {
    pub size: u64,
    pub mtime_ns: i64,
    pub ino: u64,
}

impl FileStat {
    pub fn of(m: &fs::Metadata) -> FileStat {
        FileStat {
            size: m.len(),
            mtime_ns: m.mtime() * 1_000_000_000 + m.mtime_nsec(),
            ino: m.ino(),
        }
    }
}

/// How the bytes of an ingested file reach the store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Rename the file into the store (a step's output: it is ours to take).
    Move,
    /// Copy, leaving the source alone (a user's dataset).
    Copy,
    /// Only compute the digest (trees are written, blobs are not).
    Hash,
}

#[derive(Debug, Clone)]
pub struct ArtifactStore {
    root: PathBuf,
}

impl ArtifactStore {
    pub fn open(root: &Path) -> Result<ArtifactStore, ArtifactError> {
        for d in ["blobs", "trees", "tmp"] {
            let p = root.join(d);
            fs::create_dir_all(&p).map_err(io_err(&p))?;
        }
        Ok(ArtifactStore {
            root: root.to_path_buf(),
        })
    }

    pub fn blob_path(&self, digest: &str) -> PathBuf {
        self.root
            .join("blobs")
            .join(&digest[..2])
            .join(&digest[2..])
    }

    fn tree_path(&self, digest: &str) -> PathBuf {
        self.root
            .join("trees")
            .join(&digest[..2])
            .join(&digest[2..])
    }

    /// Hashes `dir` and everything below it into the store. `known` answers "is this
    /// file (by stat) known to have this digest", so unchanged files are not re-read.
    pub fn ingest_dir(
        &self,
        dir: &Path,
        mode: Mode,
        known: &dyn Fn(&Path, &FileStat) -> Option<String>,
    ) -> Result<Ingested, ArtifactError> {
        let mut out = Ingested {
            digest: String::new(),
            size: 0,
            files: 0,
            known: Vec::new(),
        };
        let (digest, size) = self.ingest_tree(dir, mode, known, &mut out)?;
        out.digest = digest;
        out.size = size;
        Ok(out)
    }

    /// A single file becomes a tree with one entry, so a step always sees a
    /// directory at `/in/<name>/` holding `<file name>`.
    pub fn ingest_file(
        &self,
        file: &Path,
        mode: Mode,
        known: &dyn Fn(&Path, &FileStat) -> Option<String>,
    ) -> Result<Ingested, ArtifactError> {
        let name = entry_name(file)?;
        let meta = fs::metadata(file).map_err(io_err(file))?;
        let stat = FileStat::of(&meta);
        let mut out = Ingested {
            digest: String::new(),
            size: stat.size,
            files: 1,
            known: Vec::new(),
        };
        let digest = self.ingest_blob(file, &stat, mode, known, &mut out)?;
        let entries = vec![Entry {
            name,
            kind: EntryKind::File,
            digest,
            size: stat.size,
        }];
        out.digest = self.write_tree(&entries)?;
        Ok(out)
    }

    fn ingest_tree(
        &self,
        dir: &Path,
        mode: Mode,
        known: &dyn Fn(&Path, &FileStat) -> Option<String>,
        out: &mut Ingested,
    ) -> Result<(String, u64), ArtifactError> {
        let mut entries = Vec::new();
        for e in fs::read_dir(dir).map_err(io_err(dir))? {
            let e = e.map_err(io_err(dir))?;
            let path = e.path();
            let name = entry_name(&path)?;
            let ft = e.file_type().map_err(io_err(&path))?;
            if ft.is_symlink() {
                return Err(ArtifactError::Symlink(path));
            } else if ft.is_dir() {
                let (digest, size) = self.ingest_tree(&path, mode, known, out)?;
                entries.push(Entry {
                    name,
                    kind: EntryKind::Dir,
                    digest,
                    size,
                });
            } else if ft.is_file() {
                let meta = e.metadata().map_err(io_err(&path))?;
                let stat = FileStat::of(&meta);
                let digest = self.ingest_blob(&path, &stat, mode, known, out)?;
                out.files += 1;
                entries.push(Entry {
                    name,
                    kind: EntryKind::File,
                    digest,
                    size: stat.size,
                });
            } else {
                return Err(ArtifactError::Special(path));
            }
        }
        entries.sort_by(|a, b| a.name.cmp(&b.name));
        let size = entries.iter().map(|e| e.size).sum();
        Ok((self.write_tree(&entries)?, size))
    }

    fn ingest_blob(
        &self,
        path: &Path,
        stat: &FileStat,
        mode: Mode,
        known: &dyn Fn(&Path, &FileStat) -> Option<String>,
        out: &mut Ingested,
    ) -> Result<String, ArtifactError> {
        // Only what was hashed now goes back to the stat cache.
        let (digest, source_known) = match known(path, stat) {
            Some(d) => (d, true),
            None => (hash_file(path)?, false),
        };
        let dest = self.blob_path(&digest);
        if !source_known && mode != Mode::Move {
            out.known.push((path.to_path_buf(), *stat, digest.clone()));
        }
        if mode == Mode::Hash {
            return Ok(digest);
        }
        if let Ok(m) = fs::symlink_metadata(&dest) {
            // The blob is there: keep it if it is intact (by stat, else by content).
            let blob_stat = FileStat::of(&m);
            let blob_known = known(&dest, &blob_stat).as_deref() == Some(digest.as_str());
            let intact = m.len() == stat.size && (blob_known || hash_file(&dest)? == digest);
            if intact {
                if mode == Mode::Move {
                    fs::remove_file(path).map_err(io_err(path))?;
                }
                if !blob_known {
                    out.known.push((dest, blob_stat, digest.clone()));
                }
                return Ok(digest);
            }
            // A damaged blob is replaced by the good bytes we hold.
            remove_readonly(&dest)?;
        }
        let parent = dest.parent().expect("blob paths have a parent");
        fs::create_dir_all(parent).map_err(io_err(parent))?;
        match mode {
            Mode::Hash => unreachable!("returned above"),
            Mode::Move => {
                fs::set_permissions(path, fs::Permissions::from_mode(0o444))
                    .map_err(io_err(path))?;
                fs::rename(path, &dest).map_err(io_err(&dest))?;
            }
            Mode::Copy => {
                let tmp = self.tmp_path();
                fs::copy(path, &tmp).map_err(io_err(path))?;
                // The copy must hold what we hashed: the source may change under us.
                let copied = hash_file(&tmp)?;
                if copied != digest {
                    let _ = fs::remove_file(&tmp);
                    return Err(ArtifactError::Io {
                        path: path.to_path_buf(),
                        source: io::Error::other(
                            "the file changed while it was being read; try again",
                        ),
                    });
                }
                fs::set_permissions(&tmp, fs::Permissions::from_mode(0o444))
                    .map_err(io_err(&tmp))?;
                fs::rename(&tmp, &dest).map_err(io_err(&dest))?;
            }
        }
        let m = fs::metadata(&dest).map_err(io_err(&dest))?;
        out.known.push((dest, FileStat::of(&m), digest.clone()));
        Ok(digest)
    }

    fn tmp_path(&self) -> PathBuf {
        use std::sync::atomic::{AtomicU64, Ordering};
        static N: AtomicU64 = AtomicU64::new(0);
        self.root.join("tmp").join(format!(
            "{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ))
    }

    fn write_tree(&self, entries: &[Entry]) -> Result<String, ArtifactError> {
        let text = tree_text(entries);
        let digest = blake3::hash(text.as_bytes()).to_hex().to_string();
        let dest = self.tree_path(&digest);
        // Trees are small: an existing one is re-checked, and a damaged one replaced.
        if fs::read(&dest).is_ok_and(|b| blake3::hash(&b).to_hex().as_str() == digest) {
            return Ok(digest);
        }
        let parent = dest.parent().expect("tree paths have a parent");
        fs::create_dir_all(parent).map_err(io_err(parent))?;
        let tmp = self.tmp_path();
        let mut f = fs::File::create(&tmp).map_err(io_err(&tmp))?;
        f.write_all(text.as_bytes()).map_err(io_err(&tmp))?;
        drop(f);
        fs::rename(&tmp, &dest).map_err(io_err(&dest))?;
        Ok(digest)
    }

    /// Reads a tree and checks it hashes to its name.
    pub fn read_tree(&self, digest: &str) -> Result<Vec<Entry>, ArtifactError> {
        let path = self.tree_path(digest);
        let text = fs::read_to_string(&path).map_err(|e| ArtifactError::Damaged {
            digest: digest.to_string(),
            detail: format!("tree {}: {e}", path.display()),
        })?;
        if blake3::hash(text.as_bytes()).to_hex().as_str() != digest {
            return Err(ArtifactError::Damaged {
                digest: digest.into(),
                detail: "a tree does not match its digest".into(),
            });
        }
        parse_tree(&text).ok_or_else(|| ArtifactError::Damaged {
            digest: digest.into(),
            detail: "unreadable tree".into(),
        })
    }

    /// Checks every blob of an artifact exists with its size, and that its content
    /// matches its digest unless `known` vouches for the stat data. A damaged blob is
    /// removed so the next ingest writes it again. Returns the blobs checked.
    pub fn verify(
        &self,
        digest: &str,
        known: &dyn Fn(&Path, &FileStat) -> Option<String>,
    ) -> Result<Vec<(PathBuf, FileStat, String)>, ArtifactError> {
        let mut checked = Vec::new();
        self.verify_tree(digest, known, &mut checked)?;
        Ok(checked)
    }

    fn verify_tree(
        &self,
        digest: &str,
        known: &dyn Fn(&Path, &FileStat) -> Option<String>,
        checked: &mut Vec<(PathBuf, FileStat, String)>,
    ) -> Result<(), ArtifactError> {
        for e in self.read_tree(digest)? {
            match e.kind {
                EntryKind::Dir => self.verify_tree(&e.digest, known, checked)?,
                EntryKind::File => {
                    let path = self.blob_path(&e.digest);
                    let damaged = |detail: String| ArtifactError::Damaged {
                        digest: digest.to_string(),
                        detail,
                    };
                    let meta = fs::symlink_metadata(&path).map_err(|err| {
                        damaged(format!("file `{}` ({}): {err}", e.name, path.display()))
                    })?;
                    let stat = FileStat::of(&meta);
                    if stat.size != e.size {
                        remove_readonly(&path)?;
                        return Err(damaged(format!(
                            "file `{}` has {} bytes, expected {}",
                            e.name, stat.size, e.size
                        )));
                    }
                    if known(&path, &stat).as_deref() != Some(e.digest.as_str()) {
                        if hash_file(&path)? != e.digest {
                            remove_readonly(&path)?;
                            return Err(damaged(format!(
                                "file `{}` does not match its digest",
                                e.name
                            )));
                        }
                        checked.push((path, stat, e.digest.clone()));
                    }
                }
            }
        }
        Ok(())
    }

    /// Recreates an artifact at `dest` (which must not exist) with hard links to the
    /// read-only blobs, copying only where linking is impossible.
    pub fn materialise(&self, digest: &str, dest: &Path) -> Result<(), ArtifactError> {
        fs::create_dir_all(dest).map_err(io_err(dest))?;
        for e in self.read_tree(digest)? {
            let target = dest.join(&e.name);
            match e.kind {
                EntryKind::Dir => self.materialise(&e.digest, &target)?,
                EntryKind::File => {
                    let blob = self.blob_path(&e.digest);
                    if fs::hard_link(&blob, &target).is_err() {
                        fs::copy(&blob, &target).map_err(io_err(&target))?;
                    }
                }
            }
        }
        Ok(())
    }

    /// Copies an artifact to `dest` as ordinary writable files (for `output -o`).
    pub fn export(&self, digest: &str, dest: &Path) -> Result<(), ArtifactError> {
        fs::create_dir_all(dest).map_err(io_err(dest))?;
        for e in self.read_tree(digest)? {
            let target = dest.join(&e.name);
            match e.kind {
                EntryKind::Dir => self.export(&e.digest, &target)?,
                EntryKind::File => {
                    fs::copy(self.blob_path(&e.digest), &target).map_err(io_err(&target))?;
                    fs::set_permissions(&target, fs::Permissions::from_mode(0o644))
                        .map_err(io_err(&target))?;
                }
            }
        }
        Ok(())
    }

    /// Every blob and tree digest an artifact reaches (for `gc`).
    pub fn reachable(
        &self,
        digest: &str,
        blobs: &mut std::collections::HashSet<String>,
        trees: &mut std::collections::HashSet<String>,
    ) {
        if !trees.insert(digest.to_string()) {
            return;
        }
        if let Ok(entries) = self.read_tree(digest) {
            for e in entries {
                match e.kind {
                    EntryKind::Dir => self.reachable(&e.digest, blobs, trees),
                    EntryKind::File => {
                        blobs.insert(e.digest);
                    }
                }
            }
        }
    }

    /// Removes every blob and tree not in the keep sets; returns (files, bytes) freed.
    pub fn sweep(
        &self,
        blobs: &std::collections::HashSet<String>,
        trees: &std::collections::HashSet<String>,
    ) -> Result<(u64, u64), ArtifactError> {
        let mut freed = (0, 0);
        for (kind, keep) in [("blobs", blobs), ("trees", trees)] {
            let dir = self.root.join(kind);
            for shard in fs::read_dir(&dir).map_err(io_err(&dir))? {
                let shard = shard.map_err(io_err(&dir))?.path();
                let prefix = shard
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default();
                for f in fs::read_dir(&shard).map_err(io_err(&shard))? {
                    let f = f.map_err(io_err(&shard))?.path();
                    let digest = format!(
                        "{prefix}{}",
                        f.file_name()
                            .map(|n| n.to_string_lossy())
                            .unwrap_or_default()
                    );
                    if !keep.contains(&digest) {
                        freed.1 += fs::metadata(&f).map(|m| m.len()).unwrap_or(0);
                        remove_readonly(&f)?;
                        freed.0 += 1;
                    }
                }
            }
        }
        Ok(freed)
    }

    /// The file names at the top of an artifact, with kinds and sizes.
    pub fn list(&self, digest: &str) -> Result<Vec<Entry>, ArtifactError> {
        self.read_tree(digest)
    }

    /// Flushes everything written so far to disk (one `syncfs`, not one fsync per file).
    pub fn sync(&self) {
        if let Ok(f) = fs::File::open(&self.root) {
            use std::os::fd::AsRawFd;
            // SAFETY: syncfs only reads the descriptor, which `f` keeps open.
            unsafe {
                libc::syncfs(f.as_raw_fd());
            }
        }
    }
}

fn remove_readonly(path: &Path) -> Result<(), ArtifactError> {
    match fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(ArtifactError::Io {
            path: path.to_path_buf(),
            source: e,
        }),
    }
}

fn entry_name(path: &Path) -> Result<String, ArtifactError> {
    match path.file_name().and_then(|n| n.to_str()) {
        Some(n) if !n.contains('\n') => Ok(n.to_string()),
        _ => Err(ArtifactError::BadName(path.to_path_buf())),
    }
}

/// BLAKE3 of a file's content.
pub fn hash_file(path: &Path) -> Result<String, ArtifactError> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut h = blake3::Hasher::new();
    // Non-blocking: a FIFO put where a file was must fail here, not hang.
    let f = fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
        .map_err(io_err(path))?;
    if !f.metadata().map_err(io_err(path))?.is_file() {
        return Err(ArtifactError::Special(path.to_path_buf()));
    }
    h.update_reader(io::BufReader::with_capacity(1 << 16, f))
        .map_err(io_err(path))?;
    Ok(h.finalize().to_hex().to_string())
}

/// `f <digest> <size> <name>` / `d <digest> <size> <name>`, one line per entry,
/// sorted by name: the canonical text a tree digest is taken over.
fn tree_text(entries: &[Entry]) -> String {
    let mut s = String::from("millrace-tree-v1\n");
    for e in entries {
        let k = match e.kind {
            EntryKind::File => 'f',
            EntryKind::Dir => 'd',
        };
        s += &format!("{k} {} {} {}\n", e.digest, e.size, e.name);
    }
    s
}

fn parse_tree(text: &str) -> Option<Vec<Entry>> {
    let mut lines = text.lines();
    if lines.next()? != "millrace-tree-v1" {
        return None;
    }
    lines
        .map(|l| {
            let mut parts = l.splitn(4, ' ');
            let kind = match parts.next()? {
                "f" => EntryKind::File,
                "d" => EntryKind::Dir,
                _ => return None,
            };
            let digest = parts.next()?.to_string();
            let size = parts.next()?.parse().ok()?;
            let name = parts.next()?.to_string();
            Some(Entry {
                name,
                kind,
                digest,
                size,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn none(_: &Path, _: &FileStat) -> Option<String> {
        None
    }

    #[test]
    fn same_content_same_digest_and_moves_into_store() {
        let tmp = tempfile::tempdir().unwrap();
        let store = ArtifactStore::open(&tmp.path().join("objects")).unwrap();
        for d in ["a", "b"] {
            let dir = tmp.path().join(d);
            fs::create_dir_all(dir.join("sub")).unwrap();
            fs::write(dir.join("x.csv"), "1,2\n").unwrap();
            fs::write(dir.join("sub/y"), "y").unwrap();
        }
        let a = store
            .ingest_dir(&tmp.path().join("a"), Mode::Move, &none)
            .unwrap();
        let b = store
            .ingest_dir(&tmp.path().join("b"), Mode::Copy, &none)
            .unwrap();
        assert_eq!(a.digest, b.digest);
        assert_eq!((a.files, a.size), (2, 5));
        assert!(!tmp.path().join("a/x.csv").exists(), "moved");
        assert!(tmp.path().join("b/x.csv").exists(), "copied");
        store.verify(&a.digest, &none).unwrap();
        let dest = tmp.path().join("m");
        store.materialise(&a.digest, &dest).unwrap();
        assert_eq!(fs::read_to_string(dest.join("sub/y")).unwrap(), "y");
    }

    #[test]
    fn a_damaged_blob_is_detected_and_removed() {
        let tmp = tempfile::tempdir().unwrap();
        let store = ArtifactStore::open(&tmp.path().join("objects")).unwrap();
        let f = tmp.path().join("model.bin");
        fs::write(&f, "weights").unwrap();
        let a = store.ingest_file(&f, Mode::Copy, &none).unwrap();
        let blob = store.blob_path(&hash_file(&f).unwrap());
        fs::set_permissions(&blob, fs::Permissions::from_mode(0o644)).unwrap();
        fs::write(&blob, "WEIGHTS").unwrap();
        let err = store.verify(&a.digest, &none).unwrap_err();
        assert!(
            err.to_string().contains("does not match its digest"),
            "{err}"
        );
        assert!(!blob.exists());
    }
}
