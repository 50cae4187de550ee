//! Walks of directory trees a guest wrote, by descriptor and without recursion.
//!
//! A guest controls the shape of what it leaves in `/out`, `/tmp` and `/millrace`:
//! 20 000 nested directories overflow any recursive walk's stack (std's
//! `remove_dir_all` included) and make paths longer than `PATH_MAX`, so that
//! path-based calls fail or, worse, skip what is deep (the disk watch did). Every
//! host walk of guest data therefore holds directory descriptors (`openat`,
//! `fstatat`, `unlinkat`, `renameat` relative to the parent: no path ever grows),
//! keeps its own stack on the heap, opens nothing with `O_NOFOLLOW` missing, and
//! stops at a depth and an entry count that fail the step with the limit named.

use std::ffi::{CStr, CString, OsStr};
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

/// Most directory levels below an output (or `/tmp`, `/millrace`) a walk descends.
pub const DEFAULT_MAX_DEPTH: usize = 256;
/// Most files and directories in one output, or in a step's writable directories
/// together while it runs.
pub const DEFAULT_MAX_ENTRIES: u64 = 1_000_000;

/// The depth and entry limits of the walks of what a guest wrote. The engine's
/// configuration holds them (`EngineConfig::store`, with the environment
/// overrides `MILLRACE_MAX_DEPTH` and `MILLRACE_MAX_ENTRIES`); a store and an
/// attempt's spec carry them to the walks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Limits {
    /// Most directory levels below a walk's root.
    pub depth: usize,
    /// Most files and directories in one walk.
    pub entries: u64,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            depth: DEFAULT_MAX_DEPTH,
            entries: DEFAULT_MAX_ENTRIES,
        }
    }
}

/// A limit a walk stopped at.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Limit {
    #[error("directory depth limit of {0} levels exceeded (MILLRACE_MAX_DEPTH)")]
    Depth(usize),
    #[error("entry limit of {0} files and directories exceeded (MILLRACE_MAX_ENTRIES)")]
    Entries(u64),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    File,
    Dir,
    Symlink,
    Other,
}

pub struct DirEntry {
    pub name: CString,
    pub kind: Kind,
}

impl DirEntry {
    pub fn name_os(&self) -> &OsStr {
        OsStr::from_bytes(self.name.to_bytes())
    }
}

/// An open directory; every operation is relative to it.
pub struct Dir {
    fd: OwnedFd,
}

fn cvt(r: libc::c_int) -> io::Result<libc::c_int> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

pub fn cstr(s: &OsStr) -> io::Result<CString> {
    CString::new(s.as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "a NUL byte in a file name"))
}

const DIR_FLAGS: libc::c_int = libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC;

fn owned(fd: libc::c_int) -> OwnedFd {
    // SAFETY: `fd` was just returned by a successful open and is owned by no one else.
    unsafe { OwnedFd::from_raw_fd(fd) }
}

impl Dir {
    /// Opens `path` as a directory, refusing a symlink at its last component.
    pub fn open(path: &Path) -> io::Result<Dir> {
        Dir::open_flags(path, DIR_FLAGS | libc::O_NOFOLLOW)
    }

    /// Opens `path` as a directory, following a symlink (a user's dataset).
    pub fn open_following(path: &Path) -> io::Result<Dir> {
        Dir::open_flags(path, DIR_FLAGS)
    }

    fn open_flags(path: &Path, flags: libc::c_int) -> io::Result<Dir> {
        let c = cstr(path.as_os_str())?;
        // SAFETY: a NUL-terminated path and plain flags.
        let fd = cvt(unsafe { libc::open(c.as_ptr(), flags) })?;
        Ok(Dir { fd: owned(fd) })
    }

    /// The directory `name` inside this one (never through a symlink).
    pub fn open_dir(&self, name: &CStr) -> io::Result<Dir> {
        // SAFETY: a descriptor we own and a NUL-terminated name.
        let fd = cvt(unsafe {
            libc::openat(
                self.fd.as_raw_fd(),
                name.as_ptr(),
                DIR_FLAGS | libc::O_NOFOLLOW,
            )
        })?;
        Ok(Dir { fd: owned(fd) })
    }

