//! The artifact store: content-addressed with BLAKE3. A file is a blob; a directory
//! is a tree (a Merkle node listing its entries with their digests); an artifact is
//! the digest of its root tree.
//!
//! Layout under `<state>/objects/`: `blobs/ab/cdef…` (read-only files),
//! `trees/ab/cdef…` (tree text), `tmp/` (staging). Everything enters by rename from
//! `tmp/` or from a step's output directory on the same filesystem, so a reader never
//! sees half an object; a crash leaves at most unreferenced files that `gc` removes.

use std::ffi::{CStr, CString};
use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use crate::store::walk::{self, Dir, DirEntry, Kind};

mod items;
mod tree;
pub use items::MergeError;
use tree::{entry_name, entry_name_bytes, parse_tree, tree_text};

#[derive(Debug, thiserror::Error)]
pub enum ArtifactError {
    #[error("{}: {source}", shown(path))]
    Io { path: PathBuf, source: io::Error },
    #[error("{}: symbolic links cannot be part of an artifact", shown(.0))]
    Symlink(PathBuf),
    #[error("{}: only regular files and directories can be part of an artifact", shown(.0))]
    Special(PathBuf),
    #[error("{}: file names in artifacts must be UTF-8 without newlines", shown(.0))]
    BadName(PathBuf),
    #[error("{0}")]
    Limit(crate::store::walk::Limit),
    #[error("{}: a file or directory is already there", shown(.0))]
    Exists(PathBuf),
    #[error("artifact {digest} is damaged: {}", escape_controls(detail))]
    Damaged { digest: String, detail: String },
}

/// A path as printed: a guest chooses file names, and a terminal must not take
/// one for an escape sequence.
pub(crate) fn shown(p: &Path) -> String {
    escape_controls(&p.to_string_lossy())
}

/// `s` with its control characters (`\r`, ESC, …) written as Rust escapes, so a
/// file name printed to a terminal or a log shows what it is, and `x\r` is not
/// mistaken for `x`.
pub fn escape_controls(s: &str) -> String {
    // Bidirectional overrides and line separators reorder or break what a
    // terminal shows as surely as an escape sequence.
    let hidden = |c: char| {
        c.is_control()
            || matches!(c, '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}' | '\u{2028}' | '\u{2029}')
    };
    if !s.chars().any(hidden) {
        return s.to_string();
    }
    s.chars()
        .map(|c| {
            if hidden(c) {
                c.escape_default().to_string()
            } else {
                c.to_string()
            }
        })
        .collect()
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
    /// A rewrite that restores the mtime (`touch -r`, `rsync -t`) still moves the
    /// ctime, which no one can set.
    pub ctime_ns: i64,
}

impl FileStat {
    pub fn of(m: &fs::Metadata) -> FileStat {
        FileStat {
            size: m.len(),
            mtime_ns: m.mtime() * 1_000_000_000 + m.mtime_nsec(),
            ino: m.ino(),
            ctime_ns: m.ctime() * 1_000_000_000 + m.ctime_nsec(),
        }
    }

