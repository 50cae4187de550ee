//! A run's lifecycle: created (running at once, or queued for the daemon),
//! started, resumed from its recorded definition; then, holding the run lock
//! and the store lock, its steps recorded, its inputs snapshotted and its
//! [`Schedule`] driven to the end.

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use super::scheduler::Schedule;
use super::{
    Engine, Event, EventSink, RunContext, RunError, RunLock, RunRequest, RunSummary, remove_tree,
};
use crate::definition::{ParamValue, Pipeline, StepKind};
use crate::executor::workspace::WorkspacePool;
use crate::graph::Graph;
use crate::model::{RunStatus, StepStatus};
use crate::planner::{self, InputMode, Known, Planner};
use crate::store::StoreError;
use crate::store::db::NewRun;

impl Engine {
    /// Starts a new run of `p` (read from `text`) and drives it to the end.
    pub async fn run(
        self: &Arc<Self>,
        p: &Pipeline,
        text: &str,
        path: &Path,
        req: RunRequest,
        events: EventSink,
        cancel: tokio_util::sync::CancellationToken,
    ) -> Result<RunSummary, RunError> {
        let params = p.resolve_params(&req.params).map_err(RunError::Params)?;
        let run_id =
            self.create_run(p, text, path, &req, &params, RunStatus::Running, |_| Ok(()))?;
        self.execute(
            run_id,
            Arc::new(p.clone()),
            params,
            req.no_reuse,
            events,
            cancel,
        )
        .await
    }

