//! The daemon: the long-running service behind `millrace daemon`.
//!
//! ```text
//! pipelines dir ──load/reload──▶ Registry (last valid version of each pipeline)
//!                                   │ starts/stops each pipeline's triggers
//! cron / watch / after / API ──▶ submit ──▶ runs row `queued` (+ trigger cursor, one tx)
//!                                   │ overlap: queue | skip | cancel
//! dispatcher ──▶ Engine::start (max_runs per pipeline, max_parallel_steps shared)
//! ```
//!
//! Everything a restart needs is in SQLite: queued runs, cron firings, watch
//! cursors. At start, runs left `running` by a crash become `interrupted` and
//! (with `resume_interrupted`) are queued again to finish, reusing what succeeded.

pub mod api;
pub mod metrics;
mod triggers;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::definition::{self, Overlap, Pipeline};
use crate::diagnostic::{Report, SourceFile, display_path};
use crate::model::{RunStatus, StepStatus};
use crate::run::{Datastores, Engine, Event, EventSink, RunRequest};
use crate::store::Store;
use crate::store::db::Batch;

/// A pipeline as the daemon runs it: the last valid version of its file.
pub struct Loaded {
    pub pipeline: Arc<Pipeline>,
    pub text: Arc<str>,
    pub path: PathBuf,
    pub loaded_at: i64,
    /// Cancelled when this version is replaced or removed: stops its triggers.
    triggers: CancellationToken,
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

struct Active {
    pipeline: String,
    cancel: CancellationToken,
}

#[derive(Default)]
struct State {
    pipelines: BTreeMap<String, Loaded>,
    files: BTreeMap<PathBuf, FileState>,
    active: HashMap<i64, Active>,
}

pub struct Daemon {
    pub config: Config,
    pub engine: Arc<Engine>,
    state: Mutex<State>,
    /// Wakes the dispatcher: a run was queued or finished.
    wake: tokio::sync::Notify,
    /// Cancelled on SIGTERM/SIGINT: triggers and the dispatcher stop.
    pub shutdown: CancellationToken,
    /// Wakes the shutdown sequence when a run ends.
    run_ended: tokio::sync::Notify,
    pub started: Instant,
    pub token: String,
    /// The one file watcher every watch trigger and the reloader share.
    watch: Arc<triggers::WatchHub>,
    pub metrics: metrics::Metrics,
}

/// What became of a firing or an API call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Submitted {
    Queued(i64),
    /// `overlap = "skip"` and the pipeline already has `max_runs` runs.
    Skipped(String),
}

#[derive(Debug, thiserror::Error)]
pub enum SubmitError {
    #[error("no pipeline named `{0}` is loaded")]
    NoSuchPipeline(String),
    #[error("{0}")]
    Params(String),
    #[error("the daemon is shutting down")]
    ShuttingDown,
    /// The pipeline no longer validates (a module version was disabled).
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    Store(String),
}

impl Daemon {
    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn store(&self) -> &Arc<Store> {
        &self.engine.store
    }

    /// Loaded pipelines, for the API: (pipeline, file path, text digest, loaded at).
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

    /// Runs executing now: (run id, pipeline).
    pub fn active_runs(&self) -> Vec<(i64, String)> {
        let mut v: Vec<(i64, String)> = self
            .state()
            .active
            .iter()
            .map(|(id, a)| (*id, a.pipeline.clone()))
            .collect();
        v.sort();
        v
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
    }

