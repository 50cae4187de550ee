//! A `foreach` step: its items, each reused or executed on its own key (its
//! attempts, retries and timeout are the step's, one slot each), then their
//! outputs merged into the step's. The step fails when an item fails or two
//! items wrote one path; the items that succeeded stay reusable.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

use tokio::task::JoinSet;

use super::step::{StepDone, StepFailure, record_inputs};
use super::{Event, RunContext};
use crate::model::{AttemptStatus, StepStatus};
use crate::planner::Item;
use crate::store::artifacts::escape_controls;

/// The name an item's attempts, logs, placement and metrics are recorded under.
pub(super) fn row_name(step: &str, item: Option<&str>) -> String {
    match item {
        Some(it) => format!("{step}[{it}]"),
        None => step.to_string(),
    }
}

/// The name an item's container or Slurm job is labelled with: two items whose
/// names differ only in characters a container name cannot hold (`a.csv`,
/// `a-csv`) still get different ones.
pub(super) fn label_name(step: &str, item: Option<&str>) -> String {
    match item {
        Some(it) => {
            let h = blake3::hash(it.as_bytes()).to_hex();
            format!("{step}-item-{}", &h[..12])
        }
        None => step.to_string(),
    }
}

/// How many item names a message lists before "and N more".
const NAMED: usize = 10;

/// What an executed item ended with.
type ItemResult = Result<Vec<(String, String)>, String>;

impl RunContext {
    /// Step `i`, a `foreach`: `items` as the planner decided them; `inputs` are
    /// the step's (its foreach mount holding the whole artifact).
    pub(super) async fn execute_items(
        self: Arc<Self>,
        i: usize,
        inputs: BTreeMap<String, String>,
        items: Vec<Item>,
    ) -> Result<StepDone, StepFailure> {
        let step = &self.pipeline.steps[i];
        let name = step.name.get_ref().clone();
        let started = Instant::now();
        let Some(mount) = step.foreach.as_ref().map(|m| m.get_ref().clone()) else {
            return self.fail_step(&name, "not a foreach step".into(), started);
        };
        // Every item's row (reused ones complete with their outputs) in one
        // transaction: `runs show` counts them from the start.
        let recorded = self.store().db().batch(|b| {
            record_inputs(b, self.run_id, step, &inputs)?;
            b.start_step(self.run_id, &name)?;
            for it in &items {
                let (status, from, outs) = match &it.reused {
                    Some((run, outs)) => (StepStatus::Reused, Some(*run), outs.as_slice()),
                    None => (StepStatus::Pending, None, &[][..]),
                };
                b.record_item(
                    self.run_id,
                    &name,
                    &it.name,
                    &it.input,
                    &it.key.key(),
                    status,
                    from,
                    outs,
                )?;
            }
            Ok(())
        });
        if let Err(e) = recorded {
            return self.fail_step(&name, format!("cannot record the items: {e}"), started);
        }
        (self.events)(&Event::StepStarted {
            step: name.clone(),
            attempt: 1,
        });
        let mut running = JoinSet::new();
        let mut done: Vec<(String, Vec<(String, String)>)> = Vec::with_capacity(items.len());
        let mut failed: Vec<(String, String)> = Vec::new();
        let (mut executed, mut reused) = (0usize, 0usize);
        let mut latest_from = None;
        for it in items {
            if let Some((run, outs)) = it.reused {
                reused += 1;
                latest_from = latest_from.max(Some(run));
                done.push((it.name, outs));
                continue;
            }
            executed += 1;
            let mut item_inputs = inputs.clone();
            item_inputs.insert(mount.clone(), it.input.clone());
            let ctx = self.clone();
            running.spawn(async move {
                let r = ctx.execute_item(i, &it.name, item_inputs).await;
                (it.name, r)
            });
        }
        let mut not_started = false;
        while let Some(joined) = running.join_next().await {
            match joined {
                Ok((item, Ok(Ok(outs)))) => done.push((item, outs)),
                Ok((item, Ok(Err(e)))) => failed.push((item, e)),
                Ok((_, Err(StepFailure::NotStarted))) => not_started = true,
                Ok((item, Err(StepFailure::Failed))) => failed.push((item, String::new())),
                Err(e) if e.is_cancelled() => {}
                Err(e) => std::panic::resume_unwind(e.into_panic()),
            }
        }
        let counts = format!(
            "{} item{}: {executed} executed, {reused} reused",
            executed + reused,
            if executed + reused == 1 { "" } else { "s" }
        );
        if !failed.is_empty() {
            failed.sort();
            let listed: Vec<String> = failed
                .iter()
                .take(NAMED)
                .map(|(item, e)| format!("`{}`: {e}", escape_controls(item)))
                .collect();
            let more = match failed.len().saturating_sub(NAMED) {
                0 => String::new(),
                n => format!("; and {n} more"),
            };
            let detail = format!(
                "{} of {} items failed: {}{more} ({counts})",
                failed.len(),
                executed + reused,
                listed.join("; ")
            );
            return self.fail_step(&name, detail, started);
        }
        if not_started {
            // The daemon is stopping: the items that did not start run on resume.
            return Err(StepFailure::NotStarted);
        }
        done.sort_by(|a, b| a.0.cmp(&b.0));
        let merged = tokio::task::block_in_place(|| self.planner.merge_outputs(i, &done));
        let outputs = match merged {
            Ok(m) => m,
            Err(e) => return self.fail_step(&name, e, started),
        };
        // Every item reused: the step executed nothing and is reused, from the
        // latest run its items came from.
        let all_reused = executed == 0 && reused > 0;
        let (status, from) = if all_reused {
            (StepStatus::Reused, latest_from)
        } else {
            (StepStatus::Succeeded, None)
        };
        let recorded = self.store().db().batch(|b| {
            for m in &outputs {
                if b.artifact(&m.digest)?.is_none() {
                    b.record_artifact(&m.digest, m.size, m.files)?;
                }
                b.record_step_output(self.run_id, &name, &m.output, &m.digest)?;
            }
            b.finish_step(self.run_id, &name, status, from, None)
        });
        if let Err(e) = recorded {
            return self.fail_step(
                &name,
                format!("cannot record the step's outputs: {e}"),
                started,
            );
        }
        (self.events)(&Event::StepFinished {
            step: name.clone(),
            status,
            detail: counts,
            elapsed: started.elapsed(),
        });
        Ok(StepDone {
            outputs: outputs.into_iter().map(|m| (m.output, m.digest)).collect(),
            reused: all_reused,
        })
    }

