//! Watch triggers: a glob of files in a datastore, resolved against the same base
//! as an input's `path` ([`crate::config::Datastores::path`]: the datastore's
//! directory, which is the pipeline's own unless the daemon config places it).
//!
//! notify (inotify) reports changes under the glob's base directory; the debouncer
//! holds them until the trigger's quiet period has passed. Then the matching files
//! must hold still (same sizes and mtimes over a short settle interval) before
//! they are hashed, and only a change of content (against the cursor persisted in
//! SQLite) fires: touching a file or rewriting it with the same bytes does not.

use std::collections::BTreeMap;
use std::path::{Component, Path, PathBuf};
use std::time::{Duration, SystemTime};

use globset::{GlobBuilder, GlobMatcher};

/// How long the matching files must keep their sizes and mtimes before they are
/// hashed.
pub const SETTLE: Duration = Duration::from_millis(200);

/// A watch trigger's files, resolved against their datastore's directory.
#[derive(Debug, Clone)]
pub struct FileSet {
    /// The glob as written.
    pub glob: String,
    /// The datastore's directory: cursor paths and the `changed` list are
    /// relative to it, as input paths are.
    pub dir: PathBuf,
    /// The deepest directory of the glob without wildcards: what is watched.
    pub base: PathBuf,
    matcher: GlobMatcher,
    /// Never matched (the state directory, as given and resolved: its own writes
    /// must not fire a run).
    exclude: Vec<PathBuf>,
}

pub fn check_glob(glob: &str) -> Result<(), String> {
    if glob.trim().is_empty() {
        return Err("the watch glob is empty".into());
    }
    build(glob)
        .map(|_| ())
        .map_err(|e| format!("bad glob `{glob}`: {e}"))
}

fn build(glob: &str) -> Result<GlobMatcher, globset::Error> {
    Ok(GlobBuilder::new(glob)
        .literal_separator(true)
        .build()?
        .compile_matcher())
}

fn is_pattern(component: &str) -> bool {
    component.contains(['*', '?', '[', '{'])
}

impl FileSet {
    /// The files `glob` matches in datastore `datastore` of a pipeline in
    /// `pipeline_dir`: where an input path in that datastore would be.
    pub fn in_datastore(
        glob: &str,
        datastore: &str,
        datastores: &crate::config::Datastores,
        pipeline_dir: &Path,
    ) -> Result<FileSet, String> {
        FileSet::new(glob, &datastores.path(datastore, pipeline_dir))
    }

    /// The files `glob` matches, relative to `dir`.
    pub fn new(glob: &str, dir: &Path) -> Result<FileSet, String> {
        let full = lexical_join(dir, Path::new(glob));
        let mut base = PathBuf::new();
        for c in full.components() {
            if is_pattern(&c.as_os_str().to_string_lossy()) {
                break;
            }
            base.push(c);
        }
        if base == full {
            // A plain file name: watch its directory.
            base.pop();
        }
        let matcher =
            build(&full.to_string_lossy()).map_err(|e| format!("bad glob `{glob}`: {e}"))?;
        Ok(FileSet {
            glob: glob.to_string(),
            dir: dir.to_path_buf(),
            base,
            matcher,
            exclude: Vec::new(),
        })
    }

    /// The same set without anything under `dir` (the daemon's state directory,
    /// whose database and logs change with every run).
    pub fn excluding(mut self, dir: &Path) -> FileSet {
        self.exclude.push(dir.to_path_buf());
        if let Ok(real) = dir.canonicalize() {
            self.exclude.push(real);
        }
        self
    }

    /// Whether what is watched lies inside one of `roots` (both compared
    /// absolute, `.` and `..` folded, without touching the file system).
    pub fn inside(&self, roots: &[PathBuf]) -> bool {
        let base = normal(&self.base);
        roots.iter().any(|r| base.starts_with(normal(r)))
    }

    fn excluded(&self, path: &Path) -> bool {
        self.exclude.iter().any(|x| path.starts_with(x))
    }

    pub fn matches(&self, path: &Path) -> bool {
        self.matcher.is_match(path) && !self.excluded(path)
    }

    /// The matching regular files now, with their sizes and mtimes.
    pub fn scan(&self) -> BTreeMap<PathBuf, (u64, SystemTime)> {
        let mut out = BTreeMap::new();
        for e in walkdir::WalkDir::new(&self.base)
            .follow_links(false)
            .into_iter()
            // A directory reached through a symlinked path is resolved once.
            .filter_entry(|e| {
                !self.excluded(e.path())
                    && !(e.path_is_symlink() || e.file_type().is_dir())
                        .then(|| e.path().canonicalize().ok())
                        .flatten()
                        .is_some_and(|p| self.excluded(&p))
            })
            .filter_map(Result::ok)
        {
            if e.file_type().is_file()
                && self.matches(e.path())
                && let Ok(m) = e.metadata()
            {
                out.insert(
                    e.path().to_path_buf(),
                    (m.len(), m.modified().unwrap_or(SystemTime::UNIX_EPOCH)),
                );
            }
        }
        out
    }

