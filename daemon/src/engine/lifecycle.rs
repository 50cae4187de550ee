//! A run's lifecycle: created (running at once, or queued for the daemon),
//! started, resumed from its recorded definition.

use std::path::Path;
use std::sync::Arc;

use super::{Engine, EventSink, RunError, RunRequest, RunSummary};
use crate::definition::{ParamValue, Pipeline};
use crate::model::RunStatus;
use crate::planner;
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
}
