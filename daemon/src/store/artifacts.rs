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
fn shown(p: &Path) -> String {
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
            walk::max_entries()
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
            walk::max_depth(),
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
        let depth_limit = walk::max_depth();
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

fn entry_name(path: &Path) -> Result<String, ArtifactError> {
    use std::os::unix::ffi::OsStrExt;
    match path.file_name() {
        Some(n) => entry_name_bytes(n.as_bytes(), path),
        None => Err(ArtifactError::BadName(path.to_path_buf())),
    }
}

/// A name a tree can hold exactly: UTF-8 without a newline (the line separator of
/// the tree text). Every other character, `\r` and other control characters
/// included, is kept as it is, so two different names never become one.
fn entry_name_bytes(name: &[u8], path: &Path) -> Result<String, ArtifactError> {
    match std::str::from_utf8(name) {
        Ok(n) if valid_name(n) => Ok(n.to_string()),
        _ => Err(ArtifactError::BadName(path.to_path_buf())),
    }
}

fn valid_name(n: &str) -> bool {
    !n.is_empty() && n != "." && n != ".." && !n.contains(['/', '\0', '\n'])
}

fn valid_digest(d: &str) -> bool {
    d.len() == 64 && d.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
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

/// The entries of a tree text, or `None` unless the text is exactly what
/// [`tree_text`] writes for them: lines split on `\n` only (a `\r` is part of a
/// name), names valid, unique and sorted, digests of 64 hex digits. So a parsed
/// tree can never hold two entries for one path, nor a path outside it.
fn parse_tree(text: &str) -> Option<Vec<Entry>> {
    let body = text.strip_prefix("millrace-tree-v1\n")?;
    let mut entries: Vec<Entry> = Vec::new();
    for l in body.split_terminator('\n') {
        let mut parts = l.splitn(4, ' ');
        let kind = match parts.next()? {
            "f" => EntryKind::File,
            "d" => EntryKind::Dir,
            _ => return None,
        };
        let digest = parts.next()?.to_string();
        let size = parts.next()?.parse().ok()?;
        let name = parts.next()?.to_string();
        if !valid_digest(&digest) || !valid_name(&name) {
            return None;
        }
        if entries.last().is_some_and(|prev| prev.name >= name) {
            return None;
        }
        entries.push(Entry {
            name,
            kind,
            digest,
            size,
        });
    }
    // Canonical: no missing final newline, no `+1` or `01` sizes.
    (tree_text(&entries) == text).then_some(entries)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn printed_text_cannot_move_the_cursor_or_reorder_itself() {
        assert_eq!(escape_controls("plain é"), "plain é");
        assert_eq!(escape_controls("x\r"), "x\\r");
        assert_eq!(escape_controls("\u{1b}]0;t\u{7}"), "\\u{1b}]0;t\\u{7}");
        assert_eq!(
            escape_controls("a\u{202e}b\u{2028}"),
            "a\\u{202e}b\\u{2028}"
        );
    }

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

    fn rehash_every_blob(objects: &Path) {
        for shard in fs::read_dir(objects.join("blobs")).unwrap() {
            let shard = shard.unwrap().path();
            for f in fs::read_dir(&shard).unwrap() {
                let f = f.unwrap().path();
                let name = format!(
                    "{}{}",
                    shard.file_name().unwrap().to_str().unwrap(),
                    f.file_name().unwrap().to_str().unwrap()
                );
                assert_eq!(hash_file(&f).unwrap(), name, "blob {} changed", f.display());
            }
        }
    }

    #[test]
    fn names_differing_by_a_carriage_return_stay_two_files() {
        let tmp = tempfile::tempdir().unwrap();
        let objects = tmp.path().join("objects");
        let store = ArtifactStore::open(&objects).unwrap();
        let o = tmp.path().join("o");
        fs::create_dir(&o).unwrap();
        fs::write(o.join("x"), "plain x\n").unwrap();
        fs::write(o.join("x\r"), "attacker's bytes\n").unwrap();
        fs::write(o.join("\x1b[2Jesc"), "escape\n").unwrap();
        let a = store.ingest_dir(&o, Mode::Move, &none).unwrap();
        let names: Vec<String> = store
            .list(&a.digest)
            .unwrap()
            .into_iter()
            .map(|e| e.name)
            .collect();
        assert_eq!(names, ["\x1b[2Jesc", "x", "x\r"]);
        // Materialised twice (the second time the blobs are linked twice over).
        for d in ["m1", "m2"] {
            let dest = tmp.path().join(d);
            store.materialise(&a.digest, &dest).unwrap();
            assert_eq!(fs::read_to_string(dest.join("x")).unwrap(), "plain x\n");
            assert_eq!(
                fs::read_to_string(dest.join("x\r")).unwrap(),
                "attacker's bytes\n"
            );
        }
        let e = tmp.path().join("e");
        store.export(&a.digest, &e).unwrap();
        assert_eq!(fs::read_dir(&e).unwrap().count(), 3);
        rehash_every_blob(&objects);
    }

    #[test]
    fn a_tree_text_is_accepted_only_in_canonical_form() {
        let d = "a".repeat(64);
        let ok = format!("millrace-tree-v1\nf {d} 1 a\nf {d} 2 a\r\nd {d} 3 b\n");
        assert_eq!(parse_tree(&ok).unwrap()[1].name, "a\r");
        for bad in [
            format!("millrace-tree-v1\nf {d} 1 a\nf {d} 1 a\n"),
            format!("millrace-tree-v1\nf {d} 1 b\nf {d} 1 a\n"),
            format!("millrace-tree-v1\nf {d} 1 \n"),
            format!("millrace-tree-v1\nf {d} 1 .\n"),
            format!("millrace-tree-v1\nd {d} 1 ..\n"),
            format!("millrace-tree-v1\nf {d} 1 a/b\n"),
            format!("millrace-tree-v1\nf {d} 1 a\0b\n"),
            format!("millrace-tree-v1\nf {d} 1 a"),
            format!("millrace-tree-v1\r\nf {d} 1 a\r\n"),
            format!("millrace-tree-v1\nf {d} +1 a\n"),
            format!("millrace-tree-v1\nf {d} 01 a\n"),
            "millrace-tree-v1\nf ab 1 a\n".to_string(),
            format!("millrace-tree-v1\n\nf {d} 1 a\n"),
        ] {
            assert!(parse_tree(&bad).is_none(), "{bad:?}");
        }
    }

    #[test]
    fn materialise_never_writes_onto_an_existing_file() {
        let tmp = tempfile::tempdir().unwrap();
        let objects = tmp.path().join("objects");
        let store = ArtifactStore::open(&objects).unwrap();
        let src = tmp.path().join("src");
        fs::create_dir(&src).unwrap();
        fs::write(src.join("x"), "good").unwrap();
        let a = store.ingest_dir(&src, Mode::Copy, &none).unwrap();
        fs::write(tmp.path().join("other"), "other bytes").unwrap();
        let b = store
            .ingest_file(&tmp.path().join("other"), Mode::Copy, &none)
            .unwrap();
        // `dest/x` is a hard link to b's blob: a copy onto it would change that blob.
        let dest = tmp.path().join("dest");
        store.materialise(&b.digest, &dest).unwrap();
        fs::rename(dest.join("other"), dest.join("x")).unwrap();
        let err = store.materialise(&a.digest, &dest).unwrap_err();
        assert!(matches!(err, ArtifactError::Exists(_)), "{err}");
        let err = store.export(&a.digest, &dest).unwrap_err();
        assert!(matches!(err, ArtifactError::Exists(_)), "{err}");
        rehash_every_blob(&objects);
    }

    #[test]
    fn deep_trees_hit_the_depth_limit_and_long_paths_work() {
        let tmp = tempfile::tempdir().unwrap();
        let store = ArtifactStore::open(&tmp.path().join("objects")).unwrap();
        // 40 levels of 200-byte names: 8 000 bytes of path, beyond PATH_MAX.
        let long = tmp.path().join("long");
        fs::create_dir(&long).unwrap();
        let mut d = Dir::open(&long).unwrap();
        let name = CString::new("n".repeat(200)).unwrap();
        for _ in 0..40 {
            d.mkdir(&name, 0o755).unwrap();
            d = d.open_dir(&name).unwrap();
        }
        d.create_new(c"f", 0o644)
            .unwrap()
            .write_all(b"deep")
            .unwrap();
        let a = store.ingest_dir(&long, Mode::Move, &none).unwrap();
        assert_eq!((a.files, a.size), (1, 4));
        store.verify(&a.digest, &none).unwrap();
        store.materialise(&a.digest, &tmp.path().join("m")).unwrap();
        store.export(&a.digest, &tmp.path().join("e")).unwrap();
        walk::remove_tree(&tmp.path().join("m")).unwrap();
        walk::remove_tree(&tmp.path().join("e")).unwrap();
        // Past the limit (and deep enough to overflow a recursive walk): refused.
        let deep = tmp.path().join("deep");
        fs::create_dir(&deep).unwrap();
        let mut d = Dir::open(&deep).unwrap();
        for _ in 0..3_000 {
            d.mkdir(c"a", 0o755).unwrap();
            d = d.open_dir(c"a").unwrap();
        }
        drop(d);
        let err = store.ingest_dir(&deep, Mode::Move, &none).unwrap_err();
        assert!(
            err.to_string()
                .contains("directory depth limit of 256 levels"),
            "{err}"
        );
        walk::remove_tree(&deep).unwrap();
    }

    #[test]
    fn a_rewrite_with_its_mtime_restored_changes_the_stat() {
        let tmp = tempfile::tempdir().unwrap();
        let f = tmp.path().join("data.csv");
        fs::write(&f, "1,2\n").unwrap();
        let before = fs::metadata(&f).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(20));
        fs::write(&f, "3,4\n").unwrap();
        let file = fs::File::options().write(true).open(&f).unwrap();
        file.set_modified(before.modified().unwrap()).unwrap();
        let after = fs::metadata(&f).unwrap();
        assert_eq!(before.mtime_nsec(), after.mtime_nsec());
        assert_ne!(FileStat::of(&before), FileStat::of(&after));
    }
}
