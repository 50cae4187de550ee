//! The scheduler: the ready-queue loop of one run. A step is ready when every
//! step it reads from has ended; the planner decides whether it is reused or
//! executed ([`super::step`]); a failure skips its dependants; a cancel or a
//! shutdown sweeps what did not end.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use tokio::task::JoinSet;

use super::step::{StepDone, StepFailure, record_inputs};
use super::{Event, RunContext, RunError};
use crate::executor::transfer;
use crate::graph::Graph;
use crate::model::{RunStatus, StepStatus};
use crate::planner::{Decision, Known, Reusable};

/// One run's ready-queue loop: which step next, and what follows when one ends.
pub(super) struct Schedule {
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
    pub(super) fn new(graph: Graph, known: Known) -> Schedule {
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
    pub(super) async fn drive(
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
            Decision::Items { key, items } => {
                self.deferred.push(Deferred::Key {
                    i,
                    key: key.key(),
                    parts: key.to_json(),
                });
                let ctx = ctx.clone();
                self.running.spawn(async move {
                    let r = ctx.execute_items(i, key.inputs, items).await;
                    (i, r)
                });
                return Ok(());
            }
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
                self.status[i] = Some(if done.reused {
                    StepStatus::Reused
                } else {
                    StepStatus::Succeeded
                });
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

    pub(super) fn count(&self, want: StepStatus) -> usize {
        self.status.iter().filter(|s| **s == Some(want)).count()
    }

    /// Once the loop is over: sweeps the steps that did not end (cancelled, or
    /// left pending by a shutdown) and records how the run ended.
    pub(super) fn record_end(&mut self, ctx: &RunContext) -> Result<RunStatus, RunError> {
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
                ctx.store().db().batch(|b| {
                    b.finish_step(
                        ctx.run_id,
                        name,
                        StepStatus::Cancelled,
                        None,
                        Some("the run was cancelled"),
                    )?;
                    // A foreach step's items that did not end.
                    b.cancel_items(ctx.run_id, name, "the run was cancelled")
                })?;
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