    fn reload_files(self: &Arc<Self>, force: bool) {
        let dir = &self.config.pipelines;
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
        let env = match self.engine.environment() {
            Ok(e) => e,
            Err(e) => {
                tracing::error!("cannot read the module registry: {e}");
                return;
            }
        };
        let mut started: Vec<String> = Vec::new();
        let mut st = self.state();
        // Files that are gone unload their pipelines.
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
                tracing::info!(pipeline = %name, "unloaded: {} was removed", display_path(&path));
            }
        }
        for path in paths {
            let bytes = match std::fs::read(&path) {
                Ok(b) => b,
                Err(e) => {
                    tracing::error!("cannot read {}: {e}", display_path(&path));
                    continue;
                }
            };
            let digest = blake3::hash(&bytes).to_hex().to_string();
            let previous = st.files.get(&path).cloned();
            // Unchanged and loaded: nothing to do. An invalid or rejected file is
            // checked again (what it lacked, or its rival, may be gone).
            if !force
                && previous.as_ref().is_some_and(|f| {
                    f.digest == digest && f.diagnostics.iter().all(|d| d["severity"] != "error")
                })
            {
                continue;
            }
            let (parsed, report) = match SourceFile::decode(&path, bytes) {
                Ok(source) => match check(&path, &source.text, &env) {
                    Ok((parsed, report)) => (parsed.map(|p| (p, source.text)), report),
                    Err(panic) => {
                        // Not the user's mistake, but the file's last valid
                        // version stays and the files after it still load.
                        let msg = format!(
                            "{}:1:1: error: internal error while checking this file: {panic}",
                            display_path(&path)
                        );
                        let pipeline = previous.as_ref().and_then(|f| f.pipeline.clone());
                        tracing::error!(
                            "{msg}; {}",
                            match &pipeline {
                                Some(n) => format!("pipeline `{n}` keeps its last valid version"),
                                None => "nothing was loaded from it".to_string(),
                            }
                        );
                        let file = FileState {
                            digest,
                            pipeline,
                            errors: msg.clone() + "\n",
                            diagnostics: vec![serde_json::json!({
                                "file": display_path(&path), "line": 1, "column": 1,
                                "severity": "error", "message": msg, "help": null,
                            })],
                        };
                        st.files.insert(path, file);
                        continue;
                    }
                },
                Err(report) => (None, report),
            };
            let mut file = FileState {
                digest,
                pipeline: previous.as_ref().and_then(|f| f.pipeline.clone()),
                errors: report.to_string(),
                diagnostics: report.to_json(),
            };
            let Some((p, text)) = parsed else {
                tracing::error!(
                    "{} is invalid; {}:\n{}",
                    display_path(&path),
                    match &file.pipeline {
                        Some(n) => format!("pipeline `{n}` keeps its last valid version"),
                        None => "nothing was loaded from it".to_string(),
                    },
                    file.errors.trim_end()
                );
                st.files.insert(path, file);
                continue;
            };
            if !report.diagnostics.is_empty() {
                tracing::warn!("{}", file.errors.trim_end());
            }
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
                file.diagnostics = vec![serde_json::json!({
                    "file": display_path(&path), "line": 1, "column": 1,
                    "severity": "error", "message": msg, "help": null,
                })];
                file.pipeline = None;
                st.files.insert(path, file);
                continue;
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
                    pipeline: Arc::new(p),
                    text: text.into(),
                    path: path.clone(),
                    loaded_at: crate::store::db::now_ms(),
                    triggers: self.shutdown.child_token(),
                },
            );
            st.files.insert(path, file);
            started.push(name);
        }
        let names: Vec<String> = st.pipelines.keys().cloned().collect();
        for l in st.pipelines.values() {
            for t in &l.pipeline.triggers {
                if let definition::TriggerKind::After { pipeline } = &t.kind
                    && !names.contains(pipeline.get_ref())
                {
                    tracing::warn!(
                        pipeline = %l.pipeline.name.get_ref(),
                        "`after = \"{}\"`: no such pipeline is loaded (yet)",
                        pipeline.get_ref()
                    );
                }
            }
        }
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

    /// A trigger or an API call asks for a run of `name`. `also` writes the
    /// trigger's cursor in the same transaction as the run (or alone when the
    /// firing is skipped), so a firing is never lost nor doubled.
    pub fn submit(
        &self,
        name: &str,
        mut req: RunRequest,
        also: impl FnOnce(&Batch<'_>) -> crate::store::db::Result<()>,
    ) -> Result<Submitted, SubmitError> {
        // A downstream run of an `after` trigger is queued even while stopping: the
        // queue survives the restart, the upstream success would not fire again.
        if self.shutdown.is_cancelled() && !req.trigger.starts_with("after ") {
            return Err(SubmitError::ShuttingDown);
        }
        let st = self.state();
        let l = st
            .pipelines
            .get(name)
            .ok_or_else(|| SubmitError::NoSuchPipeline(name.to_string()))?;
        // Checked again against the registry as it is now: a module's default may
        // have moved, or its version been disabled, since the file was loaded.
        let env = self
            .engine
            .environment()
            .map_err(|e| SubmitError::Store(e.to_string()))?;
        let p = match check(&l.path, &l.text, &env) {
            Ok((Some(p), _)) => Arc::new(p),
            Ok((None, report)) => return Err(SubmitError::Invalid(report.to_string())),
            Err(panic) => {
                return Err(SubmitError::Invalid(format!(
                    "internal error while checking the pipeline: {panic}"
                )));
            }
        };
        // Details of the firing become params where the pipeline declares them
        // (`changed`, `scheduled`, `missed_from`, …).
        if let Some(serde_json::Value::Object(detail)) = &req.trigger_detail {
            for (k, v) in detail {
                if p.params.iter().any(|x| x.name.get_ref() == k)
                    && !req.params.iter().any(|(n, _)| n == k)
                {
                    let text = match v {
                        serde_json::Value::String(s) => s.clone(),
                        serde_json::Value::Array(a) => a
                            .iter()
                            .map(|x| x.as_str().map_or_else(|| x.to_string(), str::to_string))
                            .collect::<Vec<_>>()
                            .join("\n"),
                        other => other.to_string(),
                    };
                    req.params.push((k.clone(), text));
                }
            }
        }
        p.resolve_params(&req.params).map_err(SubmitError::Params)?;
        let store_err = |e: crate::run::RunError| SubmitError::Store(e.to_string());
        let busy: Vec<i64> = st
            .active
            .iter()
            .filter(|(_, a)| a.pipeline == name)
            .map(|(id, _)| *id)
            .collect();
        let queued = self
            .store()
            .db()
            .read()
            .runs_with_status(RunStatus::Queued)
            .map_err(|e| SubmitError::Store(e.to_string()))?
            .into_iter()
            .filter(|r| r.pipeline == name)
            .count();
        let max = p.concurrency.max_runs as usize;
        match p.concurrency.overlap {
            Overlap::Skip if busy.len() + queued >= max => {
                self.store()
                    .db()
                    .batch(also)
                    .map_err(|e| SubmitError::Store(e.to_string()))?;
                let why = format!(
                    "skipped: `{name}` already has {} run(s) (max_runs = {max}, overlap = \"skip\")",
                    busy.len() + queued
                );
                tracing::info!(pipeline = %name, trigger = %req.trigger, "{why}");
                return Ok(Submitted::Skipped(why));
            }
            Overlap::Cancel if busy.len() + queued >= max => {
                // The newest request wins: queued runs are dropped, running ones
                // cancelled; the new run starts when they have stopped.
                let db = self.store().db();
                for r in db
                    .read()
                    .runs_with_status(RunStatus::Queued)
                    .unwrap_or_default()
                {
                    if r.pipeline == name {
                        let _ = db.read().set_run_status(
                            r.id,
                            RunStatus::Cancelled,
                            Some("superseded by a newer run (overlap = \"cancel\")"),
                        );
                    }
                }
                drop(db);
                for id in &busy {
                    if let Some(a) = st.active.get(id) {
                        tracing::info!(pipeline = %name, run = id, "cancelling: a newer run supersedes it");
                        a.cancel.cancel();
                    }
                }
            }
            _ => {}
        }
        let id = self
            .engine
            .enqueue(&p, &l.text, &l.path, &req, also)
            .map_err(store_err)?;
        drop(st);
        tracing::info!(pipeline = %name, run = id, trigger = %req.trigger, "queued");
        self.wake.notify_one();
        Ok(Submitted::Queued(id))
    }

    /// Cancels a queued or running run. Returns false if it was neither.
    pub fn cancel(&self, run: i64) -> Result<bool, SubmitError> {
        // Under the state lock: the dispatcher starts a queued run only under it
        // (after checking it is still queued), so a cancel cannot slip between.
        let st = self.state();
        if let Some(a) = st.active.get(&run) {
            a.cancel.cancel();
            return Ok(true);
        }
        let db = self.store().db();
        let r = db
            .read()
            .run(run)
            .map_err(|e| SubmitError::Store(e.to_string()))?;
        if r.is_some_and(|r| r.status == RunStatus::Queued) {
            db.read()
                .set_run_status(
                    run,
                    RunStatus::Cancelled,
                    Some("cancelled before it started"),
                )
                .map_err(|e| SubmitError::Store(e.to_string()))?;
            return Ok(true);
        }
        Ok(false)
    }

    /// Starts queued runs, oldest first, while their pipelines are under
    /// `max_runs`. Runs of pipelines no longer loaded still start (their
    /// definition is recorded), one at a time.
    async fn dispatch(self: Arc<Self>) {
        loop {
            tokio::select! {
                () = self.wake.notified() => {}
                () = self.shutdown.cancelled() => return,
            }
            let queued = match self.store().db().read().runs_with_status(RunStatus::Queued) {
                Ok(q) => q,
                Err(e) => {
                    tracing::error!("cannot read the queue: {e}");
                    continue;
                }
            };
            for run in queued {
                let mut st = self.state();
                let max = st
                    .pipelines
                    .get(&run.pipeline)
                    .map_or(1, |l| l.pipeline.concurrency.max_runs as usize);
                let busy = st
                    .active
                    .values()
                    .filter(|a| a.pipeline == run.pipeline)
                    .count();
                if busy >= max || st.active.contains_key(&run.id) {
                    continue;
                }
                // Cancelled since the queue was read?
                let still_queued = self
                    .store()
                    .db()
                    .read()
                    .run(run.id)
                    .ok()
                    .flatten()
                    .is_some_and(|r| r.status == RunStatus::Queued);
                if !still_queued {
                    continue;
                }
                let cancel = CancellationToken::new();
                st.active.insert(
                    run.id,
                    Active {
                        pipeline: run.pipeline.clone(),
                        cancel: cancel.clone(),
                    },
                );
                drop(st);
                let d = self.clone();
                tokio::spawn(async move { d.drive(run.id, run.pipeline, cancel).await });
            }
        }
    }

    /// Runs one queued run to its end, then lets `after` triggers fire.
    async fn drive(self: Arc<Self>, id: i64, pipeline: String, cancel: CancellationToken) {
        tracing::info!(pipeline = %pipeline, run = id, "started");
        self.metrics.run_started(&pipeline);
        // In its own task: a panic in the engine fails this run instead of
        // leaving it `running` with its pipeline blocked.
        let engine = self.engine.clone();
        let result =
            match tokio::spawn(async move { engine.start(id, log_events(id), cancel).await }).await
            {
                Ok(r) => r,
                Err(e) => Err(crate::run::RunError::Params(format!(
                    "the engine failed unexpectedly: {e}"
                ))),
            };
        let succeeded = match result {
            Ok(s) => {
                tracing::info!(
                    pipeline = %pipeline, run = id, status = %s.status,
                    executed = s.executed, reused = s.reused, failed = s.failed,
                    "finished in {:.2}s", s.seconds
                );
                s.status == RunStatus::Succeeded
            }
            Err(e @ crate::run::RunError::Busy(_)) => {
                // Another process (`millrace resume`) drives it: its status is theirs.
                tracing::warn!(pipeline = %pipeline, run = id, "{e}");
                false
            }
            Err(e) => {
                tracing::error!(pipeline = %pipeline, run = id, "cannot run: {e}");
                // A run that could not even start (its definition no longer
                // parses, an input is missing) must not stay queued forever.
                // One guard at a time: the db mutex is not re-entrant (a guard in
                // an `if let` condition lives through its body).
                let db = self.store().db();
                if let Ok(Some(r)) = db.read().run(id)
                    && !r.status.is_terminal()
                {
                    let _ = db
                        .read()
                        .set_run_status(id, RunStatus::Failed, Some(&e.to_string()));
                }
                drop(db);
                false
            }
        };
        self.state().active.remove(&id);
        {
            let db = self.store().db();
            if let (Ok(Some(run)), Ok(steps)) = (db.read().run(id), db.read().steps(id)) {
                drop(db);
                self.metrics.run_finished(&run, &steps);
            }
        }
        if succeeded {
            self.fire_after(&pipeline, id);
        }
        self.wake.notify_one();
        self.run_ended.notify_waiters();
    }

    /// `after = "pipeline"` triggers: fire when that pipeline's run succeeds.
    fn fire_after(&self, upstream: &str, run: i64) {
        // The chain of `after` firings that led here: a pipeline already in it is
        // not fired again (a cycle of `after` triggers would run forever).
        let mut chain: Vec<String> = self
            .store()
            .db()
            .read()
            .run(run)
            .ok()
            .flatten()
            .and_then(|r| r.trigger_detail)
            .and_then(|d| serde_json::from_value(d["chain"].clone()).ok())
            .unwrap_or_default();
        chain.push(upstream.to_string());
        let downstream: Vec<(String, Vec<(String, String)>)> = self
            .state()
            .pipelines
            .values()
            .flat_map(|l| {
                l.pipeline
                    .triggers
                    .iter()
                    .filter_map(move |t| match &t.kind {
                        definition::TriggerKind::After { pipeline }
                            if pipeline.get_ref() == upstream =>
                        {
                            Some((l.pipeline.name.get_ref().clone(), t.param_overrides()))
                        }
                        _ => None,
                    })
            })
            .collect();
        for (name, params) in downstream {
            if chain.contains(&name) {
                tracing::warn!(
                    pipeline = %name,
                    "not fired: `after` triggers form a cycle ({} -> {name})",
                    chain.join(" -> ")
                );
                continue;
            }
            let req = RunRequest {
                params,
                no_reuse: false,
                trigger: format!("after {upstream}"),
                trigger_detail: Some(serde_json::json!({
                    "upstream_pipeline": upstream,
                    "upstream_run": run,
                    "chain": chain,
                })),
            };
            if let Err(e) = self.submit(&name, req, |_| Ok(())) {
                tracing::error!(pipeline = %name, "after `{upstream}`: {e}");
            }
        }
    }

    /// At start: runs a crash left `running` are `interrupted`; interrupted runs
    /// the daemon owned are queued again to finish (`resume_interrupted`), unless
    /// the process already stopped [`MAX_CRASHES`] times while running them.
    fn recover(&self) -> anyhow::Result<()> {
        let mut db = self.store().db();
        for r in db.read().runs_with_status(RunStatus::Running)? {
            if crate::run::RunLock::is_held(self.store(), r.id) {
                continue; // a `millrace run` in another process
            }
            // Counted before the run is resumed: if the resume kills the process
            // too, the next start knows.
            let crashes = db
                .read()
                .record_crash(r.id, "the process running it stopped (crash or kill)")?;
            tracing::warn!(pipeline = %r.pipeline, run = r.id, crashes, "interrupted: its process stopped while it was running");
        }
        if self.config.resume_interrupted {
            for r in db.read().runs_with_status(RunStatus::Interrupted)? {
                if r.trigger == "cli" {
                    continue; // `millrace resume` is the owner's call
                }
                if db.read().run_crashes(r.id)? >= MAX_CRASHES {
                    let running: Vec<String> = db
                        .read()
                        .steps(r.id)?
                        .into_iter()
                        .filter(|s| s.status == StepStatus::Running)
                        .map(|s| format!("`{}`", s.name))
                        .collect();
                    let during = match running.len() {
                        0 => String::new(),
                        1 => format!(" (step {} was running)", running[0]),
                        _ => format!(" (steps {} were running)", running.join(", ")),
                    };
                    let msg = format!(
                        "the engine stopped while running this run twice after it was resumed{during}; \
                         it is not resumed again (`millrace resume {}` tries once more)",
                        r.id
                    );
                    tracing::error!(pipeline = %r.pipeline, run = r.id, "failed: {msg}");
                    db.batch(|b| b.fail_abandoned_run(r.id, &msg))?;
                    continue;
                }
                tracing::info!(pipeline = %r.pipeline, run = r.id, "queued to resume");
                db.read().set_run_status(r.id, RunStatus::Queued, None)?;
            }
        }
        Ok(())
    }
}