    /// A blob's stat without its ctime: every hard link a materialisation makes (and
    /// removes) moves a blob's ctime, and blobs are read-only files of ours, so their
    /// ctime would only defeat the cache.
    pub fn of_blob(m: &fs::Metadata) -> FileStat {
        FileStat {
            ctime_ns: 0,
            ..FileStat::of(m)
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
    /// What a walk of a guest's output (and a materialised tree's depth) stops at.
    limits: walk::Limits,
}

impl ArtifactStore {
    pub fn open(root: &Path) -> Result<ArtifactStore, ArtifactError> {
        for d in ["blobs", "trees", "tmp"] {
            let p = root.join(d);
            fs::create_dir_all(&p).map_err(io_err(&p))?;
        }
        Ok(ArtifactStore {
            root: root.to_path_buf(),
            limits: walk::Limits::default(),
        })
    }

    /// The same store, walking within `limits`.
    pub fn with_limits(self, limits: walk::Limits) -> ArtifactStore {
        ArtifactStore { limits, ..self }
    }

    pub fn limits(&self) -> walk::Limits {
        self.limits
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
    /// A step's output (`Mode::Move`) is never followed through a symlink at its
    /// root and is bounded by the entry limit; every tree by the depth limit.
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
        let root = if mode == Mode::Move {
            Dir::open(dir)
        } else {
            Dir::open_following(dir)
        }
        .map_err(|e| {
            if e.raw_os_error() == Some(libc::ELOOP) {
                ArtifactError::Symlink(dir.to_path_buf())
            } else {
                io_err(dir)(e)
            }
        })?;
        let entry_limit = if mode == Mode::Move {
            self.limits.entries
        } else {
            // A user's dataset is as large as it is; only what a guest wrote is bounded.
            u64::MAX
        };
        let (digest, size) = self.ingest_tree(
            root,
            dir,
            mode,
            known,
            &mut out,
            self.limits.depth,
            entry_limit,
        )?;
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
        // A user's dataset may be a symlink to its file; a step's output may not.
        let real = if mode == Mode::Move {
            file.to_path_buf()
        } else {
            fs::canonicalize(file).map_err(io_err(file))?
        };
        let parent = match real.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => Path::new("."),
        };
        let dir = Dir::open_following(parent).map_err(io_err(parent))?;
        let cname = real
            .file_name()
            .ok_or_else(|| ArtifactError::BadName(file.to_path_buf()))
            .and_then(|n| walk::cstr(n).map_err(io_err(file)))?;
        let mut out = Ingested {
            digest: String::new(),
            size: 0,
            files: 1,
            known: Vec::new(),
        };
        let (digest, size) = self.ingest_blob(&dir, &cname, file, mode, known, &mut out)?;
        out.size = size;
        let entries = vec![Entry {
            name,
            kind: EntryKind::File,
            digest,
            size,
        }];
        out.digest = self.write_tree(&entries)?;
        Ok(out)
    }

    /// Post-order over the directory tree with the stack on the heap: one frame
    /// (an open directory, what is left of it, what it produced) per level.
    #[allow(clippy::too_many_arguments)]
    fn ingest_tree(
        &self,
        root: Dir,
        root_path: &Path,
        mode: Mode,
        known: &dyn Fn(&Path, &FileStat) -> Option<String>,
        out: &mut Ingested,
        depth_limit: usize,
        entry_limit: u64,
    ) -> Result<(String, u64), ArtifactError> {
        struct Frame {
            dir: Dir,
            path: PathBuf,
            name: String,
            todo: Vec<DirEntry>,
            entries: Vec<Entry>,
        }
        let todo = root.entries().map_err(io_err(root_path))?;
        let mut stack = vec![Frame {
            dir: root,
            path: root_path.to_path_buf(),
            name: String::new(),
            todo,
            entries: Vec::new(),
        }];
        let mut seen = 0u64;
        loop {
            let depth = stack.len();
            let Some(top) = stack.last_mut() else {
                unreachable!("the root frame returns before the stack empties");
            };
            let Some(e) = top.todo.pop() else {
                let Some(done) = stack.pop() else {
                    unreachable!("a frame was just looked at");
                };
                let mut entries = done.entries;
                entries.sort_by(|a, b| a.name.cmp(&b.name));
                let size = entries.iter().map(|e| e.size).sum();
                let digest = self.write_tree(&entries)?;
                match stack.last_mut() {
                    None => return Ok((digest, size)),
                    Some(parent) => parent.entries.push(Entry {
                        name: done.name,
                        kind: EntryKind::Dir,
                        digest,
                        size,
                    }),
                }
                continue;
            };
            seen += 1;
            if seen > entry_limit {
                return Err(ArtifactError::Limit(walk::Limit::Entries(entry_limit)));
            }
            let path = top.path.join(e.name_os());
            let name = entry_name_bytes(e.name.to_bytes(), &path)?;
            match e.kind {
                Kind::Symlink => return Err(ArtifactError::Symlink(path)),
                Kind::Other => return Err(ArtifactError::Special(path)),
                Kind::File => {
                    let (digest, size) =
                        self.ingest_blob(&top.dir, &e.name, &path, mode, known, out)?;
                    out.files += 1;
                    top.entries.push(Entry {
                        name,
                        kind: EntryKind::File,
                        digest,
                        size,
                    });
                }
                Kind::Dir => {
                    if depth > depth_limit {
                        return Err(ArtifactError::Limit(walk::Limit::Depth(depth_limit)));
                    }
                    let sub = top.dir.open_dir(&e.name).map_err(|err| {
                        if err.raw_os_error() == Some(libc::ELOOP) {
                            ArtifactError::Symlink(path.clone())
                        } else {
                            io_err(&path)(err)
                        }
                    })?;
                    let todo = sub.entries().map_err(io_err(&path))?;
                    stack.push(Frame {
                        dir: sub,
                        path,
                        name,
                        todo,
                        entries: Vec::new(),
                    });
                }
            }
        }
    }

    /// One file (`name` in `dir`; `path` names it in messages and the stat cache)
    /// into the store: its digest and size, from one open descriptor, so what is
    /// stat'ed, hashed and moved is the same file.
    fn ingest_blob(
        &self,
        dir: &Dir,
        name: &CStr,
        path: &Path,
        mode: Mode,
        known: &dyn Fn(&Path, &FileStat) -> Option<String>,
        out: &mut Ingested,
    ) -> Result<(String, u64), ArtifactError> {
        let mut file = dir.open_file(name).map_err(|e| {
            if e.raw_os_error() == Some(libc::ELOOP) {
                ArtifactError::Symlink(path.to_path_buf())
            } else {
                io_err(path)(e)
            }
        })?;
        let meta = file.metadata().map_err(io_err(path))?;
        if !meta.is_file() {
            return Err(ArtifactError::Special(path.to_path_buf()));
        }
        let stat = FileStat::of(&meta);
        // Only what was hashed now goes back to the stat cache.
        let (digest, source_known) = match known(path, &stat) {
            Some(d) => (d, true),
            None => (hash_reader(&mut file, path)?, false),
        };
        let dest = self.blob_path(&digest);
        if !source_known && mode != Mode::Move {
            out.known.push((path.to_path_buf(), stat, digest.clone()));
        }
        if mode == Mode::Hash {
            return Ok((digest, stat.size));
        }
        if let Ok(m) = fs::symlink_metadata(&dest) {
            // The blob is there: keep it if it is intact (by stat, else by content).
            let blob_stat = FileStat::of_blob(&m);
            let blob_known = known(&dest, &blob_stat).as_deref() == Some(digest.as_str());
            let intact =
                m.is_file() && m.len() == stat.size && (blob_known || hash_file(&dest)? == digest);
            if intact {
                if mode == Mode::Move {
                    dir.unlink(name).map_err(io_err(path))?;
                }
                if !blob_known {
                    out.known.push((dest, blob_stat, digest.clone()));
                }
                return Ok((digest, stat.size));
            }
            // A damaged blob is replaced by the good bytes we hold.
            remove_readonly(&dest)?;
        }
        let parent = dest.parent().expect("blob paths have a parent");
        fs::create_dir_all(parent).map_err(io_err(parent))?;
        match mode {
            Mode::Hash => unreachable!("returned above"),
            Mode::Move => {
                file.set_permissions(fs::Permissions::from_mode(0o444))
                    .map_err(io_err(path))?;
                dir.rename_out(name, &dest).map_err(io_err(&dest))?;
            }
            Mode::Copy => {
                use std::io::Seek;
                let tmp = self.tmp_path();
                let copied = (|| -> io::Result<()> {
                    file.rewind()?;
                    let mut t = fs::File::create(&tmp)?;
                    io::copy(&mut file, &mut t)?;
                    Ok(())
                })();
                if let Err(e) = copied {
                    let _ = fs::remove_file(&tmp);
                    return Err(io_err(path)(e));
                }
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
        out.known
            .push((dest, FileStat::of_blob(&m), digest.clone()));
        Ok((digest, stat.size))
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

    /// Reads a tree and checks it hashes to its name and is in canonical form.
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
        // Iterative, and each subtree once: a tree shared by many directories is
        // checked once.
        let mut todo = vec![digest.to_string()];
        let mut seen = std::collections::HashSet::new();
        let damaged = |detail: String| ArtifactError::Damaged {
            digest: digest.to_string(),
            detail,
        };
        while let Some(tree) = todo.pop() {
            if !seen.insert(tree.clone()) {
                continue;
            }
            for e in self.read_tree(&tree)? {
                match e.kind {
                    EntryKind::Dir => todo.push(e.digest),
                    EntryKind::File => {
                        let path = self.blob_path(&e.digest);
                        let meta = fs::symlink_metadata(&path).map_err(|err| {
                            damaged(format!("file `{}` ({}): {err}", e.name, path.display()))
                        })?;
                        let stat = FileStat::of_blob(&meta);
                        if stat.size != e.size || !meta.is_file() {
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
        }
        Ok(checked)
    }

    /// Recreates an artifact at `dest` (an empty directory, or nothing) with hard
    /// links to the read-only blobs, copying only where linking is impossible.
    pub fn materialise(&self, digest: &str, dest: &Path) -> Result<(), ArtifactError> {
        self.recreate(digest, dest, true)
    }

    /// Copies an artifact to `dest` as ordinary writable files (for `output -o`).
    pub fn export(&self, digest: &str, dest: &Path) -> Result<(), ArtifactError> {
        self.recreate(digest, dest, false)
    }

    /// Pre-order over the trees, writing through directory descriptors: every
    /// directory and file is created new (`mkdirat`, `O_EXCL`, `linkat`), so nothing
    /// is ever written onto an existing path, least of all onto a hard link to a
    /// blob. Pending directories hold their parent's descriptor, so at most one
    /// descriptor per level is open.
    fn recreate(&self, digest: &str, dest: &Path, link: bool) -> Result<(), ArtifactError> {
        use std::rc::Rc;
        fs::create_dir_all(dest).map_err(io_err(dest))?;
        // The root is the host's choice (a sandbox mount, `output -o DIR`): followed.
        let root = Rc::new(Dir::open_following(dest).map_err(io_err(dest))?);
        let depth_limit = self.limits.depth;
        let (file_mode, dir_mode) = if link { (0o444, 0o755) } else { (0o644, 0o755) };
        let exists = |path: &Path, e: io::Error| {
            if e.kind() == io::ErrorKind::AlreadyExists {
                ArtifactError::Exists(path.to_path_buf())
            } else {
                io_err(path)(e)
            }
        };
        // (parent, name to create in it (none for the root), path, tree, depth)
        type Pending = (Rc<Dir>, Option<CString>, PathBuf, String, usize);
        let mut todo: Vec<Pending> = vec![(root, None, dest.to_path_buf(), digest.into(), 0)];
        while let Some((parent, name, path, tree, depth)) = todo.pop() {
            let dir = match name {
                None => parent,
                Some(n) => {
                    parent.mkdir(&n, dir_mode).map_err(|e| exists(&path, e))?;
                    Rc::new(parent.open_dir(&n).map_err(io_err(&path))?)
                }
            };
            for e in self.read_tree(&tree)? {
                let target = path.join(&e.name);
                let cname = walk::cstr(std::ffi::OsStr::new(&e.name)).map_err(io_err(&target))?;
                match e.kind {
                    EntryKind::Dir => {
                        if depth + 1 > depth_limit {
                            return Err(ArtifactError::Limit(walk::Limit::Depth(depth_limit)));
                        }
                        todo.push((dir.clone(), Some(cname), target, e.digest, depth + 1));
                    }
                    EntryKind::File => {
                        let blob = self.blob_path(&e.digest);
                        if link {
                            match dir.link_in(&blob, &cname) {
                                Ok(()) => continue,
                                Err(err) if err.kind() == io::ErrorKind::AlreadyExists => {
                                    return Err(ArtifactError::Exists(target));
                                }
                                // Another filesystem, or links refused: copy.
                                Err(_) => {}
                            }
                        }
                        let mut src = fs::File::open(&blob).map_err(io_err(&blob))?;
                        let mut f = dir
                            .create_new(&cname, file_mode)
                            .map_err(|err| exists(&target, err))?;
                        io::copy(&mut src, &mut f).map_err(io_err(&target))?;
                    }
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
        let mut todo = vec![digest.to_string()];
        while let Some(tree) = todo.pop() {
            if !trees.insert(tree.clone()) {
                continue;
            }
            if let Ok(entries) = self.read_tree(&tree) {
                for e in entries {
                    match e.kind {
                        EntryKind::Dir => todo.push(e.digest),
                        EntryKind::File => {
                            blobs.insert(e.digest);
                        }
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

/// BLAKE3 of an open file's content, from its start.
fn hash_reader(f: &mut fs::File, path: &Path) -> Result<String, ArtifactError> {
    use std::io::Seek;
    let mut h = blake3::Hasher::new();
    f.rewind().map_err(io_err(path))?;
    h.update_reader(io::BufReader::with_capacity(1 << 16, &mut *f))
        .map_err(io_err(path))?;
    Ok(h.finalize().to_hex().to_string())
}

#[cfg(test)]
mod tests;