    /// Every entry but `.` and `..`, read in one go (the caller bounds the count
    /// by the entry limit it applies).
    pub fn entries(&self) -> io::Result<Vec<DirEntry>> {
        // fdopendir owns the descriptor it is given: hand it a duplicate.
        // SAFETY: duplicating a descriptor we own.
        let dup = cvt(unsafe { libc::fcntl(self.fd.as_raw_fd(), libc::F_DUPFD_CLOEXEC, 0) })?;
        // SAFETY: `dup` is a fresh directory descriptor; on success the stream owns it.
        let dirp = unsafe { libc::fdopendir(dup) };
        if dirp.is_null() {
            let e = io::Error::last_os_error();
            drop(owned(dup));
            return Err(e);
        }
        // A duplicate shares the offset: start from the beginning whatever read before.
        // SAFETY: `dirp` is a valid stream until closedir below.
        unsafe { libc::rewinddir(dirp) };
        let mut out = Vec::new();
        let result = loop {
            // SAFETY: errno is thread-local; readdir reports errors only through it.
            unsafe { *libc::__errno_location() = 0 };
            // SAFETY: `dirp` is valid; the entry is read before the next readdir.
            let ent = unsafe { libc::readdir(dirp) };
            if ent.is_null() {
                let e = io::Error::last_os_error();
                break match e.raw_os_error() {
                    Some(0) | None => Ok(()),
                    Some(_) => Err(e),
                };
            }
            // SAFETY: d_name is NUL-terminated within the entry.
            let (name, d_type) = unsafe { (CStr::from_ptr((*ent).d_name.as_ptr()), (*ent).d_type) };
            let bytes = name.to_bytes();
            if bytes == b"." || bytes == b".." {
                continue;
            }
            let name = name.to_owned();
            let kind = match d_type {
                libc::DT_REG => Kind::File,
                libc::DT_DIR => Kind::Dir,
                libc::DT_LNK => Kind::Symlink,
                libc::DT_UNKNOWN => match self.lstat(&name) {
                    Ok(st) => kind_of(st.st_mode),
                    Err(_) => Kind::Other,
                },
                _ => Kind::Other,
            };
            out.push(DirEntry { name, kind });
        };
        // SAFETY: closes the stream and its descriptor `dup`, once.
        unsafe { libc::closedir(dirp) };
        result.map(|()| out)
    }

    /// `fstatat` without following a symlink.
    pub fn lstat(&self, name: &CStr) -> io::Result<libc::stat> {
        // SAFETY: an all-zero stat is a valid value for the kernel to overwrite.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        // SAFETY: a descriptor we own, a NUL-terminated name, a valid out pointer.
        cvt(unsafe {
            libc::fstatat(
                self.fd.as_raw_fd(),
                name.as_ptr(),
                &mut st,
                libc::AT_SYMLINK_NOFOLLOW,
            )
        })?;
        Ok(st)
    }

    /// Opens a regular file for reading: never through a symlink, never blocking
    /// on a FIFO put where a file was.
    pub fn open_file(&self, name: &CStr) -> io::Result<File> {
        // SAFETY: as in `open_dir`.
        let fd = cvt(unsafe {
            libc::openat(
                self.fd.as_raw_fd(),
                name.as_ptr(),
                libc::O_RDONLY
                    | libc::O_NOFOLLOW
                    | libc::O_NONBLOCK
                    | libc::O_NOCTTY
                    | libc::O_CLOEXEC,
            )
        })?;
        Ok(File::from(owned(fd)))
    }

    /// Creates `name`, failing if anything is there already (create-new: never
    /// writes onto an existing file, a hard link to a blob least of all).
    pub fn create_new(&self, name: &CStr, mode: libc::mode_t) -> io::Result<File> {
        // SAFETY: as in `open_dir`.
        let fd = cvt(unsafe {
            libc::openat(
                self.fd.as_raw_fd(),
                name.as_ptr(),
                libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL | libc::O_NOFOLLOW | libc::O_CLOEXEC,
                mode as libc::c_uint,
            )
        })?;
        Ok(File::from(owned(fd)))
    }

