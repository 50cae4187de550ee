//! One step: its attempts with backoff between them, their rows, the adoption
//! of a Slurm job a previous process left running, and the record of success.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

use super::{Event, RunContext};
use crate::definition;
use crate::model::{AttemptStatus, Placement, StepStatus};

pub(super) struct StepDone {
    pub(super) outputs: Vec<(String, String)>,
    /// Nothing executed: a `foreach` step whose items were all reused.
    pub(super) reused: bool,
}

pub(super) enum StepFailure {
    Failed,
    /// The daemon began to stop before the step (or its next attempt) started: it
    /// stays pending for the resume.
    NotStarted,
}

impl RunContext {
    /// Runs a step's attempts until one succeeds or they are used up.
    pub(super) async fn execute_step(
        self: Arc<Self>,
        i: usize,
        inputs: BTreeMap<String, String>,
        key: String,
    ) -> Result<StepDone, StepFailure> {
        // A step on a Slurm cluster waits for its job, not for this host's CPUs:
        // it takes no local slot, so a run can keep many jobs in the queue.
        let _permit = if self.engine.slurm_target(&self.pipeline.steps[i]).is_some() {
            None
        } else {
            Some(
                self.semaphore
                    .clone()
                    .acquire_owned()
                    .await
                    .map_err(|_| StepFailure::Failed)?,
            )
        };
        if self.engine.is_draining() {
            return Err(StepFailure::NotStarted);
        }
        let step = &self.pipeline.steps[i];
        let name = step.name.get_ref().clone();
        let started = Instant::now();
        let record = |r: crate::store::db::Result<()>| {
            if let Err(e) = r {
                tracing::error!(step = %name, error = %e, "cannot record step state");
            }
        };
        let mut last_error = String::new();
        // A Slurm job of this step that was running when the last process died is
        // followed again (adopted) as the attempt it was, not submitted anew.
        let adopt = self.adoptable_attempt(i);
        if let Some(a) = adopt {
            self.adopting
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert((i, a));
        }
        let first = adopt.unwrap_or(1);
        for attempt in first..=step.retries.attempts.max(first) {
            if attempt > first {
                let backoff = step
                    .retries
                    .backoff
                    .saturating_mul(1 << (attempt - 2).min(16));
                tokio::time::sleep(backoff).await;
                if self.engine.is_draining() {
                    return Err(StepFailure::NotStarted);
                }
            }
            (self.events)(&Event::StepStarted {
                step: name.clone(),
                attempt,
            });
            let log_path = self
                .engine
                .store
                .log_dir(self.run_id)
                .join(format!("{name}.{attempt}.log"));
            record(self.store().db().batch(|b| {
                if attempt == first {
                    record_inputs(b, self.run_id, step, &inputs)?;
                    b.start_step(self.run_id, &name)?;
                }
                b.start_attempt(
                    self.run_id,
                    &name,
                    attempt,
                    &log_path.display().to_string(),
                    adopt == Some(attempt),
                )
            }));
            // Boxed: an attempt's future (the executor's whole state machine,
            // ~7 KB in a debug build) would otherwise be inlined in this one,
            // which every spawned step holds while it waits for a slot: 999
            // waiting fan-out steps held 8.5 MB (docs/design.md, "Memory").
            let result = Box::pin(self.attempt(i, None, attempt, &inputs, &log_path)).await;
            match result {
                Ok(outputs) => {
                    return self.succeed(i, attempt, outputs, &key, started);
                }
                Err((exit_code, error)) => {
                    record(self.store().db().read().finish_attempt(
                        self.run_id,
                        &name,
                        attempt,
                        AttemptStatus::Failed,
                        exit_code,
                        Some(&error),
                    ));
                    if attempt < step.retries.attempts {
                        (self.events)(&Event::StepFinished {
                            step: name.clone(),
                            status: StepStatus::Failed,
                            detail: format!(
                                "attempt {attempt}/{}: {error}; retrying",
                                step.retries.attempts
                            ),
                            elapsed: started.elapsed(),
                        });
                    }
                    last_error = error;
                }
            }
        }
        let detail = if step.retries.attempts > 1 {
            format!("{last_error} (after {} attempts)", step.retries.attempts)
        } else {
            last_error
        };
        self.fail_step(&name, detail, started)
    }

    /// Records step `i`'s successful attempt with its outputs (and, for a
    /// reusable step, the cache entry under `key`) in one transaction.
    fn succeed(
        &self,
        i: usize,
        attempt: u32,
        outputs: Vec<(String, String)>,
        key: &str,
        started: Instant,
    ) -> Result<StepDone, StepFailure> {
        let step = &self.pipeline.steps[i];
        let name = step.name.get_ref();
        let recorded = self.store().db().batch(|b| {
            b.finish_attempt(
                self.run_id,
                name,
                attempt,
                AttemptStatus::Succeeded,
                Some(0),
                None,
            )?;
            for (o, d) in &outputs {
                b.record_step_output(self.run_id, name, o, d)?;
            }
            if step.reuse {
                b.set_cache_entry(key, self.run_id, name)?;
            }
            b.finish_step(self.run_id, name, StepStatus::Succeeded, None, None)
        });
        // A success that cannot be recorded is a failure: nothing would find its
        // outputs (`output`, `resume`, reuse).
        if let Err(e) = recorded {
            return self.fail_step(
                name,
                format!("cannot record the step's outputs: {e}"),
                started,
            );
        }
        let detail = if attempt > 1 {
            format!("attempt {attempt}")
        } else {
            String::new()
        };
        (self.events)(&Event::StepFinished {
            step: name.clone(),
            status: StepStatus::Succeeded,
            detail,
            elapsed: started.elapsed(),
        });
        Ok(StepDone {
            outputs,
            reused: false,
        })
    }

    /// The attempt of step `i` whose Slurm job a previous process submitted and
    /// did not see end (its row is still `running`).
    fn adoptable_attempt(&self, i: usize) -> Option<u32> {
        self.engine.slurm_target(&self.pipeline.steps[i])?;
        let name = self.pipeline.steps[i].name.get_ref();
        let attempts = self.store().db().read().attempts(self.run_id, name).ok()?;
        let last = attempts.last()?;
        (last.status == AttemptStatus::Running
            && matches!(last.placement, Some(Placement::Slurm(_))))
        .then_some(last.attempt as u32)
    }

    /// Records and reports a step's final failure.
    pub(super) fn fail_step(
        &self,
        name: &str,
        detail: String,
        started: Instant,
    ) -> Result<StepDone, StepFailure> {
        if let Err(e) = self.store().db().read().finish_step(
            self.run_id,
            name,
            StepStatus::Failed,
            None,
            Some(&detail),
        ) {
            tracing::error!(step = %name, error = %e, "cannot record step state");
        }
        (self.events)(&Event::StepFinished {
            step: name.to_string(),
            status: StepStatus::Failed,
            detail,
            elapsed: started.elapsed(),
        });
        Err(StepFailure::Failed)
    }
}

pub(super) fn record_inputs(
    b: &crate::store::db::Batch<'_>,
    run: i64,
    step: &definition::Step,
    inputs: &BTreeMap<String, String>,
) -> crate::store::db::Result<()> {
    let name = step.name.get_ref();
    for (mount, r) in step.references() {
        if let Some(digest) = inputs.get(mount) {
            b.record_step_input(run, name, mount, &r.get_ref().to_string(), digest)?;
        }
    }
    Ok(())
}
