//! The run queue: admission (`submit`, with each pipeline's overlap policy),
//! `cancel`, and the dispatcher that starts queued runs under `max_runs` and
//! drives each to its end.

use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use super::{Active, Daemon, State};
use crate::definition::{Overlap, Pipeline};
use crate::engine::{Event, EventSink, RunError, RunRequest};
use crate::model::{RunStatus, StepStatus};
use crate::store::db::{Batch, DbError};

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
    /// The trigger's cursor had moved since it was read: another daemon (or an
    /// earlier firing of this one) consumed this firing, and nothing was queued.
    #[error("{0}")]
    AlreadyFired(String),
    #[error("{0}")]
    Store(String),
}

impl From<DbError> for SubmitError {
    fn from(e: DbError) -> SubmitError {
        match e {
            DbError::Conflict(msg) => SubmitError::AlreadyFired(msg),
            e => SubmitError::Store(e.to_string()),
        }
    }
}

impl From<RunError> for SubmitError {
    fn from(e: RunError) -> SubmitError {
        match e {
            RunError::Db(e) => e.into(),
            e => SubmitError::Store(e.to_string()),
        }
    }
}

impl Daemon {
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
        let env = self.engine.environment()?;
        let p = match super::pipelines::check(&l.path, &l.text, &env) {
            Ok((Some(p), _)) => Arc::new(p),
            Ok((None, report)) => return Err(SubmitError::Invalid(report.to_string())),
            Err(panic) => {
                return Err(SubmitError::Invalid(format!(
                    "internal error while checking the pipeline: {panic}"
                )));
            }
        };
        firing_params(&p, &mut req);
        p.resolve_params(&req.params).map_err(SubmitError::Params)?;
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
            .runs_with_status(RunStatus::Queued)?
            .into_iter()
            .filter(|r| r.pipeline == name)
            .count();
        let max = p.concurrency.max_runs as usize;
        match p.concurrency.overlap {
            Overlap::Skip if busy.len() + queued >= max => {
                self.store().db().batch(also)?;
                let why = format!(
                    "skipped: `{name}` already has {} run(s) (max_runs = {max}, overlap = \"skip\")",
                    busy.len() + queued
                );
                tracing::info!(pipeline = %name, trigger = %req.trigger, "{name} not queued ({}): {why}", req.trigger);
                return Ok(Submitted::Skipped(why));
            }
            Overlap::Cancel if busy.len() + queued >= max => self.supersede(&st, name, &busy),
            _ => {}
        }
        let id = self.engine.enqueue(&p, &l.text, &l.path, &req, also)?;
        drop(st);
        tracing::info!(pipeline = %name, run = id, trigger = %req.trigger, "run {id} of {name} queued ({})", req.trigger);
        self.wake.notify_one();
        Ok(Submitted::Queued(id))
    }

    /// `overlap = "cancel"`: the newest request wins. Queued runs are dropped,
    /// running ones cancelled; the new run starts when they have stopped.
    fn supersede(&self, st: &State, name: &str, busy: &[i64]) {
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
        for id in busy {
            if let Some(a) = st.active.get(id) {
                tracing::info!(pipeline = %name, run = id, "run {id} of {name} cancelling: a newer run supersedes it");
                a.cancel.cancel();
            }
        }
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
        let r = db.read().run(run)?;
        if r.is_some_and(|r| r.status == RunStatus::Queued) {
            db.read().set_run_status(
                run,
                RunStatus::Cancelled,
                Some("cancelled before it started"),
            )?;
            return Ok(true);
        }
        Ok(false)
    }

    /// Queues a failed, cancelled or interrupted run to finish, reusing what
    /// succeeded (as `millrace resume` does, under the daemon's slots and the
    /// pipeline's concurrency). `Err(reason)` when it cannot be resumed.
    pub fn resume(&self, run: i64) -> Result<Result<(), String>, SubmitError> {
        if self.shutdown.is_cancelled() {
            return Err(SubmitError::ShuttingDown);
        }
        // Under the state lock, as `cancel`: the dispatcher picks queued runs under it.
        let st = self.state();
        if st.active.contains_key(&run) {
            // Also for a moment after its status is final: the daemon is still
            // recording its end.
            return Ok(Err(format!("run {run} is running or finishing; try again")));
        }
        let db = self.store().db();
        let Some(r) = db.read().run(run)? else {
            return Ok(Err(format!("no run {run}")));
        };
        let shown = r
            .status
            .shown(|| crate::engine::RunLock::is_held(self.store(), run));
        match shown {
            RunStatus::Failed | RunStatus::Cancelled | RunStatus::Interrupted => {}
            s => {
                return Ok(Err(format!(
                    "run {run} is {s}: only a failed, cancelled or interrupted run can be resumed"
                )));
            }
        }
        db.read().set_run_status(run, RunStatus::Queued, None)?;
        drop(db);
        drop(st);
        self.wake.notify_one();
        Ok(Ok(()))
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

    /// Starts queued runs, oldest first, while their pipelines are under
    /// `max_runs`. Runs of pipelines no longer loaded still start (their
    /// definition is recorded), one at a time.
    pub(super) async fn dispatch(self: Arc<Self>) {
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
        tracing::info!(pipeline = %pipeline, run = id, "run {id} of {pipeline} started");
        self.metrics.run_started(&pipeline);
        // In its own task: a panic in the engine fails this run instead of
        // leaving it `running` with its pipeline blocked.
        let engine = self.engine.clone();
        let result =
            match tokio::spawn(async move { engine.start(id, log_events(id), cancel).await }).await
            {
                Ok(r) => r,
                Err(e) => Err(RunError::Params(format!(
                    "the engine failed unexpectedly: {e}"
                ))),
            };
        let succeeded = match result {
            Ok(s) => {
                tracing::info!(
                    pipeline = %pipeline, run = id, status = %s.status,
                    executed = s.executed, reused = s.reused, failed = s.failed,
                    "run {id} of {pipeline} {} in {:.2}s: {} executed, {} reused, {} failed",
                    s.status, s.seconds, s.executed, s.reused, s.failed
                );
                s.status == RunStatus::Succeeded
            }
            Err(e @ RunError::Busy(_)) => {
                // Another process (`millrace resume`) drives it: its status is theirs.
                tracing::warn!(pipeline = %pipeline, run = id, "run {id} of {pipeline}: {e}");
                false
            }
            Err(e) => {
                tracing::error!(pipeline = %pipeline, run = id, "run {id} of {pipeline} cannot run: {e}");
                self.fail_unstarted(id, &e);
                false
            }
        };
        self.state().active.remove(&id);
        {
            let db = self.store().db();
            if let (Ok(Some(run)), Ok(steps)) = (db.read().run(id), db.read().steps(id)) {
                // A foreach step's items, by step.
                let items: Vec<(String, Vec<crate::store::db::ItemRow>)> = steps
                    .iter()
                    .filter_map(|s| Some((s.name.clone(), db.read().items(id, &s.name).ok()?)))
                    .filter(|(_, rows)| !rows.is_empty())
                    .collect();
                drop(db);
                self.metrics.run_finished(&run, &steps);
                self.metrics.items_finished(&run.pipeline, &items);
            }
        }
        if succeeded {
            self.fire_after(&pipeline, id);
        }
        // Counted once the `after` triggers had their say: what this run fires is
        // queued by then.
        self.counters.run_ended();
        self.wake.notify_one();
        self.run_ended.notify_waiters();
    }

    /// A run that could not even start (its definition no longer parses, an
    /// input is missing) must not stay queued forever.
    fn fail_unstarted(&self, id: i64, e: &RunError) {
        // One guard at a time: the db mutex is not re-entrant (a guard in an
        // `if let` condition lives through its body).
        let db = self.store().db();
        if let Ok(Some(r)) = db.read().run(id)
            && !r.status.is_terminal()
        {
            let _ = db
                .read()
                .set_run_status(id, RunStatus::Failed, Some(&e.to_string()));
        }
    }
}