    /// Records a new run of `p` as `queued`, with the definition it will run, and in
    /// the same transaction whatever `also` writes (a trigger's cursor): a firing is
    /// never recorded without its run, nor the run without the firing. The daemon
    /// starts it with [`Engine::start`].
    pub fn enqueue(
        &self,
        p: &Pipeline,
        text: &str,
        path: &Path,
        req: &RunRequest,
        also: impl FnOnce(&crate::store::db::Batch<'_>) -> crate::store::db::Result<()>,
    ) -> Result<i64, RunError> {
        let params = p.resolve_params(&req.params).map_err(RunError::Params)?;
        self.create_run(p, text, path, req, &params, RunStatus::Queued, also)
    }

    #[allow(clippy::too_many_arguments)]
    fn create_run(
        &self,
        p: &Pipeline,
        text: &str,
        path: &Path,
        req: &RunRequest,
        params: &[(String, ParamValue)],
        status: RunStatus,
        also: impl FnOnce(&crate::store::db::Batch<'_>) -> crate::store::db::Result<()>,
    ) -> Result<i64, RunError> {
        Ok(self.store.db().batch(|b| {
            b.record_definition(
                &p.digest,
                p.name.get_ref(),
                &path.display().to_string(),
                text,
            )?;
            let id = b.create_run(&NewRun {
                pipeline: p.name.get_ref(),
                experiment: &p.experiment,
                definition: &p.digest,
                params: &planner::params_json(params),
                trigger: &req.trigger,
                trigger_detail: req.trigger_detail.as_ref(),
                no_reuse: req.no_reuse,
                status,
                warnings: &p.warnings(),
                module_pins: &p.module_pins(),
            })?;
            also(b)?;
            Ok(id)
        })?)
    }

    /// Starts a queued run (or finishes an interrupted one) with the definition it
    /// was recorded with.
    pub async fn start(
        self: &Arc<Self>,
        run_id: i64,
        events: EventSink,
        cancel: tokio_util::sync::CancellationToken,
    ) -> Result<RunSummary, RunError> {
        self.resume(run_id, events, cancel).await
    }

    /// Finishes a failed, cancelled or interrupted run, reusing what succeeded.
    pub async fn resume(
        self: &Arc<Self>,
        run_id: i64,
        events: EventSink,
        cancel: tokio_util::sync::CancellationToken,
    ) -> Result<RunSummary, RunError> {
        let run = self
            .store
            .db()
            .read()
            .run(run_id)?
            .ok_or(RunError::NoSuchRun(run_id))?;
        if run.status == RunStatus::Succeeded {
            return Err(RunError::AlreadySucceeded(run_id));
        }
        let (path, text) = self
            .store
            .db()
            .read()
            .definition(&run.definition)?
            .ok_or(RunError::NoSuchRun(run_id))?;
        // Module specs resolve to the versions the run was created with; a version
        // disabled since then fails the run here, with the reason.
        let mut env = self.environment()?;
        env.modules = Arc::new(env.modules.pinned(run.module_pins.clone()));
        let (pipeline, report) = crate::graph::parse(Path::new(&path), text, &env);
        let p = pipeline.ok_or_else(|| RunError::Definition(Box::new(report)))?;
        let overrides: Vec<(String, String)> = match &run.params {
            serde_json::Value::Object(m) => m
                .iter()
                .map(|(k, v)| {
                    (
                        k.clone(),
                        v.as_str()
                            .map(str::to_string)
                            .unwrap_or_else(|| v.to_string()),
                    )
                })
                .collect(),
            _ => Vec::new(),
        };
        let params = p.resolve_params(&overrides).map_err(RunError::Params)?;
        self.execute(run_id, Arc::new(p), params, run.no_reuse, events, cancel)
            .await
    }
    async fn execute(
        self: &Arc<Self>,
        run_id: i64,
        p: Arc<Pipeline>,
        params: Vec<(String, ParamValue)>,
        no_reuse: bool,
        events: EventSink,
        cancel: tokio_util::sync::CancellationToken,
    ) -> Result<RunSummary, RunError> {
        let started = Instant::now();
        let _lock = match RunLock::acquire(&self.store, run_id) {
            Ok(Some(l)) => l,
            Ok(None) => return Err(RunError::Busy(run_id)),
            Err(source) => {
                return Err(RunError::Store(StoreError::Dir {
                    path: self.store.root.join("locks"),
                    source,
                }));
            }
        };
        // Held until the run ends; a `gc` sweeping now finishes first (a cancel or
        // a shutdown meanwhile ends the wait).
        let stop = || cancel.is_cancelled() || self.is_draining();
        let Some(_store_lock) =
            tokio::task::block_in_place(|| self.store.lock_shared_unless(&stop))?
        else {
            let status = if self.is_draining() {
                // Left as it was (queued or running): the next start takes it up.
                RunStatus::Interrupted
            } else {
                self.store.db().read().set_run_status(
                    run_id,
                    RunStatus::Cancelled,
                    Some("cancelled while it waited for gc to finish"),
                )?;
                RunStatus::Cancelled
            };
            return Ok(RunSummary {
                run_id,
                pipeline: p.name.get_ref().clone(),
                status,
                executed: 0,
                reused: 0,
                failed: 0,
                skipped: 0,
                cancelled: 0,
                seconds: started.elapsed().as_secs_f64(),
            });
        };
        let result = self
            .execute_locked(run_id, p, params, no_reuse, events, cancel, started)
            .await;
        if let Err(e @ (RunError::Db(_) | RunError::Store(_))) = &result {
            // A record could not be written mid-run (most often: the disk is full).
            // Removing the sandboxes frees what the steps wrote; then the failure
            // may fit, and the run is not left `running` (it can be resumed).
            let _ = tokio::task::block_in_place(|| remove_tree(&self.store.work_dir(run_id)));
            let _ = self.store.db().read().set_run_status(
                run_id,
                RunStatus::Failed,
                Some(&e.to_string()),
            );
        }
        result
    }

    /// [`Engine::execute`] once the run and the store are locked.
    #[allow(clippy::too_many_arguments)]
    async fn execute_locked(
        self: &Arc<Self>,
        run_id: i64,
        p: Arc<Pipeline>,
        params: Vec<(String, ParamValue)>,
        no_reuse: bool,
        events: EventSink,
        cancel: tokio_util::sync::CancellationToken,
        started: Instant,
    ) -> Result<RunSummary, RunError> {
        // Only the process holding the lock may mark the run as running (a resume
        // that finds it busy must not touch its status).
        self.store
            .db()
            .read()
            .set_run_status(run_id, RunStatus::Running, None)?;
        let graph = Graph::new(&p);
        let completed = self.insert_steps(run_id, &p, &graph)?;
        events(&Event::RunStarted {
            run: run_id,
            pipeline: p.name.get_ref().clone(),
            steps: p.steps.len(),
        });

        // Hashing (and on first sight copying) datasets is blocking work.
        let inputs = match tokio::task::block_in_place(|| {
            planner::pipeline_inputs(
                &self.store,
                &self.config.datastores,
                &p,
                &params,
                InputMode::Snapshot { run: run_id },
            )
        }) {
            Ok(i) => i,
            Err(e) => {
                let e = RunError::from(e);
                self.store.db().read().set_run_status(
                    run_id,
                    RunStatus::Failed,
                    Some(&e.to_string()),
                )?;
                return Err(e);
            }
        };
        let ctx = self
            .run_context(run_id, p.clone(), params, no_reuse, events, completed)
            .await;
        let mut schedule = Schedule::new(graph, Known::new(inputs, p.steps.len()));
        schedule.drive(&ctx, &cancel).await?;
        let run_status = schedule.record_end(&ctx)?;
        drop(ctx);
        let executed = schedule.count(StepStatus::Succeeded) + schedule.count(StepStatus::Failed);
        let _ = tokio::task::block_in_place(|| {
            if executed > 0 {
                self.store.artifacts.sync();
            }
            remove_tree(&self.store.work_dir(run_id))
        });
        Ok(RunSummary {
            run_id,
            pipeline: p.name.get_ref().clone(),
            status: run_status,
            executed,
            reused: schedule.count(StepStatus::Reused),
            failed: schedule.count(StepStatus::Failed),
            skipped: schedule.count(StepStatus::Skipped),
            cancelled: schedule.count(StepStatus::Cancelled),
            seconds: started.elapsed().as_secs_f64(),
        })
    }

    /// Records the run's steps (a resume finds them there already) and returns
    /// those that completed before: a resume keeps them.
    fn insert_steps(
        &self,
        run_id: i64,
        p: &Pipeline,
        graph: &Graph,
    ) -> Result<HashSet<usize>, RunError> {
        let mut db = self.store.db();
        db.batch(|b| {
            for (pos, &i) in graph.order.iter().enumerate() {
                let s = &p.steps[i];
                let module = match &s.kind {
                    StepKind::Module { module, .. } => Some(module.id.as_str()),
                    _ => None,
                };
                b.insert_step(run_id, s.name.get_ref(), pos, s.kind.runtime_name(), module)?;
            }
            Ok(())
        })?;
        let earlier: HashMap<String, StepStatus> = db
            .read()
            .steps(run_id)?
            .into_iter()
            .map(|s| (s.name, s.status))
            .collect();
        Ok((0..p.steps.len())
            .filter(|&i| {
                matches!(
                    earlier.get(p.steps[i].name.get_ref()),
                    Some(StepStatus::Succeeded | StepStatus::Reused)
                )
            })
            .collect())
    }

    /// What the run's step tasks share: its planner (with the images resolved
    /// now), its events, the engine's step slots and the run's sandboxes.
    async fn run_context(
        self: &Arc<Self>,
        run_id: i64,
        p: Arc<Pipeline>,
        params: Vec<(String, ParamValue)>,
        no_reuse: bool,
        events: EventSink,
        completed: HashSet<usize>,
    ) -> Arc<RunContext> {
        let images = Arc::new(self.resolve_images(&p).await);
        let params: Arc<[(String, ParamValue)]> = params.into();
        let planner = Planner::new(
            self.store.clone(),
            p.clone(),
            params.clone(),
            images.clone(),
            self.config.datastores.clone(),
            no_reuse,
        )
        .with_python(self.config.python.clone())
        .resuming(run_id, completed);
        Arc::new(RunContext {
            engine: self.clone(),
            run_id,
            pipeline: p,
            params,
            events,
            semaphore: self.slots.clone(),
            code_digests: planner.memo(),
            images,
            planner,
            adopting: Mutex::new(Default::default()),
            workspaces: WorkspacePool::new(self.store.work_dir(run_id)),
        })
    }
}
