//! The pipeline registry: the last valid version of each pipeline in the
//! pipelines directory, what the daemon last read from each file, and the
//! reload that keeps both current (at start, on a file change, on SIGHUP).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use super::{Daemon, State, triggers};
use crate::definition::{self, Pipeline};
use crate::diagnostic::{Report, SourceFile, display_path};

/// A pipeline as the daemon runs it: the last valid version of its file.
pub struct Loaded {
    pub pipeline: Arc<Pipeline>,
    pub text: Arc<str>,
    pub path: PathBuf,
    pub loaded_at: i64,
    /// Cancelled when this version is replaced or removed: stops its triggers.
    pub(super) triggers: CancellationToken,
}

/// What the daemon last read from one pipeline file.
#[derive(Clone)]
pub struct FileState {
    pub digest: String,
    /// The pipeline this file defines (its last valid version, if any).
    pub pipeline: Option<String>,
    /// Diagnostics of the last read, rendered (`file:line:col: error: …`).
    pub errors: String,
    pub diagnostics: Vec<serde_json::Value>,
}

/// What reading one pipeline file gave.
enum Read {
    /// Its text is what was loaded last time: nothing to do.
    Unchanged,
    /// Nothing loads from it this time; the file's state says why.
    Rejected(FileState),
    Valid {
        pipeline: Box<Pipeline>,
        text: String,
        file: FileState,
    },
}

impl Daemon {
    /// Loaded pipelines, for the API: (pipeline, file path, loaded at).
    pub fn pipelines(&self) -> Vec<(Arc<Pipeline>, PathBuf, i64)> {
        self.state()
            .pipelines
            .values()
            .map(|l| (l.pipeline.clone(), l.path.clone(), l.loaded_at))
            .collect()
    }

    pub fn pipeline(&self, name: &str) -> Option<(Arc<Pipeline>, PathBuf)> {
        self.state()
            .pipelines
            .get(name)
            .map(|l| (l.pipeline.clone(), l.path.clone()))
    }

    pub fn files(&self) -> Vec<(PathBuf, FileState)> {
        self.state()
            .files
            .iter()
            .map(|(p, f)| (p.clone(), f.clone()))
            .collect()
    }

    /// Reads every pipeline file of the pipelines directory. Unchanged files are
    /// skipped; an invalid file is reported and its last valid version stays
    /// active; a removed file unloads its pipeline. Triggers of changed pipelines
    /// restart; runs already queued keep the version they were queued with.
    pub fn reload(self: &Arc<Self>) {
        self.reload_with(false)
    }

    /// `force` (SIGHUP) re-reads every file, also those whose text is unchanged:
    /// a wasm file or module they need may have appeared since.
    pub fn reload_with(self: &Arc<Self>, force: bool) {
        // Defence in depth: a bug anywhere in a reload must not take down the
        // daemon (SIGHUP, startup) or the watcher's task (hot reload); the
        // pipelines loaded so far stay loaded.
        let reload = std::panic::AssertUnwindSafe(|| self.reload_files(force));
        if let Err(panic) = std::panic::catch_unwind(reload) {
            tracing::error!(
                "reloading the pipelines failed: {}; the loaded pipelines stay as they were",
                panic_message(&*panic)
            );
        }
        // Counted after the reload, whatever it found: a test (or an operator)
        // that changed a file and sees the count move knows it was read.
        self.counters.reloaded();
    }