    /// Waits until the matching files hold still, then hashes them: relative path
    /// → BLAKE3 of the content. Gives up (returns `None`) after `patience`.
    pub fn settle_and_hash(&self, patience: Duration) -> Option<BTreeMap<String, String>> {
        let deadline = std::time::Instant::now() + patience;
        let mut before = self.scan();
        loop {
            std::thread::sleep(SETTLE);
            let now = self.scan();
            if now == before {
                break;
            }
            if std::time::Instant::now() > deadline {
                return None;
            }
            before = now;
        }
        let mut out = BTreeMap::new();
        for path in before.keys() {
            let Ok(mut f) = std::fs::File::open(path) else {
                continue; // removed since the scan: it is not there
            };
            let mut h = blake3::Hasher::new();
            if h.update_reader(&mut f).is_err() {
                continue;
            }
            out.insert(self.relative(path), h.finalize().to_hex().to_string());
        }
        Some(out)
    }

    pub fn relative(&self, path: &Path) -> String {
        path.strip_prefix(&self.dir)
            .unwrap_or(path)
            .display()
            .to_string()
    }
}

/// Paths whose content differs between two looks: added, changed or removed.
pub fn changed(before: &BTreeMap<String, String>, now: &BTreeMap<String, String>) -> Vec<String> {
    let mut out: Vec<String> = now
        .iter()
        .filter(|(p, d)| before.get(*p) != Some(d))
        .map(|(p, _)| p.clone())
        .collect();
    out.extend(before.keys().filter(|p| !now.contains_key(*p)).cloned());
    out.sort();
    out
}

/// `p` made absolute (against the working directory) with `.` and `..` folded.
fn normal(p: &Path) -> PathBuf {
    let absolute = std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf());
    lexical_join(&absolute, Path::new(""))
}

/// `dir/glob` with `.` and `..` folded away without touching the file system.
fn lexical_join(dir: &Path, rel: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for c in dir.join(rel).components() {
        match c {
            Component::CurDir => {}
            Component::ParentDir => {
                out.pop();
            }
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base_is_the_deepest_plain_directory() {
        let f = FileSet::new("data/*.csv", Path::new("/p")).expect("valid");
        assert_eq!(f.base, Path::new("/p/data"));
        assert!(f.matches(Path::new("/p/data/a.csv")));
        assert!(!f.matches(Path::new("/p/data/sub/a.csv")));
        let f = FileSet::new("../in/**/*.json", Path::new("/p/q")).expect("valid");
        assert_eq!(f.base, Path::new("/p/in"));
        assert!(f.matches(Path::new("/p/in/x/y/a.json")));
        let f = FileSet::new("drop.csv", Path::new("/p")).expect("valid");
        assert_eq!(f.base, Path::new("/p"));
        assert!(check_glob("data/[.csv").is_err());
    }

    #[test]
    fn a_watch_is_inside_a_root_only_if_its_base_is() {
        let roots = [PathBuf::from("/srv/data"), PathBuf::from("/p")];
        let inside =
            |glob: &str, dir: &str| FileSet::new(glob, Path::new(dir)).unwrap().inside(&roots);
        assert!(inside("inbox/*.csv", "/srv/data"));
        assert!(inside("**/*.csv", "/srv/data"));
        assert!(inside("*.csv", "/p"));
        assert!(inside("../data/in/*.csv", "/srv/other"));
        assert!(!inside("/etc/*.conf", "/p"));
        assert!(!inside("../*.csv", "/p"));
        assert!(!inside("../../etc/*", "/srv/data"));
        // A sibling whose name starts like a root is not inside it.
        assert!(!inside("/srv/database/*.csv", "/p"));
    }

    #[test]
    fn changes_are_added_modified_and_removed_paths() {
        let a: BTreeMap<String, String> =
            [("a".into(), "1".into()), ("b".into(), "2".into())].into();
        let b: BTreeMap<String, String> =
            [("b".into(), "3".into()), ("c".into(), "4".into())].into();
        assert_eq!(changed(&a, &b), ["a", "b", "c"]);
        assert!(changed(&a, &a).is_empty());
    }
}