/// Details of the firing become params where the pipeline declares them
/// (`changed`, `scheduled`, `missed_from`, …), unless the request sets them.
fn firing_params(p: &Pipeline, req: &mut RunRequest) {
    let Some(serde_json::Value::Object(detail)) = &req.trigger_detail else {
        return;
    };
    for (k, v) in detail {
        if p.params.iter().any(|x| x.name.get_ref() == k) && !req.params.iter().any(|(n, _)| n == k)
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

/// Step events go to the log.
fn log_events(run: i64) -> EventSink {
    Arc::new(move |e: &Event| match e {
        Event::RunStarted { .. } => {}
        Event::StepStarted { step, attempt } => {
            tracing::debug!(run, step = %step, attempt, "run {run} step {step} started (attempt {attempt})");
        }
        Event::StepFinished {
            step,
            status,
            detail,
            elapsed,
        } => match status {
            StepStatus::Failed => {
                tracing::warn!(run, step = %step, "run {run} step {step} failed after {:.2}s: {detail}", elapsed.as_secs_f64())
            }
            _ => {
                tracing::debug!(run, step = %step, status = %status, "run {run} step {step} {status}: {detail}")
            }
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_moved_cursor_is_already_fired_and_keeps_its_message() {
        let conflict = DbError::Conflict("trigger `t` of `p` fired elsewhere".into());
        let e = SubmitError::from(RunError::Db(conflict));
        assert!(matches!(e, SubmitError::AlreadyFired(_)), "{e:?}");
        assert_eq!(e.to_string(), "trigger `t` of `p` fired elsewhere");
        let e = SubmitError::from(DbError::TooNew { found: 9, known: 1 });
        assert!(matches!(e, SubmitError::Store(_)), "{e:?}");
    }

    /// The path a cron or watch task takes when another task (a reload's
    /// replacement, another daemon) consumed the firing first.
    #[test]
    fn a_firing_whose_cursor_moved_elsewhere_queues_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let noop = concat!(env!("CARGO_MANIFEST_DIR"), "/../plugins/dist/noop.wasm");
        std::fs::create_dir_all(dir.path().join("pipelines")).unwrap();
        std::fs::write(
            dir.path().join("pipelines/p.toml"),
            format!("[[step]]\nname = \"a\"\nwasm = \"{noop}\"\n"),
        )
        .unwrap();
        let config_path = dir.path().join("millrace.toml");
        std::fs::write(
            &config_path,
            "pipelines = \"pipelines\"\nstate_dir = \".state\"\n",
        )
        .unwrap();
        let (config, report) = crate::config::load(&config_path).unwrap();
        let config = config.unwrap_or_else(|| panic!("{report}"));
        let store = Arc::new(crate::store::Store::open(&config.state_dir).unwrap());
        let engine_config =
            crate::engine::EngineConfig::new(config.max_parallel_steps).with_config(&config);
        let d = Arc::new(Daemon::new(config, store, engine_config).unwrap());
        d.reload();
        assert!(
            d.pipeline("p").is_some(),
            "{:?}",
            d.files().first().map(|f| &f.1.errors)
        );
        d.store()
            .db()
            .read()
            .advance_trigger("p", "cron x", None, 1)
            .unwrap();
        let req = RunRequest {
            params: Vec::new(),
            no_reuse: false,
            trigger: "cron x".into(),
            trigger_detail: None,
        };
        // This task read the cursor as 0; it is 1 now.
        let e = d
            .submit("p", req, |b| b.advance_trigger("p", "cron x", Some(0), 2))
            .unwrap_err();
        assert!(matches!(e, SubmitError::AlreadyFired(_)), "{e:?}");
        let queued = d.store().db().read().runs_with_status(RunStatus::Queued);
        assert!(queued.unwrap().is_empty());
    }
}