    /// One item's attempts, each in a slot of its own, until one succeeds or
    /// they are used up. `Ok(Err(message))`: the item failed.
    async fn execute_item(
        self: Arc<Self>,
        i: usize,
        item: &str,
        inputs: BTreeMap<String, String>,
    ) -> Result<ItemResult, StepFailure> {
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
        let name = step.name.get_ref();
        let row = row_name(name, Some(item));
        let record = |r: crate::store::db::Result<()>| {
            if let Err(e) = r {
                tracing::error!(step = %row, error = %e, "cannot record item state");
            }
        };
        let mut last_error = String::new();
        let attempts = step.retries.attempts.max(1);
        for attempt in 1..=attempts {
            if attempt > 1 {
                let backoff = step
                    .retries
                    .backoff
                    .saturating_mul(1 << (attempt - 2).min(16));
                tokio::time::sleep(backoff).await;
                if self.engine.is_draining() {
                    return Err(StepFailure::NotStarted);
                }
            }
            let log_path = self
                .engine
                .store
                .log_dir(self.run_id)
                .join(format!("{}.{attempt}.log", label_or_row(name, item)));
            record(self.store().db().batch(|b| {
                b.start_item_attempt(self.run_id, name, item, attempt)?;
                b.start_attempt(
                    self.run_id,
                    &row,
                    attempt,
                    &log_path.display().to_string(),
                    false,
                )
            }));
            // Boxed, as in `execute_step`: a thousand items waiting for a slot
            // must not each hold an attempt's whole state machine.
            match Box::pin(self.attempt(i, Some(item), attempt, &inputs, &log_path)).await {
                Ok(outputs) => {
                    let recorded = self.store().db().batch(|b| {
                        b.finish_attempt(
                            self.run_id,
                            &row,
                            attempt,
                            AttemptStatus::Succeeded,
                            Some(0),
                            None,
                        )?;
                        b.finish_item(
                            self.run_id,
                            name,
                            item,
                            StepStatus::Succeeded,
                            None,
                            &outputs,
                        )
                    });
                    return Ok(match recorded {
                        Ok(()) => Ok(outputs),
                        Err(e) => Err(format!("cannot record the item's outputs: {e}")),
                    });
                }
                Err((exit_code, error)) => {
                    record(self.store().db().read().finish_attempt(
                        self.run_id,
                        &row,
                        attempt,
                        AttemptStatus::Failed,
                        exit_code,
                        Some(&error),
                    ));
                    last_error = error;
                }
            }
        }
        let detail = if attempts > 1 {
            format!("{last_error} (after {attempts} attempts)")
        } else {
            last_error
        };
        record(self.store().db().read().finish_item(
            self.run_id,
            name,
            item,
            StepStatus::Failed,
            Some(&detail),
            &[],
        ));
        Ok(Err(detail))
    }
}

/// An item's log file name: `step[item]` while that is a short, plain file
/// name, else the hashed label (an item's name may be 255 bytes long already).
fn label_or_row(step: &str, item: &str) -> String {
    let row = row_name(step, Some(item));
    if row.len() <= 160 && !row.starts_with('.') {
        row
    } else {
        label_name(step, Some(item))
    }
}