    fn reload_files(self: &Arc<Self>, force: bool) {
        let paths = pipeline_files(&self.config.pipelines);
        let env = match self.engine.environment() {
            Ok(e) => e,
            Err(e) => {
                tracing::error!("cannot read the module registry: {e}");
                return;
            }
        };
        let mut started: Vec<String> = Vec::new();
        let mut st = self.state();
        unload_gone(&mut st, &paths);
        for path in paths {
            let bytes = match std::fs::read(&path) {
                Ok(b) => b,
                Err(e) => {
                    tracing::error!("cannot read {}: {e}", display_path(&path));
                    continue;
                }
            };
            let previous = st.files.get(&path);
            match read(&path, bytes, previous, &env, force) {
                Read::Unchanged => {}
                Read::Rejected(file) => {
                    st.files.insert(path, file);
                }
                Read::Valid {
                    pipeline,
                    text,
                    file,
                } => started.extend(self.install(&mut st, path, pipeline, text, file)),
            }
        }
        warn_unknown_upstreams(&st);
        self.counters
            .keep_pipelines(|name| st.pipelines.contains_key(name));
        let to_start: Vec<(Arc<Pipeline>, CancellationToken)> = started
            .iter()
            .filter_map(|n| st.pipelines.get(n))
            .map(|l| (l.pipeline.clone(), l.triggers.clone()))
            .collect();
        drop(st);
        for (p, token) in to_start {
            triggers::start(self, p, token);
        }
    }

    /// Makes a valid pipeline the loaded version of its name, unless another
    /// file already defines that name. Returns the name whose triggers must start.
    fn install(
        &self,
        st: &mut State,
        path: PathBuf,
        p: Box<Pipeline>,
        text: String,
        mut file: FileState,
    ) -> Option<String> {
        let name = p.name.get_ref().clone();
        if let Some(other) = st.pipelines.get(&name)
            && other.path != path
        {
            let msg = format!(
                "{}: error: pipeline `{name}` is already defined by {}; names must be unique",
                display_path(&path),
                display_path(&other.path)
            );
            tracing::error!("{msg}");
            file.errors = msg.clone() + "\n";
            file.diagnostics = vec![error_at_start(&path, &msg)];
            file.pipeline = None;
            st.files.insert(path, file);
            return None;
        }
        // A file that renamed its pipeline unloads the old name.
        if let Some(old) = &file.pipeline
            && *old != name
            && let Some(l) = st.pipelines.remove(old)
        {
            l.triggers.cancel();
        }
        if let Some(l) = st.pipelines.remove(&name) {
            l.triggers.cancel();
        }
        tracing::info!(pipeline = %name, digest = %&p.digest[..12], "loaded {}", display_path(&path));
        file.pipeline = Some(name.clone());
        st.pipelines.insert(
            name.clone(),
            Loaded {
                pipeline: Arc::from(p),
                text: text.into(),
                path: path.clone(),
                loaded_at: crate::store::db::now_ms(),
                triggers: self.shutdown.child_token(),
            },
        );
        st.files.insert(path, file);
        Some(name)
    }
}

/// The `*.toml` files of the pipelines directory, sorted (none if it cannot be read).
fn pipeline_files(dir: &Path) -> Vec<PathBuf> {
    let mut paths: Vec<PathBuf> = match std::fs::read_dir(dir) {
        Ok(rd) => rd
            .filter_map(Result::ok)
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|e| e == "toml") && p.is_file())
            .collect(),
        Err(e) => {
            tracing::error!(dir = %dir.display(), "cannot read the pipelines directory: {e}");
            Vec::new()
        }
    };
    paths.sort();
    paths
}

/// Files that are gone unload their pipelines.
fn unload_gone(st: &mut State, paths: &[PathBuf]) {
    let gone: Vec<PathBuf> = st
        .files
        .keys()
        .filter(|p| !paths.contains(p))
        .cloned()
        .collect();
    for path in gone {
        if let Some(f) = st.files.remove(&path)
            && let Some(name) = f.pipeline
            && st.pipelines.get(&name).is_some_and(|l| l.path == path)
            && let Some(l) = st.pipelines.remove(&name)
        {
            l.triggers.cancel();
            tracing::info!(pipeline = %name, "{name} unloaded: {} was removed", display_path(&path));
        }
    }
}