/// How many times the process may stop while running one run before the daemon
/// stops resuming it: the first stop can be anything (a kill, the OOM killer, a
/// power cut); two more while it was being resumed mean the run itself is what
/// takes the process down (a step that aborts it), and resuming it again would
/// crash-loop the service until systemd gives up (start-limit-hit).
pub const MAX_CRASHES: i64 = 3;

/// Checks a pipeline file's text; a panic in the checker (a bug) is caught and
/// returned as its message, so one file cannot stop the daemon or a reload.
fn check(
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

/// Step events go to the log.
fn log_events(run: i64) -> EventSink {
    Arc::new(move |e: &Event| match e {
        Event::RunStarted { .. } => {}
        Event::StepStarted { step, attempt } => {
            tracing::debug!(run, step = %step, attempt, "step started");
        }
        Event::StepFinished {
            step,
            status,
            detail,
            elapsed,
        } => match status {
            StepStatus::Failed => {
                tracing::warn!(run, step = %step, "step failed after {:.2}s: {detail}", elapsed.as_secs_f64())
            }
            _ => tracing::debug!(run, step = %step, status = %status, "{detail}"),
        },
    })
}

/// Where a running daemon can be reached: written to `<state>/daemon.json` once
/// the listener is bound, removed at exit.
pub fn endpoint_file(state_dir: &Path) -> PathBuf {
    state_dir.join("daemon.json")
}

/// Reads the API token, creating `<state>/api-token` (0600) on first start when
/// the config names no token file.
fn load_token(config: &Config) -> anyhow::Result<String> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let path = config.token_path();
    match std::fs::read_to_string(&path) {
        Ok(t) if !t.trim().is_empty() => return Ok(t.trim().to_string()),
        Ok(_) => anyhow::bail!("the API token file {} is empty", path.display()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && config.api.token_file.is_none() => {}
        Err(e) => anyhow::bail!("cannot read the API token file {}: {e}", path.display()),
    }
    let mut bytes = [0u8; 32];
    let mut f = std::fs::File::open("/dev/urandom")?;
    std::io::Read::read_exact(&mut f, &mut bytes)?;
    let token = blake3::hash(&bytes).to_hex().to_string();
    let mut out = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)?;
    out.write_all(token.as_bytes())?;
    out.write_all(b"\n")?;
    tracing::info!("created the API token file {}", path.display());
    Ok(token)
}