    pub fn mkdir(&self, name: &CStr, mode: libc::mode_t) -> io::Result<()> {
        // SAFETY: as in `open_dir`.
        cvt(unsafe { libc::mkdirat(self.fd.as_raw_fd(), name.as_ptr(), mode) }).map(drop)
    }

    pub fn unlink(&self, name: &CStr) -> io::Result<()> {
        // SAFETY: as in `open_dir`.
        cvt(unsafe { libc::unlinkat(self.fd.as_raw_fd(), name.as_ptr(), 0) }).map(drop)
    }

    pub fn rmdir(&self, name: &CStr) -> io::Result<()> {
        // SAFETY: as in `open_dir`.
        cvt(unsafe { libc::unlinkat(self.fd.as_raw_fd(), name.as_ptr(), libc::AT_REMOVEDIR) })
            .map(drop)
    }

    /// Renames `name` here to `to_name` in `to`.
    pub fn rename(&self, name: &CStr, to: &Dir, to_name: &CStr) -> io::Result<()> {
        // SAFETY: descriptors we own and NUL-terminated names.
        cvt(unsafe {
            libc::renameat(
                self.fd.as_raw_fd(),
                name.as_ptr(),
                to.fd.as_raw_fd(),
                to_name.as_ptr(),
            )
        })
        .map(drop)
    }

    /// Renames `name` here to the (short, host-owned) path `dest`.
    pub fn rename_out(&self, name: &CStr, dest: &Path) -> io::Result<()> {
        let d = cstr(dest.as_os_str())?;
        // SAFETY: as in `rename`.
        cvt(unsafe {
            libc::renameat(
                self.fd.as_raw_fd(),
                name.as_ptr(),
                libc::AT_FDCWD,
                d.as_ptr(),
            )
        })
        .map(drop)
    }

    /// Hard-links the (host-owned) file `src` here as `name`; fails if `name` exists.
    pub fn link_in(&self, src: &Path, name: &CStr) -> io::Result<()> {
        let s = cstr(src.as_os_str())?;
        // SAFETY: as in `rename`.
        cvt(unsafe {
            libc::linkat(
                libc::AT_FDCWD,
                s.as_ptr(),
                self.fd.as_raw_fd(),
                name.as_ptr(),
                0,
            )
        })
        .map(drop)
    }

    /// The mode of this directory itself.
    pub fn fchmod(&self, mode: libc::mode_t) -> io::Result<()> {
        // SAFETY: a descriptor we own.
        cvt(unsafe { libc::fchmod(self.fd.as_raw_fd(), mode) }).map(drop)
    }

    /// Makes the directory `name` here readable and writable by us, without
    /// following a symlink (opened `O_PATH`, changed through /proc).
    fn chmod_dir(&self, name: &CStr) -> io::Result<()> {
        // SAFETY: as in `open_dir`; O_PATH needs no permission on the directory.
        let fd = cvt(unsafe {
            libc::openat(
                self.fd.as_raw_fd(),
                name.as_ptr(),
                libc::O_PATH | libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC,
            )
        })?;
        let fd = owned(fd);
        let proc = format!("/proc/self/fd/{}\0", fd.as_raw_fd());
        let c = CStr::from_bytes_with_nul(proc.as_bytes()).map_err(io::Error::other)?;
        // SAFETY: a NUL-terminated path naming a descriptor we hold.
        cvt(unsafe { libc::chmod(c.as_ptr(), 0o700) }).map(drop)
    }
}

pub fn kind_of(mode: libc::mode_t) -> Kind {
    match mode & libc::S_IFMT {
        libc::S_IFREG => Kind::File,
        libc::S_IFDIR => Kind::Dir,
        libc::S_IFLNK => Kind::Symlink,
        _ => Kind::Other,
    }
}

/// What a directory tree holds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    /// Bytes of regular files.
    pub bytes: u64,
    /// Files, directories and anything else.
    pub entries: u64,
}