/// Checks one file's bytes. `previous` is what was read from it last time.
fn read(
    path: &Path,
    bytes: Vec<u8>,
    previous: Option<&FileState>,
    env: &definition::Environment,
    force: bool,
) -> Read {
    let digest = blake3::hash(&bytes).to_hex().to_string();
    // Unchanged and loaded: nothing to do. An invalid or rejected file is
    // checked again (what it lacked, or its rival, may be gone).
    if !force
        && previous.is_some_and(|f| {
            f.digest == digest && f.diagnostics.iter().all(|d| d["severity"] != "error")
        })
    {
        return Read::Unchanged;
    }
    let keeps = previous.and_then(|f| f.pipeline.clone());
    let (parsed, report) = match SourceFile::decode(path, bytes) {
        Ok(source) => match check(path, &source.text, env) {
            Ok((parsed, report)) => (parsed.map(|p| (p, source.text)), report),
            Err(panic) => {
                // Not the user's mistake, but the file's last valid
                // version stays and the files after it still load.
                let msg = format!(
                    "{}:1:1: error: internal error while checking this file: {panic}",
                    display_path(path)
                );
                tracing::error!("{msg}; {}", what_stays(&keeps));
                return Read::Rejected(FileState {
                    digest,
                    pipeline: keeps,
                    errors: msg.clone() + "\n",
                    diagnostics: vec![error_at_start(path, &msg)],
                });
            }
        },
        Err(report) => (None, report),
    };
    let file = FileState {
        digest,
        pipeline: keeps,
        errors: report.to_string(),
        diagnostics: report.to_json(),
    };
    let Some((pipeline, text)) = parsed else {
        tracing::error!(
            "{} is invalid; {}:\n{}",
            display_path(path),
            what_stays(&file.pipeline),
            file.errors.trim_end()
        );
        return Read::Rejected(file);
    };
    if !report.diagnostics.is_empty() {
        tracing::warn!("{}", file.errors.trim_end());
    }
    Read::Valid {
        pipeline: Box::new(pipeline),
        text,
        file,
    }
}

fn what_stays(pipeline: &Option<String>) -> String {
    match pipeline {
        Some(n) => format!("pipeline `{n}` keeps its last valid version"),
        None => "nothing was loaded from it".to_string(),
    }
}

/// A diagnostic about the file as a whole, in the shape of [`Report::to_json`].
fn error_at_start(path: &Path, msg: &str) -> serde_json::Value {
    serde_json::json!({
        "file": display_path(path), "line": 1, "column": 1,
        "severity": "error", "message": msg, "help": null,
    })
}

/// `after = "x"` where no pipeline `x` is loaded: a warning, since it may come.
fn warn_unknown_upstreams(st: &State) {
    for l in st.pipelines.values() {
        for t in &l.pipeline.triggers {
            if let definition::TriggerKind::After { pipeline } = &t.kind
                && !st.pipelines.contains_key(pipeline.get_ref())
            {
                tracing::warn!(
                    pipeline = %l.pipeline.name.get_ref(),
                    "`after = \"{}\"`: no such pipeline is loaded (yet)",
                    pipeline.get_ref()
                );
            }
        }
    }
}

/// Checks a pipeline file's text; a panic in the checker (a bug) is caught and
/// returned as its message, so one file cannot stop the daemon or a reload.
pub(super) fn check(
    path: &Path,
    text: &str,
    env: &definition::Environment,
) -> Result<(Option<Pipeline>, Report), String> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        // The test of this defence (debug builds only): the checker panics on
        // the file named by MILLRACE_TEST_PANIC_IN_CHECK.
        #[cfg(debug_assertions)]
        if let Some(name) = std::env::var_os("MILLRACE_TEST_PANIC_IN_CHECK")
            && path.file_name() == Some(name.as_os_str())
        {
            panic!("injected by MILLRACE_TEST_PANIC_IN_CHECK");
        }
        crate::graph::parse(path, text.to_string(), env)
    }))
    .map_err(|panic| panic_message(&*panic))
}

fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic".to_string())
}