/// `millrace daemon`: runs until SIGTERM/SIGINT.
pub async fn serve(config: Config) -> anyhow::Result<()> {
    let store = Arc::new(Store::open(&config.state_dir)?);
    // One daemon per state directory: two would fire every trigger twice.
    let lock_path = config.state_dir.join("daemon.lock");
    let _lock = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)?;
    if _lock.try_lock().is_err() {
        anyhow::bail!(
            "another millrace daemon is using the state directory {} (it holds {})",
            config.state_dir.display(),
            lock_path.display()
        );
    }
    let datastores = Datastores {
        paths: config
            .datastores
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
    };
    let mut engine = Engine::new(store, config.max_parallel_steps, datastores);
    engine.computes = config.computes.clone();
    let engine = Arc::new(engine);
    let token = load_token(&config)?;
    let listener = tokio::net::TcpListener::bind(config.api.listen)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {}: {e}", config.api.listen))?;
    let addr = listener.local_addr()?;
    if !addr.ip().is_loopback() && config.api.public_read {
        tracing::warn!(
            "the API listens on {addr}, which is not a loopback address, and `public_read = true`: \
             anyone who can reach it reads every pipeline, run, param and step log without a token; \
             set `public_read = false` in [api], or listen on 127.0.0.1 behind a proxy that authenticates"
        );
    }
    let d = Arc::new(Daemon {
        config,
        engine,
        state: Mutex::new(State::default()),
        wake: tokio::sync::Notify::new(),
        shutdown: CancellationToken::new(),
        run_ended: tokio::sync::Notify::new(),
        started: Instant::now(),
        token,
        watch: triggers::WatchHub::new(),
        metrics: metrics::Metrics::new(),
    });
    d.recover()?;
    // Containers of steps that were running when the last process died: found by
    // label and removed before their runs resume.
    let orphans = d.engine.remove_orphan_containers().await;
    if orphans > 0 {
        tracing::warn!(
            count = orphans,
            "removed containers left by interrupted steps"
        );
    }
    d.reload();
    tokio::spawn(d.clone().dispatch());
    d.wake.notify_one();
    triggers::watch_pipelines_dir(&d);

    let server = tokio::spawn(api::serve(
        listener,
        api::router(d.clone()),
        d.shutdown.clone(),
    ));
    let endpoint = endpoint_file(&d.config.state_dir);
    let url = format!("http://{addr}");
    let _ = std::fs::write(
        &endpoint,
        serde_json::json!({ "url": url, "pid": std::process::id() }).to_string(),
    );
    tracing::info!(
        "millrace daemon ready: {} pipeline(s), API on {url}",
        d.state().pipelines.len()
    );
    let _ = sd_notify::notify(&[sd_notify::NotifyState::Ready]);
    let watchdog = triggers::watchdog(&d);

    // SIGHUP reloads; SIGTERM/SIGINT stop.
    let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())?;
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    loop {
        tokio::select! {
            _ = hup.recv() => {
                tracing::info!("SIGHUP: reloading pipelines");
                let _ = sd_notify::notify(&[sd_notify::NotifyState::Reloading]);
                d.reload_with(true);
                let _ = sd_notify::notify(&[sd_notify::NotifyState::Ready]);
            }
            _ = term.recv() => break,
            _ = tokio::signal::ctrl_c() => break,
        }
    }
    let _ = sd_notify::notify(&[sd_notify::NotifyState::Stopping]);
    shutdown(&d).await;
    watchdog.abort();
    let _ = server.await;
    let _ = std::fs::remove_file(&endpoint);
    Ok(())
}

/// Stops triggers, lets running steps finish until the grace deadline, then
/// stops them; their runs end `interrupted`. Queued runs stay queued.
async fn shutdown(d: &Arc<Daemon>) {
    let grace = d.config.shutdown_grace;
    let running = d.state().active.len();
    tracing::info!(
        "stopping: no new triggers or steps; {running} run(s) have {}s to finish their running steps",
        grace.as_secs()
    );
    d.shutdown.cancel();
    d.engine.drain();
    let deadline = tokio::time::Instant::now() + grace;
    loop {
        let ended = d.run_ended.notified();
        if d.state().active.is_empty() {
            break;
        }
        tokio::select! {
            () = ended => {}
            () = tokio::time::sleep_until(deadline) => {
                {
                    let st = d.state();
                    tracing::warn!("grace period over: stopping {} run(s)", st.active.len());
                    for a in st.active.values() {
                        a.cancel.cancel();
                    }
                }
                // Cancelled steps stop within milliseconds (epoch interruption).
                let _ = tokio::time::timeout(Duration::from_secs(10), async {
                    while !d.state().active.is_empty() {
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                })
                .await;
                break;
            }
        }
    }
    tracing::info!("stopped");
}