/// What is below `dir` (itself not followed if a symlink: that holds nothing),
/// counted up to the limits. A missing or unreadable directory holds nothing. On
/// a limit, the usage counted so far comes with it.
pub fn usage(dir: &Path, depth_limit: usize, entry_limit: u64) -> (Usage, Option<Limit>) {
    let mut u = Usage::default();
    let Ok(root) = Dir::open(dir) else {
        return (u, None);
    };
    let mut stack: Vec<(Dir, Vec<DirEntry>)> = Vec::new();
    let first = root.entries().unwrap_or_default();
    stack.push((root, first));
    loop {
        let depth = stack.len();
        let Some((dir, todo)) = stack.last_mut() else {
            break;
        };
        let Some(e) = todo.pop() else {
            stack.pop();
            continue;
        };
        u.entries += 1;
        if u.entries > entry_limit {
            return (u, Some(Limit::Entries(entry_limit)));
        }
        match e.kind {
            Kind::Dir => {
                // `depth` is the level of the directory being opened (the root is 0).
                if depth > depth_limit {
                    return (u, Some(Limit::Depth(depth_limit)));
                }
                if let Ok(sub) = dir.open_dir(&e.name) {
                    let entries = sub.entries().unwrap_or_default();
                    stack.push((sub, entries));
                }
            }
            Kind::File => {
                if let Ok(st) = dir.lstat(&e.name) {
                    u.bytes += st.st_size.max(0) as u64;
                }
            }
            Kind::Symlink | Kind::Other => {}
        }
    }
    (u, None)
}

/// Removes `path` and everything below it, at any depth and width, without
/// recursion and without a path ever longer than one name: see [`Drain`]. A
/// symlink at `path` is removed, not followed. Goes on past errors (one entry that
/// cannot be removed does not keep the rest) and returns the first.
pub fn remove_tree(path: &Path) -> io::Result<()> {
    let meta = match std::fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    if !meta.is_dir() {
        return std::fs::remove_file(path);
    }
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let name = cstr(
        path.file_name()
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "no file name"))?,
    )?;
    let pdir = Dir::open_following(parent)?;
    let mut drain = Drain::new(&pdir)?;
    // The root itself is hoisted first: then nothing outside the scratch directory
    // is touched again.
    let first = drain.hoist(&pdir, &name);
    let rest = drain.finish();
    first.and(rest)
}

/// Empties the directory `dir` (which stays), as [`remove_tree`] would; `scratch_in`
/// is a directory of ours on the same filesystem for the scratch directory.
pub fn empty_dir(dir: &Path, scratch_in: &Path) -> io::Result<()> {
    let d = Dir::open(dir)?;
    let sdir = Dir::open_following(scratch_in)?;
    let mut drain = Drain::new(&sdir)?;
    let first = drain.empty(&d);
    let rest = drain.finish();
    first.and(rest)
}

/// Deletes trees by hoisting: each non-empty subdirectory is renamed into one flat
/// scratch directory and emptied from there later, so the walk never holds more
/// than two descriptors, never recurses, and never builds a long path; an empty
/// directory (200 000 of them in `/tmp`) costs one `rmdir`.
pub struct Drain {
    /// Where the scratch directory goes, made at the first hoist: a workspace
    /// reset that hoists nothing (the usual step) creates and removes no
    /// directory, which on ext4 is what a trivial step costs most.
    parent: Dir,
    scratch: Option<std::rc::Rc<Dir>>,
    scratch_name: CString,
    next: u64,
    pending: Vec<CString>,
    first_error: Option<io::Error>,
}

