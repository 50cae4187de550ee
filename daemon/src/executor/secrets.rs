//! A step's secrets for one attempt (SPEC "Secrets"): each value read from its
//! `[secrets.NAME]` source when the attempt starts, written to a private
//! directory (0700, files 0600) outside the state directory, mounted read-only
//! at [`GUEST_DIR`], and removed when the attempt is over. The values go nowhere
//! else but the variables the step asks for and the log's redaction list.

use std::collections::BTreeMap;
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use crate::config::{Secret, file_mode};

/// Where a step sees its secrets, one file per name.
pub const GUEST_DIR: &str = "/run/secrets";

/// The daemon's variables that hold `env = "…"` secrets: removed from the
/// environment of every program millrace starts (`sbatch` would otherwise pass
/// them into each job, and Slurm keeps a job's environment).
static HIDDEN: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());

/// Adds the variables of `secrets` to those children never inherit.
pub fn hide_from_children(secrets: &BTreeMap<String, Secret>) {
    let mut hidden = HIDDEN.lock().unwrap_or_else(|e| e.into_inner());
    for s in secrets.values() {
        if let Secret::Env(var) = s
            && !hidden.contains(var)
        {
            hidden.push(var.clone());
        }
    }
}

/// The variables a child process must not inherit.
pub fn hidden_vars() -> Vec<String> {
    HIDDEN.lock().unwrap_or_else(|e| e.into_inner()).clone()
}

/// An attempt's staged secrets; dropping it removes them.
pub struct Staged {
    dir: PathBuf,
    /// Name → value, for `secret_env` and the log's redaction.
    values: BTreeMap<String, Vec<u8>>,
}

impl Staged {
    /// The host directory to mount at [`GUEST_DIR`].
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The value of `name` as an environment variable: UTF-8, without the one
    /// trailing newline a file written by `echo` ends in.
    pub fn env_value(&self, name: &str) -> Result<String, String> {
        let value = self.values.get(name).map(Vec::as_slice).unwrap_or_default();
        let text = std::str::from_utf8(value).map_err(|_| {
            format!("secret `{name}` is not UTF-8 text: it cannot be an environment variable")
        })?;
        let text = text
            .strip_suffix('\n')
            .map(|t| t.strip_suffix('\r').unwrap_or(t))
            .unwrap_or(text);
        if text.contains('\0') {
            return Err(format!(
                "secret `{name}` holds a NUL byte: it cannot be an environment variable"
            ));
        }
        Ok(text.to_string())
    }

    /// What the log masks: each value without its trailing newline (masking
    /// the newline too would join the guest's lines), which covers the value
    /// as its file and as its variable hold it.
    pub fn redactions(&self) -> Vec<Vec<u8>> {
        self.values
            .values()
            .map(|v| {
                let v = v.strip_suffix(b"\n").unwrap_or(v);
                v.strip_suffix(b"\r").unwrap_or(v).to_vec()
            })
            .collect()
    }
}

impl Drop for Staged {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_dir_all(&self.dir)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            tracing::error!(dir = %self.dir.display(), error = %e, "cannot remove a step's staged secrets");
        }
    }
}

/// Reads the secrets `names` from `sources` and stages them for attempt `tag`
/// (a unique, file-name-safe label). The error names the secret, never a value.
pub fn stage(
    names: &[String],
    sources: Option<&BTreeMap<String, Secret>>,
    tag: &str,
) -> Result<Staged, String> {
    let mut values = BTreeMap::new();
    for name in names {
        let source = sources.and_then(|s| s.get(name)).ok_or_else(|| {
            format!("secret `{name}` is not defined: the daemon config has no [secrets.{name}]")
        })?;
        values.insert(name.clone(), read(name, source)?);
    }
    // The process and a counter make the name unique among concurrent attempts,
    // also of several state directories in one process.
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let dir = base_dir().join(format!("millrace-secrets-{}-{n}-{tag}", std::process::id()));
    // A left-over directory of a crashed attempt with this label is removed,
    // then the directory is made afresh (`create`, not `create_all`: one that
    // appears meanwhile is refused, not used).
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(&dir)
        .map_err(|e| format!("cannot stage secrets in {}: {e}", dir.display()))?;
    let staged = Staged { dir, values };
    for (name, value) in &staged.values {
        let path = staged.dir.join(name);
        let written = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
            .and_then(|mut f| f.write_all(value));
        written.map_err(|e| format!("cannot stage secret `{name}`: {e}"))?;
    }
    Ok(staged)
}

/// Where attempts' secrets are staged: systemd's `RuntimeDirectory=` (a tmpfs
/// under `/run` that the service's user alone may enter and that a container
/// engine outside the unit's private `/tmp` sees too), else `$TMPDIR`.
fn base_dir() -> PathBuf {
    std::env::var_os("RUNTIME_DIRECTORY")
        .and_then(|v| {
            // Several directories are listed with `:`; the first is the unit's.
            let first = v.to_string_lossy().split(':').next()?.to_string();
            let p = PathBuf::from(first);
            (p.is_absolute() && p.is_dir()).then_some(p)
        })
        .unwrap_or_else(std::env::temp_dir)
}

fn read(name: &str, source: &Secret) -> Result<Vec<u8>, String> {
    match source {
        Secret::File(path) => {
            // Checked again: the file may have changed since the config was read.
            if let Some(mode) = file_mode(path)
                && mode & 0o077 != 0
            {
                return Err(format!(
                    "secret `{name}`: {} is readable by its group or others (mode {:04o}): `chmod 600` it",
                    path.display(),
                    mode & 0o7777
                ));
            }
            std::fs::read(path)
                .map_err(|e| format!("secret `{name}`: cannot read {}: {e}", path.display()))
        }
        Secret::Env(var) => std::env::var_os(var)
            .map(std::os::unix::ffi::OsStringExt::into_vec)
            .ok_or_else(|| {
                format!("secret `{name}`: {var} is not set in the daemon's environment")
            }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn staged_privately_refused_when_readable_by_others_and_removed_after() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("db");
        std::fs::write(&file, "s3cret\n").unwrap();
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).unwrap();
        let sources = BTreeMap::from([("db".to_string(), Secret::File(file.clone()))]);
        let staged = stage(&["db".into()], Some(&sources), "unit-1").unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(staged.dir()), 0o700);
        assert_eq!(mode(&staged.dir().join("db")), 0o600);
        assert_eq!(std::fs::read(staged.dir().join("db")).unwrap(), b"s3cret\n");
        assert_eq!(staged.env_value("db").unwrap(), "s3cret");
        let staged_dir = staged.dir().to_path_buf();
        drop(staged);
        assert!(!staged_dir.exists());

        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = stage(&["db".into()], Some(&sources), "unit-2")
            .err()
            .unwrap();
        assert!(e.contains("secret `db`") && e.contains("0644"), "{e}");
        let sources = BTreeMap::from([(
            "api".to_string(),
            Secret::Env("MILLRACE_TEST_UNSET_SECRET".into()),
        )]);
        let e = stage(&["api".into()], Some(&sources), "unit-3")
            .err()
            .unwrap();
        assert!(
            e.contains("secret `api`: MILLRACE_TEST_UNSET_SECRET is not set"),
            "{e}"
        );
    }
}
