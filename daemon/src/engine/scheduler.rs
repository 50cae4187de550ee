//! The scheduler: the ready-queue loop of one run. A step is ready when every
//! step it reads from has ended; the planner decides whether it is reused or
//! executed ([`super::step`]); a failure skips its dependants; a cancel or a
//! shutdown sweeps what did not end.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::task::JoinSet;

use super::step::{StepDone, StepFailure, record_inputs};
use super::{Engine, Event, EventSink, RunContext, RunError, RunLock, RunSummary, remove_tree};
use crate::definition::{ParamValue, Pipeline, StepKind};
use crate::executor::transfer;
use crate::executor::workspace::WorkspacePool;
use crate::graph::Graph;
use crate::model::{RunStatus, StepStatus};
use crate::planner::{self, Decision, InputMode, Known, Planner, Reusable};
use crate::store::StoreError;

impl Engine {
    pub(super) async fn execute(
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

/// One run's ready-queue loop: which step next, and what follows when one ends.
struct Schedule {
    graph: Graph,
    /// Per step, how many of the steps it reads from have not ended yet.
    waiting: Vec<usize>,
    /// Per step, how it ended (`None`: not yet).
    status: Vec<Option<StepStatus>>,
    /// The digests of the pipeline inputs and of the ended steps' outputs.
    known: Known,
    ready: VecDeque<usize>,
    running: JoinSet<(usize, Result<StepDone, StepFailure>)>,
    cancelled: bool,
    /// Keys and reuse records of the decisions made between two awaits, written
    /// in one transaction: a no-op rerun of 1000 steps commits a handful of times.
    deferred: Vec<Deferred>,
}

impl Schedule {
    fn new(graph: Graph, known: Known) -> Schedule {
        let waiting: Vec<usize> = graph.deps.iter().map(Vec::len).collect();
        let ready = graph
            .order
            .iter()
            .copied()
            .filter(|&i| waiting[i] == 0)
            .collect();
        Schedule {
            status: vec![None; waiting.len()],
            waiting,
            known,
            ready,
            running: JoinSet::new(),
            cancelled: false,
            deferred: Vec::new(),
            graph,
        }
    }

    /// Starts ready steps and takes in ended ones until nothing runs and
    /// nothing is ready.
    async fn drive(
        &mut self,
        ctx: &Arc<RunContext>,
        cancel: &tokio_util::sync::CancellationToken,
    ) -> Result<(), RunError> {
        loop {
            if self.cancelled || ctx.engine.is_draining() {
                // Nothing new starts once the run is cancelled or the daemon stops.
                self.ready.clear();
            }
            while let Some(i) = self.ready.pop_front() {
                self.dispatch(ctx, i)?;
            }
            ctx.write_deferred(&mut self.deferred)?;
            let joined = tokio::select! {
                j = self.running.join_next() => j,
                () = cancel.cancelled(), if !self.cancelled => {
                    self.cancelled = true;
                    self.running.abort_all();
                    continue;
                }
            };
            let Some(joined) = joined else { break };
            let (i, result) = match joined {
                Ok(r) => r,
                Err(e) if e.is_cancelled() => continue,
                Err(e) => std::panic::resume_unwind(e.into_panic()),
            };
            self.ended(ctx, i, result)?;
        }
        Ok(())
    }

    /// Decides ready step `i` with the planner: reused at once, or executed in
    /// a task of its own.
    fn dispatch(&mut self, ctx: &Arc<RunContext>, i: usize) -> Result<(), RunError> {
        let (parts, reuse) = match ctx.planner.decide(i, &self.known)? {
            Decision::Reuse { key, from } => (key, Some(from)),
            Decision::Run { key, .. } => (key, None),
            // An upstream step did not produce what this one reads: handled
            // as skipped.
            Decision::Pending { .. } => return Ok(()),
            Decision::Unkeyed { error } => return self.fail_unkeyed(ctx, i, error),
        };
        let key = parts.key();
        self.deferred.push(Deferred::Key {
            i,
            key: key.clone(),
            parts: parts.to_json(),
        });
        let step_inputs = parts.inputs;
        if let Some(from) = reuse {
            self.reuse(ctx, i, key, from, step_inputs);
            return Ok(());
        }
        let ctx = ctx.clone();
        self.running.spawn(async move {
            let r = ctx.execute_step(i, step_inputs, key).await;
            (i, r)
        });
        Ok(())
    }

    /// Step `i` has no key (its code or an input cannot be read): it fails
    /// without an attempt.
    fn fail_unkeyed(&mut self, ctx: &RunContext, i: usize, detail: String) -> Result<(), RunError> {
        let name = ctx.pipeline.steps[i].name.get_ref().clone();
        ctx.store().db().read().finish_step(
            ctx.run_id,
            &name,
            StepStatus::Failed,
            None,
            Some(&detail),
        )?;
        (ctx.events)(&Event::StepFinished {
            step: name,
            status: StepStatus::Failed,
            detail,
            elapsed: Duration::ZERO,
        });
        self.status[i] = Some(StepStatus::Failed);
        skip_dependants(ctx, &self.graph, i, &mut self.status)
    }

    /// Step `i` reuses `from`'s outputs: recorded with the next batch, and its
    /// dependants may start.
    fn reuse(
        &mut self,
        ctx: &RunContext,
        i: usize,
        key: String,
        from: Reusable,
        inputs: BTreeMap<String, String>,
    ) {
        let name = ctx.pipeline.steps[i].name.get_ref().clone();
        // Its own outputs from before a resume: nothing new to record.
        let resumed = from.run == ctx.run_id && from.step == name;
        let detail = if resumed {
            "completed before the resume".to_string()
        } else if from.run == ctx.run_id {
            // Another step of this run with the very same key.
            format!("from step {} of this run", from.step)
        } else {
            format!("from run {}", from.run)
        };
        if let Some(dest) = ctx.planner.destination(i) {
            // What a killed transfer left beside its destination: the
            // next transfer there removes it, and a reuse is one too.
            transfer::remove_stale_staging(&dest);
        }
        let outs = from.outputs.clone();
        if !resumed {
            self.deferred.push(Deferred::Reuse {
                i,
                key,
                from,
                inputs,
            });
        }
        (ctx.events)(&Event::StepFinished {
            step: name,
            status: StepStatus::Reused,
            detail,
            elapsed: Duration::ZERO,
        });
        self.status[i] = Some(StepStatus::Reused);
        self.known.settle(i, outs);
        release(&self.graph, i, &mut self.waiting, &mut self.ready);
    }

    /// Step `i`'s task ended.
    fn ended(
        &mut self,
        ctx: &RunContext,
        i: usize,
        result: Result<StepDone, StepFailure>,
    ) -> Result<(), RunError> {
        match result {
            Ok(done) => {
                self.status[i] = Some(StepStatus::Succeeded);
                self.known.settle(i, done.outputs);
                if !self.cancelled {
                    release(&self.graph, i, &mut self.waiting, &mut self.ready);
                }
            }
            Err(StepFailure::NotStarted) => {}
            Err(StepFailure::Failed) => {
                self.status[i] = Some(StepStatus::Failed);
                skip_dependants(ctx, &self.graph, i, &mut self.status)?;
            }
        }
        Ok(())
    }

    fn count(&self, want: StepStatus) -> usize {
        self.status.iter().filter(|s| **s == Some(want)).count()
    }

    /// Once the loop is over: sweeps the steps that did not end (cancelled, or
    /// left pending by a shutdown) and records how the run ended.
    fn record_end(&mut self, ctx: &RunContext) -> Result<RunStatus, RunError> {
        // Stopped by a daemon shutdown: what did not finish stays pending for the
        // resume.
        let interrupted = ctx.engine.is_draining() && self.status.iter().any(Option::is_none);
        if self.cancelled && !interrupted {
            self.sweep_cancelled(ctx)?;
        }
        let failed = self.count(StepStatus::Failed);
        let run_status = if interrupted {
            self.sweep_interrupted(ctx)?;
            RunStatus::Interrupted
        } else if self.cancelled {
            RunStatus::Cancelled
        } else if failed > 0 || self.status.iter().any(Option::is_none) {
            RunStatus::Failed
        } else {
            RunStatus::Succeeded
        };
        let error = if interrupted {
            Some("interrupted by the daemon's shutdown".to_string())
        } else {
            (failed > 0).then(|| format!("{failed} step(s) failed"))
        };
        ctx.store()
            .db()
            .read()
            .set_run_status(ctx.run_id, run_status, error.as_deref())?;
        Ok(run_status)
    }

    /// A cancelled run: every step that did not end is cancelled.
    fn sweep_cancelled(&mut self, ctx: &RunContext) -> Result<(), RunError> {
        // Their jobs or containers were stopped: nothing to adopt on a resume.
        ctx.store()
            .db()
            .read()
            .cancel_running_attempts(ctx.run_id)?;
        for (i, s) in self.status.iter_mut().enumerate() {
            if s.is_none() {
                *s = Some(StepStatus::Cancelled);
                let name = ctx.pipeline.steps[i].name.get_ref();
                ctx.store().db().read().finish_step(
                    ctx.run_id,
                    name,
                    StepStatus::Cancelled,
                    None,
                    Some("the run was cancelled"),
                )?;
            }
        }
        Ok(())
    }

    /// A run stopped by the daemon's shutdown: every step that did not end is
    /// pending again, for the resume.
    fn sweep_interrupted(&self, ctx: &RunContext) -> Result<(), RunError> {
        for (i, s) in self.status.iter().enumerate() {
            if s.is_none() {
                ctx.store().db().read().finish_step(
                    ctx.run_id,
                    ctx.pipeline.steps[i].name.get_ref(),
                    StepStatus::Pending,
                    None,
                    Some("interrupted by the daemon's shutdown"),
                )?;
            }
        }
        Ok(())
    }
}

/// Step `i` ended with outputs: its dependants wait for one step less, and
/// those that wait for none are ready.
fn release(graph: &Graph, i: usize, waiting: &mut [usize], ready: &mut VecDeque<usize>) {
    for &d in &graph.dependants[i] {
        waiting[d] -= 1;
        if waiting[d] == 0 {
            ready.push_back(d);
        }
    }
}

/// Marks every step downstream of a failed one as skipped.
fn skip_dependants(
    ctx: &RunContext,
    graph: &Graph,
    failed: usize,
    status: &mut [Option<StepStatus>],
) -> Result<(), RunError> {
    let mut stack = vec![failed];
    while let Some(i) = stack.pop() {
        for &d in &graph.dependants[i] {
            if status[d].is_none() {
                status[d] = Some(StepStatus::Skipped);
                let name = ctx.pipeline.steps[d].name.get_ref();
                let cause = ctx.pipeline.steps[i].name.get_ref();
                let detail = format!("upstream step `{cause}` did not succeed");
                ctx.engine.store.db().read().finish_step(
                    ctx.run_id,
                    name,
                    StepStatus::Skipped,
                    None,
                    Some(&detail),
                )?;
                (ctx.events)(&Event::StepFinished {
                    step: name.clone(),
                    status: StepStatus::Skipped,
                    detail,
                    elapsed: Duration::ZERO,
                });
                stack.push(d);
            }
        }
    }
    Ok(())
}

/// A record of the scheduler's, written with the next batch.
enum Deferred {
    Key {
        i: usize,
        key: String,
        parts: serde_json::Value,
    },
    Reuse {
        i: usize,
        key: String,
        from: Reusable,
        inputs: BTreeMap<String, String>,
    },
}

impl RunContext {
    /// Writes the deferred records in one transaction. A reused step's cache entry
    /// moves to this run, which now holds the same outputs, so deleting older runs
    /// (`gc`) keeps the entry alive.
    fn write_deferred(&self, deferred: &mut Vec<Deferred>) -> Result<(), RunError> {
        if deferred.is_empty() {
            return Ok(());
        }
        self.store().db().batch(|b| {
            for d in deferred.iter() {
                match d {
                    Deferred::Key { i, key, parts } => b.set_step_key(
                        self.run_id,
                        self.pipeline.steps[*i].name.get_ref(),
                        key,
                        parts,
                    )?,
                    Deferred::Reuse {
                        i,
                        key,
                        from,
                        inputs,
                    } => {
                        let step = &self.pipeline.steps[*i];
                        let name = step.name.get_ref();
                        record_inputs(b, self.run_id, step, inputs)?;
                        for (o, d) in &from.outputs {
                            b.record_step_output(self.run_id, name, o, d)?;
                        }
                        b.copy_metrics(from.run, &from.step, self.run_id, name)?;
                        if step.reuse {
                            b.set_cache_entry(key, self.run_id, name)?;
                        }
                        b.finish_step(self.run_id, name, StepStatus::Reused, Some(from.run), None)?;
                    }
                }
            }
            Ok(())
        })?;
        deferred.clear();
        Ok(())
    }
}