impl Drain {
    /// A drain with its scratch directory made in `parent`.
    pub fn new(parent: &Dir) -> io::Result<Drain> {
        use std::sync::atomic::{AtomicU64, Ordering};
        static N: AtomicU64 = AtomicU64::new(0);
        let name = format!(
            ".millrace-rm-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        );
        let scratch_name = cstr(OsStr::new(&name))?;
        Ok(Drain {
            parent: Dir {
                fd: parent.fd.try_clone()?,
            },
            scratch: None,
            scratch_name,
            next: 0,
            pending: Vec::new(),
            first_error: None,
        })
    }

    fn note(&mut self, r: io::Result<()>) {
        if let Err(e) = r
            && self.first_error.is_none()
        {
            self.first_error = Some(e);
        }
    }

    /// Moves the directory `name` of `dir` into the scratch directory, to empty later.
    fn hoist(&mut self, dir: &Dir, name: &CStr) -> io::Result<()> {
        if self.scratch.is_none() {
            self.parent.mkdir(&self.scratch_name, 0o700)?;
            self.scratch = Some(std::rc::Rc::new(self.parent.open_dir(&self.scratch_name)?));
        }
        let Some(scratch) = &self.scratch else {
            unreachable!("made above")
        };
        let to = cstr(OsStr::new(&self.next.to_string()))?;
        self.next += 1;
        dir.rename(name, scratch, &to)?;
        self.pending.push(to);
        Ok(())
    }

    /// Removes the entry `e` of `dir`: a file or an empty directory now, another
    /// directory hoisted (removed by `finish`).
    pub fn remove(&mut self, dir: &Dir, e: &DirEntry) -> io::Result<()> {
        match e.kind {
            Kind::Dir => match dir.rmdir(&e.name) {
                Err(err) if matches!(err.raw_os_error(), Some(libc::ENOTEMPTY | libc::EEXIST)) => {
                    self.hoist(dir, &e.name)
                }
                r => r,
            },
            _ => dir.unlink(&e.name),
        }
    }

    /// Removes what `dir` holds: files now, empty directories now, the others
    /// hoisted.
    pub fn empty(&mut self, dir: &Dir) -> io::Result<()> {
        let entries = match dir.entries() {
            Ok(e) => e,
            Err(e) if e.raw_os_error() == Some(libc::EACCES) => {
                dir.fchmod(0o700)?;
                dir.entries()?
            }
            Err(e) => return Err(e),
        };
        let mut made_writable = false;
        for e in entries {
            let mut r = self.remove(dir, &e);
            if !made_writable
                && r.as_ref().is_err_and(|err| {
                    matches!(err.raw_os_error(), Some(libc::EACCES | libc::EPERM))
                })
            {
                // A guest may leave a directory without write permission.
                made_writable = true;
                let _ = dir.fchmod(0o700);
                r = self.remove(dir, &e);
            }
            self.note(r);
        }
        Ok(())
    }

    /// Empties and removes everything hoisted, then the scratch directory.
    pub fn finish(mut self) -> io::Result<()> {
        while let Some(n) = self.pending.pop() {
            // Hoisting only ever happens into this one scratch directory.
            let Some(scratch) = self.scratch.clone() else {
                break;
            };
            let d = match scratch.open_dir(&n) {
                Err(e) if e.raw_os_error() == Some(libc::EACCES) => {
                    scratch.chmod_dir(&n).and_then(|()| scratch.open_dir(&n))
                }
                r => r,
            };
            let r = d.and_then(|d| self.empty(&d));
            self.note(r);
            let r = scratch.rmdir(&n);
            // Not empty after an error above: it stays, and so does the scratch dir.
            self.note(r);
        }
        if self.scratch.is_some() {
            let r = self.parent.rmdir(&self.scratch_name);
            self.note(r);
        }
        match self.first_error.take() {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}

/// Copies the directory tree `from` to `to` (created; what is there is not written
/// over), regular files and directories only, by descriptor and without recursion:
/// a Slurm step's `/out` comes back this way from the shared directory. Deeper
/// than the depth limit is an error naming it.
pub fn copy_tree(from: &Path, to: &Path, depth_limit: usize) -> io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    use std::rc::Rc;
    std::fs::create_dir_all(to)?;
    // Pending directories hold their parents' descriptors and are opened when
    // their turn comes: one pair of descriptors per level, however wide.
    type Pending = (Rc<Dir>, Rc<Dir>, Option<CString>, usize);
    let mut stack: Vec<Pending> = vec![(
        Rc::new(Dir::open_following(from)?),
        Rc::new(Dir::open(to)?),
        None,
        0,
    )];
    while let Some((src, dst, name, depth)) = stack.pop() {
        let (src, dst) = match name {
            None => (src, dst),
            Some(n) => {
                dst.mkdir(&n, 0o755)?;
                (Rc::new(src.open_dir(&n)?), Rc::new(dst.open_dir(&n)?))
            }
        };
        for e in src.entries()? {
            match e.kind {
                Kind::Dir => {
                    if depth + 1 > depth_limit {
                        return Err(io::Error::other(Limit::Depth(depth_limit).to_string()));
                    }
                    stack.push((src.clone(), dst.clone(), Some(e.name), depth + 1));
                }
                Kind::File => {
                    let mut f = src.open_file(&e.name)?;
                    let mode = f.metadata()?.permissions().mode() & 0o777;
                    let mut t = dst.create_new(&e.name, mode)?;
                    io::copy(&mut f, &mut t)?;
                }
                // Symlinks and special files are not copied.
                Kind::Symlink | Kind::Other => {}
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nest(root: &Path, levels: usize) {
        let mut d = Dir::open(root).unwrap();
        let a = c"a";
        for _ in 0..levels {
            d.mkdir(a, 0o755).unwrap();
            d = d.open_dir(a).unwrap();
        }
        d.create_new(c"deep.txt", 0o644).unwrap();
    }

    #[test]
    fn a_tree_deeper_than_path_max_is_removed_and_measured_to_the_limit() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("o");
        std::fs::create_dir(&root).unwrap();
        // 5 000 levels of "a/": 10 000 bytes, beyond PATH_MAX.
        nest(&root, 5_000);
        let (u, limit) = usage(&root, 256, 1_000_000);
        assert_eq!(limit, Some(Limit::Depth(256)));
        assert_eq!(u.entries, 257);
        remove_tree(&root).unwrap();
        assert!(!root.exists());
        assert_eq!(
            std::fs::read_dir(tmp.path()).unwrap().count(),
            0,
            "no scratch left"
        );
    }

    #[test]
    fn emptying_keeps_the_directory_and_handles_unwritable_and_wide_trees() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("o");
        std::fs::create_dir_all(root.join("ro/sub")).unwrap();
        std::fs::write(root.join("ro/sub/f"), "x").unwrap();
        std::fs::write(root.join("file"), "x").unwrap();
        for i in 0..2_000 {
            std::fs::create_dir(root.join(format!("e{i}"))).unwrap();
        }
        std::os::unix::fs::symlink("/", root.join("link")).unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(root.join("ro/sub"), std::fs::Permissions::from_mode(0o500))
            .unwrap();
        std::fs::set_permissions(root.join("ro"), std::fs::Permissions::from_mode(0o000)).unwrap();
        let (u, limit) = usage(&root, 256, 1_000_000);
        assert_eq!(limit, None);
        assert!(u.entries >= 2_003, "{u:?}");
        empty_dir(&root, tmp.path()).unwrap();
        assert!(root.is_dir());
        assert_eq!(std::fs::read_dir(&root).unwrap().count(), 0);
        assert_eq!(
            std::fs::read_dir(tmp.path()).unwrap().count(),
            1,
            "no scratch left"
        );
    }

    #[test]
    fn a_symlinked_root_is_not_followed() {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::create_dir(tmp.path().join("real")).unwrap();
        std::fs::write(tmp.path().join("real/f"), "12345").unwrap();
        std::os::unix::fs::symlink(tmp.path().join("real"), tmp.path().join("o")).unwrap();
        assert_eq!(usage(&tmp.path().join("o"), 256, 10).0, Usage::default());
        remove_tree(&tmp.path().join("o")).unwrap();
        assert!(tmp.path().join("real/f").exists());
    }

    /// `cargo test --lib -- --ignored --nocapture bench_cleanup`: std's recursive
    /// `remove_dir_all` against the hoisting drain on 200 000 empty directories.
    #[test]
    #[ignore]
    fn bench_cleanup() {
        let n: usize = std::env::var("BENCH_DIRS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(200_000);
        let tmp = tempfile::tempdir().unwrap();
        for round in ["std::fs::remove_dir_all", "walk::remove_tree"] {
            let root = tmp.path().join("t");
            std::fs::create_dir(&root).unwrap();
            let d = Dir::open(&root).unwrap();
            for i in 0..n {
                d.mkdir(&cstr(OsStr::new(&format!("d{i}"))).unwrap(), 0o755)
                    .unwrap();
            }
            drop(d);
            let started = std::time::Instant::now();
            if round == "walk::remove_tree" {
                remove_tree(&root).unwrap();
            } else {
                std::fs::remove_dir_all(&root).unwrap();
            }
            eprintln!("{round}: {n} empty directories in {:?}", started.elapsed());
        }
    }
}
